"""Performance as a function of image attributes (CS231n notes): top-1 / top-5 accuracy of `predict`'s result
broken down by any column of a CSV (size, class, a user's tag ...) and, built in, by class and by image size.

The CSV has one row per image: a `file` column (a path relative to the data folder, an absolute path or a
bare file name), optionally a `label` column (the true class, as an index or a class name), and any other
columns, each a grouping. Without a `label` column the true classes come from the data: class subfolders
named after the model's classes (by name or ImageNet WordNet id), or ImageNet-style file names that start
with a WordNet id (`n01440764_tench.jpg`).
"""

from __future__ import annotations

import csv
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from ..core.errors import ZfnetError
from ..core.results import text_table
from ..models.weights import imagenet_classes, imagenet_wnids

__all__ = ["BUILTIN", "Breakdown", "accuracy_by", "read_attributes", "true_labels", "size_bin", "SIZE_BINS"]

BUILTIN = ("class", "size")
SIZE_BINS = (64, 128, 256, 512, 1024)  # shorter side of the file, in pixels: <64, 64-127, ..., >=1024
_WNID = re.compile(r"^(n\d{8})")


def size_bin(path: str | os.PathLike) -> str:
    """The shorter side of an image file (read from its header only) as one of the SIZE_BINS ranges."""
    with Image.open(path) as im:
        short = min(im.size)
    lo = 0
    for edge in SIZE_BINS:
        if short < edge:
            return f"{lo}-{edge - 1} px" if lo else f"<{edge} px"
        lo = edge
    return f">={SIZE_BINS[-1]} px"


def _class_index(value: str, categories: list[str], where: str) -> int:
    text = str(value).strip()
    if text.isdigit():
        i = int(text)
        if categories and not 0 <= i < len(categories):
            raise ZfnetError(f"{where}: class {i} out of range 0..{len(categories) - 1}")
        return i
    low = {c.lower(): i for i, c in enumerate(categories)}
    if text.lower() in low:
        return low[text.lower()]
    wn = _wnids(categories)
    if text in wn:
        return wn[text]
    raise ZfnetError(f"{where}: unknown class {value!r} (give a class index or one of the model's class names)")


def _wnids(categories: list[str]) -> dict[str, int]:
    """WordNet id -> index when the model's classes are ImageNet's, else {}."""
    return {w: i for i, w in enumerate(imagenet_wnids())} if tuple(categories) == imagenet_classes() else {}


def read_attributes(path: str | os.PathLike, files: list[str], root: str | os.PathLike | None = None) -> dict:
    """Read an attributes CSV: {column: {file: value}} for the given files (as predict reports them).

    Rows name files relative to `root`, absolutely, or by bare name (when that name is unique). Files with
    no row get the value "(none)"; a row naming no predicted file is an error naming it.
    """
    path = Path(path)
    if not path.is_file():
        raise ZfnetError(f"attributes file not found: {path}")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
    except (UnicodeDecodeError, csv.Error) as e:
        raise ZfnetError(f"cannot read attributes file {path}: {e}") from None
    if not rows or "file" not in rows[0]:
        raise ZfnetError(f"{path}: needs a header row with a 'file' column (and any attribute columns)")
    columns = [c for c in rows[0] if c and c != "file"]
    if not columns:
        raise ZfnetError(f"{path}: no attribute columns beside 'file'")
    resolved = {str(Path(f).resolve()): f for f in files}
    by_name = defaultdict(list)
    for f in files:
        by_name[Path(f).name].append(f)
    out = {c: {f: "(none)" for f in files} for c in columns}
    for n, row in enumerate(rows, start=2):
        name = (row.get("file") or "").strip()
        cand = [Path(name)] + ([Path(root) / name] if root is not None else [])
        match = next((resolved[str(p.resolve())] for p in cand if str(p.resolve()) in resolved), None)
        if match is None and len(by_name.get(Path(name).name, [])) == 1 and Path(name).name == name:
            match = by_name[name][0]
        if match is None:
            raise ZfnetError(f"{path} line {n}: {name!r} is not one of the predicted images")
        for c in columns:
            out[c][match] = (row.get(c) or "").strip() or "(empty)"
    return out


