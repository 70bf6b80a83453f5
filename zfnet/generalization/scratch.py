"""The from-scratch baseline of Sec. 5.2 / Table 4: the same architecture trained only on the N images per
class of the target dataset, with no ImageNet pretraining.

A deliberately compact loop (the full training recipe is zfnet.training.recipe): images are decoded once at a small
size and kept in memory as uint8, then trained with random crops and flips. At CPU scale a reduced input
size (64-96 px) keeps this to minutes; the accuracy is then a lower bound on the paper's full-size figure.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..core.errors import ZfnetError
from ..core.progress import progress_bar
from ..data.images import load_image
from .protocol import mean_class_accuracy

__all__ = ["decode_all", "decode_small", "reinit", "scratch_baseline", "train_from_scratch"]


def decode_small(paths: Sequence, size: int, progress: bool = True) -> tuple[torch.Tensor, list]:
    """Every image resized (shorter side) and centre-cropped to size x size: (N, 3, size, size) uint8.

    Returns (images, skipped [(path, why)]); unreadable files stay as zeros.
    """
    from PIL import Image

    out = torch.zeros(len(paths), 3, size, size, dtype=torch.uint8)
    skipped = []
    for i, p in enumerate(progress_bar(paths, desc="decode", enabled=progress)):
        try:
            im = load_image(p)
        except ZfnetError as e:
            skipped.append((str(p), str(e)))
            continue
        w, h = im.size
        s = size / min(w, h)
        im = im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BILINEAR)
        w, h = im.size
        left, top = (w - size) // 2, (h - size) // 2
        im = im.crop((left, top, left + size, top + size))
        out[i] = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1)
    return out, skipped


def decode_all(paths: Sequence, size: int, progress: bool = True) -> torch.Tensor:
    """`decode_small` for files whose features were extracted, so they decoded once: one that no longer
    does has changed since, and the baseline must not train on its zeros."""
    images, skipped = decode_small(paths, size, progress)
    if skipped:
        raise ZfnetError(f"cannot decode {skipped[0][0]} for the from-scratch baseline: {skipped[0][1]}")
    return images


def reinit(model: torch.nn.Module) -> torch.nn.Module:
    """He-initialize every conv / linear layer (zero biases) and start the class layer small.

    Without batch norm, PyTorch's default init leaves deep ReLU stacks such as SqueezeNet with vanishing
    activations: the class scores start (and stay) at zero and training never leaves chance. This is
    torchvision's recipe for SqueezeNet, applied to any model.
    """
    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    for m in layers:
        torch.nn.init.kaiming_uniform_(m.weight, nonlinearity="relu")
        if m.bias is not None:
            torch.nn.init.zeros_(m.bias)
    if layers:
        torch.nn.init.normal_(layers[-1].weight, 0.0, 0.01)
    return model


def train_from_scratch(model: torch.nn.Module, images: torch.Tensor, labels: Sequence[int], train: np.ndarray,
                       test: np.ndarray, *, crop: int | None = None, epochs: int = 30, batch_size: int = 64,
                       lr: float = 2e-3, weight_decay: float = 5e-4, seed: int = 0, progress: bool = True) -> float:
    """Train `model` (random init, output size = number of classes) on images[train]; return the mean
    per-class accuracy (%) on images[test] (centre crop).

    Args:
        images: (N, 3, S, S) uint8 from `decode_small`; training takes random crop x crop patches (default
            7/8 of S) with horizontal flips, the test the centre patch.
    """

    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    S = images.shape[-1]
    crop = crop or (S * 7) // 8
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    x_tr = images[torch.as_tensor(train)].float().div_(255)
    mean = x_tr.mean((0, 2, 3), keepdim=True)
    std = x_tr.std((0, 2, 3), keepdim=True).clamp_min(1e-3)
    x_tr = (x_tr - mean) / std
    y_tr = y[torch.as_tensor(train)]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * math.ceil(len(train) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    model.train()
    with progress_bar(total=steps, desc="scratch", enabled=progress) as bar:
        for _ in range(epochs):
            order = torch.randperm(len(train), generator=g)
            for b in range(0, len(train), batch_size):
                idx = order[b:b + batch_size]
                t, left = torch.randint(0, S - crop + 1, (2,), generator=g).tolist()
                xb = x_tr[idx, :, t:t + crop, left:left + crop]
                if torch.rand(1, generator=g).item() < 0.5:
                    xb = xb.flip(-1)
                loss = F.cross_entropy(model(xb.to(device)), y_tr[idx].to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                bar.update()
                bar.set_postfix(loss=f"{loss.item():.2f}")
    model.eval()
    off = (S - crop) // 2
    preds = []
    with torch.no_grad():
        for b in range(0, len(test), 256):
            idx = torch.as_tensor(test[b:b + 256])
            xb = (images[idx, :, off:off + crop, off:off + crop].float().div(255) - mean) / std
            preds.append(model(xb.to(device)).argmax(1).cpu())
    return mean_class_accuracy(y[torch.as_tensor(test)].numpy(), torch.cat(preds).numpy())


def scratch_baseline(spec, paths: Sequence, labels: Sequence[int], splits: list, *, size: int = 64,
                     epochs: int = 30, batch_size: int = 64, lr: float = 2e-3, seed: int = 0,
                     device: str = "cpu", images: torch.Tensor | None = None, progress: bool = True) -> dict:
    """The from-scratch row of Table 7: for every (train, test) fold, a fresh randomly initialized
    `spec` model (registry name or factory, as `load_model`) trained on the train images only.

    Returns {"mean", "std", "folds", "config"} (mean per-class accuracy, %).
    """
    from ..models.weights import load_model

    labels = np.asarray(labels)
    n_classes = int(labels.max()) + 1
    if images is None:  # callers running several baselines on the same files pass them decoded once
        images = decode_all(paths, size, progress)
    accs = []
    for f, (train, test) in enumerate(splits):
        torch.manual_seed(seed + f)
        model = reinit(load_model(spec, None, num_classes=n_classes, device=device))
        accs.append(train_from_scratch(model, images, labels, train, test, epochs=epochs, batch_size=batch_size,
                                       lr=lr, seed=seed + f, progress=progress))
    config = {"model": spec if isinstance(spec, str) else type(spec).__name__, "size": size,
              "crop": (size * 7) // 8, "epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed,
              "optimizer": "AdamW + one-cycle", "pretrained": False}
    return {"mean": float(np.mean(accs)), "std": float(np.std(accs)), "folds": [float(a) for a in accs],
            "config": config}
