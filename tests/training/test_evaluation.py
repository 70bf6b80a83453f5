"""Ensembles and Table 2: softmax averaged over models and crops, checked against hand computations and a
brute force that preprocesses every crop on its own; the table and the `evaluate` / `predict` commands."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image
from tiny import message_lines

from zfnet.cli import main as cli
from zfnet.core.errors import ZfnetError
from zfnet.data.images import Preprocess, list_images, load_image
from zfnet.data.trainset import split_per_class
from zfnet.models.predict import average_probs, predict
from zfnet.models.weights import Weights
from zfnet.training.checkpoints import model_from_checkpoint, preprocess_for, save_checkpoint
from zfnet.training.evaluation import evaluate_models, format_table
from zfnet.training.networks import build_model


class Const(nn.Module):
    """The same logits for every image (and crop)."""

    def __init__(self, logits):
        super().__init__()
        self.logits = nn.Parameter(torch.tensor(logits, dtype=torch.float32), requires_grad=False)

    def forward(self, x):
        return self.logits.expand(x.shape[0], -1)


class MeanNet(nn.Module):
    """Logits [3m, -3m, 0] of the input's mean m: shows which input (which mean image) a member saw."""

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1), requires_grad=False)

    def forward(self, x):
        m = x.mean((1, 2, 3))
        return torch.stack([3 * m, -3 * m, torch.zeros_like(m)], 1)


def softmax(v):
    e = np.exp(np.asarray(v, float) - max(v))
    return e / e.sum()


def test_average_of_softmax_not_of_logits_by_hand():
    a, b, c = [10.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 3.0, 0.0]
    x = torch.zeros(2, 3, 8, 8)
    got = average_probs([Const(a), Const(b), Const(c)], x)
    want = (softmax(a) + softmax(b) + softmax(c)) / 3  # [0.365, 0.603, 0.032]: class 1 wins
    np.testing.assert_allclose(got.numpy(), np.stack([want, want]), rtol=1e-6)
    assert got[0].argmax() == 1 and np.argmax(np.mean([a, b, c], 0)) == 0  # averaged logits would say class 0
    # over crops, then models: (N, K, C, H, W)
    crops = torch.zeros(2, 10, 3, 8, 8)
    np.testing.assert_allclose(average_probs([Const(a), Const(b)], crops).numpy(),
                               np.stack([(softmax(a) + softmax(b)) / 2] * 2), rtol=1e-6)


def test_predict_ensemble_each_member_sees_its_own_preprocessing(tmp_path):
    Image.new("RGB", (20, 24), (128, 128, 128)).save(tmp_path / "grey.png")
    v = 128 / 255
    m1, m2 = MeanNet(), MeanNet()
    p1 = Preprocess(preset="paper", size=16, resize=18, mean_image=torch.full((3, 18, 18), 0.2))
    p2 = Preprocess(preset="paper", size=16, resize=18, mean_image=torch.full((3, 18, 18), 0.7))
    res = predict([m1, m2], tmp_path / "grey.png", preprocess=[p1, p2], progress=False, k=3)
    want = (softmax([3 * (v - 0.2), -3 * (v - 0.2), 0]) + softmax([3 * (v - 0.7), -3 * (v - 0.7), 0])) / 2
    got = {t["index"]: t["prob"] for t in res.predictions[0].top5}
    np.testing.assert_allclose([got[i] for i in range(3)], want, rtol=1e-5)
    # one model alone is the plain prediction; an ensemble of one copy twice is the same
    one = predict(m1, tmp_path / "grey.png", preprocess=[p1], progress=False, k=3).predictions[0].top5
    two = predict([m1, m1], tmp_path / "grey.png", preprocess=[p1, p1], progress=False, k=3).predictions[0].top5
    assert [t["index"] for t in one] == [t["index"] for t in two]
    np.testing.assert_allclose([t["prob"] for t in one], [t["prob"] for t in two], rtol=1e-6)
    with pytest.raises(ZfnetError, match="different input sizes"):
        predict([m1, m2], tmp_path / "grey.png", preprocess=[p1, replace(p2, size=12)], progress=False)
    with pytest.raises(ZfnetError, match="different numbers of classes"):
        predict([Const([0.0, 1.0]), Const([0.0, 1.0, 2.0])], tmp_path / "grey.png", progress=False)