def true_labels(files: list[str], categories: list[str], *, given: dict | None = None) -> dict[str, int]:
    """{file: true class}: from `given` ({file: index or name}, e.g. a CSV's label column), else from class
    folders named after the model's classes, else from WordNet-id file names. ZfnetError when none apply."""
    if given is not None:
        return {f: _class_index(v, categories, f"label of {f}") for f, v in given.items() if v not in ("(none)",)}
    low = {c.lower(): i for i, c in enumerate(categories)}
    wn = _wnids(categories)
    out = {}
    for f in files:
        p = Path(f)
        folder = p.parent.name
        m = _WNID.match(p.name)
        if folder.lower() in low:
            out[f] = low[folder.lower()]
        elif folder in wn:
            out[f] = wn[folder]
        elif m and m.group(1) in wn:
            out[f] = wn[m.group(1)]
    if not out:
        raise ZfnetError("no true classes for these images: add a 'label' column to the --by CSV, or use class "
                         "folders named after the model's classes (or ImageNet WordNet-id file names)")
    return out


@dataclass
class Breakdown:
    """Accuracy per value of each column: groups[column][value] = {"n", "top1", "top5"} (percent)."""

    groups: dict
    overall: dict
    unlabelled: list = field(default_factory=list)  # predicted files without a true class (left out)

    def to_json(self) -> dict:
        return {"overall": self.overall, "groups": self.groups, "unlabelled": self.unlabelled}

    def format(self) -> str:
        o = self.overall
        lines = [f"overall: top-1 {o['top1']:.1f} %  top-5 {o['top5']:.1f} %  ({o['n']} images)"]
        for col, vals in self.groups.items():
            rows = [(col, "images", "top-1 %", "top-5 %")]
            rows += [(str(v), str(d["n"]), f"{d['top1']:.1f}", f"{d['top5']:.1f}") for v, d in vals.items()]
            lines += ["", *text_table(rows)]
        if self.unlabelled:
            lines += ["", f"{len(self.unlabelled)} image(s) without a true class were left out"]
        return "\n".join(lines)


def _score(items) -> dict:
    n = len(items)
    return {"n": n, "top1": 100.0 * sum(a for a, _ in items) / max(n, 1),
            "top5": 100.0 * sum(b for _, b in items) / max(n, 1)}


def accuracy_by(predictions, labels: dict[str, int], columns: dict[str, dict[str, str]],
                categories: list[str] | None = None) -> Breakdown:
    """Top-1 / top-5 per group.

    Args:
        predictions: `predict`'s result (PredictResult, or its list of Prediction).
        labels: {file: true class}; predicted files without one are left out and listed.
        columns: {column: {file: value}}; the built-in columns "class" and "size" may be given as None values
            to be computed here (class: the true class's name; size: the file's shorter side, binned).
    """
    preds = getattr(predictions, "predictions", predictions)
    hits, unlabelled = {}, []
    for p in preds:
        if p.file not in labels:
            unlabelled.append(p.file)
            continue
        top = [t["index"] for t in p.top5]
        y = labels[p.file]
        hits[p.file] = (top[:1] == [y], y in top[:5])
    if not hits:
        raise ZfnetError("none of the predicted images has a true class")
    cats = list(categories or [])
    groups = {}
    for col, values in columns.items():
        if values is None and col == "class":
            values = {f: cats[labels[f]] if labels[f] < len(cats) else str(labels[f]) for f in hits}
        elif values is None and col == "size":
            values = {f: size_bin(f) for f in hits}
        elif values is None:
            raise ZfnetError(f"unknown built-in grouping {col!r}; use one of {', '.join(BUILTIN)} or a CSV file")
        bucket = defaultdict(list)
        for f, h in hits.items():
            bucket[values.get(f, "(none)")].append(h)
        keys = sorted(bucket, key=_natural) if col != "size" else sorted(bucket, key=_size_order)
        groups[col] = {k: _score(bucket[k]) for k in keys}
    return Breakdown(groups, _score(list(hits.values())), unlabelled)


def _natural(text: str):
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", str(text))]


def _size_order(text: str):
    m = re.search(r"\d+", text)
    return (0 if text.startswith("<") else 1, int(m.group()) if m else 0)
