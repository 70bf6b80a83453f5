"""Two processes under torchrun give what one process gives: training (the same global batches, so the same
weights within float tolerance) and mining (identical top-k).

NCCL needs one GPU per process: with two or more GPUs both checks run on CUDA with NCCL; with fewer they run
on the CPU with gloo, and the script says so. Training is compared twice: float32 (tight tolerance) and, on
CUDA, with the recipe's AMP + channels_last (float16 rounding: loose tolerance).

    python bench/dist_check.py [--device cuda|cpu] [--out DIR]
Exits 1 when a comparison fails; prints one line per check.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TRAIN = ["--train-per-class", "12", "--widths", "8,16,16,16,8", "--fc", "32", "--resize", "72", "--crop", "64",
         "--batch-size", "16", "--epochs", "2", "--lr", "0.02", "--init-std", "0", "--dropout", "0",
         "--lighting", "0.1", "--progress", "no", "--threads", "1", "--val-crops", "center"]


def make_data(root: Path, classes: int = 4, per_class: int = 16) -> Path:
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            a = rng.integers(0, 80, (72 + 4 * (i % 3), 80, 3)).astype(np.uint8)
            a[..., c % 3] += 120
            a[:: 3 + c] = 255
            Image.fromarray(a).save(root / f"class{c}" / f"{i}.png")
    return root


def run(cmd, env):
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        sys.exit(f"dist_check: {' '.join(cmd[:6])} ... failed:\n{r.stderr[-3000:]}")
    return r


def torchrun(n: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n)]


def weights_diff(a: Path, b: Path) -> float:
    from zfnet.training.checkpoints import load_checkpoint

    wa, wb = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    return max(((wa[k] - wb[k]).abs().max() / wa[k].abs().max().clamp_min(1e-12)).item() for k in wa)


def mine_worker(data: str, out: str, device: str):
    """Under torchrun or alone: mine a seeded small ZFNet's feature layers; rank 0 saves the top-k."""
    from zfnet.data.images import Preprocess
    from zfnet.engine.mine import mine
    from zfnet.training.networks import build_model

    torch.manual_seed(0)
    model = build_model({"model": "zfnet", "widths": [8, 16, 16, 16, 8], "fc": 32, "num_classes": 4, "crop": 64,
                         "init_std": 0}).eval()
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    res = mine(model.to(device), data, k=9, batch_size=8, preprocess=Preprocess(size=64, resize=72), progress=False)
    if int(os.environ.get("RANK", 0)) == 0:
        torch.save({n: {k: v.cpu() for k, v in d.items()} for n, d in res.layers.items()}, out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None, help="work folder (default: a temporary one)")
    ap.add_argument("--mine-worker", nargs=2, metavar=("DATA", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.mine_worker:
        return mine_worker(*args.mine_worker, args.device)
    work = Path(args.out or tempfile.mkdtemp(prefix="dist_check_"))
    data = make_data(work / "data")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    device = args.device
    if device.startswith("cuda") and torch.cuda.device_count() < 2:
        print(f"dist_check: {torch.cuda.device_count()} GPU(s): NCCL needs one GPU per process, so the 2-process "
              f"checks run on the CPU with gloo")
        device = "cpu"
    backend = "NCCL" if device.startswith("cuda") else "gloo"
    ok = True
    variants = [("float32", ["--amp", "no"], 1e-4)]
    if device.startswith("cuda"):
        variants.append(("AMP + channels_last", ["--amp", "yes", "--channels-last", "yes"], 5e-2))
    for name, extra, tol in variants:
        tag = name.split()[0].lower()
        common = ["-m", "zfnet", "train", "--data", str(data), "--device", device] + TRAIN + extra
        run([sys.executable] + common + ["--out", str(work / f"train1-{tag}")], env)
        run(torchrun(2) + common + ["--out", str(work / f"train2-{tag}")], env)
        d = weights_diff(work / f"train1-{tag}" / "checkpoint.pth", work / f"train2-{tag}" / "checkpoint.pth")
        good = d <= tol
        ok &= good
        print(f"dist_check: training, {name}, 1 vs 2 processes ({backend}, {device}): max |w1 - w2| / max |w1| = "
              f"{d:.2e} (tolerance {tol:g}) {'ok' if good else 'MISMATCH'}", flush=True)
    me = [str(Path(__file__).resolve()), "--device", device, "--mine-worker", str(data)]
    run([sys.executable] + me + [str(work / "mine1.pt")], env)
    run(torchrun(2) + me + [str(work / "mine2.pt")], env)
    a, b = torch.load(work / "mine1.pt", weights_only=True), torch.load(work / "mine2.pt", weights_only=True)
    same = all(torch.equal(a[n][k], b[n][k]) for n in a for k in ("image", "y", "x"))
    vals = max((a[n]["value"] - b[n]["value"]).abs().max().item() for n in a)
    ok &= same
    print(f"dist_check: mining {len(a)} layers, top-9, 1 vs 2 processes ({backend}, {device}): identical top-k: "
          f"{'yes' if same else 'NO'} (max value difference {vals:.1e})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
