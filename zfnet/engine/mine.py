"""Dataset-scale top-k mining: the strongest activations of every feature map (Fig. 2, Sec. 2.1).

For each requested layer and channel we keep the k images whose spatial maximum is largest, with the
value and the location of that maximum. One streaming pass: every requested layer is read in ONE forward
pass (taps with a reduce, so full maps are never kept; the pass stops at the deepest requested layer) and
merged into running top-k buffers, so memory is O(layers x channels x k) whatever the dataset size.

Order (deterministic, the same under sharding, merging and resuming): higher value first, then lower
image index (position in the sorted file list), then lower location index y * W + x. The location is the
first maximum of the map in row-major order, so each image contributes at most one entry per channel.

Scale-out: under `torchrun --nproc_per_node N` every process mines its shard (item i goes to rank
i % N) and the top-k buffers are all-gathered and merged (gloo on CPU, NCCL on GPUs): the merge of top-k
lists under a total order is exactly the top-k of the union, so the answer equals the single-process one.
Resume: the buffers and the number of items done are saved atomically every few batches to a state file.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..core.distributed import Dist, init_distributed
from ..core.errors import ZfnetError
from ..core.results import atomic_path, load_tensors
from ..data.images import Batches, ImageDataset, Preprocess
from ..inspect.layers import feature_layers, run_with_taps

__all__ = ["MineResult", "merge_topk", "mine"]

STATE_VERSION = 1
_NO_IMAGE = torch.iinfo(torch.int64).max  # sorts after every real image index (internal only; -1 outside)


@dataclass
class MineResult:
    """Top-k activations per (layer, channel), best first.

    layers: {layer: {"value": (C, k) float, "image": (C, k) long dataset index (-1 = none),
                     "y": (C, k) long, "x": (C, k) long}}; y, x index the layer's output grid.
    """

    paths: list[str]
    layers: dict[str, dict[str, torch.Tensor]]
    k: int = 9
    skipped: list[tuple[str, str]] = field(default_factory=list)
    sizes: dict[str, tuple[int, int]] = field(default_factory=dict)  # layer -> (H, W) of its output
    root: str | None = None  # the data folder, for paths relative to it
    images: int = 0  # images actually mined (all shards)

    def top(self, layer: str, channel: int) -> list[dict]:
        """The entries of one unit, best first: [{"index", "path", "value", "y", "x"}]."""
        d = self.layers[layer]
        out = []
        for j in range(d["value"].shape[1]):
            i = int(d["image"][channel, j])
            if i < 0:
                break
            out.append({"index": i, "path": self.paths[i], "value": float(d["value"][channel, j]),
                        "y": int(d["y"][channel, j]), "x": int(d["x"][channel, j])})
        return out

    def relpath(self, i: int, root: Path | None = None) -> str:
        """Path of image i relative to the data folder (as given when there is none). root: the data
        folder already resolved, for callers asking for many paths."""
        p = self.paths[i]
        if self.root:
            try:
                return Path(p).resolve().relative_to(root or Path(self.root).resolve()).as_posix()
            except ValueError:
                pass
        return p

    def to_json(self) -> dict:
        """{"schema": 1, "k", "images", "skipped", "layers": {layer: {"<ch>": [{"image", "value", "y", "x"}]}}}
        with image paths relative to the data folder."""
        layers, rel = {}, {}  # rel: image index -> relative path, each computed once
        root = Path(self.root).resolve() if self.root else None
        for name, d in self.layers.items():
            v, im, ys, xs = (d[key].tolist() for key in ("value", "image", "y", "x"))
            for i in {i for row in im for i in row if i >= 0} - rel.keys():
                rel[i] = self.relpath(i, root)
            layers[name] = {str(c): [{"image": rel[i], "value": val, "y": y, "x": x}
                                     for val, i, y, x in zip(v[c], im[c], ys[c], xs[c]) if i >= 0]
                            for c in range(len(v))}
        return {"schema": 1, "k": self.k, "images": self.images, "data": self.root,
                "sizes": {n: list(s) for n, s in self.sizes.items()},
                "skipped": [{"file": p, "error": e} for p, e in self.skipped], "layers": layers}


# ----------------------------------------------------------------------------------------------------
def merge_topk(value: torch.Tensor, image: torch.Tensor, loc: torch.Tensor, k: int):
    """Top-k along dim 1 of candidate lists (C, M) under the total order (value desc, image asc, loc asc).

    Two stable sorts (by image then by value) give the lexicographic order; loc never needs a sort of its
    own because an image has one candidate per channel (two lists to be merged never share an image).
    """
    image, order = image.sort(dim=1, stable=True)
    value, loc = value.gather(1, order), loc.gather(1, order)
    value, order = value.sort(dim=1, descending=True, stable=True)
    return value[:, :k], image.gather(1, order[:, :k]), loc.gather(1, order[:, :k])


def _spatial_max(name, t):
    """Tap reduce: (B, C, H, W) -> per-channel max and its first row-major location, plus (H, W)."""
    if t.dim() == 4:
        v, loc = t.detach().flatten(2).max(dim=2)  # first maximal index on ties (documented by torch.max)
        return v, loc, tuple(t.shape[-2:])
    t = t.detach().reshape(t.shape[0], -1)  # vector layers (fc): the unit itself, location (0, 0)
    return t, torch.zeros_like(t, dtype=torch.long), (1, 1)


_LOW = 0xFFFFFFFF


def _encode(value: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """float32 values and image indices -> int64 keys whose numeric order IS the ranking order.

    High 32 bits: the float's bits made order-preserving as a signed int (negative floats have their
    magnitude bits flipped); low 32 bits: 2^32-1 - image, so a lower index ranks higher; 0 = no image.
    Keys are unique per channel, so one topk (no stable sorts) gives the deterministic top-k.
    """
    bits = (value + 0.0).contiguous().view(torch.int32).long()  # + 0.0 turns -0.0 into +0.0 (they tie)
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    low = torch.where(image == _NO_IMAGE, torch.zeros_like(image), _LOW - image)
    return (ordered << 32) + low


def _decode(key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    ordered = key >> 32
    bits = torch.where(ordered < 0, ordered ^ 0x7FFFFFFF, ordered)
    value = bits.to(torch.int32).view(torch.float32)
    low = key & _LOW
    return value, torch.where(low == 0, torch.full_like(low, _NO_IMAGE), _LOW - low)


class _TopK:
    """Running top-k buffers of one process, per layer (C, k).

    float32 values (the usual case) are kept as packed int64 keys merged with one topk per batch; other
    dtypes (float64 models) as (value, image, loc) merged with `merge_topk`. Both give the same order.
    """

    def __init__(self, k: int):
        self.k = k
        self._key: dict[str, list[torch.Tensor]] = {}  # layer -> [key, loc]
        self._vil: dict[str, list[torch.Tensor]] = {}  # layer -> [value, image, loc]
        self.sizes: dict[str, tuple[int, int]] = {}

    def __contains__(self, name: str) -> bool:
        return name in self._key or name in self._vil

    def add(self, name: str, values: torch.Tensor, loc: torch.Tensor, index: torch.Tensor, size):
        values = values.to(torch.promote_types(values.dtype, torch.float32))  # half models -> float32
        values = torch.nan_to_num(values, nan=float("-inf"), posinf=float("inf")).t()  # (C, B); NaN last
        loc = loc.t()
        index = index.to(values.device).view(1, -1).expand_as(values)
        if name not in self:
            self.sizes[name] = tuple(int(s) for s in size)
            C, dev = values.shape[0], values.device
            self.set(name, torch.full((C, self.k), float("-inf"), dtype=values.dtype, device=dev),
                     torch.full((C, self.k), _NO_IMAGE, dtype=torch.long, device=dev),
                     torch.full((C, self.k), -1, dtype=torch.long, device=dev))
        if name in self._key:
            key, lc = self._key[name]
            key = torch.cat([key, _encode(values, index)], 1)
            key, order = key.topk(self.k, dim=1)  # unique keys: deterministic, sorted best first
            self._key[name] = [key, torch.cat([lc, loc], 1).gather(1, order)]
        else:
            v, i, lc = self._vil[name]
            self._vil[name] = list(merge_topk(torch.cat([v, values], 1), torch.cat([i, index], 1),
                                              torch.cat([lc, loc], 1), self.k))

    def get(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(value, image, loc), each (C, k), best first; image _NO_IMAGE where there is none."""
        if name in self._key:
            key, lc = self._key[name]
            return (*_decode(key), lc)
        return tuple(self._vil[name])

    def set(self, name: str, value: torch.Tensor, image: torch.Tensor, loc: torch.Tensor):
        if value.dtype == torch.float32:
            self._key[name] = [_encode(value, image), loc]
        else:
            self._vil[name] = [value, image, loc]

    def names(self) -> list[str]:
        return [*self._key, *self._vil]

    def state(self) -> dict:
        return {n: [t.cpu() for t in self.get(n)] for n in self.names()}


