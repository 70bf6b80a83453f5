"""How discriminative is each layer on another dataset (paper Sec. 5.2-5.3, Table 7, Fig. 9).

The ImageNet-trained layers stay fixed; a linear classifier (softmax or linear SVM) is trained on the
pooled features of one layer with N images per class and tested on up to 50 others per class. The score is
the mean of the per-class accuracies, averaged over random folds (mean +- std), as in the Caltech protocol.
Features come from `zfnet.engine.features` (cached), so re-running a probe never touches the network.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..core.errors import NoInputError, ZfnetError
from ..core.progress import progress_bar
from ..core.results import text_table, write_json
from ..engine.features import Features, extract_features
from ..present.render import save_figure
from .protocol import CLASSIFIERS, DEFAULT_CS, caltech_folds, first_per_class, fit_probe, mean_class_accuracy
from .scratch import decode_all, scratch_baseline

__all__ = ["FEWSHOT_N", "ProbeResult", "fewshot_curve", "plot_fewshot", "plot_probe", "probe_layers_accuracy",
           "run_fewshot", "run_probe"]

FEWSHOT_N = (1, 2, 4, 6, 8, 10, 15, 20, 30)  # Fig. 9's training images per class


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
    if len(y) == 0 and features.skipped:
        raise NoInputError(f"no readable image ({len(features.skipped)} could not be read)", features.skipped)
    if len(y) == 0 or (y < 0).all():
        raise ZfnetError("probes need labelled images: a data folder with one subfolder per class")
    return y


def _folds(features: Features, labels, per_class: int, **kw) -> list:
    """caltech_folds over the readable images; when too few are left because some could not be read, the
    error carries those (NoInputError: the CLI lists them)."""
    try:
        return caltech_folds(labels, per_class, classes=features.classes, **kw)
    except ZfnetError as e:
        if not features.skipped:
            raise
        raise NoInputError(f"{e}; {len(features.skipped)} image(s) could not be read", features.skipped) from None


def probe_layers_accuracy(features: Features, layers: Sequence[str] | None = None, *, pool: str | None = None,
                          classifiers: Sequence[str] = CLASSIFIERS, per_class: int = 30, max_test: int = 50,
                          folds: int = 5, seed: int = 0, Cs: Sequence[float] = DEFAULT_CS, cv: int = 3,
                          engine: str = "torch", progress: bool = True) -> ProbeResult:
    """Table 7: train each classifier on each layer's features, Caltech protocol over `folds` folds."""

    y = _labelled(features)
    layers = list(layers or features.layers)
    splits = _folds(features, y, per_class, max_test=max_test, folds=folds, seed=seed)
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
    splits = _folds(features, y, max(ns), max_test=max_test, folds=folds, seed=seed)
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

    fig, ax = plt.subplots(figsize=(5.5, 4), dpi=120)
    for name, c in curves.items():
        ax.errorbar(c["per_class"], c["mean"], yerr=c["std"], marker="o", ms=3, capsize=2, label=name)
    ax.set_xlabel("training images per class")
    return _accuracy_axes(fig, ax, path, title)


def _accuracy_axes(fig, ax, path, title: str) -> Path:
    """The accuracy axis both probe plots share, then the PNG."""
    ax.set_ylabel("mean per-class accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    return save_figure(fig, path, dpi=None)


def plot_probe(scores: dict, path: str | Path, title: str = "") -> Path:
    """Table 7 as a PNG: mean +- std accuracy of each classifier on each layer, shallow to deep."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(scores)
    kinds = list(dict.fromkeys(k for v in scores.values() for k in v))
    fig, ax = plt.subplots(figsize=(max(5.5, 0.6 * len(layers) + 2), 4), dpi=100)
    for k in kinds:
        xs = [i for i, layer in enumerate(layers) if k in scores[layer]]
        ax.errorbar(xs, [scores[layers[i]][k]["mean"] for i in xs], yerr=[scores[layers[i]][k]["std"] for i in xs],
                    marker="o", ms=3, capsize=2, label=k)
    ax.set_xticks(range(len(layers)))
    ax.set_xticklabels(layers, rotation=45, ha="right", fontsize=7)
    return _accuracy_axes(fig, ax, path, title)


# ----------------------------------------------------------------------------------------------------
# Result folders (what `zfnet probe` and `zfnet fewshot` write).
def run_probe(model: torch.nn.Module, data, out: str | Path, *, layers: Sequence[str] | None = None,
              pools: Sequence[str] = ("avg",), classifiers: Sequence[str] = CLASSIFIERS, per_class: int = 30,
              max_test: int = 50, folds: int = 5, seed: int = 0, Cs: Sequence[float] = DEFAULT_CS, cv: int = 3,
              scratch: dict | None = None, cache_dir=None, batch_size: int = 32, workers: int = 0,
              engine: str = "torch", progress: bool = True) -> ProbeResult:
    """Table 7 end to end: features (cached), probes per layer, pooling and classifier, optionally the
    from-scratch baseline (`scratch` = kwargs of `zfnet.generalization.scratch.scratch_baseline` plus
    "model"), written to `out/result.json`. With several pools, rows are named "layer/pool".
    """
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
        kw = dict(scratch)
        spec = kw.pop("model")
        splits = _folds(feats, feats.labels, per_class, max_test=max_test, folds=folds, seed=seed)
        result.scratch = scratch_baseline(spec, feats.paths, feats.labels, splits, seed=seed, progress=progress,
                                          **kw)
    result.config["seconds"] = {"features": round(t1 - t0, 1), "probes": round(t2 - t1, 1),
                                "scratch": round(time.time() - t2, 1)}
    result.config["data"] = str(data)
    write_json(Path(out) / "result.json", result.to_json())
    plot_probe(result.scores, Path(out) / "probes.png", title=f"{Path(str(data)).name}: {per_class} per class, "
               f"{folds} fold(s)")
    return result


def run_fewshot(model: torch.nn.Module, data, out: str | Path, *, layers: Sequence[str], pool: str = "avg",
                classifier: str = "svm", per_class: Sequence[int] = FEWSHOT_N, max_test: int = 50,
                folds: int = 5, seed: int = 0, Cs: Sequence[float] = DEFAULT_CS, cv: int = 3,
                scratch: dict | None = None, cache_dir=None, batch_size: int = 32, workers: int = 0,
                engine: str = "torch", progress: bool = True) -> dict:
    """Fig. 9 end to end: one curve per layer (and optionally from scratch), `out/result.json` and
    `out/fewshot.png`."""
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
        kw = dict(scratch)
        spec = kw.pop("model")
        splits = _folds(feats, feats.labels, max(ns), max_test=max_test, folds=folds, seed=seed)
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
