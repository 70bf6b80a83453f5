"""Layer activations: every channel's map, and the fraction of zeros per channel over a folder, checked against
a hand-made model whose channels are known (one follows the red channel, one is dead, one never zero)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from zfnet.cli import main
from zfnet.core.errors import ZfnetError
from zfnet.cs231n.activations import activation_maps, activations, channel_sparsity, maps_grid
from zfnet.data.images import Preprocess, load_image

PRE = Preprocess(resize=36, size=32)


class Known(nn.Module):
    """conv (1x1): channel 0 = the normalized red channel, 1 = -1 everywhere (dead after the ReLU),
    2 = +1 everywhere (never zero); then a ReLU and a classifier."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(3, 2)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[0, 0] = 1.0
            self.conv.bias.copy_(torch.tensor([0.0, -1.0, 1.0]))
        self.eval()

    def forward(self, x):
        return self.fc(self.pool(self.relu(self.conv(x))).flatten(1))


def _folder(root, n=6):
    rng = np.random.default_rng(1)
    root.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(n):
        a = rng.integers(0, 256, (40, 44, 3), dtype=np.uint8)
        if i % 3 == 0:
            a[..., 0] = 0  # no red: the normalized red channel is negative everywhere, channel 0 all zero
        Image.fromarray(a).save(root / f"im{i}.png")
        files.append(root / f"im{i}.png")
    return files


def test_zero_fractions_match_the_brute_force(tmp_path, capsys):
    files = _folder(tmp_path / "imgs")
    red = torch.stack([PRE(load_image(f))[0] for f in files])  # (N, 32, 32): channel 0 before the ReLU
    sp = channel_sparsity(Known(), tmp_path / "imgs", ["relu", "conv"], sparse=0.4, preprocess=PRE, progress=False)
    r = sp.layers["relu"]
    assert sp.images == len(files)
    np.testing.assert_allclose(r["zero_fraction"], [float((red <= 0).double().mean()), 1.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(r["all_zero"], [float((red <= 0).flatten(1).all(1).double().mean()), 1.0, 0.0],
                               atol=1e-6)
    assert r["dead"] == [1]
    assert r["sparse"] == ([0] if (red <= 0).double().mean() >= 0.4 else [])
    np.testing.assert_allclose(r["max"], [float(red.max()), 0.0, 1.0], rtol=1e-6)
    assert r["rectified"] and not sp.layers["conv"]["rectified"]
    # before the ReLU the same channels are counted as values <= 0, and stderr says so
    assert sp.layers["conv"]["dead"] == [1]
    assert "conv has negative values (not rectified)" in capsys.readouterr().err


def test_maps_of_one_image_and_their_grid():
    im = Image.fromarray(np.full((40, 44, 3), 200, np.uint8))
    maps = activation_maps(Known(), im, ["relu"], preprocess=PRE)
    m = maps.maps["relu"]
    x = PRE(im)
    assert m.shape == (3, 32, 32)
    np.testing.assert_allclose(m[0], x[0].clamp_min(0).numpy(), rtol=1e-6)
    assert (m[1] == 0).all() and (m[2] == 1).all()
    picture, vmax = maps_grid(m, tile=32)
    assert picture.shape == (2 * 33 + 1, 2 * 33 + 1, 3)  # 3 maps: 2 x 2 cells of 32 px, 1 px apart
    assert vmax == pytest.approx(float(np.quantile(np.abs(m), 0.999)))
    assert (picture[1:33, 34:66] == 0).all()  # cell 1, the dead channel: black
    assert len(np.unique(picture[34:66, 1:33])) == 1  # cell 2, a constant map: one grey


def test_folder_writes_sparsity_and_maps_and_skips_bad_files(tmp_path, capsys):
    files = _folder(tmp_path / "imgs", n=4)
    (tmp_path / "imgs" / "broken.png").write_bytes(b"not a png")
    r = activations(Known(), tmp_path / "imgs", tmp_path / "out", ["relu"], preprocess=PRE, progress=False)
    assert r["sparsity"]["images"] == 4 and len(r["sparsity"]["skipped"]) == 1
    assert r["file"] == str(files[0]) and r["layers"]["relu"]["figure"] == "relu.png"
    for f in ("result.json", "maps.npz", "relu.png", "sparsity.png"):
        assert (tmp_path / "out" / f).is_file(), f
    saved = json.loads((tmp_path / "out" / "result.json").read_text())
    assert saved["sparsity"]["layers"]["relu"]["dead"] == [1]
    with np.load(tmp_path / "out" / "maps.npz") as z:
        assert z["relu"].shape == (3, 32, 32)


def test_unknown_layer_is_a_clear_error():
    with pytest.raises(ZfnetError, match="unknown layer 'nope'"):
        activation_maps(Known(), Image.new("RGB", (40, 40)), ["nope"], preprocess=PRE)


def test_cli_on_an_image(tmp_path, capsys):
    _folder(tmp_path / "imgs", n=1)
    rc = main(["activations", "--model", "tiny:Tiny", "--weights", "none", str(tmp_path / "imgs" / "im0.png"),
               "--layers", "relu1,relu2", "--out", str(tmp_path / "out"), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and set(out["layers"]) == {"relu1", "relu2"}
    assert out["layers"]["relu1"]["channels"] == 6 and (tmp_path / "out" / "relu2.png").is_file()
    assert out["config"]["model"] == "tiny:Tiny"
