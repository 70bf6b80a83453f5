"""End-to-end feature atlas time (Fig. 2): SqueezeNet 1.1 over the ImageNet sample photos.

Times `atlas()` (mining pass + deconvnet projections + pictures + site) and, in the same run, a plain
forward pass (decode, preprocess, forward of the whole model) over the same images and batch size.
Prints the phases and, last, ratio = atlas seconds / plain forward seconds (how many forward passes'
worth of time the whole atlas costs; lower is better).

    python bench/bench_atlas.py --quick      # 64 photos, 2 small layers, k=3: < 2 min
    python bench/bench_atlas.py              # all 1000 photos, all feature layers, k=9 (long on 2 cores)
Real weights come from ../shared/weights (random weights without them; the time hardly depends on it).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from zfnet.data.images import Batches, ImageDataset, Preprocess  # noqa: E402
from zfnet.models.weights import load_model  # noqa: E402
from zfnet.understanding.atlas import atlas  # noqa: E402

SHARED = ROOT.parent / "shared"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--images", type=int, default=None, help="use the first N photos (every (1000/N)th)")
    ap.add_argument("--layers", default=None, help="comma-separated (default: all feature layers)")
    ap.add_argument("--k", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="keep the atlas here (default: a temporary folder)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        args.images = args.images or 64
        args.layers = args.layers or "features.3.squeeze_activation,features.9.squeeze_activation"
        args.k = args.k or 3
    k = args.k or 9
    photos = SHARED / "data" / "imagenet-samples"
    weights = SHARED / "weights" / "squeezenet1_1.pth"
    model = load_model("squeezenet1_1", str(weights) if weights.exists() else None)
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
              f"{args.threads} threads, torch {torch.__version__} (shared 2-core machine)", flush=True)
        t = time.perf_counter()
        ds = ImageDataset.from_folder(data, Preprocess.for_model(model))
        with torch.inference_mode():
            for x, _, _ in Batches(ds, args.batch_size, progress=False):
                model(x)
        t_fwd = time.perf_counter() - t
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
              f"({1000 * t_proj / max(proj, 1):.0f} ms each); pages + figures {t_atlas - tm['mine_s'] - t_proj:.1f} s",
              flush=True)
        for name, s in tm["project_s"].items():
            print(f"  {name}: {s:.1f} s", flush=True)
        print(f"ratio={t_atlas / t_fwd:.2f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
