"""The layer table, taps and unit addresses: the shared vocabulary of every experiment.

The paper reasons about "feature maps of layer 5", their receptive fields and strides (Sec. 2.1, 4, 4.1).
For any nn.Module and input size this module answers, with one forward pass:
  * which layers exist, in execution order, with channels and output size;
  * where each unit of a layer looks in the input (jump = stride in input pixels, receptive-field size,
    start offset of unit 0), tracked exactly through conv/pool/pad/concat/elementwise ops;
and it gives a scoped way to read activations (`taps`) and one parser for unit addresses ("conv5:17@3,4").
The receptive-field tracking itself lives in zfnet.inspect.fields.
"""

from __future__ import annotations

import re
import weakref
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Iterable, Iterator

import torch
import torch.nn as nn

from ..core.errors import ZfnetError, unknown_layer
from ..core.results import text_table
from .fields import Field, FieldTracker, Geom, pair

__all__ = ["Field", "LayerInfo", "LayerTable", "layer_table", "taps", "run_with_taps", "Unit",
           "parse_unit", "feature_layers", "penultimate_layer", "file_safe"]


# ----------------------------------------------------------------------------------------------------
# The table.
@dataclass(frozen=True)
class LayerInfo:
    name: str
    kind: str  # module class name
    index: int  # execution order
    channels: int
    height: int  # 1 for vector layers
    width: int
    field: Field | None  # affine geometry (None: global, or not affine)
    input_size: tuple[int, int] = (224, 224)
    rows: tuple | None = None  # exact inclusive input rows per output row (None: every unit sees everything)
    cols: tuple | None = None

    def window(self, y: int, x: int, input_size: tuple[int, int] | None = None) -> tuple[int, int, int, int]:
        """Input box (y0, y1, x0, x1), end-exclusive and clipped to the image, that unit (y, x) sees.

        Exact: nothing outside the box can change the unit. `input_size` other than the table's falls back
        to the affine field clipped to that size.
        """
        H, W = input_size or self.input_size
        if (H, W) == tuple(self.input_size) and self.rows is not None:
            return self.rows[y][0], self.rows[y][1] + 1, self.cols[x][0], self.cols[x][1] + 1
        f = self.field
        if f is None:
            return 0, H, 0, W
        y0, x0 = f.start_y + y * f.jump_y, f.start_x + x * f.jump_x
        return max(0, y0), min(H, y0 + f.size_y), max(0, x0), min(W, x0 + f.size_x)

    def to_json(self) -> dict:
        return {"name": self.name, "kind": self.kind, "index": self.index, "channels": self.channels,
                "height": self.height, "width": self.width, "field": asdict(self.field) if self.field else None}


class LayerTable:
    """Every named module's output, in execution order, for one (model, input size)."""

    def __init__(self, layers: list[LayerInfo], input_size: tuple[int, int]):
        self.layers = {info.name: info for info in layers}
        self.input_size = input_size

    def __getitem__(self, name: str) -> LayerInfo:
        if name not in self.layers:
            raise unknown_layer(name, self.layers)
        return self.layers[name]

    def __contains__(self, name: str) -> bool:
        return name in self.layers

    def __iter__(self) -> Iterator[LayerInfo]:
        return iter(self.layers.values())

    def __len__(self) -> int:
        return len(self.layers)

    def names(self) -> list[str]:
        return list(self.layers)

    def to_json(self) -> dict:
        return {"input_size": list(self.input_size), "layers": [info.to_json() for info in self]}

    def format(self) -> str:
        rows = [("layer", "kind", "channels", "size", "stride", "rf", "start")]
        for i in self:
            f = i.field
            rows.append((i.name, i.kind, str(i.channels), f"{i.height}x{i.width}",
                         f"{f.jump_y}" if f else "-", f"{f.size_y}" if f else "all",
                         f"{f.start_y}" if f else "-"))
        return "\n".join(text_table(rows))


_TABLE_CACHE: dict = {}


def layer_table(model: nn.Module, input_size: int | tuple[int, int] = 224, in_channels: int = 3) -> LayerTable:
    """Build (and cache per model and size) the layer table with one forward pass of a zero image."""
    size = pair(input_size)
    key = (id(model), size, in_channels)
    cached = _TABLE_CACHE.get(key)
    if cached is not None and cached[0]() is model:
        return cached[1]
    tracker = FieldTracker()
    seen: list[tuple[str, nn.Module, torch.Tensor]] = []
    handles = []

    def hook(name):
        def fn(module, args, output):
            out = output[0] if isinstance(output, (tuple, list)) else output
            if isinstance(out, torch.Tensor):
                seen.append((name, module, out))
        return fn

    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()  # the probing pass must not update batch-norm statistics or draw dropout masks
        for name, module in model.named_modules():
            if name:
                handles.append(module.register_forward_hook(hook(name)))
        p = next(model.parameters(), None)
        x = torch.zeros(1, in_channels, *size, device=p.device if p is not None else "cpu",
                        dtype=p.dtype if p is not None and p.is_floating_point() else torch.float32)
        tracker.set(x, Geom(Field(1, 1, 1, 1, 0, 0), tuple((i, i) for i in range(size[0])),
                             tuple((i, i) for i in range(size[1]))))
        with torch.no_grad(), tracker:
            model(x)
    finally:
        for h in handles:
            h.remove()
        for m, training in modes:
            m.training = training
    infos, done = [], set()
    for name, module, out in seen:
        if name in done:  # a module called twice keeps its first call
            continue
        done.add(name)
        geom = tracker.geom_of(out) or None
        if out.dim() == 4:
            c, h, w = out.shape[1:]
        else:
            c, h, w = out.shape[-1] if out.dim() else 1, 1, 1
        infos.append(LayerInfo(name, type(module).__name__, len(infos), int(c), int(h), int(w),
                               geom.field if geom else None, size, geom.rows if geom else None,
                               geom.cols if geom else None))
    table = LayerTable(infos, size)
    _TABLE_CACHE[key] = (weakref.ref(model), table)
    return table


