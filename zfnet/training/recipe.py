"""The paper's training recipe (Sec. 3), resumable and torchrun-ready.

`TrainConfig` holds the paper's defaults; `main(cfg)` trains, writing an atomic checkpoint every epoch
(resumed automatically: a run killed at any moment and restarted ends with the same weights) and a
model-only snapshot per epoch for the feature-evolution figure (Fig. 4). Under `torchrun` it runs
DistributedDataParallel (gloo on CPU, NCCL on GPU), detected from RANK / WORLD_SIZE / LOCAL_RANK, as
torchvision's references/classification/train.py does.

Determinism: everything random is drawn from generators seeded by (seed, epoch[, image index]), not from
a stream carried across epochs, so resuming at an epoch boundary reproduces the uninterrupted run
exactly on CPU, and the global batches do not depend on the number of processes.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from ..core.distributed import Dist, init_distributed
from ..core.errors import ZfnetError
from ..core.progress import progress_bar
from ..core.results import write_json
from ..data.images import collate, list_images
from ..data.trainset import GlobalBatches, TrainImages, mean_image, split_per_class
from ..models.predict import ten_crop_probs
from . import checkpoints as ckpt
from .networks import build_model, clip_filters

__all__ = ["TrainConfig", "MetricLogger", "train_one_epoch", "evaluate", "main"]


@dataclass
class TrainConfig:
    """One training run. Defaults are the paper's (section numbers of Zeiler & Fergus 2013)."""

    # what to train
    model: str = "zfnet"  # Sec. 3 / Fig. 3: "zfnet", "alexnet" (11x11/4 baseline), or a Table 3 variant name
    widths: tuple | None = None  # conv1..conv5 maps; None = the paper's 96-256-384-384-256 (Fig. 3)
    fc: int | None = None  # fc6/fc7 units; None = 4096 (Fig. 3)
    dropout: float = 0.5  # Sec. 3: dropout 0.5 on fc6 and fc7
    init_std: float = 1e-2  # Sec. 3: weights N(0, 1e-2), biases 0. 0 = He normal (std sqrt(2 / fan_in)):
    #                         at reduced width N(0, 1e-2) shrinks the signal ~1e5-fold over 8 layers
    # data
    data: str = ""  # image folder: class subfolders, or train/ + val/ inside (ImageNet layout)
    val_data: str | None = None  # validation folder (default: data/val, or the rest of a per-class split)
    train_per_class: int | None = None  # take this many images per class for training, the rest for validation
    split_seed: int = 0  # which images the per-class split takes
    resize: int = 256  # Sec. 3: shorter side to 256, central 256x256
    crop: int = 224  # Sec. 3: 224x224 sub-crops
    flip: bool = True  # Sec. 3: horizontal flips of the crops
    val_crops: str = "ten"  # Sec. 3/5: 10-crop (corners + centre, flipped) softmax average; or "center"
    epoch_val_crops: str | None = None  # crops of the per-epoch (plateau) evaluations; None = val_crops.
    #                                     "center" is 10x cheaper; the last epoch always uses val_crops
    cache: bool = False  # keep the decoded 256x256 images in memory (small data sets: decode once)
    workers: int = 0  # DataLoader worker processes
    # optimization
    epochs: int = 70  # Sec. 3: stopped after 70 epochs
    batch_size: int = 128  # Sec. 3: mini-batches of 128 (global: split across torchrun processes)
    lr: float = 1e-2  # Sec. 3: learning rate 1e-2
    momentum: float = 0.9  # Sec. 3: momentum 0.9
    weight_decay: float = 0.0  # not in ZF's text; AlexNet (Krizhevsky 2012) used 5e-4
    lr_factor: float = 0.1  # Sec. 3: learning rate annealed "manually" when validation error plateaus ...
    lr_patience: int = 3  # ... here: x lr_factor after this many epochs without a new best top-1 error
    clip_radius: float = 0.1  # Sec. 3 feature scale clipping: conv filters with RMS > radius renormalized
    #                           to it after every step; 0 = off (the Fig. 6 / Table 3 ablation)
    # machinery
    out: str = "runs/zfnet"  # run folder: checkpoint.pth, epoch_NNN.pth, metrics.json
    snapshots: bool = True  # keep a model-only epoch_NNN.pth every epoch (Fig. 4 reads them)
    seed: int = 0
    device: str | None = None  # default: cuda if available (LOCAL_RANK picks the GPU under torchrun)
    amp: bool = True  # CUDA only: float16 autocast + gradient scaling
    channels_last: bool = True  # CUDA only: NHWC memory layout (faster convolutions on tensor cores)
    threads: int | None = None  # torch CPU threads per process (default: torch's choice)
    progress: bool = True
    budget_minutes: float = 0.0  # stop after the epoch expected to cross this wall time (0 = no limit);
    #                              a later call resumes. For CPU-scale runs on shared machines.

    def __post_init__(self):
        if self.widths is not None:
            self.widths = tuple(int(w) for w in self.widths)

    def arch(self, num_classes: int) -> dict:
        """What `build_model` needs to rebuild this network (stored in every checkpoint)."""
        return {"model": self.model, "widths": list(self.widths) if self.widths else None, "fc": self.fc,
                "dropout": self.dropout, "num_classes": num_classes, "crop": self.crop, "resize": self.resize,
                "init_std": self.init_std}


