"""The paper's training recipe (Sec. 3), and AlexNet's (Krizhevsky et al. 2012), resumable and torchrun-ready.

`TrainConfig` (zfnet.training.settings) holds the settings, `TrainConfig.recipe("zfnet" | "alexnet")` either
paper's; `main(cfg)` trains, writing an atomic checkpoint every epoch
(resumed automatically: a run killed at any moment and restarted ends with the same weights) and a
model-only snapshot per epoch for the feature-evolution figure (Fig. 4). Under `torchrun` it runs
DistributedDataParallel (gloo on CPU, NCCL on GPU), detected from RANK / WORLD_SIZE / LOCAL_RANK, as
torchvision's references/classification/train.py does.

Determinism: everything random is drawn from generators seeded by (seed, epoch[, image index]), not from
a stream carried across epochs, so resuming at an epoch boundary reproduces the uninterrupted run
exactly on CPU, and the global batches do not depend on the number of processes. The training-set
statistics (mean image, RGB covariance for PCA lighting) are computed once, sharded over the processes,
and cached in the run folder (`train_stats.pth`) and in every checkpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from ..core.distributed import Dist, init_distributed
from ..core.errors import ZfnetError
from ..core.progress import progress_bar
from ..core.results import load_tensors, write_json
from ..data.images import collate, list_images
from ..data.trainset import GlobalBatches, TrainImages, TrainStats, split_per_class, train_statistics
from ..models.predict import average_probs
from . import checkpoints as ckpt
from .networks import build_model, clip_filters
from .settings import RECIPES, TrainConfig

__all__ = ["TrainConfig", "RECIPES", "MetricLogger", "train_one_epoch", "evaluate", "plateau_schedule", "main",
           "STATS"]

STATS = "train_stats.pth"  # the training-set statistics of a run folder, computed once


_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}  # for runs saved before a field existed
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
    clipped = images = 0
    bar = progress_bar(total=len(loader), desc=f"epoch {epoch}", enabled=progress)
    amp = scaler is not None
    t0 = time.perf_counter()
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
        log.update(len(y), loss=loss.item(), acc1=acc1.item())  # .item(): the step has finished on the GPU
        images += len(y)
        bar.update(1)
        bar.set_postfix_str(str(log))
    bar.close()
    return {"train_loss": log.avg("loss") if log.counts else math.nan,
            "train_top1_err": 100.0 * (1 - log.avg("acc1")) if log.counts else math.nan,
            "clipped_filters": clipped, "train_img_per_s": images / max(time.perf_counter() - t0, 1e-9)}


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
                probs = average_probs([model], x)
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


def plateau_schedule(optimizer, cfg: TrainConfig):
    """Learning rate x lr_factor when the validation top-1 error has not reached a new best for lr_patience
    epochs (ZF Sec. 3: annealed when it plateaus), at most lr_drops times (AlexNet Sec. 5: three)."""
    floor = 0.0 if cfg.lr_drops is None else cfg.lr * cfg.lr_factor ** cfg.lr_drops  # the rate after the last drop
    return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, "min", factor=cfg.lr_factor,
                                                      patience=cfg.lr_patience, min_lr=floor)


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
                if k not in _RESUMABLE and _plain(v) != _plain(old.get(k, _DEFAULTS[k]))]
        if diff:
            raise ZfnetError(f"{out} holds a run with different settings ({', '.join(diff)}); resume with the "
                             f"same settings or choose another --out")
    paths, labels, vpaths, vlabels, classes = _datasets(cfg)
    if len(paths) < cfg.batch_size:
        raise ZfnetError(f"{len(paths)} training images is fewer than one batch ({cfg.batch_size}); lower "
                         f"--batch-size")
    train_ds = TrainImages(paths, labels, cfg.resize, cfg.crop, "random", cfg.flip, cache=cfg.cache, seed=cfg.seed)
    stats = _train_stats(cfg, train_ds, d, out, state)
    train_ds.mean_image, bad = stats.mean_image, stats.skipped
    if cfg.lighting > 0:
        train_ds.lighting = stats.lighting(cfg.lighting)
        if d.main and state is None:
            ev = " ".join(f"{v:.4g}" for v in train_ds.lighting.eigval.tolist())
            print(f"zfnet: PCA lighting, alpha ~ N(0, {cfg.lighting:g}): RGB covariance eigenvalues {ev} "
                  f"({stats.pixels} pixels)", file=sys.stderr)
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
    scheduler = plateau_schedule(optimizer, cfg)
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
            _save(out, cfg, arch, classes, model, optimizer, scheduler, scaler, epoch, history, stats)
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


def _stats_key(ds: TrainImages) -> dict:
    """Which training set (and image size) a statistics file describes."""
    h = hashlib.sha1("\n".join(f"{p}\t{y}" for p, y in zip(ds.paths, ds.labels)).encode())
    return {"resize": ds.resize, "images": len(ds), "sha1": h.hexdigest()}


def _train_stats(cfg: TrainConfig, ds: TrainImages, d: Dist, out: Path, state: dict | None) -> TrainStats:
    """The training-set statistics: from the checkpoint when resuming, else from out/train_stats.pth when it
    describes this training set (a run stopped during its first epoch), else one sharded pass (written
    there by rank 0)."""
    show = cfg.progress and d.main
    if state is not None:
        if ds.cache is not None:  # warm the cache (decode once) before timing epochs
            train_statistics(ds, Dist(), cfg.batch_size, cfg.workers, show)
        if "train_stats" in state:
            return TrainStats.from_dict(state["train_stats"])
        # a checkpoint from before the RGB covariance was kept (such runs have lighting off)
        return TrainStats(state["mean_image"], torch.full((3, 3), math.nan, dtype=torch.float64), 0,
                          [int(i) for i in state.get("skipped_train", [])])
    key, cached = _stats_key(ds), None
    if (out / STATS).is_file():
        try:
            obj = load_tensors(out / STATS, "training-set statistics")
        except ZfnetError as e:
            print(f"zfnet: recomputing the training-set statistics: {e}", file=sys.stderr)
            obj = None
        if isinstance(obj, dict) and obj.get("key") == key:
            cached = TrainStats.from_dict(obj)
    have = torch.tensor([float(cached is not None)])
    if d.world > 1:  # all processes take part in the pass unless every one of them read the file
        have = d.all_sum(have) / d.world
    if have.item() == 1.0:
        if d.main:
            print(f"zfnet: training-set statistics from {out / STATS}", file=sys.stderr)
        if ds.cache is not None:
            train_statistics(ds, Dist(), cfg.batch_size, cfg.workers, show)
        return cached
    stats = train_statistics(ds, d, cfg.batch_size, cfg.workers, show)
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        ckpt.save_checkpoint(dict(stats.to_dict(), key=key), out / STATS)
    return stats


def _plain(v):
    return list(v) if isinstance(v, tuple) else v


def _save(out, cfg, arch, classes, model, optimizer, scheduler, scaler, epoch, history, stats: TrainStats):
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    common = {"model": sd, "mean_image": stats.mean_image.cpu(), "categories": list(classes),
              "arch": arch, "epoch": epoch, "metrics": history[-1:]}
    if cfg.snapshots:
        ckpt.save_checkpoint(common, out / ckpt.SNAPSHOT.format(epoch))
    full = dict(common, config={k: _plain(v) for k, v in dataclasses.asdict(cfg).items()},
                optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                scaler=scaler.state_dict() if scaler is not None else {}, metrics=history,
                skipped_train=list(stats.skipped), train_stats=stats.to_dict())
    ckpt.save_checkpoint(full, out / ckpt.LATEST)
