"""`zfnet train | predict | diagnose | evolution | ablate`: the recipe of Sec. 3, the top-1 / top-5 of a
model, and what training lets you see (Fig. 4, Fig. 6, Table 3)."""

from __future__ import annotations

import dataclasses

from ..core.errors import ZfnetError
from .common import add_model_args, command, csv_list, device_from_args, emit_json, load_from_args, report_skipped


def _train_args(p):
    add_config_args(p)


@command("train", "train ZFNet / AlexNet / a Table 3 variant with the paper's recipe (torchrun-ready)")(_train_args)
def _train(args):
    from ..training.recipe import main

    result = main(config_from_args(args))
    return 0 if result["epochs"] else 1


def _predict_args(p):
    add_model_args(p)
    p.add_argument("inputs", nargs="*", metavar="IMAGE_OR_DIR",
                   help="images or folders (default: the sample photos shipped with zfnet)")
    p.add_argument("--batch-size", type=int, default=32)
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
    report_skipped(result.skipped)
    return 0 if result.predictions or not result.skipped else 1


def _trained_model(args):
    """--model auto: rebuild a `zfnet train` checkpoint (any reduced width / input size) from its record."""
    if args.model != "auto":
        return load_from_args(args)
    from ..training.checkpoints import model_from_checkpoint

    if args.weights in (None, "none", "default"):
        raise ZfnetError("--model auto needs --weights CHECKPOINT (a zfnet train checkpoint.pth / epoch_NNN.pth)")
    return model_from_checkpoint(args.weights, device_from_args(args))


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
    from ..training.diagnosis import diagnose

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
    from ..training.evolution import evolution

    ints = csv_list(args.epochs, int) if args.epochs else None
    layers = csv_list(args.layers) if args.layers else None
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
    p.add_argument("--variants", default=None, help="comma-separated Table 3 variants (default: all)")
    add_config_args(p, skip=("model",))


@command("ablate", "Table 3: ZFNet variants (layers removed / resized) trained with the same recipe")(_ablate_args)
def _ablate(args):
    from ..training.ablation import ablate, format_table

    variants = csv_list(args.variants) if args.variants else None
    result = ablate(config_from_args(args), variants)
    print(format_table(result["variants"]))
    return 0


# ----------------------------------------------------------------------------------------------------
# Command-line options, generated from TrainConfig so the two never disagree.
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
            p.add_argument(opt, type=_ints, default=None, metavar="C1,C2,C3,C4,C5",
                           help="conv1..conv5 widths (default: 96,256,384,384,256)")
        else:
            kind = {"int": int, "float": float, "int | None": int, "float | None": float}.get(str(f.type), str)
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
    raise ValueError(s)


def _ints(s: str) -> tuple:
    return tuple(int(v) for v in s.split(","))
