"""Invariance sweeps (Fig. 5): exact transforms, identity gives distance 0, real SqueezeNet, CLI, errors."""

import json

import numpy as np
import pytest
import torch
import torch.nn as nn
from shared_data import SAMPLES, SQUEEZENET_WEIGHTS, need_shared

from zfnet.core.errors import ZfnetError
from zfnet.data.images import Preprocess, load_image
from zfnet.models.networks import squeezenet1_1, zfnet
from zfnet.understanding.invariance import (
    default_layers,
    invariance,
    penultimate_layer,
    render_invariance,
    transform_image,
)


def test_transforms_hand_checked():
    x = torch.arange(36.0).view(1, 6, 6)
    for kind, v in [("translate", 0), ("scale", 1), ("rotate", 0), ("rotate", 360)]:
        assert torch.equal(transform_image(x, kind, v), x)
    down = transform_image(x, "translate", 2)
    assert torch.allclose(down[:, 2:], x[:, :-2], atol=1e-4) and torch.equal(down[:, :2], torch.zeros(1, 2, 6))
    up = transform_image(x, "translate", -1)
    assert torch.allclose(up[:, :-1], x[:, 1:], atol=1e-4) and torch.equal(up[:, -1], torch.zeros(1, 6))
    assert torch.allclose(transform_image(x, "rotate", 90), torch.rot90(x, 1, (-2, -1)), atol=1e-4)
    assert torch.allclose(transform_image(x, "rotate", 180), torch.rot90(x, 2, (-2, -1)), atol=1e-4)
    # zoom 2 about the centre of a 4x4 image whose value is 4*row + col (linear, so bilinear is exact):
    # output pixel i samples input coordinate 1.5 + (i - 1.5) / 2 = 0.75, 1.25, 1.75, 2.25
    z = transform_image(torch.arange(16.0).view(1, 4, 4), "scale", 2)
    c = torch.tensor([0.75, 1.25, 1.75, 2.25])
    assert torch.allclose(z[0], 4 * c[:, None] + c[None, :], atol=1e-4)
    with pytest.raises(ZfnetError, match="unknown transform"):
        transform_image(x, "shear", 1)


def test_penultimate_layer():
    small = dict(widths=(4, 8, 8, 8, 4), fc=8)
    assert penultimate_layer(zfnet(**small)) == "relu7"
    assert penultimate_layer(zfnet(remove=(6, 7), **small)) == "pool5"
    assert penultimate_layer(squeezenet1_1()) == "features.12"
    seq = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(),
                        nn.Linear(4, 2))
    assert penultimate_layer(seq) == "2"
    assert default_layers(zfnet(**small)) == ["relu1", "relu7"]


def test_real_squeezenet_sweeps(squeezenet, tmp_path):
    need_shared(SAMPLES)
    files = [SAMPLES / "n01440764_tench.jpg", SAMPLES / "n02123045_tabby.jpg", tmp_path / "missing.jpg"]
    sweeps = {"translate": [-20, 0, 20], "scale": [1.0, 1.5], "rotate": [0, 90, 360]}  # 8 views / image
    r = invariance(squeezenet, files, labels=[0, 281, 5], sweeps=sweeps)
    assert r.files == [str(f) for f in files[:2]] and r.labels == [0, 281]
    assert len(r.skipped) == 1 and "missing.jpg" in r.skipped[0][1]
    assert r.layers == ["features.1", "features.12"]
    # identity transforms: distance exactly 0 and p(true label) = the plain prediction
    x = torch.stack([Preprocess()(load_image(f)) for f in files[:2]])
    with torch.no_grad():
        p = squeezenet(x).softmax(-1)[[0, 1], [0, 281]].numpy()
    for k, j in [("translate", 1), ("scale", 0), ("rotate", 0), ("rotate", 2)]:
        for name in r.layers:
            assert np.all(r.distance[k][name][:, j] == 0)
        np.testing.assert_allclose(r.prob[k][:, j], p, rtol=1e-5)
    for name in r.layers:
        d = r.distance["translate"][name]
        assert np.all(d[:, [0, 2]] > 0)
        # normalized = raw / the original's norm, the same divisor for every transform of an image
        ratio = r.normalized["rotate"][name][:, 1] / r.distance["rotate"][name][:, 1]
        np.testing.assert_allclose(r.normalized["scale"][name][:, 1] / r.distance["scale"][name][:, 1], ratio)
    render_invariance(r, tmp_path / "inv.png")
    assert (tmp_path / "inv.png").stat().st_size > 1000


def test_bad_inputs(squeezenet, tmp_path):
    img = tmp_path / "empty.jpg"
    img.write_bytes(b"")
    with pytest.raises(ZfnetError, match="unknown layer 'conv5'"):
        invariance(squeezenet, [img], layers=["conv5"])
    with pytest.raises(ZfnetError, match="2 labels for 1 images"):
        invariance(squeezenet, [img], labels=[1, 2])
    with pytest.raises(ZfnetError, match="unknown transform"):
        invariance(squeezenet, [img], sweeps={"shear": [1]})
    r = invariance(squeezenet, [img])
    assert r.files == [] and "empty file" in r.skipped[0][1]


def test_cli(tmp_path):
    from zfnet.cli import main

    img = need_shared(SAMPLES) / "n01440764_tench.jpg"
    out = tmp_path / "inv"
    rc = main(["invariance", "--weights", str(SQUEEZENET_WEIGHTS), str(img), "--label", "0",
               "--translate=-30:30:30", "--scale", "1,1.4", "--rotate", "0,180", "--out", str(out), "--json"])
    assert rc == 0
    res = json.loads((out / "result.json").read_text())
    assert res["schema"] == 1 and res["sweeps"]["translate"] == [-30.0, 0.0, 30.0]
    assert res["distance"]["translate"]["features.1"][0][1] == 0.0
    assert (out / "invariance.png").exists() and (out / "invariance_raw.png").exists()
    assert main(["invariance", "--weights", str(SQUEEZENET_WEIGHTS), str(img), "--rotate", "0:90:0",
                 "--out", str(out)]) == 2
