"""Names of layers and units: the paper's "feature map 17 of layer 5" as `conv5:17`, one activation of it
as `conv5:17@3,4`.

A layer is a module *call*: the first call of a module keeps the module's dotted name, later calls of the
same module in one forward pass are `NAME#2`, `NAME#3`, ... (torchvision's ResNet blocks call one `relu`
module two or three times: `layer4.1.relu`, `layer4.1.relu#2`). Unit addresses use layer names, so
`layer4.1.relu#2:7@3,4` is channel 7 at (3, 4) of that module's second call. File names replace `#`
(a URL fragment marker) by `-` (see `file_safe`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..core.errors import ZfnetError

__all__ = ["Unit", "parse_unit", "file_safe", "split_call", "call_name"]


def split_call(layer: str) -> tuple[str, int]:
    """'layer4.1.relu#2' -> ('layer4.1.relu', 2); a plain module name is its first call."""
    module, sep, k = layer.rpartition("#")
    if not sep:
        return layer, 1
    if not module or not k.isdigit() or int(k) < 2:
        raise ZfnetError(f"bad layer name {layer!r}: a module's first call is named NAME, its later calls "
                         f"NAME#2, NAME#3, ...")
    return module, int(k)


def call_name(module: str, k: int) -> str:
    """The layer name of call k (1-based) of a module."""
    return module if k == 1 else f"{module}#{k}"


def file_safe(text: str) -> str:
    """A file name for any layer or unit name (module names may hold characters a file system refuses;
    `#` would end a URL): `layer4.1.relu#2` -> `layer4.1.relu-2`."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text.replace("#", "-"))


_UNIT = re.compile(r"^(?P<layer>[^:@\s]+):(?P<channel>\d+)(?:@(?P<y>\d+),(?P<x>\d+))?$")


@dataclass(frozen=True)
class Unit:
    """A feature map ("conv5:17") or one activation in it ("conv5:17@3,4")."""

    layer: str
    channel: int
    y: int | None = None
    x: int | None = None

    def __str__(self) -> str:
        at = f"@{self.y},{self.x}" if self.y is not None else ""
        return f"{self.layer}:{self.channel}{at}"

    @property
    def slug(self) -> str:
        """A file- and URL-safe form: conv5_17 or conv5_17_y3_x4 (used by every file a unit gets)."""
        at = f"_y{self.y}_x{self.x}" if self.y is not None else ""
        return file_safe(f"{self.layer}_{self.channel}{at}")

    def check(self, table) -> "Unit":
        """Validate against a LayerTable; errors name the valid layers or the channel range."""
        info = table[self.layer]
        if not 0 <= self.channel < info.channels:
            raise ZfnetError(f"unit {self}: channel {self.channel} out of range 0..{info.channels - 1} "
                             f"for layer {self.layer}")
        if self.y is not None and not (0 <= self.y < info.height and 0 <= self.x < info.width):
            raise ZfnetError(f"unit {self}: location ({self.y},{self.x}) outside the {info.height}x{info.width} "
                             f"output of layer {self.layer}")
        return self


def parse_unit(text: str | Unit, table=None) -> Unit:
    """Parse "layer:channel" or "layer:channel@y,x" (layer may be a later call, "relu#2:7"); with a
    LayerTable, also validate it."""
    if isinstance(text, Unit):
        unit = text
    else:
        m = _UNIT.match(str(text).strip())
        if not m:
            raise ZfnetError(f"bad unit address {text!r}: expected LAYER:CHANNEL or LAYER:CHANNEL@Y,X "
                             f"(e.g. conv5:17 or conv5:17@3,4)")
        y = m.group("y")
        split_call(m.group("layer"))  # a malformed call suffix is an error, not an unknown layer
        unit = Unit(m.group("layer"), int(m.group("channel")), None if y is None else int(y),
                    None if y is None else int(m.group("x")))
    return unit.check(table) if table is not None else unit
