"""Training data for the recipe of Sec. 3: the per-class split, the paper's crops, the training-set
statistics (the per-pixel mean image; the RGB covariance for AlexNet's PCA lighting) and global batches
that do not depend on the number of processes (used by zfnet.training.recipe)."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.errors import NoInputError, ZfnetError
from ..core.progress import progress_bar
from .images import _center_crop, _resize_shorter, _to_tensor, collate, load_image, ten_crop
from .lighting import Lighting, covariance, rgb_moments

__all__ = ["split_per_class", "TrainImages", "GlobalBatches", "TrainStats", "train_statistics"]


# ----------------------------------------------------------------------------------------------------
# Data: the paper's preprocessing, deterministic per (seed, epoch, image)
def split_per_class(labels: list[int], n_train: int, seed: int = 0) -> tuple[list[int], list[int]]:
    """Indices: n_train random images of every class for training, the rest for testing (Sec. 5.2's
    Caltech protocol)."""
    g = torch.Generator().manual_seed(seed)
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(y, []).append(i)
    train, test = [], []
    for y in sorted(by_class):
        idx = by_class[y]
        perm = torch.randperm(len(idx), generator=g).tolist()
        train += [idx[j] for j in perm[:n_train]]
        test += [idx[j] for j in perm[n_train:]]
    return sorted(train), sorted(test)


class TrainImages(torch.utils.data.Dataset):
    """Sec. 3 preprocessing: shorter side to `resize`, central resize x resize, minus the per-pixel mean
    image, then a random crop + flip (train), the 10 crops (eval) or the centre crop. With `lighting`
    (zfnet.data.lighting.Lighting), training crops also get AlexNet's PCA colour shift.

    Items are (tensor, label, index, error) as zfnet.data.images.ImageDataset's, so zfnet.data.images.collate skips
    unreadable files. The random crop of image i in epoch e comes from a generator seeded by
    (seed, e, i): identical whichever process or worker loads it, and after a resume; so is its colour shift.
    """

    def __init__(self, paths, labels, resize: int, crop: int, mode: str = "random", flip: bool = True,
                 mean_image: torch.Tensor | None = None, cache: bool = False, seed: int = 0,
                 lighting: Lighting | None = None):
        self.paths, self.labels = [Path(p) for p in paths], list(labels)
        self.resize, self.size, self.mode, self.flip = resize, crop, mode, flip
        self.mean_image, self.seed, self.epoch, self.lighting = mean_image, seed, 0, lighting
        self.cache: dict[int, torch.Tensor] | None = {} if cache else None

    def __len__(self):
        return len(self.paths)

    def base(self, i: int) -> torch.Tensor:
        """(3, resize, resize) uint8, before mean subtraction (what the cache holds)."""
        if self.cache is not None and i in self.cache:
            return self.cache[i]
        im = _center_crop(_resize_shorter(load_image(self.paths[i]), self.resize), self.resize)
        x = (_to_tensor(im) * 255).round().to(torch.uint8)
        if self.cache is not None:
            self.cache[i] = x
        return x

    def __getitem__(self, i: int):
        try:
            x = self.base(i).float().div_(255.0)
        except ZfnetError as e:
            return None, self.labels[i], i, str(e)
        if self.mean_image is not None:
            x = x - self.mean_image
        s = self.size
        H, W = x.shape[-2:]
        if self.mode == "ten":
            x = ten_crop(x, s)
        elif self.mode == "random":
            g = torch.Generator().manual_seed(((self.seed * 1_000_003 + self.epoch) * 1_000_003 + i) % 2**62)
            t = int(torch.randint(0, H - s + 1, (1,), generator=g))
            left = int(torch.randint(0, W - s + 1, (1,), generator=g))
            x = x[:, t:t + s, left:left + s]
            if self.flip and torch.rand(1, generator=g).item() < 0.5:
                x = x.flip(-1)
            if self.lighting is not None:
                x = self.lighting(x, self.seed, self.epoch, i)
        elif self.mode == "none":
            pass
        else:
            t, left = (H - s) // 2, (W - s) // 2
            x = x[:, t:t + s, left:left + s]
        return x.contiguous(), self.labels[i], i, None


class GlobalBatches(torch.utils.data.Sampler):
    """Per epoch, a permutation seeded by (seed, epoch) cut into global batches of `batch_size`; each
    process takes its rank's share of every batch. The union of the shares is the single-process batch,
    so 1 or N processes (DDP averages gradients) take the same optimization steps."""

    def __init__(self, n: int, batch_size: int, rank: int = 0, world: int = 1, seed: int = 0):
        self.n, self.batch_size, self.rank, self.world, self.seed = n, batch_size, rank, world, seed
        self.epoch = 0

    def _global(self):
        g = torch.Generator().manual_seed(self.seed * 7919 + self.epoch)
        perm = torch.randperm(self.n, generator=g).tolist()
        out = [perm[i:i + self.batch_size] for i in range(0, self.n, self.batch_size)]
        return [b for b in out if len(b) >= self.world]  # every process needs a share of every step

    def __iter__(self):
        for b in self._global():
            yield b[self.rank::self.world]

    def __len__(self):  # the batches _global keeps, counted without drawing the permutation
        full, rest = divmod(self.n, self.batch_size)
        return full * (self.batch_size >= self.world) + (rest >= self.world)


@dataclass
class TrainStats:
    """What the recipe computes once from the training set (Sec. 3's mean image; the RGB covariance of
    AlexNet's PCA lighting, Krizhevsky et al. Sec. 4.1) and the files that could not be read."""

    mean_image: torch.Tensor  # (3, R, R) float32, per-pixel mean
    rgb_cov: torch.Tensor  # (3, 3) float64, covariance of the RGB values of all training pixels
    pixels: int
    skipped: list[int]  # indices into the dataset

    def lighting(self, std: float) -> Lighting:
        return Lighting.from_covariance(self.rgb_cov, std)

    def to_dict(self) -> dict:
        return {"mean_image": self.mean_image, "rgb_cov": self.rgb_cov, "pixels": self.pixels,
                "skipped": list(self.skipped)}

    @classmethod
    def from_dict(cls, d: dict) -> "TrainStats":
        return cls(d["mean_image"], d["rgb_cov"], int(d["pixels"]), [int(i) for i in d["skipped"]])


@torch.no_grad()
def train_statistics(ds: TrainImages, d, batch_size: int, workers: int, progress: bool) -> TrainStats:
    """One pass over the training set: the per-pixel mean image, the RGB covariance, unreadable files.

    `d` (zfnet.core.distributed.Dist) shards the pass over torchrun processes and sums their shares."""
    ds.mean_image, mode, lighting = None, ds.mode, ds.lighting
    ds.mode, ds.lighting = "none", None
    idx = list(range(d.rank, len(ds), d.world))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, idx), batch_size=batch_size,
                                         num_workers=0 if ds.cache is not None else workers, collate_fn=collate)
    total = torch.zeros(3, ds.resize, ds.resize, dtype=torch.float64)
    rgb = torch.zeros(3, dtype=torch.float64)
    outer = torch.zeros(3, 3, dtype=torch.float64)
    bad = torch.zeros(len(ds), dtype=torch.float64)
    bar = progress_bar(total=len(loader), desc="training-set statistics", enabled=progress)
    n = 0
    for x, _, _, errors in loader:
        if x is not None:
            total += x.double().sum(0)
            s, o, _ = rgb_moments(x)
            rgb, outer, n = rgb + s, outer + o, n + len(x)
        for i, msg in errors:
            bad[i] = 1
            print(f"zfnet: skipping {msg}", file=sys.stderr)
        bar.update(1)
    bar.close()
    parts = [total.flatten(), rgb, outer.flatten(), torch.tensor([float(n)], dtype=torch.float64), bad]
    stats = d.all_sum(torch.cat(parts)).split([p.numel() for p in parts])
    total, rgb, outer, n, bad = stats[0].view_as(total), stats[1], stats[2].view(3, 3), int(stats[3].item()), stats[4]
    ds.mode, ds.lighting = mode, lighting
    if n == 0:
        raise NoInputError("none of the training images could be read (each listed above)")
    pixels = n * ds.resize * ds.resize
    return TrainStats((total / n).float(), covariance(rgb, outer, pixels), pixels,
                      [i for i in range(len(ds)) if bad[i] > 0])
