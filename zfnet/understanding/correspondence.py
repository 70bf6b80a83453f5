"""Correspondence analysis (Sec. 4.3, Table 1): does the network tie the same object part together
across different images?

For every part (left eye, right eye, nose, ...) the same part is masked in each image by a square of the
preprocessing mean; eps_i = x_i - x~_i is the change of layer l's feature vector for image i, and
Delta_l = sum over pairs i != j of H(sign eps_i, sign eps_j), the Hamming distance, reported as the paper's
"mean feature sign change": Hamming distance / feature length, mean +- std over the pairs. A lower value
than for squares at random positions (several seeded draws per image) means the part is represented
consistently.

Parts file (the format of ../shared/data/dogs/parts.json): {"images": [{"file": "x.jpg", "left_eye": [x, y],
"nose": [x, y], ...}, ...]}; every 2-number entry is a part in pixels (x, y) of the image file. Files are
looked up in `images_root` if given, else beside the parts file, else in ../imagenet-samples next to the
parts file's folder (where the shared dogs' photos live).
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ..core.errors import NoInputError, ZfnetError
from ..core.results import text_table
from ..inspect.layers import feature_layers, layer_table, penultimate_layer, run_with_taps

__all__ = ["CorrespondenceResult", "load_parts", "correspondence", "sign_change", "render_correspondence",
           "PAPER_TABLE1"]

# Zeiler & Fergus, Table 1: mean feature sign change (mean, std) for layer 5 and layer 7.
PAPER_TABLE1 = {"right_eye": {"layer 5": (0.067, 0.007), "layer 7": (0.069, 0.015)},
                "left_eye": {"layer 5": (0.069, 0.007), "layer 7": (0.068, 0.013)},
                "nose": {"layer 5": (0.079, 0.017), "layer 7": (0.069, 0.011)},
                "random": {"layer 5": (0.107, 0.017), "layer 7": (0.073, 0.014)}}


def load_parts(path: str | Path, images_root: str | Path | None = None) -> tuple[list[dict], list[str]]:
    """Read a parts file: ([{"file": Path, "parts": {name: (x, y)}, "class_index": i|None}], part names).

    Part names are those marked in every image, in the order of the first image.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ZfnetError(f"parts file not found: {path}") from None
    except (OSError, ValueError) as e:
        raise ZfnetError(f"cannot read parts file {path}: {str(e)[:120]}") from None
    entries = data.get("images") if isinstance(data, dict) else data
    if not isinstance(entries, list) or not entries:
        raise ZfnetError(f"parts file {path} has no \"images\" list")
    roots = [Path(images_root)] if images_root else [path.parent, path.parent.parent / "imagenet-samples"]
    out = []
    for n, e in enumerate(entries):
        if not isinstance(e, dict) or not isinstance(e.get("file"), str):
            raise ZfnetError(f"parts file {path}: entry {n} has no \"file\"")
        parts = {}
        for k, v in e.items():
            if isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(c, (int, float)) for c in v):
                parts[k] = (float(v[0]), float(v[1]))
        f = next((r / e["file"] for r in roots if (r / e["file"]).exists()), roots[0] / e["file"])
        out.append({"file": f, "parts": parts, "class_index": e.get("class_index")})
    names = [k for k in out[0]["parts"] if all(k in o["parts"] for o in out)]
    if not names:
        raise ZfnetError(f"parts file {path}: no part (an [x, y] entry) is marked in every image")
    return out, names


def sign_change(eps: torch.Tensor) -> np.ndarray:
    """Hamming distance between sign(eps_i) and sign(eps_j) / feature length, for every pair i < j."""
    s = torch.sign(eps.flatten(1))
    return np.array([float((s[i] != s[j]).double().mean()) for i, j in itertools.combinations(range(len(s)), 2)])


@dataclass
class CorrespondenceResult:
    files: list[str]
    parts: list[str]
    layers: list[str]
    table: dict  # layer -> part|"random" -> {"mean", "std", "pairs": [...]}
    boxes: dict  # part -> [(y0, y1, x0, x1) per image] in input pixels; "random" -> draws x images
    skipped: list = field(default_factory=list)
    config: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"schema": 1, "files": self.files, "parts": self.parts, "layers": self.table,
                "boxes": self.boxes, "skipped": [list(s) for s in self.skipped], "config": self.config}

    def _rows(self) -> list[list[str]]:
        """One row per part and the random baseline: [part, "mean ± std" per layer]."""
        return [[part] + [f"{self.table[n][part]['mean']:.3f} ± {self.table[n][part]['std']:.3f}"
                          for n in self.layers] for part in self.parts + ["random"]]

    def format(self) -> str:
        """Table 1 layout: one row per part and the random baseline, one column per layer."""
        head = ["occlusion location"] + [f"{name} sign change" for name in self.layers]
        rows = [head] + self._rows()
        lines = text_table(rows)
        rule = "  ".join("-" * max(len(r[c]) for r in rows) for c in range(len(head)))
        return "\n".join([lines[0], rule] + lines[1:])

    def markdown(self) -> str:
        lines = ["| occlusion location | " + " | ".join(self.layers) + " |",
                 "|---|" + "---|" * len(self.layers)]
        lines += [f"| {r[0]} | " + " | ".join(r[1:]) + " |" for r in self._rows()]
        return "\n".join(lines)


def _square(cy: float, cx: float, size: int, H: int, W: int) -> tuple[int, int, int, int]:
    y0, x0 = int(round(cy - size / 2)), int(round(cx - size / 2))
    return max(0, y0), min(H, y0 + size), max(0, x0), min(W, x0 + size)


