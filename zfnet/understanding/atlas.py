"""The feature atlas (Fig. 2): for every feature map, its 9 strongest activations across a dataset, each
projected to pixels with the deconvnet, beside the receptive-field patches of the input they came from.

`atlas()` = `mine()` (one streaming pass for all layers) + `project()` (deconvnet, many (unit, image)
pairs per backward pass) + cropping to each unit's receptive field (the layer table's window) + PNGs,
and finally the static HTML site of `zfnet.present.site`. Every step writes into one result folder:

    result.json            schema 1: model, data, config, per layer/channel the top-k entries, skipped files
    mine.npz               the mined arrays (value, image, y, x per layer), exact
    units/<slug>_proj.png  3x3 deconvnet projections of one unit (best first, row-major)
    units/<slug>_patch.png the 3x3 matching input patches
    layers/<layer>.png     a Fig. 2-style panel of the layer (projections | patches for a sample of units)
    index.html, layers/<layer>.html, units/<slug>.html   the site

Resuming (`resume=True`) continues the mining pass from its state file and skips layers whose pictures
are complete.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..core.distributed import init_distributed
from ..core.errors import ZfnetError
from ..core.progress import progress_bar
from ..core.results import read_json, save_npz, write_json
from ..data.images import ImageDataset, Preprocess
from ..engine.mine import MineResult, mine
from ..inspect.layers import Unit, feature_layers, layer_table
from ..present.render import grid, image_to_rgb, save_png, signed_to_rgb
from ..present.site import layer_files, unit_files

__all__ = ["AtlasResult", "atlas"]

SCHEMA = 1  # of result.json


@dataclass
class AtlasResult:
    out: Path
    mined: MineResult
    meta: dict = field(default_factory=dict)  # the result.json content

    def to_json(self) -> dict:
        return self.meta


# ----------------------------------------------------------------------------------------------------
def _tile(rgb: np.ndarray, tile: int) -> np.ndarray:
    """Scale a (h, w, 3) uint8 picture down so its longer side is at most `tile` pixels."""
    h, w = rgb.shape[:2]
    if max(h, w) <= tile:
        return rgb
    s = tile / max(h, w)
    return np.asarray(Image.fromarray(rgb).resize((max(1, round(w * s)), max(1, round(h * s))), Image.LANCZOS))


def _show_projection(g: torch.Tensor) -> np.ndarray:
    """A projection (3, h, w) -> RGB, 0 at mid grey. Deconvnet projections are sparse with a few extreme
    pixels, so scaling by the maximum alone leaves them nearly invisible (worse after downscaling); we
    scale by the 99.5th percentile of |g| and clip, as reconstructions are usually contrast-stretched."""
    a = g.abs().flatten()
    s = float(torch.quantile(a.float(), 0.995)) if a.numel() else 0.0
    if s <= 0:
        s = float(a.max()) if a.numel() else 0.0
    return signed_to_rgb((g / s).clamp(-1, 1) if s > 0 else g)


def _unit_grid(tiles: list[np.ndarray | None], k: int, size: tuple[int, int]) -> np.ndarray:
    ncol = math.ceil(math.sqrt(k))
    blank = np.full((*size, 3), 255, np.uint8)
    return grid([t if t is not None else blank for t in tiles] + [blank] * (k - len(tiles)), ncol)


def _project_layer(model, mined: MineResult, layer: str, table, dataset: ImageDataset, out: Path, *,
                   k: int, tile: int, batch_size: int, mode: str, channels, progress: bool, device, dtype):
    """Project every (unit, top image) pair of one layer and write the unit pictures."""
    from ..engine.project import project

    info = table[layer]
    H, W = table.input_size
    f = info.field
    # (image, channel, rank j, unit at its strongest location), by image: each image is decoded about once
    pairs = sorted((e["index"], c, j, Unit(layer, c, e["y"], e["x"])) for c in channels
                   for j, e in enumerate(mined.top(layer, c)))
    # Receptive-field crops pay off for small fields; for fields near the image size, clipped crops of many
    # shapes split a batch into small ones and cost more than they save (measured: 3x slower at 111/224 px).
    crop = f is not None and 2 * f.size_y <= H and 2 * f.size_x <= W
    proj: dict[tuple[int, int], np.ndarray] = {}
    patch: dict[tuple[int, int], np.ndarray] = {}
    cache: dict[int, torch.Tensor | None] = {}
    bar = progress_bar(total=len(pairs), desc=f"project {layer}", unit="proj", enabled=progress)
    try:
        for s in range(0, len(pairs), batch_size):
            chunk = pairs[s:s + batch_size]
            need = sorted({p[0] for p in chunk})
            cache = {i: cache[i] if i in cache else dataset[i][0] for i in need}  # keeps only this chunk's
            ok = [p for p in chunk if cache[p[0]] is not None]  # a file changed since mining
            if ok:
                x = torch.stack([cache[p[0]] for p in ok]).to(device, dtype)
                g = project(model, x, [p[3] for p in ok], mode, pairs=True, batch_size=batch_size,
                            crop=crop).float().cpu()
                pics = dataset.transform.unnormalize(x.float().cpu()) if hasattr(dataset.transform, "unnormalize") \
                    else x.float().cpu()
                for b, (_, c, j, u) in enumerate(ok):
                    box = info.window(u.y, u.x, (H, W))  # the exact input box the unit sees, clipped
                    win = (slice(None), slice(box[0], box[1]), slice(box[2], box[3]))
                    proj[c, j] = _tile(_show_projection(g[b][win]), tile)
                    patch[c, j] = _tile(image_to_rgb(pics[b][win]), tile)
            bar.update(len(chunk))
    finally:
        bar.close()
    sizes = [t.shape[:2] for t in proj.values()] or [(1, 1)]
    size = (max(s[0] for s in sizes), max(s[1] for s in sizes))
    for c in channels:
        files = unit_files(layer, c)
        save_png(_unit_grid([proj.get((c, j)) for j in range(k)], k, size), out / files["proj"])
        save_png(_unit_grid([patch.get((c, j)) for j in range(k)], k, size), out / files["patch"])


def _layer_figure(out: Path, layer: str, channels: list[int], n: int) -> str:
    """Fig. 2 style panel: for n units spread over the layer, projections | patches, 4 units a row."""
    pick = [channels[round(i * (len(channels) - 1) / max(n - 1, 1))] for i in range(min(n, len(channels)))]
    pick = list(dict.fromkeys(pick))
    blocks = []
    for c in pick:
        files = unit_files(layer, c)
        a = np.asarray(Image.open(out / files["proj"]).convert("RGB"))
        b = np.asarray(Image.open(out / files["patch"]).convert("RGB"))
        blocks.append(grid([a, b], 2, pad=2, fill=255))
    rel = layer_files(layer)["figure"]
    save_png(grid(blocks, min(4, len(blocks)), pad=8, fill=255), out / rel)
    return rel


# ----------------------------------------------------------------------------------------------------
def atlas(model: nn.Module, data, out: str | os.PathLike, layers: list[str] | None = None, *, k: int = 9,
          batch_size: int = 32, preprocess: Preprocess | None = None, resume: bool = False,
          progress: bool = True, workers: int = 0, tile: int = 64, mode: str = "deconv",
          figure_units: int = 16, model_name: str | None = None, weights: str | None = None,
          site: bool = True) -> AtlasResult:
    """Build the feature atlas of `model` over an image folder into the folder `out`.

    Args:
        data: image folder (or ImageDataset); paths in result.json are relative to it.
        layers: module names (default: `feature_layers(model)`).
        k: top activations per feature map (9 in the paper).
        batch_size: images per mining forward pass and projections per backward pass.
        resume: continue an interrupted run in `out` (otherwise an old state there is discarded).
        tile: largest side, in pixels, of each projection / patch picture.
        mode: projection rule, "deconv" (the paper), "guided" or "saliency".
        figure_units: units shown in each layer's Fig. 2-style panel.
        model_name, weights: recorded in result.json and shown on the site.
        site: also write the HTML pages (zfnet.present.site).
    Returns: AtlasResult; files as listed in the module docstring.
    """
    t0 = time.time()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ZfnetError(f"--out {out} is a file; the atlas needs a folder")
    if k < 1:
        raise ZfnetError(f"k must be at least 1, not {k}")
    out.mkdir(parents=True, exist_ok=True)
    preprocess = preprocess or Preprocess.for_model(model)
    if isinstance(data, ImageDataset):
        dataset = data if data.transform is preprocess else ImageDataset(data.paths, data.labels, preprocess)
        if getattr(data, "root", None) is not None:
            dataset.root = data.root
    else:
        dataset = ImageDataset.from_folder(data, preprocess)
    layers = list(dict.fromkeys(layers or feature_layers(model)))
    state = out / "mine-state.pt"
    dist_info, _ = init_distributed(str(next(model.parameters()).device))
    rank, world = dist_info.rank, dist_info.world
    if not resume and rank == 0:
        for old in [state, *out.glob("mine-state.pt.rank*")]:
            old.unlink(missing_ok=True)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
    mined = mine(model, dataset, layers, k=k, batch_size=batch_size, state=state, progress=progress,
                 workers=workers)
    t_mine = time.time() - t0
    if rank == 0:
        save_npz(out / "mine.npz", **{f"{n}.{key}": t.numpy() for n, d in mined.layers.items()
                                      for key, t in d.items()})

    p = next(model.parameters())
    table = layer_table(model, (preprocess.size, preprocess.size))
    done_marker = out / "layers" / ".done.json"
    done = read_json(done_marker) if resume and done_marker.exists() else {}
    figures, t_layers = {}, {}
    for name in layers:
        C = mined.layers[name]["value"].shape[0]
        key = f"{name}|{k}|{tile}|{mode}"
        if done.get(name) != key:
            t1 = time.time()
            mine_channels = [c for c in range(C) if c % world == rank]  # ranks share the projections
            _project_layer(model, mined, name, table, dataset, out, k=k, tile=tile, batch_size=batch_size,
                           mode=mode, channels=mine_channels, progress=progress, device=p.device, dtype=p.dtype)
            t_layers[name] = round(time.time() - t1, 3)
            if world > 1:
                import torch.distributed as dist

                dist.barrier()
        if rank == 0:
            figures[name] = _layer_figure(out, name, list(range(C)), figure_units)
            done[name] = key
            write_json(done_marker, done)
    t_total = time.time() - t0

    meta = mined.to_json()
    meta.update({
        "schema": SCHEMA,
        "model": model_name or type(model).__name__,
        "weights": weights,
        "data": str(Path(mined.root).resolve()) if mined.root else None,
        "config": {"layers": layers, "k": k, "batch_size": batch_size, "mode": mode, "tile": tile,
                   "preprocess": {"preset": preprocess.preset, "resize": preprocess.resize,
                                  "size": preprocess.size}, "world_size": world},
        "table": {n: table[n].to_json() for n in layers},
        "figures": figures,
        "timing": {"mine_s": round(t_mine, 3), "total_s": round(t_total, 3), "images": mined.images,
                   "project_s": t_layers},  # this run only (a resumed run skips finished layers)
    })
    meta = {"schema": SCHEMA, "model": meta.pop("model"), **meta}
    result = AtlasResult(out, mined, meta)
    if rank == 0:
        write_json(out / "result.json", meta)
        if site:
            from ..present.site import write_site

            write_site(out)
    return result
