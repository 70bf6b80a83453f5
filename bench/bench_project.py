"""Projection speed on the atlas workload: zfnet.engine.project vs Captum's NeuronDeconvolution, same run.

Workload (Fig. 2 of the paper): for each feature layer, 9 units, each projected at its strongest
activation on 9 different images (81 single-activation deconv projections per layer), sent as the atlas
sends them: one `project(..., pairs=True)` call per layer, one row per (unit, image) pair. Captum gets one
`attribute` call per projection, as a user would write it. ZFNet has random weights (224 px); SqueezeNet
the real ones on real photos (skipped without ../shared).

Per layer it prints zfnet's and Captum's projections per second, and the dense limit: one plain forward
(stopped at the layer) plus one input-gradient backward of the engine's input crop, batched, measured in
the same run: what a projection would cost with crops alone, no shared passes and no cuts inside the net.
Each side is timed after a first call that builds its shapes (oneDNN compiles kernels per crop and batch
shape; the atlas sends thousands of projections of few shapes): zfnet's median of 3 calls per layer, and
its first call printed beside it (the first-call ratio is printed too).

    python bench/bench_project.py [--quick]        # --quick: fewer units, < 2 min; prints ratio=<x> last
    python bench/bench_project.py --device cuda    # both on the GPU (times synchronised)
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from zfnet.engine.crop import plan_crop  # noqa: E402
from zfnet.engine.project import _PIXEL_BUDGET, project  # noqa: E402
from zfnet.engine.rules import projection_state  # noqa: E402
from zfnet.inspect.layers import feature_layers, layer_table, run_with_taps  # noqa: E402
from zfnet.models.networks import zfnet  # noqa: E402

SHARED = ROOT.parent / "shared"
REPEAT = 3  # timed calls of zfnet per layer after the first (their median counts)


def workload(model, images, layer, n_units, n_images, seed=0):
    """n_units channels of `layer`, each at its strongest location on n_images images (its 'top 9')."""
    with torch.no_grad():
        act = run_with_taps(model, images, [layer])[layer]  # (N, C, h, w)
    g = torch.Generator().manual_seed(seed)
    channels = torch.randperm(act.shape[1], generator=g)[:n_units].tolist()
    units, rows = [], []
    for c in channels:
        peak = act[:, c].flatten(1).max(1)
        for i in peak.values.argsort(descending=True)[:n_images].tolist():
            y, x = divmod(int(peak.indices[i]), act.shape[-1])
            units.append(f"{layer}:{c}@{y},{x}")
            rows.append(i)
    return images[rows], units


def sync(t):
    """Wall time of CUDA work counts only once it has finished."""
    if t.is_cuda:
        torch.cuda.synchronize(t.device)


def captum_twin(model):
    twin = copy.deepcopy(model)
    for m in twin.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False  # Captum cannot hook in-place ReLUs
    return twin


def dense_limit(model, x, layer, count):
    """Seconds for `count` rows of one plain forward to `layer` + one input-gradient backward, on the
    engine's input crop of this layer, in batches of the engine's default size."""
    h, w = x.shape[-2:]
    with projection_state(model):
        plan = plan_crop(model, layer_table(model, (h, w)), layer)
        hc, wc = plan.input_shape or (h, w)
        per_batch = max(1, _PIXEL_BUDGET // (hc * wc))
        sync(x)
        t = time.perf_counter()
        for s in range(0, count, per_batch):
            rows = min(per_batch, count - s)
            leaf = x[torch.arange(s, s + rows) % len(x), :, :hc, :wc]
            if leaf.device.type == "cpu":  # the engine's CPU layout
                leaf = leaf.contiguous(memory_format=torch.channels_last)
            leaf = leaf.clone().requires_grad_(True)
            with torch.enable_grad():
                act = run_with_taps(model, leaf.clone(), [layer], detach=False)[layer]
                torch.autograd.grad(act, leaf, torch.ones_like(act))
        sync(x)
        return time.perf_counter() - t, (hc, wc)


def bench_model(name, model, images, n_units, n_images, captum_every=1):
    from captum.attr import NeuronDeconvolution

    twin = captum_twin(model)
    mods = dict(twin.named_modules())
    tot = [0.0, 0.0, 0.0, 0.0]  # zfnet, Captum, dense, zfnet's first call (seconds)
    cpu = [0.0, 0.0]
    count = 0
    print(f"{name}: {n_units} units x {n_images} images per layer")
    for layer in feature_layers(model):
        x, units = workload(model, images, layer, n_units, n_images)
        # backprop_norm=True: Captum backpropagates LRN, so both compute the same numbers. The first call
        # (layer table, crop probe, oneDNN building its kernels for every new crop and batch shape) is timed
        # apart: the atlas sends thousands of projections of few shapes, so the steady state is its speed.
        sync(x)
        t = time.perf_counter()
        project(model, x, units, pairs=True, backprop_norm=True)
        sync(x)
        t_first = time.perf_counter() - t
        runs = []
        for _ in range(REPEAT):
            t, t_cpu = time.perf_counter(), time.process_time()
            ours, info = project(model, x, units, pairs=True, backprop_norm=True, return_info=True)
            sync(x)
            runs.append((time.perf_counter() - t, time.process_time() - t_cpu))
        t_ours, c_ours = sorted(runs)[len(runs) // 2]  # the median run
        dense_limit(model, x, layer, len(units))  # its shapes built once, as ours
        t_dense, crop = dense_limit(model, x, layer, len(units))
        # Captum: one call per projection, on a subset if asked (time scaled to the full count), after one
        # call that builds its shapes.
        idx = list(range(0, len(units), captum_every))
        deconv = NeuronDeconvolution(twin, mods[layer])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            c, yx = units[0].split(":")[1].split("@")
            deconv.attribute(x[:1].clone(), (int(c), *map(int, yx.split(","))))
        t, t_cpu = time.perf_counter(), time.process_time()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for k in idx:
                c, yx = units[k].split(":")[1].split("@")
                y, x_ = map(int, yx.split(","))
                ref = deconv.attribute(x[k:k + 1].clone(), (int(c), y, x_))
        sync(x)
        t_captum = (time.perf_counter() - t) * len(units) / len(idx)
        c_captum = (time.process_time() - t_cpu) * len(units) / len(idx)
        # Sanity: the last one agrees (ours is seeded with the activation itself).
        with torch.no_grad():
            a = run_with_taps(model, x[k:k + 1], [layer])[layer][0, int(c), y, x_]
        err = (ours[k] - ref[0] * a).abs().max().item() / max(ref.abs().max().item() * abs(a.item()), 1e-30)
        for i, v in enumerate((t_ours, t_captum, t_dense, t_first)):
            tot[i] += v
        cpu[0] += c_ours
        cpu[1] += c_captum
        count += len(units)
        n = len(units)
        print(f"  {layer:12s} zfnet {n / t_ours:8.1f}/s (first call {n / t_first:7.1f}/s)   "
              f"captum {n / t_captum:7.1f}/s   dense limit "
              f"{n / t_dense:8.1f}/s (crop {crop[0]}x{crop[1]})   forward rows {info.forward_rows}/{n}   "
              f"(rel. diff of a check {err:.1e})   x{t_captum / t_ours:.1f}", flush=True)
    print(f"  {name} total: zfnet {count / tot[0]:.1f} proj/s, captum {count / tot[1]:.1f} proj/s, dense limit "
          f"{count / tot[2]:.1f} proj/s, cpu time ratio {cpu[1] / cpu[0]:.1f}, first-call ratio {tot[1] / tot[3]:.1f}, "
          f"ratio={tot[1] / tot[0]:.1f}")
    return count, tot, cpu


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="3 units x 3 images per layer, Captum on a subset")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="cpu, cuda, ... (both sides run there)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    n_units, n_images = (3, 3) if args.quick else (9, 9)
    torch.manual_seed(0)
    pool = torch.randn(24 if args.quick else 40, 3, 224, 224).to(args.device)
    every = 3 if args.quick else 1
    zf = zfnet().eval().to(args.device)
    results = [bench_model("zfnet (random weights, 224 px)", zf, pool, n_units, n_images, every)]
    weights = SHARED / "weights" / "squeezenet1_1.pth"
    samples = SHARED / "data" / "imagenet-samples"
    if weights.exists() and samples.exists():
        from zfnet.data.images import Preprocess, load_image
        from zfnet.models.weights import load_model

        sq = load_model("squeezenet1_1", str(weights), device=args.device)
        files = sorted(samples.iterdir())[:: (100 if args.quick else 25)]
        prep = Preprocess.for_model(sq)
        photos = torch.stack([prep(load_image(f)) for f in files]).to(args.device)
        results.append(bench_model("squeezenet1_1 (real weights, photos)", sq, photos, n_units, n_images, every))
    else:
        print(f"squeezenet1_1 skipped: {weights} or {samples} missing")
    count = sum(r[0] for r in results)
    ours, captum, dense, first = (sum(r[1][i] for r in results) for i in range(4))
    cpu_ratio = sum(r[2][1] for r in results) / sum(r[2][0] for r in results)
    print(f"all: zfnet {count / ours:.1f} proj/s, captum {count / captum:.1f} proj/s, dense limit "
          f"{count / dense:.1f} proj/s ({args.device}, {torch.get_num_threads()} threads); "
          f"cpu time ratio {cpu_ratio:.1f}; first calls: zfnet {count / first:.1f} proj/s, ratio {captum / first:.1f}")
    print(f"ratio={captum / ours:.1f}")


if __name__ == "__main__":
    main()
