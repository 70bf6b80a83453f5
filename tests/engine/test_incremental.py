"""The incremental engine (zfnet.engine.incremental / zfnet.engine.locality): exact against full forward passes on
graphs, every padding case, opaque blocks, and the models it must decline."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from zfnet.engine.incremental import Incremental
from zfnet.understanding.occlusion import occluded_outputs, occluder_boxes


class _Region(nn.Module):
    """Slicing then summing: ops the engine runs on full maps."""

    def forward(self, x):
        return x[:, :, 8:16, 20:28].sum((1, 2, 3))[:, None]


class _Block(nn.Module):
    """A ResNet basic block (BatchNorm, residual sum, optional strided shortcut)."""

    def __init__(self, c, stride=1):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(c, c, 3, stride, 1, bias=False), nn.BatchNorm2d(c)
        self.c2, self.b2 = nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c)
        self.down = (nn.Sequential(nn.Conv2d(c, c, 1, stride, bias=False), nn.BatchNorm2d(c)) if stride > 1
                     else nn.Identity())

    def forward(self, x):
        return torch.relu(self.b2(self.c2(torch.relu(self.b1(self.c1(x))))) + self.down(x))


class _ResNetLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 7, 2, 3), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
                                  nn.MaxPool2d(3, 2, 1))
        self.layer1 = nn.Sequential(_Block(8), _Block(8, 2))
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.layer1(self.stem(x))), 1))


def _kinds(model, x, track=None):
    engine = Incremental.build(model, x, track)
    assert engine is not None, "the engine declined a model it should follow"
    return {n.fx.target if n.fx.op == "call_module" else n.fx.name: n.kind for n in engine.nodes}


def _same_as_naive(m, x, size, stride, track=None, rtol=1e-5):
    rows = occluder_boxes(x.shape[-2], size, stride)
    cols = occluder_boxes(x.shape[-1], size, stride)
    boxes = [(a, b, c, d) for a, b in rows for c, d in cols]
    o1, s1 = occluded_outputs(m, x, boxes, track=track, batch_size=16)
    o2, s2 = occluded_outputs(m, x, boxes, track=track, method="naive", batch_size=16)
    assert torch.allclose(o1, o2, rtol=rtol, atol=rtol * o2.abs().max().item())
    if track is not None:
        assert torch.allclose(s1, s2, rtol=rtol, atol=rtol * s2.abs().max().item())
    assert (o2 != o2[0]).any()  # not trivially constant


def test_incremental_equals_naive_resnet_like():
    """A graph, not a chain: BatchNorm, residual sums, strided shortcut, padded max-pool, global average,
    functional flatten; the tracked layer is a block (its output is the residual sum's ReLU)."""
    torch.manual_seed(0)
    m = _ResNetLike().eval()
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.normal_()
            mod.running_var.uniform_(0.5, 2)
    x = torch.randn(1, 3, 64, 64)
    kinds = _kinds(m, x, "layer1.0")
    assert kinds["stem.3"] == kinds["layer1.0.c1"] == kinds["layer1.1.down.0"] == "window"
    assert kinds["add"] == kinds["layer1.0.b1"] == "point"
    assert kinds["pool"] == "mean" and kinds["fc"] == "global"
    _same_as_naive(m, x, 13, 9, track="layer1.0")


class _InplaceBlock(nn.Module):
    """torchvision's residual style: `out += identity` and an in-place ReLU, the input read twice."""

    def __init__(self, c):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.c2(self.relu(self.c1(x)))
        out += x
        return self.relu(out)


def test_in_place_residual_sums():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3), _InplaceBlock(4), _InplaceBlock(4), nn.AdaptiveAvgPool2d(1),
                      nn.Flatten()).double().eval()
    x = torch.randn(1, 3, 30, 30, dtype=torch.float64)
    assert _kinds(m, x)["add"] == "point"  # fx records `out += x` as an add
    _same_as_naive(m, x, 5, 4, track="1", rtol=1e-10)


