"""`zfnet train | predict | evaluate | diagnose | evolution | ablate`: the recipes of Sec. 3 (and AlexNet's),
the top-1 / top-5 of a model or an ensemble (Table 2), and what training lets you see (Fig. 4, Fig. 6,
Table 3)."""

from __future__ import annotations

import argparse
import dataclasses

from .common import (
    add_layers_arg,
    add_list_arg,
    add_model_args,
    choice,
    command,
    device_name,
    emit_json,
    float_range,
    fraction,
    int_range,
    list_of,
    load_from_args,
    nonnegative_float,
    nonnegative_int,
    out_dir,
    positive_float,
    positive_int,
    report_skipped,
    resolve_device,
)
from .cs231n import add_by_option, predict_breakdown


def _train_args(p):
    add_config_args(p)


@command("train", "train ZFNet / AlexNet / a Table 3 variant with the paper's recipe (torchrun-ready)")(_train_args)
def _train(args):
    from ..training.recipe import main

    if getattr(args, "device", None):  # (absent unless given: the recipe holds the defaults)
        resolve_device(args.device)  # one line if this machine lacks it
    result = main(config_from_args(args))
    return 0 if result["epochs"] else 1


def _predict_args(p):
    add_model_args(p, several=True)
    p.add_argument("inputs", nargs="*", metavar="IMAGE_OR_DIR",
                   help="images or folders (default: the sample photos shipped with zfnet)")
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--ten-crop", action="store_true", help="average the softmax over 10 crops (paper Sec. 3)")
    p.add_argument("--json", action="store_true", help="print only JSON on stdout")
    add_by_option(p)


@command("predict", "top-5 labels for images, from one model or the average of several (--weights a --weights b)")(
    _predict_args)
def _predict(args):
    from ..data.samples import sample_dir
    from ..models.predict import predict

    models, pres, _ = _ensemble(args)
    inputs = args.inputs or [str(sample_dir())]
    result = predict(models, inputs, batch_size=args.batch_size, crop="ten" if args.ten_crop else "center",
                     progress=not args.json, preprocess=pres)
    if args.by:
        return predict_breakdown(args, models[0], result, inputs)  # (the class names: every member's are the same)
    if args.json:
        emit_json(result.to_json())
    else:
        for p in result.predictions:
            print(p.file)
            for t in p.top5:
                print(f"  {t['prob']:6.1%}  {t['label']} ({t['index']})")
    return report_skipped(result.skipped, len(result.predictions))


def _evaluate_args(p):
    add_model_args(p, default_model="auto", several=True)
    p.add_argument("--data", required=True, help="validation folder, one subfolder per class")
    p.add_argument("--train-per-class", type=positive_int, default=None,
                   help="evaluate on the images a `zfnet train --train-per-class N` run held out of --data")
    p.add_argument("--split-seed", type=int_range(), default=0, help="that run's --split-seed (default: %(default)s)")
    p.add_argument("--out", type=out_dir, required=True, help="result folder (table.md, result.json)")
    p.add_argument("--batch-size", type=positive_int, default=16, help="images per batch (each in 11 crops)")
    p.add_argument("--workers", type=nonnegative_int, default=0, help="DataLoader worker processes")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    p.add_argument("--progress", type=_bool, default=True, metavar="yes|no")
    p.add_argument("--json", action="store_true", help="print only JSON on stdout")


@command("evaluate", "Table 2: top-1 / top-5 val error of each model and their average, 1 crop and 10 crops")(
    _evaluate_args)
def _evaluate(args):
    import torch

    from ..training.evaluation import evaluate_models, format_table

    if args.threads:
        torch.set_num_threads(args.threads)
    models, pres, names = _ensemble(args)
    result = evaluate_models(models, args.data, names=names, preprocess=pres, batch_size=args.batch_size,
                             workers=args.workers, progress=args.progress and not args.json, out=args.out,
                             train_per_class=args.train_per_class, split_seed=args.split_seed,
                             config={"model": args.model, "weights": names})
    if args.json:
        emit_json(result)
    else:
        print(format_table(result["rows"]))
        print(f"{result['images']} images, {result['classes']} classes; wrote {args.out}/table.md, "
              f"{args.out}/result.json")
    return report_skipped(result["skipped"], result["images"])


def _ensemble(args):
    """The models of --weights (given once or more), each with its preprocessing, and their names."""
    from ..training.checkpoints import preprocess_for

    weights = args.weights or ["default"]
    models = [load_from_args(argparse.Namespace(**dict(vars(args), weights=w))) for w in weights]  # auto too
    return models, [preprocess_for(m) for m in models], list(weights)


def _diagnose_args(p):
    add_model_args(p, default_model="auto")
    p.add_argument("--data", default=None, help="image folder for never-active filters and layer-2 features")
    p.add_argument("--out", type=out_dir, required=True, help="result folder (result.json, arrays.npz, PNGs)")
    p.add_argument("--max-images", type=positive_int, default=None, help="use at most this many images of --data")
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--json", action="store_true", help="print only JSON on stdout")


@command("diagnose", "Fig. 6: layer-1 filters, dead filters, frequency coverage, layer-2 aliasing, "
         "filter-scale domination")(_diagnose_args)
def _diagnose(args):
    from ..training.diagnosis import diagnose

    model = load_from_args(args)
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
    p.add_argument("--out", type=out_dir, required=True, help="result folder (result.json, evolution_<layer>.png)")
    add_list_arg(p, "--epochs", nonnegative_int, default=None, help="epochs, `1,5,10` or `1 5 10` (default: 8 "
                 "spread over the run)")
    add_layers_arg(p, "layers (default: the default feature layers, marked * by `zfnet layers`)")
    p.add_argument("--units", type=positive_int, default=6,
                   help="units per layer, evenly spaced (default: %(default)s)")
    p.add_argument("--max-images", type=positive_int, default=None, help="use at most this many images of --data")
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--device", type=device_name, default="cpu")
    p.add_argument("--json", action="store_true", help="print only JSON on stdout")


