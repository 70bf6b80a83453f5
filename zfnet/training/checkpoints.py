"""Training checkpoints: written atomically every epoch, read back with `torch.load(weights_only=True)`.

A checkpoint is a dict of tensors and plain types only, so it loads without unpickling code:
  {"model": state_dict, "mean_image": (3, R, R), "categories": [...], "config": TrainConfig as dict,
   "arch": {...}, "epoch": e, "optimizer": ..., "scheduler": ..., "scaler": ..., "metrics": [...],
   "skipped_train": [...]}
(no RNG state: every epoch seeds its own generators from (seed, epoch, rank))
`zfnet.models.weights.load_model(spec, path)` reads the "model" / "mean_image" / "categories" keys of the same
file; `model_from_checkpoint` also rebuilds a reduced-size model from its "arch" record.
"""

from __future__ import annotations

import os
import re
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn as nn

from ..core.errors import ZfnetError
from ..core.results import atomic_path, load_tensors
from ..data.images import Preprocess
from ..models.weights import Weights, check_finite, model_meta
from .networks import build_model

__all__ = ["save_checkpoint", "load_checkpoint", "latest", "epoch_snapshots", "model_from_checkpoint",
           "preprocess_for", "LATEST", "SNAPSHOT"]

LATEST = "checkpoint.pth"  # the full training state of the last finished epoch (for resuming)
SNAPSHOT = "epoch_{:03d}.pth"  # model-only snapshot of one epoch (for Fig. 4 feature evolution)


def save_checkpoint(obj: dict, path: str | os.PathLike) -> Path:
    """torch.save to a temporary file, then os.replace: a SIGKILL never leaves a torn checkpoint."""
    with atomic_path(path, suffix=".pth") as tmp:
        torch.save(obj, tmp)
    return Path(path)


def load_checkpoint(path: str | os.PathLike) -> dict:
    obj = load_tensors(path, "checkpoint")
    if not isinstance(obj, dict) or not isinstance(obj.get("model"), dict):
        raise ZfnetError(f"{path} is not a zfnet training checkpoint (no 'model' state_dict)")
    return obj


def latest(run_dir: str | os.PathLike) -> Path | None:
    p = Path(run_dir) / LATEST
    return p if p.is_file() else None


def epoch_snapshots(run_dir: str | os.PathLike) -> dict[int, Path]:
    """{epoch: path} of the per-epoch model snapshots in a run folder."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ZfnetError(f"run folder not found: {run_dir}")
    out = {}
    for p in run_dir.glob("epoch_*.pth"):
        m = re.fullmatch(r"epoch_(\d+)\.pth", p.name)
        if m:
            out[int(m.group(1))] = p
    return dict(sorted(out.items()))


def model_from_checkpoint(path_or_obj, device: str | torch.device = "cpu", allow_nonfinite: bool = False) -> nn.Module:
    """Rebuild the trained model (any reduced input size / width) with its weights record, in eval mode
    (weights holding NaN or Infinity refused unless `allow_nonfinite`, as in load_model)."""
    ck = load_checkpoint(path_or_obj) if not isinstance(path_or_obj, dict) else path_or_obj
    arch = ck.get("arch")
    if not isinstance(arch, dict):
        raise ZfnetError(f"{path_or_obj} has no 'arch' record; load it with load_model(spec, path) instead")
    check_finite(ck["model"], str(path_or_obj) if not isinstance(path_or_obj, dict) else "checkpoint",
                 allow=allow_nonfinite)
    model = build_model(arch)
    model.load_state_dict(ck["model"])
    cats = ck.get("categories")
    model.zfnet_weights = replace(Weights(), preprocessing="paper", mean_image=ck.get("mean_image"),
                                  categories=tuple(cats) if cats else None)
    model.zfnet_arch = dict(arch)
    return model.to(device).eval()


def preprocess_for(model: nn.Module, crop: str = "center"):
    """The zfnet.data.Preprocess matching a model trained here (its crop / resize / mean image)."""
    arch = getattr(model, "zfnet_arch", {}) or {}
    meta = model_meta(model)
    if not arch:
        return Preprocess.for_model(model, crop=crop)
    return Preprocess(preset="paper", crop=crop, size=int(arch["crop"]), resize=int(arch["resize"]),
                      mean_image=meta.mean_image)
