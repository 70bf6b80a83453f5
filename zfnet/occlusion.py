"""Occlusion sensitivity (Sec. 4.2, Fig. 7), computed exactly and incrementally.

A grey square slides over the image; for every position we record (b) the total activation of the top
conv layer's strongest feature map, (d) the probability of the correct class and (e) the most probable
class; (c) is that feature map's deconvnet projection on the unoccluded image.

Speed (the idea of Krypton, Nakandala et al., SIGMOD 2019): an occluder changes only the units whose
receptive field it touches. The network is split into a chain of stages (by torch.fx; our models, any
nn.Sequential, SqueezeNet, ResNet-like nets). The clean activations are computed once; for each stage
and occluder position only the affected output window is recomputed, from a crop of the (clean +
changed) stage input that holds exactly that window's dependencies, with the crop origin on the stage's
stride grid so the arithmetic is the full computation's. Windows of many positions are batched. From
the first stage that mixes all positions (flatten, linear, global pooling) on, the rest of the network
runs on full maps. Results equal naive recomputation (and Captum's Occlusion) to float rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from .errors import ZfnetError
from .layers import Field, Unit, feature_layers, layer_table, run_with_taps, taps
from .progress import progress_bar

__all__ = ["OcclusionResult", "occlusion", "occluder_boxes", "occluded_outputs", "pixel_attribution",
           "render_occlusion"]


# ----------------------------------------------------------------------------------------------------
# Geometry: occluder boxes (Captum's convention) and input pixels <-> pixels of the image file.
def occluder_boxes(n: int, size: int, stride: int) -> list[tuple[int, int]]:
    """Occluder extents along one axis: starts 0, stride, ... up to ceil((n-size)/stride)*stride, the last
    one truncated at the border (exactly Captum's Occlusion positions)."""
    if size < 1 or stride < 1:
        raise ZfnetError(f"occluder size and stride must be >= 1 (got size {size}, stride {stride})")
    if size > n:
        raise ZfnetError(f"occluder size {size} exceeds the {n}-pixel input")
    steps = math.ceil((n - size) / stride) + 1
    return [(i * stride, min(n, i * stride + size)) for i in range(steps)]


# ----------------------------------------------------------------------------------------------------
# The network as a chain of stages, each with its local geometry (kernel, stride, padding per axis).
@dataclass
class _Stage:
    name: str
    fn: object  # tensor -> tensor
    geom: tuple | None = None  # ((k_y, s_y, p_y), (k_x, s_x, p_x)); None = mixes all positions


class _Tracer(torch.fx.Tracer):
    def __init__(self, leaves: set[str]):
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, m, qualname):
        return qualname in self.leaves or super().is_leaf_module(m, qualname)


def _chain(model: nn.Module) -> list[_Stage] | None:
    """The model as a chain of single-input stages, or None when its graph is not a chain."""
    # Blocks inside a Sequential (SqueezeNet's Fire, ResNet's blocks) are stages of their own.
    leaves = {f"{name}.{c}" if name else c for name, m in model.named_modules()
              if isinstance(m, nn.Sequential) for c, _ in m.named_children()}
    try:
        graph = _Tracer(leaves).trace(model)
    except Exception:
        return None
    nodes = list(graph.nodes)
    if not nodes or nodes[0].op != "placeholder" or sum(n.op == "placeholder" for n in nodes) != 1:
        return None
    stages, prev, used = [], nodes[0], set()
    for node in nodes[1:]:
        if node.op == "output":
            return stages if node.args[0] is prev else None
        inputs = node.all_input_nodes
        if inputs != [prev] or len(prev.users) != 1 or node.op == "get_attr":
            return None
        sub = lambda a, node=node: torch.fx.node.map_arg(a, lambda _: _Ref.value)  # noqa: E731
        if node.op == "call_module":
            if node.target in used:  # a module called twice: the layer table keeps only its first call
                return None
            used.add(node.target)
            mod = model.get_submodule(node.target)
            fn = _bind(lambda t, a, k, mod=mod: mod(*a, **k), node, sub)
        elif node.op == "call_function":
            fn = _bind(lambda t, a, k, f=node.target: f(*a, **k), node, sub)
        elif node.op == "call_method":
            fn = _bind(lambda t, a, k, meth=node.target: getattr(a[0], meth)(*a[1:], **k), node, sub)
        else:
            return None
        stages.append(_Stage(node.target if node.op == "call_module" else node.name, fn))
        prev = node
    return None


class _Ref:
    value = None  # the tensor substituted for the single input node while a stage runs


