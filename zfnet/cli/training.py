"""`zfnet train | predict | diagnose | evolution | ablate`: the recipe of Sec. 3, the top-1 / top-5 of a
model, and what training lets you see (Fig. 4, Fig. 6, Table 3)."""

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
    load_from_args,
    nonnegative_float,
    nonnegative_int,
    out_dir,
    positive_float,
    positive_int,
    report_skipped,
    resolve_device,
)


def _train_args(p):
    add_config_args(p)


@command("train", "train ZFNet / AlexNet / a Table 3 variant with the paper's recipe (torchrun-ready)")(_train_args)
def _train(args):
    from ..training.recipe import main

    if args.device:
        resolve_device(args.device)  # one line if this machine lacks it
    result = main(config_from_args(args))
    return 0 if result["epochs"] else 1


def _predict_args(p):
    add_model_args(p)
    p.add_argument("inputs", nargs="*", metavar="IMAGE_OR_DIR",
                   help="images or folders (default: the sample photos shipped with zfnet)")
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--ten-crop", action="store_true", help="average the softmax over 10 crops (paper Sec. 3)")
    p.add_argument("--json", action="store_true", help="print only JSON on stdout")


@command("predict", "top-5 labels for images")(_predict_args)
def _predict(args):
    from ..data.samples import sample_dir
    from ..models.predict import predict

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
    return report_skipped(result.skipped, len(result.predictions))


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
    add_layers_arg(p, "layers (default: all rectified conv layers)")
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

    if args.device:
        resolve_device(args.device)
    result = ablate(config_from_args(args), args.variants)
    print(format_table(result["variants"]))
    return 0


# ----------------------------------------------------------------------------------------------------
# Command-line options, generated from TrainConfig so the two never disagree; each field's values are
# checked by its type from zfnet.cli.common (a field not listed takes its annotation's plain type).
_CROPS = choice("ten", "center")
_CONFIG_TYPES = {
    "epochs": positive_int, "batch_size": positive_int, "resize": positive_int, "crop": positive_int,
    "train_per_class": positive_int, "fc": positive_int, "workers": nonnegative_int, "threads": positive_int,
    "lr": positive_float, "momentum": fraction, "weight_decay": nonnegative_float,
    "lr_factor": float_range(0.0, 1.0, lo_open=True), "lr_patience": nonnegative_int,
    "clip_radius": nonnegative_float, "dropout": fraction, "init_std": nonnegative_float,
    "budget_minutes": nonnegative_float, "seed": int_range(), "split_seed": int_range(),
    "device": device_name, "val_crops": _CROPS, "epoch_val_crops": _CROPS, "out": out_dir,
}


def add_config_args(p, skip: tuple = ()) -> None:
    from ..training.recipe import TrainConfig

    for f in dataclasses.fields(TrainConfig):
        if f.name in skip:
            continue
        opt = "--" + f.name.replace("_", "-")
        default = f.default
        if f.type in ("bool", bool):
            p.add_argument(opt, type=_bool, default=default, metavar="yes|no", help=f"(default: {default})")
        elif f.name == "widths":
            p.add_argument(opt, type=_widths, default=None, metavar="C1,C2,C3,C4,C5",
                           help="conv1..conv5 widths (default: 96,256,384,384,256)")
        else:
            kind = _CONFIG_TYPES.get(f.name) or {"int": int, "float": float, "int | None": int,
                                                  "float | None": float}.get(str(f.type), str)
            p.add_argument(opt, type=kind, default=default, help=f"(default: {default})")


def config_from_args(args):
    from ..training.recipe import TrainConfig

    return TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
                          if hasattr(args, f.name)})


def _bool(s: str) -> bool:
    if s.lower() in ("1", "yes", "true", "on"):
        return True
    if s.lower() in ("0", "no", "false", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected yes or no, got {s!r}")


def _widths(s: str) -> tuple:
    widths = tuple(positive_int(v) for v in str(s).split(","))
    if len(widths) != 5:
        raise argparse.ArgumentTypeError(f"expected 5 widths (conv1..conv5), got {len(widths)}")
    return widths
