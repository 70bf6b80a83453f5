"""The feature atlas (Fig. 2): for every feature map, its 9 strongest activations across a dataset, each
projected to pixels with the deconvnet, beside the receptive-field patches of the input they came from.

`atlas()` = `mine()` (one streaming pass for all layers: top-k distinct images per unit, its firing
statistics, every image's top-1 prediction) + the projection phase (`atlas_tiles`: deconvnet, cropped to
each unit's field, one tile size per layer) + the static HTML site of `zfnet.present.site`. Every step
writes into one result folder:

    result.json            schema 2: model, data, config, per layer/unit the top-k entries (image, value,
                           location, field box), per unit its statistics and class tags, dead units
    mine.npz               the mined arrays (value, image, y, x per layer, the top N), exact
    mine-state.pt          while the run is not finished: the mining pass's resume state
    images/<index>.<ext>   each source image as the network saw it (the patches and field boxes come
                           from it)
    units/<unit>.<ext>     the unit's k deconvnet projections, 3 x 3, best first (row-major)
    layers/<layer>.<ext>   a Fig. 2 panel of the layer (projections | patches of a seeded random subset)
    index.html, layers/<layer>.html, units/<unit>.html, search.js   the site

A unit with fewer than k positive activations shows what it has; one that never fires is dead (counted
per layer). Resuming (`resume=True`) continues the mining pass from its state file and the projection
phase at its first unfinished chunk; the files are the same as those of an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from ..core.distributed import init_distributed
from ..core.errors import ZfnetError
from ..core.progress import format_seconds, progress_bar
from ..core.results import read_json, save_npz, write_json
from ..data.images import ImageDataset, Preprocess
from ..engine.mine import MineResult, mine, model_fingerprint, shard_state
from ..engine.rules import rules_on_path
from ..inspect.layers import feature_layers, file_safe, layer_table
from ..models.weights import model_meta
from ..present.render import PICTURE_EXT
from .atlas_tiles import (
    CHUNK_INPUT_BYTES,
    CHUNK_PAIRS,
    Inputs,
    chunks,
    field_box,
    image_view,
    layer_layout,
    layer_panel,
    panel_units,
    project_units,
    unit_picture,
)

__all__ = ["AtlasResult", "atlas"]

SCHEMA = 2  # of result.json
QUANTILES = (0.5, 0.9, 0.99)  # of a unit's per-image maximum, shown on its page
_PROGRESS = ".atlas-progress.json"  # the projection phase's resume record


@dataclass
class AtlasResult:
    out: Path
    mined: MineResult
    meta: dict = field(default_factory=dict)  # the result.json content

    def to_json(self) -> dict:
        return self.meta

    @property
    def dead(self) -> dict[str, list[int]]:
        return self.meta.get("dead", {})

    def summary(self) -> str:
        """The closing lines of a run: units, dead units, time, size, where to open it."""
        units = sum(len(v) for v in self.meta["layers"].values())
        dead = sum(len(v) for v in self.dead.values())
        t = self.meta.get("timing", {})
        size = sum(p.stat().st_size for p in self.out.rglob("*") if p.is_file() and not p.name.startswith("."))
        n = len(self.meta["layers"])
        return (f"atlas of {self.meta['images']} images, {n} layer{'s' if n != 1 else ''}, {units} units "
                f"({dead} dead) in {format_seconds(t.get('total_s', 0))} (mining {format_seconds(t.get('mine_s', 0))})"
                f", {size / 1e6:.1f} MB in {self.out}\nopen {self.out / 'index.html'} in a browser")


def _dataset(data, preprocess: Preprocess) -> ImageDataset:
    if isinstance(data, ImageDataset):
        ds = data if data.transform is preprocess else ImageDataset(data.paths, data.labels, preprocess)
        for attr in ("root", "classes"):
            if getattr(data, attr, None) is not None:
                setattr(ds, attr, getattr(data, attr))
        return ds
    return ImageDataset.from_folder(data, preprocess)


def _run_key(model, mined: MineResult, layers, k, mode, tile, seed, figure_units) -> str:
    """What the projection phase's files depend on: a resumed run continues only when it matches."""
    h = hashlib.sha256(model_fingerprint(model).encode())
    h.update(f"{layers}|{k}|{mode}|{tile}|{seed}|{figure_units}|{CHUNK_PAIRS}|{CHUNK_INPUT_BYTES}|{PICTURE_EXT}".encode())
    h.update("\n".join(mined.paths).encode())
    for name in layers:
        for key in ("image", "y", "x"):
            h.update(mined.layers[name][key][:, :k].contiguous().numpy().tobytes())
    return h.hexdigest()