# ----------------------------------------------------------------------------------------------------
def _folder(root, classes=3, per_class=4):
    rng = np.random.default_rng(1)
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(per_class):
            a = rng.integers(0, 256, (30 + 2 * i, 34, 3)).astype(np.uint8)
            a[..., c % 3] = np.clip(a[..., c % 3].astype(int) + 60, 0, 255)
            Image.fromarray(a).save(root / f"c{c}" / f"{i}.png")
    return root


def _nets(n=3, classes=7):
    out = []
    for s in range(n):
        torch.manual_seed(s)
        m = nn.Sequential(nn.Conv2d(3, 4, 5, 2), nn.ReLU(), nn.Flatten(), nn.LazyLinear(classes))
        m(torch.zeros(1, 3, 24, 24))
        with torch.no_grad():
            m[3].weight.mul_(30)  # confident, disagreeing members: the table's rows differ
        out.append(m.eval())
    return out


def _brute_force(models, pres, paths, labels):
    """Errors (%) per row [(1 crop top-1, top-5), (10 crops top-1, top-5)], every crop preprocessed alone."""
    rows = [[[0, 0], [0, 0]] for _ in range(len(models) + 1)]
    for p, y in zip(paths, labels):
        im = load_image(p)
        one = [m(replace(pre, crop="center")(im)[None])[0].softmax(-1) for m, pre in zip(models, pres)]
        ten = [torch.stack([m(c[None])[0].softmax(-1) for c in replace(pre, crop="ten")(im)]).mean(0)
               for m, pre in zip(models, pres)]
        for r in range(len(models) + 1):
            for c, probs in enumerate((one, ten)):
                q = probs[r] if r < len(models) else sum(probs) / len(models)
                top = q.topk(min(5, len(q))).indices.tolist()
                rows[r][c][0] += top[0] == y
                rows[r][c][1] += y in top
    return [[[100 * (1 - k / len(paths)) for k in crop] for crop in row] for row in rows]


@torch.no_grad()
def test_table2_errors_by_brute_force(tmp_path, capsys):
    data = _folder(tmp_path / "val")
    models = _nets()
    pres = [Preprocess(size=24, resize=28) for _ in models]
    res = evaluate_models(models, data, names=["a", "b", "c"], preprocess=pres, progress=False, out=tmp_path / "o")
    assert "folder i (sorted) is taken as output i" in capsys.readouterr().err  # no class names: by order
    paths, labels, _ = list_images(data)
    want = _brute_force(models, pres, paths, labels)
    assert [r["model"] for r in res["rows"]] == ["a", "b", "c", "average of 3"]
    for r, row in enumerate(res["rows"]):
        got = [[row["top1_1crop"], row["top5_1crop"]], [row["top1_10crops"], row["top5_10crops"]]]
        np.testing.assert_allclose(got, want[r], atol=1e-9, err_msg=row["model"])
    # the test can tell the rows apart: members, crops and the ensemble do not all agree
    assert len({(r["top1_1crop"], r["top1_10crops"]) for r in res["rows"]}) > 1
    assert res["images"] == 12 and res["classes"] == 3
    table = (tmp_path / "o" / "table.md").read_text()
    assert table.strip() == format_table(res["rows"]) and table.count("\n") == 6
    assert table.splitlines()[-1].startswith("| average of 3 |")
    assert json.loads((tmp_path / "o" / "result.json").read_text())["rows"] == res["rows"]
    # the held-out share of a per-class split
    held = evaluate_models(models[:1], data, preprocess=pres[:1], progress=False, train_per_class=3)
    _, te = split_per_class(labels, 3, 0)
    w1 = _brute_force(models[:1], pres[:1], [paths[i] for i in te], [labels[i] for i in te])
    assert held["images"] == 3 and len(held["rows"]) == 1  # one model: no ensemble row
    assert held["rows"][0]["top1_10crops"] == pytest.approx(w1[0][1][0])


