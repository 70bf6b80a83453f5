"""Dataset-scale top-k mining: the strongest activations of every feature map (Fig. 2, Sec. 2.1).

For each requested layer and channel we keep the k strongest positive activations over the dataset, with
the image and the location of each. By default an image contributes one entry per channel (its spatial
maximum, at the first maximal location in row-major order), so a unit's top k are k distinct images, as
the paper's "top 9 activations across the validation data"; `per_image=m` allows up to m locations per
image (the m strongest local maxima of its map). With `positive=True` (the atlas) values <= 0 are never
entries: a unit that never fires has none ("dead").

One streaming pass: every requested layer is read in ONE forward pass (taps with a reduce, so full maps
are never kept) and merged into running top-k buffers (zfnet.engine.topk), so memory is O(layers x
channels x k) whatever the dataset size. The same pass counts, per unit, the images on which it fires,
keeps its per-image maxima on a systematic sample of images (all of them up to ~4M values) for
quantiles, and, with `predict=True`, records the model's top-1 class of every image.

Order (deterministic, the same under sharding, merging and resuming): higher value first, then lower
image index (position in the sorted file list), then lower location index y * W + x.

Scale-out: under `torchrun --nproc_per_node N` every process mines its shard (item i goes to rank
i % N) and the buffers are all-gathered and merged (gloo on CPU, NCCL on GPUs): the merge of top-k lists
under a total order is exactly the top-k of the union, so the answer equals the single-process one.
Resume: the buffers and the number of items done are saved atomically every few batches to a state file.
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..core.distributed import Dist, init_distributed
from ..core.errors import NoInputError, ZfnetError
from ..core.results import atomic_path, load_tensors
from ..data.images import Batches, ImageDataset, Preprocess
from ..inspect.layers import feature_layers, run_with_taps, taps
from .topk import NO_IMAGE, TopK, merge_topk

__all__ = ["MineResult", "merge_topk", "mine", "model_fingerprint", "shard_state"]

STATE_VERSION = 2
SAMPLE_BUDGET = 1 << 22  # per-image maxima kept for quantiles (float32: 16 MB), over all layers


@dataclass
class MineResult:
    """Top-k activations per (layer, channel), best first, and per-unit statistics of the pass.

    layers: {layer: {"value": (C, k) float, "image": (C, k) long dataset index (-1 = none),
                     "y": (C, k) long, "x": (C, k) long}}; y, x index the layer's output grid. A unit with
             fewer than k entries has image -1 (and value 0, or -inf when `positive=False`) after them.
    stats: {layer: {"fires": (C,) long, images whose map has a value > 0;
                    "sample": (C, S) float, per-image maxima of the sampled images (NaN: unreadable)}}
    predictions: (N,) long top-1 class of every image (-1: not computed or unreadable); confidence its
        softmax probability.
    """

    paths: list[str]
    layers: dict[str, dict[str, torch.Tensor]]
    k: int = 9
    skipped: list[tuple[str, str]] = field(default_factory=list)
    sizes: dict[str, tuple[int, int]] = field(default_factory=dict)  # layer -> (H, W) of its output
    root: str | None = None  # the data folder, for paths relative to it
    images: int = 0  # images actually mined (all shards)
    labels: list[int] | None = None  # class index per image (class folders), else None
    classes: list[str] | None = None  # class folder names
    stats: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    predictions: torch.Tensor | None = None
    confidence: torch.Tensor | None = None
    per_image: int = 1

    def top(self, layer: str, channel: int, k: int | None = None) -> list[dict]:
        """The entries of one unit, best first (at most k): [{"index", "path", "value", "y", "x"}]."""
        d = self.layers[layer]
        out = []
        for j in range(min(k or d["value"].shape[1], d["value"].shape[1])):
            i = int(d["image"][channel, j])
            if i < 0:
                break
            out.append({"index": i, "path": self.paths[i], "value": float(d["value"][channel, j]),
                        "y": int(d["y"][channel, j]), "x": int(d["x"][channel, j])})
        return out

    def dead(self, layer: str) -> list[int]:
        """Channels that never fire (no value > 0 on any image)."""
        d = self.layers[layer]
        return torch.nonzero((d["image"][:, 0] < 0) | ~(d["value"][:, 0] > 0)).flatten().tolist()

    def quantiles(self, layer: str, q: list[float]) -> torch.Tensor | None:
        """(C, len(q)) quantiles of each unit's per-image maximum over the sampled images (None without)."""
        s = self.stats.get(layer)
        if not s or s["sample"].numel() == 0:
            return None
        return torch.nanquantile(s["sample"].double(), torch.tensor(q, dtype=torch.float64), dim=1).t()

    def relpath(self, i: int, root: Path | None = None) -> str:
        """Path of image i relative to the data folder (as given when there is none). root: the data
        folder made absolute, for callers asking for many paths."""
        p = Path(self.paths[i])
        if self.root:
            base = root or Path(os.path.abspath(self.root))
            for a, b in ((Path(os.path.abspath(p)), base), (p.resolve(), base.resolve())):
                try:  # unresolved first: a folder of symlinks names its files by their links
                    return a.relative_to(b).as_posix()
                except ValueError:
                    pass
        return str(p)

    def to_json(self, k: int | None = None) -> dict:
        """{"schema": 1, "k", "images", "skipped", "layers": {layer: {"<ch>": [{"image", "value", "y", "x"}]}}}
        with image paths relative to the data folder; k: at most that many entries per unit."""
        layers, rel = {}, {}  # rel: image index -> relative path, each computed once
        root = Path(os.path.abspath(self.root)) if self.root else None
        k = min(k or self.k, self.k)
        for name, d in self.layers.items():
            v, im, ys, xs = (d[key][:, :k].tolist() for key in ("value", "image", "y", "x"))
            for i in {i for row in im for i in row if i >= 0} - rel.keys():
                rel[i] = self.relpath(i, root)
            layers[name] = {str(c): [{"image": rel[i], "value": val, "y": y, "x": x}
                                     for val, i, y, x in zip(v[c], im[c], ys[c], xs[c]) if i >= 0]
                            for c in range(len(v))}
        return {"schema": 1, "k": k, "images": self.images, "data": self.root, "per_image": self.per_image,
                "sizes": {n: list(s) for n, s in self.sizes.items()},
                "skipped": [{"file": p, "error": e} for p, e in self.skipped], "layers": layers}