def _bind(call, node, sub):
    def fn(t):
        _Ref.value = t
        try:
            return call(t, sub(node.args), sub(node.kwargs))
        finally:
            _Ref.value = None
    return fn


def _local_geometry(fin: Field, fout: Field) -> tuple | None:
    """(k, s, p) per axis of a stage mapping field fin to fout, or None if not a plain sliding window."""
    out = []
    for jin, jout, zin, zout, sin, sout in ((fin.jump_y, fout.jump_y, fin.size_y, fout.size_y, fin.start_y,
                                             fout.start_y), (fin.jump_x, fout.jump_x, fin.size_x, fout.size_x,
                                                             fin.start_x, fout.start_x)):
        if jout % jin or (zout - zin) % jin or (sin - sout) % jin:
            return None
        k, s, p = (zout - zin) // jin + 1, jout // jin, (sin - sout) // jin
        if k < 1 or s < 1 or p < 0:
            return None
        out.append((k, s, p))
    return tuple(out)


# ----------------------------------------------------------------------------------------------------
class _Incremental:
    """Clean activations of one image, and the exact outputs for batches of occluder boxes."""

    def __init__(self, model: nn.Module, x: torch.Tensor, stages: list[_Stage], track: str | None):
        table = layer_table(model, tuple(x.shape[-2:]), x.shape[1])
        self.stages, self.track = stages, track
        self.acts = [x]  # acts[m] = clean input of stage m; acts[-1] = model output
        fin = Field(1, 1, 1, 1, 0, 0)
        local = True
        with torch.no_grad():
            a = x
            for st in stages:
                out = st.fn(a.clone())  # clone: an in-place ReLU must not overwrite a stored activation
                if local:
                    fout = None
                    if st.name in table and out.dim() == 4:
                        fout = table[st.name].field
                    elif out.dim() == 4 and a.dim() == 4 and out.shape[-2:] == a.shape[-2:]:
                        fout = fin  # an elementwise function (F.relu, ...) keeps the field
                    st.geom = _local_geometry(fin, fout) if fout else None
                    local = st.geom is not None
                    fin = fout
                self.acts.append(out)
                a = out
        self.n_local = sum(st.geom is not None for st in stages)
        names = [st.name for st in stages]
        self.track_at = names.index(track) + 1 if track in names else None  # index into acts

        # Clean maps pixel-major, (H*W, C): a crop with windows pasted in is then one row gather.
        self.flat = [a[0].permute(1, 2, 0).reshape(-1, a.shape[1]) if a.dim() == 4 else None
                     for a in self.acts[:self.n_local + 1]]

    def run(self, boxes: list[tuple[int, int, int, int]], fill: float):
        """Model outputs (B, K) and per-channel totals of the tracked layer (B, C) for occluder boxes."""
        x = self.acts[0]
        dev = x.device
        B = len(boxes)
        # The changed window of the current activation per position: its top-left (wy, wx), extent
        # (wh, ww), and values in win (B, nh, nw, C), channels last (torch's fast layout for small convs).
        b = torch.tensor(boxes, dtype=torch.long, device=dev).view(B, 4)
        wy, wx, wh, ww = b[:, 0], b[:, 2], b[:, 1] - b[:, 0], b[:, 3] - b[:, 2]
        win = torch.full((B, int(wh.max()), int(ww.max()), x.shape[1]), fill, dtype=x.dtype, device=dev)
        sums, m = None, 0
        while m < self.n_local and not self._too_big(m, wh, ww):
            win, wy, wx, wh, ww = self._stage(m, win, wy, wx, wh, ww)
            m += 1
            if self.track_at == m:
                sums = self._window_sums(m, win, wy, wx)
        # From here every position needs (almost) the whole map: paste the windows, run on full maps.
        H, W = self.acts[m].shape[-2:]
        zero = torch.zeros(B, dtype=torch.long, device=dev)
        a = self._gather(m, win, wy, wx, wh, ww, zero, zero, H, W)
        for j in range(m, len(self.stages)):
            a = self.stages[j].fn(a)
            if self.track_at == j + 1:
                sums = a.flatten(2).sum(-1) if a.dim() > 2 else a
        return a, sums

    def _gather(self, m, win, wy, wx, wh, ww, r0, c0, h, w, sel=None, src=None):
        """(B, C, h, w) channels-last crops at (r0, c0) of stage m's clean input with each window pasted.

        sel: which positions of win (default all); src: cat(clean rows, window rows), reusable per stage.
        """
        clean = self.flat[m]
        C = clean.shape[1]
        W = self.acts[m].shape[-1]
        nh, nw = win.shape[1:3]
        sel = torch.arange(len(win), device=clean.device) if sel is None else sel
        if src is None:
            src = torch.cat([clean, win.reshape(-1, C)])
        wy, wx, wh, ww = wy[sel], wx[sel], wh[sel], ww[sel]
        ar = torch.arange(max(h, w), device=clean.device)
        gy, gx = r0[:, None] + ar[:h], c0[:, None] + ar[:w]  # (B, h), (B, w) map rows / cols
        ly, lx = gy - wy[:, None], gx - wx[:, None]  # the same inside each window
        inside = (((ly >= 0) & (ly < wh[:, None]))[:, :, None]) & (((lx >= 0) & (lx < ww[:, None]))[:, None, :])
        widx = clean.shape[0] + (sel[:, None, None] * nh + ly.clamp(0, nh - 1)[:, :, None]) * nw \
            + lx.clamp(0, nw - 1)[:, None, :]
        idx = torch.where(inside, widx, gy[:, :, None] * W + gx[:, None, :])
        return src[idx.reshape(-1)].view(len(sel), h, w, C).permute(0, 3, 1, 2)

    def _too_big(self, m, wh, ww) -> bool:
        """Windows so large that cropping costs more than recomputing full maps."""
        (ky, _, _), (kx, _, _) = self.stages[m].geom
        H, W = self.acts[m].shape[-2:]
        return (int(wh.max()) + ky - 1) * (int(ww.max()) + kx - 1) >= 0.6 * H * W

    def _window_sums(self, j, win, wy, wx):
        """Per-channel totals of layer j: clean total - clean window + new window."""
        B, nh, nw, C = win.shape
        W = self.acts[j].shape[-1]
        ar_h, ar_w = torch.arange(nh, device=win.device), torch.arange(nw, device=win.device)
        idx = (wy[:, None] + ar_h)[:, :, None] * W + (wx[:, None] + ar_w)[:, None, :]
        clean_win = self.flat[j][idx.reshape(-1)].view(B, nh * nw, C).sum(1)
        return self.flat[j].sum(0) - clean_win + win.sum((1, 2))

    def _stage(self, m, win, wy, wx, wh, ww):
        st, a_out = self.stages[m], self.acts[m + 1]
        (ky, sy, py), (kx, sx, px) = st.geom
        if st.geom == ((1, 1, 0), (1, 1, 0)) and bool((wh == win.shape[1]).all() and (ww == win.shape[2]).all()):
            # elementwise: the changed window maps to itself
            return st.fn(win.permute(0, 3, 1, 2)).permute(0, 2, 3, 1), wy, wx, wh, ww
        Hin, Win = self.acts[m].shape[-2:]
        Hout, Wout = a_out.shape[-2:]

        def affected(a, n, k, s, p, size):  # output units whose window [u*s-p, u*s-p+k) meets [a, a+n)
            return (-((k - 1 - a - p) // s)).clamp(min=0), ((a + n - 1 + p) // s + 1).clamp(max=size)

        u0, u1 = affected(wy, wh, ky, sy, py, Hout)
        v0, v1 = affected(wx, ww, kx, sx, px, Wout)
        nh, nw = max(1, int((u1 - u0).max())), max(1, int((v1 - v0).max()))
        u0, v0 = u0.clamp(max=Hout - nh), v0.clamp(max=Wout - nw)  # same-size windows batch together
        r0, r1 = self._crop(u0, nh, ky, sy, py, Hin)
        c0, c1 = self._crop(v0, nw, kx, sx, px, Win)
        oy, ox = u0 - r0 // sy, v0 - c0 // sx  # the window's place in the crop's output
        key = torch.stack([r1 - r0, c1 - c0, oy, ox], 1)
        out = torch.empty(len(win), nh, nw, a_out.shape[1], dtype=a_out.dtype, device=a_out.device)
        keys, group = torch.unique(key, dim=0, return_inverse=True)
        src = torch.cat([self.flat[m], win.reshape(-1, win.shape[-1])])  # once per stage, not per group
        for g, (h, w, gy, gx) in enumerate(keys.tolist()):
            idx = (group == g).nonzero()[:, 0]
            crops = self._gather(m, win, wy, wx, wh, ww, r0[idx], c0[idx], h, w, sel=idx, src=src)
            out[idx] = st.fn(crops)[:, :, gy:gy + nh, gx:gx + nw].permute(0, 2, 3, 1)
        full = torch.ones_like(u0)
        return out, u0, v0, full * nh, full * nw

    @staticmethod
    def _crop(u0, n, k, s, p, size):
        """Input rows [r0, r1) holding the dependencies of output units [u0, u0+n), r0 on the stride grid."""
        start = u0 * s - p
        r0 = torch.where(start <= 0, torch.zeros_like(start), (start // s) * s)
        return r0, ((u0 + n - 1) * s - p + k).clamp(max=size)


def occluded_outputs(model: nn.Module, x: torch.Tensor, boxes, *, fill: float = 0.0, track: str | None = None,
                     method: str = "incremental", batch_size: int = 64, progress: bool = False):
    """Model outputs for the image x (1, C, H, W) with each box (y0, y1, x0, x1) filled with `fill`.

    Returns (outputs (P, K), track_sums (P, C) or None): per-channel total activation of layer `track`.
    method: "incremental" (exact, recomputes only what each occluder changes; falls back to naive when
    the model is not a chain of stages) or "naive" (full forward pass per position).
    """

    if method not in ("incremental", "naive"):
        raise ZfnetError(f"unknown occlusion method {method!r}; use 'incremental' or 'naive'")
    boxes = list(boxes)
    engine = None
    if method == "incremental":
        stages = _chain(model)
        if stages is not None:
            with torch.no_grad():
                engine = _Incremental(model, x, stages, track)
            if track is not None and engine.track_at is None:
                engine = None  # the tracked layer lives inside a stage: only hooks can read it
    outs, sums = [], []
    bar = progress_bar(total=len(boxes), desc="occlusion", unit="pos", enabled=progress)
    with torch.no_grad():
        for b in range(0, len(boxes), batch_size):
            chunk = boxes[b:b + batch_size]
            if engine is not None:
                o, s = engine.run(chunk, fill)
            else:
                xb = x.expand(len(chunk), *x.shape[1:]).clone()
                for i, (y0, y1, x0, x1) in enumerate(chunk):
                    xb[i, :, y0:y1, x0:x1] = fill
                if track is None:
                    o, s = model(xb), None
                else:
                    with taps(model, [track], reduce=lambda n, t: t.flatten(2).sum(-1) if t.dim() > 2 else t) as t:
                        o = model(xb)
                    s = t[track]
            outs.append(o.reshape(len(chunk), -1))
            if s is not None:
                sums.append(s)
            bar.update(len(chunk))
    bar.close()
    return torch.cat(outs), (torch.cat(sums) if sums else None)


# ----------------------------------------------------------------------------------------------------
@dataclass
class OcclusionResult:
    """Fig. 7 maps; prob[r][c] belongs to the occluder centred at (centers_y[r], centers_x[c])."""

    file: str | None
    label: int
    label_name: str
    feature_map: str  # "<layer>:<channel>": the top conv layer's strongest map on the clean image
    size: int
    stride: int
    fill: float
    input_size: tuple[int, int]
    rows: list[tuple[int, int]]  # occluder extents [y0, y1) in input pixels
    cols: list[tuple[int, int]]
    centers_y: list[float]  # occluder centres in pixels of the image file (input pixels if no file)
    centers_x: list[float]
    prob: np.ndarray  # (R, C) p(label) with the occluder there
    argmax_label: np.ndarray  # (R, C) most probable class
    activity: np.ndarray  # (R, C) total activation of `feature_map`
    clean_prob: float
    clean_activity: float
    top_location: tuple[int, int]  # where the feature map is strongest (its units' grid)
    categories: list[str] = field(default_factory=list, repr=False)
    image: np.ndarray | None = field(default=None, repr=False)  # (H, W, 3) uint8 input as the model saw it
    projection: np.ndarray | None = field(default=None, repr=False)  # (3, H, W) deconv projection
    config: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        names = {int(i): self.categories[int(i)] if int(i) < len(self.categories) else str(int(i))
                 for i in np.unique(self.argmax_label)}
        return {"schema": 1, "file": self.file, "label": self.label, "label_name": self.label_name,
                "feature_map": self.feature_map, "size": self.size, "stride": self.stride, "fill": self.fill,
                "input_size": list(self.input_size), "rows": [list(r) for r in self.rows],
                "cols": [list(c) for c in self.cols], "centers_y": self.centers_y, "centers_x": self.centers_x,
                "prob": self.prob.tolist(), "argmax_label": self.argmax_label.tolist(),
                "activity": self.activity.tolist(), "clean_prob": self.clean_prob,
                "clean_activity": self.clean_activity, "labels": {str(k): v for k, v in names.items()},
                "config": self.config}

    def pixel_attribution(self) -> np.ndarray:
        """The per-pixel map Captum's Occlusion returns for target `label`: mean over the occluders covering
        a pixel of (clean prob - occluded prob)."""
        return pixel_attribution(self.clean_prob - self.prob, self.rows, self.cols, self.input_size)


def pixel_attribution(drop: np.ndarray, rows, cols, input_size) -> np.ndarray:
    """Spread per-position values over the pixels each occluder covers and average (Captum's convention)."""
    H, W = input_size
    total, count = np.zeros((H, W)), np.zeros((H, W))
    for r, (y0, y1) in enumerate(rows):
        for c, (x0, x1) in enumerate(cols):
            total[y0:y1, x0:x1] += drop[r, c]
            count[y0:y1, x0:x1] += 1
    return total / np.maximum(count, 1)


def _prepare(model, image, preprocess):
    """(x (1, 3, H, W), file name or None, (width, height) of the file or None, Preprocess)."""
    from PIL import Image

    from .data import Preprocess, load_image

    pre = preprocess or Preprocess.for_model(model)
    if isinstance(image, torch.Tensor):
        x = image if image.dim() == 4 else image[None]
        return x, None, None, pre
    name = None
    if not isinstance(image, Image.Image):
        name, image = str(image), load_image(image)
    x = pre(image)
    if x.dim() != 3:
        raise ZfnetError("occlusion needs a single-crop preprocessing (crop='center')")
    return x[None], name, image.size, pre


def top_conv_layer(model: nn.Module) -> str:
    """The deepest rectified conv layer ("layer 5" of the paper's nets)."""
    return feature_layers(model)[-1]


def occlusion(model: nn.Module, image, *, label: int | None = None, size: int = 48, stride: int = 16,
              fill: float = 0.0, layer: str | None = None, method: str = "incremental", batch_size: int = 64,
              preprocess=None, project_map: bool = True, progress: bool = False) -> OcclusionResult:
    """Fig. 7 for one image: slide a `size` square (value `fill` in the model's input space: 0 = the
    preprocessing mean) with `stride` over the input and record, per position, p(label), the most probable
    class and the total activation of the strongest feature map of `layer` (default: top conv layer).

    Args:
        image: an image file, a PIL image, or a preprocessed (3, H, W) / (1, 3, H, W) tensor.
        label: the correct class (default: the clean image's top-1).
        method: "incremental" (exact, fast) or "naive" (a full forward pass per position).
    """
    from .weights import model_meta

    x, name, file_size, pre = _prepare(model, image, preprocess)
    device = next(model.parameters()).device
    x = x.to(device)
    H, W = x.shape[-2:]
    rows, cols = occluder_boxes(H, size, stride), occluder_boxes(W, size, stride)
    layer = layer or top_conv_layer(model)
    table = layer_table(model, (H, W), x.shape[1])
    if table[layer].height * table[layer].width < 1:
        raise ZfnetError(f"layer {layer} has no feature maps")
    with torch.no_grad():
        clean_out = model(x).reshape(1, -1)
        fmap = run_with_taps(model, x, [layer])[layer][0]  # (C, h, w)
    probs = clean_out.softmax(-1)[0]
    if label is None:
        label = int(probs.argmax())
    if not 0 <= label < probs.numel():
        raise ZfnetError(f"label {label} out of range 0..{probs.numel() - 1}")
    flat = fmap.flatten(1) if fmap.dim() == 3 else fmap.reshape(-1, 1)
    channel = int(flat.max(1).values.argmax())
    loc = divmod(int(flat[channel].argmax()), fmap.shape[-1]) if fmap.dim() == 3 else (0, 0)
    boxes = [(y0, y1, x0, x1) for y0, y1 in rows for x0, x1 in cols]
    out, sums = occluded_outputs(model, x, boxes, fill=fill, track=layer, method=method, batch_size=batch_size,
                                 progress=progress)
    p = out.softmax(-1)
    R, C = len(rows), len(cols)
    cy = [(y0 + y1 - 1) / 2 for y0, y1 in rows]
    cx = [(x0 + x1 - 1) / 2 for x0, x1 in cols]
    if file_size is not None:  # report centres in pixels of the file as given
        cy = pre.to_file(*file_size, cy, 0)[0].tolist()
        cx = pre.to_file(*file_size, 0, cx)[1].tolist()
    projection = None
    if project_map:
        from .project import project

        projection = project(model, x, [Unit(layer, channel, *loc)], "deconv")[0, 0].cpu().numpy()
    cats = list(model_meta(model).categories or [])
    img = None
    if x.shape[1] == 3:
        img = (pre.unnormalize(x[0].cpu()).permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
    return OcclusionResult(
        file=name, label=label, label_name=cats[label] if label < len(cats) else str(label),
        feature_map=f"{layer}:{channel}", size=size, stride=stride, fill=fill, input_size=(H, W),
        rows=rows, cols=cols, centers_y=cy, centers_x=cx,
        prob=p[:, label].reshape(R, C).cpu().numpy(), argmax_label=p.argmax(-1).reshape(R, C).cpu().numpy(),
        activity=sums[:, channel].reshape(R, C).cpu().numpy(), clean_prob=float(probs[label]),
        clean_activity=float(flat[channel].sum()), top_location=loc, categories=cats, image=img,
        projection=projection,
        config={"size": size, "stride": stride, "fill": fill, "layer": layer, "label": label, "method": method,
                "batch_size": batch_size, "preprocessing": pre.preset, "input_size": [H, W]})


# ----------------------------------------------------------------------------------------------------
def render_occlusion(result: OcclusionResult, path: str | Path, max_legend: int = 12) -> Path:
    """The Fig. 7 row: (a) input, (b) feature-map activity, (c) its deconvnet projection, (d) p(label),
    (e) most probable label with a legend. Maps are drawn at the occluder centres over the input."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch, Rectangle

    from .render import signed_to_rgb
    from .results import atomic_path

    H, W = result.input_size
    cy = [(a + b - 1) / 2 for a, b in result.rows]
    cx = [(a + b - 1) / 2 for a, b in result.cols]
    dy = (cy[1] - cy[0]) / 2 if len(cy) > 1 else H / 2
    dx = (cx[1] - cx[0]) / 2 if len(cx) > 1 else W / 2
    extent = (cx[0] - dx, cx[-1] + dx, cy[-1] + dy, cy[0] - dy)
    fig, axes = plt.subplots(1, 5, figsize=(19, 4.4))
    ax = axes[0]
    if result.image is not None:
        ax.imshow(result.image)
    (y0, y1), (x0, x1) = result.rows[len(result.rows) // 2], result.cols[len(result.cols) // 2]
    ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, color="0.5"))
    ax.set_title(f"(a) input, occluder {result.size}px / {result.stride}px\ntrue: {result.label_name[:30]}",
                 fontsize=9)
    im = axes[1].imshow(result.activity, extent=extent, cmap="jet")
    fig.colorbar(im, ax=axes[1], fraction=0.046)
    axes[1].set_title(f"(b) total activation of {result.feature_map}", fontsize=9)
    if result.projection is not None:
        axes[2].imshow(signed_to_rgb(result.projection))
        ly, lx = result.top_location
        axes[2].set_title(f"(c) deconv projection of {result.feature_map}@{ly},{lx}", fontsize=9)
    else:
        axes[2].set_title("(c) projection not computed", fontsize=9)
    im = axes[3].imshow(result.prob, extent=extent, cmap="jet", vmin=0, vmax=max(1e-6, float(result.prob.max())))
    fig.colorbar(im, ax=axes[3], fraction=0.046)
    axes[3].set_title(f"(d) p({result.label_name[:24]})", fontsize=9)
    labels, counts = np.unique(result.argmax_label, return_counts=True)
    order = labels[np.argsort(-counts)]
    shown = list(order[:max_legend])
    index = np.array([shown.index(v) if v in shown else len(shown) for v in result.argmax_label.ravel()])
    colors = list(plt.get_cmap("tab20").colors[:len(shown)]) + [(0.6, 0.6, 0.6)]
    axes[4].imshow(index.reshape(result.argmax_label.shape), extent=extent, cmap=ListedColormap(colors),
                   vmin=-0.5, vmax=len(colors) - 0.5, interpolation="nearest")
    axes[4].set_title("(e) most probable label", fontsize=9)
    names = [result.categories[v] if v < len(result.categories) else str(v) for v in shown]
    handles = [Patch(color=colors[i], label=f"{n[:28]} ({v})") for i, (n, v) in enumerate(zip(names, shown))]
    if len(order) > len(shown):
        handles.append(Patch(color=colors[-1], label=f"{len(order) - len(shown)} other labels"))
    axes[4].legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1), fontsize=7, frameon=False)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
    return Path(path)
