"""`zfnet <command>`: a thin shell over the library; each command calls one library function.

Problems a user can fix (ZfnetError) print one line `zfnet: error: ...` and exit 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path

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


def device_from_args(args) -> str:
    """--device, else cuda when there is one."""
    import torch

    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")


def load_from_args(args):
    from .weights import load_model

    weights = None if args.weights in (None, "none") else args.weights
    return load_model(args.model, weights, num_classes=args.num_classes, device=device_from_args(args))


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


def csv_list(text, cast=str) -> list:
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
    from .atlas import atlas
    from .distributed import init_distributed
    from .samples import sample_dir

    d, device = init_distributed(args.device)  # under torchrun: one GPU per process
    args.device = str(device)
    model = load_from_args(args)
    layers = csv_list(args.layers) if args.layers else None
    data = args.data or str(sample_dir())
    res = atlas(model, data, args.out, layers, k=args.k, batch_size=args.batch_size, resume=args.resume,
                progress=not args.json, workers=args.workers, tile=args.tile, mode=args.mode,
                model_name=args.model, weights=args.weights)
    if d.main:
        summary = {"out": str(res.out), "index": str(res.out / "index.html"), "images": res.mined.images,
                   "layers": list(res.mined.layers), "skipped": len(res.mined.skipped),
                   "timing": res.meta.get("timing")}
        if args.json:
            emit_json(summary)
        else:
            print(f"atlas of {res.mined.images} images, {len(res.mined.layers)} layers: {res.out / 'index.html'}")
        report_skipped(res.mined.skipped)
    return 0 if res.mined.images else 1


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
# The experiment commands live beside this module, grouped by the paper's sections; importing them
# (after the helpers above exist) registers them, in the paper's order.
for _section in ("cli_training", "cli_understanding", "cli_generalization"):
    importlib.import_module(f".{_section}", __package__)


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