# Fields that may change between a run and its resumption without changing what is computed.
_RESUMABLE = {"epochs", "out", "workers", "device", "progress", "threads", "data", "val_data", "budget_minutes"}


# ----------------------------------------------------------------------------------------------------
class MetricLogger:
    """Running averages of a few meters, shown on a tqdm bar (torchvision's MetricLogger, smaller)."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def update(self, n: int = 1, **values):
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v) * n
            self.counts[k] = self.counts.get(k, 0) + n

    def avg(self, k: str) -> float:
        return self.sums[k] / max(self.counts[k], 1)

    def __str__(self):
        return " ".join(f"{k}={self.avg(k):.4g}" for k in self.sums)


def train_one_epoch(model, criterion, optimizer, loader, device, epoch: int, cfg: TrainConfig,
                    scaler=None, progress: bool = True) -> dict:
    """One pass over the training set; feature scale clipping after every step (Sec. 3)."""
    model.train()
    log = MetricLogger()
    clipped = 0
    bar = progress_bar(total=len(loader), desc=f"epoch {epoch}", enabled=progress)
    amp = scaler is not None
    for x, y, _, _errors in loader:
        if x is None:  # a batch of only unreadable files
            continue
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if cfg.channels_last and device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            out = model(x)
            loss = criterion(out, y)
        optimizer.zero_grad(set_to_none=True)
        if amp:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        if cfg.clip_radius > 0:
            clipped += clip_filters(model, cfg.clip_radius)
        acc1 = (out.argmax(1) == y).float().mean()
        log.update(len(y), loss=loss.item(), acc1=acc1.item())
        bar.update(1)
        bar.set_postfix_str(str(log))
    bar.close()
    return {"train_loss": log.avg("loss") if log.counts else math.nan,
            "train_top1_err": 100.0 * (1 - log.avg("acc1")) if log.counts else math.nan,
            "clipped_filters": clipped}


@torch.no_grad()
def evaluate(model, loader, device, d: Dist = Dist(), progress: bool = True, desc: str = "val",
             skipped: list | None = None) -> dict:
    """Top-1 / top-5 error (%) over this process's share, summed over all processes.

    Unreadable images are left out of the errors; their messages are appended to `skipped`."""
    model.eval()
    counts = torch.zeros(4, dtype=torch.float64)  # n, top1 correct, top5 correct, loss sum
    bar = progress_bar(total=len(loader), desc=desc, enabled=progress)
    for x, y, _, errors in loader:
        if skipped is not None:
            skipped += [msg for _, msg in errors]
        if x is not None:
            x, y = x.to(device), y.to(device)
            with torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
                probs = ten_crop_probs(model, x) if x.dim() == 5 else model(x).float().softmax(-1)
            top = probs.topk(min(5, probs.shape[1]), 1).indices
            counts += torch.tensor([len(y), (top[:, 0] == y).sum().item(), (top == y[:, None]).any(1).sum().item(),
                                    F.nll_loss(probs.clamp_min(1e-12).log(), y, reduction="sum").item()],
                                   dtype=torch.float64)
        bar.update(1)
    bar.close()
    counts = d.all_sum(counts)
    n = max(counts[0].item(), 1)
    return {"val_top1_err": 100.0 * (1 - counts[1].item() / n), "val_top5_err": 100.0 * (1 - counts[2].item() / n),
            "val_loss": counts[3].item() / n, "val_images": int(counts[0].item())}


# ----------------------------------------------------------------------------------------------------
def _datasets(cfg: TrainConfig):
    """(train paths, train labels, val paths, val labels, class names)."""
    if not cfg.data:
        raise ZfnetError("no training data: pass --data DIR (class subfolders, or train/ and val/ inside)")
    root = Path(cfg.data)
    if cfg.val_data is None and cfg.train_per_class is None and (root / "train").is_dir():
        root, val_root = root / "train", root / "val"
    else:
        val_root = Path(cfg.val_data) if cfg.val_data else None
    paths, labels, classes = list_images(root)
    if labels is None:
        raise ZfnetError(f"{root} has no class subfolders; training needs one folder per class")
    if cfg.train_per_class:
        tr, te = split_per_class(labels, cfg.train_per_class, cfg.split_seed)
        vp, vl = [paths[i] for i in te], [labels[i] for i in te]
        paths, labels = [paths[i] for i in tr], [labels[i] for i in tr]
    elif val_root is not None:
        vp, vl, vclasses = list_images(val_root)
        if vclasses != classes:
            raise ZfnetError(f"validation folder {val_root} does not have the same class folders as {root}")
    else:
        vp, vl = [], []
    return paths, labels, vp, vl, classes


def _epoch_seed(cfg, epoch: int, rank: int) -> int:
    return (cfg.seed * 1009 + epoch) * 101 + rank


def main(cfg: TrainConfig) -> dict:
    """Train (or resume) the run in `cfg.out`. Returns the last epoch's metrics (rank 0: all epochs)."""
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _run(cfg)
    finally:  # a library call leaves the caller's thread count as it was
        torch.set_num_threads(threads)


