"""Exact incremental inference for many small changes of one image (the engine behind occlusion).

An occluder changes only the units whose receptive field it touches (Krypton, Nakandala et al., SIGMOD 2019). The
model is traced by torch.fx into its graph of op calls (zfnet.engine.graph; the reach of each op:
zfnet.engine.locality); the clean value of every node is computed once. For a batch of occluder positions each node
then carries, per position, only a window of its output (the changed units, padded to one shape per batch;
zfnet.engine.windows) on top of its clean map:

  * sliding windows (Conv2d, MaxPool2d, AvgPool2d): the affected output units follow from kernel, stride
    and padding; they are computed from an exact crop of the input (clean map + changed window, explicit
    padding outside the map) with the op's own weights and no padding, so no unit outside the window is
    computed and the arithmetic is the full computation's;
  * pointwise ops in any layout (activations, BatchNorm / LayerNorm / Linear over channels, LRN, sums,
    products, concatenations, channel splits, permutes and reshapes that keep both spatial axes): applied
    to the union of their inputs' windows;
  * opaque modules (those fx cannot trace) with a sliding-window receptive field: run, padded as the model
    runs them, on a crop whose origin sits on their stride grid, and cut to the window;
  * global average pooling: clean total - clean window total (from a summed-area table) + window total;
  * everything else (flatten, linear, squeeze-excitation gates, ops we do not know): the windows are pasted
    into the clean maps and the op runs on full maps, in the model's default memory layout, as does
    everything after it.

A window that would cover most of its map is computed on the full map instead (cheaper than gathering).
Results equal full forward passes to float rounding; the engine checks on the clean image that its
interpretation of the graph reproduces the model, and raises Unsupported (with the reason) where it
cannot follow. zfnet.engine.occluder decides whether it is faster than full passes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .graph import Unsupported, call, describe, is_cached, maybe_inplace, standard, trace
from .locality import classify
from .windows import MapBuffer, from_op, to_op

__all__ = ["Incremental", "Unsupported"]

THRESHOLD = 0.85  # a window covering this much of its map is cheaper computed on the full map


class _Replay(Unsupported):
    """The graph, replayed on the image, fails or differs from the model (a kept trace may be stale)."""


@dataclass
class _Node:
    fx: fx.Node
    kind: str  # "point" | "window" | "box" | "mean" | "split" | "pick" | "global" | "meta"
    inputs: list[int]  # positions (in Incremental.nodes) of the input-dependent nodes it reads; -1: the image
    deps: list  # the same nodes, as fx nodes (the arguments a batch substitutes)
    layout: tuple | None = None  # (row axis, column axis) where the value is a map
    axes: tuple | None = None  # window / box: ((k, s, p) rows, (k, s, p) cols); k counts dilation
    op: object = None  # window: the op on an exact, unpadded crop
    pad: float = 0.0  # window: value of the input outside the map
    reshape: bool = False  # point: a view / reshape, whose sizes a window replaces
    grid_constants: list | None = None  # point: constant maps on the grid, cropped with the window
    index: int = 0  # pick: which output of the split
    many_users: bool = False  # its value is read by several nodes: consumers must not modify it in place
    cost: float = 0.0  # multiply-adds per output position (per value for nodes without a map)
    grid: tuple = (1, 1)  # (H, W) of its map
    units: int = 1  # positions of its value (H * W for any 4-D value)


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


def _cost(model, n: _Node, env) -> float:
    """Multiply-adds per output position of a node (per value where it has no map): what an incremental
    pass saves is estimated from these."""
    value = env[n.fx]
    value = value[0] if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor) else value
    if not isinstance(value, torch.Tensor):
        return 0.0
    if n.fx.op == "call_module":
        mod = model.get_submodule(n.fx.target)
        params = sum(p.numel() for p in mod.parameters())
        if isinstance(mod, (nn.MaxPool2d, nn.AvgPool2d)) and n.axes is not None:
            return float(value.shape[1] * n.axes[0][0] * n.axes[1][0])
        if params > 4 * (value.shape[1] if value.dim() > 1 else 1):  # convolutions, linear layers, blocks
            return float(params)
    if n.fx.op == "call_function" and n.fx.target in (F.conv2d, F.linear) and len(n.fx.args) > 1:
        w = env.get(n.fx.args[1]) if isinstance(n.fx.args[1], fx.Node) else n.fx.args[1]
        if isinstance(w, torch.Tensor):
            return float(w.numel())
    return float(value.numel() // max(n.units, 1))


class Incremental:
    """Clean activations of one image and the exact outputs for batches of occluder boxes."""

    @classmethod
    def build(cls, model: nn.Module, x: torch.Tensor, tracks=(), baseline: torch.Tensor | None = None,
              reference: torch.Tensor | None = None):
        """The engine for image x (1, C, H, W) with occluded pixels set to `baseline` (same shape; default
        zeros). tracks: layer names (a module call: "layer1.0.relu#2") whose values run() also returns.
        reference: model(x), if the caller has it. Raises Unsupported, with the reason, where the model's
        graph cannot be followed."""
        train = [name for name, m in model.named_modules() if m.training and isinstance(
            m, (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd))]
        if train:  # batch statistics and dropout masks tie each position to the rest of its batch
            raise Unsupported(f"{train[0]} is in training mode (call model.eval())")
        kept = is_cached(model)
        try:
            return cls._follow(model, x, trace(model), tracks, baseline, reference)
        except _Replay:
            if not kept:
                raise
        # A kept trace can be stale in ways its key cannot see (an attribute the forward reads): trace again.
        return cls._follow(model, x, trace(model, fresh=True), tracks, baseline, reference)

    @classmethod
    def _follow(cls, model, x, traced, tracks, baseline, reference):
        try:
            with torch.no_grad():
                return cls(model, x, traced, list(tracks), baseline, reference)
        except Unsupported:
            raise
        except Exception as e:  # anything the interpretation cannot follow: full forward passes are always right
            raise _Replay(f"{describe(e)}, while following the graph") from None

    def __init__(self, model, x, traced, tracks, baseline, reference=None):
        nodes = list(traced.graph.nodes)
        if sum(n.op == "placeholder" for n in nodes) != 1 or nodes[0].op != "placeholder":
            raise Unsupported("the model's forward takes more than one input")
        self.model, self.x, self.leaves = model, x, traced.leaves
        env, layouts, index = {nodes[0]: x}, {nodes[0]: (2, 3)}, {}
        self.nodes: list[_Node] = []
        self.clean: list = []
        self.output = None
        for node in nodes[1:]:
            if node.op == "output":
                if not isinstance(node.args[0], fx.Node) or node.args[0] not in index:
                    raise Unsupported("the model's output is not one tensor computed from the image")
                self.output = index[node.args[0]]
                break
            deps = [a for a in node.all_input_nodes if a in index or a is nodes[0]]
            # Clean values are kept: an in-place op must not overwrite the stored copy of its input.
            get = (lambda n: env[n].clone() if isinstance(env[n], torch.Tensor) else env[n]) \
                if maybe_inplace(model, node) else env.__getitem__
            env[node] = call(model, node, fx.node.map_arg(node.args, get), fx.node.map_arg(node.kwargs, get))
            if not deps:
                continue  # a constant: its clean value serves every position
            kind, extra = classify(model, node, env, deps, layouts)
            index[node] = len(self.nodes)
            grid = extra.pop("grid", None)
            n = _Node(node, kind, [-1 if d.op == "placeholder" else index[d] for d in deps], deps,
                      layouts.get(node), grid_constants=grid, **extra)
            v = env[node][0] if n.kind == "split" else env[node]
            if n.layout is not None:
                n.grid = (v.shape[n.layout[0]], v.shape[n.layout[1]])
            n.units = n.grid[0] * n.grid[1] if n.layout else v.shape[-2] * v.shape[-1] if \
                isinstance(v, torch.Tensor) and v.dim() == 4 else 1
            n.cost = _cost(model, n, env)
            self.nodes.append(n)
            self.clean.append(env[node])
        ref = model(x) if reference is None else reference
        got = self.clean[self.output]
        if not isinstance(ref, torch.Tensor) or got.shape != ref.shape or not torch.allclose(
                got, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max())):
            raise _Replay("its graph, replayed op by op, does not reproduce the model's output")
        self.constants = {k: v for k, v in env.items() if k not in index and k is not nodes[0]}
        for n in self.nodes:
            n.many_users = sum(u in index for u in n.fx.users) > 1
            if n.kind == "split" and any(self.nodes[index[u]].kind != "pick" for u in n.fx.users if u in index):
                n.kind = "global"
        self.input_many_users = sum(u in index for u in nodes[0].users) > 1
        self.last_use = {i: i for i in range(len(self.nodes))}
        for j, n in enumerate(self.nodes):
            for i in n.inputs:
                self.last_use[i] = j
        self.last_use[self.output] = len(self.nodes)
        # layer name of each module call -> its node (several names can share one: a block and its last op)
        self.calls = {name: index[node] for name, node in traced.calls.items() if node in index}
        self.tracks = []
        for name in tracks:
            node = traced.calls.get(name)
            if node is None or node not in index:
                where = "inside a module fx cannot trace" if any(name.startswith(f"{leaf}.") for leaf in
                                                                 self.leaves) else "not a module call of its graph"
                raise Unsupported(f"layer {name} is {where}")
            n = self.nodes[index[node]]
            v = self.clean[index[node]]
            if not isinstance(v, torch.Tensor) or not ((v.dim() == 4 and n.layout in (None, (2, 3))) or v.dim() == 2):
                raise Unsupported(f"layer {name} is not an (N, C, H, W) map or an (N, C) vector")
            self.tracks.append(index[node])
        self.baseline = torch.zeros_like(x) if baseline is None else baseline.expand_as(x)
        self._bufs = {}

    # ------------------------------------------------------------------------------------------------
    def _buf(self, j) -> MapBuffer:
        b = self._bufs.get(j)
        if b is None:
            b = self._bufs[j] = MapBuffer(self.x if j == -1 else self.baseline if j == -2 else self.clean[j],
                                          (2, 3) if j < 0 else self.nodes[j].layout)
        return b

    def _shape(self, j):
        return tuple(self.x.shape if j < 0 else self.clean[j].shape)

    def _layout(self, j):
        return (2, 3) if j < 0 else self.nodes[j].layout

    def _grid(self, j):
        return tuple(self.x.shape[-2:]) if j < 0 else self.nodes[j].grid

    # ------------------------------------------------------------------------------------------------
    def plan(self, boxes: torch.Tensor):
        """For occluder boxes (P, 4): the rows and columns (P, 2) of each position's window at the deepest
        node that keeps one (positions with equal extents batch together without padding), and the
        estimated multiply-adds of an incremental pass and of a full pass, per position."""
        P = len(boxes)
        state = {-1: (boxes[:, 0], boxes[:, 2], boxes[:, 1] - boxes[:, 0], boxes[:, 3] - boxes[:, 2])}
        last, inc, full = -1, torch.zeros(P, dtype=torch.float64), 0.0
        for i, n in enumerate(self.nodes):
            units = n.units
            full += n.cost * units
            wins = [state.get(j) for j in n.inputs if j < 0 or self.nodes[j].kind != "meta"]
            if n.kind in ("global", "meta") or not wins or any(w is None for w in wins):
                inc += n.cost * units
                continue
            if n.kind == "mean":
                inc += n.cost * wins[0][2] * wins[0][3]
                continue
            if n.kind in ("point", "split", "pick"):
                state[i] = _union(wins) if len(wins) > 1 else wins[0]
            else:
                wy, wx, wh, ww = wins[0]
                (ky, sy, py), (kx, sx, px) = n.axes
                H, W = self._grid(i)
                u0, u1 = _affected(wy, wh, ky, sy, py, H)
                v0, v1 = _affected(wx, ww, kx, sx, px, W)
                h, w = (u1 - u0).clamp(min=1), (v1 - v0).clamp(min=1)
                if float((h * w).double().mean()) >= THRESHOLD * H * W:
                    inc += n.cost * units
                    continue
                state[i] = (u0, v0, h, w)
            y0, x0, h, w = state[i]
            inc += n.cost * (h * w).double()
            if n.kind in ("window", "box"):
                last = i
        return torch.stack(state[last][2:], 1), inc, full

    def run(self, boxes: list[tuple[int, int, int, int]], locations=None):
        """Model outputs (B, K) and, per tracked layer, (B, C) values for occluder boxes (y0, y1, x0, x1):
        per-channel totals, or with locations[t] = (y, x) the values at that position of the map."""
        b = torch.tensor(boxes, dtype=torch.long, device=self.x.device).view(len(boxes), 4)
        state = {-1: self._input_windows(b)}
        locations = locations or [None] * len(self.tracks)
        got = {}
        for i, n in enumerate(self.nodes):
            state[i] = self._node(i, n, state)
            for t, (j, at) in enumerate(zip(self.tracks, locations)):
                if j == i:
                    got[t] = self._read(i, state[i], at)
            for j in set(n.inputs):
                if self.last_use.get(j, -1) == i:
                    state.pop(j, None)
        out = self._full(self.output, state[self.output])
        return out.reshape(len(boxes), -1), [got[t] for t in range(len(self.tracks))]

    # ------------------------------------------------------------------------------------------------
    # A node's value per batch: ("win", values (B, h, w, K) channels last, top rows (B,), left cols (B,)),
    # ("full", the batched value as the model computes it), or ("tuple", states) for a channel split.
    def _input_windows(self, b):
        H, W = self.x.shape[-2:]
        nh, nw = int((b[:, 1] - b[:, 0]).max()), int((b[:, 3] - b[:, 2]).max())
        wy, wx = b[:, 0].clamp(max=H - nh), b[:, 2].clamp(max=W - nw)  # same-size windows batch together
        ar_h, ar_w = torch.arange(nh, device=b.device), torch.arange(nw, device=b.device)
        gy, gx = wy[:, None] + ar_h, wx[:, None] + ar_w
        idx = (gy[:, :, None] * W + gx[:, None, :]).reshape(-1)
        win = self._buf(-1).flat().index_select(0, idx).view(len(b), nh, nw, -1)
        base = self._buf(-2).flat().index_select(0, idx).view(len(b), nh, nw, -1)
        inside = ((gy >= b[:, 0:1]) & (gy < b[:, 1:2]))[:, :, None] & ((gx >= b[:, 2:3]) & (gx < b[:, 3:4]))[:, None]
        return "win", torch.where(inside[..., None], base, win), wy, wx

    def _node(self, i, n, state):
        ins = [state[j] for j in n.inputs]
        if n.kind == "meta":
            return "full", self._call(n, [self._meta(j, s) for j, s in zip(n.inputs, ins)])
        if n.kind == "pick":
            s = ins[0]
            return s[1][n.index] if s[0] == "tuple" else ("full", s[1][n.index])
        if n.kind == "mean" and ins[0][0] == "win":  # global average: clean total - clean window + window
            j = n.inputs[0]
            H, W = self._grid(j)
            return "full", (self._buf(j).sums(ins[0]) / (H * W)).view(len(ins[0][1]), *self.clean[i].shape[1:])
        maps = [s for j, s in zip(n.inputs, ins) if j < 0 or self.nodes[j].kind != "meta"]
        if n.kind in ("global", "mean") or any(s[0] != "win" for s in maps):
            native = n.kind == "global"  # ops we do not model see the model's default memory layout
            return "full", self._call(n, [self._full(j, s, self._shared(j), native) for j, s in zip(n.inputs, ins)])
        if n.kind in ("point", "split"):
            return self._point(i, n, ins)
        return self._window(i, n, ins[0])

    def _shared(self, j):
        return self.input_many_users if j < 0 else self.nodes[j].many_users

    def _is_map(self, j):
        return j < 0 or self.nodes[j].kind != "meta"

    def _point(self, i, n, ins):
        wins = [(j, s) for j, s in zip(n.inputs, ins) if self._is_map(j)]
        if len(wins) == 1:
            j, (_, win, y0, x0) = wins[0]
            nh, nw = win.shape[1:3]
            crops = {j: self._own(j, win)}
        else:  # several maps on one grid (add, cat): the union of their windows, gathered from each
            y0, x0, h, w = _union([(s[2], s[3], s[1].shape[1], s[1].shape[2]) for _, s in wins])
            H, W = self._grid(i)
            nh, nw = int(h.max()), int(w.max())
            y0, x0 = y0.clamp(max=H - nh), x0.clamp(max=W - nw)
            crops = {j: self._own(j, s[1]) if s[1].shape[1:3] == (nh, nw) and bool((s[2] == y0).all())
                     and bool((s[3] == x0).all()) else self._buf(j).gather(s, y0, x0, nh, nw) for j, s in wins}
        values = [to_op(crops[j], self._shape(j), self._layout(j)) if j in crops else s[1]
                  for j, s in zip(n.inputs, ins)]
        if n.reshape:
            shape = list(self.clean[i].shape)
            shape[0], shape[n.layout[0]], shape[n.layout[1]] = len(values[0]), nh, nw
            out = values[n.inputs.index(wins[0][0])].reshape(shape)
        else:
            ar_h, ar_w = torch.arange(nh, device=y0.device), torch.arange(nw, device=y0.device)
            gy, gx = (y0[:, None] + ar_h)[:, :, None], (x0[:, None] + ar_w)[:, None, :]
            crops = {c: self.constants[c][0][:, gy, gx].transpose(0, 1) for c in n.grid_constants or ()}
            out = self._call(n, values, crops)
        if n.kind == "split":
            return "tuple", [("win", from_op(t, n.layout), y0, x0) for t in out]
        return "win", from_op(out, n.layout), y0, x0

    def _own(self, j, win):
        """Node j's window as an op's input: a copy when other nodes read it too (`x += y` writes into x)."""
        return win.clone() if self._shared(j) else win

    def _window(self, i, n, s):
        _, win, wy, wx = s
        j = n.inputs[0]
        (ky, sy, py), (kx, sx, px) = n.axes
        H, W = self._grid(i)
        u0, u1 = _affected(wy, win.shape[1], ky, sy, py, H)
        v0, v1 = _affected(wx, win.shape[2], kx, sx, px, W)
        nh, nw = max(1, int((u1 - u0).max())), max(1, int((v1 - v0).max()))
        if nh * nw >= THRESHOLD * H * W:
            return "full", self._call(n, [self._full(j, s, self._shared(j))])
        if n.axes == ((1, 1, 0), (1, 1, 0)) and n.kind == "window":  # 1x1: the window maps onto itself
            return "win", n.op(win.permute(0, 3, 1, 2)).permute(0, 2, 3, 1), wy, wx
        u0, v0 = u0.clamp(max=H - nh), v0.clamp(max=W - nw)  # same-size windows batch together
        if n.kind == "window":  # an exact crop, padded by hand, through the op without padding
            crop = self._buf(j).gather(s, u0 * sy - py, v0 * sx - px, (nh - 1) * sy + ky, (nw - 1) * sx + kx, n.pad)
            return "win", n.op(crop.permute(0, 3, 1, 2)).permute(0, 2, 3, 1), u0, v0
        return "win", self._box(i, j, n, s, u0, v0, nh, nw), u0, v0

    def _box(self, i, j, n, s, u0, v0, nh, nw):
        """A module we know only by its geometry, run padded (as the model runs it) on crops that start on
        its stride grid, so the window's units see exactly what they see in the full map."""
        (ky, sy, py), (kx, sx, px) = n.axes
        Hin, Win = self._grid(j)

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
        buf = self._buf(j)
        src = buf.source(s[1])  # once, not per group
        for g, (h, w, gy, gx) in enumerate(keys.tolist()):
            sel = (group == g).nonzero()[:, 0]
            t = buf.gather(s, r0[sel], c0[sel], h, w, sel=sel, src=src).permute(0, 3, 1, 2)
            out[sel] = self._call(n, [t])[:, :, gy:gy + nh, gx:gx + nw].permute(0, 2, 3, 1)
        return out

    # ------------------------------------------------------------------------------------------------
    def _full(self, j, s, copy=False, native=False):
        """Node j's full batched value. native: in PyTorch's default strides, so ops we do not model see
        what a plain forward pass gives them; else channels last (faster convolutions)."""
        if s[0] == "tuple":
            raise Unsupported("a channel split read whole")
        if s[0] == "full":
            v = s[1]
            v = v.clone() if copy and isinstance(v, torch.Tensor) else v
        else:
            v = to_op(self._buf(j).full(s), self._shape(j), self._layout(j))
        return standard(v) if native else v

    def _meta(self, j, s):
        """Stand-ins with the full batched shape for ops that only read sizes."""
        if s[0] == "win":
            return torch.empty((len(s[1]),) + self._shape(j)[1:], device="meta", dtype=self.x.dtype)
        return s[1]

    def _read(self, i, s, at):
        """A tracked node's (B, K) per-channel totals, or its values at position `at`."""
        if s[0] == "full":
            v = s[1]
            if v.dim() <= 2:
                return v.reshape(len(v), -1)
            return v[:, :, at[0], at[1]] if at is not None else v.sum((2, 3))
        buf = self._buf(i)
        return buf.sums(s) if at is None else buf.at(s, *at)

    def _call(self, n, values, constants=None):
        """Run node n's own op with its input-dependent arguments replaced by `values` (and constants by
        `constants`, where given)."""
        sub = dict(zip(n.deps, values))
        sub.update(constants or {})
        args = fx.node.map_arg(n.fx.args, lambda a: sub[a] if a in sub else self.constants[a])
        kwargs = fx.node.map_arg(n.fx.kwargs, lambda a: sub[a] if a in sub else self.constants[a])
        return call(self.model, n.fx, args, kwargs)
