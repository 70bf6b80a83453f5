"""Would bfloat16 projections do for the atlas? Speed and error of deconvnet projections in bfloat16
against float32, in the same run (SqueezeNet 1.1, real weights and photos where ../shared has them).

The CPUs of this project's machine have AVX512-BF16, where a bfloat16 forward + backward of SqueezeNet runs
about 2x faster than float32. The projections of bench_project's atlas workload (per layer, 9 units, each
projected at its strongest activation on 9 images: bench_project.workload) are timed in both precisions and
compared: the relative L2 error of each projection and the share of rendered tile pixels
(zfnet.present.tiles) that differ by more than 2 levels.

    python bench/bench_precision.py            # features.4, .10, .12; 9 units x 9 of 40 photos
    python bench/bench_precision.py --quick    # features.4; 3 units x 3 of 10 photos
Last line: ratio = float32 seconds / bfloat16 seconds.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_project import workload  # noqa: E402

from zfnet.data.images import Preprocess, load_image  # noqa: E402
from zfnet.engine.project import project  # noqa: E402
from zfnet.models.weights import load_model  # noqa: E402
from zfnet.present.tiles import TileLayout, projection_tiles  # noqa: E402

SHARED = ROOT.parent / "shared"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(2)
    weights = SHARED / "weights" / "squeezenet1_1.pth"
    model = load_model("squeezenet1_1", str(weights) if weights.exists() else None)
    files = sorted((SHARED / "data" / "imagenet-samples").glob("*.jpg"))[:: 100 if args.quick else 25]
    prep = Preprocess.for_model(model)
    pool = (torch.stack([prep(load_image(f)) for f in files]) if files
            else torch.randn(10 if args.quick else 40, 3, 224, 224))
    n = 3 if args.quick else 9
    low = copy.deepcopy(model).to(torch.bfloat16)
    total = {"float32": 0.0, "bfloat16": 0.0}
    for layer in ["features.4"] if args.quick else ["features.4", "features.10", "features.12"]:
        x, units = workload(model, pool, layer, n, n)
        got = {}
        for name, m, inp in (("float32", model, x), ("bfloat16", low, x.to(torch.bfloat16))):
            project(m, inp[:3], units[:3], pairs=True)  # warm-up
            t = time.perf_counter()
            p = project(m, inp, units, pairs=True).float()
            got[name] = (time.perf_counter() - t, p)
            total[name] += got[name][0]
        a, b = got["float32"][1], got["bfloat16"][1]
        rel = (a - b).flatten(1).norm(dim=1) / a.flatten(1).norm(dim=1).clamp_min(1e-30)
        mask = torch.ones(len(a), 1, *a.shape[-2:])
        layout = TileLayout(field=tuple(a.shape[-2:]), size=tuple(a.shape[-2:]))
        d = (torch.from_numpy(projection_tiles(a, mask, layout)).int()
             - torch.from_numpy(projection_tiles(b, mask, layout)).int()).abs()
        print(f"{layer}: {len(units)} projections; float32 {got['float32'][0]:.2f} s, bfloat16 "
              f"{got['bfloat16'][0]:.2f} s ({got['float32'][0] / got['bfloat16'][0]:.2f}x); relative error "
              f"median {rel.median():.3f}, max {rel.max():.3f}; tile pixels off by > 2 levels "
              f"{100 * (d > 2).float().mean():.2f} %")
    print(f"ratio={total['float32'] / total['bfloat16']:.2f}")


if __name__ == "__main__":
    main()