def _run(cfg: TrainConfig) -> dict:
    d, device = init_distributed(cfg.device)
    amp = cfg.amp and device.type == "cuda"
    out = Path(cfg.out)
    resume = ckpt.latest(out)
    state = ckpt.load_checkpoint(resume) if resume else None
    if d.world > 1:  # every process must resume from the same epoch (rank 0 alone writes the checkpoints)
        e = int(state["epoch"]) if state else 0
        done = torch.tensor([e, -e], device=device)  # NCCL reduces only CUDA tensors
        dist.all_reduce(done, op=dist.ReduceOp.MAX)
        done = done.cpu()
        if done[0] != -done[1]:
            raise ZfnetError(f"processes disagree about {out / ckpt.LATEST} (epochs {-int(done[1])}..{int(done[0])}): "
                             f"--out must be a folder that every node can read")
    if state is not None:
        old = state["config"]
        diff = [k for k, v in dataclasses.asdict(cfg).items()
                if k not in _RESUMABLE and _plain(v) != _plain(old.get(k))]
        if diff:
            raise ZfnetError(f"{out} holds a run with different settings ({', '.join(diff)}); resume with the "
                             f"same settings or choose another --out")
    paths, labels, vpaths, vlabels, classes = _datasets(cfg)
    if len(paths) < cfg.batch_size:
        raise ZfnetError(f"{len(paths)} training images is fewer than one batch ({cfg.batch_size}); lower "
                         f"--batch-size")
    train_ds = TrainImages(paths, labels, cfg.resize, cfg.crop, "random", cfg.flip, cache=cfg.cache, seed=cfg.seed)
    if state is not None:
        train_ds.mean_image, bad = state["mean_image"], list(state.get("skipped_train", []))
        if train_ds.cache is not None:  # warm the cache (decode once) before timing epochs
            mean_image(train_ds, Dist(), cfg.batch_size, cfg.workers, cfg.progress and d.main)
            train_ds.mean_image = state["mean_image"]
    else:
        mean, bad = mean_image(train_ds, d, cfg.batch_size, cfg.workers, cfg.progress and d.main)
        train_ds.mean_image = mean
    if bad:  # unreadable training files: dropped before batching so every process takes the same steps
        dropped = set(bad)
        keep = [i for i in range(len(train_ds)) if i not in dropped]
        train_ds.paths = [train_ds.paths[i] for i in keep]
        train_ds.labels = [train_ds.labels[i] for i in keep]
        if train_ds.cache is not None:
            train_ds.cache = {j: train_ds.cache[i] for j, i in enumerate(keep) if i in train_ds.cache}
    val_ds = TrainImages(vpaths, vlabels, cfg.resize, cfg.crop, "center", mean_image=train_ds.mean_image,
                         cache=cfg.cache)

    torch.manual_seed(cfg.seed)
    arch = cfg.arch(len(classes))
    model = build_model(arch).to(device)
    if cfg.channels_last and device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, "min", factor=cfg.lr_factor,
                                                           patience=cfg.lr_patience)
    scaler = torch.amp.GradScaler("cuda") if amp else None
    start, history = 1, []
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start, history = int(state["epoch"]) + 1, list(state["metrics"])
        if d.main:
            print(f"zfnet: resuming {out} after epoch {start - 1}", file=sys.stderr)
    net = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None) \
        if d.world > 1 else model
    criterion = nn.CrossEntropyLoss()
    sampler = GlobalBatches(len(train_ds), cfg.batch_size, d.rank, d.world, cfg.seed)
    loader = torch.utils.data.DataLoader(train_ds, batch_sampler=sampler, num_workers=cfg.workers,
                                         collate_fn=collate, pin_memory=device.type == "cuda",
                                         persistent_workers=False)
    val_idx = list(range(d.rank, len(val_ds), d.world))

    def val_loader(crops: str):
        val_ds.mode = "ten" if crops == "ten" else "center"
        return torch.utils.data.DataLoader(torch.utils.data.Subset(val_ds, val_idx), collate_fn=collate,
                                           batch_size=max(1, cfg.batch_size // (10 if crops == "ten" else 1)),
                                           num_workers=cfg.workers)

    show = cfg.progress and d.main
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
    began, recent = time.time(), 0.0
    for epoch in range(start, cfg.epochs + 1):
        t0 = time.time()
        # the budget decision must be the same on every process: rank 0's clock decides
        # this epoch is the last if the next one (as long as the previous) would end past the budget
        flag = torch.tensor([float(cfg.budget_minutes > 0 and t0 - began + 2 * recent > 60 * cfg.budget_minutes)])
        if d.world > 1:
            flag = flag.to(device)
            dist.broadcast(flag, 0)
        last = epoch == cfg.epochs or bool(flag.item())
        torch.manual_seed(_epoch_seed(cfg, epoch, d.rank))  # dropout masks: a function of (seed, epoch, rank)
        sampler.epoch = train_ds.epoch = epoch
        metrics = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"]}
        metrics.update(train_one_epoch(net, criterion, optimizer, loader, device, epoch, cfg, scaler, show))
        if len(val_ds):
            crops = cfg.val_crops if last else (cfg.epoch_val_crops or cfg.val_crops)
            bad_val: list[str] = []
            metrics.update(evaluate(model, val_loader(crops), device, d, show, skipped=bad_val), val_crops=crops)
            if epoch == start:  # the same files every epoch: say it once
                for msg in bad_val:
                    print(f"zfnet: skipping {msg}", file=sys.stderr)
            scheduler.step(metrics["val_top1_err"])
        metrics["seconds"] = round(time.time() - t0, 2)
        recent = metrics["seconds"]
        history.append(metrics)
        if d.main:
            _save(out, cfg, arch, classes, model, optimizer, scheduler, scaler, epoch, history, train_ds, bad)
            print("zfnet: " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                       for k, v in metrics.items()), file=sys.stderr)
        if d.world > 1:
            dist.barrier()  # no process starts the next epoch (or exits) before the checkpoint is on disk
        if last:
            break
    if d.main and history:
        write_json(out / "metrics.json", {"schema": 1, "config": dataclasses.asdict(cfg), "arch": arch,
                                          "epochs": history})
    if d.world > 1 and dist.is_initialized():
        dist.destroy_process_group()
    return {"epochs": history, "out": str(out)}


def _plain(v):
    return list(v) if isinstance(v, tuple) else v


def _save(out, cfg, arch, classes, model, optimizer, scheduler, scaler, epoch, history, train_ds, bad):
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    common = {"model": sd, "mean_image": train_ds.mean_image.cpu(), "categories": list(classes),
              "arch": arch, "epoch": epoch, "metrics": history[-1:]}
    if cfg.snapshots:
        ckpt.save_checkpoint(common, out / ckpt.SNAPSHOT.format(epoch))
    full = dict(common, config={k: _plain(v) for k, v in dataclasses.asdict(cfg).items()},
                optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                scaler=scaler.state_dict() if scaler is not None else {}, metrics=history,
                skipped_train=list(bad))
    ckpt.save_checkpoint(full, out / ckpt.LATEST)
