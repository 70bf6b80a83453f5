"""Classify images with any model or an ensemble of models: the top-5 labels (the paper's top-1 / top-5
error, Sec. 3), with the softmax averaged over the 10 crops and over the ensemble's members, as both papers
report their best results ("average of 6 convnets", Zeiler & Fergus Table 2; 5 CNNs, Krizhevsky et al.
Sec. 6)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..core.errors import ZfnetError
from ..data.images import Batches, ImageDataset, Preprocess, list_images, ten_crop
from .weights import model_meta

__all__ = ["Prediction", "PredictResult", "predict", "average_probs", "ten_crop_probs", "EnsembleInput",
           "member_probs", "ensemble_mean", "check_same_classes", "topk_accuracy"]


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


def average_probs(models, x: torch.Tensor) -> torch.Tensor:
    """The softmax averaged over crops, then over models (all members see the same input).

    Args:
        models: one nn.Module or a list of them (an ensemble).
        x: (N, C, H, W) one crop per image, or (N, K, C, H, W) K crops per image (the 10 crops).
    Returns: (N, classes) float32 probabilities.
    """
    models = [models] if isinstance(models, nn.Module) else list(models)
    n = x.shape[0]
    flat = x.flatten(0, 1) if x.dim() == 5 else x
    total = None
    for m in models:
        p = m(flat).float().softmax(-1)
        p = p.view(n, -1, p.shape[-1]).mean(1)
        total = p if total is None else total + p
    return total / len(models)


def ten_crop_probs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(N, 10, C, H, W) -> (N, classes): one model's softmax averaged over the 10 crops (Sec. 3 / Table 2)."""
    return average_probs([model], x)


class EnsembleInput:
    """Decoded image -> the input of every ensemble member, decoded once: (G, ...) for the G distinct
    preprocessings among the members (members trained with their own mean image each get theirs).

    crops: "center" -> (G, C, S, S); "ten" -> (G, 10, C, S, S); "ten+center" -> (G, 11, C, S, S), the 10
    crops then the centre crop (Table 2's 1-crop and 10-crop columns from one pass).
    `group[j]` is member j's index into G.
    """

    def __init__(self, preprocesses: list[Preprocess], crops: str = "center"):
        if crops not in ("center", "ten", "ten+center"):
            raise ZfnetError(f"unknown crops {crops!r}; use center, ten or ten+center")
        self.crops, self.views, self.group = crops, [], []
        for p in preprocesses:
            same = [i for i, q in enumerate(self.views) if _same_preprocessing(p, q)]
            if not same:
                self.views.append(p)
            self.group.append(same[0] if same else len(self.views) - 1)
        sizes = sorted({p.size for p in self.views})
        if len(sizes) > 1:
            raise ZfnetError(f"the ensemble's members take different input sizes ({', '.join(map(str, sizes))} px); "
                             f"average models that see the same crops")

    def __call__(self, im) -> torch.Tensor:
        out = []
        for p in self.views:
            x = p.base(im)
            if self.crops == "center":
                v = p.center(x)
            elif self.crops == "ten":
                v = ten_crop(x, p.size)
            else:
                v = torch.cat([ten_crop(x, p.size), p.center(x)[None]])
            out.append(v.contiguous())
        return torch.stack(out)


def _same_preprocessing(p: Preprocess, q: Preprocess) -> bool:
    if (p.preset, p.size, p.resize) != (q.preset, q.size, q.resize):
        return False
    if p.preset != "paper":
        return True
    a, b = p.mean_image, q.mean_image
    return (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))


def member_probs(models: list[nn.Module], x: torch.Tensor, group: list[int]) -> list[torch.Tensor]:
    """Per member j: its softmax on its own view x[:, group[j]], crops kept: (N, K, classes) (K = 1 for
    one crop). x is a batch of EnsembleInput items."""
    out = []
    for m, g in zip(models, group):
        v = x[:, g]
        n = v.shape[0]
        p = m(v.flatten(0, 1) if v.dim() == 5 else v).float().softmax(-1)
        out.append(p.view(n, -1, p.shape[-1]))
    return out


def _as_list(models) -> list[nn.Module]:
    models = [models] if isinstance(models, nn.Module) else list(models)
    if not models:
        raise ZfnetError("no model to predict with")
    return models


@torch.no_grad()
def predict(models, inputs, *, k: int = 5, batch_size: int = 32, crop: str = "center", workers: int = 0,
            progress: bool = True, preprocess: list[Preprocess] | None = None) -> PredictResult:
    """Top-k classes for every image in `inputs` (files and/or folders, searched as `list_images`).

    Args:
        models: one model, or several (an ensemble: their softmax outputs are averaged, each model seeing the
            image as its own weights record preprocesses it). Class names come from the first.
        crop: "center" or "ten" (10-crop softmax average, as the paper evaluates).
        preprocess: one Preprocess per model (default: each model's `Preprocess.for_model`).
    Returns: predictions in input order; unreadable files are listed in `skipped`, not raised.
    """
    models = _as_list(models)
    if crop not in ("center", "ten"):
        raise ZfnetError(f"unknown crop {crop!r}; use center or ten")
    paths = []
    for item in [inputs] if isinstance(inputs, (str, bytes)) or hasattr(inputs, "__fspath__") else inputs:
        paths += list_images(item)[0]
    pres = list(preprocess) if preprocess is not None else [Preprocess.for_model(m) for m in models]
    if len(pres) != len(models):
        raise ZfnetError(f"{len(pres)} preprocessings for {len(models)} models")
    views = EnsembleInput(pres, crop)
    names = model_meta(models[0]).categories
    check_same_classes(models)
    device = next(models[0].parameters()).device
    batches = Batches(ImageDataset(paths, transform=views), batch_size, workers, progress, desc="predict")
    out = []
    for x, _, idx in batches:
        probs = ensemble_mean(member_probs(models, x.to(device), views.group))
        p, i = probs.topk(min(k, probs.shape[-1]), dim=-1)
        for row, (pp, ii) in enumerate(zip(p.tolist(), i.tolist())):
            out.append(Prediction(str(paths[int(idx[row])]), [
                {"index": c, "label": names[c] if names and c < len(names) else str(c), "prob": q}
                for c, q in zip(ii, pp)]))
    return PredictResult(out, batches.skipped)


def check_same_classes(models: list[nn.Module]) -> None:
    """An ensemble's members must name their classes alike (those that name them at all)."""
    names = [model_meta(m).categories for m in models]
    if any(n is not None and names[0] is not None and tuple(n) != tuple(names[0]) for n in names):
        raise ZfnetError("the ensemble's members name their classes differently; average models trained on "
                         "the same classes")


def ensemble_mean(probs: list[torch.Tensor]) -> torch.Tensor:
    """The members' (N, K, classes) softmax outputs -> (N, classes): the mean over crops, then over members."""
    if len({p.shape[-1] for p in probs}) > 1:
        raise ZfnetError(f"the ensemble's members predict different numbers of classes "
                         f"({', '.join(str(p.shape[-1]) for p in probs)}); average models trained on the same classes")
    return sum(p.mean(1) for p in probs) / len(probs)


def topk_accuracy(predictions: list[Prediction], labels: list[int], k: int = 5) -> tuple[float, float]:
    """(top-1, top-k) accuracy in percent."""
    top1 = sum(p.top5[0]["index"] == y for p, y in zip(predictions, labels))
    topk = sum(y in [t["index"] for t in p.top5[:k]] for p, y in zip(predictions, labels))
    n = max(len(predictions), 1)
    return 100.0 * top1 / n, 100.0 * topk / n
