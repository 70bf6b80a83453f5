"""`zfnet probe | fewshot | overlap`: feature generalization, Sec. 5 (Table 7, Fig. 9, Sec. 5.2)."""

from __future__ import annotations

import os
import sys

from .common import (
    add_layers_arg,
    add_list_arg,
    add_model_args,
    choice,
    command,
    emit_json,
    float_range,
    int_range,
    load_from_args,
    nonnegative_int,
    out_dir,
    positive_float,
    positive_int,
    report_skipped,
)


def _probe_common_args(p):
    add_model_args(p)
    p.add_argument("--data", required=True, help="image folder with one subfolder per class (e.g. Caltech-101)")
    p.add_argument("--out", type=out_dir, required=True, help="result folder (result.json)")
    p.add_argument("--folds", type=positive_int, default=5, help="random train/test folds (default: %(default)s)")
    p.add_argument("--max-test", type=positive_int, default=50,
                   help="test images per class at most (default: %(default)s)")
    p.add_argument("--seed", type=int_range(), default=0)
    add_list_arg(p, "--Cs", positive_float, default="0.001,0.01,0.1,1", metavar="C",
                 help="regularization grid, chosen by CV on the train split (default: %(default)s)")
    p.add_argument("--cv", type=int_range(2), default=3, help="CV folds inside the train split (default: %(default)s)")
    p.add_argument("--engine", default="torch", choices=("torch", "sklearn"),
                   help="classifier solver: torch L-BFGS (fast) or scikit-learn (reference)")
    p.add_argument("--scratch", action="store_true",
                   help="also train the same architecture from random init on the train images only")
    p.add_argument("--scratch-size", type=int_range(16, 1024), default=64,
                   help="input size for the from-scratch run, 16..1024 (CPU scale; default: %(default)s)")
    p.add_argument("--scratch-epochs", type=positive_int, default=30)
    p.add_argument("--cache", default=None,
                   help="feature cache folder (default: ~/.cache/zfnet/features; 'none' = no cache)")
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--workers", type=nonnegative_int, default=0, help="image decoding processes")
    p.add_argument("--json", action="store_true", help="print only JSON on stdout")


def _probe_setup(args):
    from ..engine.features import default_cache_dir

    model = load_from_args(args)
    cache = None if args.cache == "none" else (args.cache or default_cache_dir())
    scratch = None
    if args.scratch:
        scratch = {"model": args.model, "size": args.scratch_size, "epochs": args.scratch_epochs,
                   "device": str(next(model.parameters()).device)}
    common = {"max_test": args.max_test, "folds": args.folds, "seed": args.seed, "Cs": args.Cs,
              "cv": args.cv, "scratch": scratch, "cache_dir": cache, "batch_size": args.batch_size,
              "workers": args.workers, "engine": args.engine, "progress": not args.json}
    return model, common


def _probe_args(p):
    from ..engine.features import POOLS
    from ..generalization.protocol import CLASSIFIERS

    _probe_common_args(p)
    add_layers_arg(p, "layers to probe (default: the default feature layers, see `zfnet layers`, and the class scores)")
    add_list_arg(p, "--pool", choice(*POOLS), default="avg", metavar="POOL",
                 help="spatial pooling: max, avg, flatten, or several (default: %(default)s)")
    add_list_arg(p, "--classifiers", choice(*CLASSIFIERS), default="svm,softmax", metavar="CLASSIFIER",
                 help="svm, softmax or both (default: %(default)s)")
    p.add_argument("--per-class", type=positive_int, default=30,
                   help="training images per class (default: %(default)s)")


@command("probe", "Table 7: linear SVM / softmax on each layer's features, Caltech protocol")(_probe_args)
def _probe(args):
    from ..generalization.probes import run_probe

    model, common = _probe_setup(args)
    result = run_probe(model, args.data, args.out, layers=args.layers,
                       pools=args.pool, classifiers=args.classifiers, per_class=args.per_class,
                       **common)
    emit_json(result.to_json()) if args.json else print(result.format())
    return report_skipped(result.skipped)


def _fewshot_args(p):
    from ..engine.features import POOLS
    from ..generalization.protocol import CLASSIFIERS

    _probe_common_args(p)
    add_layers_arg(p, "layers, one curve each", required=True)
    p.add_argument("--pool", default="avg", choices=POOLS)
    p.add_argument("--classifier", default="svm", choices=CLASSIFIERS)
    add_list_arg(p, "--per-class", positive_int, default="1,2,4,6,8,10,15,20,30", metavar="N",
                 help="training images per class, one point each (Fig. 9; default: %(default)s)")


@command("fewshot", "Fig. 9: accuracy against training images per class")(_fewshot_args)
def _fewshot(args):
    from ..generalization.probes import run_fewshot

    model, common = _probe_setup(args)
    result = run_fewshot(model, args.data, args.out, layers=args.layers, pool=args.pool,
                         classifier=args.classifier, per_class=args.per_class, **common)
    if args.json:
        emit_json(result)
    else:
        for name, c in result["curves"].items():
            print(name)
            for n, m, s in zip(c["per_class"], c["mean"], c["std"]):
                print(f"  {n:3d}/class  {m:5.1f} +- {s:.1f}")
        print(f"wrote {os.path.join(args.out, 'fewshot.png')}")
    return report_skipped(result["skipped"])


def _overlap_args(p):
    from ..generalization.overlap import DEFAULT_THRESHOLD

    p.add_argument("dir_a", metavar="DIR_A")
    p.add_argument("dir_b", metavar="DIR_B")
    p.add_argument("--threshold", type=float_range(-1.0, 1.0), default=DEFAULT_THRESHOLD,
                   help="normalized correlation to call a pair a near-duplicate, -1..1 (default: %(default)s)")
    p.add_argument("--size", type=int_range(4, 512), default=32,
                   help="thumbnail side in pixels, 4..512 (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print only JSON on stdout")


@command("overlap", "Sec. 5.2: near-duplicate images between two sets (thumbnail correlation)")(_overlap_args)
def _overlap(args):
    from ..generalization.overlap import find_overlap

    result = find_overlap(args.dir_a, args.dir_b, threshold=args.threshold, size=args.size,
                          progress=not args.json)
    if args.json:
        emit_json(result.to_json())
    else:
        for p in result.pairs:
            print(f"{p['score']:.3f}  {p['a']}  {p['b']}")
        print(f"{len(result.pairs)} pair(s) >= {args.threshold} among {result.n_a} x {result.n_b} images",
              file=sys.stderr)
    # nothing was compared when either side has no readable image
    return report_skipped(result.skipped, min(result.n_a, result.n_b))
