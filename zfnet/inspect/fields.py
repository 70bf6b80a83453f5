"""Receptive fields: where each unit of a layer looks in the input, tracked through one forward pass.

A TorchFunctionMode follows every tensor of a forward pass (module and functional calls alike) and
derives, per tensor, its Field (jump = stride in input pixels, receptive-field size, start offset of unit
0) and the exact input rows / columns each output row / column sees. The exact spans matter: at borders
(padding inside the network, dilation gaps, ceil-mode pooling) units see less than the affine formula
says. zfnet.inspect.layers turns this into the layer table.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["Field", "Geom", "FieldTracker", "arg", "pair"]


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


def pair(v) -> tuple:
    if isinstance(v, (tuple, list)):
        return (int(v[0]), int(v[1])) if len(v) > 1 else (int(v[0]), int(v[0]))
    return (int(v), int(v))


def arg(args, kwargs, i, name, default):
    """Argument i of an intercepted torch call, positional or by keyword."""
    return args[i] if len(args) > i else kwargs.get(name, default)


@dataclass(frozen=True)
class Geom:
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


class FieldTracker(TorchFunctionMode):
    """Propagates geometry along every tensor of one forward pass (functional calls included)."""

    _WINDOW_OPS = {"conv2d", "max_pool2d", "_max_pool2d", "max_pool2d_with_indices", "avg_pool2d"}

    def __init__(self):
        super().__init__()
        self.geoms: dict[int, tuple[torch.Tensor, Geom | None]] = {}  # id -> (tensor kept alive, geometry)

    def geom_of(self, t) -> Geom | None | bool:
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
                w = arg(args, kwargs, 1, "weight", None)
                k = tuple(w.shape[-2:])
                s = pair(arg(args, kwargs, 3, "stride", 1))
                pad = arg(args, kwargs, 4, "padding", 0)
                d = pair(arg(args, kwargs, 5, "dilation", 1))
                if pad == "valid":
                    pad = 0
                if pad == "same":  # PyTorch puts the odd pixel of 'same' padding at the end
                    pad = tuple((d[i] * (k[i] - 1)) // 2 for i in range(2))
                p = pair(pad)
            else:
                k = pair(arg(args, kwargs, 1, "kernel_size", 1))
                s = arg(args, kwargs, 2, "stride", None)
                s = k if s is None or s == [] or s == () else pair(s)
                p = pair(arg(args, kwargs, 3, "padding", 0))
                d = pair(arg(args, kwargs, 4, "dilation", 1)) if "max" in name else (1, 1)
            geom = Geom(gx.field.pooled(k, s, p, d) if gx.field else None,
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
            geom = Geom(field, _adaptive(gx.rows, oh), _adaptive(gx.cols, ow))
        elif name == "pad" and gx:
            pads = list(arg(args, kwargs, 1, "pad", ())) + [0, 0, 0, 0]
            f = gx.field
            field = f and Field(f.jump_y, f.jump_x, f.size_y, f.size_x,
                                f.start_y - pads[2] * f.jump_y, f.start_x - pads[0] * f.jump_x)
            geom = Geom(field, _slide(gx.rows, first.shape[-2], 1, 1, pads[2]),
                         _slide(gx.cols, first.shape[-1], 1, 1, pads[0]))
        else:
            shape = tuple(first.shape[-2:])
            same = [g for g, t in zip((self.geom_of(t) for t in inputs), inputs)
                    if g and t.dim() == 4 and tuple(t.shape[-2:]) == shape]
            if same and len(same) == len(known):  # elementwise / concat on one grid: union of the branches
                geom = same[0]
                for g in same[1:]:
                    field = geom.field.union(g.field) if geom.field and g.field else None
                    geom = Geom(field, _union_spans(geom.rows, g.rows), _union_spans(geom.cols, g.cols))
            # else: an op we do not model changed the grid: every unit may see everything (conservative)
        for o in outs:
            if isinstance(o, torch.Tensor):
                self.set(o, geom)
        return out
