"""The Caltech protocol of Sec. 5.2 and the linear classifiers the probes train (Table 7, Fig. 9).

Folds: N random training images per class, up to 50 others per class for testing. Score: the mean of the
per-class accuracies. Classifiers: a softmax or a linear SVM on standardized features, with C chosen by
cross-validation on the training images alone; a fast torch L-BFGS implementation and scikit-learn's as the
reference.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch

from ..core.errors import ZfnetError

__all__ = ["CLASSIFIERS", "DEFAULT_CS", "LinearProbe", "caltech_folds", "first_per_class", "fit_probe",
           "mean_class_accuracy"]

CLASSIFIERS = ("svm", "softmax")
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
