"""Result folders: `result.json` (with a schema version and the exact config), `.npz` arrays, PNGs.

Every write goes to a temporary file in the same folder and is moved into place with os.replace, so a
killed job never leaves a half-written file behind.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from .errors import ZfnetError

__all__ = ["atomic_path", "load_tensors", "write_json", "read_json", "save_npz", "to_jsonable", "text_table"]


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ""):
    """Yield a temporary path beside `path`; on success it replaces `path` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or path.suffix, dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; results should read like any file the user writes
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def to_jsonable(obj):
    """Dataclasses, paths, numpy and torch scalars/arrays -> plain JSON types."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(obj.to_json() if hasattr(obj, "to_json") else dataclasses.asdict(obj))
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):  # numpy / torch
        return obj.tolist()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


def write_json(path: str | os.PathLike, obj) -> Path:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(to_jsonable(obj), f, indent=1)
            f.write("\n")
    return Path(path)


def read_json(path: str | os.PathLike):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def save_npz(path: str | os.PathLike, **arrays) -> Path:
    with atomic_path(path, suffix=".npz") as tmp:
        np.savez_compressed(tmp, **{k: np.asarray(v) for k, v in arrays.items()})
    return Path(path)


def load_tensors(path: str | os.PathLike, what: str = "file"):
    """torch.load with weights_only=True (tensors and plain types only: no code runs from a file), on the
    CPU; a missing or unreadable file is a one-line ZfnetError naming it as `what`."""
    p = Path(path)
    if not p.is_file():
        raise ZfnetError(f"{what} not found: {path}")
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, foreign, or pickled code that weights_only refuses
        raise ZfnetError(f"cannot read {what} {path}: {str(e).splitlines()[0][:200]}") from None


def text_table(rows) -> list[str]:
    """Rows of strings as lines of left-aligned columns two spaces apart (a terminal summary)."""
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    return ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
