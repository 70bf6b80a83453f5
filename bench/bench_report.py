"""End-to-end `zfnet report` time: SqueezeNet 1.1 (real weights) over the built-in demo photos.

Runs every step of the report (Fig. 2 atlas, Fig. 5, Fig. 6, Fig. 7, Table 7, t-SNE, activations, filters,
reconstructions, fooling) with its default budgets into a fresh folder, and in the same run a plain forward
pass over the same photos (decode, preprocess, forward, batch 32) as the yardstick. Prints the seconds of
every step, the report's time in plain forward passes, and last ratio = report seconds / 900 (the target is
the whole report within 15 minutes on a quiet 2-core machine: ratio <= 1).

    python bench/bench_report.py --quick   # a few photos, tiny budgets: proves the pipeline, < 5 min
    python bench/bench_report.py           # the real thing: the demo photos, default budgets
Weights: --weights, else $ZFNET_WEIGHTS, else ../shared/weights/squeezenet1_1.pth.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from zfnet.data.images import Batches, ImageDataset, Preprocess, list_images  # noqa: E402
from zfnet.data.samples import demo_dir  # noqa: E402
from zfnet.models.weights import load_model  # noqa: E402
from zfnet.report.budget import Budgets  # noqa: E402
from zfnet.report.run import report  # noqa: E402

BUDGET_S = 15 * 60


def plain_forward(model, paths, batch_size=32) -> float:
    t = time.perf_counter()
    ds = ImageDataset(paths, transform=Preprocess.for_model(model))
    with torch.no_grad():
        for x, _, _ in Batches(ds, batch_size, progress=False):
            model(x)
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--data", default=None, help="image folder (default: the built-in demo photos)")
    ap.add_argument("--weights", default=None)
    ap.add_argument("--out", default=None, help="report folder to keep (default: a temporary one)")
    args = ap.parse_args()
    weights = args.weights or os.environ.get("ZFNET_WEIGHTS") or str(ROOT.parent / "shared/weights/squeezenet1_1.pth")
    data = Path(args.data or demo_dir())
    model = load_model("squeezenet1_1", weights)
    paths = list_images(data)[0]
    budgets = Budgets()
    if args.quick:
        budgets = Budgets(atlas_layers=["features.1"], atlas_k=3, few_images=1, data_images=8, probe_folds=1,
                          inversion_steps=5, fooling_images=1, fooling_steps=2, fooling_image_steps=5)
    tmp = None
    out = Path(args.out) if args.out else Path(tmp := tempfile.mkdtemp(prefix="bench_report_")) / "report"
    if out.exists():
        shutil.rmtree(out)
    try:
        t_fwd = plain_forward(model, paths)
        t = time.perf_counter()
        state = report(model, data, out, model_name="squeezenet1_1", weights=weights, budgets=budgets,
                       progress=True)
        total = time.perf_counter() - t
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"{len(paths)} photos in {data}; torch threads {torch.get_num_threads()}")
    for s in state["steps"]:
        print(f"  {s['name']:16s} {s['status']:8s} {s.get('seconds', 0) or 0:8.1f} s  {s.get('error', '') or ''}")
    print(f"report {total:.1f} s = {total / t_fwd:.1f} plain forward passes over the photos ({t_fwd:.1f} s); "
          f"target {BUDGET_S} s")
    print(f"ratio={total / BUDGET_S:.3f}")


if __name__ == "__main__":
    main()
