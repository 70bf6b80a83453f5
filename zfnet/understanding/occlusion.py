"""Occlusion sensitivity (Sec. 4.2, Fig. 7), computed exactly and incrementally.

A grey square slides over the image; for every position we record (b) the total activation of the top
conv layer's strongest feature map, (d) the probability of the correct class and (e) the most probable
class; (c) is that feature map's deconvnet projection on the unoccluded image.

Speed (the idea of Krypton, Nakandala et al., SIGMOD 2019): an occluder changes only the units whose
receptive field it touches, so zfnet.engine.incremental recomputes only those, node by node of the model's
graph, for batches of positions. Results equal naive recomputation (and Captum's Occlusion) to float
rounding.
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ..core.errors import ZfnetError
from ..core.progress import progress_bar
from ..engine.incremental import Incremental
from ..inspect.layers import Unit, feature_layers, layer_table, run_with_taps, taps

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


def occluded_outputs(model: nn.Module, x: torch.Tensor, boxes, *, fill: float = 0.0, track: str | None = None,
                     method: str = "incremental", batch_size: int = 64, progress: bool = False):
    """Model outputs for the image x (1, C, H, W) with each box (y0, y1, x0, x1) filled with `fill`.

    Returns (outputs (P, K), track_sums (P, C) or None): per-channel total activation of layer `track`.
    method: "incremental" (exact, recomputes only what each occluder changes; falls back to naive where
    the model's graph cannot be followed, see zfnet.engine.incremental) or "naive" (full forward pass per position).
    """
    if method not in ("incremental", "naive"):
        raise ZfnetError(f"unknown occlusion method {method!r}; use 'incremental' or 'naive'")
    boxes = list(boxes)
    engine = Incremental.build(model, x, track) if method == "incremental" else None
    if engine is not None:
        ext = engine.extents(torch.tensor(boxes, dtype=torch.long, device=x.device).view(-1, 4)).tolist()
        batches = _batches(ext, batch_size)
    else:
        batches = [list(range(b, min(b + batch_size, len(boxes)))) for b in range(0, len(boxes), batch_size)]
    outs, sums = [None] * len(boxes), [None] * len(boxes)
    bar = progress_bar(total=len(boxes), desc="occlusion", unit="pos", enabled=progress)
    with torch.no_grad():
        for chunk in batches:
            if engine is not None:
                o, s = engine.run([boxes[i] for i in chunk], fill)
            else:
                o, s = _naive(model, x, [boxes[i] for i in chunk], fill, track)
            for k, i in enumerate(chunk):
                outs[i] = o[k]
                if s is not None:
                    sums[i] = s[k]
            bar.update(len(chunk))
    bar.close()
    return torch.stack(outs), (torch.stack(sums) if track is not None else None)


def _batches(extents: list[list[int]], batch_size: int) -> list[list[int]]:
    """Positions grouped so that each batch pads its windows little: a batch computes every position at
    the largest window extent in it. Rows and columns are binned separately into k quantile bins of the
    extents (k^2 cells of about batch_size positions); a cell is cut into batches of batch_size."""
    k = max(1, math.ceil(math.sqrt(len(extents) / batch_size)))

    def bins(values):
        count = collections.Counter(values)
        out, seen = {}, 0
        for v in sorted(count):
            out[v] = min(k - 1, seen * k // len(values))
            seen += count[v]
        return out

    by, bx = bins([e[0] for e in extents]), bins([e[1] for e in extents])
    cells = collections.defaultdict(list)
    for i, (ey, ex) in enumerate(extents):
        cells[by[ey], bx[ex]].append(i)
    return [cell[s:s + batch_size] for _, cell in sorted(cells.items()) for s in range(0, len(cell), batch_size)]


def _naive(model, x, boxes, fill, track):
    """A full forward pass per occluder position."""
    xb = x.expand(len(boxes), *x.shape[1:]).clone()
    for i, (y0, y1, x0, x1) in enumerate(boxes):
        xb[i, :, y0:y1, x0:x1] = fill
    if track is None:
        return model(xb).reshape(len(boxes), -1), None
    with taps(model, [track], reduce=lambda n, t: t.flatten(2).sum(-1) if t.dim() > 2 else t) as t:
        o = model(xb)
    return o.reshape(len(boxes), -1), t[track]


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

    from ..data.images import Preprocess, load_image

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
    from ..models.weights import model_meta

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
        from ..engine.project import project

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

    from ..core.results import atomic_path
    from ..present.render import signed_to_rgb

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
