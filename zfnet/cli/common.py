"""What every command shares: the registry, the model arguments, JSON output and the skipped-files list.

Problems a user can fix (ZfnetError) print one line `zfnet: error: ...` and exit 2, never a traceback
(zfnet.cli). Commands import their library modules lazily so `zfnet --help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys

# Each command: (name, help, add_arguments(parser), run(args) -> exit code), registered by @command in the
# section modules beside this one.
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
    from ..models.weights import load_model

    weights = None if args.weights in (None, "none") else args.weights
    return load_model(args.model, weights, num_classes=args.num_classes, device=device_from_args(args))


def emit_json(obj):
    sys.stdout.write(json.dumps(obj, indent=1) + "\n")


def write_result(args, out, result: dict, **config) -> bool:
    """Record the command's exact config (model, weights, inputs) in the result, write out/result.json
    atomically, and with --json print it. Returns True when the caller should print its text summary."""
    from ..core.results import write_json

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