def correspondence(model: nn.Module, parts_file: str | Path, *, images_root: str | Path | None = None,
                   layers: list[str] | None = None, parts: list[str] | None = None, size: int = 30,
                   random_draws: int = 10, seed: int = 0, preprocess=None) -> CorrespondenceResult:
    """Table 1 for the images and part coordinates of `parts_file`.

    Args:
        layers: default: the top conv layer and the penultimate layer (one entry if they coincide).
        parts: which parts (default: all marked in every image).
        size: side of the masking square in input pixels (after the resize / crop of preprocessing).
        random_draws: random square positions per image for the baseline (seeded by `seed`).
    """
    from ..data.images import Preprocess, load_image

    pre = preprocess or Preprocess.for_model(model)
    entries, names = load_parts(parts_file, images_root)
    if parts:
        unknown = [p for p in parts if p not in names]
        if unknown:
            raise ZfnetError(f"unknown part {unknown[0]!r}; parts in {parts_file}: {', '.join(names)}")
        names = list(parts)
    if size < 1 or size > pre.size:
        raise ZfnetError(f"square size must be 1..{pre.size}, got {size}")
    table = layer_table(model, pre.size)
    layers = list(dict.fromkeys(layers or [feature_layers(model)[-1], penultimate_layer(model, table)]))
    for name in layers:
        table[name]  # noqa: B018 -- raises ZfnetError naming the valid layers
    S = pre.size
    xs, files, centres, skipped = [], [], [], []
    for e in entries:
        try:
            im = load_image(e["file"])
        except ZfnetError as err:
            skipped.append((str(e["file"]), str(err)))
            continue
        W, H = im.size
        c = {}
        for p in names:
            px, py = e["parts"][p]
            if not (0 <= px < W and 0 <= py < H):
                raise ZfnetError(f"part {p} of {e['file']} at (x={px:g}, y={py:g}) lies outside the {W}x{H} image")
            iy, ix = pre.to_input(W, H, py, px)
            if not (0 <= iy < S and 0 <= ix < S):
                raise ZfnetError(f"part {p} of {e['file']} at (x={px:g}, y={py:g}) falls outside the central "
                                 f"{S}x{S} crop the model sees")
            c[p] = (float(iy), float(ix))
        xs.append(pre(im))
        files.append(str(e["file"]))
        centres.append(c)
    if len(xs) < 2:
        raise NoInputError(f"correspondence needs at least 2 readable images, got {len(xs)}", skipped)
    device = next(model.parameters()).device
    x = torch.stack(xs).to(device)
    rng = np.random.default_rng(seed)
    boxes = {p: [_square(*c[p], size, S, S) for c in centres] for p in names}
    draws = []
    for _ in range(random_draws):
        ys0, xs0 = rng.integers(0, S - size + 1, len(xs)), rng.integers(0, S - size + 1, len(xs))
        draws.append([(int(a), int(a) + size, int(b), int(b) + size) for a, b in zip(ys0, xs0)])

    def feats(batch):
        with torch.no_grad():
            t = run_with_taps(model, batch, layers)
        return {n: t[n].flatten(1).double() for n in layers}

    clean = feats(x)

    def deltas(bxs):
        xm = x.clone()
        for i, (y0, y1, x0, x1) in enumerate(bxs):
            xm[i, :, y0:y1, x0:x1] = 0.0  # the preprocessing mean
        f = feats(xm)
        return {n: sign_change(clean[n] - f[n]) for n in layers}

    out = {n: {} for n in layers}
    for p in names:
        d = deltas(boxes[p])
        for n in layers:
            out[n][p] = {"mean": float(d[n].mean()), "std": float(d[n].std()), "pairs": d[n].tolist()}
    rand = [deltas(b) for b in draws]
    for n in layers:
        v = np.concatenate([r[n] for r in rand]) if rand else np.zeros(0)
        out[n]["random"] = {"mean": float(v.mean()) if v.size else float("nan"),
                            "std": float(v.std()) if v.size else float("nan"), "pairs": v.tolist()}
    return CorrespondenceResult(
        files=files, parts=names, layers=layers, table=out,
        boxes={**{p: [list(b) for b in boxes[p]] for p in names}, "random": [[list(b) for b in d] for d in draws]},
        skipped=skipped,
        config={"parts_file": str(parts_file), "images_root": str(images_root) if images_root else None,
                "layers": layers, "parts": names, "size": size, "random_draws": random_draws, "seed": seed,
                "fill": "mean (0 after normalization)", "preprocessing": pre.preset, "input_size": S,
                "std": "population std (ddof=0) over image pairs"})


def render_correspondence(result: CorrespondenceResult, path: str | Path, preprocess) -> Path:
    """One row per image: the input as the model sees it with each part's mask (then the first random
    draw), masks shown in the fill colour (the preprocessing mean)."""
    from ..data.images import load_image
    from ..present.render import grid, image_to_rgb, save_png

    tiles = []
    cols = result.parts + ["random"]
    for i, f in enumerate(result.files):
        x = preprocess(load_image(f))
        for p in cols:
            y0, y1, x0, x1 = result.boxes[p][i] if p != "random" else result.boxes["random"][0][i]
            xm = x.clone()
            xm[:, y0:y1, x0:x1] = 0.0
            tiles.append(image_to_rgb(preprocess.unnormalize(xm)))
    return save_png(grid(tiles, len(cols)), path)
