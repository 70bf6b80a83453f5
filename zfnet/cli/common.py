"""What every command shares: the registry, the argument types, the model arguments, JSON output and the
skipped-files list.

Validation lives here, once: every option takes one of the types below (whole numbers in a range, floats,
lists, sweeps, devices, output folders, unit addresses), so a bad value is refused by argparse with one
line naming the option before any work starts. Lists read the same in every command: `--layers a,b`,
`--layers a b` and `--layers a --layers b` are one list; an empty one is refused. Values may start with
a minus sign (`--translate -20:20:20`). What still goes wrong while a command runs becomes one line
`zfnet: error: ...` at the error boundary in zfnet.cli. Commands import their library modules lazily so
`zfnet --help` stays fast.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from pathlib import Path

from ..core.errors import ZfnetError

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


class Parser(argparse.ArgumentParser):
    """argparse, except that a token such as `-20:20:20` or `-1,2` is a value, never an option (the help
    writes ranges that way and no zfnet option starts with a digit), and that a refused argument is one
    line, not the usage text followed by the error."""

    def _parse_optional(self, arg_string):
        if _NEGATIVE.match(arg_string):
            return None
        return super()._parse_optional(arg_string)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (`{self.prog} --help` lists the options)\n")


_NEGATIVE = re.compile(r"^-\.?\d")


# ----------------------------------------------------------------------------------------------------
# Argument types: each returns the parsed value or raises argparse.ArgumentTypeError with the reason
# (argparse prints `zfnet CMD: error: argument --opt: <reason>` and exits 2).
def _named(fn, name: str):
    fn.__name__ = name  # argparse names the type in some messages
    return fn


def int_range(lo: int | None = None, hi: int | None = None):
    """A whole number in [lo, hi] (either bound optional)."""
    def parse(text):
        try:
            v = int(str(text).strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if lo is not None and v < lo or hi is not None and v > hi:
            raise argparse.ArgumentTypeError(f"must be {_bounds(lo, hi)}, got {v}")
        return v
    return _named(parse, "int")


def float_range(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
                hi_open: bool = False):
    """A finite number in [lo, hi] ((lo, hi) where open); NaN and Infinity are refused."""
    def parse(text):
        try:
            v = float(str(text).strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
        if (lo is not None and (v < lo or lo_open and v == lo)) or (hi is not None and (v > hi or hi_open and v == hi)):
            raise argparse.ArgumentTypeError(f"must be {_bounds(lo, hi, lo_open, hi_open)}, got {v:g}")
        return v
    return _named(parse, "float")


def _bounds(lo, hi, lo_open=False, hi_open=False) -> str:
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {lo:g}"
    return f"{'<' if hi_open else '<='} {hi:g}"


positive_int = int_range(1)
nonnegative_int = int_range(0)
finite_float = float_range()
positive_float = float_range(0.0, lo_open=True)
nonnegative_float = float_range(0.0)
fraction = float_range(0.0, 1.0, hi_open=True)  # dropout, momentum


def choice(*choices: str):
    def parse(text):
        if text not in choices:
            raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(choices)}")
        return text
    return _named(parse, "choice")


def list_of(cast=str):
    """'a,b' -> [cast('a'), cast('b')]: one token of a list option (see add_list_arg); empty items and
    empty lists are refused."""
    def parse(text):
        items = [t.strip() for t in str(text).split(",")]
        if not any(items):
            raise argparse.ArgumentTypeError(f"empty list {text!r}")
        if not all(items):
            raise argparse.ArgumentTypeError(f"empty item in {text!r}")
        return [cast(t) for t in items]
    return _named(parse, "list")


class _Extend(argparse.Action):
    """Collect every token of a list option, over repeated flags, into one flat list."""

    def __call__(self, parser, namespace, values, option_string=None):
        items = getattr(namespace, self.dest, None)
        items = [] if items is None or items is self.default else list(items)
        setattr(namespace, self.dest, items + [v for token in values for v in token])


def add_list_arg(p: argparse.ArgumentParser, flag: str, cast=str, **kw):
    """A list option that reads the same in every command: `--x a,b`, `--x a b`, `--x a --x b`."""
    kw.setdefault("metavar", flag.lstrip("-").upper().replace("-", "_").rstrip("S") or "ITEM")
    return p.add_argument(flag, nargs="+", type=list_of(cast), action=_Extend, **kw)


def add_layers_arg(p: argparse.ArgumentParser, help: str, **kw):
    """--layers, the same syntax in every command."""
    return add_list_arg(p, "--layers", metavar="LAYER", help=f"{help}; `a,b` or `a b` (`zfnet layers` lists "
                        "the names)", **kw)


MAX_SWEEP = 1000  # values per sweep: each is one forward pass per image (Fig. 5 uses about 10 to 25)


def sweep(text) -> list[float]:
    """'START:STOP:STEP' (inclusive, step > 0; negative ends allowed: -60:60:10) or 'V1,V2,...'."""
    text = str(text).strip()
    try:
        if ":" in text:
            a, b, step = (float(v) for v in text.split(":"))
            if not all(math.isfinite(v) for v in (a, b, step)):
                raise ValueError
            if step <= 0 or b < a:
                raise argparse.ArgumentTypeError(f"bad sweep {text!r}: need STOP >= START and STEP > 0")
            n = int(math.floor((b - a) / step + 1e-9))
            if n + 1 > MAX_SWEEP:
                raise argparse.ArgumentTypeError(f"bad sweep {text!r}: {n + 1} values (at most {MAX_SWEEP})")
            return [round(a + i * step, 6) for i in range(n + 1)]
        values = list_of(float)(text)
        if not all(math.isfinite(v) for v in values):
            raise ValueError
        if len(values) > MAX_SWEEP:
            raise argparse.ArgumentTypeError(f"bad sweep: {len(values)} values (at most {MAX_SWEEP})")
        return values
    except (ValueError, TypeError):
        raise argparse.ArgumentTypeError(f"bad sweep {text!r}: use START:STOP:STEP or V1,V2,...") from None


def positive_sweep(text) -> list[float]:
    """A sweep (see `sweep`) of values > 0 (zoom factors)."""
    values = sweep(text)
    if min(values) <= 0:
        raise argparse.ArgumentTypeError(f"bad sweep {text!r}: every value must be > 0")
    return values


_DEVICE = re.compile(r"^(cpu|cuda|mps|xpu)(:\d+)?$")


def device_name(text) -> str:
    """cpu, cuda, cuda:N, mps, xpu[:N] (checked for availability when the command starts: resolve_device)."""
    if not _DEVICE.match(str(text)):
        raise argparse.ArgumentTypeError(f"unknown device {text!r}; use cpu, cuda, cuda:N, mps or xpu")
    return str(text)


def resolve_device(name: str | None) -> str:
    """The device to run on: `name` if this machine has it (else one ZfnetError saying why), or cuda when
    there is one and cpu otherwise."""
    import torch

    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this torch is a CPU-only build" if not torch.backends.cuda.is_built()
                   else "no CUDA device is visible (driver? CUDA_VISIBLE_DEVICES?)")
            raise ZfnetError(f"--device {name}: CUDA is not available ({why}); use --device cpu")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise ZfnetError(f"--device {name}: this machine has {n} CUDA device(s): cuda:0 .. cuda:{n - 1}")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ZfnetError(f"--device {name}: Apple's MPS is not available on this machine; use --device cpu")
    elif dev.type == "xpu" and not (hasattr(torch, "xpu") and torch.xpu.is_available()):
        raise ZfnetError(f"--device {name}: no Intel XPU is available; use --device cpu")
    return str(dev)


def out_dir(text) -> str:
    """A folder that exists or can be created: not a file, under no file, and writable (checked before the
    command starts, so nothing is computed for a place it cannot write)."""
    p = Path(str(text)).expanduser()
    if not str(text).strip():
        raise argparse.ArgumentTypeError("empty path")
    if p.exists() and not p.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file, not a folder" if p.is_file() else
                                         f"{text} exists and is not a folder")
    parent = p
    while not parent.exists():
        if parent.is_symlink():
            raise argparse.ArgumentTypeError(f"{text}: {parent} is a broken link")
        parent = parent.parent
    if not parent.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"{text}: no permission to write in {parent}")
    return str(text)


def unit_address(text) -> str:
    """LAYER:CHANNEL or LAYER:CHANNEL@Y,X (the layer and ranges are checked against the model later)."""
    from ..inspect.layers import parse_unit

    try:
        parse_unit(text)
    except ZfnetError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return str(text).strip()


_MODEL = re.compile(r"^[A-Za-z_][\w.-]*$|^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")


def model_spec(text) -> str:
    """A registry name or package.module:factory (whether it exists is checked when it is loaded)."""
    if not _MODEL.match(str(text).strip()):
        raise argparse.ArgumentTypeError(f"{text!r} is neither a registry name (zfnet, alexnet, squeezenet1_1, "
                                         "...) nor package.module:factory (e.g. mypkg.nets:resnet)")
    return str(text).strip()


# ----------------------------------------------------------------------------------------------------
def add_model_args(p: argparse.ArgumentParser, default_model: str = "squeezenet1_1", several: bool = False):
    """several: --weights may be given more than once (an ensemble; args.weights is then a list or None)."""
    p.add_argument("--model", type=model_spec, default=default_model,
                   help="registry name (zfnet, alexnet, alexnet2, alexnet_torchvision, squeezenet1_1), "
                        "package.module:factory, or auto (a `zfnet train` checkpoint given as --weights) "
                        "(default: %(default)s)")
    p.add_argument("--weights", default=None if several else "default", action="append" if several else "store",
                   help="weights file or URL; 'default' = the published weights ($ZFNET_WEIGHTS if set, else "
                        "downloaded once); 'none' = random init" +
                        ("; give it several times for an ensemble (softmax outputs averaged)" if several else ""))
    p.add_argument("--allow-nonfinite-weights", action="store_true",
                   help="load weights that hold NaN or Infinity (refused by default)")
    p.add_argument("--num-classes", type=positive_int, default=None, help="output classes (default: the model's)")
    p.add_argument("--device", type=device_name, default=None,
                   help="cpu, cuda, cuda:1 ... (default: cuda if available)")


def device_from_args(args) -> str:
    """--device if this machine has it (one line saying why not, otherwise), else cuda when there is one."""
    return resolve_device(getattr(args, "device", None))


def load_from_args(args):
    """The model of --model / --weights / --num-classes / --device; `--model auto` rebuilds a `zfnet train`
    checkpoint (any reduced width / input size) from its record."""
    device = device_from_args(args)
    allow = getattr(args, "allow_nonfinite_weights", False)
    if args.model == "auto":
        from ..training.checkpoints import model_from_checkpoint

        if args.weights in (None, "none", "default"):
            raise ZfnetError("--model auto needs --weights CHECKPOINT (a zfnet train checkpoint.pth / epoch_NNN.pth)")
        return model_from_checkpoint(args.weights, device, allow_nonfinite=allow)
    from ..models.weights import load_model

    weights = None if args.weights in (None, "none") else args.weights
    return load_model(args.model, weights, num_classes=args.num_classes, device=device, allow_nonfinite=allow)


def emit_json(obj):
    """Strict JSON on stdout (NaN / Infinity written as null, with a warning on stderr)."""
    from ..core.results import json_text

    sys.stdout.write(json_text(obj, "JSON on stdout") + "\n")


def write_result(args, out, result: dict, **config) -> bool:
    """Record the command's exact config (model, weights, inputs) in the result, write out/result.json
    atomically, and with --json print it. Returns True when the caller should print its text summary."""
    from ..core.results import write_json

    result["config"].update(model=args.model, weights=args.weights, **config)
    write_json(Path(out) / "result.json", result)
    if args.json:
        emit_json(result)
    return not args.json


def report_skipped(skipped, done: int | None = None) -> int:
    """At the end of a batch job: say which inputs were skipped and why (stderr, one line each). Returns
    the exit code: 1 when `done` (the inputs processed) is 0 (the list says why; with nothing skipped, a
    line says there was no input)."""
    for _path, why in skipped:  # `why` already names the file
        print(f"zfnet: skipped: {why}", file=sys.stderr)
    if done == 0:
        if not skipped:
            print("zfnet: nothing processed: no input", file=sys.stderr)
        return 1
    return 0
