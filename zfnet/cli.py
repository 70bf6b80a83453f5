"""`zfnet <command>`: a thin shell over the library; each command calls one library function.

Problems a user can fix (ZfnetError) print one line `zfnet: error: ...` and exit 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from .errors import ZfnetError

# Each command: (name, help, add_arguments(parser), run(args) -> exit code). Commands import their
# modules lazily so `zfnet --help` stays fast.
COMMANDS: list[tuple] = []


def command(name: str, help: str):
    def register(add_arguments):
        def wrap(run):
            COMMANDS.append((name, help, add_arguments, run))
            return run
        return wrap
    return register


def add_model_args(p: argparse.ArgumentParser, default_model: str = "squeezenet1_1"):
    p.add_argument("--model", default=default_model,
                   help="registry name (zfnet, alexnet, alexnet2, alexnet_torchvision, squeezenet1_1) or "
                        "package.module:factory (default: %(default)s)")
    p.add_argument("--weights", default="default",
                   help="weights file or URL; 'default' = the published weights ($ZFNET_WEIGHTS if set, else "
                        "downloaded once); 'none' = random init")
    p.add_argument("--num-classes", type=int, default=None, help="output classes (default: the model's)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")


def load_from_args(args):
    import torch

    from .weights import load_model

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    weights = None if args.weights in (None, "none") else args.weights
    return load_model(args.model, weights, num_classes=args.num_classes, device=device)


def emit_json(obj):
    sys.stdout.write(json.dumps(obj, indent=1) + "\n")


def write_result(args, out, result: dict, **config) -> bool:
    """Record the command's exact config (model, weights, inputs) in the result, write out/result.json
    atomically, and with --json print it. Returns True when the caller should print its text summary."""
    from .results import write_json

    result["config"].update(model=args.model, weights=args.weights, **config)
    write_json(out / "result.json", result)
    if args.json:
        emit_json(result)
    return not args.json


def _csv(text, cast=str) -> list:
    """"a, b,c" -> [cast("a"), cast("b"), cast("c")] (empty items dropped)."""
    return [cast(t.strip()) for t in str(text).split(",") if t.strip()]


def report_skipped(skipped):
    """At the end of a batch job: say which files were skipped and why (stderr, one line each)."""
    for _path, why in skipped:  # `why` already names the file
        print(f"zfnet: skipped: {why}", file=sys.stderr)


# ----------------------------------------------------------------------------------------------------
def _predict_args(p):
    add_model_args(p)
    p.add_argument("inputs", nargs="*", metavar="IMAGE_OR_DIR",
                   help="images or folders (default: the sample photos shipped with zfnet)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--ten-crop", action="store_true", help="average the softmax over 10 crops (paper Sec. 3)")
    p.add_argument("--json", action="store_true", help="print only JSON on stdout")


@command("predict", "top-5 labels for images")(_predict_args)
def _predict(args):
    from .predict import predict
    from .samples import sample_dir

    model = load_from_args(args)
    inputs = args.inputs or [str(sample_dir())]
    result = predict(model, inputs, batch_size=args.batch_size, crop="ten" if args.ten_crop else "center",
                     progress=not args.json)
    if args.json:
        emit_json(result.to_json())
    else:
        for p in result.predictions:
            print(p.file)
            for t in p.top5:
                print(f"  {t['prob']:6.1%}  {t['label']} ({t['index']})")
    report_skipped(result.skipped)
    return 0 if result.predictions or not result.skipped else 1


def _layers_args(p):
    add_model_args(p)
    p.add_argument("--size", type=int, default=224, help="input size in pixels (default: %(default)s)")
    p.add_argument("--json", action="store_true")


@command("layers", "the layer table: channels, size, stride, receptive field per layer")(_layers_args)
def _layers(args):
    from .layers import layer_table

    if args.weights == "default":
        args.weights = None  # the table depends on the architecture only: never download for it
    table = layer_table(load_from_args(args), args.size)
    emit_json(table.to_json()) if args.json else print(table.format())
    return 0


def _train_args(p):
    from .train import add_config_args

    add_config_args(p)


@command("train", "train ZFNet / AlexNet / a Table 3 variant with the paper's recipe (torchrun-ready)")(_train_args)
def _train(args):
    from .train import config_from_args, main

    result = main(config_from_args(args))
    return 0 if result["epochs"] else 1


def _occlude_args(p):
    add_model_args(p)
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("--label", type=int, default=None, help="correct class index (default: the clean top-1)")
    p.add_argument("--size", type=int, default=48, help="occluder side in input pixels (default: %(default)s)")
    p.add_argument("--stride", type=int, default=16, help="occluder step in input pixels (default: %(default)s)")
    p.add_argument("--fill", type=float, default=0.0,
                   help="occluder value after normalization; 0 = the preprocessing mean (default)")
    p.add_argument("--layer", default=None, help="layer whose strongest map is tracked (default: top conv layer)")
    p.add_argument("--method", default="incremental", choices=["incremental", "naive"])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--out", required=True, help="result folder")
    p.add_argument("--json", action="store_true", help="print result.json on stdout")


@command("occlude", "Fig. 7: occlusion sensitivity maps (exact, incremental)")(_occlude_args)
def _occlude(args):
    from pathlib import Path

    from .occlusion import occlusion, render_occlusion
    from .results import save_npz

    model = load_from_args(args)
    r = occlusion(model, args.image, label=args.label, size=args.size, stride=args.stride, fill=args.fill,
                  layer=args.layer, method=args.method, batch_size=args.batch_size, progress=not args.json)
    out = Path(args.out)
    arrays = dict(prob=r.prob, argmax_label=r.argmax_label, activity=r.activity,
                  pixel_attribution=r.pixel_attribution())
    if r.projection is not None:
        arrays["projection"] = r.projection
    save_npz(out / "maps.npz", **arrays)
    render_occlusion(r, out / "occlusion.png")
    if write_result(args, out, r.to_json(), image=args.image):
        print(f"{r.file}: p({r.label_name})={r.clean_prob:.3f} unoccluded, min {r.prob.min():.3f} occluded; "
              f"tracked {r.feature_map}; wrote {out}/result.json, occlusion.png, maps.npz")
    return 0


def _atlas_args(p):
    add_model_args(p)
    p.add_argument("--data", default=None, help="image folder (default: the sample photos shipped with zfnet)")
    p.add_argument("--layers", default=None, help="comma-separated layer names (default: the rectified conv "
                   "outputs; see `zfnet layers`)")
    p.add_argument("--k", type=int, default=9, help="top activations per feature map (default: %(default)s)")
    p.add_argument("--out", default="atlas", help="result folder (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=0, help="image decoding processes (default: %(default)s)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument("--mode", default="deconv", choices=["deconv", "guided", "saliency"],
                   help="projection rule (default: the paper's deconvnet)")
    p.add_argument("--tile", type=int, default=64, help="largest side of each picture in pixels (default: 64)")
    p.add_argument("--json", action="store_true", help="print only the result summary as JSON on stdout")


@command("atlas", "Fig. 2: top-9 activations of every feature map over a dataset, projected, as an HTML site")(
    _atlas_args)
def _atlas(args):
    import torch

    from .atlas import atlas
    from .samples import sample_dir

    if args.device is None and "LOCAL_RANK" in os.environ and torch.cuda.is_available():
        args.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"  # torchrun: one GPU per process
        torch.cuda.set_device(args.device)
    model = load_from_args(args)
    layers = _csv(args.layers) if args.layers else None
    data = args.data or str(sample_dir())
    res = atlas(model, data, args.out, layers, k=args.k, batch_size=args.batch_size, resume=args.resume,
                progress=not args.json, workers=args.workers, tile=args.tile, mode=args.mode,
                model_name=args.model, weights=args.weights)
    if int(os.environ.get("RANK", "0")) == 0:
        summary = {"out": str(res.out), "index": str(res.out / "index.html"), "images": res.mined.images,
                   "layers": list(res.mined.layers), "skipped": len(res.mined.skipped),
                   "timing": res.meta.get("timing")}
        if args.json:
            emit_json(summary)
        else:
            print(f"atlas of {res.mined.images} images, {len(res.mined.layers)} layers: {res.out / 'index.html'}")
        report_skipped(res.mined.skipped)
    return 0 if res.mined.images else 1


def _floats(text):
    """"a:b:step" (inclusive) or "v1,v2,..." -> floats."""
    from .errors import ZfnetError

    try:
        if ":" in text:
            a, b, step = (float(v) for v in text.split(":"))
            if step <= 0:
                raise ValueError
            n = int(round((b - a) / step))
            return [round(a + i * step, 6) for i in range(n + 1)]
        return _csv(text, float)
    except ValueError:
        raise ZfnetError(f"bad sweep {text!r}: use START:STOP:STEP (step > 0) or V1,V2,...") from None


def _invariance_args(p):
    add_model_args(p)
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--label", type=int, nargs="+", default=None,
                   help="true class of each image, in order (default: each image's unmodified top-1)")
    p.add_argument("--layers", nargs="+", default=None, help="default: layer 1 and the penultimate layer")
    p.add_argument("--translate", default="-60:60:10", help="vertical shifts in pixels (default: %(default)s)")
    p.add_argument("--scale", default="1.0:1.8:0.1", help="zoom factors (default: %(default)s)")
    p.add_argument("--rotate", default="0:360:15", help="angles in degrees (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--out", required=True, help="result folder")
    p.add_argument("--json", action="store_true", help="print result.json on stdout")


@command("invariance", "Fig. 5: feature distance and p(true label) under translation, scale, rotation")(
    _invariance_args)
def _invariance(args):
    from pathlib import Path

    from .invariance import invariance, render_invariance

    model = load_from_args(args)
    sweeps = {k: _floats(getattr(args, k)) for k in ("translate", "scale", "rotate")}
    r = invariance(model, args.images, labels=args.label, layers=args.layers, sweeps=sweeps,
                   batch_size=args.batch_size, progress=not args.json)
    out = Path(args.out)
    result = r.to_json()
    if r.files:
        render_invariance(r, out / "invariance.png")
        render_invariance(r, out / "invariance_raw.png", normalized=False)
    if write_result(args, out, result, images=args.images):
        for k in r.sweeps:
            for name in r.layers:
                d = r.normalized[k][name]
                print(f"{k:9s} {name:14s} normalized distance at the sweep's end: "
                      + ", ".join(f"{v:.2f}" for v in d[:, -1]))
        print(f"wrote {out}/result.json, invariance.png, invariance_raw.png")
    report_skipped(r.skipped)
    return 0 if r.files else 1


def _correspond_args(p):
    add_model_args(p)
    p.add_argument("--parts", required=True, help="parts file (format of ../shared/data/dogs/parts.json)")
    p.add_argument("--images-root", default=None,
                   help="folder of the images (default: beside the parts file, else ../imagenet-samples "
                        "next to its folder)")
    p.add_argument("--layers", nargs="+", default=None,
                   help="default: the top conv layer and the penultimate layer")
    p.add_argument("--part", nargs="+", default=None, help="parts to mask (default: all marked in every image)")
    p.add_argument("--size", type=int, default=30, help="masking square side in input pixels (default: %(default)s)")
    p.add_argument("--draws", type=int, default=10, help="random-position draws per image (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="result folder")
    p.add_argument("--json", action="store_true", help="print result.json on stdout")


@command("correspond", "Table 1: mean feature sign change when the same part is masked in every image")(
    _correspond_args)
def _correspond(args):
    from pathlib import Path

    from .correspondence import correspondence, render_correspondence
    from .data import Preprocess
    from .results import atomic_path

    model = load_from_args(args)
    r = correspondence(model, args.parts, images_root=args.images_root, layers=args.layers, parts=args.part,
                       size=args.size, random_draws=args.draws, seed=args.seed)
    out = Path(args.out)
    render_correspondence(r, out / "masks.png", Preprocess.for_model(model))
    with atomic_path(out / "table1.md") as tmp:
        Path(tmp).write_text(r.markdown() + "\n", encoding="utf-8")
    if write_result(args, out, r.to_json()):
        print(r.format())
        print(f"wrote {out}/result.json, table1.md, masks.png")
    report_skipped(r.skipped)
    return 0


def _probe_common_args(p):
    add_model_args(p)
    p.add_argument("--data", required=True, help="image folder with one subfolder per class (e.g. Caltech-101)")
    p.add_argument("--out", required=True, help="result folder (result.json)")
    p.add_argument("--folds", type=int, default=5, help="random train/test folds (default: %(default)s)")
    p.add_argument("--max-test", type=int, default=50, help="test images per class at most (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--Cs", default="0.001,0.01,0.1,1", help="regularization grid, chosen by CV on the train split")
    p.add_argument("--cv", type=int, default=3, help="CV folds inside the train split (default: %(default)s)")
    p.add_argument("--engine", default="torch", choices=("torch", "sklearn"),
                   help="classifier solver: torch L-BFGS (fast) or scikit-learn (reference)")
    p.add_argument("--scratch", action="store_true",
                   help="also train the same architecture from random init on the train images only")
    p.add_argument("--scratch-size", type=int, default=64, help="input size for the from-scratch run (CPU scale)")
    p.add_argument("--scratch-epochs", type=int, default=30)
    p.add_argument("--cache", default=None,
                   help="feature cache folder (default: ~/.cache/zfnet/features; 'none' = no cache)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=0, help="image decoding processes")
    p.add_argument("--json", action="store_true", help="print only JSON on stdout")


def _probe_setup(args):
    from .features import default_cache_dir

    model = load_from_args(args)
    cache = None if args.cache == "none" else (args.cache or default_cache_dir())
    scratch = None
    if args.scratch:
        scratch = {"model": args.model, "size": args.scratch_size, "epochs": args.scratch_epochs,
                   "device": str(next(model.parameters()).device)}
    common = {"max_test": args.max_test, "folds": args.folds, "seed": args.seed, "Cs": _csv(args.Cs, float),
              "cv": args.cv, "scratch": scratch, "cache_dir": cache, "batch_size": args.batch_size,
              "workers": args.workers, "engine": args.engine, "progress": not args.json}
    return model, common


def _probe_args(p):
    _probe_common_args(p)
    p.add_argument("--layers", default=None, help="comma-separated layers (default: the rectified conv "
                   "outputs and the class scores)")
    p.add_argument("--pool", default="avg", help="spatial pooling: max, avg, flatten, or several comma-separated")
    p.add_argument("--classifiers", default="svm,softmax", help="svm, softmax or both (default: %(default)s)")
    p.add_argument("--per-class", type=int, default=30, help="training images per class (default: %(default)s)")


@command("probe", "Table 7: linear SVM / softmax on each layer's features, Caltech protocol")(_probe_args)
def _probe(args):
    from .probes import run_probe

    model, common = _probe_setup(args)
    result = run_probe(model, args.data, args.out, layers=_csv(args.layers) if args.layers else None,
                       pools=_csv(args.pool), classifiers=_csv(args.classifiers), per_class=args.per_class,
                       **common)
    emit_json(result.to_json()) if args.json else print(result.format())
    report_skipped(result.skipped)
    return 0


def _fewshot_args(p):
    _probe_common_args(p)
    p.add_argument("--layers", required=True, help="comma-separated layers, one curve each")
    p.add_argument("--pool", default="avg", choices=("max", "avg", "flatten"))
    p.add_argument("--classifier", default="svm", choices=("svm", "softmax"))
    p.add_argument("--per-class", default="1,2,4,6,8,10,15,20,30", help="training images per class (Fig. 9)")


@command("fewshot", "Fig. 9: accuracy against training images per class")(_fewshot_args)
def _fewshot(args):
    from .probes import run_fewshot

    model, common = _probe_setup(args)
    result = run_fewshot(model, args.data, args.out, layers=_csv(args.layers), pool=args.pool,
                         classifier=args.classifier, per_class=_csv(args.per_class, int), **common)
    if args.json:
        emit_json(result)
    else:
        for name, c in result["curves"].items():
            print(name)
            for n, m, s in zip(c["per_class"], c["mean"], c["std"]):
                print(f"  {n:3d}/class  {m:5.1f} +- {s:.1f}")
        print(f"wrote {os.path.join(args.out, 'fewshot.png')}")
    report_skipped(result["skipped"])
    return 0


def _overlap_args(p):
    from .overlap import DEFAULT_THRESHOLD

    p.add_argument("dir_a", metavar="DIR_A")
    p.add_argument("dir_b", metavar="DIR_B")
    p.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                   help="normalized correlation to call a pair a near-duplicate (default: %(default)s)")
    p.add_argument("--size", type=int, default=32, help="thumbnail side in pixels (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print only JSON on stdout")


@command("overlap", "Sec. 5.2: near-duplicate images between two sets (thumbnail correlation)")(_overlap_args)
def _overlap(args):
    from .overlap import find_overlap

    result = find_overlap(args.dir_a, args.dir_b, threshold=args.threshold, size=args.size,
                          progress=not args.json)
    if args.json:
        emit_json(result.to_json())
    else:
        for p in result.pairs:
            print(f"{p['score']:.3f}  {p['a']}  {p['b']}")
        print(f"{len(result.pairs)} pair(s) >= {args.threshold} among {result.n_a} x {result.n_b} images",
              file=sys.stderr)
    report_skipped(result.skipped)
    return 0


def _trained_model(args):
    """--model auto: rebuild a `zfnet train` checkpoint (any reduced width / input size) from its record."""
    if args.model != "auto":
        return load_from_args(args)
    from .checkpoint import model_from_checkpoint

    if args.weights in (None, "none", "default"):
        raise ZfnetError("--model auto needs --weights CHECKPOINT (a zfnet train checkpoint.pth / epoch_NNN.pth)")
    import torch

    return model_from_checkpoint(args.weights, args.device or ("cuda" if torch.cuda.is_available() else "cpu"))


def _diagnose_args(p):
    add_model_args(p, default_model="auto")
    p.add_argument("--data", default=None, help="image folder for never-active filters and layer-2 features")
    p.add_argument("--out", required=True, help="result folder (result.json, arrays.npz, PNGs)")
    p.add_argument("--max-images", type=int, default=None, help="use at most this many images of --data")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--json", action="store_true", help="print only JSON on stdout")


@command("diagnose", "Fig. 6: layer-1 filters, dead filters, frequency coverage, layer-2 aliasing, "
         "filter-scale domination")(_diagnose_args)
def _diagnose(args):
    from .diagnose import diagnose

    model = _trained_model(args)
    d = diagnose(model, args.data, args.out, max_images=args.max_images, batch_size=args.batch_size,
                 progress=not args.json, config={"model": args.model, "weights": args.weights, "data": args.data})
    result = d.to_json()
    if args.json:
        emit_json(result)
    else:
        b = result["bands"]
        print(f"{d.layer1} (stride {d.stride1}): {len(result['dead'])}/{d.filters} dead; spectral energy "
              f"low {b['low']:.1%} mid {b['mid']:.1%} high {b['high']:.1%}")
        print("domination (max/median filter RMS): " + ", ".join(f"{k} {v:.2f}" for k, v in d.domination.items()))
        if "aliasing" in d.layer2:
            print(f"{d.layer2['layer']}: aliasing {d.layer2['aliasing']:.1%} (above 1/8 c/px: "
                  f"{d.layer2['above_1_8']:.1%}) over {d.layer2['units']} units")
        print(f"wrote {args.out}")
    report_skipped(d.skipped)
    return 0


def _evolution_args(p):
    p.add_argument("--run", dest="run_dir", required=True, help="a `zfnet train` run folder (epoch_NNN.pth snapshots)")
    p.add_argument("--data", required=True, help="image folder searched for each unit's strongest activation")
    p.add_argument("--out", required=True, help="result folder (result.json, evolution_<layer>.png)")
    p.add_argument("--epochs", default=None, help="comma-separated epochs (default: 8 spread over the run)")
    p.add_argument("--layers", default=None, help="comma-separated layers (default: all rectified conv layers)")
    p.add_argument("--units", type=int, default=6, help="units per layer, evenly spaced (default: %(default)s)")
    p.add_argument("--max-images", type=int, default=None, help="use at most this many images of --data")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true", help="print only JSON on stdout")


@command("evolution", "Fig. 4: each unit's strongest projection at chosen training epochs")(_evolution_args)
def _evolution(args):
    from .evolution import evolution

    ints = _csv(args.epochs, int) if args.epochs else None
    layers = _csv(args.layers) if args.layers else None
    ev = evolution(args.run_dir, args.data, args.out, epochs=ints, layers=layers, units=args.units,
                   max_images=args.max_images, batch_size=args.batch_size, device=args.device,
                   progress=not args.json)
    if args.json:
        emit_json(ev.to_json())
    else:
        print(f"epochs {ev.epochs}; wrote " + ", ".join(f"{args.out}/{f}" for f in ev.figures.values()))
    report_skipped(ev.skipped)
    return 0


def _ablate_args(p):
    from .train import add_config_args

    p.add_argument("--variants", default=None, help="comma-separated Table 3 variants (default: all)")
    add_config_args(p, skip=("model",))


@command("ablate", "Table 3: ZFNet variants (layers removed / resized) trained with the same recipe")(_ablate_args)
def _ablate(args):
    from .ablate import ablate, format_table
    from .train import config_from_args

    variants = _csv(args.variants) if args.variants else None
    result = ablate(config_from_args(args), variants)
    print(format_table(result["variants"]))
    return 0


def _project_args(p):
    add_model_args(p)
    p.add_argument("image", metavar="IMAGE", help="an image file")
    p.add_argument("--unit", action="append", default=None, metavar="LAYER:CH[@Y,X]",
                   help="unit to project, repeatable: a feature map (conv5:17, or a module name such as "
                        "features.12:3) or one activation (conv5:17@3,4). Default: the strongest feature map "
                        "of the deepest conv feature layer")
    p.add_argument("--mode", default="deconv", choices=["deconv", "guided", "saliency"],
                   help="deconv = Zeiler & Fergus deconvnet (default); guided = guided backprop; "
                        "saliency = the plain gradient")
    p.add_argument("--backprop-norm", action="store_true",
                   help="backpropagate LRN instead of passing it through (deconv mode)")
    p.add_argument("--out", required=True, help="output folder: one PNG per unit, named after the unit")
    p.add_argument("--save-npy", action="store_true",
                   help="also write input.npy (the preprocessed input, 1x3xHxW float32) and <unit>.npy "
                        "(the raw projection, same shape)")
    p.epilog = ("PNG display: each projection is scaled by its own largest magnitude, symmetric about zero "
                "(0 = mid grey, +max = white, -max = black, per colour channel with one shared scale), as "
                "in the paper's figures; use --save-npy for the raw numbers.")


@command("project", "Sec. 2.1: project units back to pixel space (deconvnet, guided backprop, saliency)")(
    _project_args)
def _project(args):
    from pathlib import Path

    import numpy as np

    from .data import Preprocess, load_image
    from .layers import layer_table, parse_unit
    from .project import project, strongest_map
    from .render import save_png, signed_to_rgb
    from .results import atomic_path

    image = load_image(args.image)  # ZfnetError naming the file if unreadable
    model = load_from_args(args)
    x = Preprocess.for_model(model)(image).unsqueeze(0).to(next(model.parameters()).device)
    table = layer_table(model, tuple(x.shape[-2:]))
    units = [parse_unit(u, table) for u in args.unit] if args.unit else [strongest_map(model, x)]
    proj = project(model, x, units, args.mode, backprop_norm=args.backprop_norm)[0]  # (U, 3, H, W)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def save_npy(path, a):
        with atomic_path(path, suffix=".npy") as tmp:
            with open(tmp, "wb") as f:
                np.save(f, a)

    if args.save_npy:
        save_npy(out / "input.npy", x.detach().cpu().float().numpy())
    for u, p in zip(units, proj):
        save_png(signed_to_rgb(p), out / f"{u.slug}.png")
        if args.save_npy:
            save_npy(out / f"{u.slug}.npy", p.unsqueeze(0).detach().cpu().float().numpy())
        print(f"{u}: max |projection| {p.abs().max().item():.4g} -> {out / (u.slug + '.png')}")
    return 0


# ----------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zfnet", description="Visualize and understand any PyTorch convnet "
                                     "(Zeiler & Fergus 2013).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_, add_arguments, run in COMMANDS:
        p = sub.add_parser(name, help=help_, description=help_)
        add_arguments(p)
        p.set_defaults(run=run)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    try:
        return int(args.run(args) or 0)
    except ZfnetError as e:
        print(f"zfnet: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("zfnet: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `zfnet ... | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