def _clear_pictures(out: Path):
    """A fresh run starts without the pictures and pages of an earlier one (only the atlas's own files)."""
    for sub in ("units", "layers", "images"):
        if (out / sub).is_dir():
            shutil.rmtree(out / sub)
    (out / _PROGRESS).unlink(missing_ok=True)


_PARTIAL = re.compile(r"^\..+\.[A-Za-z0-9_]{8}(\.[A-Za-z0-9]+)?$")  # atomic_path's temporary names


def _remove_partial_writes(out: Path):
    """Temporary files of writes a killed run left unfinished (atomic writes never leave a half file in
    place, but their temporary file stays)."""
    for folder in (out, out / "units", out / "layers", out / "images"):
        if folder.is_dir():
            for p in folder.iterdir():
                if p.is_file() and _PARTIAL.match(p.name):
                    p.unlink(missing_ok=True)


def _class_name(names, i: int) -> str:
    return names[i] if names and i < len(names) else f"class {i}"


def _tags(ids: list[int], names, n: int = 3) -> list[list]:
    """The n most frequent class names among ids (>= 0), with their counts, most frequent first (ties:
    lower class index)."""
    counts = Counter(i for i in ids if i >= 0)
    top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:n]
    return [[_class_name(names, i), c] for i, c in top]


