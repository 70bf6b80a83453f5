"""Occlusion sensitivity (Sec. 4.2, Fig. 7), computed exactly and incrementally.

A grey square slides over the image; for every position we record (b) the total activation of the top
conv layer's strongest feature map, (d) the probability of the correct class and (e) the most probable
class; (c) is that feature map's deconvnet projection on the unoccluded image. Beyond the paper: any
rectangle and per-axis stride, occluders filled with a number, the image's per-channel mean, a blurred copy
of the image or any tensor, and (d) may score a class logit or log-probability or any unit of any layer.

Speed (the idea of Krypton, Nakandala et al., SIGMOD 2019): an occluder changes only the units whose
receptive field it touches, so zfnet.engine.incremental recomputes only those, node by node of the model's
graph; zfnet.engine.occluder uses it where it is faster than full forward passes, and says which ran. Results
equal full forward passes (and Captum's Occlusion) to float rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.errors import ZfnetError
from ..engine.occluder import module_calls, occluded_outputs, occluder_boxes
from ..inspect.layers import Unit, feature_layers, layer_table, parse_unit, penultimate_layer
from ..inspect.units import split_call

__all__ = ["OcclusionResult", "occlusion", "occluder_boxes", "occluded_outputs", "pixel_attribution",
           "baseline_image", "render_occlusion"]

SCORES = ("prob", "logit", "logprob")


# ----------------------------------------------------------------------------------------------------
@dataclass
class OcclusionResult:
    """Fig. 7 maps; prob[r][c] belongs to the occluder centred at (centers_y[r], centers_x[c])."""

    file: str | None
    label: int
    label_name: str
    target: str  # what `score` measures: "prob", "logit", "logprob" (of label) or a unit address
    feature_map: str | None  # "<layer>:<channel>": the top conv layer's strongest map on the clean image
    size: tuple[int, int]  # occluder height, width
    stride: tuple[int, int]
    baseline: str  # what occluded pixels were set to
    input_size: tuple[int, int]
    rows: list[tuple[int, int]]  # occluder extents [y0, y1) in input pixels
    cols: list[tuple[int, int]]
    centers_y: list[float]  # occluder centres in pixels of the image file (input pixels if no file)
    centers_x: list[float]
    score: np.ndarray  # (R, C) the target's score with the occluder there
    prob: np.ndarray  # (R, C) p(label)
    argmax_label: np.ndarray  # (R, C) most probable class
    activity: np.ndarray | None  # (R, C) total activation of `feature_map`
    clean_score: float
    clean_prob: float
    clean_activity: float | None
    top_location: tuple[int, int]  # where the feature map is strongest (its units' grid)
    method: dict = field(default_factory=dict)  # which method computed the maps, why, positions per method
    categories: list[str] = field(default_factory=list, repr=False)
    image: np.ndarray | None = field(default=None, repr=False)  # (H, W, 3) uint8 input as the model saw it
    projection: np.ndarray | None = field(default=None, repr=False)  # (3, H, W) deconv projection
    config: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        names = {int(i): self.categories[int(i)] if int(i) < len(self.categories) else str(int(i))
                 for i in np.unique(self.argmax_label)}
        return {"schema": 2, "file": self.file, "label": self.label, "label_name": self.label_name,
                "target": self.target, "feature_map": self.feature_map, "size": list(self.size),
                "stride": list(self.stride), "baseline": self.baseline, "input_size": list(self.input_size),
                "rows": [list(r) for r in self.rows], "cols": [list(c) for c in self.cols],
                "centers_y": self.centers_y, "centers_x": self.centers_x, "score": self.score.tolist(),
                "prob": self.prob.tolist(), "argmax_label": self.argmax_label.tolist(),
                "activity": None if self.activity is None else self.activity.tolist(),
                "clean_score": self.clean_score, "clean_prob": self.clean_prob, "clean_activity": self.clean_activity,
                "labels": {str(k): v for k, v in names.items()},
                "method": self.method, "config": self.config}

    def pixel_attribution(self) -> np.ndarray:
        """The per-pixel map Captum's Occlusion returns for this target: mean over the occluders covering
        a pixel of (clean score - occluded score)."""
        return pixel_attribution(self.clean_score - self.score, self.rows, self.cols, self.input_size)


def pixel_attribution(drop: np.ndarray, rows, cols, input_size) -> np.ndarray:
    """Spread per-position values over the pixels each occluder covers and average (Captum's convention)."""
    H, W = input_size
    total, count = np.zeros((H, W)), np.zeros((H, W))
    for r, (y0, y1) in enumerate(rows):
        for c, (x0, x1) in enumerate(cols):
            total[y0:y1, x0:x1] += drop[r, c]
            count[y0:y1, x0:x1] += 1
    return total / np.maximum(count, 1)


# ----------------------------------------------------------------------------------------------------
def baseline_image(x: torch.Tensor, baseline) -> tuple[torch.Tensor, str]:
    """What occluded pixels of x (1, C, H, W) are set to, in the model's input space, and its description.

    baseline: a number (0 = the preprocessing mean for normalized inputs); "mean": the image's own
    per-channel mean; "blur" or "blur:SIGMA": a Gaussian-blurred copy of the image (SIGMA in pixels, default
    1/20 of the shorter side); or a tensor broadcastable to (1, C, H, W) (e.g. (C, 1, 1) or (C, H, W)).
    """
    if isinstance(baseline, torch.Tensor):
        try:
            return baseline.to(x).expand_as(x if baseline.dim() == 4 else x[0]).reshape(x.shape), "tensor"
        except RuntimeError:
            raise ZfnetError(f"baseline tensor of shape {tuple(baseline.shape)} does not broadcast to the image's "
                             f"{tuple(x.shape[1:])}") from None
    if isinstance(baseline, (int, float)) and not isinstance(baseline, bool):
        return torch.full_like(x, float(baseline)), f"{float(baseline):g}"
    spec = str(baseline).strip()
    if spec == "mean":
        return x.mean((2, 3), keepdim=True).expand_as(x).clone(), "mean"
    if spec == "blur" or spec.startswith("blur:"):
        sigma = min(x.shape[-2:]) / 20
        if spec.startswith("blur:"):
            try:
                sigma = float(spec[5:])
            except ValueError:
                sigma = -1.0
            if not sigma > 0:
                raise ZfnetError(f"bad baseline {spec!r}: blur:SIGMA needs a positive SIGMA in pixels")
        return _blur(x, sigma), f"blur:{sigma:g}"
    try:
        return torch.full_like(x, float(spec)), f"{float(spec):g}"
    except ValueError:
        raise ZfnetError(f"bad baseline {spec!r}: use a number, 'mean', 'blur', 'blur:SIGMA' or a tensor") from None


def _blur(x, sigma):
    r = max(1, math.ceil(3 * sigma))
    t = torch.arange(-r, r + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-t ** 2 / (2 * sigma ** 2))
    k = k / k.sum()
    C = x.shape[1]
    y = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1).expand(C, 1, 1, -1), groups=C)
    return F.conv2d(F.pad(y, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1).expand(C, 1, -1, 1), groups=C)


