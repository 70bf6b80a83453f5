"""The layer table, taps and unit addresses: the shared vocabulary of every experiment.

The paper reasons about "feature maps of layer 5", their receptive fields and strides (Sec. 2.1, 4, 4.1).
For any nn.Module and input size this module answers, with one forward pass:
  * which layers exist, in execution order, with channels and output size: a layer is a module call
    (a module called twice is two layers, `NAME` and `NAME#2`; see zfnet.inspect.units), containers
    (a ResNet block, a stage) included;
  * where each unit of a layer looks in the input (jump = stride in input pixels, receptive-field size,
    start offset of unit 0), exactly and, past global gates, locally (zfnet.inspect.fields);
  * which layers are its default feature layers, the paper's "layer 1..5" (`feature_layers`).
Taps (zfnet.inspect.taps) read layers in one forward pass; units are parsed by zfnet.inspect.units.
"""

from __future__ import annotations

import sys
import weakref
from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Iterator

import torch
import torch.nn as nn

from ..core.errors import ZfnetError, unknown_layer
from ..core.results import text_table
from .fields import Field, Geom, pair
from .taps import TapOverwritten, run_with_taps, taps
from .tracker import FieldTracker
from .units import Unit, call_name, file_safe, parse_unit, split_call

__all__ = ["Field", "LayerInfo", "LayerTable", "layer_table", "taps", "run_with_taps", "TapOverwritten", "Unit",
           "parse_unit", "feature_layers", "penultimate_layer", "file_safe", "split_call"]


# ----------------------------------------------------------------------------------------------------
# The table.
@dataclass(frozen=True)
class LayerInfo:
    name: str  # the layer: module name, `#k` for the module's k-th call
    kind: str  # module class name
    index: int  # execution order (when the call returns: a container comes after its contents)
    channels: int  # values per position (a channels-last map counts its last dimension)
    height: int  # 1 for vector layers
    width: int
    field: Field | None  # affine geometry (None: global, or not affine)
    input_size: tuple[int, int] = (224, 224)
    rows: tuple | None = None  # exact inclusive input rows per output row (None: every unit sees everything)
    cols: tuple | None = None
    # The path that carries position, global gates (squeeze-and-excitation, normalisation statistics)
    # treated as constants; equal to the exact answer where there is no gate. None: no local path.
    local_field: Field | None = None
    local_rows: tuple | None = None
    local_cols: tuple | None = None
    layout: str = "CHW"  # the output's dimensions after the batch: C(hannels), H, W, L (= H*W flattened)
    parent: str | None = None  # the layer this call runs inside (None: the model itself)
    rectified: bool = False  # output of a ReLU-like activation (or a concatenation of such)
    input_jump: tuple[int, int] | None = None  # stride in pixels of the map the call received
    alias: bool = False  # the call returned its input unchanged (Identity, dropout in eval)

    @property
    def module(self) -> str:
        return split_call(self.name)[0]

    @property
    def gated(self) -> bool:
        """Whether a global gate makes the exact field larger than the local one."""
        return self.local_rows is not None and (self.local_rows, self.local_cols) != (self.rows, self.cols)

    def affine(self, local: bool = False) -> Field | None:
        """The affine field `window` uses: local=True the local field where there is one (past a global
        gate: what pictures of a unit crop to), else the exact field."""
        return self.local_field if local and self.local_rows is not None else self.field

    def window(self, y: int, x: int, input_size: tuple[int, int] | None = None,
               local: bool = False) -> tuple[int, int, int, int]:
        """Input box (y0, y1, x0, x1), end-exclusive and clipped to the image, that unit (y, x) sees.

        Exact: nothing outside the box can change the unit. local=True: the box of the local field (the
        same where no global gate is in the way). `input_size` other than the table's falls back to the
        affine field clipped to that size.
        """
        H, W = input_size or self.input_size
        rows, cols, f = self.rows, self.cols, self.affine(local)
        if local and self.local_rows is not None:
            rows, cols = self.local_rows, self.local_cols
        if (H, W) == tuple(self.input_size) and rows is not None:
            (y0, y1), (x0, x1) = rows[y if len(rows) > 1 else 0], cols[x if len(cols) > 1 else 0]
            return y0, y1 + 1, x0, x1 + 1
        if f is None:
            return 0, H, 0, W
        y0, x0 = f.start_y + y * f.jump_y, f.start_x + x * f.jump_x
        return max(0, y0), min(H, y0 + f.size_y), max(0, x0), min(W, x0 + f.size_x)

    def to_json(self) -> dict:
        return {"name": self.name, "kind": self.kind, "index": self.index, "channels": self.channels,
                "height": self.height, "width": self.width, "layout": self.layout,
                "field": asdict(self.field) if self.field else None,
                "local_field": asdict(self.local_field) if self.local_field else None}


