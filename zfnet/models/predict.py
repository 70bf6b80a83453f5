"""Classify images with any model: the top-5 labels (the paper's top-1/top-5 error, Sec. 3)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..data.images import Batches, ImageDataset, Preprocess, list_images
from .weights import model_meta

__all__ = ["Prediction", "PredictResult", "predict", "ten_crop_probs", "topk_accuracy"]


@dataclass
class Prediction:
    file: str
    top5: list[dict]  # [{"index": i, "label": name, "prob": p}], best first

    def to_json(self) -> dict:
        return {"file": self.file, "top5": self.top5}


@dataclass
class PredictResult:
    predictions: list[Prediction]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, why)

    def to_json(self) -> list[dict]:
        return [p.to_json() for p in self.predictions]


def ten_crop_probs(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(N, 10, C, H, W) -> (N, classes): the softmax averaged over the 10 crops (Sec. 3 / Table 2)."""
    n, k = x.shape[:2]
    return model(x.flatten(0, 1)).float().softmax(-1).view(n, k, -1).mean(1)


@torch.no_grad()
def predict(model: torch.nn.Module, inputs, *, k: int = 5, batch_size: int = 32, crop: str = "center",
            workers: int = 0, progress: bool = True) -> PredictResult:
    """Top-k classes for every image in `inputs` (files and/or folders, searched as `list_images`).

    Args:
        crop: "center" or "ten" (10-crop softmax average, as the paper evaluates).
    Returns: predictions in input order; unreadable files are listed in `skipped`, not raised.
    """
    paths = []
    for item in [inputs] if isinstance(inputs, (str, bytes)) or hasattr(inputs, "__fspath__") else inputs:
        paths += list_images(item)[0]
    dataset = ImageDataset(paths, transform=Preprocess.for_model(model, crop=crop))
    names = model_meta(model).categories
    device = next(model.parameters()).device
    batches = Batches(dataset, batch_size, workers, progress, desc="predict")
    out = []
    for x, _, idx in batches:
        x = x.to(device)
        probs = ten_crop_probs(model, x) if crop == "ten" else model(x).softmax(-1)
        p, i = probs.topk(min(k, probs.shape[-1]), dim=-1)
        for row, (pp, ii) in enumerate(zip(p.tolist(), i.tolist())):
            out.append(Prediction(str(paths[int(idx[row])]), [
                {"index": c, "label": names[c] if names and c < len(names) else str(c), "prob": q}
                for c, q in zip(ii, pp)]))
    return PredictResult(out, batches.skipped)


def topk_accuracy(predictions: list[Prediction], labels: list[int], k: int = 5) -> tuple[float, float]:
    """(top-1, top-k) accuracy in percent."""
    top1 = sum(p.top5[0]["index"] == y for p, y in zip(predictions, labels))
    topk = sum(y in [t["index"] for t in p.top5[:k]] for p, y in zip(predictions, labels))
    n = max(len(predictions), 1)
    return 100.0 * top1 / n, 100.0 * topk / n
