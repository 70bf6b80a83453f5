"""One exception type for every problem a user can fix (bad file, unknown layer, ...), and one warning line.

The CLI prints a ZfnetError as a single line `zfnet: error: ...` and exits 2; anything else that escapes a
command is reported the same way (with the traceback under --debug), so a user never sees a traceback.
"""

from __future__ import annotations

import difflib
import sys
from typing import Iterable


class ZfnetError(Exception):
    """A user-facing error: the message names the file, argument or value that is wrong."""


class UnknownLayerError(ZfnetError):
    """A layer name the model does not have. The message names the three closest valid names and where to
    see them all; the CLI fills in the `--model` it was given (`model_hint`)."""

    def __init__(self, name: str, valid: Iterable[str]):
        valid = [v for v in valid if v]
        self.name, self.count = name, len(valid)
        self.closest = difflib.get_close_matches(str(name), valid, n=3, cutoff=0.0)
        self.model_hint = "MODEL"
        super().__init__(name)

    def __str__(self) -> str:
        near = f"; closest: {', '.join(self.closest)}" if self.closest else ""
        return (f"unknown layer {self.name!r}{near} (`zfnet layers --model {self.model_hint}` lists all "
                f"{self.count})")


class NoInputError(ZfnetError):
    """Not one input could be read (or too few to compute anything). `skipped` lists (path, why) for each,
    so the caller can say which and why; the CLI prints them and exits 1, as for any command that could
    process nothing."""

    def __init__(self, message: str, skipped: Iterable = ()):
        super().__init__(message)
        self.skipped = list(skipped)


def unknown_layer(name: str, valid: Iterable[str]) -> UnknownLayerError:
    """The error to raise for an unknown layer name: `raise unknown_layer(name, table.names())`."""
    return UnknownLayerError(name, valid)


def warn(message: str) -> None:
    """One line on stderr, `zfnet: warning: ...`, for something done instead of what was asked (never silent)."""
    print(f"zfnet: warning: {message}", file=sys.stderr)