class LayerTable:
    """Every layer (module call) in execution order, for one (model, input size)."""

    def __init__(self, layers: list[LayerInfo], input_size: tuple[int, int], defaults: list[str] | None = None):
        self.layers = {info.name: info for info in layers}
        self.input_size = input_size
        self.defaults = list(defaults or [])  # the default feature layers (`feature_layers`)

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
        return {"input_size": list(self.input_size), "feature_layers": self.defaults,
                "layers": [{**info.to_json(), "default": info.name in self.defaults} for info in self]}

    def format(self) -> str:
        rows = [("layer", "kind", "channels", "size", "stride", "rf", "start", "local rf", "default")]
        defaults = set(self.defaults)
        for i in self:
            f = i.field
            grid = f or i.local_field  # the stride and start of the grid hold with or without the gate
            local = "" if not i.gated else (f"{i.local_field.size_y}" if i.local_field else "-")
            rows.append((i.name, i.kind, str(i.channels), f"{i.height}x{i.width}",
                         f"{grid.jump_y}" if grid else "-", f"{f.size_y}" if f else "all",
                         f"{grid.start_y}" if grid else "-", local, "*" if i.name in defaults else ""))
        notes = ["* default feature layers (feature_layers); local rf: the receptive field with global "
                 "gates treated as constants, where it differs"]
        return "\n".join(text_table(rows) + notes)


_TABLE_CACHE: dict = {}


def layer_table(model: nn.Module, input_size: int | tuple[int, int] = 224, in_channels: int = 3) -> LayerTable:
    """Build (and cache per model and size) the layer table with one forward pass of a zero image."""
    size = pair(input_size)
    key = (id(model), size, in_channels)
    cached = _TABLE_CACHE.get(key)
    if cached is not None and cached[0]() is model:
        return cached[1]
    tracker = FieldTracker()
    calls: dict[str, int] = {}
    stack: list[tuple] = []  # the calls in progress: (layer, parent, input, its version, input jump)
    records: list[tuple] = []
    handles = []

    def pre(name):
        def fn(module, args):
            with torch._C.DisableTorchFunction():
                k = calls[name] = calls.get(name, 0) + 1
                x = args[0] if args and isinstance(args[0], torch.Tensor) else None
                e = tracker.entry(x)
                f = e and (e.exact and e.exact.field or isinstance(e.local, Geom) and e.local.field)
                stack.append((call_name(name, k), stack[-1][0] if stack else None, x,
                              x._version if x is not None else None, (f.jump_y, f.jump_x) if f else None))
        return fn

    def post(name):
        def fn(module, args, output=None):
            with torch._C.DisableTorchFunction():
                layer, parent, x, version, jump = stack.pop()
                out = output[0] if isinstance(output, (tuple, list)) and output else output
                if isinstance(out, torch.Tensor):  # geometry and shape now: later in-place ops change them
                    alias = out is x and out._version == version  # (an in-place ReLU returns x changed)
                    records.append((layer, type(module).__name__, parent, jump, alias, tuple(out.shape),
                                    out.numel(), tracker.entry(out)))
        return fn

    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()  # the probing pass must not update batch-norm statistics or draw dropout masks
        for name, module in model.named_modules():
            if name:
                handles.append(module.register_forward_pre_hook(pre(name)))
                handles.append(module.register_forward_hook(post(name), always_call=True))
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
    infos = [_info(n, *r, size) for n, r in enumerate(records)]
    declared = getattr(model, "feature_layers", None)
    defaults, skipped = _default_layers(infos)
    if skipped and not declared:
        print(f"zfnet: default feature layers: skipped {', '.join(skipped)} (no receptive field, exact or "
              f"local)", file=sys.stderr)
    table = LayerTable(infos, size, list(declared) if declared else defaults)
    _TABLE_CACHE[key] = (weakref.ref(model), table)
    return table


