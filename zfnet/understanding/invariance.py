"""Feature invariance under translation, scale and rotation (Sec. 4, Fig. 5).

Each image is transformed (vertical shift, zoom about the centre, rotation about the centre) after the
resize step and before the final crop, so the frame is filled with real image content where it exists
and with the preprocessing mean (0 after normalization) elsewhere. For chosen layers we measure the
Euclidean distance between the feature vectors of the original and the transformed image, raw and
divided by the original's norm (so layers of different scale compare), and p(true label).
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
from ..core.progress import progress_bar
from ..inspect.layers import feature_layers, layer_table, penultimate_layer, taps

__all__ = ["InvarianceResult", "invariance", "penultimate_layer", "default_layers", "transform_image",
           "render_invariance", "DEFAULT_SWEEPS"]

DEFAULT_SWEEPS = {
    "translate": [float(t) for t in range(-60, 61, 10)],  # vertical shift in pixels (Fig. 5 a)
    "scale": [round(1.0 + 0.1 * i, 2) for i in range(9)],  # zoom 1.0 .. 1.8 (Fig. 5 b)
    "rotate": [float(a) for a in range(0, 361, 15)],  # degrees (Fig. 5 c)
}



def default_layers(model: nn.Module) -> list[str]:
    """Layer 1 (first rectified conv output) and the penultimate layer."""
    return list(dict.fromkeys([feature_layers(model)[0], penultimate_layer(model)]))


def _theta(M: np.ndarray, b: np.ndarray, H: int, W: int) -> torch.Tensor:
    """An output->input pixel map about the image centre, in affine_grid's normalized coordinates."""
    D = np.diag([W / 2.0, H / 2.0])
    Dinv = np.diag([2.0 / W, 2.0 / H])
    A = Dinv @ M @ D
    return torch.tensor(np.concatenate([A, (Dinv @ b)[:, None]], 1), dtype=torch.float32)


