"""Images to tensors: robust decoding, image folders, and the two preprocessing presets.

`paper` is Sec. 3 of Zeiler & Fergus: shorter side to 256, central 256x256, subtract the per-pixel mean
image of the training set, then 224x224 crops (random + flip for training; centre, or the 10 corner /
centre crops and their flips for evaluation). `torchvision` is what published ImageNet weights expect:
shorter side 256, centre 224, RGB/255, per-channel mean/std.
"""

from __future__ import annotations

import os
import re
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ..core.errors import ZfnetError
from ..core.progress import progress_bar

__all__ = ["IMAGE_EXTENSIONS", "MAX_PIXELS", "MAX_ASPECT", "load_image", "check_image_size", "list_images",
           "Preprocess", "ImageDataset", "collate", "ten_crop", "Batches", "IMAGENET_MEAN", "IMAGENET_STD", "as_input"]

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def load_image(path: str | os.PathLike) -> Image.Image:
    """Decode any common image file to 8-bit RGB, upright (EXIF orientation applied).

    Handles grayscale, palette (with transparency), RGBA/LA (composited on white), CMYK, 16-bit and
    32-bit integer/float images. Raises ZfnetError naming the file when it cannot be read, and, from the
    header alone (before anything large is allocated), when it is too large to decode (more than
    MAX_PIXELS pixels) or too elongated (longer side above MAX_ASPECT times the shorter one: resizing its
    shorter side to 256 would make the other side enormous).
    """
    path = Path(path)
    try:
        if path.exists() and not path.is_dir() and not stat.S_ISREG(path.stat().st_mode):
            raise ZfnetError(f"cannot read image {path}: not a regular file (a pipe, socket or device)")
        with warnings.catch_warnings():  # PIL warns between 1x and 2x its limit; we refuse from 1x
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im_file = Image.open(path)
        with im_file as im:
            check_image_size(im.size, path)
            im.load()
            im = ImageOps.exif_transpose(im)
            return _to_rgb(im)
    except FileNotFoundError:
        what = "broken link" if path.is_symlink() else "image not found"
        raise ZfnetError(f"{what}: {path}") from None
    except IsADirectoryError:
        raise ZfnetError(f"{path} is a folder, not an image") from None
    except PermissionError:
        raise ZfnetError(f"cannot read image {path}: permission denied") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError,
            MemoryError) as e:
        if isinstance(e, Image.DecompressionBombError):  # PIL's own check, at twice its limit
            n = re.search(r"\((\d+) pixels\)", str(e))
            size = f" ({int(n.group(1)) / 1e6:.0f} Mpx)" if n else ""
            raise ZfnetError(f"image {path} is too large{size}: above the {MAX_PIXELS / 1e6:.0f} Mpx zfnet decodes "
                             f"(PIL's decompression-bomb limit); downscale it first") from None
        reason = "empty file" if path.exists() and path.stat().st_size == 0 else str(e).split("\n")[0][:120]
        raise ZfnetError(f"cannot read image {path}: {reason or type(e).__name__}") from None


MAX_PIXELS = 89_478_485  # PIL's decompression-bomb limit (Image.MAX_IMAGE_PIXELS): 268 MB as 8-bit RGB
MAX_ASPECT = 20.0  # the longest real photos (panoramas) stay below; at 256 px the other side is 5,120 px