# ----------------------------------------------------------------------------------------------------
def atlas(model: nn.Module, data, out: str | os.PathLike, layers: list[str] | None = None, *, k: int = 9,
          batch_size: int = 32, preprocess: Preprocess | None = None, resume: bool = False,
          progress: bool = True, workers: int = 0, tile: int = 112, mode: str = "deconv",
          figure_units: int = 12, model_name: str | None = None, weights: str | None = None,
          site: bool = True, per_image: int = 1, top_n: int = 50, seed: int = 0,
          cache_bytes: int = 1 << 30) -> AtlasResult:
    """Build the feature atlas of `model` over an image folder into the folder `out`.

    Args:
        data: image folder (or ImageDataset); paths in result.json are relative to it. Class subfolders
            give each image its label.
        layers: module names (default: `feature_layers(model)`).
        k: top activations shown per feature map (9 in the paper).
        batch_size: images per mining forward pass.
        resume: continue an interrupted run in `out` (otherwise an old run there is discarded).
        tile: largest side, in pixels, of each tile (smaller fields are enlarged, up to it).
        mode: projection rule, "deconv" (the paper), "guided" or "saliency".
        figure_units: units in each layer's Fig. 2 panel (a random choice, seeded by `seed`).
        per_image: locations one image may contribute to a unit's top k (1: k distinct images).
        top_n: images behind each unit's class tags (the most frequent classes among its top N).
        cache_bytes: memory for decoded images in the projection phase.
        model_name, weights: recorded in result.json and shown on the site.
        site: also write the HTML pages (zfnet.present.site).
    Returns: AtlasResult; files as listed in the module docstring.
    """
    t0 = time.time()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ZfnetError(f"--out {out} is a file; the atlas needs a folder")
    for name, v in (("k", k), ("tile", tile), ("per_image", per_image), ("top_n", top_n)):
        if v < 1:
            raise ZfnetError(f"{name} must be at least 1, not {v}")
    out.mkdir(parents=True, exist_ok=True)
    preprocess = preprocess or Preprocess.for_model(model)
    dataset = _dataset(data, preprocess)
    layers = list(dict.fromkeys(layers or feature_layers(model)))
    if not layers:
        raise ZfnetError("no layers for the atlas")
    state = out / "mine-state.pt"
    dist_info, _ = init_distributed(str(next(model.parameters()).device))
    rank, world = dist_info.rank, dist_info.world
    if rank == 0:
        _remove_partial_writes(out)
    if not resume and rank == 0:
        for old in [state, *out.glob("mine-state.pt.rank*")]:
            old.unlink(missing_ok=True)
    _barrier(world)
    mined = mine(model, dataset, layers, k=max(k, top_n), batch_size=batch_size, state=state, progress=progress,
                 workers=workers, per_image=per_image, positive=True, predict=True)
    t_mine = time.time() - t0
    if not resume and rank == 0:  # only now: a run that can mine nothing loses nothing of an earlier atlas
        _clear_pictures(out)
    _barrier(world)
    if rank == 0:
        arrays = {f"{n}.{key}": t.numpy() if key == "value" else t.int().numpy()  # indices fit 32 bits
                  for n, d in mined.layers.items() for key, t in d.items()}
        arrays.update({f"{n}.fires": s["fires"].numpy() for n, s in mined.stats.items()})
        if mined.predictions is not None:
            arrays.update(predictions=mined.predictions.numpy(), confidence=mined.confidence.numpy())
        save_npz(out / "mine.npz", **arrays)

    p = next(model.parameters())
    size = (preprocess.size, preprocess.size)
    table = layer_table(model, size)
    layouts = {n: layer_layout(table[n], size, tile) for n in layers}
    gated = [n for n in layers if table[n].gated]
    if gated and rank == 0:
        print(f"zfnet: atlas: {', '.join(gated)}: past a global gate every unit sees the whole image; patches "
              f"and projections are cropped to the local field (result.json table: crop_field)", file=sys.stderr)
    key = _run_key(model, mined, layers, k, mode, tile, seed, figure_units)
    record = read_json(out / _PROGRESS) if resume and (out / _PROGRESS).exists() else {}
    if record.get("key") != key:
        if rank == 0:
            if record:
                print(f"zfnet: atlas: {out} holds pictures of another run; they are made again", file=sys.stderr)
                _clear_pictures(out)
            write_json(out / _PROGRESS, {"key": key, "done": []})
        _barrier(world)
        record = {"key": key, "done": []}
    done = list(record["done"])

    # ---- projection phase: chunks of whole units, ranks share the channels
    inputs = Inputs(dataset, out, cache_bytes)
    image_bytes = 3 * size[0] * size[1] * p.element_size()
    todo = {}
    for name in layers:
        if name in done:
            continue
        C = mined.layers[name]["value"].shape[0]
        mine_ch = [c for c in range(C) if c % world == rank]
        todo[name] = [ch for ch in chunks(mined, name, mine_ch, k, image_bytes)
                      if not all((out / unit_picture(name, c)).exists() for c in ch)]
    total = sum(len(mined.top(n, c, k)) for n, cs in todo.items() for ch in cs for c in ch)
    bar = progress_bar(total=total, desc="project", unit="proj", enabled=progress)
    t_layers = {}
    try:
        for name in layers:
            if name in done:
                continue
            t1 = time.time()
            bar.set_postfix_str(name)
            for ch in todo[name]:
                project_units(model, mined, name, table[name], layouts[name], inputs, out, ch, k=k, mode=mode,
                              device=p.device, dtype=p.dtype, bar=bar)
            _barrier(world)
            if rank == 0:
                layer_panel(out, mined, name, table[name], layouts[name], inputs,
                            panel_units(mined, name, figure_units, seed), k)
                done.append(name)
                write_json(out / _PROGRESS, {"key": key, "done": done})
            t_layers[name] = round(time.time() - t1, 3)
    finally:
        bar.close()
    t_total = time.time() - t0

    meta = _meta(mined, layers, table, layouts, k=k, top_n=top_n, figure_units=figure_units, seed=seed,
                 model=model)
    meta.update({
        "model": model_name or type(model).__name__,
        "weights": weights,
        "config": {"layers": layers, "k": k, "per_image": per_image, "top_n": top_n, "batch_size": batch_size,
                   "mode": mode, "tile": tile, "figure_units": figure_units, "seed": seed,
                   "preprocess": {"preset": preprocess.preset, "resize": preprocess.resize,
                                  "size": preprocess.size}, "world_size": world,
                   "rules": rules_on_path(model, (preprocess.size, preprocess.size), layers, mode)},
        "timing": {"mine_s": round(t_mine, 3), "total_s": round(t_total, 3), "images": mined.images,
                   "project_s": t_layers, "decoded": inputs.decoded},  # this run (a resumed run skips work)
    })
    meta = {"schema": SCHEMA, "model": meta.pop("model"), **meta}
    result = AtlasResult(out, mined, meta)
    if rank == 0:
        write_json(out / "result.json", meta)
        if site:
            from ..present.site import write_site

            write_site(out)
    _barrier(world)
    # Finished: the mining state has nothing left to resume (mine.npz keeps the mined arrays); a later
    # --resume mines again and finds every picture done.
    shard_state(state, rank, world).unlink(missing_ok=True)
    return result