# ----------------------------------------------------------------------------------------------------
def _reducer(per_image: int):
    """Tap reduce: (B, C, H, W) -> (candidate values, their locations, per-image max, (H, W)); candidates
    are the spatial maximum (first in row-major order) or the `per_image` strongest local maxima."""

    def reduce(name, t):
        t = t.detach()
        if t.dim() != 4:  # vector layers (fc): the unit itself, location (0, 0)
            t = t.reshape(t.shape[0], -1)
            return t, torch.zeros_like(t, dtype=torch.long), t, (1, 1)
        flat = t.flatten(2)
        best, loc = flat.max(dim=2)  # first maximal index on ties (documented by torch.max)
        if per_image == 1:
            return best, loc, best, tuple(t.shape[-2:])
        # a local maximum equals the maximum of its 3x3 neighbourhood (max_pool pads with -inf)
        peak = F.max_pool2d(t.float(), 3, 1, 1).flatten(2) == flat.float()
        v, order = flat.masked_fill(~peak, float("-inf")).sort(dim=2, descending=True, stable=True)
        m = min(per_image, flat.shape[2])
        return v[..., :m], order[..., :m], best, tuple(t.shape[-2:])

    return reduce


class _Stats:
    """Per-unit statistics of the pass: images on which each unit fires, and its per-image maxima on a
    systematic sample (image i is kept when i % stride == 0; stride 1 until SAMPLE_BUDGET is reached)."""

    def __init__(self, n_images: int):
        self.n, self.stride = n_images, None
        self.fires: dict[str, torch.Tensor] = {}
        self.sample: dict[str, torch.Tensor] = {}

    def add(self, name: str, best: torch.Tensor, index: torch.Tensor, channels_total: int):
        best = best.float()
        if self.stride is None:
            self.stride = max(1, math.ceil(self.n * channels_total / SAMPLE_BUDGET))
        if name not in self.fires:
            C = best.shape[1]
            self.fires[name] = torch.zeros(C, dtype=torch.long, device=best.device)
            self.sample[name] = torch.full((C, math.ceil(self.n / self.stride)), float("nan"), device=best.device)
        self.fires[name] += (best > 0).sum(0)
        keep = index.to(best.device) % self.stride == 0
        if bool(keep.any()):
            self.sample[name][:, index.to(best.device)[keep] // self.stride] = best[keep].t()

    def state(self) -> dict:
        return {"stride": self.stride, "fires": {n: t.cpu() for n, t in self.fires.items()},
                "sample": {n: t.cpu() for n, t in self.sample.items()}}

    def load(self, st: dict, device):
        self.stride = st["stride"]
        self.fires = {n: t.to(device) for n, t in st["fires"].items()}
        self.sample = {n: t.to(device) for n, t in st["sample"].items()}


class _Predictions:
    """Top-1 class and its softmax probability per image, from the model's output (N, classes)."""

    def __init__(self, n_images: int, enabled: bool):
        self.enabled = enabled
        self.cls = torch.full((n_images,), -1, dtype=torch.long)
        self.prob = torch.zeros(n_images)

    def add(self, y, index: torch.Tensor):
        if not self.enabled:
            return
        if not (isinstance(y, torch.Tensor) and y.dim() == 2 and y.shape[1] > 1):
            shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
            print(f"zfnet: mine: the model's output is {shape}, not (N, classes): no top-1 predictions",
                  file=sys.stderr)
            self.enabled = False
            return
        p, c = y.detach().float().softmax(-1).max(-1)
        self.cls[index.cpu()] = c.cpu()
        self.prob[index.cpu()] = p.cpu()


# ----------------------------------------------------------------------------------------------------
def _gather(d: Dist, topk: TopK, stats: _Stats, preds: _Predictions, skipped: list, done: int,
            layers: list[str], k: int):
    """All-gather every rank's buffers and merge them: every rank ends with the global answer."""
    import torch.distributed as dist

    dev, world = torch.device(d.device), d.world

    def gathered(t):
        out = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(out, t.contiguous())
        return out

    merged = {}
    for name in layers:
        parts = [torch.cat(gathered(t.to(dev)), 1) for t in topk.get(name)]
        merged[name] = merge_topk(*parts, k)
        stats.fires[name] = d.all_sum(stats.fires[name])
        sample = stats.sample[name].to(dev)  # each sampled image is on exactly one rank; NaN elsewhere
        for part in gathered(sample):
            sample = torch.where(torch.isnan(sample), part, sample)
        stats.sample[name] = sample
    for name, (v, i, lc) in merged.items():
        topk.set(name, v, i, lc)
    for t in (preds.cls, preds.prob):  # each image's entry is set by one rank: -1 / 0 elsewhere
        t.copy_(torch.stack(gathered(t.to(dev))).amax(0).cpu())
    extra = [None] * world
    dist.all_gather_object(extra, (skipped, done, topk.sizes, preds.enabled))
    all_skipped = sorted((s for e in extra for s in e[0]), key=lambda s: s[0])
    for e in extra:
        for n, s in e[2].items():
            topk.sizes.setdefault(n, s)
    preds.enabled = all(e[3] for e in extra)
    return all_skipped, sum(e[1] for e in extra)


def shard_state(state: str | os.PathLike, rank: int, world: int) -> Path:
    """The state file of one process: STATE alone, STATE.rank<r>-of-<world> under torchrun."""
    return Path(state) if world == 1 else Path(f"{state}.rank{rank}-of-{world}")


def model_fingerprint(model: nn.Module) -> str:
    """A digest of a model's parameter names, shapes and values (sums), to tell runs of another model."""
    h = hashlib.sha256()
    with torch.no_grad():
        for n, p in model.state_dict().items():
            h.update(f"{n}{tuple(p.shape)}".encode())
            if p.is_floating_point():
                h.update(f"{float(p.double().sum()):.10e}{float(p.abs().double().sum()):.10e}".encode())
    return h.hexdigest()


def _fingerprint(model: nn.Module, paths: list[str], layers: list[str], options: tuple, preprocess) -> str:
    """What a state file must match to be resumed: the model's weights, the data, layers, options, shard."""
    h = hashlib.sha256(model_fingerprint(model).encode())
    h.update("\n".join(paths).encode())
    h.update(f"{layers}{options}{preprocess.preset}{preprocess.crop}{preprocess.size}".encode())
    return h.hexdigest()


def _save_state(path: Path, fp: str, topk: TopK, stats: _Stats, preds: _Predictions, done: int, skipped: list,
                finished: bool):
    with atomic_path(path, suffix=".pt") as tmp:
        torch.save({"version": STATE_VERSION, "fingerprint": fp, "done": done, "finished": finished,
                    "skipped": [list(s) for s in skipped], "sizes": {n: list(s) for n, s in topk.sizes.items()},
                    "buffers": topk.state(), "stats": stats.state(),
                    "predictions": [preds.cls, preds.prob, preds.enabled]}, tmp)


def _load_state(path: Path, fp: str, topk: TopK, stats: _Stats, preds: _Predictions, device):
    st = load_tensors(path, "mining state")
    if not isinstance(st, dict) or st.get("version") != STATE_VERSION:
        raise ZfnetError(f"{path} is not a zfnet mining state (version {STATE_VERSION}); delete it to start over")
    if st["fingerprint"] != fp:
        raise ZfnetError(f"mining state {path} was written for another run (model weights, data, layers, k or "
                         f"shard differ); delete it or write to another folder")
    for n, (v, i, lc) in st["buffers"].items():
        topk.set(n, v.to(device), i.to(device), lc.to(device))
    topk.sizes = {n: tuple(s) for n, s in st["sizes"].items()}
    stats.load(st["stats"], device)
    preds.cls, preds.prob, preds.enabled = st["predictions"]
    return int(st["done"]), [tuple(s) for s in st["skipped"]], bool(st["finished"])


# ----------------------------------------------------------------------------------------------------
def mine(model: nn.Module, data, layers: list[str] | None = None, *, k: int = 9, batch_size: int = 32,
         preprocess: Preprocess | None = None, state: str | os.PathLike | None = None, progress: bool = True,
         workers: int = 0, save_every: int = 10, per_image: int = 1, positive: bool = False,
         predict: bool = False) -> MineResult:
    """Stream a dataset once and keep, per (layer, channel), the k strongest activations.

    Args:
        model: any nn.Module (eval mode is the caller's choice; our loaders return eval models).
        data: an image folder (or file) path, or a zfnet.data.images.ImageDataset.
        layers: module names (default: `feature_layers(model)`, the rectified conv outputs).
        k: entries kept per channel (the paper shows 9).
        preprocess: image -> tensor (default: `Preprocess.for_model(model)`; centre crop only).
        state: a state file: if it exists the run resumes from it; it is rewritten atomically every
            `save_every` batches and at the end. Under torchrun each rank uses STATE.rank<r>-of-<world>.
        workers: DataLoader worker processes for decoding.
        per_image: locations an image may contribute per channel (1: k distinct images).
        positive: keep only values > 0, so that a unit that never fires has no entry (the atlas); False:
            the k largest values, whatever their sign.
        predict: also run the whole model and record every image's top-1 class (`predictions`).
    Returns: MineResult (identical on every rank when distributed).
    """
    if k < 1:
        raise ZfnetError(f"k must be at least 1, not {k}")
    if batch_size < 1:
        raise ZfnetError(f"batch size must be at least 1, not {batch_size}")
    if per_image < 1:
        raise ZfnetError(f"per_image must be at least 1, not {per_image}")
    if isinstance(data, ImageDataset):
        dataset = data if preprocess is None else ImageDataset(data.paths, data.labels, preprocess)
        root = getattr(data, "root", None)
        classes = getattr(data, "classes", None)
    else:
        dataset = ImageDataset.from_folder(data, preprocess or Preprocess.for_model(model))
        root = dataset.root if Path(data).is_dir() else Path(data).parent
        classes = dataset.classes
    transform = dataset.transform
    if isinstance(transform, Preprocess) and transform.crop != "center":
        raise ZfnetError(f"mining needs one crop per image (crop='center'), not crop={transform.crop!r}")
    layers = list(dict.fromkeys(layers or feature_layers(model)))
    if not layers:
        raise ZfnetError("no layers to mine")
    p = next(model.parameters(), None)
    device = p.device if p is not None else torch.device("cpu")
    dtype = p.dtype if p is not None else torch.float32  # a float64 / half model gets inputs to match
    d, _ = init_distributed(str(device))  # NCCL for a CUDA model, gloo for CPU
    rank, world = d.rank, d.world
    paths = [str(q) for q in dataset.paths]

    topk = TopK(k, positive=positive, packed=per_image == 1)
    stats, preds = _Stats(len(paths)), _Predictions(len(paths), predict)
    done, skipped, finished = 0, [], False
    state_path = None
    if state is not None:
        state_path = shard_state(state, rank, world)
        fp = _fingerprint(model, paths, layers, (k, per_image, positive, predict, rank, world),
                          transform if isinstance(transform, Preprocess) else Preprocess())
        if state_path.exists():
            done, skipped, finished = _load_state(state_path, fp, topk, stats, preds, device)

    if not finished:
        batches = Batches(dataset, batch_size, workers, progress, desc="mine" if world == 1 else f"mine[{rank}]",
                          shard=(rank, world), start=done)
        seen, start = 0, done
        reduce = _reducer(per_image)
        with torch.inference_mode():
            for n, (x, _, idx) in enumerate(batches, 1):
                x = x.to(device, dtype if dtype.is_floating_point else x.dtype, non_blocking=True)
                if preds.enabled:
                    with taps(model, layers, reduce=reduce) as out:
                        preds.add(model(x), idx)
                else:
                    out = run_with_taps(model, x, layers, stop=True, reduce=reduce)
                total_c = sum(out[name][2].shape[1] for name in layers if name in out)
                for name in layers:
                    if name not in out:
                        raise ZfnetError(f"layer {name!r} did not run in the forward pass (is it used by "
                                         f"forward()?)")
                    v, loc, best, size = out[name]
                    topk.add(name, v, loc, idx, size)
                    stats.add(name, best, idx, total_c)
                seen += len(idx)
                done = start + seen + len(batches.skipped)
                if state_path is not None and n % save_every == 0:
                    _save_state(state_path, fp, topk, stats, preds, done, skipped + batches.skipped, False)
        skipped = skipped + batches.skipped
        done = start + seen + len(batches.skipped)
        if state_path is not None:
            _save_state(state_path, fp, topk, stats, preds, done, skipped, True)
    mined = done - len(skipped)

    if world > 1:
        missing = [n for n in layers if n not in topk]
        if missing:  # an empty shard still has to take part in the collective with the right shapes
            raise ZfnetError(f"rank {rank} mined no image (fewer images than processes?)")
        skipped, mined = _gather(d, topk, stats, preds, skipped, mined, layers, k)

    result_layers, result_stats = {}, {}
    for name in layers:
        if name not in topk:
            raise NoInputError(f"no readable image in {root or 'the dataset'} ({len(skipped)} skipped)", skipped)
        v, i, lc = (t.cpu() for t in topk.get(name))
        W = topk.sizes[name][1]
        none = i == NO_IMAGE
        result_layers[name] = {"value": v.masked_fill(none, 0.0 if positive else float("-inf")),
                               "image": i.masked_fill(none, -1),
                               "y": (lc // W).masked_fill(none, -1), "x": (lc % W).masked_fill(none, -1)}
        result_stats[name] = {"fires": stats.fires[name].cpu(), "sample": stats.sample[name].cpu()}
    return MineResult(paths, result_layers, k, list(skipped), dict(topk.sizes),
                      str(root) if root is not None else None, mined, dataset.labels,
                      list(classes) if classes else None, result_stats,
                      preds.cls if preds.enabled else None, preds.prob if preds.enabled else None, per_image)