def _prepare(model, image, preprocess):
    """(x (1, C, H, W), file name or None, (width, height) of the file or None, Preprocess)."""
    from PIL import Image

    from ..data.images import Preprocess, load_image

    pre = preprocess or Preprocess.for_model(model)
    if isinstance(image, torch.Tensor):
        if image.dim() not in (3, 4) or (image.dim() == 4 and len(image) != 1):
            raise ZfnetError(f"an image tensor must be (C, H, W) or (1, C, H, W), got {tuple(image.shape)}")
        return (image if image.dim() == 4 else image[None]), None, None, pre
    name = None
    if not isinstance(image, Image.Image):
        name, image = str(image), load_image(image)
    x = pre(image)
    if x.dim() != 3:
        raise ZfnetError("occlusion needs a single-crop preprocessing (crop='center')")
    return x[None], name, image.size, pre


def top_conv_layer(model: nn.Module, table=None) -> str:
    """The deepest rectified conv layer ("layer 5" of the paper's nets); for a model without conv layers,
    the layer feeding its output."""
    layers = feature_layers(model, table)
    return layers[-1] if layers else penultimate_layer(model, table)


def _hw(v, what: str) -> tuple[int, int]:
    """An int or (rows, cols) -> (rows, cols)."""
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
        return int(v), int(v)
    if isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(a, (int, np.integer)) for a in v):
        return int(v[0]), int(v[1])
    raise ZfnetError(f"occluder {what} must be an int or (rows, cols), got {v!r}")


def _known(name: str, table) -> str:
    base, _ = split_call(name)
    if name not in table and base not in table:
        table[name]  # raises, naming the valid layers
    return name


