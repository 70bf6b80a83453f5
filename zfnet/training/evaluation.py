"""Table 2 of the paper: top-1 / top-5 validation error of each model and of their ensemble, with 1 crop
(the centre) and with 10 crops (corners + centre, flipped; softmax averaged, Sec. 3).

The ensemble averages the members' softmax outputs, as Zeiler & Fergus's "average of 6 convnets" (Table 2)
and Krizhevsky et al.'s five CNNs (Sec. 6) do; over the 10 crops each member's crops are averaged first. One
pass decodes every image once and runs every member on its 10 crops and its centre crop.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn as nn

from ..core.errors import NoInputError, ZfnetError
from ..core.results import atomic_path, write_json
from ..data.images import Batches, ImageDataset, Preprocess, list_images
from ..data.trainset import split_per_class
from ..models.predict import EnsembleInput, check_same_classes, ensemble_mean, member_probs
from ..models.weights import model_meta

__all__ = ["evaluate_models", "format_table"]


def _class_map(folder_classes: list[str], model: nn.Module, outputs: int) -> list[int]:
    """Folder label -> model output index: by class name when the model names its classes and has every
    folder's name; else the i-th sorted folder is output i (ImageNet's wnid folders), said on stderr."""
    names = model_meta(model).categories
    if names and all(c in names for c in folder_classes):
        index = {n: i for i, n in enumerate(names)}
        return [index[c] for c in folder_classes]
    if len(folder_classes) > outputs:
        raise ZfnetError(f"{len(folder_classes)} class folders but the models predict {outputs} classes")
    print(f"zfnet: the class folders are not the model's class names: folder i (sorted) is taken as output i "
          f"({len(folder_classes)} folders, {outputs} outputs)", file=sys.stderr)
    return list(range(len(folder_classes)))


@torch.no_grad()
def evaluate_models(models, data, *, names: list[str] | None = None, batch_size: int = 16, workers: int = 0,
                    preprocess: list[Preprocess] | None = None, progress: bool = True,
                    train_per_class: int | None = None, split_seed: int = 0,
                    out: str | Path | None = None, config: dict | None = None) -> dict:
    """Table 2: each model's and the ensemble's top-1 / top-5 error (%), 1 crop and 10 crops.

    Args:
        models: one model or several trained on the same classes.
        data: a validation folder with one subfolder per class (matched to the models' class names, else by
            sorted order).
        names: a name per model for the table (default: model 1, model 2, ...).
        train_per_class, split_seed: evaluate only on the images that a training run with these settings held
            out of `data` (zfnet.data.trainset.split_per_class, the Caltech protocol).
        preprocess: one Preprocess per model (default: `Preprocess.for_model`).
        out: folder for table.md and result.json (nothing written when None).
    Returns: {"schema", "config", "images", "rows": [{"model", "members", "top1_1crop", "top5_1crop",
        "top1_10crops", "top5_10crops"}], "skipped": [[file, why]]}; the ensemble row comes last.
    """
    models = [models] if isinstance(models, nn.Module) else list(models)
    if not models:
        raise ZfnetError("no model to evaluate")
    check_same_classes(models)
    names = list(names) if names else [f"model {i + 1}" for i in range(len(models))]
    if len(names) != len(models):
        raise ZfnetError(f"{len(names)} names for {len(models)} models")
    paths, labels, classes = list_images(data)
    if labels is None:
        raise ZfnetError(f"{data} has no class subfolders: the validation set needs one folder per class")
    if train_per_class:
        _, held_out = split_per_class(labels, train_per_class, split_seed)
        paths, labels = [paths[i] for i in held_out], [labels[i] for i in held_out]
    pres = list(preprocess) if preprocess is not None else [Preprocess.for_model(m) for m in models]
    views = EnsembleInput(pres, "ten+center")
    device = next(models[0].parameters()).device
    mapping = None
    rows = len(models) + (len(models) > 1)
    correct = torch.zeros(rows, 2, 2, dtype=torch.float64)  # row, (1 crop, 10 crops), (top-1, top-5)
    n = 0
    batches = Batches(ImageDataset(paths, labels, views), batch_size, workers, progress, desc="evaluate")
    for x, y, _ in batches:
        probs = member_probs(models, x.to(device), views.group)  # each (B, 11, classes)
        if mapping is None:
            mapping = torch.tensor(_class_map(classes, models[0], probs[0].shape[-1]))
        target = mapping[y].to(device)
        ensemble_mean(probs)  # the members' class counts agree
        per_row = [(p[:, 10], p[:, :10].mean(1)) for p in probs]
        if len(models) > 1:
            per_row.append((ensemble_mean([p[:, 10:] for p in probs]), ensemble_mean([p[:, :10] for p in probs])))
        for r, crops in enumerate(per_row):
            for c, pr in enumerate(crops):
                top = pr.topk(min(5, pr.shape[-1]), -1).indices
                correct[r, c, 0] += (top[:, 0] == target).sum().item()
                correct[r, c, 1] += (top == target[:, None]).any(1).sum().item()
        n += len(y)
    if n == 0:
        raise NoInputError(f"none of the {len(paths)} images in {data} could be read", batches.skipped)
    err = 100.0 * (1 - correct / n)
    table = [{"model": name, "members": 1} for name in names]
    if len(models) > 1:
        table.append({"model": f"average of {len(models)}", "members": len(models)})
    for r, row in enumerate(table):
        row.update(top1_1crop=err[r, 0, 0].item(), top5_1crop=err[r, 0, 1].item(),
                   top1_10crops=err[r, 1, 0].item(), top5_10crops=err[r, 1, 1].item())
    result = {"schema": 1, "config": dict(config or {}, data=str(data), batch_size=batch_size,
                                          train_per_class=train_per_class, split_seed=split_seed), "images": n,
              "classes": len(classes), "rows": table, "skipped": [list(s) for s in batches.skipped]}
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        with atomic_path(out / "table.md") as tmp:
            Path(tmp).write_text(format_table(table) + "\n", encoding="utf-8")
        write_json(out / "result.json", result)
    return result


def format_table(rows: list[dict]) -> str:
    """Markdown in Table 2's form: one row per model, the ensemble last; val error % for 1 and 10 crops."""
    lines = ["| error % | val top-1 (1 crop) | val top-5 (1 crop) | val top-1 (10 crops) | val top-5 (10 crops) |",
             "|---|---:|---:|---:|---:|"]
    lines += [f"| {_cell(r['model'])} | {r['top1_1crop']:.1f} | {r['top5_1crop']:.1f} | {r['top1_10crops']:.1f} | "
              f"{r['top5_10crops']:.1f} |" for r in rows]
    return "\n".join(lines)


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|")