@command("evolution", "Fig. 4: each unit's strongest projection at chosen training epochs")(_evolution_args)
def _evolution(args):
    from ..training.evolution import evolution

    ev = evolution(args.run_dir, args.data, args.out, epochs=args.epochs, layers=args.layers, units=args.units,
                   max_images=args.max_images, batch_size=args.batch_size, device=resolve_device(args.device),
                   progress=not args.json)
    if args.json:
        emit_json(ev.to_json())
    else:
        print(f"epochs {ev.epochs}; wrote " + ", ".join(f"{args.out}/{f}" for f in ev.figures.values()))
    report_skipped(ev.skipped)
    return 0


def _ablate_args(p):
    add_list_arg(p, "--variants", default=None, help="Table 3 variants, `a,b` or `a b` (default: all)")
    add_config_args(p, skip=("model",))


@command("ablate", "Table 3: ZFNet variants (layers removed / resized) trained with the same recipe")(_ablate_args)
def _ablate(args):
    from ..training.ablation import ablate, format_table

    if getattr(args, "device", None):
        resolve_device(args.device)
    result = ablate(config_from_args(args), args.variants)
    print(format_table(result["variants"]))
    return 0


# ----------------------------------------------------------------------------------------------------
# Command-line options, generated from TrainConfig so the two never disagree; each field's values are
# checked by its type from zfnet.cli.common (a field not listed takes its annotation's plain type). An option
# not given takes its value from --recipe (default zfnet), so `--recipe alexnet --lighting 0` is AlexNet's
# recipe without PCA lighting.
_CROPS = choice("ten", "center")
_CONFIG_TYPES = {
    "epochs": positive_int, "batch_size": positive_int, "resize": positive_int, "crop": positive_int,
    "train_per_class": positive_int, "fc": positive_int, "workers": nonnegative_int, "threads": positive_int,
    "lr": positive_float, "momentum": fraction, "weight_decay": nonnegative_float,
    "lr_factor": float_range(0.0, 1.0, lo_open=True), "lr_patience": nonnegative_int, "lr_drops": nonnegative_int,
    "clip_radius": nonnegative_float, "dropout": fraction, "init_std": nonnegative_float,
    "lighting": nonnegative_float, "budget_minutes": nonnegative_float, "seed": int_range(),
    "split_seed": int_range(), "device": device_name, "val_crops": _CROPS, "epoch_val_crops": _CROPS,
    "out": out_dir,
}


def add_config_args(p, skip: tuple = ()) -> None:
    from ..training.settings import RECIPES, TrainConfig

    p.add_argument("--recipe", choices=sorted(RECIPES), default="zfnet",
                   help="the paper whose settings the other options default to: zfnet (Zeiler & Fergus 2013 "
                        "Sec. 3) or alexnet (Krizhevsky et al. 2012 Secs. 3-5) (default: %(default)s)")
    for f in dataclasses.fields(TrainConfig):
        if f.name in skip:
            continue
        opt = "--" + f.name.replace("_", "-")
        values = {r: RECIPES[r].get(f.name, f.default) for r in RECIPES}
        shown = "; ".join(f"{r}: {_shown(v)}" for r, v in values.items()) if len(set(map(str, values.values()))) > 1 \
            else _shown(f.default)
        kw = dict(default=argparse.SUPPRESS, help=f"(default: {shown})")
        if f.type in ("bool", bool):
            p.add_argument(opt, type=_bool, metavar="yes|no", **kw)
        elif f.name == "widths":
            p.add_argument(opt, type=_widths, metavar="C1,C2,C3,C4,C5",
                           help="conv1..conv5 widths (default: 96,256,384,384,256)", default=argparse.SUPPRESS)
        elif f.name == "bias_one":
            p.add_argument(opt, type=_names, metavar="LAYER,...", **kw)
        else:
            kind = _CONFIG_TYPES.get(f.name) or {"int": int, "float": float, "int | None": int,
                                                  "float | None": float}.get(str(f.type), str)
            p.add_argument(opt, type=_or_none(kind) if "None" in str(f.type) else kind, **kw)


def config_from_args(args):
    from ..training.settings import TrainConfig

    return TrainConfig.recipe(getattr(args, "recipe", "zfnet"),
                              **{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
                                 if hasattr(args, f.name)})


def _shown(v) -> str:
    if isinstance(v, tuple):
        return ",".join(map(str, v)) if v else "none"
    return str(v)


def _bool(s: str) -> bool:
    if s.lower() in ("1", "yes", "true", "on"):
        return True
    if s.lower() in ("0", "no", "false", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected yes or no, got {s!r}")


def _or_none(kind):
    """A type that also takes "none" (the field's None: e.g. --lr-drops none = no limit)."""
    def parse(s: str):
        return None if s.lower() == "none" else kind(s)
    parse.__name__ = getattr(kind, "__name__", "value")
    return parse


def _widths(s: str) -> tuple:
    widths = tuple(positive_int(v) for v in str(s).split(","))
    if len(widths) != 5:
        raise argparse.ArgumentTypeError(f"expected 5 widths (conv1..conv5), got {len(widths)}")
    return widths


def _names(s: str) -> tuple:
    return () if s.strip().lower() in ("", "none") else tuple(list_of()(s))
