"""Result folders: `result.json` (with a schema version and the exact config), `.npz` arrays, PNGs.

Every write goes to a temporary file in the same folder and is moved into place with os.replace, so a
killed job never leaves a half-written file behind. The temporary file's name carries the writer's host
and process id; a later write into the same folder removes those whose writer is gone (a kill -9 between
creating and replacing leaves one behind). JSON is strict: NaN and Infinity, which are not JSON, are
written as null with a warning.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import socket
import tempfile
import time
import warnings
import zlib
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from .errors import ZfnetError, warn

__all__ = ["atomic_path", "load_tensors", "write_json", "read_json", "save_npz", "to_jsonable", "json_text",
           "text_table", "remove_stale_temporaries"]

_HOST = f"{zlib.crc32(socket.gethostname().encode()) & 0xFFFFFF:06x}"
# .<name>.zfnet-<host>-<pid>-<random><suffix>; the name is shortened so the whole stays under NAME_MAX
_TEMP = re.compile(r"^\..*\.zfnet-(?P<host>[0-9a-f]{6})-(?P<pid>\d+)-[A-Za-z0-9_]+(\.[^.]*)?$")
_FOREIGN_AGE_S = 24 * 3600  # another host's temporary file older than this has lost its writer too
_SWEPT: set[str] = set()  # folders already cleaned by this process


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files of interrupted atomic writes in `folder` (writer process gone: same host
    and dead pid, or another host's file older than a day). Returns what was removed."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    now = time.time()
    for e in entries:
        m = _TEMP.match(e.name)
        if not m or not e.is_file(follow_symlinks=False):
            continue
        pid = int(m.group("pid"))
        try:
            if m.group("host") == _HOST:
                stale = pid != os.getpid() and not _alive(pid)
            else:
                stale = now - e.stat(follow_symlinks=False).st_mtime > _FOREIGN_AGE_S
            if stale:
                os.unlink(e.path)
                removed.append(Path(e.path))
        except OSError:  # gone meanwhile, or not ours to delete
            pass
    return removed


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ""):
    """Yield a temporary path beside `path`; on success it replaces `path` atomically.

    suffix: the temporary file's extension (default: `path`'s), for writers that choose the format by it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = os.path.abspath(path.parent)
    if folder not in _SWEPT:  # once per folder and process: a scan per write would be quadratic
        remove_stale_temporaries(folder)
        _SWEPT.add(folder)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name[:96]}.zfnet-{_HOST}-{os.getpid()}-",
                               suffix=suffix or path.suffix, dir=path.parent)
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


def _jsonable(obj, where, bad: list):
    """`where` is (parent, key) or None: built in O(1) per value, spelled out only for a bad one."""
    if isinstance(obj, float):
        if not math.isfinite(obj):
            bad.append(_spell(where))
            return None
        return obj
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _jsonable(obj.to_json() if hasattr(obj, "to_json") else dataclasses.asdict(obj), where, bad)
    if isinstance(obj, dict):
        return {str(k): _jsonable(v, (where, str(k)), bad) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v, (where, i), bad) for i, v in enumerate(obj)]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):  # numpy / torch scalars and arrays: their values, checked like any other
        return _jsonable(obj.tolist(), where, bad)
    return obj


def _spell(where) -> str:
    parts = []
    while where is not None:
        where, key = where
        parts.append(f"[{key}]" if isinstance(key, int) else f".{key}")
    return "".join(reversed(parts)).lstrip(".") or "the value"


def to_jsonable(obj, bad: list | None = None):
    """Dataclasses, paths, numpy and torch scalars/arrays -> plain JSON types; NaN / Infinity -> None.

    bad: if given, receives where each non-finite number was (e.g. "predictions[0].top5[1].prob").
    """
    return _jsonable(obj, None, bad if bad is not None else [])


def json_text(obj, what: str = "JSON output", indent: int | None = 1) -> str:
    """Strict JSON text of `obj` (what `json.loads` of any language accepts): NaN / Infinity become null,
    with one warning naming `what` and the first place."""
    bad: list = []
    text = json.dumps(to_jsonable(obj, bad), indent=indent, allow_nan=False)
    if bad:
        more = f" (first at {bad[0]})" if len(bad) > 1 else f" (at {bad[0]})"
        warn(f"{what}: {len(bad)} non-finite number(s) (NaN or Infinity) written as null{more}")
    return text


def write_json(path: str | os.PathLike, obj) -> Path:
    """Write strict JSON (see json_text) atomically."""
    text = json_text(obj, str(path))
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text + "\n")
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
    CPU; a missing, empty or unreadable file is a one-line ZfnetError naming it as `what`."""
    p = Path(path)
    if p.is_dir():
        raise ZfnetError(f"{what} {path} is a folder, not a file")
    if not p.is_file():
        raise ZfnetError(f"{what} not found: {path}")
    try:
        if p.stat().st_size == 0:
            raise ZfnetError(f"{what} {path} is empty (0 bytes): an interrupted download or copy?")
        with warnings.catch_warnings():  # torch's notes on pickle protocols: the outcome is what matters
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(p, map_location="cpu", weights_only=True)
    except ZfnetError:
        raise
    except Exception as e:  # truncated, foreign, or pickled code that weights_only refuses
        lines = str(e).strip().splitlines()
        reason = lines[0][:200] if lines else type(e).__name__  # EOFError() has no text
        raise ZfnetError(f"cannot read {what} {path}: {reason}") from None


def text_table(rows) -> list[str]:
    """Rows of strings as lines of left-aligned columns two spaces apart (a terminal summary)."""
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    return ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
