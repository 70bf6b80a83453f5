"""Mining speed and memory (the top-k pass behind Fig. 2).

1. Throughput: `mine()` over all feature layers of ZFNet (random weights) and SqueezeNet 1.1, against a
   plain forward pass (the whole model, inference mode) over the same in-memory images and batch size, in
   the same run, alternating and keeping each side's best time (contention on a shared machine hits them
   alike); also the atlas's pass (the whole model, with top-1 predictions). Target: ratio = mining /
   plain forward throughput >= 0.90 for both.
2. Memory: peak memory of mining 1k vs 8k synthetic images (generated on the fly from a seed, so the
   dataset itself takes no memory), each in a fresh child process: peak RSS (VmHWM; includes torch's CPU
   allocator and the interpreter) and the tracemalloc peak of Python objects. Target: flat within 10 %.

    python bench/bench_mine.py --quick     # < 2 min
    python bench/bench_mine.py             # larger batches of images
Last line: ratio=<min throughput ratio over the models>.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from zfnet.data.images import ImageDataset  # noqa: E402
from zfnet.engine.mine import mine  # noqa: E402
from zfnet.inspect.layers import feature_layers  # noqa: E402
from zfnet.models.networks import squeezenet1_1, zfnet  # noqa: E402


class Synthetic(ImageDataset):
    """n images of size s, drawn from seed i on demand (or kept in memory when `cache`)."""

    def __init__(self, n: int, size: int = 224, cache: bool = False):
        self.paths = [Path(f"synthetic/{i:07d}.png") for i in range(n)]
        self.labels, self.transform, self.size = None, None, size
        self.cache = [self._make(i) for i in range(n)] if cache else None

    def _make(self, i):
        return torch.randn(3, self.size, self.size, generator=torch.Generator().manual_seed(i))

    def __getitem__(self, i):
        return (self.cache[i] if self.cache is not None else self._make(i)), -1, i, None


def plain_forward(model, ds, batch_size):
    from zfnet.data.images import Batches

    with torch.inference_mode():
        for x, _, _ in Batches(ds, batch_size, progress=False):
            model(x)


def throughput(name, model, n, batch_size, repeats):
    """Plain forward vs mining (stops at the deepest layer) vs the atlas's mining pass (whole model, with
    every image's top-1 prediction), alternating; best of `repeats` each."""
    ds = Synthetic(n, cache=True)
    layers = feature_layers(model)
    plain_forward(model, Synthetic(batch_size, cache=True), batch_size)  # warm-up (allocator, kernels)
    t_plain, t_mine, t_pred = [], [], []
    for _ in range(repeats):
        t = time.perf_counter()
        plain_forward(model, ds, batch_size)
        t_plain.append(time.perf_counter() - t)
        t = time.perf_counter()
        mine(model, ds, layers, batch_size=batch_size, progress=False)
        t_mine.append(time.perf_counter() - t)
        t = time.perf_counter()
        mine(model, ds, layers, batch_size=batch_size, progress=False, predict=True)
        t_pred.append(time.perf_counter() - t)
    fwd, mn, pr = n / min(t_plain), n / min(t_mine), n / min(t_pred)
    print(f"{name}: {len(layers)} layers, {n} images, batch {batch_size}: plain forward {fwd:.1f} img/s, mining "
          f"{mn:.1f} img/s (ratio {mn / fwd:.3f}), mining + predictions {pr:.1f} img/s (ratio {pr / fwd:.3f}) "
          f"(best of {repeats}; all plain {[round(t, 2) for t in t_plain]} s, mine {[round(t, 2) for t in t_mine]} s, "
          f"mine + predict {[round(t, 2) for t in t_pred]} s)", flush=True)
    return min(mn, pr) / fwd


def _memory_model(name):
    # quick: a narrow ZFNet (the mining machinery is what is measured, not the model); full: SqueezeNet
    return zfnet(widths=(16, 32, 32, 32, 16)).eval() if name == "zfnet-small" else squeezenet1_1().eval()


def child_memory(n, size, batch_size, model_name):
    """Runs in a fresh process: mine n synthetic images, print peak RSS and the tracemalloc peak."""
    import tracemalloc

    torch.set_num_threads(2)
    model = _memory_model(model_name)
    ds = Synthetic(n, size)  # the file list itself is the caller's (O(n) paths), not mining's
    tracemalloc.start()
    t = time.perf_counter()
    res = mine(model, ds, feature_layers(model), batch_size=batch_size, progress=False)
    wall = time.perf_counter() - t
    _, py_peak = tracemalloc.get_traced_memory()
    hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
    print(json.dumps({"n": n, "images": res.images, "rss_peak_mb": hwm / 1024, "py_peak_mb": py_peak / 2**20,
                      "wall_s": wall}))


def memory(sizes, size, batch_size, model_name):
    out = []
    for n in sizes:
        r = subprocess.run([sys.executable, __file__, "--child-memory", str(n), "--size", str(size),
                            "--batch-size", str(batch_size), "--model", model_name],
                           capture_output=True, text=True, check=True)
        out.append(json.loads(r.stdout.strip().splitlines()[-1]))
        o = out[-1]
        print(f"memory: {model_name}, all feature layers, {o['n']} images of {size}px: "
              f"peak RSS {o['rss_peak_mb']:.1f} MB, python peak {o['py_peak_mb']:.2f} MB ({o['wall_s']:.1f} s)",
              flush=True)
    a, b = out[0], out[-1]
    print(f"memory: {b['n']} vs {a['n']} images: RSS x{b['rss_peak_mb'] / a['rss_peak_mb']:.3f}, "
          f"python x{b['py_peak_mb'] / a['py_peak_mb']:.3f}", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child-memory", type=int, default=None)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--model", default="squeezenet1_1")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.child_memory is not None:
        return child_memory(args.child_memory, args.size, args.batch_size, args.model)
    torch.manual_seed(0)
    n, repeats = (32, 2) if args.quick else (256, 3)
    print(f"# bench_mine: torch {torch.__version__}, {args.threads} threads (shared 2-core machine)", flush=True)
    ratios = [throughput("ZFNet (random)", zfnet().eval(), n, args.batch_size, repeats),
              throughput("SqueezeNet 1.1", squeezenet1_1().eval(), n, args.batch_size, repeats)]
    if args.quick:
        memory([1000, 8000], 32, 100, "zfnet-small")
    else:
        memory([1000, 8000], 64, args.batch_size, "squeezenet1_1")
    print(f"ratio={min(ratios):.3f}")


if __name__ == "__main__":
    main()
