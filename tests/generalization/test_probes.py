"""Per-layer probes, the Caltech fold sampler, feature extraction + cache, the from-scratch loop, the CLI."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image
from shared_data import SQUEEZENET_WEIGHTS, need_shared

from zfnet.cli import main
from zfnet.core.errors import ZfnetError
from zfnet.engine import features as features_mod
from zfnet.engine.features import Features, extract_features, pool_tensor, probe_layers
from zfnet.generalization.probes import fewshot_curve, plot_fewshot, probe_layers_accuracy
from zfnet.generalization.protocol import LinearProbe, caltech_folds, first_per_class, fit_probe, mean_class_accuracy


# ----------------------------------------------------------------------------------------------------
# The fold sampler.
def _labels(counts):
    return np.repeat(np.arange(len(counts)), counts)


def test_folds_per_class_test_cap_disjoint_and_seeded():
    y = _labels([31, 40, 90, 120])
    splits = caltech_folds(y, 30, max_test=50, folds=5, seed=3)
    assert len(splits) == 5
    for train, test in splits:
        assert np.bincount(y[train]).tolist() == [30, 30, 30, 30]
        assert np.bincount(y[test]).tolist() == [1, 10, 50, 50]  # the rest, capped at 50
        assert not set(train) & set(test)
        assert len(set(train)) == len(train) and len(set(test)) == len(test)
    again = caltech_folds(y, 30, max_test=50, folds=5, seed=3)
    assert all((a[0] == b[0]).all() and (a[1] == b[1]).all() for a, b in zip(splits, again))
    other = caltech_folds(y, 30, max_test=50, folds=5, seed=4)
    assert any(set(a[0]) != set(b[0]) for a, b in zip(splits, other))
    assert set(splits[0][0]) != set(splits[1][0])  # folds differ from each other


def test_nested_fewshot_subsets():
    y = _labels([40, 40, 40])
    train, _ = caltech_folds(y, 30, folds=1, seed=0)[0]
    prev = set()
    for n in (1, 2, 4, 10, 30):
        sub = first_per_class(train, y, n)
        assert np.bincount(y[sub]).tolist() == [n, n, n]
        assert prev <= set(sub)
        prev = set(sub)


def test_too_few_images_names_the_classes():
    y = _labels([31, 12, 40, 30])
    with pytest.raises(ZfnetError, match=r"2 class\(es\) have fewer than 31 images.*bonsai \(12\), cup \(30\)"):
        caltech_folds(y, 30, classes=["ant", "bonsai", "chair", "cup"])
    with pytest.raises(ZfnetError, match="at least 2 classes"):
        caltech_folds(_labels([50]), 30)


def test_mean_class_accuracy_matches_sklearn():
    from sklearn.metrics import balanced_accuracy_score

    rng = np.random.default_rng(0)
    t, p = rng.integers(0, 5, 200), rng.integers(0, 5, 200)
    assert mean_class_accuracy(t, p) == pytest.approx(100 * balanced_accuracy_score(t, p))
    assert mean_class_accuracy([0, 0, 0, 1], [0, 0, 0, 0]) == 50.0  # not the 75 % of plain accuracy


# ----------------------------------------------------------------------------------------------------
# Probes on features where one layer carries the label and another does not.
def _synthetic(n_classes=5, per_class=30, dim=20, seed=0):
    rng = np.random.default_rng(seed)
    y = _labels([per_class] * n_classes)
    centers = rng.normal(0, 1, (n_classes, dim)) * 3
    good = (centers[y] + rng.normal(0, 1, (len(y), dim))).astype(np.float32)
    bad = rng.normal(0, 1, (len(y), dim)).astype(np.float32)
    arrays = {("good", "avg"): good, ("bad", "avg"): bad}
    return Features(arrays, [f"{i}.jpg" for i in range(len(y))], y, [f"c{i}" for i in range(n_classes)])


def test_probe_finds_the_informative_layer():
    feats = _synthetic()
    r = probe_layers_accuracy(feats, per_class=10, folds=2, Cs=(0.1,), progress=False)  # CV: see below
    chance = 100 / 5
    for kind in ("svm", "softmax"):
        assert r.scores["good"][kind]["mean"] > 95
        assert r.scores["bad"][kind]["mean"] < chance + 20
        assert len(r.scores["good"][kind]["folds"]) == 2
        assert all(c in r.config["Cs"] for c in r.scores["good"][kind]["C"])
    assert "good" in r.format() and json.dumps(r.to_json())


def test_fit_probe_grid_and_one_shot():
    feats = _synthetic(dim=5)
    X, y = feats.get("good"), feats.labels
    model, C = fit_probe(X[::3], y[::3], "softmax", Cs=[0.5])
    assert C == 0.5 and model.predict(X[:2]).shape == (2,)
    one = first_per_class(np.arange(len(y)), y, 1)  # one image per class: nothing to cross-validate
    _, C1 = fit_probe(X[one], y[one], "svm", Cs=[1e-3, 1e-2, 1e-1])
    assert C1 == 1e-2  # the middle of the grid
    _, C2 = fit_probe(X, y, "svm", Cs=[1e-3, 1e-2, 1e-1])
    assert C2 in (1e-3, 1e-2, 1e-1)


def test_torch_probe_matches_scikit_learn():
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC

    rng = np.random.default_rng(0)
    y = _labels([40, 40, 40, 40])
    X = (rng.normal(0, 1, (4, 12))[y] + rng.normal(0, 1.5, (160, 12))).astype(np.float32) * 5 + 3
    Xs = StandardScaler().fit_transform(X)
    for C in (0.01, 1.0):
        # Softmax: the same objective as LogisticRegression (intercept unpenalized in both): same weights.
        ours = LinearProbe("softmax", C, max_iter=2000, tol=1e-9).fit(X, y)
        ref = LogisticRegression(C=C, tol=1e-10, max_iter=5000).fit(Xs, y)
        np.testing.assert_allclose(ours.W_[:-1].numpy().T, ref.coef_, atol=2e-3 * max(1, np.abs(ref.coef_).max()))
        # Linear SVM: LinearSVC's squared hinge, one-vs-rest; a large intercept_scaling makes its bias
        # penalty vanish, as in ours.
        svm = LinearProbe("svm", C, max_iter=2000, tol=1e-9).fit(X, y)
        ref_svm = LinearSVC(C=C, dual=False, tol=1e-8, max_iter=10000, intercept_scaling=1000).fit(Xs, y)
        assert np.mean(svm.predict(X) == ref_svm.predict(Xs)) > 0.95
        np.testing.assert_allclose(svm.W_[:-1].numpy().T, ref_svm.coef_, atol=0.01 * np.abs(ref_svm.coef_).max())
    # The default (loose) tolerances predict as the converged solution does.
    fast = LinearProbe("softmax", 0.1).fit(X, y)
    assert np.mean(fast.predict(X) == LogisticRegression(C=0.1).fit(Xs, y).predict(Xs)) > 0.97
    # And the scikit-learn engine runs through the same protocol.
    feats = _synthetic()
    r = probe_layers_accuracy(feats, ["good"], per_class=10, folds=1, Cs=(0.1,), engine="sklearn", progress=False)
    assert r.scores["good"]["svm"]["mean"] > 95


def test_fewshot_curve_rises_and_plots(tmp_path):
    feats = _synthetic(dim=40, seed=1)
    feats.arrays[("good", "avg")] = feats.arrays[("good", "avg")] * 0.3 + np.random.default_rng(2).normal(
        0, 1, feats.arrays[("good", "avg")].shape).astype(np.float32)
    c = fewshot_curve(feats, "good", per_class=(1, 4, 15), folds=2, progress=False)
    assert c["per_class"] == [1, 4, 15] and len(c["mean"]) == 3
    assert c["mean"][2] > c["mean"][0]
    png = plot_fewshot({"good": c}, tmp_path / "f.png")
    assert Image.open(png).size[0] > 100


# ----------------------------------------------------------------------------------------------------
# Feature extraction and its cache.
class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 4, 5, stride=4)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(4, 6, 3, stride=2)
        self.relu2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(self.pool(self.relu2(self.conv2(self.relu1(self.conv1(x))))).flatten(1))


def _folder(root, n_classes=3, per_class=4, size=48):
    rng = np.random.default_rng(0)
    for c in range(n_classes):
        d = root / f"class{c}"
        d.mkdir(parents=True)
        for i in range(per_class):
            a = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
            a[..., c] = 255  # the class is the dominant colour
            Image.fromarray(a).save(d / f"{i}.png")
    return root


def test_extract_pools_match_a_manual_forward(tmp_path):
    from zfnet.data.images import ImageDataset, Preprocess

    root = _folder(tmp_path / "imgs")
    (root / "class1" / "broken.jpg").write_bytes(b"not a jpeg")
    model = Tiny().eval()
    f = extract_features(model, root, ["relu1", "relu2", "fc"], pool=("max", "avg", "flatten"), batch_size=5,
                         progress=False)
    assert len(f.paths) == 12 and len(f.skipped) == 1 and "broken.jpg" in f.skipped[0][0]
    assert f.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    ds = ImageDataset(f.paths, transform=Preprocess())
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    with torch.no_grad():
        a1 = torch.relu(model.conv1(x))
        a2 = torch.relu(model.conv2(a1))
        out = model(x)
    np.testing.assert_allclose(f.get("relu1", "max"), a1.amax((2, 3)).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(f.get("relu2", "avg"), a2.mean((2, 3)).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(f.get("relu2", "flatten"), a2.flatten(1).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(f.get("fc", "max"), out.numpy(), rtol=1e-5, atol=1e-6)  # 2-D: unpooled
    with pytest.raises(ZfnetError, match="no features for layer 'conv9'"):
        f.get("conv9", "max")
    with pytest.raises(ZfnetError, match="unknown pooling"):
        pool_tensor(a1, "median")


def test_cache_reruns_without_the_network_and_resumes(tmp_path, monkeypatch):
    root = _folder(tmp_path / "imgs", per_class=5)
    model, cache = Tiny().eval(), tmp_path / "cache"
    full = extract_features(model, root, ["relu2"], pool="avg", batch_size=4, progress=False)

    # A run killed after its first checkpoint resumes from the partial file, and the result is identical.
    calls = {"n": 0}
    real = features_mod.run_with_taps

    def dies_after_two(*a, **kw):
        calls["n"] += 1
        if calls["n"] > 2:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(features_mod, "run_with_taps", dies_after_two)
    with pytest.raises(KeyboardInterrupt):
        extract_features(model, root, ["relu2"], pool="avg", batch_size=4, cache_dir=cache, checkpoint_every=4,
                         progress=False)
    assert list(cache.glob("*.partial.npz"))
    calls["n"] = -100
    resumed = extract_features(model, root, ["relu2"], pool="avg", batch_size=4, cache_dir=cache,
                               progress=False)
    assert calls["n"] == -100 + 2  # 15 images, 8 done before the kill: two batches left
    np.testing.assert_array_equal(resumed.get("relu2"), full.get("relu2"))
    assert resumed.paths == full.paths and not list(cache.glob("*.partial.npz"))

    # Now fully cached: no forward pass at all.
    monkeypatch.setattr(features_mod, "run_with_taps", lambda *a, **kw: pytest.fail("network was run"))
    again = extract_features(model, root, ["relu2"], pool="avg", cache_dir=cache, progress=False)
    np.testing.assert_array_equal(again.get("relu2"), full.get("relu2"))
    # More layers: computed once and merged into the same file; then any subset comes from the cache.
    monkeypatch.setattr(features_mod, "run_with_taps", real)
    extract_features(model, root, ["relu1"], pool="max", cache_dir=cache, progress=False)
    assert len(list(cache.glob("*.npz"))) == 1
    monkeypatch.setattr(features_mod, "run_with_taps", lambda *a, **kw: pytest.fail("network was run"))
    sub = extract_features(model, root, ["relu2"], pool="avg", cache_dir=cache, progress=False)
    np.testing.assert_array_equal(sub.get("relu2"), full.get("relu2"))
    assert extract_features(model, root, ["relu1"], pool="max", cache_dir=cache, progress=False).layers == ["relu1"]
    # Other weights are another cache entry.
    with torch.no_grad():
        model.conv2.bias.add_(1.0)
    with pytest.raises(pytest.fail.Exception):
        extract_features(model, root, ["relu2"], pool="avg", cache_dir=cache, progress=False)


def test_squeezenet_class_scores_equal_the_model_output(imagenet_samples):
    from zfnet.models.weights import load_model

    model = load_model("squeezenet1_1", str(need_shared(SQUEEZENET_WEIGHTS)))
    layers = probe_layers(model)
    assert layers[0] == "features.1" and layers[-1] == "classifier.3"
    paths = sorted(imagenet_samples.iterdir())[:3]
    f = extract_features(model, paths, ["features.12", "classifier.3"], pool="avg", progress=False)
    from zfnet.data.images import ImageDataset, Preprocess

    ds = ImageDataset(paths, transform=Preprocess.for_model(model))
    with torch.no_grad():
        logits = model(torch.stack([ds[i][0] for i in range(3)]))
    np.testing.assert_allclose(f.get("classifier.3"), logits.numpy(), rtol=1e-4, atol=1e-4)
    assert f.get("classifier.3").argmax(1).tolist() == [0, 1, 2]  # file i has class i; these three are right
    assert f.get("features.12").shape == (3, 512)


# ----------------------------------------------------------------------------------------------------
# From scratch, and the CLI.
def test_from_scratch_learns_colour_classes():
    from zfnet.generalization.scratch import train_from_scratch

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    y = _labels([20, 20, 20])
    imgs = torch.from_numpy(rng.integers(0, 100, (60, 3, 16, 16), dtype=np.uint8))
    for i, c in enumerate(y):
        imgs[i, c] += 120
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
    train, test = caltech_folds(y, 10, folds=1)[0]
    acc = train_from_scratch(model, imgs, y, train, test, epochs=15, batch_size=10, lr=1e-2, progress=False)
    assert acc > 90


def test_cli_probe_fewshot_and_bad_input(tmp_path, capsys):
    weights = str(need_shared(SQUEEZENET_WEIGHTS))
    root = _folder(tmp_path / "imgs", per_class=5, size=40)
    out = tmp_path / "out"
    rc = main(["probe", "--model", "squeezenet1_1", "--weights", weights, "--data", str(root), "--layers",
               "features.1,classifier.3", "--per-class", "2", "--folds", "2", "--Cs", "0.1,1",
               "--cache", str(tmp_path / "cache"), "--out", str(out), "--json"])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    saved = json.loads((out / "result.json").read_text())
    assert printed == saved and saved["schema"] == 1
    for layer in ("features.1", "classifier.3"):
        for kind in ("svm", "softmax"):
            s = saved["layers"][layer][kind]
            assert set(s) >= {"mean", "std", "folds"} and len(s["folds"]) == 2 and 0 <= s["mean"] <= 100
    assert saved["layers"]["features.1"]["svm"]["mean"] > 60  # the dominant colour is plain in layer 1

    rc = main(["fewshot", "--model", "squeezenet1_1", "--weights", weights, "--data", str(root), "--layers",
               "features.1", "--per-class", "1,4", "--folds", "1", "--cache", str(tmp_path / "cache"),
               "--scratch", "--scratch-size", "32", "--scratch-epochs", "1", "--out", str(tmp_path / "few")])
    assert rc == 0 and (tmp_path / "few" / "fewshot.png").exists()
    few = json.loads((tmp_path / "few" / "result.json").read_text())
    assert few["curves"]["svm on features.1 (avg)"]["per_class"] == [1, 4]
    scratch = few["curves"]["from scratch"]
    assert len(scratch["mean"]) == 2 and scratch["config"]["pretrained"] is False

    capsys.readouterr()
    rc = main(["probe", "--model", "squeezenet1_1", "--weights", weights, "--data", str(root), "--per-class",
               "5", "--layers", "features.1", "--cache", "none", "--out", str(tmp_path / "o2")])
    err = capsys.readouterr().err
    assert rc == 2 and "3 class(es) have fewer than 6 images" in err and "class0 (5)" in err
    assert "Traceback" not in err


def test_fewshot_scratch_baseline_refuses_a_file_that_stopped_decoding(tmp_path, monkeypatch):
    """The baseline decodes again the files the features came from; one that no longer decodes (changed
    since) must stop the run with its name, not be trained on as an all-zero picture."""
    import zfnet.generalization.scratch  # noqa: F401 (the module, for monkeypatch)
    from zfnet.generalization.probes import run_fewshot

    root = _folder(tmp_path / "imgs", per_class=4)
    real = sys.modules["zfnet.generalization.scratch"].load_image

    def changed_since(path):
        if Path(path).name == "2.png" and Path(path).parent.name == "class1":
            raise ZfnetError(f"cannot read {path}: truncated")
        return real(path)

    monkeypatch.setattr(sys.modules["zfnet.generalization.scratch"], "load_image", changed_since)
    with pytest.raises(ZfnetError, match="2.png"):
        run_fewshot(Tiny().eval(), root, tmp_path / "out", layers=["relu2"], per_class=[1, 2], folds=1,
                    scratch={"model": "squeezenet1_1", "size": 32, "epochs": 1}, progress=False)
