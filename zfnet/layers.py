"""The layer table, taps and unit addresses: the shared vocabulary of every experiment.

The paper reasons about "feature maps of layer 5", their receptive fields and strides (Sec. 2.1, 4, 4.1).
For any nn.Module and input size this module answers, with one forward pass:
  * which layers exist, in execution order, with channels and output size;
  * where each unit of a layer looks in the input (jump = stride in input pixels, receptive-field size,
    start offset of unit 0), tracked exactly through conv/pool/pad/concat/elementwise ops;
and it gives a scoped way to read activations (`taps`) and one parser for unit addresses ("conv5:17@3,4").
"""

from __future__ import annotations

import re
import weakref
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Iterable, Iterator

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

from .errors import ZfnetError

__all__ = ["Field", "LayerInfo", "LayerTable", "layer_table", "taps", "run_with_taps", "Unit",
           "parse_unit", "feature_layers", "file_safe"]


# ----------------------------------------------------------------------------------------------------
# Receptive-field geometry, one axis pair at a time.
@dataclass(frozen=True)
class Field:
    """Where unit (y, x) of a layer looks: input rows start_y + y*jump_y ... + size_y - 1 (same for x).

    start may be negative (padding). A layer that mixes all positions (after flatten / linear /
    global pooling) has no Field: its units see the whole input.
    """

    jump_y: int
    jump_x: int
    size_y: int
    size_x: int
    start_y: int
    start_x: int

    def pooled(self, k: tuple, s: tuple, p: tuple, d: tuple = (1, 1)) -> "Field":
        """The field after a sliding window (conv or pool): kernel k, stride s, padding p, dilation d."""
        ky, kx = (d[0] * (k[0] - 1) + 1), (d[1] * (k[1] - 1) + 1)
        return Field(self.jump_y * s[0], self.jump_x * s[1],
                     self.size_y + (ky - 1) * self.jump_y, self.size_x + (kx - 1) * self.jump_x,
                     self.start_y - p[0] * self.jump_y, self.start_x - p[1] * self.jump_x)

    def union(self, other: "Field") -> "Field":
        """Envelope of two fields (branches that are added or concatenated)."""
        if other == self:
            return self
        y0, x0 = min(self.start_y, other.start_y), min(self.start_x, other.start_x)
        y1 = max(self.start_y + self.size_y, other.start_y + other.size_y)
        x1 = max(self.start_x + self.size_x, other.start_x + other.size_x)
        return Field(max(self.jump_y, other.jump_y), max(self.jump_x, other.jump_x), y1 - y0, x1 - x0, y0, x0)


def _pair(v) -> tuple:
    if isinstance(v, (tuple, list)):
        return (int(v[0]), int(v[1])) if len(v) > 1 else (int(v[0]), int(v[0]))
    return (int(v), int(v))


def _arg(args, kwargs, i, name, default):
    return args[i] if len(args) > i else kwargs.get(name, default)


@dataclass(frozen=True)
class _Geom:
    """What the tracker attaches to a tensor: the affine Field (None if not affine) and, per output row and
    column, the exact inclusive input interval it depends on. Exact boxes matter at borders: a window that
    reaches into the padding of an intermediate layer sees less of the image than the affine formula says."""

    field: Field | None
    rows: tuple  # ((lo, hi), ...) one per output row, inclusive input rows
    cols: tuple


