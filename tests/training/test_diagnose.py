"""Fig. 6 measures on hand-made filters with known answers, and one end-to-end diagnosis."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from zfnet.training.diagnosis import aliasing_share, diagnose, domination, frequency_bands, near_zero

K = 8  # even support, so a checkerboard is exactly periodic on it


def low_filter():  # a broad Gaussian blob, the same in every colour channel
    y, x = torch.meshgrid(torch.arange(K) - 3.5, torch.arange(K) - 3.5, indexing="ij")
    g = torch.exp(-(x ** 2 + y ** 2) / (2 * 3.0 ** 2))
    return g.expand(3, K, K).clone()


def checkerboard():
    y, x = torch.meshgrid(torch.arange(K), torch.arange(K), indexing="ij")
    return ((-1.0) ** (x + y)).expand(3, K, K).clone()


def mid_filter(k=8):  # a grating at 0.1875 cycles/pixel along x (the middle of the mid band), tapered
    y, x = torch.meshgrid(torch.arange(k) - (k - 1) / 2, torch.arange(k) - (k - 1) / 2, indexing="ij")
    taper = torch.hann_window(k, periodic=False)
    return (torch.cos(2 * math.pi * 0.1875 * x) * taper[None, :] * taper[:, None]).expand(3, k, k).clone()


def bank():
    return torch.stack([low_filter(), checkerboard(), torch.zeros(3, K, K), mid_filter()])


def test_frequency_bands_hand_made():
    b = frequency_bands(bank())
    low, check, zero, mid = b
    assert low[0] > 0.9 and low[2] < 0.03  # the blob (truncated by the 8x8 support): low
    assert check[2] > 0.97  # the checkerboard: (0.5, 0.5) cycles/pixel, r = 0.71
    assert torch.isnan(zero).all()  # an all-zero filter has no spectrum
    assert mid[1] == mid.max()  # the grating: mostly mid (8 taps spread it: a short filter is broadband)
    wide = frequency_bands(mid_filter(24)[None])[0]
    assert wide[1] > 0.9  # with 24 taps the same grating is narrowband: almost all mid
    torch.testing.assert_close(b[[0, 1, 3]].sum(1), torch.ones(3))
    # brute force: the band shares of the checkerboard from a plain numpy DFT of the zero-padded filter
    p = (np.abs(np.fft.fft2(checkerboard().numpy(), s=(64, 64))) ** 2).sum(0)
    f = np.fft.fftfreq(64)
    r = np.sqrt(f[:, None] ** 2 + f[None, :] ** 2)
    assert check[2].item() == pytest.approx(p[r >= 0.25].sum() / p.sum(), rel=1e-5)


def test_near_zero_and_domination():
    w = bank()
    assert near_zero(w).tolist() == [False, False, True, False]
    rms = w.flatten(1).pow(2).mean(1).sqrt()
    assert domination(w) == pytest.approx((rms.max() / rms.median()).item())
    same = torch.randn(6, 3, 5, 5)
    same = same / same.flatten(1).pow(2).mean(1).sqrt().view(-1, 1, 1, 1)
    assert domination(same) == pytest.approx(1.0)
    same[2] *= 30  # one filter dominating
    assert domination(same) == pytest.approx(30.0)


def test_aliasing_share_hand_made():
    n = 32
    y, x = torch.meshgrid(torch.arange(n) - 15.5, torch.arange(n) - 15.5, indexing="ij")
    blob = torch.exp(-(x ** 2 + y ** 2) / (2 * 5.0 ** 2)).expand(3, n, n)
    check = ((-1.0) ** (torch.arange(n)[:, None] + torch.arange(n)[None, :])).expand(3, n, n)
    grating = torch.cos(2 * math.pi * 0.2 * x).expand(3, n, n)  # 0.2 c/px: folded by stride 4, not by 2
    a = aliasing_share(torch.stack([blob, check, grating]), stride=4)
    assert a[0] < 0.01 and a[1] > 0.99 and a[2] > 0.95
    a2 = aliasing_share(torch.stack([blob, check, grating]), stride=2)
    assert a2[0] < 0.01 and a2[1] > 0.99 and a2[2] < 0.05
    assert torch.isnan(aliasing_share(torch.ones(1, 3, n, n), 2)).all()  # a constant has no power left


class TwoConv(nn.Module):
    """conv1 with the hand-made bank (+ a filter never active), conv2, as a tiny 'network'."""

    feature_layers = ("relu1", "relu2")

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 5, K, stride=2)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(5, 4, 3, stride=1)
        self.relu2 = nn.ReLU()
        with torch.no_grad():
            self.conv1.weight[:4] = bank()
            self.conv1.weight[4] = low_filter()
            self.conv1.bias.zero_()
            self.conv1.bias[4] = -1e6  # never active
            torch.manual_seed(0)
            self.conv2.weight.normal_(0, 0.3)
            self.conv2.bias.fill_(0.1)

    def forward(self, x):
        return self.relu2(self.conv2(self.relu1(self.conv1(x))))


def test_diagnose_end_to_end(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3)).astype(np.uint8)).save(tmp_path / f"{i}.png")
    from zfnet.data.images import Preprocess

    model = TwoConv().eval()
    d = diagnose(model, tmp_path, tmp_path / "out", preprocess=Preprocess(size=32, resize=32), progress=False)
    assert d.stride1 == 2 and d.filters == 5
    assert d.dead_near_zero == [2]
    assert d.dead_never_active == [2, 4]  # the zero filter (output exactly 0) and the negative bias
    assert d.images == 4
    r = json.loads((tmp_path / "out" / "result.json").read_text())
    assert r["schema"] == 1 and r["dead"] == [2, 4]
    assert set(r["domination"]) == {"conv1", "conv2"}
    assert 0 <= r["layer2"]["aliasing"] <= 1
    # every live layer-2 unit counts, border units included (their patches are zero-padded to the field)
    assert r["layer2"]["units"] == 4 - len(r["layer2"]["dead_never_active"])
    for png in ("layer1_filters.png", "layer2_features.png"):
        assert Image.open(tmp_path / "out" / png).size[0] > 20
