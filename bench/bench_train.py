"""Training throughput of the recipe's step (Sec. 3): float32 NCHW against float16 autocast + channels_last,
same run, same model, same batches.

Both sides run zfnet.training.recipe.train_one_epoch (forward, loss, backward, SGD step, feature scale
clipping) on batches already on the device, so the figure is the step's compute, not decoding. AMP and
channels_last are what the recipe uses on CUDA; on a CPU both rows are the same float32 NCHW step (the recipe
turns them on for CUDA only) and the ratio is ~1.

    python bench/bench_train.py --device cuda          # ZFNet at the paper's size: 224 px, batch 128
    python bench/bench_train.py --quick                # CPU: a small ZFNet, 64 px, < 1 min
Last line: ratio=<AMP + channels_last img/s / float32 img/s>.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from zfnet.training.networks import build_model  # noqa: E402
from zfnet.training.recipe import TrainConfig, train_one_epoch  # noqa: E402


def step_rate(device, arch, batches, amp: bool, steps: int, warmup: int) -> float:
    """Images per second of `steps` recipe steps after `warmup` untimed ones."""
    torch.manual_seed(0)
    cfg = TrainConfig(channels_last=amp, amp=amp)
    model = build_model(arch).to(device)
    if amp and device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
    scaler = torch.amp.GradScaler("cuda") if amp and device.type == "cuda" else None
    loss = nn.CrossEntropyLoss()
    train_one_epoch(model, loss, opt, batches[:warmup], device, 0, cfg, scaler, progress=False)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t = time.perf_counter()
    timed = [batches[i % len(batches)] for i in range(steps)]
    train_one_epoch(model, loss, opt, timed, device, 1, cfg, scaler, progress=False)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return steps * len(batches[0][1]) / (time.perf_counter() - t)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="small ZFNet (widths 32-96, 64 px, batch 32), few steps")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.quick:
        arch = {"model": "zfnet", "widths": [32, 64, 96, 96, 64], "fc": 256, "num_classes": 101, "crop": 64,
                "init_std": 0}
        size, batch, steps = 64, args.batch_size or 32, args.steps or 8
    else:
        arch = {"model": "zfnet", "num_classes": 1000, "crop": 224}
        size, batch, steps = 224, args.batch_size or 128, args.steps or 40
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(batch, 3, size, size, generator=g).to(device),
                torch.randint(0, arch["num_classes"], (batch,), generator=g).to(device), None, [])
               for _ in range(4)]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"# bench_train: {arch['model']} {size} px, batch {batch}, {steps} steps, {name}, torch {torch.__version__}"
          f" ({torch.get_num_threads()} CPU threads)")
    warm = 3 if device.type == "cuda" else 1
    fp32 = step_rate(device, arch, batches, amp=False, steps=steps, warmup=warm)
    print(f"float32 NCHW: {fp32:.1f} img/s", flush=True)
    amp = step_rate(device, arch, batches, amp=True, steps=steps, warmup=warm)
    what = "float16 autocast + channels_last" if device.type == "cuda" else "the same float32 step (AMP is CUDA-only)"
    print(f"{what}: {amp:.1f} img/s", flush=True)
    print(f"ratio={amp / fp32:.2f}")


if __name__ == "__main__":
    main()