def check_image_size(size: tuple[int, int], path: str | os.PathLike = "image") -> None:
    """Refuse, naming the file, an image of `size` (width, height) that cannot be decoded and resized in
    bounded memory: more than MAX_PIXELS pixels, or an aspect ratio above MAX_ASPECT:1 (crop it first)."""
    w, h = int(size[0]), int(size[1])
    if w < 1 or h < 1:
        raise ZfnetError(f"image {path} has no pixels ({w}x{h})")
    if w * h > MAX_PIXELS:
        raise ZfnetError(f"image {path} is too large ({w}x{h}, {w * h / 1e6:.0f} Mpx): above the "
                         f"{MAX_PIXELS / 1e6:.0f} Mpx zfnet decodes (PIL's decompression-bomb limit); "
                         f"downscale it first")
    if max(w, h) > MAX_ASPECT * min(w, h):
        raise ZfnetError(f"image {path} is {w}x{h}: an aspect ratio above {MAX_ASPECT:g}:1 (resized, its "
                         f"shorter side would make the longer one {int(256 * max(w, h) / min(w, h)):,} px); "
                         f"crop it first")


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # High bit depth: rescale the actual range to 8 bits (16-bit PNGs use 0..65535).
        a = np.asarray(im, dtype=np.float64)
        hi = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
        if im.mode == "F":
            hi = max(float(a.max()), 1e-12) if a.max() > 1 else 1.0
        im = Image.fromarray(np.clip(a / hi * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "RGBa", "La", "PA"):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(bg, im)
    return im.convert("RGB")


def _named_like_image(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_EXTENSIONS


def _listdir(folder: Path) -> list[Path]:
    try:
        return sorted(folder.iterdir())
    except OSError as e:
        raise ZfnetError(f"cannot list folder {folder}: {e.strerror or type(e).__name__}") from None


def list_images(root: str | os.PathLike) -> tuple[list[Path], list[int] | None, list[str] | None]:
    """Files of an image folder, sorted: (paths, labels, class names).

    A folder of class subfolders gives labels by sorted subfolder name; a flat folder (or a single file)
    gives labels None. Entries are chosen by extension: anything named like an image is listed, also what
    is not a readable file (a broken link, a folder named x.jpg, a file without read permission), so that
    decoding fails on it and the batch job lists it among the skipped, never dropping it silently.
    """
    root = Path(root)
    if root.is_file():
        return [root], None, None
    if not root.is_dir():
        what = "broken link" if root.is_symlink() else "no such file or folder"
        raise ZfnetError(f"{what}: {root}")
    entries = _listdir(root)
    flat = [p for p in entries if _named_like_image(p)]
    subdirs = [d for d in entries if d.is_dir() and not _named_like_image(d) and not d.name.startswith(".")]
    if subdirs and not flat:
        paths, labels = [], []
        for i, d in enumerate(subdirs):
            files = _walk(d)
            paths += files
            labels += [i] * len(files)
        return paths, labels, [d.name for d in subdirs]
    if not flat:
        raise ZfnetError(f"no images found in {root} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
    return flat, None, None


def _walk(folder: Path) -> list[Path]:
    """Everything named like an image below `folder`, sorted (links to folders are not followed)."""
    out = []
    for p in _listdir(folder):
        if _named_like_image(p):
            out.append(p)
            if p.is_symlink() or not p.is_dir():
                continue
        if p.is_dir() and not p.is_symlink():
            out += _walk(p)
    return sorted(out)


def _resized_size(w: int, h: int, size: int) -> tuple[int, int]:
    """(w, h) after scaling the shorter side to `size`, with torchvision's rounding (so published
    accuracies reproduce)."""
    short, long = (w, h) if w <= h else (h, w)
    if short == size:
        return w, h
    new_long = int(size * long / short)
    return (size, new_long) if w <= h else (new_long, size)


# torchvision's InterpolationMode values -> PIL filters (as torchvision maps them for PIL images)
INTERPOLATIONS = {"nearest": Image.NEAREST, "nearest-exact": Image.NEAREST, "bilinear": Image.BILINEAR,
                  "bicubic": Image.BICUBIC, "box": Image.BOX, "hamming": Image.HAMMING, "lanczos": Image.LANCZOS}


def _resize_shorter(im: Image.Image, size: int, interpolation: str = "bilinear") -> Image.Image:
    new = _resized_size(*im.size, size)
    return im if new == im.size else im.resize(new, INTERPOLATIONS[interpolation])


def _offset(n: int, size: int) -> int:
    """Start of a centred `size` window in `n` pixels (torchvision's CenterCrop rounding)."""
    return int(round((n - size) / 2.0))


def _center_crop(im: Image.Image, size: int) -> Image.Image:
    w, h = im.size
    left, top = _offset(w, size), _offset(h, size)
    return im.crop((left, top, left + size, top + size))


def _to_tensor(im: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)


def ten_crop(x: torch.Tensor, size: int = 224) -> torch.Tensor:
    """(C, H, W) -> (10, C, size, size): four corners + centre, then the same flipped (Krizhevsky/Sec. 3)."""
    H, W = x.shape[-2:]
    tops = [(0, 0), (0, W - size), (H - size, 0), (H - size, W - size), ((H - size) // 2, (W - size) // 2)]
    crops = [x[..., t:t + size, c:c + size] for t, c in tops]
    crops += [c.flip(-1) for c in crops]
    return torch.stack(crops)


@dataclass
class Preprocess:
    """An image -> tensor recipe.

    Args:
        preset: "torchvision" or "paper".
        crop: "center" (one 224 crop), "ten" (10 crops: returns (10, 3, 224, 224)), or "random"
            (random 224 crop + horizontal flip, for training).
        mean_image: (3, 256, 256) per-pixel mean in [0, 1] for the paper preset; None subtracts 0.5.
        mean, std, interpolation: the torchvision preset's normalization and resize filter (what the
            weights declare: torchvision's weights transforms; zfnet.models.weights).
    """

    preset: str = "torchvision"
    crop: str = "center"
    size: int = 224
    resize: int = 256
    mean_image: torch.Tensor | None = None
    generator: torch.Generator | None = None
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"

    def __post_init__(self):
        if self.preset not in ("torchvision", "paper"):
            raise ZfnetError(f"unknown preprocessing {self.preset!r}; use 'torchvision' or 'paper'")
        if self.crop not in ("center", "ten", "random"):
            raise ZfnetError(f"unknown crop {self.crop!r}; use 'center', 'ten' or 'random'")
        if self.interpolation not in INTERPOLATIONS:
            raise ZfnetError(f"unknown interpolation {self.interpolation!r}; use one of {', '.join(INTERPOLATIONS)}")

    @classmethod
    def for_model(cls, model, **kw) -> "Preprocess":
        """The preprocessing named by the model's weights record (see zfnet.models.weights)."""
        meta = getattr(model, "zfnet_weights", None)
        if meta is None:
            return cls(**kw)
        declared = {"size": getattr(meta, "crop_size", 224), "resize": getattr(meta, "resize_size", 256),
                    "mean": tuple(getattr(meta, "mean", IMAGENET_MEAN)),
                    "std": tuple(getattr(meta, "std", IMAGENET_STD)),
                    "interpolation": getattr(meta, "interpolation", "bilinear")}
        return cls(preset=meta.preprocessing, mean_image=meta.mean_image, **{**declared, **kw})

    def base(self, im: Image.Image) -> torch.Tensor:
        """Resize and normalize up to (but not including) the final crop: (3, h, w)."""
        im = _resize_shorter(im, self.resize, self.interpolation)
        if self.preset == "paper":
            x = _to_tensor(_center_crop(im, self.resize))
            return x - (self.mean_image if self.mean_image is not None else 0.5)
        x = _to_tensor(im)
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return (x - mean) / std

    def __call__(self, im: Image.Image) -> torch.Tensor:
        x = self.base(im)
        s = self.size
        if self.crop == "ten":
            return ten_crop(x, s)
        if self.crop == "random":
            H, W = x.shape[-2:]
            t = int(torch.randint(0, H - s + 1, (1,), generator=self.generator))
            left = int(torch.randint(0, W - s + 1, (1,), generator=self.generator))
            x = x[:, t:t + s, left:left + s]
            if torch.rand(1, generator=self.generator).item() < 0.5:
                x = x.flip(-1)
            return x.contiguous()
        return self.center(x).contiguous()

    def center(self, x: torch.Tensor) -> torch.Tensor:
        """The centred size x size crop of a (C, H, W) tensor (a view)."""
        H, W = x.shape[-2:]
        s = self.size
        t, left = _offset(H, s), _offset(W, s)
        return x[..., t:t + s, left:left + s]

    def _file_geometry(self, width: int, height: int) -> tuple[float, float, int, int]:
        """(scale_y, scale_x, off_y, off_x) of the centre crop: input pixel i is resized pixel i + off,
        and a resized pixel is `scale` file pixels."""
        rw, rh = _resized_size(width, height, self.resize)
        scale_y, scale_x = height / rh, width / rw
        oy = ox = 0
        if self.preset == "paper":  # the central resize x resize square comes first
            oy, ox = _offset(rh, self.resize), _offset(rw, self.resize)
            rh, rw = self.resize, self.resize
        return scale_y, scale_x, oy + _offset(rh, self.size), ox + _offset(rw, self.size)

    def to_file(self, width: int, height: int, y, x):
        """Input-tensor pixel coordinates (centre crop) -> pixel coordinates of a width x height file."""
        sy, sx, oy, ox = self._file_geometry(width, height)
        return (np.asarray(y, float) + oy + 0.5) * sy - 0.5, (np.asarray(x, float) + ox + 0.5) * sx - 0.5

    def to_input(self, width: int, height: int, y, x):
        """Pixel coordinates of a width x height file -> input-tensor pixel coordinates (inverse of to_file)."""
        sy, sx, oy, ox = self._file_geometry(width, height)
        return (np.asarray(y, float) + 0.5) / sy - 0.5 - oy, (np.asarray(x, float) + 0.5) / sx - 0.5 - ox

    def unnormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Back to displayable RGB in [0, 1] (for patches shown beside projections)."""
        shift, scale = self._affine(x)
        return (x * scale + shift).clamp(0, 1)

    def normalize(self, u: torch.Tensor) -> torch.Tensor:
        """RGB in [0, 1] (the crop as displayed) -> the model's input: `unnormalize` inverted (without its
        clipping) and differentiable, so optimisations and attacks can work on the image and keep their
        budgets in pixel units."""
        shift, scale = self._affine(u)
        return (u - shift) / scale

    def _affine(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(shift, scale) with pixels = input * scale + shift, shaped to broadcast over x (..., 3, H, W)."""
        one = torch.ones((), dtype=x.dtype, device=x.device)
        if self.preset == "paper":
            m = self.mean_image
            if m is None:
                return 0.5 * one, one
            H, W = x.shape[-2:]
            t, left = (m.shape[-2] - H) // 2, (m.shape[-1] - W) // 2
            return m[:, t:t + H, left:left + W].to(x), one
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(3, 1, 1)
        return mean, std


def as_input(image, preprocess: Preprocess) -> tuple[str | None, torch.Tensor]:
    """One image as the model's input: an image file, a PIL image or an already preprocessed (3, H, W) tensor
    -> (the file name or None, the (3, H, W) input). ZfnetError when it is not a single image."""
    name = None
    if isinstance(image, (str, os.PathLike)):
        name, image = str(image), load_image(image)
    x = image if isinstance(image, torch.Tensor) else preprocess(image)
    if x.dim() != 3:
        raise ZfnetError(f"expected one image (3, H, W), got shape {tuple(x.shape)}: a single-crop preprocessing "
                         f"(crop='center') gives one")
    return name, x


class ImageDataset(torch.utils.data.Dataset):
    """Files -> (tensor, label, index); an unreadable file yields its error instead of raising.

    Use with `collate`, which drops failed items from the batch and hands their errors back, so a batch
    job skips what it cannot read and reports it at the end.
    """

    def __init__(self, paths: Sequence[str | os.PathLike], labels: Sequence[int] | None = None,
                 transform: Preprocess | None = None):
        self.paths = [Path(p) for p in paths]
        self.labels = list(labels) if labels is not None else None
        self.transform = transform or Preprocess()

    @classmethod
    def from_folder(cls, root, transform: Preprocess | None = None) -> "ImageDataset":
        paths, labels, classes = list_images(root)
        ds = cls(paths, labels, transform)
        ds.root, ds.classes = Path(root), classes
        return ds

    def __len__(self):
        return len(self.paths)

    def spread(self, n: int | None, transform: Preprocess | None = None) -> "ImageDataset":
        """At most n of the images, evenly spaced over the dataset, unlabelled (itself when n is None or it
        has no more than n); transform: the subset's preprocessing (default: this dataset's)."""
        if not n or len(self) <= n:
            return self
        keep = np.linspace(0, len(self) - 1, n).round().astype(int).tolist()
        return ImageDataset([self.paths[i] for i in keep], None, transform or self.transform)

    def __getitem__(self, i: int):
        label = self.labels[i] if self.labels is not None else -1
        try:
            return self.transform(load_image(self.paths[i])), label, i, None
        except ZfnetError as e:
            return None, label, i, str(e)


def collate(items):
    """Batch the readable items; returns (x, labels, indices, errors) with errors = [(index, message)]."""
    ok = [it for it in items if it[3] is None]
    errors = [(it[2], it[3]) for it in items if it[3] is not None]
    if not ok:
        return None, torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long), errors
    x = torch.stack([it[0] for it in ok])
    return x, torch.tensor([it[1] for it in ok]), torch.tensor([it[2] for it in ok]), errors


class Batches:
    """Iterate (x, labels, indices) over a dataset with a progress bar, collecting unreadable files.

    After the loop, `skipped` lists (path, message) for every file that could not be decoded.
    Args:
        shard: (rank, world) to read only every world-th item starting at rank (for torchrun).
        start: skip the first `start` items of this process's share (for resuming).
    """

    def __init__(self, dataset: ImageDataset, batch_size: int = 32, workers: int = 0, progress: bool = True,
                 desc: str = "images", shard: tuple[int, int] = (0, 1), start: int = 0):
        self.dataset, self.batch_size, self.workers = dataset, batch_size, workers
        self.progress, self.desc = progress, desc
        rank, world = shard
        self.indices = list(range(rank, len(dataset), world))[start:]
        self.skipped: list[tuple[str, str]] = []

    def __len__(self):
        return (len(self.indices) + self.batch_size - 1) // self.batch_size

    def __iter__(self):
        subset = torch.utils.data.Subset(self.dataset, self.indices)
        loader = torch.utils.data.DataLoader(subset, batch_size=self.batch_size, num_workers=self.workers,
                                             collate_fn=collate, shuffle=False)
        bar = progress_bar(total=len(self.indices), desc=self.desc, unit="img", enabled=self.progress)
        try:
            for x, labels, idx, errors in loader:
                self.skipped += [(str(self.dataset.paths[i]), msg) for i, msg in errors]
                bar.update(len(idx) + len(errors))
                if x is not None:
                    yield x, labels, idx
        finally:
            bar.close()