class _Geometry(nn.Module):
    """Every padding case of the exact crops: 'same' and asymmetric padding, dilation, ceil-mode and
    padded max-pool, average pool counting its zero padding, a non-square stride, grouped conv."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 6, (3, 5), stride=(1, 2), padding=(2, 1))
        self.b = nn.Conv2d(6, 6, 4, padding="same", dilation=2, groups=3)
        self.p = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.q = nn.MaxPool2d(3, 2, padding=1, dilation=1)
        self.r = nn.AvgPool2d(3, 1, padding=1)
        self.fc = nn.Linear(6 * 3 * 3, 4)

    def forward(self, x):
        x = torch.tanh(self.a(x))
        x = self.q(self.p(self.b(x) + x))  # pools see negative values: their padding must be -inf
        x = self.r(x - 0.5)
        return self.fc(F.adaptive_avg_pool2d(x, 3).flatten(1))


@pytest.mark.parametrize("threshold", [0.85, 2.0])  # 2.0: never fall back to full maps, crops everywhere
def test_exact_crops_every_padding_case(threshold, monkeypatch):
    monkeypatch.setattr("zfnet.engine.incremental.THRESHOLD", threshold)
    torch.manual_seed(0)
    m = _Geometry().double().eval()
    x = torch.randn(1, 3, 45, 53, dtype=torch.float64)
    kinds = _kinds(m, x)
    assert {kinds[k] for k in "abpqr"} == {"window"}
    _same_as_naive(m, x, 7, 5, track="p", rtol=1e-10)  # p: ceil-mode pooling of negative values


class _Opaque(nn.Module):
    """Python control flow on values: torch.fx cannot trace it, so it stays one opaque module."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        if x.shape[-1] > 1 and bool(x.abs().sum() >= 0):
            x = self.conv(x)
        return torch.relu(x)


@pytest.mark.parametrize("threshold", [0.85, 2.0])
def test_opaque_blocks_are_cropped_on_their_stride_grid(threshold, monkeypatch):
    monkeypatch.setattr("zfnet.engine.incremental.THRESHOLD", threshold)
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3, 2), _Opaque(), nn.MaxPool2d(2), _Opaque(), nn.Flatten(),
                      nn.LazyLinear(3)).double()
    x = torch.randn(1, 3, 41, 41, dtype=torch.float64)
    m(x)
    kinds = _kinds(m, x)
    assert kinds["1"] == kinds["3"] == "box" and kinds["2"] == "window"
    _same_as_naive(m, x, 6, 5, rtol=1e-10)


class _Twice(nn.Module):
    """One opaque module called twice: the layer table knows its first call only."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(_Opaque())

    def forward(self, x):
        return self.blocks[0](self.blocks[0](x)).mean((2, 3))


def test_opaque_module_called_twice_runs_on_full_maps():
    torch.manual_seed(0)
    m = _Twice().double()
    x = torch.randn(1, 4, 24, 24, dtype=torch.float64)
    assert _kinds(m, x)["blocks.0"] == "global"
    _same_as_naive(m, x, 5, 4, rtol=1e-10)


class _Aliased(nn.Module):
    """An in-place ReLU on a tensor another op reads afterwards: the engine must not guess."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        z = torch.relu_(y)
        return (z + y).mean((2, 3))


def test_engine_declines_what_it_cannot_follow():
    torch.manual_seed(0)
    m = _Aliased()
    x = torch.randn(1, 3, 16, 16)
    assert Incremental.build(_Region(), x) is not None  # slicing runs on full maps, but is followed
    assert Incremental.build(m, x) is None
    assert Incremental.build(_ResNetLike().train(), torch.randn(1, 3, 64, 64)) is None  # batch statistics
    _same_as_naive(m, x, 4, 4)  # falls back to full forward passes


def test_squeezenet_is_followed_inside_its_fire_modules():
    """The speed of occlusion on SqueezeNet rests on this: every conv of a Fire module is an exact crop,
    the concatenation a pointwise union, and the global average is incremental."""
    from zfnet.models.networks import squeezenet1_1

    m = squeezenet1_1().eval()
    x = torch.randn(1, 3, 96, 96)
    kinds = _kinds(m, x, "features.12")
    assert kinds["features.12.squeeze"] == kinds["features.12.expand3x3"] == kinds["features.8"] == "window"
    assert kinds["cat_7"] == kinds["features.12.expand3x3_activation"] == "point"
    assert kinds["classifier.3"] == "mean" and kinds["flatten"] == "global"
    _same_as_naive(m, x, 24, 24, track="features.12")