def feature_layers(model: nn.Module, table: LayerTable | None = None) -> list[str]:
    """The rectified conv outputs ("layer N feature maps" in the paper), shallow to deep.

    Our models declare them (`model.feature_layers`); for any other model: every ReLU-like module with a
    spatial output, else every conv.
    """
    declared = getattr(model, "feature_layers", None)
    if declared:
        return list(declared)
    table = table or layer_table(model)
    acts = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU)
    kinds = {a.__name__ for a in acts}
    names = [i.name for i in table if i.kind in kinds and i.height * i.width > 1 and i.rows is not None]
    return names or [i.name for i in table if i.kind == "Conv2d"]


# Layers that only pass values on (skipped when looking for the layer feeding the classifier).
_SKIP_KINDS = {"Dropout", "Dropout2d", "Dropout1d", "AlphaDropout", "Identity", "Flatten", "Sequential",
               "ModuleList", "ModuleDict"}


def penultimate_layer(model: nn.Module, table=None) -> str:
    """The layer that feeds the classifier output (relu7 in ZFNet; features.12 in SqueezeNet).

    Walks back from the last Linear/Conv2d in execution order past dropout, flatten and containers.
    """
    table = table or layer_table(model)
    infos = list(table)
    last = max((i for i, info in enumerate(infos) if info.kind in ("Linear", "Conv2d")), default=None)
    if last is None:
        raise ZfnetError("model has no Linear or Conv2d layer: cannot find its penultimate layer")
    for info in reversed(infos[:last]):
        if info.kind not in _SKIP_KINDS:
            return info.name
    raise ZfnetError("model has no layer before its classifier")


# ----------------------------------------------------------------------------------------------------
# Taps: read any set of layers in one forward pass.
class _StopForward(Exception):
    pass


@contextmanager
def taps(model: nn.Module, names: Iterable[str], *, detach: bool = True, stop: bool = False,
         reduce=None):
    """Record the outputs of the named modules while the block runs; hooks are removed on every exit.

    Args:
        names: module names (as in `model.named_modules()`).
        detach: store detached tensors (False keeps the autograd graph, for projections).
        stop: raise inside the forward pass once every tap is recorded, so deeper layers never run;
            use `run_with_taps`, which catches it.
        reduce: optional fn(name, tensor) -> value stored instead of the tensor (e.g. a spatial max),
            so that full maps are never kept.
    Yields: dict name -> recorded value (filled as the forward pass runs).
    """
    names = list(dict.fromkeys(names))
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules or not n]
    if missing:
        raise unknown_layer(missing[0], modules)
    # A conv followed by an in-place ReLU would have its stored output overwritten: clone those.
    inplace = any(getattr(m, "inplace", False) for m in modules.values())
    out: dict = {}
    handles = []

    def hook(name):
        def fn(module, args, output):
            if name in out:  # modules called twice: keep the first call, like the layer table
                return
            t = output[0] if isinstance(output, (tuple, list)) else output
            if reduce is not None:
                out[name] = reduce(name, t)
            else:
                if detach:
                    t = t.detach()
                if inplace and not getattr(module, "inplace", False) and not isinstance(module, _ACTIVATIONS):
                    t = t.clone()
                out[name] = t
            if stop and len(out) == len(names):
                raise _StopForward
        return fn

    try:
        for n in names:
            handles.append(modules[n].register_forward_hook(hook(n)))
        yield out
    finally:
        for h in handles:
            h.remove()


_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh)


def run_with_taps(model: nn.Module, x: torch.Tensor, names: Iterable[str], *, stop: bool = True,
                  detach: bool = True, reduce=None) -> dict:
    """One forward pass returning {name: output}; with stop=True it ends at the deepest tap."""
    with taps(model, names, stop=stop, detach=detach, reduce=reduce) as out:
        try:
            model(x)
        except _StopForward:
            pass
    return out


# ----------------------------------------------------------------------------------------------------
# Unit addresses.
def file_safe(text: str) -> str:
    """A file name for any layer or unit name (module names may hold characters a file system refuses)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text)


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

    def check(self, table: LayerTable) -> "Unit":
        """Validate against a layer table; errors name the valid layers or the channel range."""
        info = table[self.layer]
        if not 0 <= self.channel < info.channels:
            raise ZfnetError(f"unit {self}: channel {self.channel} out of range 0..{info.channels - 1} "
                             f"for layer {self.layer}")
        if self.y is not None and not (0 <= self.y < info.height and 0 <= self.x < info.width):
            raise ZfnetError(f"unit {self}: location ({self.y},{self.x}) outside the {info.height}x{info.width} "
                             f"output of layer {self.layer}")
        return self


def parse_unit(text: str | Unit, table: LayerTable | None = None) -> Unit:
    """Parse "layer:channel" or "layer:channel@y,x"; with a table, also validate it."""
    if isinstance(text, Unit):
        unit = text
    else:
        m = _UNIT.match(str(text).strip())
        if not m:
            raise ZfnetError(f"bad unit address {text!r}: expected LAYER:CHANNEL or LAYER:CHANNEL@Y,X "
                             f"(e.g. conv5:17 or conv5:17@3,4)")
        y = m.group("y")
        unit = Unit(m.group("layer"), int(m.group("channel")), None if y is None else int(y),
                    None if y is None else int(m.group("x")))
    return unit.check(table) if table is not None else unit

