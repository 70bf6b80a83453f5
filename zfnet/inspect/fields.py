"""Receptive fields (Sec. 2.1, 4): where each unit of a layer looks in the input.

A Field is the affine answer (jump = stride in input pixels, receptive-field size, start offset of unit 0);
a Geom adds, per row and column of a map, the exact inclusive input interval it depends on (at borders,
padding inside the network, dilation gaps and ceil-mode pooling make units see less than the affine
formula says), and which tensor dimensions hold the map's rows and columns, since modern networks move
their maps around (permute to channels-last and back, view + transpose for a channel shuffle, flatten to
tokens, chunk / split). The functions below say how each kind of op changes a Geom; None means the op is
not followed (every unit may see everything). zfnet.inspect.tracker applies them along one forward pass.

Ops that mix all positions (global pooling, squeeze-and-excitation gates, group / instance norm
statistics) get two answers: the exact geometry (every unit sees what the whole map sees) and the
*local* geometry: the path that carries position, with gates and normalisation statistics treated as
constants (the part of the image a unit's value is about). A tensor with no such path (the gate itself)
has the local answer GLOBAL.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

__all__ = ["Field", "Geom", "GLOBAL", "arg", "pair"]


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

    def shifted(self, dy: int, dx: int, sy: int = 1, sx: int = 1) -> "Field":
        """The field of the sub-grid of positions dy, dy + sy, ... (rows) and dx, dx + sx, ... (columns)."""
        return Field(self.jump_y * sy, self.jump_x * sx, self.size_y, self.size_x,
                     self.start_y + dy * self.jump_y, self.start_x + dx * self.jump_x)


def pair(v) -> tuple:
    if isinstance(v, (tuple, list)):
        return (int(v[0]), int(v[1])) if len(v) > 1 else (int(v[0]), int(v[0]))
    return (int(v), int(v))


def arg(args, kwargs, i, name, default):
    """Argument i of an intercepted torch call, positional or by keyword."""
    return args[i] if len(args) > i else kwargs.get(name, default)


@dataclass(frozen=True)
class Geom:
    """What the tracker attaches to a tensor: the affine Field (None if not affine), per row and column of
    the map the exact inclusive input interval it depends on, and per tensor dimension whether it holds
    the rows ("h"), the columns ("w"), both flattened row-major ("hw") or neither (""). Without a row
    axis (a vector; rows reduced away) there is one row span that every element sees; same for columns.
    Exact boxes matter at borders: a window that reaches into the padding of an intermediate layer sees
    less of the image than the affine formula says."""

    field: Field | None
    rows: tuple  # ((lo, hi), ...) one per row of the map, inclusive input rows
    cols: tuple
    axes: tuple = ("", "", "h", "w")


class _Global:
    def __repr__(self):
        return "GLOBAL"


GLOBAL = _Global()  # the local geometry of a tensor with no path that carries position (a pooled gate)


def hull(spans: tuple) -> tuple[int, int]:
    return min(s[0] for s in spans), max(s[1] for s in spans)


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
        taps = spans[lo:hi + 1:d]  # (not monotone after reflect / circular padding)
        out.append((min(t[0] for t in taps), max(t[1] for t in taps)))
    return tuple(out)


def _adaptive(spans: tuple, n_out: int) -> tuple:
    """Adaptive pooling's bins: floor(i * n / n_out) to ceil((i + 1) * n / n_out)."""
    n = len(spans)
    return tuple(hull(spans[(i * n) // n_out:-(-(i + 1) * n // n_out)]) for i in range(n_out))


def _padded(spans: tuple, before: int, n_out: int, mode: str) -> tuple:
    """Spans after padding one axis: zeros see nothing (the nearest real row stands in, as for conv
    padding); reflect / replicate / circular positions read one real position each."""
    if mode == "constant":
        return _slide(spans, n_out, 1, 1, before)
    n, out = len(spans), []
    for i in range(n_out):
        j = i - before
        if mode == "reflect":
            j = -j if j < 0 else (2 * (n - 1) - j if j > n - 1 else j)
        elif mode == "replicate":
            j = min(max(j, 0), n - 1)
        else:  # circular
            j %= n
        out.append(spans[j])
    return tuple(out)


# ----------------------------------------------------------------------------------------------------
# Rules: how each kind of op moves geometry. A rule maps a Geom to a Geom, or to None where the op is not
# followed (then every unit may see everything).
def window(g: Geom, n_out: tuple, k: tuple, s: tuple, p: tuple, d: tuple) -> Geom | None:
    if g.axes[-2:] != ("h", "w"):
        return None
    return Geom(g.field.pooled(k, s, p, d) if g.field else None, _slide(g.rows, n_out[0], k[0], s[0], p[0], d[0]),
                _slide(g.cols, n_out[1], k[1], s[1], p[1], d[1]), g.axes)


def spatial(g: Geom, dims) -> bool:
    """Whether the dimensions `dims` hold more than one position of the map."""
    return any((g.axes[d] == "h" and len(g.rows) > 1) or (g.axes[d] == "w" and len(g.cols) > 1)
               or g.axes[d] == "hw" for d in dims)


def mix(g: Geom, dims, collapse: bool, drop: bool = False, relabel: bool = False) -> Geom:
    """Every element depends on all positions along `dims`. collapse: one position is left along them (a
    reduction); drop: they are removed (no keepdim); relabel: they hold something else now (a linear map
    over them)."""
    labels = {g.axes[d] for d in dims}
    rows, cols = g.rows, g.cols
    if labels & {"h", "hw"}:
        rows = (hull(rows),) * (1 if collapse else len(rows))
    if labels & {"w", "hw"}:
        cols = (hull(cols),) * (1 if collapse else len(cols))
    axes = g.axes
    if relabel or collapse and "hw" in labels:
        axes = tuple("" if i in dims else a for i, a in enumerate(axes))
    if drop:
        axes = tuple(a for i, a in enumerate(axes) if i not in dims)
    return Geom(g.field if not spatial(g, dims) else None, rows, cols, axes)


def reshape(g: Geom, old: tuple, new: tuple) -> Geom:
    """view / reshape / flatten / squeeze / unsqueeze: the element order stays row-major, so dimensions
    correspond in groups of equal products. A group keeps its label if it holds one axis (or rows and
    columns merged into one "hw" dimension, or split back); an axis merged with anything else loses its
    positions (every element then sees what the whole map sees)."""
    axes: list[str] = []
    i = j = 0
    while i < len(old) or j < len(new):
        i0, j0, a, b = i, j, 1, 1
        if i < len(old):
            a, i = old[i], i + 1
        if j < len(new):
            b, j = new[j], j + 1
        while a != b:
            if a < b and i < len(old):
                a, i = a * old[i], i + 1
            else:
                b, j = b * new[j], j + 1
        labels = [g.axes[k] or "c" for k in range(i0, i) if old[k] > 1]
        big = [k - j0 for k in range(j0, j) if new[k] > 1]
        group = [""] * (j - j0)
        if labels == ["h", "w"] and len(big) == 1:
            group[big[0]] = "hw"
        elif labels == ["hw"] and [new[j0 + k] for k in big] == [len(g.rows), len(g.cols)]:
            group[big[0]], group[big[1]] = "h", "w"
        elif labels in (["h"], ["w"], ["hw"]) and len(big) == 1:
            group[big[0]] = labels[0]
        elif set(labels) - {"c"}:  # positions merged with channels (a flatten before a linear layer)
            return Geom(None, (hull(g.rows),), (hull(g.cols),), ("",) * len(new))
        axes += group
    return Geom(g.field, g.rows, g.cols, tuple(axes))


def take(g: Geom, dim: int, start: int, stop: int, step: int = 1, keep: bool = True) -> Geom | None:
    """Positions start:stop:step along dimension dim (keep=False: one position, the dimension removed)."""
    label = g.axes[dim]
    axes = g.axes if keep else g.axes[:dim] + g.axes[dim + 1:]
    if label == "hw":
        whole = (start, stop, step) == (0, len(g.rows) * len(g.cols), 1)
        return replace(g, axes=axes) if whole and keep else None
    if label == "h":
        return Geom(g.field and g.field.shifted(start, 0, step, 1), g.rows[start:stop:step], g.cols, axes)
    if label == "w":
        return Geom(g.field and g.field.shifted(0, start, 1, step), g.rows, g.cols[start:stop:step], axes)
    return replace(g, axes=axes)


def index(g: Geom, shape: tuple, index) -> Geom | None:
    """Basic indexing x[...]: ints, slices, None and Ellipsis (advanced indexing is not followed)."""
    index = index if isinstance(index, tuple) else (index,)
    if any(isinstance(i, bool) or not (i is None or i is Ellipsis or isinstance(i, (int, slice))) for i in index):
        return None
    used = sum(1 for i in index if i is not None and i is not Ellipsis)
    if Ellipsis in index:
        k = index.index(Ellipsis)
        index = index[:k] + (slice(None),) * (len(shape) - used) + index[k + 1:]
    index = index + (slice(None),) * (len(shape) - sum(1 for i in index if i is not None))
    src = dst = 0
    for i in index:
        if i is None:
            g = replace(g, axes=g.axes[:dst] + ("",) + g.axes[dst:])
            dst += 1
            continue
        if isinstance(i, int):
            i %= shape[src]
            g = take(g, dst, i, i + 1, keep=False)
        else:
            g = take(g, dst, *i.indices(shape[src]))
            dst += 1
        src += 1
        if g is None:
            return None
    return g


def combine(geoms: list, ndim: int) -> Geom | None:
    """Elementwise ops and channel concatenations: each output element sees what the inputs' elements at
    its position see. Inputs are aligned to the right (broadcasting); one that is broadcast over the rows
    or columns (a gate of size 1 there) adds its whole span to every position."""
    if any(len(g.axes) > ndim for g in geoms):
        return None
    geoms = [replace(g, axes=("",) * (ndim - len(g.axes)) + g.axes) for g in geoms]
    R, C = max(len(g.rows) for g in geoms), max(len(g.cols) for g in geoms)
    if any(len(g.rows) not in (1, R) or len(g.cols) not in (1, C) for g in geoms):
        return None
    axes = [""] * ndim
    for g in geoms:
        for d, a in enumerate(g.axes):
            counts = (a == "h" and len(g.rows) == R > 1) or (a == "w" and len(g.cols) == C > 1) or a == "hw"
            if counts and axes[d] not in ("", a):
                return None
            if counts:
                axes[d] = a
    if (R > 1 and not {"h", "hw"} & set(axes)) or (C > 1 and not {"w", "hw"} & set(axes)) \
            or sum(a in ("h", "hw") for a in axes) > 1 or sum(a in ("w", "hw") for a in axes) > 1:
        return None
    rows = tuple(hull([g.rows[i if len(g.rows) > 1 else 0] for g in geoms]) for i in range(R))
    cols = tuple(hull([g.cols[i if len(g.cols) > 1 else 0] for g in geoms]) for i in range(C))
    field = None  # a branch broadcast over positions (a gate) makes the field irregular
    if all(g.field is not None and (len(g.rows), len(g.cols)) == (R, C) for g in geoms):
        field = geoms[0].field
        for g in geoms[1:]:
            field = field.union(g.field)
    return Geom(field, rows, cols, tuple(axes))


def spread(g: Geom, ndim: int) -> Geom:
    """g's whole span, seen by every element of an ndim tensor (a value written anywhere into it)."""
    return Geom(None, (hull(g.rows),), (hull(g.cols),), ("",) * ndim)


def combine_local(locals_: list, ndim: int):
    """The local answer of an elementwise op: inputs without a local path (gates) count as constants."""
    if any(v is None for v in locals_):
        return None
    geoms = [v for v in locals_ if isinstance(v, Geom)]
    return combine(geoms, ndim) if geoms else GLOBAL


def fits(g, t: torch.Tensor) -> bool:
    """A guard on every rule: the labelled dimensions have as many positions as the spans."""
    if not isinstance(g, Geom):
        return False
    if len(g.axes) != t.dim():
        return False
    for d, a in enumerate(g.axes):
        if (a == "h" and t.shape[d] != len(g.rows)) or (a == "w" and t.shape[d] != len(g.cols)) \
                or (a == "hw" and t.shape[d] != len(g.rows) * len(g.cols)):
            return False
    return (len(g.rows) == 1 or "h" in g.axes or "hw" in g.axes) and (len(g.cols) == 1 or "w" in g.axes
                                                                    or "hw" in g.axes)


def adaptive_pool(g: Geom, size: tuple, out: tuple) -> Geom | None:
    if g.axes[-2:] != ("h", "w"):
        return None
    (h, w), (oh, ow) = size, out
    field = None  # 1x1 output = global; irregular bins: exact boxes only
    if g.field and (h, w) == (oh, ow):
        field = g.field
    elif g.field and h % oh == 0 and w % ow == 0 and (oh, ow) != (1, 1):
        field = g.field.pooled((h // oh, w // ow), (h // oh, w // ow), (0, 0))
    return Geom(field, _adaptive(g.rows, oh), _adaptive(g.cols, ow), g.axes)


def pad(g: Geom, ndim: int, pads: list, mode: str) -> Geom | None:
    """F.pad: pairs (before, after) from the last dimension backwards."""
    rows, cols, f = g.rows, g.cols, g.field
    for i in range(0, len(pads) - 1, 2):
        before, after = int(pads[i]), int(pads[i + 1])
        label = g.axes[ndim - 1 - i // 2]
        if not (before or after) or label == "":
            continue
        if label == "hw":
            return None
        if mode == "circular":
            f = None  # a border position reads the far side of the map: no affine box holds
        # (reflect / replicate read real positions next to the border: the affine field stays the interior
        # formula and the exact spans hold the borders)
        if label == "h":
            rows = _padded(rows, before, len(rows) + before + after, mode)
            f = f and f.shifted(-before, 0)
        else:
            cols = _padded(cols, before, len(cols) + before + after, mode)
            f = f and f.shifted(0, -before)
    return Geom(f, rows, cols, g.axes)


def join(geoms: list, label: str) -> Geom:
    """Concatenation along the rows (label "h") or the columns ("w"); the other axis is their union."""
    def across(spans):
        n = max(len(s) for s in spans)
        return tuple(hull([s[i if len(s) > 1 else 0] for s in spans]) for i in range(n))

    if label == "h":
        return Geom(None, tuple(s for g in geoms for s in g.rows), across([g.cols for g in geoms]), geoms[0].axes)
    return Geom(None, across([g.rows for g in geoms]), tuple(s for g in geoms for s in g.cols), geoms[0].axes)
