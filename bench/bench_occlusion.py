"""Occlusion speed (Fig. 7): zfnet's exact occlusion against Captum's Occlusion, and against full forward
passes on the model zoo.

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

The zoo (`--zoo`, in the environment with torchvision and timm: /work/venv-zoo/bin/python): every
architecture of tests/zoo/zoo_models.py (random weights, a real photo), 224 px, 48/16 occluder (144
positions). zfnet's default `occluded_outputs` (method "auto": the exact incremental engine where it is
measured faster, else full passes) against plain full forward passes (the model on batches of occluded
copies in PyTorch's default layout, as a user or Captum runs it; the same batch size), same run; the outputs
must agree (max |difference| <= 1e-4 x max |output|) before a time is reported. zfnet is timed as a first
image (nothing kept from an earlier call: the fx trace, the engine's build and the probe are all paid; the
ratio is this time's) and as a further image of the same model ("next s": what each further image of a batch
costs). The table says which method "auto" ran and why, and, for reference, the time of the same full passes
in channels-last memory format (what zfnet's own full passes use on the CPU).

    /work/venv-zoo/bin/python bench/bench_occlusion.py --zoo [--quick] [--models tv.resnet50,...]
Last line: ratio=<min over models of full-pass time / zfnet time>. --quick: 128 px (36 positions), three
models, to prove the script works (no figures).
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from zfnet.data.images import Preprocess, load_image  # noqa: E402
from zfnet.data.samples import sample_dir  # noqa: E402
from zfnet.engine.occluder import forget  # noqa: E402
from zfnet.models.weights import load_model  # noqa: E402
from zfnet.understanding.occlusion import occluded_outputs, occluder_boxes, pixel_attribution  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SQUEEZENET_WEIGHTS = ROOT.parent / "shared" / "weights" / "squeezenet1_1.pth"
QUICK_ZOO = ["tv.resnet18", "tv.mobilenet_v2", "tv.shufflenet_v2_x1_0"]  # a residual sum, depthwise, chunk


CLOCK = time.process_time  # wall time on a GPU (both sides end by copying their map to the CPU: synchronized)


def best(repeat, fn, *args):
    """(least process CPU time over `repeat` runs, the last result)."""
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
    out = occluded_outputs(model, x, boxes, batch_size=batch, report=False).outputs
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


def full_passes(model, x, boxes, batch, layout=torch.contiguous_format):
    """The model on batches of occluded copies of x (zeros in each box)."""
    outs = []
    for b in range(0, len(boxes), batch):
        chunk = boxes[b:b + batch]
        xb = x.expand(len(chunk), *x.shape[1:]).clone(memory_format=layout)
        for i, (y0, y1, x0, x1) in enumerate(chunk):
            xb[i, :, y0:y1, x0:x1] = 0
        outs.append(model(xb).reshape(len(chunk), -1))
    return torch.cat(outs)


def zoo(args):
    """zfnet's default occlusion vs full forward passes on every zoo architecture."""
    sys.path.insert(0, str(ROOT / "tests" / "zoo"))
    from zoo_models import NAMES, build

    names = args.models.split(",") if args.models else QUICK_ZOO if args.quick else NAMES
    size = 128 if args.quick else 224
    img = load_image(sample_dir() / "chelsea_cat.jpg")
    x = Preprocess(size=size, resize=size * 8 // 7)(img)[None].to(args.device)
    rows = occluder_boxes(size, 48, 16)
    boxes = [(a, b, c, d) for a, b in rows for c, d in rows]
    print(f"torch {torch.__version__}, {args.threads} thread(s), batch {args.batch}, {size} px, 48/16 occluder "
          f"({len(boxes)} positions), {args.device}, {'CPU' if args.device == 'cpu' else 'wall'} time, "
          f"best of {args.repeat or 1}")
    print(f"{'model':24s} {'full s':>7s} {'full CL s':>9s} {'zfnet s':>8s} {'next s':>7s} {'ratio':>6s} {'vs CL':>6s}  "
          f"method (why)")
    ratios, cl_ratios = [], []
    for name in names:
        model = build(name).to(args.device)
        run = functools.partial(occluded_outputs, model, x, boxes, batch_size=args.batch, report=False)

        def first_image(model=model, run=run):  # as a first call: nothing kept from a run before
            forget(model)
            return run()

        with torch.no_grad():
            t_full, slow = best(args.repeat or 1, full_passes, model, x, boxes, args.batch)
            try:
                t_cl, _ = best(args.repeat or 1, full_passes, model, x, boxes, args.batch, torch.channels_last)
            except RuntimeError:  # a model that needs default strides (a .view after a conv)
                t_cl = float("nan")
            t_ours, fast = best(args.repeat or 1, first_image)
            t_next, warm = best(args.repeat or 1, run)  # a further image of a batch: what the first one taught kept
        for got in (fast, warm):
            diff = float((got.outputs - slow).abs().max()) / float(slow.abs().max())
            if diff > 1e-4:
                print(f"OUTPUTS DIFFER for {name}: max |diff| / max |output| = {diff:.3g}")
                sys.exit(1)
        ratios.append(t_full / t_ours)
        cl_ratios.append(t_cl / t_ours)
        print(f"{name:24s} {t_full:7.2f} {t_cl:9.2f} {t_ours:8.2f} {t_next:7.2f} {ratios[-1]:6.2f} "
              f"{t_cl / t_ours:6.2f}  {fast.method} ({fast.reason})", flush=True)
    # zfnet's own full passes run channels last: against those, the engine's part of the gain alone
    cl = min((r for r in cl_ratios if r == r), default=float("nan"))  # nan: a model refused channels last
    print(f"min over models vs channels-last full passes: {cl:.2f}")
    print(f"ratio={min(ratios):.2f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--zoo", action="store_true", help="torchvision / timm models vs full forward passes")
    ap.add_argument("--models", default=None, help="with --zoo: comma-separated zoo names")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="cpu, cuda, ... (both sides run there; wall time off the CPU)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    global CLOCK
    CLOCK = time.process_time if args.device == "cpu" else time.perf_counter
    if args.zoo:
        return zoo(args)
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
