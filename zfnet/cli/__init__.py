"""`zfnet <command>`: a thin shell over the library; each command calls one library function.

The commands live beside this module, one module per section of the paper (approach: Sec. 2, training:
Sec. 3, understanding: Sec. 4, generalization: Sec. 5), then the rest of the CS231n notes (cs231n) and the
report that runs them all (report), and are listed in that order.

The error boundary is `main`: a bad argument is refused by argparse (zfnet.cli.common's types) and any
exception that leaves a command prints one line `zfnet: error: ...` naming the file or argument and exits
2, never a traceback; `--debug` (or ZFNET_DEBUG=1) prints the traceback as well. A command that could
process none of its inputs lists them (`zfnet: skipped: ...`, one line each) and exits 1.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import traceback

from ..core.errors import NoInputError, UnknownLayerError, ZfnetError
from . import approach, cs231n, generalization, report, training, understanding
from .common import COMMANDS as _REGISTERED
from .common import Parser, report_skipped

# the paper's order, then the rest of the CS231n notes, then the report that runs them all
_SECTIONS = [m.__name__ for m in (approach, training, understanding, generalization, cs231n, report)]
COMMANDS = sorted(_REGISTERED, key=lambda c: _SECTIONS.index(c[3].__module__))
DEBUG_ENV = "ZFNET_DEBUG"


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="zfnet", description="Visualize and understand any PyTorch convnet "
                    "(Zeiler & Fergus 2013).")
    parser.add_argument("--debug", action="store_true",
                        help=f"show the Python traceback of an error (or {DEBUG_ENV}=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_, add_arguments, run in COMMANDS:
        p = sub.add_parser(name, help=help_, description=help_)
        add_arguments(p)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the Python traceback of an error")
        p.set_defaults(run=run)
    return parser


def main(argv=None) -> int:
    """Run one command; returns its exit code (0 done, 1 nothing could be processed, 2 error, 130 ^C)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a refused argument (2): argparse has printed why
        return e.code if isinstance(e.code, int) else 2
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    debug = args.debug or os.environ.get(DEBUG_ENV, "").lower() in ("1", "true", "yes", "on")
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print("zfnet: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `zfnet ... | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except NoInputError as e:  # could process nothing: which inputs and why, then the reason
        if debug:
            traceback.print_exc()
        report_skipped(e.skipped)
        print(f"zfnet: error: {describe(e, args)}", file=sys.stderr)
        return 1
    except Exception as e:
        if debug:
            traceback.print_exc()
        hint = "" if debug or _explained(e) else " (--debug shows the traceback)"
        print(f"zfnet: error: {describe(e, args)}{hint}", file=sys.stderr)
        return 2


def describe(e: BaseException, args=None) -> str:
    """One line for an exception that left a command: what went wrong, naming the file or argument."""
    if isinstance(e, UnknownLayerError) and args is not None:
        e.model_hint = _model_hint(args)
    if isinstance(e, ZfnetError):
        return str(e)
    text = _first_line(e)
    if isinstance(e, OSError) and e.filename is not None:
        where = f"{e.filename}" + (f" -> {e.filename2}" if e.filename2 else "")
        return f"{where}: {_OS_REASONS.get(e.errno, e.strerror or type(e).__name__)}"
    if isinstance(e, MemoryError) or "out of memory" in text.lower() or "can't allocate memory" in text.lower():
        hint = "; lower --batch-size" if getattr(args, "batch_size", None) else ""
        return f"out of memory ({text or type(e).__name__}){hint}"
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


_OS_REASONS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
               errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
               errno.EPERM: "operation not permitted", errno.EEXIST: "exists and is not a folder",
               errno.ENOTDIR: "a part of the path is a file, not a folder", errno.ENAMETOOLONG: "file name too long",
               errno.ENOENT: "no such file or folder", errno.EISDIR: "is a folder"}


def _explained(e: BaseException) -> bool:
    """Whether the one line says all there is: the user's input or machine, not a bug or the user's code."""
    if isinstance(e, ZfnetError):
        return e.__cause__ is None  # with a cause: the user's factory raised, its traceback may help
    return isinstance(e, OSError) and e.filename is not None


def _model_hint(args) -> str:
    if getattr(args, "run_dir", None):  # evolution: the model of a training run
        return f"auto --weights {os.path.join(args.run_dir, 'checkpoint.pth')}"
    model = getattr(args, "model", None) or "MODEL"
    return f"{model} --weights {args.weights}" if model == "auto" else model


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0][:300] if lines else ""


if __name__ == "__main__":
    sys.exit(main())
