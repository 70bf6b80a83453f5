"""Feature evolution during training (Sec. 4.2, Fig. 4).

For checkpoints of chosen epochs and a subset of units per layer: the strongest activation of each unit
over a data set, projected to pixels with the deconvnet and cut to the unit's receptive field. The
figure has one row per unit and one column per epoch, so one sees lower layers settle within a few
epochs and upper layers only after many.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..core.errors import ZfnetError, unknown_layer
from ..core.results import save_npz, write_json
from ..inspect.layers import feature_layers, layer_table
from ..present.render import grid, save_png, signed_to_rgb
from .checkpoints import epoch_snapshots, model_from_checkpoint

__all__ = ["Evolution", "evolution", "pick_epochs"]


def pick_epochs(available: list[int], n: int = 8) -> list[int]:
    """n epochs spread roughly geometrically over a run (the paper shows 1, 2, 5, 10, 20, 30, 40, 64),
    always including the first and the last."""
    if len(available) <= n:
        return list(available)
    last = len(available) - 1
    idx = {0, last}
    for j in range(1, n - 1):
        idx.add(round(last ** (j / (n - 1))))
    idx = sorted(idx)
    while len(idx) < n:  # geometric steps collide at the start: fill the largest gaps
        gaps = [(idx[i + 1] - idx[i], i) for i in range(len(idx) - 1)]
        g, i = max(gaps)
        if g < 2:
            break
        idx.insert(i + 1, idx[i] + g // 2)
    return [available[i] for i in idx]


@dataclass
class Evolution:
    """Per unit and epoch: the strongest activation (value, image, location) and its projection."""

    config: dict
    epochs: list[int]
    units: dict[str, list[int]]  # layer -> channels shown (rows)
    entries: list[dict] = field(default_factory=list)  # {"layer", "channel", "epoch", "value", "image", "y", "x"}
    figures: dict[str, str] = field(default_factory=dict)  # layer -> png file name
    skipped: list = field(default_factory=list)

    def to_json(self) -> dict:
        return {"schema": 1, "config": self.config, "epochs": self.epochs, "units": self.units,
                "figures": self.figures, "entries": self.entries,
                "skipped": [{"file": p, "error": e} for p, e in self.skipped]}


def evolution(run: str | Path, data, out: str | Path | None = None, *, epochs: list[int] | None = None,
              layers: list[str] | None = None, units: int = 6, channels: dict[str, list[int]] | None = None,
              max_images: int | None = None, batch_size: int = 32, device: str = "cpu",
              progress: bool = True) -> Evolution:
    """Fig. 4 from the per-epoch snapshots of a `zfnet train` run.

    Args:
        run: the run folder (epoch_NNN.pth snapshots).
        data: image folder searched for each unit's strongest activation (the same images every epoch).
        epochs: which epochs (default: 8 spread over the run, see pick_epochs).
        layers: rectified conv layers (default: all of the model's).
        units: channels per layer, evenly spaced (unless `channels` names them).
        max_images: use at most this many images of `data` (evenly spaced).
    """
    from ..data.images import ImageDataset
    from ..engine.mine import mine
    from ..engine.project import project
    from .checkpoints import preprocess_for

    snaps = epoch_snapshots(run)
    if not snaps:
        raise ZfnetError(f"no epoch_NNN.pth snapshots in {run} (train with --snapshots yes)")
    epochs = list(epochs) if epochs else pick_epochs(list(snaps))
    missing = [e for e in epochs if e not in snaps]
    if missing:
        raise ZfnetError(f"{run} has no snapshot for epoch(s) {missing}; it has {list(snaps)}")
    first = model_from_checkpoint(snaps[epochs[0]], device)
    pre = preprocess_for(first)
    table = layer_table(first, pre.size)
    layers = list(layers or feature_layers(first, table))
    for name in layers:
        if name not in table:
            raise unknown_layer(name, table.names())
    chosen = {}
    for name in layers:
        c = table[name].channels
        chosen[name] = list(channels[name]) if channels and name in channels else \
            sorted({int(round(v)) for v in np.linspace(0, c - 1, min(units, c))})
    ds = ImageDataset.from_folder(data, pre).spread(max_images)
    result = Evolution(config={"run": str(run), "data": str(data), "epochs": epochs, "layers": layers,
                               "units": units, "max_images": max_images},
                       epochs=epochs, units=chosen)
    tiles: dict[str, dict[tuple[int, int], torch.Tensor]] = {n: {} for n in layers}
    for e in epochs:
        model = first if e == epochs[0] else model_from_checkpoint(snaps[e], device)
        # one preprocessing for all epochs: a run computes its mean image once, before epoch 1
        res = mine(model, ds, layers, k=1, batch_size=batch_size, preprocess=pre, progress=progress)
        result.skipped = list(res.skipped)
        todo = []
        for name in layers:
            for c in chosen[name]:
                top = res.top(name, c)
                entry = {"layer": name, "channel": c, "epoch": e, "value": top[0]["value"] if top else None,
                         "image": res.relpath(top[0]["index"]) if top else None,
                         "y": top[0]["y"] if top else None, "x": top[0]["x"] if top else None}
                result.entries.append(entry)
                if top and top[0]["value"] > 0:
                    todo.append((name, c, top[0]))
        if todo:
            imgs = torch.stack([ds[t["index"]][0] for _, _, t in todo]).to(device)
            proj = project(model, imgs, [f"{n}:{c}@{t['y']},{t['x']}" for n, c, t in todo], "deconv",
                           pairs=True).cpu()
            for (n, c, t), p in zip(todo, proj):
                y0, y1, x0, x1 = table[n].window(t["y"], t["x"])
                tiles[n][(c, e)] = p[:, y0:y1, x0:x1]
    if out is not None:
        out = Path(out)
        arrays = {}
        for name in layers:
            side = max([t.shape[-1] for t in tiles[name].values()] or [8])
            scale = max(1, 48 // side)
            blank = np.full((side * scale, side * scale, 3), 128, np.uint8)
            cells = []
            for c in chosen[name]:
                for e in epochs:
                    t = tiles[name].get((c, e))
                    big = None if t is None else np.kron(signed_to_rgb(t), np.ones((scale, scale, 1), np.uint8))
                    cells.append(blank if big is None else big)
                    if t is not None:
                        arrays[f"{name}_{c}_epoch{e}"] = t.numpy()
            fname = f"evolution_{name}.png"
            save_png(grid(cells, ncol=len(epochs)), out / fname)
            result.figures[name] = fname
        save_npz(out / "projections.npz", **arrays)
        write_json(out / "result.json", result.to_json())
    return result