_LABELS = {"": "C", "h": "H", "w": "W", "hw": "L"}


def _info(index, layer, kind, parent, jump, alias, shape, numel, entry, size) -> LayerInfo:
    exact = entry.exact if entry else None
    local = entry.local if entry and isinstance(entry.local, Geom) else None
    g = exact or local
    if g is not None and set(g.axes) & {"h", "w", "hw"}:
        h, w = len(g.rows), len(g.cols)
        c, layout = numel // (h * w), "".join(_LABELS[a] for a in g.axes[1:])
    elif len(shape) == 4:
        (c, h, w), layout = shape[1:], "CHW"
    else:
        c, h, w, layout = (shape[-1] if shape else 1), 1, 1, "C" * (len(shape) - 1)
    return LayerInfo(layer, kind, index, int(c), int(h), int(w), exact.field if exact else None, size,
                     exact.rows if exact else None, exact.cols if exact else None,
                     local.field if local else None, local.rows if local else None, local.cols if local else None,
                     layout, parent, bool(entry and entry.rectified), jump, alias)


def _default_layers(infos: list[LayerInfo]) -> tuple[list[str], list[str]]:
    """The outputs of a network's blocks and stages, spread over its whole depth: (layers, skipped).

    Walk the calls from the model down. A call whose maps go more than one stride-2 step past its input
    (the model itself, a wrapped backbone, `features`, a trunk of stages) is opened into its calls.
    Otherwise a call is a default layer if it outputs a spatial map and is a block (it runs calls that
    run calls of their own: a residual block, an inception module, a stage) or its output is rectified
    (a ReLU module, a conv-norm-activation unit, a Fire module's concatenation). Layers with no
    receptive field, exact or local, are skipped.
    """
    kids = defaultdict(list)
    for i in infos:
        kids[i.parent].append(i)
    chosen, skipped = [], []

    def jump(i):  # the largest stride of the call's output and of every map inside it
        f = i.field or i.local_field
        own = (f.jump_y, f.jump_x) if f else (0, 0)
        inner = [jump(c) for c in kids[i.name]]
        return max([own] + inner)

    def visit(parent):
        for i in kids[parent]:
            if kids[i.name] and i.input_jump and max(a / b for a, b in zip(jump(i), i.input_jump)) >= 4:
                visit(i.name)
            elif i.height * i.width > 1 and not i.alias and (i.rectified or any(kids[c.name] for c in kids[i.name])):
                (chosen if i.field or i.local_field else skipped).append(i.name)

    visit(None)
    if not chosen and not skipped:
        chosen = [i.name for i in infos if i.kind == "Conv2d"]
    return chosen, skipped


def feature_layers(model: nn.Module, table: LayerTable | None = None) -> list[str]:
    """The default feature layers, shallow to deep: the paper's "layer 1..5 feature maps".

    Our models declare them (`model.feature_layers`: the rectified conv outputs); for any other model,
    the outputs of its blocks or stages that produce spatial maps, spread over the whole depth (the
    rule: `_default_layers`): ResNet's stem and 4 stages, EfficientNet's `features.0..8`, ConvNeXt's 4
    stages, VGG's ReLUs.
    """
    declared = getattr(model, "feature_layers", None)
    if declared:
        return list(declared)
    return list((table or layer_table(model)).defaults)


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