def _barrier(world: int):
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def _meta(mined: MineResult, layers, table, layouts, *, k, top_n, figure_units, seed, model) -> dict:
    """result.json's content from the mined result: entries with their field boxes, per-unit statistics
    and class tags, dead units, sources (relative file, label, prediction) of every image shown."""
    categories = model_meta(model).categories
    preds = mined.predictions.tolist() if mined.predictions is not None else None
    conf = mined.confidence.tolist() if mined.confidence is not None else None
    labels = mined.labels
    meta = mined.to_json(k)
    meta.pop("schema", None)
    H, W = table.input_size
    sources, units, dead, tiles, figures = {}, {}, {}, {}, {}
    for name in layers:
        info, layout = table[name], layouts[name]
        d = mined.layers[name]
        img, val = d["image"].tolist(), d["value"]
        q = mined.quantiles(name, list(QUANTILES))
        fires = mined.stats[name]["fires"].tolist() if name in mined.stats else None
        per = {}
        for c, entries in meta["layers"][name].items():
            c = int(c)
            for e, i in zip(entries, img[c]):
                box, at = field_box(info, e["y"], e["x"], (H, W), layout)
                e.update(index=i, box=list(box), at=list(at))
                sources.setdefault(i, None)
            top = [i for i in dict.fromkeys(img[c][:top_n]) if i >= 0]  # distinct images of the top N
            u = {"max": float(val[c, 0]) if img[c][0] >= 0 else None, "fires": fires[c] if fires else None,
                 "quantiles": [None if v != v else round(float(v), 6) for v in q[c].tolist()] if q is not None
                 else None, "top_n": len(top)}
            if labels is not None:
                u["labels"] = _tags([labels[i] for i in top], mined.classes)
            if preds is not None:
                u["predicted"] = _tags([preds[i] for i in top], categories)
            per[str(c)] = u
        units[name] = per
        dead[name] = mined.dead(name)
        tiles[name] = {**layout.to_json(), "ext": PICTURE_EXT, "ncol": 3}
        if panel_units(mined, name, figure_units, seed):
            figures[name] = {"panel": f"layers/{file_safe(name)}.{PICTURE_EXT}",
                             "thumb": f"layers/{file_safe(name)}_thumb.{PICTURE_EXT}",
                             "units": panel_units(mined, name, figure_units, seed)}
    root = Path(os.path.abspath(mined.root)) if mined.root else None
    for i in sources:
        s = {"file": mined.relpath(i, root), "view": image_view(i)}
        if labels is not None and labels[i] >= 0:
            s["label"] = _class_name(mined.classes, labels[i])
        if preds is not None and preds[i] >= 0:
            s["predicted"] = _class_name(categories, preds[i])
            s["confidence"] = round(conf[i], 4)
        sources[i] = s
    crops = {n: {**table[n].to_json(), "crop_field": "local" if table[n].gated else "exact"} for n in layers}
    meta.update(data=str(root) if root else None, table=crops,
                quantiles=list(QUANTILES), units=units, dead=dead, tiles=tiles, figures=figures,
                sources={str(i): s for i, s in sorted(sources.items())}, classes=mined.classes,
                predictions=mined.predictions is not None)
    return meta
