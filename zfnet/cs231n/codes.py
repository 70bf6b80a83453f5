"""t-SNE of the codes (CS231n notes, "Embedding the codes with t-SNE"): the codes of one layer (default: the
one feeding the classifier) for every image, embedded in 2-D so that images close in the code space are
close in the picture, then Karpathy's grid: the images at their 2-D positions, snapped to a full grid.

The codes come from zfnet.engine.features (pooled, cached on disk), are reduced to at most 50 dimensions by
PCA (as scikit-learn advises before t-SNE) and embedded with scikit-learn's (Barnes-Hut) t-SNE.
Snapping: the embedding is scaled into the unit square and each image gets its own grid cell, minimising
the total squared distance between images and cell centres (a linear assignment,
scipy.optimize.linear_sum_assignment), so neighbourhoods survive and no two images overlap.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch.nn as nn
from PIL import Image

from ..core.errors import NoInputError, ZfnetError
from ..core.results import write_json
from ..data.images import ImageDataset, list_images, load_image
from ..engine.features import default_cache_dir, extract_features
from ..inspect.layers import penultimate_layer
from ..present.render import save_figure, save_png

__all__ = ["CodesResult", "embed", "grid_shape", "snap_to_grid", "tsne", "render_grid", "render_scatter",
           "render_positions"]

SCHEMA = 1
PCA_DIMS = 50


def grid_shape(n: int) -> tuple[int, int]:
    """(rows, cols) of the smallest near-square grid with at least n cells."""
    cols = max(1, math.ceil(math.sqrt(n)))
    return math.ceil(n / cols), cols


def snap_to_grid(xy: np.ndarray, rows: int | None = None, cols: int | None = None) -> np.ndarray:
    """(N, 2) points -> (N, 2) distinct integer cells (row, col) of a rows x cols grid (default: the
    smallest near-square grid that holds them).

    The points are scaled into the unit square (x to columns, y to rows upwards, as a scatter plot shows
    them), and the cells chosen to minimise the total squared distance from each point to its cell's centre.
    """
    xy = np.asarray(xy, dtype=np.float64)
    n = len(xy)
    if n == 0:
        return np.zeros((0, 2), np.int64)
    rows, cols = (rows, cols) if rows and cols else grid_shape(n)
    if rows * cols < n:
        raise ZfnetError(f"a {rows} x {cols} grid cannot hold {n} images")
    from scipy.optimize import linear_sum_assignment

    lo, span = xy.min(0), np.ptp(xy, 0)
    u = (xy - lo) / np.where(span > 0, span, 1.0)
    u[:, 1] = 1.0 - u[:, 1]  # rows count downwards
    r, c = np.divmod(np.arange(rows * cols), cols)
    centres = np.stack([(c + 0.5) / cols, (r + 0.5) / rows], 1)
    cost = ((u[:, None, :] - centres[None, :, :]) ** 2).sum(-1)
    point, cell = linear_sum_assignment(cost)
    out = np.zeros((n, 2), np.int64)
    out[point] = np.stack([r[cell], c[cell]], 1)
    return out


def embed(codes: np.ndarray, *, perplexity: float | None = None, seed: int = 0) -> tuple[np.ndarray, dict]:
    """(N, D) codes -> (N, 2) t-SNE coordinates and what was done (PCA, perplexity, KL divergence)."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    x = np.asarray(codes, dtype=np.float64)
    n = len(x)
    if n < 4:
        raise ZfnetError(f"t-SNE needs at least 4 images, got {n}")
    info: dict = {"n": n, "dims": int(x.shape[1])}
    if x.shape[1] > PCA_DIMS and n > PCA_DIMS:
        x = PCA(PCA_DIMS, random_state=seed).fit_transform(x)
        info["pca"] = PCA_DIMS
    # sklearn needs perplexity < n; about n / 3 keeps small sets from collapsing into one blob
    p = float(perplexity) if perplexity else min(30.0, max(2.0, (n - 1) / 3.0))
    if not 0 < p < n:
        raise ZfnetError(f"perplexity must be in (0, {n}), not {p}")
    ts = TSNE(2, perplexity=p, init="pca", learning_rate="auto", random_state=seed)
    y = ts.fit_transform(x)
    info.update(perplexity=p, kl_divergence=float(ts.kl_divergence_), iterations=int(ts.n_iter_))
    return y.astype(np.float64), info


def _neighbour_agreement(x: np.ndarray, labels: np.ndarray, k: int = 5) -> float:
    """Share of each image's k nearest neighbours (leave-one-out) that have its class, in percent."""
    from sklearn.neighbors import NearestNeighbors

    k = min(k, len(x) - 1)
    idx = NearestNeighbors(n_neighbors=k + 1).fit(x).kneighbors(x, return_distance=False)[:, 1:]
    return float(100.0 * (labels[idx] == labels[:, None]).mean())


@dataclass
class CodesResult:
    layer: str
    pool: str
    files: list[str]
    labels: np.ndarray  # (N,), -1 without class folders
    classes: list[str] | None
    coords: np.ndarray  # (N, 2) t-SNE
    cells: np.ndarray  # (N, 2) (row, col) of the snapped grid
    grid_shape: tuple[int, int]
    info: dict = field(default_factory=dict)  # embedding and quality numbers
    skipped: list = field(default_factory=list)
    config: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"schema": SCHEMA, "kind": "tsne", "layer": self.layer, "pool": self.pool, "files": self.files,
                "labels": self.labels.tolist(), "classes": self.classes, "coords": self.coords.tolist(),
                "grid": self.cells.tolist(), "grid_shape": list(self.grid_shape), "embedding": self.info,
                "skipped": [list(s) for s in self.skipped], "config": self.config}


