"""Taps: what reading every layer's full output, right, costs (invariance, notebooks; mining and probes
reduce each output in its hook and copy nothing).

Reads all layers of ZFNet (random weights) and SqueezeNet 1.1 (in-place ReLUs after every conv) in one
forward pass, three ways, over the same in-memory batches, alternating and keeping each side's best time:
  * plain: the forward pass alone (inference mode);
  * taps: taps() on every layer, copy-on-write (a recorded output is copied only when an op is about to
    write into it: here the conv outputs the in-place ReLUs overwrite);
  * copies: taps(copy=True), every recorded output copied at once (what taps did whenever a model had an
    in-place module).
Also counts the copies copy-on-write made. Target: taps / plain throughput >= 0.9, and fewer copies than
layers.

    python bench/bench_taps.py --quick     # < 1 min
    python bench/bench_taps.py
Last line: ratio=<min over the models of taps / plain throughput>.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from zfnet.inspect import taps as taps_module  # noqa: E402
from zfnet.inspect.layers import layer_table, taps  # noqa: E402
from zfnet.models.networks import squeezenet1_1, zfnet  # noqa: E402


def read_all(model, batches, names, copy):
    with torch.inference_mode():
        for x in batches:
            with taps(model, names, copy=copy):
                model(x)


def plain(model, batches):
    with torch.inference_mode():
        for x in batches:
            model(x)


def count_copies(model, x, names) -> int:
    n = 0
    before = taps_module._Recorder.before_write

    def counting(self, tensors):
        nonlocal n
        n += sum(len(self.watch.get(taps_module._storage(t), ())) for t in tensors)
        return before(self, tensors)

    taps_module._Recorder.before_write = counting
    try:
        read_all(model, [x], names, copy=False)
    finally:
        taps_module._Recorder.before_write = before
    return n


def run(name, model, n_batches, batch_size, repeats):
    names = layer_table(model).names()
    batches = [torch.randn(batch_size, 3, 224, 224, generator=torch.Generator().manual_seed(i))
               for i in range(n_batches)]
    plain(model, batches[:1])  # warm-up
    t = {"plain": [], "taps": [], "copies": []}
    for _ in range(repeats):
        for key, fn in (("plain", lambda: plain(model, batches)),
                        ("taps", lambda: read_all(model, batches, names, False)),
                        ("copies", lambda: read_all(model, batches, names, True))):
            s = time.perf_counter()
            fn()
            t[key].append(time.perf_counter() - s)
    n = n_batches * batch_size
    ips = {k: n / min(v) for k, v in t.items()}
    copies = count_copies(model, batches[0], names)
    print(f"{name}: {len(names)} layers read, {n} images, batch {batch_size}: plain {ips['plain']:.1f} img/s, "
          f"taps {ips['taps']:.1f} img/s ({copies} copies a pass), copy every output {ips['copies']:.1f} img/s; "
          f"taps / plain {ips['taps'] / ips['plain']:.3f}, copies / plain {ips['copies'] / ips['plain']:.3f} "
          f"(best of {repeats})", flush=True)
    return ips["taps"] / ips["plain"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    n_batches, batch_size, repeats = (2, 8, 2) if args.quick else (8, 16, 3)
    print(f"# bench_taps: torch {torch.__version__}, {args.threads} threads", flush=True)
    ratios = [run("ZFNet (random)", zfnet().eval(), n_batches, batch_size, repeats),
              run("SqueezeNet 1.1", squeezenet1_1().eval(), n_batches, batch_size, repeats)]
    print(f"ratio={min(ratios):.3f}")


if __name__ == "__main__":
    main()
