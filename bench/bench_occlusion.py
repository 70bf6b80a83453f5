"""Occlusion speed (Fig. 7): zfnet's exact incremental occlusion against Captum's Occlusion.

Both compute the same per-pixel map for one photo (Captum's attribution for the target class: the mean,
over the occluders covering a pixel, of clean minus occluded probability), on ZFNet (random weights) and
SqueezeNet 1.1 (real weights from ../shared, random if absent), in the same run. The maps are checked to
be identical (max |difference| <= 1e-5 x the larger of max |map| and the clean p(label); the maps are
differences of probabilities) before any time is reported.

Captum is timed twice: with its default perturbations_per_eval=1 (one image per forward pass, how it is
usually called) and batched with the same batch size zfnet uses. Time is process CPU time with one torch
thread: on a shared, oversubscribed machine OpenMP threads spin while waiting and wall time measures the
neighbours; each side is measured `--repeat` times and the best is kept.

    python bench/bench_occlusion.py --quick   # < 2 min
    python bench/bench_occlusion.py           # more occluder settings
Last line: ratio=<min over models of Captum (default) time / zfnet time> at the headline setting.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from zfnet.data.images import Preprocess, load_image  # noqa: E402
from zfnet.data.samples import sample_dir  # noqa: E402
from zfnet.models.weights import load_model  # noqa: E402
from zfnet.understanding.occlusion import occluded_outputs, occluder_boxes, pixel_attribution  # noqa: E402

SQUEEZENET_WEIGHTS = Path(__file__).resolve().parents[2] / "shared" / "weights" / "squeezenet1_1.pth"


CLOCK = time.process_time  # wall time on a GPU (both sides end by copying their map to the CPU: synchronized)


def best(repeat, fn, *args):
    times, out = [], None
    for _ in range(repeat):
        t0 = CLOCK()
        out = fn(*args)
        times.append(CLOCK() - t0)
    return min(times), out


def ours(model, x, label, size, stride, batch):
    H, W = x.shape[-2:]
    rows, cols = occluder_boxes(H, size, stride), occluder_boxes(W, size, stride)
    boxes = [(a, b, c, d) for a, b in rows for c, d in cols]
    out, _ = occluded_outputs(model, x, boxes, batch_size=batch)
    with torch.no_grad():
        p0 = model(x).softmax(-1)[0, label]
    drop = (p0 - out.softmax(-1)[:, label]).reshape(len(rows), len(cols)).cpu().numpy()
    return pixel_attribution(drop, rows, cols, (H, W))


def captum(model, x, label, size, stride, ppe):
    from captum.attr import Occlusion

    with torch.no_grad():
        a = Occlusion(lambda t: model(t).softmax(-1)).attribute(
            x, sliding_window_shapes=(3, size, size), strides=(3, stride, stride), target=label, baselines=0,
            perturbations_per_eval=ppe)
    return a[0, 0].cpu().numpy()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="cpu, cuda, ... (both sides run there; wall time off the CPU)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    global CLOCK
    CLOCK = time.process_time if args.device == "cpu" else time.perf_counter
    repeat = args.repeat or 1
    settings = [(32, 16)] if args.quick else [(32, 16), (48, 16), (64, 16), (16, 16)]  # 48/16: `zfnet occlude` default
    headline = settings[0]
    torch.manual_seed(0)
    weights = str(SQUEEZENET_WEIGHTS) if SQUEEZENET_WEIGHTS.exists() else None
    models = [("zfnet (random)", load_model("zfnet", device=args.device)),
              (f"squeezenet1_1 ({'real' if weights else 'random'})",
               load_model("squeezenet1_1", weights, device=args.device))]
    img = load_image(sample_dir() / "chelsea_cat.jpg")
    print(f"torch {torch.__version__}, {args.threads} thread(s), batch {args.batch}, CPU time, best of {repeat}")
    print(f"{'model':26s} {'occluder':>9s} {'pos':>5s} {'zfnet s':>8s} {'captum s':>9s} {'captum b s':>10s} "
          f"{'ratio':>6s} {'ratio b':>7s}  identical (max rel. diff)")
    ratios = []
    for name, model in models:
        x = Preprocess.for_model(model)(img)[None].to(args.device)
        with torch.no_grad():
            p = model(x).softmax(-1)[0]
        label = int(p.argmax())
        for size, stride in settings:
            n = len(occluder_boxes(224, size, stride)) ** 2
            t_ours, m_ours = best(repeat, ours, model, x, label, size, stride, args.batch)
            t_cap, m_cap = best(repeat, captum, model, x, label, size, stride, 1)
            t_capb, m_capb = best(repeat, captum, model, x, label, size, stride, args.batch)
            scale = max(float(np.abs(m_cap).max()), float(p[label]))
            diff = max(float(np.abs(m - m_cap).max()) for m in (m_ours, m_capb)) / scale
            if diff > 1e-5:
                print(f"MAPS DIFFER for {name} {size}/{stride}: max |diff| / scale = {diff:.3g}")
                sys.exit(1)
            r, rb = t_cap / t_ours, t_capb / t_ours
            print(f"{name:26s} {size:>4d}/{stride:<4d} {n:5d} {t_ours:8.2f} {t_cap:9.2f} {t_capb:10.2f} "
                  f"{r:6.1f} {rb:7.1f}  yes ({diff:.0e})", flush=True)
            if (size, stride) == headline:
                ratios.append(r)
    print(f"ratio={min(ratios):.2f}")


if __name__ == "__main__":
    main()
