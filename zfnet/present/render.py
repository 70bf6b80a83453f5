"""Pictures: display normalization of projections, image grids and PNG output (Figs. 1-7 style).

Projections are signed and have no natural scale, so for display each is scaled symmetrically about
zero (0 -> mid grey) by its own largest magnitude, as the paper's figures show them; the raw values are
always saved beside the picture (.npy / .npz) for anyone who needs numbers.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, features

from ..core.results import atomic_path

__all__ = ["signed_to_rgb", "image_to_rgb", "grid", "save_png", "save_picture", "PICTURE_EXT", "save_figure",
           "enlarge", "grey", "filter_tiles", "channel_tiles"]


def _hwc(x) -> np.ndarray:
    a = x.detach().cpu().float().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float32)
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
        a = a.transpose(1, 2, 0)
    if a.ndim == 2:
        a = a[..., None]
    return a


def signed_to_rgb(x, eps: float = 1e-12) -> np.ndarray:
    """A signed map (C, H, W) or (H, W, C) -> uint8 RGB, 0 at mid grey, +-max|x| at white/black per channel
    jointly (one scale for the whole map, so colours keep their balance)."""
    a = _hwc(x)
    scale = max(float(np.abs(a).max()), eps)
    a = 0.5 + 0.5 * a / scale
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, -1)
    return (np.clip(a, 0, 1) * 255 + 0.5).astype(np.uint8)


def image_to_rgb(x) -> np.ndarray:
    """An image in [0, 1] (C, H, W) or (H, W, C) -> uint8 RGB."""
    a = _hwc(x)
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, -1)
    return (np.clip(a, 0, 1) * 255 + 0.5).astype(np.uint8)


def enlarge(rgb: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour upscaling by an integer factor: each weight or activation stays one crisp block."""
    return rgb if factor <= 1 else np.kron(rgb, np.ones((factor, factor, 1), np.uint8))


def filter_tiles(weight, size: int = 48) -> list[np.ndarray]:
    """(O, I, kh, kw) conv filters -> one RGB tile per output filter (Fig. 6 (a); the CS231n notes' first-layer
    filters): in colour when the filter has 3 input channels, else the mean over its inputs in grey; signed,
    each scaled by its own largest magnitude (0 = mid grey); enlarged to about `size` pixels."""
    w = weight.detach().float().cpu() if isinstance(weight, torch.Tensor) else torch.as_tensor(weight).float()
    factor = max(1, size // w.shape[-1])
    # Channels last before drawing: a (3, 3, 3) filter must not be taken for a 3 x 3 image of 3 channels.
    return [enlarge(signed_to_rgb(f.permute(1, 2, 0) if f.shape[0] == 3 else f.mean(0)), factor) for f in w]


def channel_tiles(weight, size: int = 32) -> list[np.ndarray]:
    """(I, kh, kw): one output channel's filter -> one grey tile per input channel, all on that filter's one
    scale (largest magnitude over its inputs; 0 = mid grey), so the inputs it weighs most stand out."""
    w = weight.detach().float().cpu() if isinstance(weight, torch.Tensor) else torch.as_tensor(weight).float()
    scale = max(float(w.abs().max()), 1e-12)
    factor = max(1, size // w.shape[-1])
    return [enlarge(grey(c / scale), factor) for c in w]


def grey(x, lo: float = -1.0, hi: float = 1.0) -> np.ndarray:
    """A one-channel map (H, W) -> uint8 grey RGB: lo (and below) black, hi (and above) white, linear between."""
    a = (_hwc(x)[..., :1] - lo) / max(hi - lo, 1e-12)
    return (np.clip(np.repeat(a, 3, -1), 0, 1) * 255 + 0.5).astype(np.uint8)


def grid(tiles: Sequence[np.ndarray], ncol: int, pad: int = 2, fill: int = 255) -> np.ndarray:
    """Tile uint8 RGB images (any sizes) into one image, row-major, each cell as large as the largest."""
    if not tiles:
        return np.full((1, 1, 3), fill, np.uint8)
    h = max(t.shape[0] for t in tiles)
    w = max(t.shape[1] for t in tiles)
    nrow = (len(tiles) + ncol - 1) // ncol
    out = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, 3), fill, np.uint8)
    for i, t in enumerate(tiles):
        r, c = divmod(i, ncol)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        out[y:y + t.shape[0], x:x + t.shape[1]] = t
    return out


def save_figure(fig, path: str | os.PathLike, dpi: int | None = 90) -> Path:
    """Lay out a matplotlib figure, write it as PNG atomically and close it (dpi None: the figure's own)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", **({} if dpi is None else {"dpi": dpi}))
    plt.close(fig)
    return Path(path)


def save_png(rgb: np.ndarray, path: str | os.PathLike) -> Path:
    """Write a uint8 RGB (or grey) array as PNG, atomically."""
    with atomic_path(path, suffix=".png") as tmp:
        Image.fromarray(np.ascontiguousarray(rgb)).save(tmp, format="PNG")
    return Path(path)


# Photographic tiles and sprites: WebP where Pillow has it (about 30 % smaller than JPEG at the same
# quality; every current browser shows it), JPEG otherwise.
PICTURE_EXT = "webp" if features.check("webp") else "jpg"


def save_picture(rgb: np.ndarray, path: str | os.PathLike, quality: int = 85) -> Path:
    """Write a uint8 RGB array as a compact lossy picture (format from the suffix: .webp or .jpg), atomically."""
    path = Path(path)
    fmt = "WEBP" if path.suffix.lower() == ".webp" else "JPEG"
    # WebP's encoder effort 2 (of 0-6): half the time of its default 4 for 4 % more bytes (sprites of the demo
    # atlas: 6.7 against 13.2 ms each; an atlas writes thousands). JPEG: 4:4:4 colour.
    extra = {"method": 2} if fmt == "WEBP" else {"subsampling": 0, "optimize": True}
    with atomic_path(path, suffix=path.suffix) as tmp:
        Image.fromarray(np.ascontiguousarray(rgb)).save(tmp, format=fmt, quality=quality, **extra)
    return path
