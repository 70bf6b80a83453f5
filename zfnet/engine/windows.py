"""Windows of changed units on top of clean maps: the data structure of incremental occlusion.

Per occluder position, a node of the model's graph carries only a window of its map (the units the
occluder can change), stored channels last as (B, h, w, K) with its top row and left column per position,
K = every non-spatial dimension of the value flattened (channels for NCHW and NHWC maps, groups x channels
inside a channel shuffle). The clean map is kept pixel-major, (H*W, K), followed by a row of zeros, a row
of -inf (padding) and room for a batch's windows, so that a crop of the map with each position's window
pasted in is one row gather.
"""

from __future__ import annotations

import torch

__all__ = ["to_op", "from_op", "MapBuffer"]


def _perm(rank: int, layout: tuple) -> list[int]:
    """Dimensions of the (B, h, w, *rest) form in the order of the op's layout."""
    rest = [d for d in range(1, rank) if d not in layout]
    return [0 if d == 0 else 1 if d == layout[0] else 2 if d == layout[1] else 3 + rest.index(d) for d in range(rank)]


def to_op(win: torch.Tensor, shape: tuple, layout: tuple) -> torch.Tensor:
    """A (B, h, w, K) window in the layout the op sees: `shape` is the node's clean shape, `layout` its
    (row axis, column axis)."""
    if layout == (2, 3) and len(shape) == 4:
        return win.permute(0, 3, 1, 2)
    rest = [n for d, n in enumerate(shape) if d and d not in layout]
    return win.reshape(*win.shape[:3], *rest).permute(*_perm(len(shape), layout))


def from_op(t: torch.Tensor, layout: tuple) -> torch.Tensor:
    """The inverse of to_op: (B, h, w, K) from a value in the op's layout."""
    if layout == (2, 3) and t.dim() == 4:
        return t.permute(0, 2, 3, 1)
    order = [0, layout[0], layout[1]] + [d for d in range(1, t.dim()) if d not in layout]
    t = t.permute(*order)
    return t.reshape(*t.shape[:3], -1)


class MapBuffer:
    """One node's clean map, pixel-major, with padding rows and room for a batch's windows."""

    def __init__(self, clean: torch.Tensor, layout: tuple):
        v = from_op(clean, layout)[0]  # (H, W, K)
        self.H, self.W, self.K = v.shape
        n = self.H * self.W
        self.rows = torch.empty(n + 2, self.K, dtype=clean.dtype, device=clean.device)
        self.rows[:n] = v.reshape(n, self.K)
        self.rows[n], self.rows[n + 1] = 0.0, float("-inf")
        self._table = None

    def flat(self) -> torch.Tensor:
        return self.rows[:self.H * self.W]

    def source(self, win: torch.Tensor) -> torch.Tensor:
        """The buffer with the windows of this batch copied in behind the clean rows and padding."""
        rows = win.reshape(-1, self.K)
        n = self.H * self.W + 2
        if len(self.rows) < n + len(rows):
            grown = torch.empty(n + len(rows), self.K, dtype=self.rows.dtype, device=self.rows.device)
            grown[:n] = self.rows[:n]
            self.rows = grown
        self.rows[n:n + len(rows)] = rows
        return self.rows

    def gather(self, state, r0, c0, h: int, w: int, pad: float = 0.0, sel=None, src=None) -> torch.Tensor:
        """(B, h, w, K) crops at rows r0.., cols c0.. of the map: clean values, each position's window
        pasted in, `pad` (0 or -inf) outside the map. sel: the positions (default all); src: the buffer
        with this batch's windows already in (see source)."""
        _, win, wy, wx = state
        HW, H, W = self.H * self.W, self.H, self.W
        B, nh, nw = win.shape[:3]
        dev = self.rows.device
        sel = torch.arange(B, device=dev) if sel is None else sel
        src = self.source(win) if src is None else src
        ar = torch.arange(max(h, w), device=dev)
        gy, gx = r0[:, None] + ar[:h], c0[:, None] + ar[:w]  # (B, h), (B, w) map rows / cols
        ly, lx = gy - wy[sel, None], gx - wx[sel, None]  # the same inside each window
        in_win = ((ly >= 0) & (ly < nh))[:, :, None] & ((lx >= 0) & (lx < nw))[:, None, :]
        in_map = ((gy >= 0) & (gy < H))[:, :, None] & ((gx >= 0) & (gx < W))[:, None, :]
        widx = HW + 2 + (sel[:, None, None] * nh + ly.clamp(0, nh - 1)[:, :, None]) * nw \
            + lx.clamp(0, nw - 1)[:, None, :]
        cidx = gy.clamp(0, H - 1)[:, :, None] * W + gx.clamp(0, W - 1)[:, None, :]
        idx = torch.where(in_win, widx, torch.where(in_map, cidx, HW + (pad != 0.0)))
        return src.index_select(0, idx.reshape(-1)).view(len(sel), h, w, self.K)

    def full(self, state) -> torch.Tensor:
        """(B, H, W, K): the whole map of every position."""
        zero = torch.zeros(len(state[1]), dtype=torch.long, device=self.rows.device)
        return self.gather(state, zero, zero, self.H, self.W)

    def sums(self, state) -> torch.Tensor:
        """(B, K) totals of the map: clean total - clean window + new window, the clean window's total read
        from a summed-area table of the clean map (four lookups, in float64)."""
        _, win, wy, wx = state
        if self._table is None:
            t = torch.zeros(self.H + 1, self.W + 1, self.K, dtype=torch.float64, device=win.device)
            t[1:, 1:] = self.flat().view(self.H, self.W, -1).double().cumsum(0).cumsum(1)
            self._table = t
        t = self._table
        y1, x1 = wy + win.shape[1], wx + win.shape[2]
        inside = t[y1, x1] - t[wy, x1] - t[y1, wx] + t[wy, wx]
        return (t[self.H, self.W] - inside).to(win.dtype) + win.sum((1, 2))

    def at(self, state, y: int, x: int) -> torch.Tensor:
        """(B, K) values at one position of the map."""
        _, win, wy, wx = state
        ly, lx = y - wy, x - wx
        inside = (ly >= 0) & (ly < win.shape[1]) & (lx >= 0) & (lx < win.shape[2])
        b = torch.arange(len(win), device=win.device)
        got = win[b, ly.clamp(0, win.shape[1] - 1), lx.clamp(0, win.shape[2] - 1)]
        return torch.where(inside[:, None], got, self.rows[y * self.W + x][None])
