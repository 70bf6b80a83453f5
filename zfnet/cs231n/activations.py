"""Layer activations (CS231n notes, "Layer Activations"): every channel's map for one image, as one grid per
layer, and over a folder the fraction of zeros of every channel, which shows dead channels (zero at every
position of every image, "a symptom of high learning rates") and sparse ones.

A zero is a unit that is not active. Rectified layers (ReLU outputs, SqueezeNet's Fire outputs) are told
apart from the others by their values, not their module kind: a layer with a negative value is not
rectified, and for it the fraction of non-positive values is counted instead; its result and one stderr
line say so.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ..core.errors import NoInputError, ZfnetError
from ..core.results import save_npz, write_json
from ..data.images import Batches, ImageDataset, Preprocess, as_input, list_images
from ..inspect.layers import feature_layers, file_safe, layer_table, run_with_taps
from ..present.render import enlarge, grey, grid, save_figure, save_png

__all__ = ["ActivationMaps", "Sparsity", "activation_maps", "channel_sparsity", "activations", "maps_grid",
           "render_sparsity", "DEFAULT_SPARSE"]

SCHEMA = 1
DEFAULT_SPARSE = 0.99  # a channel zero at >= 99 % of all positions over the data is flagged sparse


def _check_layers(model: nn.Module, layers, size: int) -> list[str]:
    table = layer_table(model, size)
    layers = list(dict.fromkeys(layers or feature_layers(model, table)))
    for name in layers:
        table[name]  # noqa: B018 -- ZfnetError naming the valid layers
    return layers


# ----------------------------------------------------------------------------------------------------
# One image: every channel's map.
@dataclass
class ActivationMaps:
    """The activations of one image: maps[layer] is (C, h, w) float32 ((C, 1, 1) for a vector layer)."""

    file: str | None
    maps: dict
    input_size: tuple[int, int]
    config: dict = field(default_factory=dict)

    def summary(self) -> dict:
        out = {}
        for name, m in self.maps.items():
            flat = m.reshape(m.shape[0], -1)
            out[name] = {"channels": int(m.shape[0]), "height": int(m.shape[1]), "width": int(m.shape[2]),
                         "min": float(m.min()), "max": float(m.max()), "rectified": bool(m.min() >= 0),
                         "zero_fraction": (flat <= 0).mean(1).round(6).tolist()}
        return out


@torch.no_grad()
def activation_maps(model: nn.Module, image, layers=None, *, preprocess: Preprocess | None = None) -> ActivationMaps:
    """Every channel's map of the chosen layers for one image.

    Args:
        image: an image file, a PIL image or a preprocessed (3, H, W) tensor.
        layers: module names (default: the feature layers, zfnet.inspect.layers.feature_layers).
    """
    pre = preprocess or Preprocess.for_model(model)
    name, x = as_input(image, pre)
    layers = _check_layers(model, layers, x.shape[-1])
    p = next(model.parameters())
    was = model.training
    model.eval()
    try:
        out = run_with_taps(model, x[None].to(p.device, p.dtype), layers)
    finally:
        model.train(was)
    maps = {}
    for n in layers:
        t = out[n][0].float().cpu()
        maps[n] = (t if t.dim() == 3 else t.reshape(-1, 1, 1)).numpy()
    return ActivationMaps(name, maps, tuple(x.shape[-2:]), {"layers": layers, "preprocessing": pre.preset,
                                                              "input_size": pre.size})


def maps_grid(maps: np.ndarray, tile: int = 24) -> tuple[np.ndarray, float]:
    """(C, h, w) maps -> one grey picture, channel c in row-major cell c of a ceil(sqrt(C))-wide grid, and
    the display scale. One scale for the whole layer (its 99.9th percentile of |value|), so weak and dead
    channels look dark beside strong ones: 0 is black for a rectified layer, mid grey for a signed one."""
    a = np.abs(maps)
    vmax = float(np.quantile(a, 0.999)) if a.size else 0.0
    if vmax <= 0:
        vmax = float(a.max()) if a.size else 0.0
    vmax = vmax or 1.0
    lo = 0.0 if maps.min() >= 0 else -vmax
    factor = max(1, math.ceil(tile / max(maps.shape[1:])))
    tiles = [enlarge(grey(m, lo, vmax), factor) for m in maps]
    return grid(tiles, ncol=math.ceil(math.sqrt(len(tiles))), pad=1, fill=255), vmax


# ----------------------------------------------------------------------------------------------------
# A folder: the fraction of zeros per channel.
@dataclass
class Sparsity:
    """Per layer and channel over a set of images: zero_fraction (share of all positions <= 0), all_zero
    (share of images whose whole map is <= 0), max (largest value); dead = all_zero on every image,
    sparse = zero_fraction >= the threshold (dead excluded)."""

    layers: dict  # name -> {"zero_fraction", "all_zero", "max", "dead", "sparse", "rectified"}
    images: int
    threshold: float
    skipped: list = field(default_factory=list)
    config: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"layers": self.layers, "images": self.images, "threshold": self.threshold,
                "skipped": [list(s) for s in self.skipped]}


def _counts(name, t):
    """Reduce a tapped output inside the hook: per image and channel, non-positive count and positions."""
    t = t.detach().float()
    flat = t.flatten(2) if t.dim() > 2 else t.reshape(t.shape[0], -1, 1)
    off = flat <= 0
    return off.sum(2).cpu(), off.all(2).cpu(), flat.amax(2).cpu(), flat.amin(2).amin(0).cpu(), flat.shape[2]


@torch.no_grad()
def channel_sparsity(model: nn.Module, data, layers=None, *, sparse: float = DEFAULT_SPARSE,
                     max_images: int | None = None, batch_size: int = 32, preprocess: Preprocess | None = None,
                     workers: int = 0, progress: bool = True) -> Sparsity:
    """The fraction of zeros of every channel of the chosen layers over an image folder (or ImageDataset).

    Args:
        sparse: zero fraction at or above which a (not dead) channel is flagged sparse.
        max_images: use at most this many images, evenly spaced over the folder.
    Returns: Sparsity; unreadable images are skipped and listed.
    """
    if not 0 < sparse <= 1:
        raise ZfnetError(f"sparse threshold must be in (0, 1], not {sparse}")
    pre = preprocess or Preprocess.for_model(model)
    ds = data if isinstance(data, ImageDataset) else ImageDataset(list_images(data)[0], transform=pre)
    ds = ds.spread(max_images, pre)
    layers = _check_layers(model, layers, pre.size)
    p = next(model.parameters())
    acc: dict = {}  # layer -> {"off", "all_off", "max", "low", "positions"} summed over the images so far
    images = 0
    batches = Batches(ds, batch_size, workers, progress, desc="activations")
    was = model.training
    model.eval()
    try:
        for x, _, idx in batches:
            out = run_with_taps(model, x.to(p.device, p.dtype), layers, reduce=_counts)
            for n in layers:
                off, all_off, mx, mn, positions = out[n]
                a = acc.setdefault(n, {"off": 0, "all_off": 0, "max": mx.amax(0), "low": math.inf,
                                       "positions": positions})
                a["off"] = a["off"] + off.sum(0).double()
                a["all_off"] = a["all_off"] + all_off.sum(0).double()
                a["max"] = torch.maximum(a["max"], mx.amax(0))
                a["low"] = min(a["low"], float(mn.min()))
            images += len(idx)
    finally:
        model.train(was)
    result = {}
    for n, a in acc.items():
        zero = (a["off"] / (images * a["positions"])).numpy()
        all_zero = (a["all_off"] / images).numpy()
        dead = [int(c) for c in np.flatnonzero(all_zero >= 1)]
        result[n] = {"zero_fraction": zero.round(6).tolist(), "all_zero": all_zero.round(6).tolist(),
                     "max": a["max"].numpy().tolist(), "dead": dead,
                     "sparse": [int(c) for c in np.flatnonzero(zero >= sparse) if c not in set(dead)],
                     "rectified": bool(a["low"] >= 0)}
        if not result[n]["rectified"]:
            print(f"zfnet: activations: {n} has negative values (not rectified): its zero fraction counts "
                  f"values <= 0", file=sys.stderr)
    return Sparsity(result, images, sparse, list(batches.skipped),
                    {"layers": layers, "sparse": sparse, "max_images": max_images, "preprocessing": pre.preset})


def render_sparsity(result: Sparsity, path: str | os.PathLike) -> Path:
    """One panel per layer: channels sorted by zero fraction, dead ones red, sparse ones orange."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result.layers)
    cols = min(3, max(1, len(names)))
    rows = max(1, math.ceil(len(names) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.6 * rows), squeeze=False)
    for ax in axes.ravel()[len(names):]:
        ax.axis("off")
    for ax, n in zip(axes.ravel(), names):
        d = result.layers[n]
        z = np.asarray(d["zero_fraction"])
        order = np.argsort(z)
        colors = np.full(len(z), "tab:blue", dtype=object)
        colors[d["sparse"]] = "tab:orange"
        colors[d["dead"]] = "tab:red"
        ax.bar(np.arange(len(z)), z[order], width=1.0, color=list(colors[order]))
        ax.axhline(result.threshold, color="0.5", lw=0.8, ls="--")
        ax.set_ylim(0, 1.02)
        ax.set_title(f"{n}: {len(d['dead'])} dead, {len(d['sparse'])} sparse of {len(z)}", fontsize=9)
        ax.set_xlabel("channels, sorted", fontsize=8)
        ax.set_ylabel("fraction of zeros" if d["rectified"] else "fraction <= 0", fontsize=8)
    fig.suptitle(f"fraction of zeros per channel over {result.images} images", fontsize=10)
    return save_figure(fig, path)


