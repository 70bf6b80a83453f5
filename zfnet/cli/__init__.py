"""`zfnet <command>`: a thin shell over the library; each command calls one library function.

The commands live beside this module, one module per section of the paper (approach: Sec. 2, training:
Sec. 3, understanding: Sec. 4, generalization: Sec. 5) and are listed in that order. Problems a user can
fix (ZfnetError) print one line `zfnet: error: ...` and exit 2, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

from ..core.errors import ZfnetError
from . import approach, generalization, training, understanding
from .common import COMMANDS as _REGISTERED

_SECTIONS = [m.__name__ for m in (approach, training, understanding, generalization)]  # the paper's order
COMMANDS = sorted(_REGISTERED, key=lambda c: _SECTIONS.index(c[3].__module__))


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
