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
  * everything else the crop removes, or adds as zeros to reach a common shape, lies outside [r0, r1).
This holds for ops that act on a sliding window or pointwise (conv, pools, pads, ReLU-likes, batch norm
in eval, LRN, concatenation, sums); a model that runs anything else before the unit's layer (adaptive
pooling, interpolation, reshapes, global means...) is not cropped. Tests check cropped == uncropped on
borders, corners and ceil-mode pools.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

from ..inspect.layers import LayerTable, Unit, run_with_taps

__all__ = ["Crop", "plan_crop", "croppable"]

_WORTH = 0.7  # crop only when it keeps less than this fraction of the image's pixels


@dataclass(frozen=True)
class Crop:
    """Input box [oy, oy + hc) x [ox, ox + wc) (may reach past the image: zeros there); the unit's grid
    shift (dy, dx) in its own layer's positions."""

    oy: int
    ox: int
    hc: int
    wc: int
    dy: int
    dx: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.hc, self.wc

    def paste(self, h: int, w: int):
        """((y0, y1, x0, x1) in the image, (a0, a1, b0, b1) in the crop): the part they share."""
        y0, y1 = max(0, self.oy), min(h, self.oy + self.hc)
        x0, x1 = max(0, self.ox), min(w, self.ox + self.wc)
        return (y0, y1, x0, x1), (y0 - self.oy, y1 - self.oy, x0 - self.ox, x1 - self.ox)


def _span(r0: int, size: int, jump: int, n: int) -> tuple[int, int]:
    """(offset, length) of the crop along one axis; lengths take few values so crops batch together."""
    r1 = r0 + size
    if r0 < 0 and r1 > n:
        o, length = 0, n  # the field covers both borders
    elif r0 < 0:
        o, length = 0, min(size, n)  # keep the real left border; the rest is outside the field
    elif r1 > n:
        o = ((n - size + 1) // jump) * jump  # keep the real right border; start aligned, <= r0
        length = n - o
    else:
        o, length = (r0 // jump) * jump, size + jump - 1
    return (0, n) if length >= n and o <= 0 else (o, length)


def plan_crop(model: nn.Module, table: LayerTable, unit: Unit, size: tuple[int, int],
              in_channels: int = 3) -> Crop | None:
    """The crop for a single activation, or None (compute on the whole image)."""
    if unit.y is None:
        return None
    f = table[unit.layer].field
    if f is None or not croppable(model, unit.layer, size, in_channels):
        return None
    h, w = size
    oy, hc = _span(f.start_y + unit.y * f.jump_y, f.size_y, f.jump_y, h)
    ox, wc = _span(f.start_x + unit.x * f.jump_x, f.size_x, f.jump_x, w)
    if hc * wc >= _WORTH * h * w:
        return None  # barely smaller (or larger, with zeros): the whole image batches with the others
    return Crop(oy, ox, hc, wc, oy // f.jump_y, ox // f.jump_x)


# Ops that act on a sliding window or pointwise, keeping the grid: what the exactness argument covers.
_LOCAL_OPS = {
    "conv2d", "max_pool2d", "avg_pool2d", "max_pool2d_with_indices", "pad", "batch_norm", "local_response_norm",
    "relu", "relu_", "relu6", "hardtanh", "hardtanh_", "leaky_relu", "leaky_relu_", "elu", "elu_", "gelu",
    "silu", "sigmoid", "tanh", "hardswish", "hardsigmoid", "threshold", "dropout", "cat", "add", "add_",
    "__add__", "__iadd__", "sub", "__sub__", "mul", "__mul__", "clone", "contiguous",
    # shape queries
    "__get__", "dim", "size", "is_contiguous", "is_floating_point", "numel", "detach", "zeros", "ones", "empty",
}


class _OpRecorder(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.bad: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        if name not in _LOCAL_OPS:
            self.bad.add(name)
        elif name == "cat" and (kwargs.get("dim", args[1] if len(args) > 1 else 0) % 4) in (2, 3):
            self.bad.add("cat along a spatial axis")
        elif name == "batch_norm" and kwargs.get("training", False):
            self.bad.add("batch_norm in training mode")
        return func(*args, **kwargs)


_CROPPABLE: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def croppable(model: nn.Module, layer: str, size: tuple[int, int], in_channels: int = 3) -> bool:
    """Whether everything the model runs up to `layer` is local (one probing forward, cached)."""
    cache = _CROPPABLE.setdefault(model, {})
    key = (layer, tuple(size), in_channels)
    if key not in cache:
        p = next(model.parameters(), None)
        x = torch.zeros(1, in_channels, *size, device=p.device if p is not None else "cpu",
                        dtype=p.dtype if p is not None and p.is_floating_point() else torch.float32)
        rec = _OpRecorder()
        with torch.no_grad(), rec:
            run_with_taps(model, x, [layer], stop=True)
        cache[key] = not rec.bad
    return cache[key]
