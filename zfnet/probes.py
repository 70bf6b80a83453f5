"""How discriminative is each layer on another dataset (paper Sec. 5.2-5.3, Table 7, Fig. 9).

The ImageNet-trained layers stay fixed; a linear classifier (softmax or linear SVM) is trained on the
pooled features of one layer with N images per class and tested on up to 50 others per class. The score is
the mean of the per-class accuracies, averaged over random folds (mean +- std), as in the Caltech protocol.
Features come from `zfnet.features` (cached), so re-running a probe never touches the network.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .errors import ZfnetError
from .features import Features
from .progress import progress_bar
from .results import text_table

__all__ = [
    "CLASSIFIERS",
    "FEWSHOT_N",
    "LinearProbe",
    "ProbeResult",
    "caltech_folds",
    "fewshot_curve",
    "first_per_class",
    "fit_probe",
    "mean_class_accuracy",
    "plot_fewshot",
    "probe_layers_accuracy",
    "run_fewshot",
    "run_probe",
]

CLASSIFIERS = ("svm", "softmax")
FEWSHOT_N = (1, 2, 4, 6, 8, 10, 15, 20, 30)  # Fig. 9's training images per class
# Inverse regularization strengths tried by cross-validation (features are standardized first, so one
# grid fits every layer).
DEFAULT_CS = (1e-3, 1e-2, 1e-1, 1.0)


# ----------------------------------------------------------------------------------------------------
# The Caltech protocol: folds and the score.
def caltech_folds(labels: Sequence[int], per_class: int, *, max_test: int = 50, folds: int = 5, seed: int = 0,
                  classes: Sequence[str] | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Random train/test splits: `per_class` training images of every class, up to `max_test` test images.

    Each fold shuffles every class with its own seeded generator, so a fold does not depend on the others
    and the same seed gives the same splits. Train indices are grouped by class in shuffled order, so
    `first_per_class(train, labels, n)` is a nested n-shot subset of the same fold.
    Raises ZfnetError naming every class that has fewer than per_class + 1 images.
    """
    labels = np.asarray(labels)
    if per_class < 1:
        raise ZfnetError(f"--per-class must be at least 1, got {per_class}")
    if folds < 1:
        raise ZfnetError(f"--folds must be at least 1, got {folds}")
    ids, counts = np.unique(labels[labels >= 0], return_counts=True)
    if len(ids) < 2:
        raise ZfnetError("a probe needs at least 2 classes (class subfolders of the data folder)")
    short = [(c, n) for c, n in zip(ids, counts) if n < per_class + 1]
    if short:
        name = (lambda c: classes[c]) if classes is not None else str
        listed = ", ".join(f"{name(c)} ({n})" for c, n in short[:20])
        more = f" and {len(short) - 20} more" if len(short) > 20 else ""
        raise ZfnetError(f"{len(short)} class(es) have fewer than {per_class + 1} images ({per_class} to train, "
                         f"at least 1 to test): {listed}{more}")
    out = []
    for f in range(folds):
        train, test = [], []
        for c in ids:
            idx = np.flatnonzero(labels == c)
            idx = idx[np.random.default_rng([seed, f, int(c)]).permutation(len(idx))]
            train.append(idx[:per_class])
            test.append(idx[per_class:per_class + max_test])
        out.append((np.concatenate(train), np.concatenate(test)))
    return out


def first_per_class(train: np.ndarray, labels: Sequence[int], n: int) -> np.ndarray:
    """The first n indices of each class in `train` (keeps the fold's order, so subsets are nested)."""
    labels = np.asarray(labels)
    taken: dict = {}
    keep = []
    for i in train:
        c = int(labels[i])
        if taken.get(c, 0) < n:
            taken[c] = taken.get(c, 0) + 1
            keep.append(i)
    return np.asarray(keep, dtype=np.int64)


