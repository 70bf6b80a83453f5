"""Receptive-field crops: compute one activation's projection on the part of the input it can see.

Exactness. Let the unit's field (from the layer table) be rows [r0, r1) with jump J. The crop starts at
a multiple of J, so every intermediate grid of the cropped network is the original grid shifted by a
whole number of positions, and the unit's dependency cone maps onto itself. Inside the cone, values are
equal, because:
  * a cone position in an intermediate layer's left padding implies r0 < 0 (the affine field counts
    padding), so we never crop a side where the field leaves the image: the network pads there exactly
    as before;
  * a cone position past an intermediate layer's last output (right padding, ceil-mode windows) implies
    r1 > n by the same induction over floor/ceil output sizes, so that side is never cropped either;
  * everything else the crop removes lies outside [r0, r1).
One rule for every caller (the atlas, the bench, `zfnet project`): per axis a crop takes one of three
lengths, the field size plus its start's offset from the grid for interior units (crop start rounded down
to the grid), the field size from the first border, and from a grid position before every field that
crosses the last border to that border; so the units of a layer batch in at most a few shapes, each
cropped about as close as exactness allows. Whether a layer is cropped weighs what a crop saves against what
sharing saves (`worth`): a cropped projection runs a forward and a backward pass on a fraction a of the
image; whole-image projections of a layer share each image's forward pass, so with `share` of them per
image each costs one backward plus 1 / share of a forward. With a backward pass costing B = 1.5 forward
passes, crop where a (1 + B) <= B + 1 / share, and never above a = 80 % (measured on the projection
bench: smaller batches and gathers cost the rest); cropping further inside the network, at intermediate
layers, did not pay on CPU.
This holds for ops that act on a sliding window or pointwise (conv, pools, pads, ReLU-likes, batch norm
in eval, LRN, concatenation, sums); a model that runs anything else on the image's data before the unit's
layer (adaptive pooling, interpolation, reshapes, global means, an SE gate...) is not cropped, and the
plan says why. Tests check cropped == uncropped at borders, corners and ceil-mode pools.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

from ..inspect.layers import LayerTable, Unit

__all__ = ["Axis", "CropPlan", "plan_crop", "worth", "croppable", "probe", "take"]

_WORTH = 0.8  # never crop where an interior unit's crop keeps more than this fraction of the image
# A projection's backward pass against its forward pass: 11.3 against 7.3 ms per row on SqueezeNet at 224 px
# (features.12, 2 CPU threads, channels last; the rectified signal, zero fills and max-pool routing cost
# more than their share of multiply-adds). With 1.0, the 1000-photo atlas computed features.11 whole at
# 5.6 projections per image in 108 s, against 93 s cropped.
_BACKWARD = 1.5


def worth(share: float = 1.0) -> float:
    """The largest fraction of the image an interior crop may keep for its layer to be cropped, when `share`
    projections of the layer come on each image (see the module docstring)."""
    return min(_WORTH, (_BACKWARD + 1 / max(share, 1.0)) / (1 + _BACKWARD))


# ----------------------------------------------------------------------------------------------------
# The probe: one forward pass that records which ops on the image's data run before each layer.
# Ops that act on a sliding window or pointwise, keeping the grid: what the exactness argument covers.
_LOCAL_OPS = {
    "conv2d", "max_pool2d", "avg_pool2d", "max_pool2d_with_indices", "pad", "batch_norm", "local_response_norm",
    "relu", "relu_", "relu6", "hardtanh", "hardtanh_", "leaky_relu", "leaky_relu_", "elu", "elu_", "gelu",
    "silu", "sigmoid", "tanh", "hardswish", "hardsigmoid", "threshold", "dropout", "cat", "add", "add_",
    "__add__", "__iadd__", "sub", "__sub__", "mul", "__mul__", "clone", "contiguous",
}
# Queries that read a tensor's shape, not its values.
_QUERIES = {"__get__", "dim", "size", "is_contiguous", "is_floating_point", "numel", "detach", "zeros", "ones",
            "empty"}


@dataclass
class Probe:
    """What one forward pass at the table's size ran: the ops on the image's data that are not local
    (op index, reason), per op the creation indices of the image-derived tensors it read, and per layer
    (module call) the op count when it returned and the creation index of its output."""

    bad: list = field(default_factory=list)  # (op index, reason)
    reads: list = field(default_factory=list)  # per op: creation indices of the input-derived tensors read
    layers: dict = field(default_factory=dict)  # layer name -> (op count at return, creation index of output)


class _Recorder(TorchFunctionMode):
    def __init__(self, x: torch.Tensor):
        super().__init__()
        self.probe = Probe()
        self.born: dict[int, tuple[torch.Tensor, int]] = {id(x): (x, -1)}  # id -> (kept alive, creation)

    def created(self, t) -> int | None:
        hit = self.born.get(id(t))
        return hit[1] if hit is not None and hit[0] is t else None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        i = len(self.probe.reads)
        flat = list(args) + list(kwargs.values())
        flat += [t for a in args if isinstance(a, (list, tuple)) for t in a]
        read = [c for c in (self.created(t) for t in flat if isinstance(t, torch.Tensor)) if c is not None]
        self.probe.reads.append(read if name not in _QUERIES else [])
        if read and name not in _LOCAL_OPS | _QUERIES:
            self.probe.bad.append((i, name))
        elif name == "cat" and (kwargs.get("dim", args[1] if len(args) > 1 else 0) % 4) in (2, 3):
            self.probe.bad.append((i, "cat along a spatial axis"))
        elif name == "batch_norm" and kwargs.get("training", args[5] if len(args) > 5 else False):
            self.probe.bad.append((i, "batch_norm in training mode"))
        out = func(*args, **kwargs)
        if read and name not in _QUERIES:
            for o in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(o, torch.Tensor) and self.created(o) is None:  # in place: keeps its birth
                    self.born[id(o)] = (o, i)
        return out


_PROBES: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def probe(model: nn.Module, size: tuple[int, int], in_channels: int = 3) -> Probe:
    """One recorded forward pass of a zero image (cached per model, size and channels); the model must be
    in the state it is projected in (eval)."""
    cache = _PROBES.setdefault(model, {})
    key = (tuple(size), in_channels)
    if key not in cache:
        p = next(model.parameters(), None)
        x = torch.zeros(1, in_channels, *size, device=p.device if p is not None else "cpu",
                        dtype=p.dtype if p is not None and p.is_floating_point() else torch.float32)
        rec = _Recorder(x)
        calls: dict[str, int] = {}

        def hook(name):
            def fn(module, args, output):
                out = output[0] if isinstance(output, (tuple, list)) else output
                k = calls[name] = calls.get(name, 0) + 1
                label = name if k == 1 else f"{name}#{k}"
                if isinstance(out, torch.Tensor):
                    rec.probe.layers[label] = (len(rec.probe.reads), rec.created(out))
            return fn

        handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n]
        try:
            with torch.no_grad(), rec:
                model(x)
        finally:
            for h in handles:
                h.remove()
        cache[key] = rec.probe
    return cache[key]


def _not_local(pr: Probe, layer: str) -> str | None:
    """Why the ops before `layer` are not all local (the first offending op), or None."""
    if layer not in pr.layers:
        return "the layer was not seen in the probing pass"
    end = pr.layers[layer][0]
    bad = [reason for i, reason in pr.bad if i < end]
    return f"{bad[0]} runs before it" if bad else None


def croppable(model: nn.Module, layer: str, size: tuple[int, int], in_channels: int = 3) -> bool:
    """Whether everything the model runs up to `layer` is local (one probing forward, cached)."""
    return _not_local(probe(model, size, in_channels), layer) is None


# ----------------------------------------------------------------------------------------------------
# The plan.
@dataclass(frozen=True)
class Axis:
    """One axis of a layer's crops: the unit's jump, the field start of unit 0 and its size (input
    pixels), and the image length."""

    jump: int
    start: int
    size: int
    n: int

    def span(self, pos: int) -> tuple[int, int]:
        """(start, length) of the crop of the unit at `pos`. Three lengths (a field over the first
        border, inside, over the last border; the whole axis where it covers both), so the units of a
        layer batch in a few shapes, each cropped about as close as exactness allows."""
        j, n, size = self.jump, self.n, self.size
        r0 = self.start + pos * j
        r1 = r0 + size
        if r0 < 0 and r1 > n:
            return 0, n
        if r0 < 0:
            return 0, min(size, n)  # keep the first border; nothing past the field's size reaches the unit
        if r1 > n:  # keep the last border, start on the grid at or before every such unit's field
            o = max(0, ((n - size + 1) // j) * j)
            return o, n - o
        o = (r0 // j) * j
        return o, size + self.start % j  # = r1 - o, the same for every interior unit

    @property
    def interior(self) -> int:
        return min(self.n, self.size + self.start % self.jump)


@dataclass(frozen=True)
class CropPlan:
    """How the single activations of one layer are computed: on crops (`axes` set) or on the whole
    image (`axes` None), and why."""

    layer: str
    axes: tuple[Axis, Axis] | None
    reason: str
    limited: bool = False  # not cropped because the model cannot be (not a choice of speed): callers say so

    @property
    def input_shape(self) -> tuple[int, int] | None:
        """The crop shape of an interior unit (None: not cropped)."""
        return (self.axes[0].interior, self.axes[1].interior) if self.axes else None

    def place(self, unit: Unit) -> tuple:
        """((oy, ly), (ox, lx)): the unit's crop of the input."""
        return self.axes[0].span(unit.y), self.axes[1].span(unit.x)

    def local(self, unit: Unit, box: tuple) -> Unit:
        """The unit's address inside its crop (the crop starts on the unit's grid)."""
        (oy, _), (ox, _) = box
        return Unit(unit.layer, unit.channel, unit.y - oy // self.axes[0].jump, unit.x - ox // self.axes[1].jump)


def plan_crop(model: nn.Module, table: LayerTable, layer: str | Unit, size: tuple[int, int] | None = None,
              in_channels: int = 3, share: float = 1.0) -> CropPlan:
    """The crop plan for single activations of `layer` (one per layer: every location shares it).

    Args:
        model, table: the model in its projection state (eval) and its layer table.
        layer: a layer name (or a Unit, for its layer).
        size: the input size (default: the table's).
        share: projections of the layer per image in the call (whole-image ones would share its forward).
    Returns: a CropPlan; `axes` is None where nothing is cropped, and `reason` says why.
    """
    layer = layer.layer if isinstance(layer, Unit) else layer
    h, w = tuple(size or table.input_size)
    f = table[layer].field
    why = _not_local(probe(model, (h, w), in_channels), layer)
    if why:
        return CropPlan(layer, None, f"not cropped: {why}", limited=True)
    if f is None:
        return CropPlan(layer, None, "not cropped: the layer has no local receptive field", limited=True)
    axes = (Axis(f.jump_y, f.start_y, f.size_y, h), Axis(f.jump_x, f.start_x, f.size_x, w))
    ly, lx = axes[0].interior, axes[1].interior
    keep, limit = ly * lx / (h * w), worth(share)
    if keep > _WORTH:
        return CropPlan(layer, None, f"not cropped: the receptive field ({f.size_y}x{f.size_x}) covers about the "
                                     f"whole {h}x{w} input; projections on one image share their forward pass")
    if keep > limit:  # a choice of speed, not a limit of the model
        return CropPlan(layer, None, f"whole image, cheaper here: a crop would keep {keep:.0%} of the {h}x{w} input "
                                     f"and {share:.1f} projections share each image's forward pass (crop at most "
                                     f"{limit:.0%})")
    return CropPlan(layer, axes, f"cropped to the receptive field: {ly}x{lx} of {h}x{w} for interior units")


# ----------------------------------------------------------------------------------------------------
def take(images: torch.Tensor, rows: list[int], boxes: list[tuple]) -> torch.Tensor:
    """Row b: images[rows[b]] cropped to boxes[b] = ((y0, ly), (x0, lx)) (inside the image; one shape)."""
    (_, ly), (_, lx) = boxes[0]
    out = images.new_empty((len(rows), images.shape[1], ly, lx))
    for b, (r, ((y0, _), (x0, _))) in enumerate(zip(rows, boxes)):
        out[b] = images[r, :, y0:y0 + ly, x0:x0 + lx]
    return out
