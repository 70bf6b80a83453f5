"""`zfnet activations | filters | tsne | invert | fool`: the rest of the CS231n notes "Visualizing what ConvNets
learn" (layer activations, filters, t-SNE of the codes, reconstruction from codes, fooling), and the
`--by` breakdown of `zfnet predict` (performance as a function of image attributes)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..core.errors import ZfnetError
from .common import (
    add_layers_arg,
    add_list_arg,
    add_model_args,
    command,
    emit_json,
    float_range,
    int_range,
    load_from_args,
    nonnegative_float,
    nonnegative_int,
    out_dir,
    positive_float,
    positive_int,
    report_skipped,
)


def _config(args, **extra) -> dict:
    return {"model": args.model, "weights": args.weights, **extra}


def _finish(args, result: dict, text: str) -> int:
    if args.json:
        emit_json(result)
    else:
        print(text)
    return 0


def _fraction(text: str) -> float:
    """"8/255" or "0.031" -> a float in (0, 1] (a budget or step on the [0, 1] image)."""
    try:
        if "/" in text:
            a, b = text.split("/")
            v = float(a) / float(b)
        else:
            v = float(text)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"expected a number or a fraction such as 8/255, got {text!r}") from None
    if not 0 < v <= 1:  # (NaN fails this too)
        raise argparse.ArgumentTypeError(f"must be in (0, 1] on the [0, 1] image, got {text!r}")
    return v


# ----------------------------------------------------------------------------------------------------
def _activations_args(p):
    add_model_args(p)
    p.add_argument("path", metavar="IMAGE_OR_DIR", help="an image (maps of every channel) or a folder (fraction "
                   "of zeros per channel over its images, and the maps of its first image)")
    add_layers_arg(p, "layers (default: the feature layers)")
    p.add_argument("--sparse", type=float_range(0.0, 1.0, lo_open=True), default=0.99,
                   help="zero fraction from which a channel is flagged sparse (default: %(default)s)")
    p.add_argument("--max-images", type=positive_int, default=None, help="use at most this many images of a folder")
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--out", type=out_dir, required=True,
                   help="result folder (result.json, maps.npz, <layer>.png, sparsity.png)")
    p.add_argument("--json", action="store_true", help="print only result.json on stdout")


@command("activations", "CS231n: every channel's activation map per layer; dead and sparse channels over a folder")(
    _activations_args)
def _activations(args):
    from ..cs231n.activations import activations

    model = load_from_args(args)
    r = activations(model, args.path, args.out, args.layers, sparse=args.sparse,
                    max_images=args.max_images, batch_size=args.batch_size, progress=not args.json,
                    config=_config(args, path=args.path))
    lines = []
    for name, d in r["layers"].items():
        s = r.get("sparsity", {}).get("layers", {}).get(name)
        extra = f"; over {r['sparsity']['images']} images {len(s['dead'])} dead, {len(s['sparse'])} sparse" if s else ""
        lines.append(f"{name}: {d['channels']} maps of {d['height']}x{d['width']}{extra} -> "
                     f"{Path(args.out) / d['figure']}")
    if "sparsity" in r:
        report_skipped(r["sparsity"]["skipped"])
    return _finish(args, r, "\n".join(lines))


def _filters_args(p):
    add_model_args(p)
    add_layers_arg(p, "Conv2d layers (default: the first conv layer)")
    p.add_argument("--max-channels", type=positive_int, default=None, help="draw at most this many output channels")
    p.add_argument("--out", type=out_dir, required=True,
                   help="result folder (<layer>.png, <layer>/<channel>.png, result.json)")
    p.add_argument("--json", action="store_true", help="print only result.json on stdout")


@command("filters", "CS231n / Fig. 6: the filters of any conv layer (RGB first layer, grey grids deeper)")(
    _filters_args)
def _filters(args):
    from ..cs231n.filters import filter_pictures

    model = load_from_args(args)
    r = filter_pictures(model, args.out, args.layers,
                        max_channels=args.max_channels, config=_config(args))
    lines = [f"{n}: {d['out_channels']} x {d['in_channels']} x {d['kernel'][0]}x{d['kernel'][1]} ({d['style']}) -> "
             f"{Path(args.out) / d['figure']}" for n, d in r["layers"].items()]
    return _finish(args, r, "\n".join(lines))


def _tsne_args(p):
    add_model_args(p)
    p.add_argument("--data", default=None, help="image folder; class subfolders colour the scatter (default: the "
                   "sample photos shipped with zfnet)")
    p.add_argument("--layer", default=None, help="layer whose codes are embedded (default: the one feeding the "
                   "classifier)")
    p.add_argument("--pool", default="avg", choices=("avg", "max", "flatten"), help="spatial pooling of the codes")
    p.add_argument("--perplexity", type=positive_float, default=None, help="t-SNE perplexity (default: min(30, N/3))")
    p.add_argument("--seed", type=int_range(), default=0)
    p.add_argument("--max-images", type=positive_int, default=None,
                   help="embed at most this many images, evenly spaced")
    p.add_argument("--tile", type=int_range(8, 1024), default=48,
                   help="side of each image in the grid picture (default: 48)")
    p.add_argument("--cache", default=None,
                   help="feature cache folder (default: ~/.cache/zfnet/features; 'none' = no cache)")
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--workers", type=nonnegative_int, default=0, help="image decoding processes")
    p.add_argument("--out", type=out_dir, required=True,
                   help="result folder (result.json with the coordinates, tsne_*.png)")
    p.add_argument("--json", action="store_true", help="print only result.json on stdout")


@command("tsne", "CS231n: t-SNE of a layer's codes, images snapped to a grid (Karpathy) and a class scatter")(
    _tsne_args)
def _tsne(args):
    from ..cs231n.codes import tsne
    from ..data.samples import sample_dir
    from ..engine.features import default_cache_dir

    model = load_from_args(args)
    data = args.data or str(sample_dir())
    cache = None if args.cache == "none" else (args.cache or default_cache_dir())
    r = tsne(model, data, args.out, layer=args.layer, pool=args.pool, perplexity=args.perplexity, seed=args.seed,
             max_images=args.max_images, cache_dir=cache, batch_size=args.batch_size, workers=args.workers,
             tile=args.tile, progress=not args.json, config=_config(args))
    meta = r.to_json()
    meta["figures"] = {"grid": "tsne_grid.png", "positions": "tsne_positions.png", "scatter": "tsne_scatter.png"}
    e = r.info
    text = (f"t-SNE of {r.layer} ({r.pool}) for {len(r.files)} images: trustworthiness {e['trustworthiness']:.3f}"
            + (f", same-class 5-NN {e['same_class_neighbours']['embedding']:.0f} % (codes "
               f"{e['same_class_neighbours']['codes']:.0f} %)" if "same_class_neighbours" in e else "")
            + f"; wrote {args.out}/result.json, tsne_grid.png, tsne_positions.png, tsne_scatter.png")
    report_skipped(r.skipped)
    return _finish(args, meta, text)


def _invert_args(p):
    add_model_args(p)
    p.add_argument("image", metavar="IMAGE")
    add_layers_arg(p, "layers (default: shallow, middle, deep)")
    p.add_argument("--steps", type=positive_int, default=200,
                   help="optimisation steps per layer (default: %(default)s)")
    p.add_argument("--lr", type=positive_float, default=0.05, help="Adam learning rate on the [0, 1] image")
    p.add_argument("--lambda-tv", type=nonnegative_float, default=None,
                   help="total-variation weight (normalised; default: per layer, from 0.005 at the first feature "
                        "layer to 0.5 at the last)")
    p.add_argument("--lambda-alpha", type=nonnegative_float, default=1e-5,
                   help="alpha-norm weight (normalised; default 1e-5)")
    p.add_argument("--alpha", type=positive_float, default=6.0, help="alpha of the alpha-norm (default: %(default)s)")
    p.add_argument("--beta", type=positive_float, default=2.0,
                   help="exponent of the TV regulariser (default: %(default)s)")
    p.add_argument("--seed", type=int_range(), default=0)
    p.add_argument("--out", type=out_dir, required=True,
                   help="result folder (result.json, inversion.png, reconstructions.npz)")
    p.add_argument("--json", action="store_true", help="print only result.json on stdout")


@command("invert", "Mahendran & Vedaldi: reconstruct an image from its code at several layers")(_invert_args)
def _invert(args):
    from ..core.results import read_json
    from ..cs231n.inversion import inversion

    model = load_from_args(args)
    r = inversion(model, args.image, args.out, args.layers, steps=args.steps,
                  lr=args.lr, lambda_tv=args.lambda_tv, lambda_alpha=args.lambda_alpha, alpha=args.alpha,
                  beta=args.beta, seed=args.seed, progress=not args.json, config=_config(args, image=args.image))
    text = "\n".join(f"{x.layer}: code error {x.code_error:.1%}, pixel RMS {x.pixel_rmse:.3f}"
                     for x in r.reconstructions)
    return _finish(args, read_json(Path(args.out) / "result.json"), text + f"\nwrote {args.out}/inversion.png")


def _fool_args(p):
    add_model_args(p)
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--method", default="pgd", choices=("pgd", "fgsm"))
    p.add_argument("--eps", type=_fraction, default=8 / 255,
                   help="L-inf budget on the [0, 1] image, e.g. 8/255 (default) or 0.03")
    p.add_argument("--steps", type=positive_int, default=10, help="PGD steps (default: %(default)s)")
    p.add_argument("--step", type=_fraction, default=None, help="PGD step size (default: 2.5 eps / steps)")
    p.add_argument("--target", default=None,
                   help="class to turn every image into (index or name), 'random' (a random other class per "
                        "image); default: untargeted")
    add_list_arg(p, "--label", default=None, help="true class of each image (default: its prediction)")
    add_list_arg(p, "--fooling-class", default=None,
                   help="also make Nguyen et al. fooling images of these classes from noise")
    p.add_argument("--fooling-steps", type=positive_int, default=200)
    p.add_argument("--confidence", type=float_range(0.0, 1.0, lo_open=True), default=0.99,
                   help="p(class) a fooling image must reach")
    p.add_argument("--seed", type=int_range(), default=0)
    p.add_argument("--out", type=out_dir, required=True, help="result folder (result.json, fooling.png, images.npz)")
    p.add_argument("--json", action="store_true", help="print only result.json on stdout")


@command("fool", "CS231n: adversarial examples (FGSM, PGD; targeted or not) and fooling images")(_fool_args)
def _fool(args):
    from ..cs231n.fooling import fooling

    model = load_from_args(args)
    r = fooling(model, args.images, args.out, method=args.method, eps=args.eps, steps=args.steps, step=args.step,
                targets=args.target, labels=args.label, fooling_classes=args.fooling_class,
                fooling_steps=args.fooling_steps, confidence=args.confidence, seed=args.seed,
                progress=not args.json, config=_config(args, images=args.images))
    s = r.summary()
    lines = [f"{Path(e['file']).name}: {e['clean']['label']} ({e['clean']['prob']:.2f}) -> {e['adversarial']['label']} "
             f"({e['adversarial']['prob']:.2f}){'' if e['success'] else '  [not fooled]'}" for e in r.examples]
    lines += [f"fooling image of {f['name']}: p = {f['prob']:.3f}" for f in r.fooling]
    lines.append(f"{s['success']}/{s['images']} fooled ({s['success_8bit']} after rounding to 8 bits), "
                 f"L-inf <= {s['max_linf'] * 255:.2f}/255; wrote {args.out}/fooling.png")
    report_skipped(r.skipped)
    return _finish(args, r.to_json(), "\n".join(lines))


# ----------------------------------------------------------------------------------------------------
# `zfnet predict --by`: the option and its breakdown (the predict command itself lives in cli.training).
def _by_spec(text: str) -> str:
    """--by: a built-in grouping or an existing CSV file (checked before any image is predicted)."""
    from ..cs231n.attributes import BUILTIN

    if text in BUILTIN or Path(text).is_file():
        return text
    raise argparse.ArgumentTypeError(f"attributes file not found: {text} (or use one of {', '.join(BUILTIN)})")


def add_by_option(p):
    p.add_argument("--by", action="append", default=None, type=_by_spec, metavar="class|size|FILE.csv",
                   help="break top-1 / top-5 down by the true class, the image size, or every column of a CSV "
                        "(columns 'file', optional 'label', any others); repeatable")


def predict_breakdown(args, model, result, inputs) -> int:
    """Print (or with --json, emit with the predictions) the accuracy of `result` per group of args.by."""
    from ..cs231n.attributes import BUILTIN, accuracy_by, read_attributes, true_labels
    from ..models.weights import model_meta

    cats = list(model_meta(model).categories or [])
    files = [p.file for p in result.predictions]
    root = inputs[0] if len(inputs) == 1 and Path(inputs[0]).is_dir() else None
    columns, given = {}, None
    for spec in args.by:
        if spec in BUILTIN:
            columns[spec] = None
            continue
        table = read_attributes(spec, files, root)
        if "label" in table:
            given = table.pop("label")
        if not table:
            raise ZfnetError(f"{spec}: no attribute columns beside 'file' and 'label'")
        columns.update(table)
    labels = true_labels(files, cats, given=given)
    b = accuracy_by(result, labels, columns, cats)
    if args.json:
        emit_json({"predictions": result.to_json(), "breakdown": b.to_json()})
    else:
        print(b.format())
    if b.unlabelled:
        print(f"zfnet: predict: {len(b.unlabelled)} image(s) have no true class and are not counted",
              file=sys.stderr)
    report_skipped(result.skipped)
    return 0
