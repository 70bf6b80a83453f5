"""Near-duplicates between two image sets (paper Sec. 5.2: checking Caltech / PASCAL test images against
the ImageNet training set "by normalized correlation of small thumbnails", before trusting transfer results).

Every image becomes a small grey thumbnail, zero-mean and unit-norm, so the dot product of two thumbnails
is their normalized correlation (1 = identical up to brightness and contrast). One matrix product per block
of the first set scores it against all of the second; pairs above a threshold are reported.

Plain 32x32 correlation drops to ~0.6 for a copy cropped by a few percent (every pixel moves), as low as
distinct photos score. So each image also gets thumbnails of its central 94% and 88%, all lightly blurred,
and a pair scores the best correlation over these zooms: a slightly cropped copy then lines up with one of
them. On ../shared imagenet-samples this puts every planted copy at >= 0.93 and every distinct pair of the
1000 photos at <= 0.92 (tests/test_overlap.py checks the planted side).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..core.errors import ZfnetError
from ..core.progress import progress_bar
from ..data.images import list_images, load_image

__all__ = ["DEFAULT_THRESHOLD", "OverlapResult", "find_overlap", "thumbnails"]

DEFAULT_THRESHOLD = 0.93  # see the module docstring for how it was measured
ZOOMS = (1.0, 0.94, 0.88)  # central fractions of the frame: tolerate crops of up to ~6% a side
BLUR = 1.0  # Gaussian sigma in thumbnail pixels: tolerate sub-pixel shifts and re-encoding noise


def _paths(data) -> list[Path]:
    if isinstance(data, (str, os.PathLike)):
        return list_images(data)[0]
    out = []
    for item in data:
        out += list_images(item)[0] if Path(item).is_dir() else [Path(item)]
    return out


def thumbnails(paths: Sequence, size: int = 32, zooms: Sequence[float] = ZOOMS, blur: float = BLUR,
               progress: bool = True) -> tuple[np.ndarray, list[str], list]:
    """(len(zooms), N, size*size) float32 grey thumbnails, zero-mean and unit-norm, for the readable files.

    Zoom z squashes the central z-fraction of the frame (both sides) to size x size.
    Returns (thumbs, kept paths, skipped [(path, why)]). A flat (constant) image gets zero vectors, so it
    matches nothing.
    """
    from PIL import Image, ImageFilter

    rows, kept, skipped = [], [], []
    for p in progress_bar(paths, desc="thumbnails", enabled=progress):
        try:
            im = load_image(p)
        except ZfnetError as e:
            skipped.append((str(p), str(e)))
            continue
        grey, (w, h) = im.convert("L"), im.size
        row = []
        for z in zooms:
            # The frame squashed to a square, so a copy resized to another aspect still lines up.
            box = ((1 - z) * w / 2, (1 - z) * h / 2, (1 + z) * w / 2, (1 + z) * h / 2)
            t = grey.resize((size, size), Image.BOX, box=box)
            if blur:
                t = t.filter(ImageFilter.GaussianBlur(blur))
            t = np.asarray(t, dtype=np.float32).ravel()
            t -= t.mean()
            n = np.linalg.norm(t)
            row.append(t / n if n > 1e-6 else np.zeros_like(t))
        rows.append(row)
        kept.append(str(p))
    thumbs = np.stack(rows, 1) if rows else np.zeros((len(zooms), 0, size * size), np.float32)
    return thumbs, kept, skipped


@dataclass
class OverlapResult:
    pairs: list[dict]  # [{"a": path, "b": path, "score": s}], best first
    n_a: int
    n_b: int
    skipped: list = field(default_factory=list)

    def to_json(self) -> list[dict]:
        return self.pairs


def find_overlap(a, b, *, threshold: float = DEFAULT_THRESHOLD, size: int = 32, block: int = 1024,
                 progress: bool = True) -> OverlapResult:
    """Pairs (image of a, image of b) whose thumbnail correlation is at least `threshold`.

    Args:
        a, b: image folders (searched recursively through class subfolders) or lists of files/folders.
            A file present in both sets is never paired with itself, so `find_overlap(d, d)` finds
            duplicates within one set (each pair once).
        size: thumbnail side in pixels.
        block: rows of `a` per matrix product (memory: block x len(b) floats).
    """
    if not -1.0 <= threshold <= 1.0:
        raise ZfnetError(f"--threshold must be a correlation in [-1, 1], got {threshold}")
    if size < 4:
        raise ZfnetError(f"thumbnail size must be at least 4 pixels, got {size}")
    pa, pb = _paths(a), _paths(b)
    ta, ka, sa = thumbnails(pa, size, progress=progress)
    same = [Path(p).resolve() for p in pa] == [Path(p).resolve() for p in pb]
    tb, kb, sb = (ta, ka, []) if same else thumbnails(pb, size, progress=progress)
    rb = {str(Path(p).resolve()): j for j, p in enumerate(kb)}
    ra = [str(Path(p).resolve()) for p in ka] if not same else None  # resolved once, not per candidate pair
    pairs = []
    for start in range(0, ta.shape[1], block):
        # (block, len(b)): the best normalized correlation over every pair of zooms
        scores = np.max([za[start:start + block] @ zb.T for za in ta for zb in tb], axis=0)
        for i, j in zip(*np.nonzero(scores >= threshold)):
            gi = start + int(i)
            if same and int(j) <= gi:  # within one set: each unordered pair once, never an image with itself
                continue
            if not same and rb.get(ra[gi]) == int(j):
                continue
            pairs.append({"a": ka[gi], "b": kb[int(j)], "score": round(float(scores[i, j]), 4)})
    pairs.sort(key=lambda p: -p["score"])
    return OverlapResult(pairs, len(ka), len(kb), sa + sb)