def mean_class_accuracy(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    """Mean over classes of the per-class accuracy, in percent (every class counts alike)."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    return float(100.0 * np.mean([np.mean(y_pred[y_true == c] == c) for c in np.unique(y_true)]))


# ----------------------------------------------------------------------------------------------------
# Classifiers.
def _make(kind: str, C: float, seed: int):
    """The scikit-learn reference classifiers (engine="sklearn")."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC

    if kind == "svm":
        clf = LinearSVC(C=C, dual="auto", max_iter=2000, random_state=seed)
    elif kind == "softmax":  # lbfgs on the multinomial loss: the softmax classifier of the paper
        clf = LogisticRegression(C=C, max_iter=500, random_state=seed)
    else:
        raise ZfnetError(f"unknown classifier {kind!r}; use one of {', '.join(CLASSIFIERS)}")
    return make_pipeline(StandardScaler(), clf)


class LinearProbe:
    """Standardize, then a linear classifier trained full-batch with L-BFGS in torch (engine="torch").

    The objectives are scikit-learn's: softmax = LogisticRegression's 0.5|W|^2 + C sum(cross-entropy);
    svm = LinearSVC's one-vs-rest 0.5|W|^2 + C sum(squared hinge) (bias not penalized here). All classes
    train at once in one matrix product per step, and `warm` starts from another probe's weights, so a
    cross-validated grid of C costs little more than one fit. On a shared 2-core machine this is 5-20x
    faster than liblinear / lbfgs in scikit-learn on Caltech-101 (tests check they agree).
    """

    def __init__(self, kind: str, C: float, max_iter: int = 60, tol: float = 1e-4):
        if kind not in CLASSIFIERS:
            raise ZfnetError(f"unknown classifier {kind!r}; use one of {', '.join(CLASSIFIERS)}")
        self.kind, self.C, self.max_iter, self.tol = kind, float(C), max_iter, tol

    def fit(self, X: np.ndarray, y: np.ndarray, warm: "LinearProbe | None" = None) -> "LinearProbe":
        self.classes_, yi = np.unique(y, return_inverse=True)
        self.mean_ = X.mean(0)
        self.scale_ = X.std(0)
        self.scale_[self.scale_ < 1e-8] = 1.0  # constant features (dead units) stay zero
        Xt = torch.from_numpy(((X - self.mean_) / self.scale_).astype(np.float32))
        n, d, k = len(Xt), Xt.shape[1], len(self.classes_)
        yt = torch.from_numpy(yi)
        W = torch.zeros(d + 1, k)
        if warm is not None and warm.W_.shape == W.shape:
            W.copy_(warm.W_)
        W.requires_grad_(True)
        sign = torch.full((n, k), -1.0)
        sign[torch.arange(n), yt] = 1.0
        reg = 1.0 / (self.C * n)  # the objective divided by C * n: same minimizer, better scaled

        # Loose tolerances: test accuracy settles long before the objective's last digits (checked against
        # scikit-learn's converged solutions in tests/test_probes.py).
        opt = torch.optim.LBFGS([W], lr=1, max_iter=self.max_iter, history_size=10, tolerance_grad=self.tol,
                                tolerance_change=self.tol * 1e-3, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            scores = Xt @ W[:-1] + W[-1]
            if self.kind == "softmax":
                data = torch.nn.functional.cross_entropy(scores, yt, reduction="sum") / n
            else:
                data = (1 - sign * scores).clamp_min(0).pow(2).sum() / n
            loss = data + 0.5 * reg * W[:-1].pow(2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        self.W_ = W.detach()
        return self

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        Xt = torch.from_numpy(((X - self.mean_) / self.scale_).astype(np.float32))
        return (Xt @ self.W_[:-1] + self.W_[-1]).numpy()

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.classes_[self.decision_function(X).argmax(1)]


def fit_probe(X: np.ndarray, y: np.ndarray, kind: str = "svm", *, Cs: Sequence[float] = DEFAULT_CS,
              cv: int = 3, seed: int = 0, engine: str = "torch"):
    """Standardize, then fit a linear classifier with C chosen by stratified CV on (X, y) alone.

    With fewer than 2 images of some class there is nothing to cross-validate: the middle of the grid is
    used. engine "torch" (LinearProbe, fast) or "sklearn" (LinearSVC / LogisticRegression, the reference).
    Returns (fitted classifier with .predict, chosen C).
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.model_selection import StratifiedKFold

    if engine not in ("torch", "sklearn"):
        raise ZfnetError(f"unknown engine {engine!r}; use 'torch' or 'sklearn'")
    Cs = sorted(Cs)  # strongest regularization first: each fit warm-starts the next
    folds = min(cv, int(np.unique(y, return_counts=True)[1].min())) if len(y) else 0

    def fit(c, Xf, yf, warm=None):
        if engine == "torch":
            return LinearProbe(kind, c).fit(Xf, yf, warm)
        return _make(kind, c, seed).fit(Xf, yf)

    with warnings.catch_warnings():
        # Capped iterations on the weakest-regularized C are expected; the CV score already judges them.
        warnings.simplefilter("ignore", ConvergenceWarning)
        if len(Cs) == 1 or folds < 2:
            C = Cs[len(Cs) // 2]
        else:
            skf = StratifiedKFold(folds, shuffle=True, random_state=seed)
            scores = np.zeros(len(Cs))
            for tr, va in skf.split(X, y):
                model = None
                for j, c in enumerate(Cs):
                    model = fit(c, X[tr], y[tr], model)
                    scores[j] += mean_class_accuracy(y[va], model.predict(X[va]))
            C = Cs[int(np.argmax(scores))]  # ties -> the smallest C (strongest regularization)
        return fit(C, X, y), C


# ----------------------------------------------------------------------------------------------------
# Per-layer probes (Table 7) and the few-shot curve (Fig. 9).
@dataclass
class ProbeResult:
    """Accuracy (mean of per-class accuracies, %) per layer and classifier over folds."""

    config: dict
    scores: dict  # layer -> classifier -> {"mean", "std", "folds": [...], "C": [...]}
    skipped: list = field(default_factory=list)
    scratch: dict | None = None  # from-scratch baseline: {"mean", "std", "folds", "config"}

    def to_json(self) -> dict:
        out = {"schema": 1, "config": self.config, "layers": self.scores, "skipped": self.skipped}
        if self.scratch is not None:
            out["scratch"] = self.scratch
        return out

    def format(self) -> str:
        kinds = list(dict.fromkeys(k for v in self.scores.values() for k in v))
        rows = [("layer", *kinds)]
        for layer, v in self.scores.items():
            rows.append((layer, *(f"{v[k]['mean']:.1f} +- {v[k]['std']:.1f}" if k in v else "-" for k in kinds)))
        if self.scratch is not None:
            rows.append(("from scratch", f"{self.scratch['mean']:.1f} +- {self.scratch['std']:.1f}",
                         *[""] * (len(kinds) - 1)))
        return "\n".join(text_table(rows))


def _summary(accs: list[float], Cs: list[float] | None = None) -> dict:
    out = {"mean": float(np.mean(accs)), "std": float(np.std(accs)), "folds": [float(a) for a in accs]}
    if Cs is not None:
        out["C"] = Cs
    return out


def _labelled(features: Features) -> np.ndarray:
    y = np.asarray(features.labels)
    if len(y) == 0 or (y < 0).all():
        raise ZfnetError("probes need labelled images: a data folder with one subfolder per class")
    return y


def probe_layers_accuracy(features: Features, layers: Sequence[str] | None = None, *, pool: str | None = None,
                          classifiers: Sequence[str] = CLASSIFIERS, per_class: int = 30, max_test: int = 50,
                          folds: int = 5, seed: int = 0, Cs: Sequence[float] = DEFAULT_CS, cv: int = 3,
                          engine: str = "torch", progress: bool = True) -> ProbeResult:
    """Table 7: train each classifier on each layer's features, Caltech protocol over `folds` folds."""

    y = _labelled(features)
    layers = list(layers or features.layers)
    splits = caltech_folds(y, per_class, max_test=max_test, folds=folds, seed=seed, classes=features.classes)
    scores: dict = {}
    bar = progress_bar(total=len(layers) * len(classifiers) * folds, desc="probes", enabled=progress)
    try:
        for layer in layers:
            X = features.get(layer, pool)
            scores[layer] = {}
            for kind in classifiers:
                accs, chosen = [], []
                for train, test in splits:
                    model, C = fit_probe(X[train], y[train], kind, Cs=Cs, cv=cv, seed=seed, engine=engine)
                    accs.append(mean_class_accuracy(y[test], model.predict(X[test])))
                    chosen.append(C)
                    bar.update()
                scores[layer][kind] = _summary(accs, chosen)
    finally:
        bar.close()
    config = {"per_class": per_class, "max_test": max_test, "folds": folds, "seed": seed, "pool": pool,
              "classifiers": list(classifiers), "Cs": list(Cs), "cv": cv, "engine": engine, "n_images": len(y),
              "n_classes": len(np.unique(y)), "features": features.config}
    return ProbeResult(config, scores, list(features.skipped))


def fewshot_curve(features: Features, layer: str, *, pool: str | None = None, classifier: str = "svm",
                  per_class: Sequence[int] = FEWSHOT_N, max_test: int = 50, folds: int = 5, seed: int = 0,
                  Cs: Sequence[float] = DEFAULT_CS, cv: int = 3, engine: str = "torch",
                  progress: bool = True) -> dict:
    """Fig. 9: accuracy against training images per class, one fixed test set per fold for every N.

    Each fold draws max(per_class) training images per class and its test images once; N-shot training
    sets are nested prefixes of that draw, so the curve moves only with N.
    Returns {"per_class": [...], "mean": [...], "std": [...], "folds": [[...] per N], "C": [[...]]}.
    """

    y = _labelled(features)
    ns = sorted({int(n) for n in per_class})
    splits = caltech_folds(y, max(ns), max_test=max_test, folds=folds, seed=seed, classes=features.classes)
    X = features.get(layer, pool)
    out = {"layer": layer, "pool": pool, "classifier": classifier, "per_class": ns, "mean": [], "std": [],
           "folds": [], "C": []}
    with progress_bar(total=len(ns) * folds, desc="few-shot", enabled=progress) as bar:
        for n in ns:
            accs, chosen = [], []
            for train, test in splits:
                sub = first_per_class(train, y, n)
                model, C = fit_probe(X[sub], y[sub], classifier, Cs=Cs, cv=cv, seed=seed, engine=engine)
                accs.append(mean_class_accuracy(y[test], model.predict(X[test])))
                chosen.append(C)
                bar.update()
            s = _summary(accs)
            out["mean"].append(s["mean"])
            out["std"].append(s["std"])
            out["folds"].append(s["folds"])
            out["C"].append(chosen)
    return out


def plot_fewshot(curves: dict, path: str | Path, title: str = "") -> Path:
    """Fig. 9 as a PNG: mean +- std accuracy against training images per class, one line per curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .results import atomic_path

    fig, ax = plt.subplots(figsize=(5.5, 4), dpi=120)
    for name, c in curves.items():
        ax.errorbar(c["per_class"], c["mean"], yerr=c["std"], marker="o", ms=3, capsize=2, label=name)
    ax.set_xlabel("training images per class")
    ax.set_ylabel("mean per-class accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return Path(path)


# ----------------------------------------------------------------------------------------------------
# Result folders (what `zfnet probe` and `zfnet fewshot` write).
def run_probe(model: torch.nn.Module, data, out: str | Path, *, layers: Sequence[str] | None = None,
              pools: Sequence[str] = ("avg",), classifiers: Sequence[str] = CLASSIFIERS, per_class: int = 30,
              max_test: int = 50, folds: int = 5, seed: int = 0, Cs: Sequence[float] = DEFAULT_CS, cv: int = 3,
              scratch: dict | None = None, cache_dir=None, batch_size: int = 32, workers: int = 0,
              engine: str = "torch", progress: bool = True) -> ProbeResult:
    """Table 7 end to end: features (cached), probes per layer, pooling and classifier, optionally the
    from-scratch baseline (`scratch` = kwargs of `zfnet.scratch.scratch_baseline` plus "model"), written to
    `out/result.json`. With several pools, rows are named "layer/pool".
    """
    from .features import extract_features
    from .results import write_json

    t0 = time.time()
    feats = extract_features(model, data, layers, pool=tuple(pools), batch_size=batch_size, workers=workers,
                             cache_dir=cache_dir, progress=progress)
    t1 = time.time()
    scores, result = {}, None
    for pool in pools:
        result = probe_layers_accuracy(feats, layers or feats.layers, pool=pool, classifiers=classifiers,
                                       per_class=per_class, max_test=max_test, folds=folds, seed=seed, Cs=Cs,
                                       cv=cv, engine=engine, progress=progress)
        for layer, v in result.scores.items():
            scores[layer if len(pools) == 1 else f"{layer}/{pool}"] = v
    result.scores = scores
    result.config["pool"] = list(pools)
    t2 = time.time()
    if scratch:
        from .scratch import scratch_baseline

        kw = dict(scratch)
        spec = kw.pop("model")
        splits = caltech_folds(feats.labels, per_class, max_test=max_test, folds=folds, seed=seed,
                               classes=feats.classes)
        result.scratch = scratch_baseline(spec, feats.paths, feats.labels, splits, seed=seed, progress=progress,
                                          **kw)
    result.config["seconds"] = {"features": round(t1 - t0, 1), "probes": round(t2 - t1, 1),
                                "scratch": round(time.time() - t2, 1)}
    result.config["data"] = str(data)
    write_json(Path(out) / "result.json", result.to_json())
    return result


def run_fewshot(model: torch.nn.Module, data, out: str | Path, *, layers: Sequence[str], pool: str = "avg",
                classifier: str = "svm", per_class: Sequence[int] = FEWSHOT_N, max_test: int = 50,
                folds: int = 5, seed: int = 0, Cs: Sequence[float] = DEFAULT_CS, cv: int = 3,
                scratch: dict | None = None, cache_dir=None, batch_size: int = 32, workers: int = 0,
                engine: str = "torch", progress: bool = True) -> dict:
    """Fig. 9 end to end: one curve per layer (and optionally from scratch), `out/result.json` and
    `out/fewshot.png`."""
    from .features import extract_features
    from .results import write_json

    t0 = time.time()
    ns = sorted({int(n) for n in per_class})
    feats = extract_features(model, data, layers, pool=pool, batch_size=batch_size, workers=workers,
                             cache_dir=cache_dir, progress=progress)
    curves = {}
    for layer in layers:
        curves[f"{classifier} on {layer} ({pool})"] = fewshot_curve(
            feats, layer, pool=pool, classifier=classifier, per_class=per_class, max_test=max_test, folds=folds,
            seed=seed, Cs=Cs, cv=cv, engine=engine, progress=progress)
    if scratch:
        from .scratch import decode_all, scratch_baseline

        kw = dict(scratch)
        spec = kw.pop("model")
        splits = caltech_folds(feats.labels, max(ns), max_test=max_test, folds=folds, seed=seed,
                               classes=feats.classes)
        curve = {"per_class": ns, "mean": [], "std": [], "folds": []}
        images = decode_all(feats.paths, kw.get("size", 64), progress)
        for n in ns:
            s = scratch_baseline(spec, feats.paths, feats.labels,
                                 [(first_per_class(tr, feats.labels, n), te) for tr, te in splits], seed=seed,
                                 images=images, progress=progress, **kw)
            for k in ("mean", "std", "folds"):
                curve[k].append(s[k])
        curve["config"] = s["config"]
        curves["from scratch"] = curve
    config = {"data": str(data), "layers": list(layers), "pool": pool, "classifier": classifier,
              "per_class": ns, "max_test": max_test, "folds": folds,
              "seed": seed, "Cs": list(Cs), "cv": cv, "engine": engine, "features": feats.config,
              "seconds": round(time.time() - t0, 1)}
    result = {"schema": 1, "config": config, "curves": curves, "skipped": feats.skipped}
    write_json(Path(out) / "result.json", result)
    plot_fewshot(curves, Path(out) / "fewshot.png", title=f"{Path(str(data)).name}: {folds} fold(s)")
    return result