def test_classes_matched_by_name(tmp_path):
    data = _folder(tmp_path / "val", classes=2)
    (m,) = _nets(1, classes=3)
    pre = Preprocess(size=24, resize=28)
    m.zfnet_weights = Weights(categories=("zz", "c1", "c0"))  # folder c0 is output 2, c1 is output 1
    res = evaluate_models(m, data, preprocess=[pre], progress=False)
    paths, labels, _ = list_images(data)
    want = _brute_force([m], [pre], paths, [{0: 2, 1: 1}[y] for y in labels])
    assert res["rows"][0]["top1_1crop"] == pytest.approx(want[0][0][0])
    assert res["rows"][0]["top1_10crops"] == pytest.approx(want[0][1][0])
    m.zfnet_weights = Weights(categories=("x", "y", "z"))
    with pytest.raises(ZfnetError, match="name their classes differently"):
        evaluate_models([m, replace_categories(m, ("p", "q", "r"))], data, progress=False)


def replace_categories(model, cats):
    import copy

    other = copy.deepcopy(model)
    other.zfnet_weights = Weights(categories=cats)
    return other


def _checkpoint(path, seed, classes):
    torch.manual_seed(seed)
    arch = {"model": "zfnet", "widths": [4, 6, 6, 6, 4], "fc": 8, "num_classes": len(classes), "crop": 48,
            "resize": 52, "init_std": 0.3, "dropout": 0.0}
    model = build_model(arch)
    mean = torch.full((3, 52, 52), 0.3 + 0.1 * seed)
    save_checkpoint({"model": model.state_dict(), "arch": arch, "mean_image": mean, "categories": list(classes)},
                    path)
    return path


def test_cli_evaluate_and_predict_ensembles_of_checkpoints(tmp_path, capsys):
    data = _folder(tmp_path / "val", classes=3, per_class=2)
    w = [str(_checkpoint(tmp_path / f"{i}.pth", i, ["c0", "c1", "c2"])) for i in range(2)]
    assert cli(["evaluate", "--data", str(data), "--weights", w[0], "--weights", w[1], "--out", str(tmp_path / "t"),
                "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    models = [model_from_checkpoint(p) for p in w]
    pres = [preprocess_for(m) for m in models]
    assert pres[0].size == 48 and not torch.equal(pres[0].mean_image, pres[1].mean_image)
    lib = evaluate_models(models, data, names=w, preprocess=pres, progress=False)
    assert out["rows"] == lib["rows"] and [r["model"] for r in out["rows"]] == w + ["average of 2"]
    paths, labels, _ = list_images(data)
    want = _brute_force(models, pres, paths, labels)
    assert out["rows"][2]["top1_10crops"] == pytest.approx(want[2][1][0])
    assert (tmp_path / "t" / "table.md").is_file()
    # predict: the same ensemble, 10 crops
    assert cli(["predict", "--model", "auto", "--weights", w[0], "--weights", w[1], "--ten-crop", "--json",
                str(data / "c1")]) == 0
    got = json.loads(capsys.readouterr().out)
    lib = predict(models, data / "c1", crop="ten", preprocess=pres, progress=False)
    assert got == lib.to_json() and got[0]["top5"][0]["label"] in ("c0", "c1", "c2")
    im = load_image(paths[2])
    by_hand = sum(torch.stack([m(c[None])[0].softmax(-1) for c in replace(p, crop="ten")(im)]).mean(0)
                  for m, p in zip(models, pres)) / 2
    assert got[0]["top5"][0]["prob"] == pytest.approx(by_hand.max().item(), rel=1e-5)


def test_cli_evaluate_bad_input_is_one_line(tmp_path, capsys):
    w = str(_checkpoint(tmp_path / "a.pth", 0, ["c0", "c1", "c2"]))
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.new("RGB", (60, 60)).save(flat / "x.png")
    for argv, msg in [(["--data", str(flat), "--weights", w], "has no class subfolders"),
                      (["--data", str(_folder(tmp_path / "v4", classes=4, per_class=1)), "--weights", w],
                       "4 class folders but the models predict 3 classes"),
                      (["--data", str(flat)], "--model auto needs --weights CHECKPOINT")]:
        assert cli(["evaluate", "--out", str(tmp_path / "o")] + argv) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and len(message_lines(err)) == 1 and msg in err, err