# ----------------------------------------------------------------------------------------------------
def activations(model: nn.Module, path, out: str | os.PathLike, layers=None, *, sparse: float = DEFAULT_SPARSE,
                max_images: int | None = None, batch_size: int = 32, preprocess: Preprocess | None = None,
                tile: int = 24, workers: int = 0, progress: bool = True, config: dict | None = None) -> dict:
    """`zfnet activations`: for an image, one grid of every channel's map per layer; for a folder, the
    fraction of zeros per channel over its images (dead and sparse channels flagged) and the grids of its
    first readable image. Writes into `out`: result.json, maps.npz, <layer>.png (grids), sparsity.png.

    Returns: the result.json content.
    """
    pre = preprocess or Preprocess.for_model(model)
    out = Path(out)
    path = Path(path)
    result: dict = {"schema": SCHEMA, "kind": "activations", "config": dict(config or {})}
    first = path
    if path.is_dir():
        sp = channel_sparsity(model, path, layers, sparse=sparse, max_images=max_images, batch_size=batch_size,
                              preprocess=pre, workers=workers, progress=progress)
        if not sp.images:
            raise NoInputError(f"no readable image in {path}", sp.skipped)
        result["sparsity"] = sp.to_json()
        result["figures"] = {"sparsity": "sparsity.png"}
        render_sparsity(sp, out / "sparsity.png")
        bad = {s[0] for s in sp.skipped}
        first = next(p for p in ImageDataset(list_images(path)[0]).spread(max_images).paths if str(p) not in bad)
    maps = activation_maps(model, first, layers, preprocess=pre)
    result["file"] = str(first)
    result["input_size"] = list(maps.input_size)
    summary = maps.summary()
    figures = result.setdefault("figures", {})
    for n, m in maps.maps.items():
        picture, vmax = maps_grid(m, tile)
        rel = f"{file_safe(n)}.png"
        save_png(picture, out / rel)
        summary[n].update(display_max=vmax, figure=rel)
        figures[n] = rel
    result["layers"] = summary
    result["config"].update(maps.config, sparse=sparse, max_images=max_images, tile=tile)
    save_npz(out / "maps.npz", **{n: m for n, m in maps.maps.items()})
    write_json(out / "result.json", result)
    return result