def occlusion(model: nn.Module, image, *, label=None, target: str | Unit = "prob", size=48, stride=16,
              baseline=0.0, layer: str | None = None, method: str = "auto", batch_size: int = 64,
              preprocess=None, project_map: bool = True, progress: bool = False):
    """Fig. 7: slide an occluder over the input and record, per position, the target's score, p(label),
    the most probable class and the total activation of the strongest feature map of `layer`.

    Args:
        image: an image file, a PIL image, or a preprocessed (C, H, W) / (1, C, H, W) tensor; or a list of
            those, or an (N, C, H, W) tensor with N > 1: then a list of results, one per image.
        label: the correct class (default: the clean image's top-1); a list gives one per image.
        target: what is scored: "prob" (p(label), the paper's), "logit" (the pre-softmax score of label),
            "logprob", or a unit address "layer:channel" (its map's total) / "layer:channel@y,x" (one unit),
            layer names as in the layer table ("layer4.1.relu#2" = that module's second call).
        size, stride: occluder height/width and step per axis, an int or (rows, cols); stride <= size.
        baseline: what occluded pixels become; see baseline_image (a number in the model's input space,
            "mean", "blur", "blur:SIGMA", a tensor).
        layer: the layer of panel (b) (default: the top conv layer).
        method: "auto" (the faster of incremental inference and full passes, measured), "incremental" or
            "naive" (full forward passes). result.method says which ran and why.
    """
    if isinstance(image, (list, tuple)) or (isinstance(image, torch.Tensor) and image.dim() == 4 and len(image) > 1):
        images = list(image)
        labels = label if isinstance(label, (list, tuple)) else [label] * len(images)
        if len(labels) != len(images):
            raise ZfnetError(f"{len(labels)} labels for {len(images)} images")
        return [occlusion(model, im, label=lab, target=target, size=size, stride=stride, baseline=baseline,
                          layer=layer, method=method, batch_size=batch_size, preprocess=preprocess,
                          project_map=project_map, progress=progress) for im, lab in zip(images, labels)]
    from ..models.weights import model_meta

    x, name, file_size, pre = _prepare(model, image, preprocess)
    p = next(model.parameters(), None)
    x = x.to(p.device if p is not None else "cpu")
    H, W = x.shape[-2:]
    (sh, sw), (th, tw) = _hw(size, "size"), _hw(stride, "stride")
    rows, cols = occluder_boxes(H, sh, th, "occluder height"), occluder_boxes(W, sw, tw, "occluder width")
    table = layer_table(model, (H, W), x.shape[1])  # at the image's own size and channels
    layer = _known(layer, table) if layer else _default_layer(model, table)
    unit = None if target in SCORES else parse_unit(target)
    if unit is not None:
        _known(unit.layer, table)
    tracks = [t for t in (layer, unit and unit.layer) if t]
    base, base_name = baseline_image(x, baseline)
    with torch.no_grad(), module_calls(model, tracks) as got:
        raw = model(x)
    clean_out = _scores(raw).reshape(1, -1)
    for i, t in enumerate(tracks):
        if i not in got:
            raise ZfnetError(f"layer {t} was not called in the forward pass (module {split_call(t)[0]} runs fewer "
                             f"times)")
    probs = clean_out.softmax(-1)[0]
    if label is None:
        label = int(probs.argmax())
    if not 0 <= label < probs.numel():
        raise ZfnetError(f"label {label} out of range 0..{probs.numel() - 1}")
    feature_map, channel, loc, locations = None, 0, (0, 0), [None] * len(tracks)
    if layer is not None:  # panel (b): the strongest map of the layer on the clean image
        fmap = got[0][0]  # (C, h, w) or (C,)
        flat = fmap.flatten(1) if fmap.dim() == 3 else fmap.reshape(-1, 1)
        channel = int(flat.max(1).values.argmax())
        loc = divmod(int(flat[channel].argmax()), fmap.shape[-1]) if fmap.dim() == 3 else (0, 0)
        feature_map, clean_activity = f"{layer}:{channel}", float(flat[channel].sum())
    if unit is not None:
        umap = got[len(tracks) - 1][0]
        _check_unit(unit, umap)
        locations[-1] = (unit.y, unit.x) if unit.y is not None else None
    boxes = [(y0, y1, x0, x1) for y0, y1 in rows for x0, x1 in cols]
    res = occluded_outputs(model, x, boxes, baseline=base, tracks=tracks, locations=locations, method=method,
                           batch_size=batch_size, progress=progress, reference=raw)
    R, C = len(rows), len(cols)
    out = _scores(res.outputs)
    prob = out.softmax(-1)[:, label]
    if unit is None:
        score = {"prob": prob, "logit": out[:, label], "logprob": out.log_softmax(-1)[:, label]}[target]
        clean_score = {"prob": probs[label], "logit": clean_out[0, label],
                       "logprob": clean_out[0].log_softmax(-1)[label]}[target]
    else:
        score = res.tracks[-1][:, unit.channel]
        if umap.dim() == 3:
            clean_score = umap[unit.channel].sum() if unit.y is None else umap[unit.channel, unit.y, unit.x]
        else:
            clean_score = umap.reshape(-1)[unit.channel]
    cy = [(y0 + y1 - 1) / 2 for y0, y1 in rows]
    cx = [(x0 + x1 - 1) / 2 for x0, x1 in cols]
    if file_size is not None:  # report centres in pixels of the file as given
        cy = pre.to_file(*file_size, cy, 0)[0].tolist()
        cx = pre.to_file(*file_size, 0, cx)[1].tolist()
    projection = None
    if project_map and layer is not None and fmap.dim() == 3:
        from ..engine.project import project

        projection = project(model, x, [Unit(layer, channel, *loc)], "deconv")[0, 0].cpu().numpy()
    cats = list(model_meta(model).categories or [])
    img = None
    if x.shape[1] == 3:
        img = (pre.unnormalize(x[0].cpu()).permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)

    def maps(t):
        return t.reshape(R, C).cpu().numpy()

    target_name = target if unit is None else str(unit)
    return OcclusionResult(
        file=name, label=label, label_name=cats[label] if label < len(cats) else str(label), target=target_name,
        feature_map=feature_map, size=(sh, sw), stride=(th, tw), baseline=base_name, input_size=(H, W), rows=rows,
        cols=cols, centers_y=cy, centers_x=cx, score=maps(score), prob=maps(prob), argmax_label=maps(out.argmax(-1)),
        activity=maps(res.tracks[0][:, channel]) if layer else None, clean_score=float(clean_score),
        clean_prob=float(probs[label]), clean_activity=clean_activity if layer else None, top_location=loc,
        method=res.to_json(), categories=cats, image=img, projection=projection,
        config={"size": [sh, sw], "stride": [th, tw], "baseline": base_name, "layer": layer, "label": label,
                "target": target_name, "method": method, "batch_size": batch_size, "preprocessing": pre.preset,
                "input_size": [H, W], "channels": int(x.shape[1])})


