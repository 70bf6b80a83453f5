"""Linear-probe fitting time (Table 7): zfnet's torch L-BFGS probe against scikit-learn, same data, same C.

Data shaped like one Caltech-101 fold of the Table 7 protocol (101 classes x 30 training images, 512-d
pooled features, as SqueezeNet's features.12), drawn at random around class centres so the test accuracy
means something. Fits both classifiers (softmax: LogisticRegression; svm: LinearSVC) with both engines,
prints time and test accuracy, and, last, ratio = scikit-learn seconds / zfnet seconds (higher is better).

    python bench/bench_probes.py --quick   # 40 classes, 256-d: < 2 min on 2 cores
    python bench/bench_probes.py           # the Caltech-101 shape
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from zfnet.generalization.protocol import LinearProbe, _make, mean_class_accuracy  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--C", type=float, default=0.01)
    args = ap.parse_args()
    torch.set_num_threads(1)
    classes, dim = (40, 256) if args.quick else (101, 512)
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 1, (classes, dim))
    ytr, yte = np.repeat(np.arange(classes), 30), np.repeat(np.arange(classes), 20)
    Xtr = (centres[ytr] + rng.normal(0, 3, (len(ytr), dim))).astype(np.float32)
    Xte = (centres[yte] + rng.normal(0, 3, (len(yte), dim))).astype(np.float32)
    total = {"sklearn": 0.0, "torch": 0.0}
    warnings.simplefilter("ignore")
    for kind in ("softmax", "svm"):
        for engine in ("sklearn", "torch"):
            t = time.perf_counter()
            model = LinearProbe(kind, args.C) if engine == "torch" else _make(kind, args.C, 0)
            model.fit(Xtr, ytr)
            dt = time.perf_counter() - t
            total[engine] += dt
            acc = mean_class_accuracy(yte, model.predict(Xte))
            print(f"{kind:8s} {engine:8s} {dt:7.2f} s  test {acc:5.1f} %  ({classes} classes, {dim}-d, C={args.C})")
    print(f"ratio={total['sklearn'] / total['torch']:.2f}")


if __name__ == "__main__":
    main()
