"""End-to-end feature atlas time and size (Fig. 2): SqueezeNet 1.1, every feature layer, every unit.

Times the atlas (mining pass + deconvnet projections + pictures + site) and, in the same run, a plain
forward pass (decode, preprocess, forward of the whole model) over the same images and batch size.
Prints the phases, the size of the atlas folder, and last ratio = atlas seconds / plain forward seconds
(how many forward passes' worth of time the whole atlas costs; lower is better).

    python bench/bench_atlas.py --demo       # `make demo`: the CLI over the 202 built-in photos, k=9;
                                             # target: under 3 minutes on a quiet 2-core machine
    python bench/bench_atlas.py --demo --quick   # the same command on two small layers (checks the path)
    python bench/bench_atlas.py --quick      # 64 ImageNet photos, 2 small layers, k=3: < 2 min
    python bench/bench_atlas.py              # all 1000 ImageNet photos, all feature layers, k=9 (size
                                             # target: at most 60 MB)
Real weights come from ../shared/weights (random weights without them; the time hardly depends on it).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from zfnet.data.images import Batches, ImageDataset, Preprocess  # noqa: E402
from zfnet.data.samples import demo_dir  # noqa: E402
from zfnet.models.weights import load_model  # noqa: E402
from zfnet.understanding.atlas import atlas  # noqa: E402

SHARED = ROOT.parent / "shared"
DEMO_TARGET_S = 180


def plain_forward(model, data: Path, batch_size: int, device: str = "cpu") -> float:
    t = time.perf_counter()
    ds = ImageDataset.from_folder(data, Preprocess.for_model(model))
    with torch.inference_mode():
        for x, _, _ in Batches(ds, batch_size, progress=False):
            model(x.to(device))
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t


def folder_mb(out: Path) -> float:
    return sum(p.stat().st_size for p in out.rglob("*") if p.is_file() and not p.name.startswith(".")) / 1e6


def demo(args, model, weights: Path):
    """`make demo` exactly: the CLI in a fresh process, wall time, over the built-in photos."""
    data = demo_dir()
    n = sum(1 for p in data.rglob("*.jpg"))
    print(f"# bench_atlas --demo: `zfnet atlas --model squeezenet1_1 --k 9` over the {n} built-in photos, "
          f"{args.threads} threads, torch {torch.__version__}", flush=True)
    t_fwd = plain_forward(model, data, 32, args.device)
    print(f"plain forward (decode + preprocess + forward): {t_fwd:.1f} s ({n / t_fwd:.1f} img/s)", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="bench_demo_"))
    try:
        out = Path(args.out) if args.out else tmp / "demo"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               "OMP_NUM_THREADS": str(args.threads)}
        cmd = [sys.executable, "-m", "zfnet", "atlas", "--model", "squeezenet1_1", "--weights",
               str(weights) if weights.exists() else "none", "--k", "9", "--out", str(out), "--device", args.device]
        if args.quick:  # the code path only: two small layers
            cmd += ["--layers", "features.1,features.3"]
        t = time.perf_counter()
        subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
        t_demo = time.perf_counter() - t
        print(f"make demo: {t_demo:.1f} s (target {DEMO_TARGET_S} s: {t_demo / DEMO_TARGET_S:.2f} of it), "
              f"{folder_mb(out):.1f} MB", flush=True)
        print(f"ratio={t_demo / t_fwd:.2f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--demo", action="store_true", help="time `make demo` (the CLI over the built-in photos)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--images", type=int, default=None, help="use the first N photos (every (1000/N)th)")
    ap.add_argument("--layers", default=None, help="comma-separated (default: all feature layers)")
    ap.add_argument("--k", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="keep the atlas here (default: a temporary folder)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    ap.add_argument("--data", default=None, help="photo folder (default: ../shared/data/imagenet-samples)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    weights = SHARED / "weights" / "squeezenet1_1.pth"
    model = load_model("squeezenet1_1", str(weights) if weights.exists() else None, device=args.device)
    if args.demo:
        return demo(args, model, weights)
    if args.quick:
        args.images = args.images or 64
        args.layers = args.layers or "features.3.squeeze_activation,features.9.squeeze_activation"
        args.k = args.k or 3
    k = args.k or 9
    photos = Path(args.data).resolve() if args.data else SHARED / "data" / "imagenet-samples"
    if not photos.exists():
        sys.exit(f"needs {photos}")
    files = sorted(p for p in photos.iterdir() if p.is_file())
    if args.images:
        files = files[::max(1, len(files) // args.images)][:args.images]
    tmp = Path(tempfile.mkdtemp(prefix="bench_atlas_"))
    try:
        data = tmp / "photos"
        data.mkdir()
        for p in files:
            (data / p.name).symlink_to(p)
        layers = args.layers.split(",") if args.layers else None
        print(f"# bench_atlas: SqueezeNet 1.1 ({'real' if weights.exists() else 'random'} weights), {len(files)} "
              f"photos, layers {args.layers or 'all feature layers'}, k={k}, batch {args.batch_size}, "
              f"{args.threads} threads, torch {torch.__version__}, {args.device}", flush=True)
        t_fwd = plain_forward(model, data, args.batch_size, args.device)
        print(f"plain forward (decode + preprocess + forward): {t_fwd:.1f} s ({len(files) / t_fwd:.1f} img/s)",
              flush=True)
        out = Path(args.out) if args.out else tmp / "atlas"
        t = time.perf_counter()
        res = atlas(model, data, out, layers, k=k, batch_size=args.batch_size, progress=False,
                    model_name="squeezenet1_1")
        t_atlas = time.perf_counter() - t
        tm = res.meta["timing"]
        units = sum(len(v) for v in res.meta["layers"].values())
        proj = sum(len(e) for v in res.meta["layers"].values() for e in v.values())
        t_proj = sum(tm["project_s"].values())
        print(f"atlas: {t_atlas:.1f} s total; mining {tm['mine_s']:.1f} s ({len(files) / tm['mine_s']:.1f} img/s); "
              f"projections + pictures {t_proj:.1f} s for {units} units / {proj} projections "
              f"({1000 * t_proj / max(proj, 1):.0f} ms each); pages + figures {t_atlas - tm['mine_s'] - t_proj:.1f} s; "
              f"images decoded in the projection phase: {tm['decoded']}", flush=True)
        for name, s in tm["project_s"].items():
            print(f"  {name}: {s:.1f} s", flush=True)
        print(f"atlas folder: {folder_mb(out):.1f} MB ({sum(len(v) for v in res.dead.values())} dead units)",
              flush=True)
        print(f"ratio={t_atlas / t_fwd:.2f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
