"""`zfnet atlas | occlude | invariance | correspond`: Sec. 4 of the paper, the feature atlas (Fig. 2) and the
measurements (Fig. 7, Fig. 5, Table 1)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..core.errors import NoInputError, ZfnetError
from .common import (
    add_layers_arg,
    add_list_arg,
    add_model_args,
    command,
    emit_json,
    finite_float,
    int_range,
    load_from_args,
    nonnegative_int,
    out_dir,
    positive_int,
    positive_sweep,
    report_skipped,
    resolve_device,
    sweep,
    write_result,
)


def _atlas_args(p):
    add_model_args(p)
    p.add_argument("--data", default=None, help="image folder, class subfolders give labels (default: the 202 "
                   "Caltech-101 demo photos shipped with zfnet)")
    add_layers_arg(p, "layers to mine (default: the default feature layers, marked * by `zfnet layers`)")
    p.add_argument("--k", type=positive_int, default=9, help="top activations per feature map (default: %(default)s)")
    p.add_argument("--per-image", type=positive_int, default=1, help="locations one image may give a unit's top k "
                   "(default: %(default)s: k distinct images)")
    p.add_argument("--out", type=out_dir, default="atlas", help="result folder (default: %(default)s)")
    p.add_argument("--batch-size", type=positive_int, default=32, help="images per mining pass (default: %(default)s)")
    p.add_argument("--workers", type=nonnegative_int, default=0, help="image decoding processes (default: %(default)s)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument("--mode", default="deconv", choices=["deconv", "guided", "saliency"],
                   help="projection rule (default: the paper's deconvnet)")
    p.add_argument("--tile", type=int_range(8, 1024), default=112, help="largest side of a tile in pixels, 8..1024; "
                   "smaller receptive fields are enlarged up to it (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print only the result summary as JSON on stdout")


@command("atlas", "Fig. 2: top-9 activations of every feature map over a dataset, projected, as an HTML site")(
    _atlas_args)
def _atlas(args):
    from ..core.distributed import init_distributed
    from ..data.samples import demo_dir
    from ..understanding.atlas import atlas

    if args.device:
        resolve_device(args.device)  # one line if this machine lacks it
    d, device = init_distributed(args.device)  # under torchrun: one GPU per process
    args.device = str(device)
    model = load_from_args(args)
    data = args.data or str(demo_dir())
    res = atlas(model, data, args.out, args.layers, k=args.k, batch_size=args.batch_size, resume=args.resume,
                progress=not args.json, workers=args.workers, tile=args.tile, mode=args.mode,
                model_name=args.model, weights=args.weights, per_image=args.per_image)
    if d.main:
        summary = {"out": str(res.out), "index": str(res.out / "index.html"), "images": res.mined.images,
                   "layers": list(res.mined.layers), "units": sum(len(v) for v in res.meta["layers"].values()),
                   "dead": {n: len(v) for n, v in res.dead.items()}, "skipped": len(res.mined.skipped),
                   "timing": res.meta.get("timing")}
        if args.json:
            emit_json(summary)
        else:
            print(res.summary())
        return report_skipped(res.mined.skipped, res.mined.images)
    return 0 if res.mined.images else 1


def _occlude_args(p):
    add_model_args(p)
    p.add_argument("images", nargs="+", metavar="IMAGE", help="one or more image files")
    add_list_arg(p, "--label", nonnegative_int, default=None,
                 help="correct class index, one for all images or one per image (default: each clean top-1)")
    p.add_argument("--size", type=_size_pair, default="48",
                   help="occluder side in input pixels, or HxW (default: %(default)s)")
    p.add_argument("--stride", type=_size_pair, default="16",
                   help="occluder step in input pixels, or YxX; at most the size (default: %(default)s)")
    p.add_argument("--baseline", type=_baseline, default="0", help="what occluded pixels become: a number "
                   "after normalization (0 = the preprocessing mean), 'mean' (the image's per-channel mean), "
                   "'blur' or 'blur:SIGMA' (a blurred copy of the image) (default: %(default)s)")
    p.add_argument("--fill", type=finite_float, default=None, help="the same as --baseline NUMBER")
    p.add_argument("--target", default="prob", help="what panel (d) scores: prob, logit, logprob (of the label) "
                   "or a unit LAYER:CHANNEL[@Y,X] (default: %(default)s)")
    p.add_argument("--layer", default=None, help="layer whose strongest map is tracked (default: top conv layer)")
    p.add_argument("--method", default="auto", choices=["auto", "incremental", "naive"],
                   help="auto: the faster of exact incremental inference and full forward passes, measured")
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--out", type=out_dir, required=True,
                   help="result folder (one subfolder per image when there are several)")
    p.add_argument("--json", action="store_true", help="print result.json on stdout")


def _baseline(text) -> str:
    """--baseline: a finite number, "mean", "blur" or "blur:SIGMA" with a finite SIGMA > 0 (as given)."""
    spec = str(text).strip()
    number = spec[5:] if spec.startswith("blur:") else spec
    if spec in ("mean", "blur"):
        return spec
    try:
        value = finite_float(number)
    except argparse.ArgumentTypeError:
        value = None
    if value is None or (spec.startswith("blur:") and value <= 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number, mean, blur or blur:SIGMA (SIGMA > 0)")
    return spec


def _size_pair(text) -> tuple[int, int]:
    """--size / --stride: "48" or "48x32" -> (48, 48) / (48, 32), whole numbers >= 1."""
    parts = str(text).strip().lower().split("x")
    try:
        vals = [int(v) for v in parts]
    except ValueError:
        vals = []
    if len(vals) not in (1, 2) or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: use N or HxW, whole numbers >= 1 (e.g. 48 or 48x32)")
    return (vals[0], vals[-1])


@command("occlude", "Fig. 7: occlusion sensitivity maps (exact; incremental where faster)")(_occlude_args)
def _occlude(args):
    from ..core.results import save_npz, write_json
    from ..inspect.layers import file_safe
    from ..understanding.occlusion import occlusion, render_occlusion

    model = load_from_args(args)
    labels = args.label or [None]
    if len(labels) not in (1, len(args.images)):
        raise ZfnetError(f"--label: {len(labels)} labels for {len(args.images)} images (give one, or one per image)")
    size, stride = args.size, args.stride
    out, several = Path(args.out), len(args.images) > 1
    baseline = args.baseline if args.fill is None else args.fill
    done, skipped, folders = [], [], set()
    for i, image in enumerate(args.images):
        try:
            r = occlusion(model, image, label=labels[i if len(labels) > 1 else 0], target=args.target, size=size,
                          stride=stride, baseline=baseline, layer=args.layer, method=args.method,
                          batch_size=args.batch_size, progress=not args.json)
        except ZfnetError as e:
            if not several:
                raise
            skipped.append((image, str(e)))
            continue
        folder = out
        if several:
            stem = file_safe(Path(image).stem)
            name = next(f"{stem}_{k}" if k else stem for k in range(len(args.images) + 1)
                        if (f"{stem}_{k}" if k else stem) not in folders)
            folders.add(name)
            folder = out / name
        arrays = dict(score=r.score, prob=r.prob, argmax_label=r.argmax_label, activity=r.activity,
                      pixel_attribution=r.pixel_attribution(), projection=r.projection)
        arrays = {k: v for k, v in arrays.items() if v is not None}
        save_npz(folder / "maps.npz", **arrays)
        render_occlusion(r, folder / "occlusion.png")
        result = r.to_json()
        if not several and write_result(args, out, result, image=image):
            print(f"{r.file}: {r.target} of {r.label_name}: {r.clean_score:.4g} unoccluded, {r.score.min():.4g} .. "
                  f"{r.score.max():.4g} occluded; tracked {r.feature_map}; wrote {out}/result.json, occlusion.png, "
                  f"maps.npz")
        elif several:
            result["config"].update(model=args.model, weights=args.weights, image=image)
            write_json(folder / "result.json", result)
            done.append({"file": image, "folder": folder.name, "label": r.label, "target": r.target,
                         "clean_score": r.clean_score, "min_score": float(r.score.min()), "method": r.method})
    if several:
        index = {"schema": 2, "images": done, "skipped": [{"file": f, "error": e} for f, e in skipped],
                 "config": {}}
        if write_result(args, out, index, images=args.images):
            print(f"occlusion maps of {len(done)} images in {out}/<image>/ (result.json, occlusion.png, maps.npz)")
        if not done:
            raise NoInputError("no image could be read", skipped)
        report_skipped(skipped)
    return 0


def _invariance_args(p):
    add_model_args(p)
    p.add_argument("images", nargs="+", metavar="IMAGE")
    add_list_arg(p, "--label", nonnegative_int, default=None,
                 help="true class of each image, in order (default: each image's unmodified top-1)")
    add_layers_arg(p, "layers whose features are compared (default: layer 1 and the penultimate layer)")
    p.add_argument("--translate", type=sweep, default="-60:60:10", metavar="START:STOP:STEP|V1,V2,...",
                   help="vertical shifts in pixels (default: %(default)s)")
    p.add_argument("--scale", type=positive_sweep, default="1.0:1.8:0.1", metavar="START:STOP:STEP|V1,V2,...",
                   help="zoom factors, > 0 (default: %(default)s)")
    p.add_argument("--rotate", type=sweep, default="0:360:15", metavar="START:STOP:STEP|V1,V2,...",
                   help="angles in degrees (default: %(default)s)")
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--out", type=out_dir, required=True, help="result folder")
    p.add_argument("--json", action="store_true", help="print result.json on stdout")


@command("invariance", "Fig. 5: feature distance and p(true label) under translation, scale, rotation")(
    _invariance_args)
def _invariance(args):
    from ..understanding.invariance import invariance, render_invariance

    model = load_from_args(args)
    sweeps = {k: getattr(args, k) for k in ("translate", "scale", "rotate")}
    r = invariance(model, args.images, labels=args.label, layers=args.layers, sweeps=sweeps,
                   batch_size=args.batch_size, progress=not args.json)
    if not r.files:  # nothing to show: leave whatever an earlier run wrote in --out as it is
        return report_skipped(r.skipped, 0)
    out = Path(args.out)
    result = r.to_json()
    render_invariance(r, out / "invariance.png")
    render_invariance(r, out / "invariance_raw.png", normalized=False)
    if write_result(args, out, result, images=args.images):
        for k in r.sweeps:
            for name in r.layers:
                d = r.normalized[k][name]
                print(f"{k:9s} {name:14s} normalized distance at the sweep's end: "
                      + ", ".join(f"{v:.2f}" for v in d[:, -1]))
        print(f"wrote {out}/result.json, invariance.png, invariance_raw.png")
    return report_skipped(r.skipped, len(r.files))


def _correspond_args(p):
    add_model_args(p)
    p.add_argument("--parts", required=True, help="parts file (format of ../shared/data/dogs/parts.json)")
    p.add_argument("--images-root", default=None,
                   help="folder of the images (default: beside the parts file, else ../imagenet-samples "
                        "next to its folder)")
    add_layers_arg(p, "layers whose sign changes are measured (default: the top conv layer and the penultimate "
                   "layer)")
    add_list_arg(p, "--part", default=None, help="parts to mask, `a,b` or `a b` (default: all marked in every image)")
    p.add_argument("--size", type=positive_int, default=30,
                   help="masking square side in input pixels (default: %(default)s)")
    p.add_argument("--draws", type=int_range(1, 1000), default=10,
                   help="random-position draws per image, 1..1000 (default: %(default)s)")
    p.add_argument("--seed", type=int_range(), default=0)
    p.add_argument("--out", type=out_dir, required=True, help="result folder")
    p.add_argument("--json", action="store_true", help="print result.json on stdout")


@command("correspond", "Table 1: mean feature sign change when the same part is masked in every image")(
    _correspond_args)
def _correspond(args):
    from ..core.results import atomic_path
    from ..data.images import Preprocess
    from ..understanding.correspondence import correspondence, render_correspondence

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
    return report_skipped(r.skipped, len(r.files))
