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


def report_skipped(skipped):
    """At the end of a batch job: say which files were skipped and why (stderr, one line each)."""
    if skipped:
        print(f"zfnet: skipped {len(skipped)} unreadable file(s):", file=sys.stderr)
        for path, why in skipped:
            print(f"  {why}", file=sys.stderr)


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