# ----------------------------------------------------------------------------------------------------
def _gather(d: Dist, topk: _TopK, skipped: list, done: int, layers: list[str], k: int):
    """All-gather every rank's buffers and merge them: every rank ends with the global answer."""
    import torch.distributed as dist

    dev, world = torch.device(d.device), d.world
    merged = {}
    for name in layers:
        v, i, lc = (t.to(dev) for t in topk.get(name))
        parts = []
        for t in (v, i, lc):
            out = [torch.empty_like(t) for _ in range(world)]
            dist.all_gather(out, t.contiguous())
            parts.append(torch.cat(out, 1))
        merged[name] = merge_topk(*parts, k)
    for name, (v, i, lc) in merged.items():
        topk.set(name, v, i, lc)
    extra = [None] * world
    dist.all_gather_object(extra, (skipped, done, topk.sizes))
    all_skipped = sorted((s for e in extra for s in e[0]), key=lambda s: s[0])
    for e in extra:
        for n, s in e[2].items():
            topk.sizes.setdefault(n, s)
    return all_skipped, sum(e[1] for e in extra)


def _fingerprint(model: nn.Module, paths: list[str], layers: list[str], k: int, shard, preprocess) -> str:
    """What a state file must match to be resumed: the model's weights, the data, layers, k, shard."""
    h = hashlib.sha256()
    with torch.no_grad():
        for n, p in model.state_dict().items():
            h.update(f"{n}{tuple(p.shape)}".encode())
            if p.is_floating_point():
                h.update(f"{float(p.double().sum()):.10e}{float(p.abs().double().sum()):.10e}".encode())
    h.update("\n".join(paths).encode())
    h.update(f"{layers}{k}{tuple(shard)}{preprocess.preset}{preprocess.crop}{preprocess.size}".encode())
    return h.hexdigest()


