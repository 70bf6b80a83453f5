"""Exact incremental inference for many small changes of one image (the engine behind occlusion).

An occluder changes only the units whose receptive field it touches (Krypton, Nakandala et al., SIGMOD
2019). The model is traced by torch.fx into its graph of ops; the clean activation of every node is
computed once. For a batch of occluder positions each node then carries, per position, only a window of
its output (the changed units, padded to one shape per batch) on top of its clean map:

  * sliding windows (Conv2d, MaxPool2d, AvgPool2d): the affected output units follow from kernel, stride
    and padding; they are computed from an exact crop of the input (clean map + changed window, explicit
    padding outside the map) with the op's own weights and no padding, so no unit outside the window is
    computed and the arithmetic is the full computation's;
  * pointwise ops (activations, BatchNorm in eval, LocalResponseNorm across channels, dropout in eval,
    add / mul / cat of maps on one grid): applied to the union of their inputs' windows;
  * any other local module (one we only know from the layer table): run, padded as the model runs it, on
    a crop whose origin sits on its stride grid, and cut to the window;
  * global average pooling: clean total - clean window total (from a summed-area table) + window total;
  * everything else (flatten, linear, ops we do not know): the windows are pasted into the clean maps
    and the op runs on full maps, in the model's own memory layout, as does everything after it.

A window that would cover most of its map is computed on the full map instead (cheaper than gathering).
Positions are batched by the extent of their deepest window (zfnet.understanding.occlusion), so that little is padded.
Results equal naive recomputation to float rounding; the engine checks on the clean image that its
interpretation of the graph reproduces the model and declines (returns None) where it cannot follow.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn

from ..inspect.fields import Field
from ..inspect.layers import layer_table, taps
from .locality import Unsupported, call, classify, maybe_inplace, trace

__all__ = ["Incremental"]

THRESHOLD = 0.85  # a window covering this much of its map is cheaper computed on the full map


@dataclass
class _Node:
    fx: fx.Node
    kind: str  # "point" | "window" | "box" | "mean" | "global" | "meta"
    inputs: list[int]  # positions (in Incremental.nodes) of the input-dependent nodes it reads; -1: the image
    deps: list  # the same nodes, as fx nodes (the arguments a batch substitutes)
    axes: tuple | None = None  # window / box: ((k, s, p) rows, (k, s, p) cols); k counts dilation
    op: object = None  # window: the op on an exact, unpadded crop
    pad: float = 0.0  # window: value of the input outside the map
    many_users: bool = False  # its value is read by several nodes: consumers must not modify it in place


def _union(wins):
    """Per position, the smallest window (top, left, height, width) holding all of `wins` (same form)."""
    y0 = torch.stack([w[0] for w in wins]).min(0).values
    x0 = torch.stack([w[1] for w in wins]).min(0).values
    y1 = torch.stack([w[0] + w[2] for w in wins]).max(0).values
    x1 = torch.stack([w[1] + w[3] for w in wins]).max(0).values
    return y0, x0, y1 - y0, x1 - x0


def _affected(a, n, k, s, p, size):
    """Output units [u0, u1) whose input window [u*s - p, u*s - p + k) meets input rows [a, a + n)."""
    return (-((k - 1 - a - p) // s)).clamp(min=0), ((a + n - 1 + p) // s + 1).clamp(max=size)


class Incremental:
    """Clean activations of one image and the exact outputs for batches of occluder boxes."""

    @classmethod
    def build(cls, model: nn.Module, x: torch.Tensor, track: str | None = None) -> "Incremental | None":
        """The engine for image x (1, C, H, W), or None where the model's graph cannot be followed."""
        if any(m.training and isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd))
               for m in model.modules()):
            return None  # batch statistics and dropout masks tie each position to the rest of its batch
        graph = trace(model)
        if graph is None:
            return None
        try:
            with torch.no_grad():
                return cls(model, x, graph, track)
        except Exception:  # anything the interpretation cannot follow: full forward passes are always right
            return None

    def __init__(self, model, x, graph, track):
        nodes = list(graph.nodes)
        if sum(n.op == "placeholder" for n in nodes) != 1 or nodes[0].op != "placeholder":
            raise Unsupported
        self.model, self.x = model, x
        table = layer_table(model, tuple(x.shape[-2:]), x.shape[1])
        # channels last, the layout the batches run in (and much faster for pooling on CPU)
        env = {nodes[0]: x.clone(memory_format=torch.channels_last)}
        fields, index = {nodes[0]: Field(1, 1, 1, 1, 0, 0)}, {}
        self.nodes: list[_Node] = []
        self.clean: list[torch.Tensor] = []
        self.output = None
        for node in nodes[1:]:
            if node.op == "output":
                if not isinstance(node.args[0], fx.Node) or node.args[0] not in index:
                    raise Unsupported
                self.output = index[node.args[0]]
                break
            deps = [a for a in node.all_input_nodes if a in index or a is nodes[0]]
            # Clean values are kept: an in-place op must not overwrite the stored copy of its input.
            get = (lambda n: env[n].clone() if isinstance(env[n], torch.Tensor) else env[n]) \
                if maybe_inplace(model, node) else env.__getitem__
            env[node] = call(model, node, fx.node.map_arg(node.args, get), fx.node.map_arg(node.kwargs, get))
            if not deps:
                continue  # a constant: its clean value serves every position
            kind, extra = classify(model, node, env, deps, fields, table)
            index[node] = len(self.nodes)
            self.nodes.append(_Node(node, kind, [-1 if d.op == "placeholder" else index[d] for d in deps], deps,
                                    **extra))
            self.clean.append(env[node])
        if self.output is None:
            raise Unsupported
        with torch.no_grad(), taps(model, [track] if track is not None else []) as tapped:
            ref = model(x.clone(memory_format=torch.channels_last))  # the model itself, same layout
        got = self.clean[self.output]
        if not isinstance(ref, torch.Tensor) or got.shape != ref.shape or not torch.allclose(
                got, ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max())):
            raise Unsupported  # e.g. an in-place op on a tensor another op reads later
        self.constants = {k: v for k, v in env.items() if k not in index and k is not nodes[0]}
        for n in self.nodes:
            n.many_users = sum(u in index for u in n.fx.users) > 1
        self.input_many_users = sum(u in index for u in nodes[0].users) > 1
        self.last_use = {i: i for i in range(len(self.nodes))}
        for j, n in enumerate(self.nodes):
            for i in n.inputs:
                self.last_use[i] = j
        self.last_use[self.output] = len(self.nodes)
        # Clean maps pixel-major, (H*W, C), followed by a row of zeros, a row of -inf (padding) and room for
        # the windows of a batch: a crop with windows pasted in is then one row gather from this buffer.
        self._buf = {}
        for j, a in [(-1, x)] + list(enumerate(self.clean)):
            if isinstance(a, torch.Tensor) and a.dim() == 4:
                HW, C = a.shape[2] * a.shape[3], a.shape[1]
                buf = torch.empty(HW + 2, C, dtype=a.dtype, device=a.device)
                buf[:HW] = a[0].permute(1, 2, 0).reshape(HW, C)
                buf[HW], buf[HW + 1] = 0.0, float("-inf")
                self._buf[j] = buf
        self._tables = {}  # summed-area tables of clean maps, for window totals
        self.track_at = self._find_track(track, tapped[track]) if track is not None else None

    # ------------------------------------------------------------------------------------------------
    def _find_track(self, track, ref):
        """The node whose value is module `track`'s output (ref: that output, from a hook, on the clean
        image)."""
        hits = [i for i, n in enumerate(self.nodes)
                if (n.fx.op == "call_module" and n.fx.target == track)
                or track in [v[0] for v in n.fx.meta.get("nn_module_stack", {}).values()]]
        if not hits:
            raise Unsupported
        i = hits[-1]
        got = self.clean[i]
        if not isinstance(got, torch.Tensor) or got.shape != ref.shape or not torch.allclose(
                got, ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max())):
            raise Unsupported
        return i

    # ------------------------------------------------------------------------------------------------
    def extents(self, boxes: torch.Tensor) -> torch.Tensor:
        """(P, 2) rows and columns of each position's window at the deepest node that keeps one (where
        the expensive layers are): positions with equal extents batch together without padding."""
        state = {-1: (boxes[:, 0], boxes[:, 2], boxes[:, 1] - boxes[:, 0], boxes[:, 3] - boxes[:, 2])}
        last = -1
        for i, n in enumerate(self.nodes):
            wins = [state.get(j) for j in n.inputs]
            if n.kind in ("global", "meta", "mean") or any(w is None for w in wins):
                continue
            if n.kind == "point":
                state[i] = _union(wins)
            else:
                wy, wx, wh, ww = wins[0]
                (ky, sy, py), (kx, sx, px) = n.axes
                H, W = self.clean[i].shape[-2:]
                u0, u1 = _affected(wy, wh, ky, sy, py, H)
                v0, v1 = _affected(wx, ww, kx, sx, px, W)
                state[i] = (u0, v0, (u1 - u0).clamp(min=1), (v1 - v0).clamp(min=1))
            last = i
        return torch.stack(state[last][2:], 1)

    def run(self, boxes: list[tuple[int, int, int, int]], fill: float):
        """Model outputs (B, K) and per-channel totals of the tracked layer (B, C) for occluder boxes."""
        b = torch.tensor(boxes, dtype=torch.long, device=self.x.device).view(len(boxes), 4)
        state = {-1: self._input_windows(b, fill)}
        sums = None
        for i, n in enumerate(self.nodes):
            state[i] = self._node(i, n, state)
            if i == self.track_at:
                sums = self._sums(i, state[i])
            for j in set(n.inputs):
                if self.last_use.get(j, -1) == i:
                    state.pop(j, None)
        out = self._full(self.output, state[self.output])
        return out.reshape(len(boxes), -1), sums

    # ------------------------------------------------------------------------------------------------
    # A node's value per batch: ("win", values (B, h, w, C) channels last, top rows (B,), left cols (B,)),
    # or ("full", the batched value as the model computes it).
    def _input_windows(self, b, fill):
        H, W = self.x.shape[-2:]
        nh, nw = int((b[:, 1] - b[:, 0]).max()), int((b[:, 3] - b[:, 2]).max())
        wy, wx = b[:, 0].clamp(max=H - nh), b[:, 2].clamp(max=W - nw)  # same-size windows batch together
        ar_h, ar_w = torch.arange(nh, device=b.device), torch.arange(nw, device=b.device)
        gy, gx = wy[:, None] + ar_h, wx[:, None] + ar_w
        idx = gy[:, :, None] * W + gx[:, None, :]
        win = self._flat(-1).index_select(0, idx.reshape(-1)).view(len(b), nh, nw, -1)
        inside = ((gy >= b[:, 0:1]) & (gy < b[:, 1:2]))[:, :, None] & ((gx >= b[:, 2:3]) & (gx < b[:, 3:4]))[:, None]
        return "win", win.masked_fill(inside[..., None], fill), wy, wx

    def _node(self, i, n, state):
        ins = [state[j] for j in n.inputs]
        if n.kind == "meta":
            return "full", self._call(n, [self._meta(j, s) for j, s in zip(n.inputs, ins)])
        if n.kind == "mean" and ins[0][0] == "win":  # global average: clean total - clean window + window
            j = n.inputs[0]
            H, W = self._shape(j)[-2:]
            return "full", (self._sums(j, ins[0]) / (H * W)).view(len(ins[0][1]), *self.clean[i].shape[1:])
        if n.kind in ("global", "mean") or any(s[0] == "full" for s in ins):
            native = n.kind == "global"  # ops we do not model see the model's own memory layout
            return "full", self._call(n, [self._full(j, s, self._shared(j), native) for j, s in zip(n.inputs, ins)])
        if n.kind == "point":
            return self._point(i, n, ins)
        return self._window(i, n, ins[0])

    def _shared(self, j):
        return self.input_many_users if j < 0 else self.nodes[j].many_users

    def _point(self, i, n, ins):
        if len(ins) == 1:
            _, win, wy, wx = ins[0]
            return "win", self._call(n, [self._own(n.inputs[0], win)]).permute(0, 2, 3, 1), wy, wx
        # Several maps on one grid (add, cat): the union of their windows, gathered from each.
        y0, x0, h, w = _union([(s[2], s[3], s[1].shape[1], s[1].shape[2]) for s in ins])
        H, W = self.clean[i].shape[-2:]
        nh, nw = int(h.max()), int(w.max())
        y0, x0 = y0.clamp(max=H - nh), x0.clamp(max=W - nw)
        crops = [self._own(j, s[1]) if s[1].shape[1:3] == (nh, nw) and bool((s[2] == y0).all())
                 and bool((s[3] == x0).all()) else self._gather(j, s, y0, x0, nh, nw) for j, s in zip(n.inputs, ins)]
        return "win", self._call(n, crops).permute(0, 2, 3, 1), y0, x0

    def _own(self, j, win):
        """Node j's window as the op's input: a copy when other nodes read it too (`x += y` writes into x)."""
        t = win.permute(0, 3, 1, 2)
        return t.clone() if self._shared(j) else t

    def _window(self, i, n, s):
        _, win, wy, wx = s
        j = n.inputs[0]
        (ky, sy, py), (kx, sx, px) = n.axes
        H, W = self.clean[i].shape[-2:]
        u0, u1 = _affected(wy, win.shape[1], ky, sy, py, H)
        v0, v1 = _affected(wx, win.shape[2], kx, sx, px, W)
        nh, nw = max(1, int((u1 - u0).max())), max(1, int((v1 - v0).max()))
        if nh * nw >= THRESHOLD * H * W:
            return "full", self._call(n, [self._full(j, s, self._shared(j))])
        if n.axes == ((1, 1, 0), (1, 1, 0)) and n.kind == "window":  # 1x1: the window maps onto itself
            return "win", n.op(win.permute(0, 3, 1, 2)).permute(0, 2, 3, 1), wy, wx
        u0, v0 = u0.clamp(max=H - nh), v0.clamp(max=W - nw)  # same-size windows batch together
        if n.kind == "window":  # an exact crop, padded by hand, through the op without padding
            crop = self._gather(j, s, u0 * sy - py, v0 * sx - px, (nh - 1) * sy + ky, (nw - 1) * sx + kx, n.pad)
            return "win", n.op(crop).permute(0, 2, 3, 1), u0, v0
        return "win", self._box(i, j, n, s, u0, v0, nh, nw), u0, v0

    def _box(self, i, j, n, s, u0, v0, nh, nw):
        """A module we know only by its geometry, run padded (as the model runs it) on crops that start on
        its stride grid, so the window's units see exactly what they see in the full map."""
        (ky, sy, py), (kx, sx, px) = n.axes
        Hin, Win = self._shape(j)[-2:]

        def crop(u, m, k, s, p, size):
            start = u * s - p
            r0 = torch.where(start <= 0, torch.zeros_like(start), (start // s) * s)
            return r0, ((u + m - 1) * s - p + k).clamp(max=size)

        r0, r1 = crop(u0, nh, ky, sy, py, Hin)
        c0, c1 = crop(v0, nw, kx, sx, px, Win)
        oy, ox = u0 - r0 // sy, v0 - c0 // sx  # the window's place in the crop's output
        key = torch.stack([r1 - r0, c1 - c0, oy, ox], 1)
        out = torch.empty(len(u0), nh, nw, self.clean[i].shape[1], dtype=self.x.dtype, device=self.x.device)
        keys, group = torch.unique(key, dim=0, return_inverse=True)
        src = self._source(j, s[1])  # once, not per group
        for g, (h, w, gy, gx) in enumerate(keys.tolist()):
            sel = (group == g).nonzero()[:, 0]
            t = self._gather(j, s, r0[sel], c0[sel], h, w, sel=sel, src=src)
            out[sel] = self._call(n, [t])[:, :, gy:gy + nh, gx:gx + nw].permute(0, 2, 3, 1)
        return out

    # ------------------------------------------------------------------------------------------------
    def _shape(self, j):
        return self.x.shape if j < 0 else self.clean[j].shape

    def _flat(self, j):
        H, W = self._shape(j)[-2:]
        return self._buf[j][:H * W]

    def _gather(self, j, s, r0, c0, h, w, pad=0.0, sel=None, src=None):
        """(B, C, h, w) channels-last crops at rows r0.., cols c0.. of node j's map: its clean values, each
        position's window pasted in, `pad` (0 or -inf) outside the map. sel: the positions (default all);
        src: node j's buffer with this batch's windows already in (see _source)."""
        _, win, wy, wx = s
        clean = self._flat(j)
        HW, C = clean.shape
        H, W = self._shape(j)[-2:]
        B, nh, nw = win.shape[:3]
        sel = torch.arange(B, device=clean.device) if sel is None else sel
        src = self._source(j, win) if src is None else src
        ar = torch.arange(max(h, w), device=clean.device)
        gy, gx = r0[:, None] + ar[:h], c0[:, None] + ar[:w]  # (B, h), (B, w) map rows / cols
        ly, lx = gy - wy[sel, None], gx - wx[sel, None]  # the same inside each window
        in_win = ((ly >= 0) & (ly < nh))[:, :, None] & ((lx >= 0) & (lx < nw))[:, None, :]
        in_map = ((gy >= 0) & (gy < H))[:, :, None] & ((gx >= 0) & (gx < W))[:, None, :]
        widx = HW + 2 + (sel[:, None, None] * nh + ly.clamp(0, nh - 1)[:, :, None]) * nw \
            + lx.clamp(0, nw - 1)[:, None, :]
        cidx = gy.clamp(0, H - 1)[:, :, None] * W + gx.clamp(0, W - 1)[:, None, :]
        idx = torch.where(in_win, widx, torch.where(in_map, cidx, HW + (pad != 0.0)))
        return src.index_select(0, idx.reshape(-1)).view(len(sel), h, w, C).permute(0, 3, 1, 2)

    def _source(self, j, win):
        """Node j's buffer with the windows of this batch copied in behind the clean rows and padding."""
        rows = win.reshape(-1, win.shape[-1])
        buf = self._buf[j]
        H, W = self._shape(j)[-2:]
        n = H * W + 2
        if len(buf) < n + len(rows):
            grown = torch.empty(n + len(rows), buf.shape[1], dtype=buf.dtype, device=buf.device)
            grown[:n] = buf[:n]
            buf = self._buf[j] = grown
        buf[n:n + len(rows)] = rows
        return buf

    def _full(self, j, s, copy=False, native=False):
        """Node j's full batched value. native: in the model's own memory layout (contiguous), so ops we do
        not model round exactly as in a plain forward pass; else channels last (faster convolutions)."""
        if s[0] == "full":
            return s[1].clone() if copy else s[1]
        H, W = self._shape(j)[-2:]
        zero = torch.zeros(len(s[1]), dtype=torch.long, device=self.x.device)
        t = self._gather(j, s, zero, zero, H, W)
        return t.contiguous() if native else t

    def _meta(self, j, s):
        shape = (len(s[1]),) + tuple(self._shape(j)[1:]) if s[0] == "win" else None
        return torch.empty(shape, device="meta", dtype=self.x.dtype) if shape else s[1]

    def _sums(self, j, s):
        """Per-channel totals of node j's map: clean total - clean window + new window, the clean window's
        total read from a summed-area table of the clean map (four lookups, in float64)."""
        if s[0] == "full":
            return s[1].flatten(2).sum(-1) if s[1].dim() > 2 else s[1]
        _, win, wy, wx = s
        H, W = self._shape(j)[-2:]
        table = self._tables.get(j)
        if table is None:
            table = torch.zeros(H + 1, W + 1, win.shape[-1], dtype=torch.float64, device=win.device)
            table[1:, 1:] = self._flat(j).view(H, W, -1).double().cumsum(0).cumsum(1)
            self._tables[j] = table
        y1, x1 = wy + win.shape[1], wx + win.shape[2]
        inside = table[y1, x1] - table[wy, x1] - table[y1, wx] + table[wy, wx]
        return (table[H, W] - inside).to(win.dtype) + win.sum((1, 2))

    def _call(self, n, values):
        """Run node n's own op with its input-dependent arguments replaced by `values`."""
        sub = dict(zip(n.deps, values))
        args = fx.node.map_arg(n.fx.args, lambda a: sub[a] if a in sub else self.constants[a])
        kwargs = fx.node.map_arg(n.fx.kwargs, lambda a: sub[a] if a in sub else self.constants[a])
        return call(self.model, n.fx, args, kwargs)