def _slide(spans: tuple, n_out: int, k: int, s: int, p: int, d: int = 1) -> tuple:
    """Input intervals after a window of k taps d apart, stride s, padding p: from the first to the last
    tap that lands on a real input (taps in the padding see nothing; dilation leaves gaps)."""
    last = len(spans) - 1
    out = []
    for i in range(n_out):
        first = i * s - p
        lo = first + d * (-(-max(0, -first) // d))  # first tap >= 0
        hi = first + d * min(k - 1, (last - first) // d)  # last tap <= last
        lo, hi = (lo, hi) if lo <= hi else (min(max(first, 0), last),) * 2
        out.append((spans[lo][0], spans[hi][1]))
    return tuple(out)


def _adaptive(spans: tuple, n_out: int) -> tuple:
    n = len(spans)
    return tuple((spans[(i * n) // n_out][0], spans[-(-(i + 1) * n // n_out) - 1][1]) for i in range(n_out))


def _union_spans(a: tuple, b: tuple) -> tuple:
    return tuple((min(x[0], y[0]), max(x[1], y[1])) for x, y in zip(a, b))


class _FieldTracker(TorchFunctionMode):
    """Propagates geometry along every tensor of one forward pass (functional calls included)."""

    _WINDOW_OPS = {"conv2d", "max_pool2d", "_max_pool2d", "max_pool2d_with_indices", "avg_pool2d"}

    def __init__(self):
        super().__init__()
        self.geoms: dict[int, tuple[torch.Tensor, _Geom | None]] = {}  # id -> (tensor kept alive, geometry)

    def geom_of(self, t) -> _Geom | None | bool:
        """The tensor's geometry; None = sees the whole input; False = not derived from the input."""
        hit = self.geoms.get(id(t))
        return False if hit is None or hit[0] is not t else hit[1]

    def set(self, t, geom):
        self.geoms[id(t)] = (t, geom)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        inputs = [a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)]
        inputs += [t for a in args if isinstance(a, (list, tuple)) for t in a if isinstance(t, torch.Tensor)]
        known = [g for g in (self.geom_of(t) for t in inputs) if g is not False]
        outs = out if isinstance(out, (tuple, list)) else (out,)
        first = outs[0] if outs and isinstance(outs[0], torch.Tensor) else None
        if not known or first is None:
            return out
        x = args[0] if args else None
        gx = self.geom_of(x) if isinstance(x, torch.Tensor) else False
        geom = None
        if None in known or first.dim() != 4:
            geom = None  # flattened / pooled to a vector: every unit sees everything
        elif name in self._WINDOW_OPS and gx:
            if name == "conv2d":
                w = _arg(args, kwargs, 1, "weight", None)
                k = tuple(w.shape[-2:])
                s = _pair(_arg(args, kwargs, 3, "stride", 1))
                pad = _arg(args, kwargs, 4, "padding", 0)
                d = _pair(_arg(args, kwargs, 5, "dilation", 1))
                if pad == "valid":
                    pad = 0
                if pad == "same":  # PyTorch puts the odd pixel of 'same' padding at the end
                    pad = tuple((d[i] * (k[i] - 1)) // 2 for i in range(2))
                p = _pair(pad)
            else:
                k = _pair(_arg(args, kwargs, 1, "kernel_size", 1))
                s = _arg(args, kwargs, 2, "stride", None)
                s = k if s is None or s == [] or s == () else _pair(s)
                p = _pair(_arg(args, kwargs, 3, "padding", 0))
                d = _pair(_arg(args, kwargs, 4, "dilation", 1)) if "max" in name else (1, 1)
            geom = _Geom(gx.field.pooled(k, s, p, d) if gx.field else None,
                         _slide(gx.rows, first.shape[-2], k[0], s[0], p[0], d[0]),
                         _slide(gx.cols, first.shape[-1], k[1], s[1], p[1], d[1]))
        elif name in ("adaptive_avg_pool2d", "adaptive_max_pool2d") and gx:
            h, w = x.shape[-2:]
            oh, ow = first.shape[-2:]
            field = None  # 1x1 output = global; irregular bins: exact boxes only
            if gx.field and (h, w) == (oh, ow):
                field = gx.field
            elif gx.field and h % oh == 0 and w % ow == 0 and (oh, ow) != (1, 1):
                field = gx.field.pooled((h // oh, w // ow), (h // oh, w // ow), (0, 0))
            geom = _Geom(field, _adaptive(gx.rows, oh), _adaptive(gx.cols, ow))
        elif name == "pad" and gx:
            pads = list(_arg(args, kwargs, 1, "pad", ())) + [0, 0, 0, 0]
            f = gx.field
            field = f and Field(f.jump_y, f.jump_x, f.size_y, f.size_x,
                                f.start_y - pads[2] * f.jump_y, f.start_x - pads[0] * f.jump_x)
            geom = _Geom(field, _slide(gx.rows, first.shape[-2], 1, 1, pads[2]),
                         _slide(gx.cols, first.shape[-1], 1, 1, pads[0]))
        else:
            shape = tuple(first.shape[-2:])
            same = [g for g, t in zip((self.geom_of(t) for t in inputs), inputs)
                    if g and t.dim() == 4 and tuple(t.shape[-2:]) == shape]
            if same and len(same) == len(known):  # elementwise / concat on one grid: union of the branches
                geom = same[0]
                for g in same[1:]:
                    field = geom.field.union(g.field) if geom.field and g.field else None
                    geom = _Geom(field, _union_spans(geom.rows, g.rows), _union_spans(geom.cols, g.cols))
            # else: an op we do not model changed the grid: every unit may see everything (conservative)
        for o in outs:
            if isinstance(o, torch.Tensor):
                self.set(o, geom)
        return out


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
            raise ZfnetError(f"unknown layer {name!r}; valid layers: {', '.join(self.layers)}")
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
        widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
        return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows)


_TABLE_CACHE: dict = {}


def layer_table(model: nn.Module, input_size: int | tuple[int, int] = 224, in_channels: int = 3) -> LayerTable:
    """Build (and cache per model and size) the layer table with one forward pass of a zero image."""
    size = _pair(input_size)
    key = (id(model), size, in_channels)
    cached = _TABLE_CACHE.get(key)
    if cached is not None and cached[0]() is model:
        return cached[1]
    tracker = _FieldTracker()
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
        tracker.set(x, _Geom(Field(1, 1, 1, 1, 0, 0), tuple((i, i) for i in range(size[0])),
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
        valid = ", ".join(n for n in modules if n)
        raise ZfnetError(f"unknown layer {missing[0]!r}; valid layers: {valid}")
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