def _thumb(path: str, tile: int) -> np.ndarray:
    """The central square of an image, tile x tile pixels."""
    im = load_image(path)
    w, h = im.size
    s = min(w, h)
    im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)).resize((tile, tile),
                                                                                          Image.BILINEAR)
    return np.asarray(im)


def render_grid(result: CodesResult, path: str | os.PathLike, tile: int = 48) -> Path:
    """Karpathy's picture: every image in its snapped grid cell (white where no image landed)."""
    rows, cols = result.grid_shape
    canvas = np.full((rows * tile, cols * tile, 3), 255, np.uint8)
    for f, (r, c) in zip(result.files, result.cells):
        canvas[r * tile:(r + 1) * tile, c * tile:(c + 1) * tile] = _thumb(f, tile)
    return save_png(canvas, path)


def render_positions(result: CodesResult, path: str | os.PathLike, tile: int = 48) -> Path:
    """The images at their raw 2-D positions (later ones drawn over earlier ones), before snapping."""
    rows, cols = result.grid_shape
    H, W = rows * tile, cols * tile
    canvas = np.full((H + tile, W + tile, 3), 255, np.uint8)
    xy = result.coords
    lo, span = xy.min(0), np.ptp(xy, 0)
    u = (xy - lo) / np.where(span > 0, span, 1.0)
    for f, (a, b) in zip(result.files, u):
        x0, y0 = int(round(a * W)), int(round((1.0 - b) * H))
        canvas[y0:y0 + tile, x0:x0 + tile] = _thumb(f, tile)
    return save_png(canvas, path)


def render_scatter(result: CodesResult, path: str | os.PathLike) -> Path:
    """The 2-D codes as points coloured by class (a legend when there are at most 20 classes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 6))
    xy, labels = result.coords, result.labels
    if result.classes and (labels >= 0).any():
        cmap = plt.get_cmap("tab20" if len(result.classes) <= 20 else "hsv")
        for k in np.unique(labels):
            m = labels == k
            name = result.classes[k] if 0 <= k < len(result.classes) else "unlabelled"
            ax.scatter(xy[m, 0], xy[m, 1], s=14, color=cmap(k % 20 / 20 if len(result.classes) <= 20
                                                           else k / len(result.classes)), label=name[:24])
        if len(result.classes) <= 20:
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
    else:
        ax.scatter(xy[:, 0], xy[:, 1], s=14)
    ax.set_title(f"t-SNE of {result.layer} ({result.pool}-pooled), {len(xy)} images", fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
    return save_figure(fig, path)


def tsne(model: nn.Module, data, out: str | os.PathLike | None = None, *, layer: str | None = None,
         pool: str = "avg", perplexity: float | None = None, seed: int = 0, max_images: int | None = None,
         cache_dir=default_cache_dir, batch_size: int = 32, workers: int = 0, tile: int = 48,
         progress: bool = True, config: dict | None = None) -> CodesResult:
    """Embed the codes of `layer` for the images of `data` and draw them.

    Args:
        data: image folder (class subfolders colour the scatter).
        layer: module name (default: the layer feeding the classifier, zfnet.inspect.layers.penultimate_layer).
        pool: "avg", "max" or "flatten" for spatial layers.
        max_images: embed at most this many images, evenly spaced over the folder.
        cache_dir: feature cache (default ~/.cache/zfnet/features; None: no cache).
        out: result folder: result.json (coordinates), tsne_grid.png, tsne_positions.png, tsne_scatter.png.
    """
    layer = layer or penultimate_layer(model)
    paths, labels, classes = list_images(data)
    ds = ImageDataset(paths, labels).spread(max_images)
    by_path = {str(p): lab for p, lab in zip(paths, labels or [-1] * len(paths))}
    cache = cache_dir() if callable(cache_dir) else cache_dir
    feats = extract_features(model, ds.paths, [layer], pool=pool, batch_size=batch_size, workers=workers,
                             cache_dir=cache, progress=progress)
    if not feats.paths:
        raise NoInputError(f"no readable image in {data}", feats.skipped)
    codes = feats.get(layer, pool)
    y = np.asarray([by_path[p] for p in feats.paths], np.int64)
    coords, info = embed(codes, perplexity=perplexity, seed=seed)
    cells = snap_to_grid(coords)
    shape = grid_shape(len(cells))
    if classes and (y >= 0).all():
        info["same_class_neighbours"] = {"codes": _neighbour_agreement(codes, y),
                                         "embedding": _neighbour_agreement(coords, y), "k": 5}
    from sklearn.manifold import trustworthiness

    info["trustworthiness"] = float(trustworthiness(codes, coords, n_neighbors=min(5, len(codes) // 2 - 1)))
    result = CodesResult(layer, pool, feats.paths, y, classes, coords, cells, shape, info, list(feats.skipped),
                         dict(config or {}, layer=layer, pool=pool, perplexity=perplexity, seed=seed,
                              max_images=max_images, data=str(data)))
    if out is not None:
        out = Path(out)
        render_grid(result, out / "tsne_grid.png", tile)
        render_positions(result, out / "tsne_positions.png", tile)
        render_scatter(result, out / "tsne_scatter.png")
        meta = result.to_json()
        meta["figures"] = {"grid": "tsne_grid.png", "positions": "tsne_positions.png", "scatter": "tsne_scatter.png"}
        write_json(out / "result.json", meta)
    return result
