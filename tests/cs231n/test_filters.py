"""Filters of any conv layer: pictures checked pixel by pixel against hand-set weights, and the first layer drawn
exactly as `diagnose` draws it (one mechanism)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from shared_data import SQUEEZENET_WEIGHTS, need_shared
from torch import nn

from zfnet.cli import main
from zfnet.core.errors import ZfnetError
from zfnet.cs231n.filters import filter_pictures
from zfnet.training.diagnosis import diagnose


class Convs(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 2, 3, padding=1)
        self.mix = nn.Conv2d(2, 5, 1)  # 1x1: a weight matrix
        self.depthwise = nn.Conv2d(5, 5, 3, padding=1, groups=5)  # one input channel per filter
        self.relu = nn.ReLU()
        with torch.no_grad():
            for m in (self.conv1, self.conv2):
                m.weight.zero_()
            self.conv1.weight[0, 0, 1, 1] = 1.0  # filter 0: red centre
            self.conv1.weight[1, 2, 0, 0] = -1.0  # filter 1: negative blue corner
            self.conv2.weight[0, 1, 1, 1] = 2.0  # channel 0: input 1 at the centre ...
            self.conv2.weight[0, 0, 0, 0] = -1.0  # ... and input 0, half as strong and negative, at a corner

    def forward(self, x):
        return self.depthwise(self.mix(self.relu(self.conv2(self.relu(self.conv1(x))))))


def _png(path):
    return np.asarray(Image.open(path).convert("RGB"))


def test_first_layer_in_rgb(tmp_path):
    r = filter_pictures(Convs(), tmp_path, ["conv1"])
    info = r["layers"]["conv1"]
    assert info["style"] == "rgb" and info["figure"] == "conv1.png"
    pic = _png(tmp_path / "conv1.png")
    s = 48 // 3  # each weight is a 16 px block, tiles 48 px, 2 x 2 grid 2 px apart
    assert pic.shape == (2 + 2 * 50, 2 + 2 * 50, 3)
    f0 = pic[2:50, 2:50]
    assert tuple(f0[s + 1, s + 1]) == (255, 128, 128)  # + red at the centre (its own max -> white in red)
    assert tuple(f0[0, 0]) == (128, 128, 128)  # zero -> mid grey
    f1 = pic[2:50, 52:100]
    assert tuple(f1[0, 0]) == (128, 128, 0)  # - blue in the corner -> no blue


def test_deeper_layer_one_grid_per_output_channel_on_one_scale(tmp_path):
    r = filter_pictures(Convs(), tmp_path, ["conv2"], tile=30)
    info = r["layers"]["conv2"]
    assert info["style"] == "channels" and info["channels"] == ["conv2/0.png", "conv2/1.png"]
    g = _png(tmp_path / "conv2" / "0.png")
    assert g.shape == (1 + 2 * 31, 1 + 2 * 31, 3)  # 4 inputs: 2 x 2 tiles of 30 px, 1 px apart
    tile0, tile1 = g[1:31, 1:31], g[1:31, 32:62]
    assert tuple(tile1[15, 15]) == (255, 255, 255)  # +2 = the channel's max -> white
    assert tuple(tile0[0, 0]) == (64, 64, 64)  # -1 on the same scale -> 0.25 grey, not black
    assert tuple(tile0[15, 15]) == (128, 128, 128)
    assert (_png(tmp_path / "conv2" / "1.png") == 128).sum() > 0  # an all-zero filter: mid grey
    assert (tmp_path / "conv2.png").is_file()


def test_1x1_and_depthwise_say_how_they_are_drawn(tmp_path, capsys):
    r = filter_pictures(Convs(), tmp_path, ["mix", "depthwise"])
    err = capsys.readouterr().err
    assert r["layers"]["mix"]["style"] == "matrix" and "1x1 convolution" in r["layers"]["mix"]["note"]
    assert r["layers"]["depthwise"]["style"] == "grey"
    assert "mix is a 1x1 convolution" in err and "depthwise has one input channel per filter" in err
    saved = json.loads((tmp_path / "result.json").read_text())
    assert set(saved["layers"]) == {"mix", "depthwise"}


def test_default_is_the_first_conv_and_errors_name_the_conv_layers(tmp_path):
    assert list(filter_pictures(Convs(), tmp_path)["layers"]) == ["conv1"]
    with pytest.raises(ZfnetError, match="a ReLU, not a Conv2d; conv layers: conv1, conv2, mix, depthwise"):
        filter_pictures(Convs(), tmp_path, ["relu"])
    with pytest.raises(ZfnetError, match="'nope': no such layer"):
        filter_pictures(Convs(), tmp_path, ["nope"])


def test_first_layer_picture_is_the_one_diagnose_draws(tmp_path):
    torch.manual_seed(0)
    model = Convs()
    nn.init.normal_(model.conv1.weight)
    filter_pictures(model, tmp_path / "f", ["conv1"])
    diagnose(model, None, tmp_path / "d", progress=False)
    assert np.array_equal(_png(tmp_path / "f" / "conv1.png"), _png(tmp_path / "d" / "layer1_filters.png"))


def test_cli_real_squeezenet_layers(tmp_path, capsys):
    w = str(need_shared(SQUEEZENET_WEIGHTS))
    rc = main(["filters", "--weights", w, "--layers", "features.0,features.3.expand3x3", "--max-channels", "8",
               "--out", str(tmp_path), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert out["layers"]["features.0"]["style"] == "rgb" and out["layers"]["features.0"]["out_channels"] == 64
    e = out["layers"]["features.3.expand3x3"]
    assert e["style"] == "channels" and e["in_channels"] == 16 and len(e["channels"]) == 8
    assert (tmp_path / "features.3.expand3x3" / "7.png").is_file()
