"""Per-layer image features ("codes"): what the linear probes of Sec. 5.2-5.3 train on ("keep layers 1-7
fixed") and what the t-SNE of the CS231n notes embeds.

One forward pass per batch records every requested layer, pooled inside the hook (so full maps are never
kept) and stops at the deepest one. The result is cached on disk as one .npz keyed by the model's weights,
the layers, the pooling, the preprocessing and the file list, so probes and embeddings re-run without the network. Long
extractions checkpoint a partial file every few hundred images and resume from it.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..core.errors import ZfnetError
from ..core.results import save_npz
from ..data.images import Batches, ImageDataset, Preprocess, list_images
from ..inspect.layers import run_with_taps

__all__ = [
    "POOLS",
    "Features",
    "default_cache_dir",
    "extract_features",
    "model_digest",
    "pool_tensor",
    "probe_layers",
]

POOLS = ("max", "avg", "flatten")


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "zfnet" / "features"


def pool_tensor(t: torch.Tensor, pool: str) -> torch.Tensor:
    """(N, C, H, W) -> (N, C) by spatial max / mean, or (N, C*H*W) flattened; (N, D) passes through."""
    if t.dim() == 2:
        return t
    if pool == "max":
        return t.amax(dim=tuple(range(2, t.dim())))
    if pool == "avg":
        return t.mean(dim=tuple(range(2, t.dim())))
    if pool == "flatten":
        return t.flatten(1)
    raise ZfnetError(f"unknown pooling {pool!r}; use one of {', '.join(POOLS)}")


def probe_layers(model: torch.nn.Module) -> list[str]:
    """The default probe taps: the rectified conv outputs, then the class-score layer."""
    from ..inspect.layers import feature_layers, layer_table

    table = layer_table(model)
    names = list(feature_layers(model, table))
    # The last layer run gives the class scores (fc8, or SqueezeNet's global pool after its conv classifier).
    modules = dict(model.named_modules())
    leaves = [i.name for i in table if not list(modules[i.module].children())]  # (i.name may be a later call)
    if leaves and leaves[-1] not in names:
        names.append(leaves[-1])
    return names


def model_digest(model: torch.nn.Module) -> str:
    """A short hash of the architecture and every parameter and buffer: the cache key for 'these weights'."""
    h = hashlib.blake2b(digest_size=10)
    h.update(type(model).__name__.encode())
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(str(tuple(v.shape)).encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


@dataclass
class Features:
    """Pooled activations for a list of images: arrays[(layer, pool)] is (N, D) float32, row i = paths[i]."""

    arrays: dict
    paths: list[str]
    labels: np.ndarray  # (N,) int, -1 where the folder had no classes
    classes: list[str] | None
    skipped: list = field(default_factory=list)  # (path, why) of unreadable files, not in `paths`
    config: dict = field(default_factory=dict)

    def get(self, layer: str, pool: str | None = None) -> np.ndarray:
        if pool is None:
            pools = [p for (lay, p) in self.arrays if lay == layer]
            if len(pools) != 1:
                raise ZfnetError(f"layer {layer!r}: pooling must be one of {pools or 'none cached'}")
            pool = pools[0]
        if (layer, pool) not in self.arrays:
            have = sorted({lay for lay, _ in self.arrays})
            raise ZfnetError(f"no features for layer {layer!r} ({pool}); extracted: {', '.join(have)}")
        return self.arrays[(layer, pool)]

    @property
    def layers(self) -> list[str]:
        return list(dict.fromkeys(lay for lay, _ in self.arrays))


def _files_key(paths: Sequence[Path]) -> str:
    h = hashlib.blake2b(digest_size=10)
    for p in paths:
        p = Path(p).resolve()  # "../data/x.jpg" and "/abs/data/x.jpg" are the same file: the same cache
        try:
            st = p.stat()
            h.update(f"{p}\0{st.st_size}\0{int(st.st_mtime)}\n".encode())
        except OSError:
            h.update(f"{p}\0missing\n".encode())
    return h.hexdigest()


def _save(path: Path, arrays: dict, extra: dict):
    save_npz(path, meta=np.array(json.dumps(extra)), **{f"{pool}|{layer}": a for (layer, pool), a in arrays.items()})


def _load(path: Path) -> tuple[dict, dict]:
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(str(z["meta"]))
        arrays = {}
        for k in z.files:
            if k != "meta":
                pool, _, layer = k.partition("|")
                arrays[(layer, pool)] = z[k]
    return arrays, meta


@torch.no_grad()
def extract_features(model: torch.nn.Module, data, layers: Sequence[str] | None = None, *,
                     pool: str | Sequence[str] = "avg", batch_size: int = 32, workers: int = 0,
                     cache_dir: str | os.PathLike | None = None, checkpoint_every: int = 512,
                     progress: bool = True, transform: Preprocess | None = None) -> Features:
    """Pooled features of every image at every layer, from the cache when it has them.

    Args:
        data: an image folder (class subfolders give labels) or a list of image paths.
        layers: module names (default: `probe_layers(model)`).
        pool: "max", "avg" or "flatten", or several (each stored separately; one forward pass).
        cache_dir: where the .npz lives (None: no cache); a partial file there makes a killed run resume.
    Returns: Features; unreadable files are skipped and listed in `.skipped`.
    """
    if isinstance(data, (str, os.PathLike)):
        paths, labels, classes = list_images(data)
    else:
        paths, labels, classes = [Path(p) for p in data], None, None
    pools = [pool] if isinstance(pool, str) else list(dict.fromkeys(pool))
    for p in pools:
        if p not in POOLS:
            raise ZfnetError(f"unknown pooling {p!r}; use one of {', '.join(POOLS)}")
    layers = list(dict.fromkeys(layers or probe_layers(model)))
    transform = transform or Preprocess.for_model(model)
    config = {"model": type(model).__name__, "weights": model_digest(model),
              "preprocess": [transform.preset, transform.crop, transform.size, transform.resize],
              "files": _files_key(paths), "n_files": len(paths)}
    # One cache file per (weights, preprocessing, file list) holds every layer and pooling computed so far:
    # a request for a subset is served from it; a request for more recomputes and merges into it.
    key = hashlib.blake2b(json.dumps(config, sort_keys=True).encode(), digest_size=12).hexdigest()
    request = hashlib.blake2b(json.dumps([layers, pools]).encode(), digest_size=6).hexdigest()
    config = {**config, "layers": layers, "pool": pools}
    wanted = [(layer, p) for layer in layers for p in pools]
    labels_arr = np.asarray(labels if labels is not None else [-1] * len(paths), dtype=np.int64)

    final = partial = None
    arrays: dict = {}
    kept: list[int] = []
    skipped: list = []
    start = 0
    cached: dict = {}
    if cache_dir is not None:
        cache_dir = Path(cache_dir)
        final, partial = cache_dir / f"{key}.npz", cache_dir / f"{key}-{request}.partial.npz"
        for candidate in (final, partial):
            if not candidate.exists():
                continue
            try:
                found, meta = _load(candidate)
            except (OSError, ValueError, KeyError, zipfile.BadZipFile):  # a corrupt cache is recomputed
                continue
            if candidate == final:
                if all(k in found for k in wanted):
                    return _features({k: found[k] for k in wanted}, paths, labels_arr, meta["kept"], classes,
                                     meta["skipped"], config)
                cached = (found, meta["kept"])
            else:
                arrays, kept, skipped, start = found, meta["kept"], [tuple(x) for x in meta["skipped"]], meta["seen"]

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    chunks: dict = {k: [v] for k, v in arrays.items()}

    def reduce(name, t):
        return {p: pool_tensor(t, p).float().cpu().numpy() for p in pools}

    def checkpoint(seen):  # what is done so far, into the partial file a resumed run starts from
        merged = {k: np.concatenate(v) if v else np.zeros((0, 0), np.float32) for k, v in chunks.items()}
        _save(partial, merged, {"kept": kept, "skipped": skipped, "seen": seen, "config": config})

    dataset = ImageDataset(paths, labels_arr.tolist(), transform)
    batches = Batches(dataset, batch_size, workers, progress, desc="features", start=start)
    seen, last_ckpt = start, start
    try:
        for x, _, idx in batches:
            out = run_with_taps(model, x.to(device), layers, stop=True, reduce=reduce)
            for layer in layers:
                if layer not in out:
                    raise ZfnetError(f"layer {layer!r} did not run in the forward pass")
                for p in pools:
                    chunks.setdefault((layer, p), []).append(out[layer][p])
            kept += [int(i) for i in idx]
            skipped += [s for s in batches.skipped if s not in skipped]
            seen = len(kept) + len(skipped)
            if partial is not None and seen - last_ckpt >= checkpoint_every:
                checkpoint(seen)
                last_ckpt = seen
    finally:
        model.train(was_training)
    skipped += [s for s in batches.skipped if s not in skipped]
    if final is not None:
        merged = {k: np.concatenate(v) for k, v in chunks.items()}
        if cached and cached[1] == kept:  # same images decoded: keep the other layers in the file too
            merged = {**cached[0], **merged}
        _save(final, merged, {"kept": kept, "skipped": skipped, "seen": len(paths), "config": config})
        merged = {k: merged[k] for k in wanted if k in merged}
        if partial.exists():
            partial.unlink()
    else:
        merged = {k: np.concatenate(v) for k, v in chunks.items()}
    return _features(merged, paths, labels_arr, kept, classes, skipped, config)


def _features(arrays, paths, labels, kept, classes, skipped, config) -> Features:
    return Features(arrays, [str(paths[i]) for i in kept], labels[np.asarray(kept, dtype=np.int64)], classes,
                    [tuple(s) for s in skipped], config)