def transform_image(x: torch.Tensor, kind: str, value: float) -> torch.Tensor:
    """Transform a normalized (3, H, W) image; uncovered pixels get 0 (the mean). Identity is exact.

    translate: content moves down by `value` pixels; scale: zoom in by `value` about the centre;
    rotate: `value` degrees counter-clockwise about the centre.
    """
    H, W = x.shape[-2:]
    if kind == "translate":
        if value == int(value):  # whole pixels: an exact shift, no resampling
            t, out = int(value), torch.zeros_like(x)
            if abs(t) < H:
                out[..., max(t, 0):H + min(t, 0), :] = x[..., max(-t, 0):H - max(t, 0), :]
            return out
        M, b = np.eye(2), np.array([0.0, -value])
    elif kind == "scale":
        if value <= 0:
            raise ZfnetError(f"scale must be > 0, got {value}")
        if value == 1:
            return x.clone()
        M, b = np.eye(2) / value, np.zeros(2)
    elif kind == "rotate":
        if value % 360 == 0:
            return x.clone()
        a = math.radians(value)
        M, b = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]]), np.zeros(2)
    else:
        raise ZfnetError(f"unknown transform {kind!r}; use translate, scale or rotate")
    theta = _theta(M, b, H, W).to(x)[None]
    grid = F.affine_grid(theta, [1, *x.shape], align_corners=False)
    return F.grid_sample(x[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]


@dataclass
class InvarianceResult:
    files: list[str]
    labels: list[int]
    label_names: list[str]
    layers: list[str]
    sweeps: dict  # transform -> values
    distance: dict  # transform -> layer -> (N, T) Euclidean distance to the original's features
    normalized: dict  # the same divided by the original's feature norm
    prob: dict  # transform -> (N, T) p(true label)
    skipped: list = field(default_factory=list)
    config: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        tl = lambda d: {k: (tl(v) if isinstance(v, dict) else np.asarray(v).tolist()) for k, v in d.items()}  # noqa: E731
        return {"schema": 1, "files": self.files, "labels": self.labels, "label_names": self.label_names,
                "layers": self.layers, "sweeps": self.sweeps, "distance": tl(self.distance),
                "normalized": tl(self.normalized), "prob": tl(self.prob),
                "skipped": [list(s) for s in self.skipped], "config": self.config}


def invariance(model: nn.Module, images, *, labels: list[int] | None = None, layers: list[str] | None = None,
               sweeps: dict | None = None, batch_size: int = 32, preprocess=None,
               progress: bool = False) -> InvarianceResult:
    """Fig. 5 sweeps for image files (unreadable ones are skipped and listed in `skipped`).

    Args:
        labels: true class per image (default: the top-1 class of the untransformed image).
        layers: layers whose feature vectors are compared (default: layer 1 and the penultimate layer).
        sweeps: {"translate": [...px], "scale": [...], "rotate": [...deg]} (default DEFAULT_SWEEPS).
    """

    from ..data.images import Preprocess, load_image
    from ..models.weights import model_meta

    pre = preprocess or Preprocess.for_model(model)
    sweeps = {k: [float(v) for v in vals] for k, vals in (sweeps or DEFAULT_SWEEPS).items()}
    for k in sweeps:
        if k not in ("translate", "scale", "rotate"):
            raise ZfnetError(f"unknown transform {k!r}; use translate, scale or rotate")
    layers = list(dict.fromkeys(layers or default_layers(model)))
    images = [str(p) for p in images]
    if labels is not None and len(labels) != len(images):
        raise ZfnetError(f"got {len(labels)} labels for {len(images)} images")
    table = layer_table(model, pre.size)
    for name in layers:
        table[name]  # noqa: B018 -- raises ZfnetError naming the valid layers
    device = next(model.parameters()).device
    cats = list(model_meta(model).categories or [])
    files, labs, skipped = [], [], []
    dist = {k: {name: [] for name in layers} for k in sweeps}
    norm = {k: {name: [] for name in layers} for k in sweeps}
    prob = {k: [] for k in sweeps}
    # batch rows: 0 = the image itself, then each sweep's values in one contiguous block
    spans, r = {}, 1
    for k, vals in sweeps.items():
        spans[k], r = slice(r, r + len(vals)), r + len(vals)
    for i, path in enumerate(progress_bar(images, desc="invariance", unit="img", enabled=progress)):
        try:
            base = pre.base(load_image(path))
        except ZfnetError as e:
            skipped.append((path, str(e)))
            continue
        # .clone(): a crop is a view that would keep its whole transformed image alive until the stack
        batch = [pre.center(base)] + [pre.center(transform_image(base, k, v)).clone() for k, vals in sweeps.items()
                                      for v in vals]
        x = torch.stack(batch).to(device)
        feats, outs = {name: [] for name in layers}, []
        with torch.no_grad():
            for b in range(0, len(x), batch_size):
                with taps(model, layers) as tapped:
                    outs.append(model(x[b:b + batch_size]).reshape(min(batch_size, len(x) - b), -1))
                for name in layers:
                    feats[name].append(tapped[name].flatten(1))
        p = torch.cat(outs).softmax(-1)
        label = int(p[0].argmax()) if labels is None else int(labels[i])
        if not 0 <= label < p.shape[1]:
            raise ZfnetError(f"label {label} out of range 0..{p.shape[1] - 1} for {path}")
        files.append(path)
        labs.append(label)
        pl = p[:, label].double().cpu().numpy()
        for k in sweeps:
            prob[k].append(pl[spans[k]])
        for name in layers:
            f = torch.cat(feats[name]).double()
            d = (f - f[0]).norm(dim=1).cpu().numpy()  # row 0: distance 0 to itself
            ref = max(float(f[0].norm()), 1e-12)
            for k in sweeps:
                dist[k][name].append(d[spans[k]])
                norm[k][name].append(d[spans[k]] / ref)

    def arr(rows, k):  # (images, sweep values), also when every image was skipped
        return np.array(rows, dtype=float).reshape(len(files), len(sweeps[k]))

    return InvarianceResult(
        files=files, labels=labs, label_names=[cats[i] if i < len(cats) else str(i) for i in labs],
        layers=layers, sweeps=sweeps, distance={k: {n: arr(v, k) for n, v in d.items()} for k, d in dist.items()},
        normalized={k: {n: arr(v, k) for n, v in d.items()} for k, d in norm.items()},
        prob={k: arr(v, k) for k, v in prob.items()},
        skipped=skipped, config={"layers": layers, "sweeps": sweeps, "labels": labels,
                                 "preprocessing": pre.preset, "input_size": pre.size})


_XLABEL = {"translate": "vertical translation (pixels)", "scale": "scale (ratio)", "rotate": "rotation (degrees)"}


def render_invariance(result: InvarianceResult, path: str | Path, normalized: bool = True) -> Path:
    """Fig. 5: one column per transform; rows = each layer's feature distance, then p(true label)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..core.results import atomic_path

    kinds = list(result.sweeps)
    rows = len(result.layers) + 1
    fig, axes = plt.subplots(rows, len(kinds), figsize=(4.2 * len(kinds), 2.8 * rows), squeeze=False)
    data = result.normalized if normalized else result.distance
    for c, k in enumerate(kinds):
        xs = result.sweeps[k]
        for r, name in enumerate(result.layers):
            ax = axes[r][c]
            for n, lab in enumerate(result.label_names):
                ax.plot(xs, data[k][name][n], marker=".", label=lab[:24])
            ax.set_ylabel(f"{name}\n{'normalized ' if normalized else ''}distance", fontsize=8)
        ax = axes[-1][c]
        for n, lab in enumerate(result.label_names):
            ax.plot(xs, result.prob[k][n], marker=".", label=lab[:24])
        ax.set_ylabel("p(true label)", fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_xlabel(_XLABEL[k])
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1), frameon=False)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
    return Path(path)