def _default_layer(model, table) -> str | None:
    """The top conv layer; for a model without conv layers the layer feeding its output; None for a
    model without any layer (panel (b) then stays empty)."""
    try:
        return top_conv_layer(model, table)
    except ZfnetError:
        return None


def _scores(out: torch.Tensor) -> torch.Tensor:
    """Model outputs as floats (a model may answer in integers)."""
    return out if out.is_floating_point() else out.to(torch.get_default_dtype())


def _check_unit(unit: Unit, value: torch.Tensor):
    """The unit's channel (and location) inside the layer's output as it ran on this image."""
    C = value.shape[0] if value.dim() else 1
    if not 0 <= unit.channel < C:
        raise ZfnetError(f"unit {unit}: channel {unit.channel} out of range 0..{C - 1} for layer {unit.layer}")
    if unit.y is not None:
        if value.dim() != 3:
            raise ZfnetError(f"unit {unit}: layer {unit.layer} has no spatial map (use {unit.layer}:{unit.channel})")
        h, w = value.shape[-2:]
        if not (0 <= unit.y < h and 0 <= unit.x < w):
            raise ZfnetError(f"unit {unit}: location ({unit.y},{unit.x}) outside the {h}x{w} output of layer "
                             f"{unit.layer}")


# ----------------------------------------------------------------------------------------------------
def render_occlusion(result: OcclusionResult, path: str | Path, max_legend: int = 12) -> Path:
    """The Fig. 7 row: (a) input, (b) feature-map activity, (c) its deconvnet projection, (d) the target's
    score (p(label) in the paper), (e) most probable label with a legend. Maps are drawn at the occluder
    centres over the input."""
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
    (sh, sw), (th, tw) = result.size, result.stride
    ax.set_title(f"(a) input, occluder {sh}x{sw}px / {th}x{tw}px ({result.baseline})\n"
                 f"true: {result.label_name[:30]}", fontsize=9)
    if result.activity is not None:
        im = axes[1].imshow(result.activity, extent=extent, cmap="jet")
        fig.colorbar(im, ax=axes[1], fraction=0.046)
        axes[1].set_title(f"(b) total activation of {result.feature_map}", fontsize=9)
    else:
        axes[1].set_title("(b) no layer to track", fontsize=9)
    if result.projection is not None:
        axes[2].imshow(signed_to_rgb(result.projection))
        ly, lx = result.top_location
        axes[2].set_title(f"(c) deconv projection of {result.feature_map}@{ly},{lx}", fontsize=9)
    else:
        axes[2].set_title("(c) projection not computed", fontsize=9)
    what = {"prob": "p", "logit": "logit", "logprob": "log p"}.get(result.target)
    if result.target == "prob":
        im = axes[3].imshow(result.score, extent=extent, cmap="jet", vmin=0, vmax=max(1e-6, float(result.score.max())))
    else:
        im = axes[3].imshow(result.score, extent=extent, cmap="jet")
    fig.colorbar(im, ax=axes[3], fraction=0.046)
    axes[3].set_title(f"(d) {what}({result.label_name[:24]})" if what else f"(d) {result.target}", fontsize=9)
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