def _save_state(path: Path, fp: str, topk: _TopK, done: int, skipped: list, finished: bool):
    with atomic_path(path, suffix=".pt") as tmp:
        torch.save({"version": STATE_VERSION, "fingerprint": fp, "done": done, "finished": finished,
                    "skipped": [list(s) for s in skipped], "sizes": {n: list(s) for n, s in topk.sizes.items()},
                    "buffers": topk.state()}, tmp)


def _load_state(path: Path, fp: str, topk: _TopK, device) -> tuple[int, list, bool]:
    st = load_tensors(path, "mining state")
    if not isinstance(st, dict) or st.get("version") != STATE_VERSION:
        raise ZfnetError(f"{path} is not a zfnet mining state (version {STATE_VERSION}); delete it to start over")
    if st["fingerprint"] != fp:
        raise ZfnetError(f"mining state {path} was written for another run (model weights, data, layers, k or "
                         f"shard differ); delete it or write to another folder")
    for n, (v, i, lc) in st["buffers"].items():
        topk.set(n, v.to(device), i.to(device), lc.to(device))
    topk.sizes = {n: tuple(s) for n, s in st["sizes"].items()}
    return int(st["done"]), [tuple(s) for s in st["skipped"]], bool(st["finished"])


# ----------------------------------------------------------------------------------------------------
def mine(model: nn.Module, data, layers: list[str] | None = None, *, k: int = 9, batch_size: int = 32,
         preprocess: Preprocess | None = None, state: str | os.PathLike | None = None, progress: bool = True,
         workers: int = 0, save_every: int = 10) -> MineResult:
    """Stream a dataset once and keep, per (layer, channel), the k strongest spatial maxima.

    Args:
        model: any nn.Module (eval mode is the caller's choice; our loaders return eval models).
        data: an image folder (or file) path, or a zfnet.data.images.ImageDataset.
        layers: module names (default: `feature_layers(model)`, the rectified conv outputs).
        k: entries kept per channel (the paper shows 9).
        preprocess: image -> tensor (default: `Preprocess.for_model(model)`; centre crop only).
        state: a state file: if it exists the run resumes from it; it is rewritten atomically every
            `save_every` batches and at the end. Under torchrun each rank uses STATE.rank<r>-of-<world>.
        workers: DataLoader worker processes for decoding.
    Returns: MineResult (identical on every rank when distributed).
    """
    if k < 1:
        raise ZfnetError(f"k must be at least 1, not {k}")
    if batch_size < 1:
        raise ZfnetError(f"batch size must be at least 1, not {batch_size}")
    if isinstance(data, ImageDataset):
        dataset = data if preprocess is None else ImageDataset(data.paths, data.labels, preprocess)
        root = getattr(data, "root", None)
    else:
        dataset = ImageDataset.from_folder(data, preprocess or Preprocess.for_model(model))
        root = dataset.root if Path(data).is_dir() else Path(data).parent
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

    topk = _TopK(k)
    done, skipped, finished = 0, [], False
    state_path = None
    if state is not None:
        state_path = Path(state) if world == 1 else Path(f"{state}.rank{rank}-of-{world}")
        fp = _fingerprint(model, paths, layers, k, (rank, world),
                          transform if isinstance(transform, Preprocess) else Preprocess())
        if state_path.exists():
            done, skipped, finished = _load_state(state_path, fp, topk, device)

    if not finished:
        batches = Batches(dataset, batch_size, workers, progress, desc="mine" if world == 1 else f"mine[{rank}]",
                          shard=(rank, world), start=done)
        seen, start = 0, done
        with torch.inference_mode():
            for n, (x, _, idx) in enumerate(batches, 1):
                x = x.to(device, dtype if dtype.is_floating_point else x.dtype, non_blocking=True)
                out = run_with_taps(model, x, layers, stop=True,
                                    reduce=_spatial_max)
                for name in layers:
                    if name not in out:
                        raise ZfnetError(f"layer {name!r} did not run in the forward pass (is it used by "
                                         f"forward()?)")
                    v, loc, size = out[name]
                    topk.add(name, v, loc, idx, size)
                seen += len(idx)
                done = start + seen + len(batches.skipped)
                if state_path is not None and n % save_every == 0:
                    _save_state(state_path, fp, topk, done, skipped + batches.skipped, False)
        skipped = skipped + batches.skipped
        done = start + seen + len(batches.skipped)
        if state_path is not None:
            _save_state(state_path, fp, topk, done, skipped, True)
    mined = done - len(skipped)

    if world > 1:
        missing = [n for n in layers if n not in topk]
        if missing:  # an empty shard still has to take part in the collective with the right shapes
            raise ZfnetError(f"rank {rank} mined no image (fewer images than processes?)")
        skipped, mined = _gather(d, topk, skipped, mined, layers, k)

    result_layers = {}
    for name in layers:
        if name not in topk:
            raise ZfnetError(f"no readable image in {root or 'the dataset'} ({len(skipped)} skipped)")
        v, i, lc = (t.cpu() for t in topk.get(name))
        W = topk.sizes[name][1]
        none = i == _NO_IMAGE
        result_layers[name] = {"value": v, "image": i.masked_fill(none, -1),
                               "y": (lc // W).masked_fill(none, -1), "x": (lc % W).masked_fill(none, -1)}
    return MineResult(paths, result_layers, k, list(skipped), dict(topk.sizes),
                      str(root) if root is not None else None, mined)
