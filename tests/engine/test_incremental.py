"""The incremental engine (zfnet.engine.incremental / zfnet.engine.locality): exact against full forward passes on
graphs, every padding case, opaque blocks, and the models it must decline."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from tiny import channel_shuffle

from zfnet.engine.incremental import Incremental, Unsupported
from zfnet.engine.occluder import occluded_outputs, occluder_boxes


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


@pytest.fixture
def always_build(monkeypatch):
    """Auto builds the engine however few positions are left (tests of what it does once built)."""
    import zfnet.engine.occluder as occ

    monkeypatch.setattr(occ, "PAYBACK", 0.0)


def _kinds(model, x, track=None):
    """Node kinds by fx node name and by layer name (a module call: "blocks.0", "blocks.0#2")."""
    engine = Incremental.build(model, x, [track] if track else [])
    out = {n.fx.name: n.kind for n in engine.nodes}
    out.update({name: engine.nodes[i].kind for name, i in engine.calls.items()})
    return out


def _same_as_naive(m, x, size, stride, track=None, rtol=1e-5, method="incremental"):
    """The engine's outputs (and tracked totals) equal full forward passes; returns how it ran."""
    rows = occluder_boxes(x.shape[-2], size, stride)
    cols = occluder_boxes(x.shape[-1], size, stride)
    boxes = [(a, b, c, d) for a, b in rows for c, d in cols]
    tracks = [track] if track is not None else []
    fast = occluded_outputs(m, x, boxes, tracks=tracks, batch_size=16, method=method)
    slow = occluded_outputs(m, x, boxes, tracks=tracks, method="naive", batch_size=16)
    if method == "incremental":  # the engine itself ran every position: no fallback hides a failure
        assert fast.method == "incremental" and fast.positions["naive"] == 0, fast.reason
    o1, o2 = fast.outputs, slow.outputs
    assert torch.allclose(o1, o2, rtol=rtol, atol=rtol * o2.abs().max().item())
    for s1, s2 in zip(fast.tracks, slow.tracks):
        assert torch.allclose(s1, s2, rtol=rtol, atol=rtol * s2.abs().max().item())
    assert (o2 != o2[0]).any()  # not trivially constant
    return fast


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


def test_opaque_module_called_twice_is_cropped_at_each_call():
    """Each call is its own graph node, with its receptive field measured on its own input."""
    torch.manual_seed(0)
    m = _Twice().double()
    x = torch.randn(1, 4, 24, 24, dtype=torch.float64)
    kinds = _kinds(m, x)
    assert kinds["blocks.0"] == kinds["blocks.0#2"] == "box"
    _same_as_naive(m, x, 5, 4, rtol=1e-10, track="blocks.0#2")


class _Aliased(nn.Module):
    """An in-place ReLU on a tensor another op reads afterwards: the engine must not guess."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        z = torch.relu_(y)
        return (z + y).mean((2, 3))


def test_engine_declines_what_it_cannot_follow(always_build):
    torch.manual_seed(0)
    m = _Aliased()
    x = torch.randn(1, 3, 16, 16)
    Incremental.build(_Region(), x)  # slicing runs on full maps, but is followed
    with pytest.raises(Unsupported, match="does not reproduce"):
        Incremental.build(m, x)
    with pytest.raises(Unsupported, match="training mode"):  # batch statistics
        Incremental.build(_ResNetLike().train(), torch.randn(1, 3, 64, 64))
    ran = _same_as_naive(m, x, 4, 4, method="auto")  # falls back to full forward passes, and says so
    assert ran.method == "naive" and "cannot follow" in ran.reason and ran.positions["naive"] == 16


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


class _BufferViewNet(nn.Module):
    """`x + buffer -> conv -> .view(-1, 8)`: a one-channel image (so channels-last and contiguous look the
    same to PyTorch) and a view that needs the model's own memory layout."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.fc = nn.Linear(8, 4)
        self.register_buffer("offset", torch.linspace(0, 1, 16).view(1, 1, 4, 4))

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x + self.offset)).view(-1, 8))


def test_view_after_a_one_channel_conv_does_not_crash():
    torch.manual_seed(0)
    m = _BufferViewNet().eval()
    x = torch.randn(1, 1, 4, 4)
    _same_as_naive(m, x, 2, 1)


class _PositionalBias(nn.Module):
    """A constant map added to the image (a positional bias): pointwise, the constant cropped with the window."""

    def __init__(self):
        super().__init__()
        self.register_buffer("bias", torch.randn(1, 3, 24, 24))
        self.conv, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x + self.bias)).mean((2, 3)))


def test_constant_maps_are_cropped_with_the_window():
    torch.manual_seed(0)
    m = _PositionalBias().double().eval()
    x = torch.randn(1, 3, 24, 24, dtype=torch.float64)
    kinds = _kinds(m, x)
    assert kinds["add"] == "point" and kinds["conv"] == "window" and kinds["mean"] == "mean"
    _same_as_naive(m, x, 5, 3, rtol=1e-10)


class _Bottleneck(nn.Module):
    """torchvision's Bottleneck: one ReLU module called three times, `out += identity`."""

    def __init__(self, c):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv3, self.bn3 = nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += identity
        return self.relu(out)


@pytest.mark.parametrize("track", ["1.relu", "1.relu#2", "1.relu#3", "2.relu#3", "1"])
def test_a_module_called_three_times_is_three_nodes(track):
    """Each call of the shared ReLU is its own node; `name#k` is the k-th call (the layer table's names)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 6, 3, 2, 1), _Bottleneck(6), _Bottleneck(6), nn.AdaptiveAvgPool2d(1),
                      nn.Flatten(), nn.Linear(6, 3)).double().eval()
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.normal_()
            mod.running_var.uniform_(0.5, 2)
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    kinds = _kinds(m, x, track)
    assert kinds["1.relu"] == kinds["1.relu#2"] == kinds["1.relu#3"] == "point"
    ran = _same_as_naive(m, x, 7, 5, track=track, rtol=1e-10)
    assert ran.method == "incremental"
    with pytest.raises(Unsupported, match="not a module call"):
        Incremental.build(m, x, ["1.relu#4"])


class _ShuffleBlock(nn.Module):
    """ShuffleNetV2's unit (torchvision's code): chunk into two halves, one through a branch, concatenate,
    shuffle the channels through a 5-D view and a transpose."""

    def __init__(self, c):
        super().__init__()
        h = c // 2
        self.branch2 = nn.Sequential(nn.Conv2d(h, h, 1), nn.ReLU(), nn.Conv2d(h, h, 3, padding=1, groups=h),
                                     nn.Conv2d(h, h, 1), nn.ReLU())

    def forward(self, x):
        x1, x2 = x.chunk(2, dim=1)
        return channel_shuffle(torch.cat((x1, self.branch2(x2)), dim=1), 2)


def test_channel_splits_and_shuffles_are_followed():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, 2), _ShuffleBlock(8), _ShuffleBlock(8), nn.AdaptiveAvgPool2d(1),
                      nn.Flatten(), nn.Linear(8, 3)).double().eval()
    x = torch.randn(1, 3, 40, 40, dtype=torch.float64)
    kinds = _kinds(m, x, "2")
    assert kinds["chunk"] == "split" and kinds["getitem"] == "pick" and kinds["cat"] == "point"
    assert kinds["view"] == kinds["transpose"] == kinds["view_1"] == "point"
    _same_as_naive(m, x, 6, 5, track="2", rtol=1e-10)


class _NHWCBlock(nn.Module):
    """ConvNeXt's block: depthwise conv, then LayerNorm / Linear / GELU on channels-last values, a layer
    scale and the residual."""

    def __init__(self, c):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm, self.fc1, self.fc2 = nn.LayerNorm(c), nn.Linear(c, 2 * c), nn.Linear(2 * c, c)
        self.gamma = nn.Parameter(torch.rand(c))

    def forward(self, x):
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.gamma * self.fc2(F.gelu(self.fc1(self.norm(y))))
        return x + y.permute(0, 3, 1, 2)


def test_channels_last_blocks_are_pointwise():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 4, 4), _NHWCBlock(8), _NHWCBlock(8), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                      nn.Linear(8, 3)).double().eval()
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    kinds = _kinds(m, x)
    assert {kinds[k] for k in ("permute", "1.norm", "1.fc1", "gelu", "mul", "permute_1", "add")} == {"point"}
    _same_as_naive(m, x, 12, 8, track="2", rtol=1e-10)


class _Functional(nn.Module):
    """Functional convolution and pooling, a channel slice."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 3, 3, 3))

    def forward(self, x):
        x = F.relu(F.conv2d(x, self.w, padding=1))
        x = F.max_pool2d(x, 3, 2, 1)
        x = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1)[:, :4]
        return x.mean((2, 3))


def test_functional_windows_and_channel_slices():
    torch.manual_seed(0)
    m = _Functional().double()
    x = torch.randn(1, 3, 30, 30, dtype=torch.float64)
    kinds = _kinds(m, x)
    assert kinds["conv2d"] == kinds["max_pool2d"] == kinds["avg_pool2d"] == "window"
    assert kinds["getitem"] == "point" and kinds["mean"] == "mean"
    _same_as_naive(m, x, 6, 4, rtol=1e-10)


class _ShapeCheck(nn.Module):
    """timm VGG's pre-logits: Python control flow on the input's shape, which fx cannot trace."""

    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        if x.shape[-2] < 3 or x.shape[-1] < 3:
            x = F.adaptive_avg_pool2d(x, 3)
        return torch.relu(self.conv(x))


def test_untraceable_modules_become_opaque_calls():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Sequential(_ShapeCheck(4), nn.ReLU()), _ShapeCheck(4),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten()).double().eval()
    x = torch.randn(1, 3, 30, 30, dtype=torch.float64)
    engine = Incremental.build(m, x, ["1.0"])
    assert engine.leaves == ["1.0", "2"]  # only the modules fx cannot trace, not their parents
    kinds = _kinds(m, x)
    assert kinds["1.0"] == kinds["2"] == "box" and kinds["1.1"] == "point"
    _same_as_naive(m, x, 5, 4, track="1.0", rtol=1e-10)


class _SqueezeExcite(nn.Module):
    """A gate computed from the whole map multiplies every position: an occluder anywhere changes all."""

    def __init__(self, c):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 1)

    def forward(self, x):
        x = torch.relu(self.conv(x))
        return x * torch.sigmoid(self.fc(x.mean((2, 3), keepdim=True)))


def test_squeeze_excitation_runs_full_maps_and_auto_says_why(always_build):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3), _SqueezeExcite(4), _SqueezeExcite(4), nn.Conv2d(4, 32, 3),
                      nn.Conv2d(32, 32, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()).double().eval()
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    kinds = _kinds(m, x)
    assert kinds["1.conv"] == "window" and kinds["mul"] == "global" and kinds["2.conv"] == "global"
    ran = _same_as_naive(m, x, 8, 6, rtol=1e-10, method="auto")
    assert ran.method == "naive" and "would still do" in ran.reason
    again = _same_as_naive(m, x, 8, 6, rtol=1e-10, method="auto")  # the next image: known, no build
    assert again.reason == f"{ran.reason} (on an earlier image of this model)"


def _occlude(m, x, size, stride, **kw):
    rows, cols = occluder_boxes(x.shape[-2], size, stride), occluder_boxes(x.shape[-1], size, stride)
    boxes = [(a, b, c, d) for a, b in rows for c, d in cols]
    return occluded_outputs(m, x, boxes, batch_size=8, **kw), boxes


def test_an_exception_inside_the_engine_falls_back_to_full_passes(monkeypatch):
    torch.manual_seed(0)
    m = _ResNetLike().eval()
    x = torch.randn(1, 3, 64, 64)
    slow, _ = _occlude(m, x, 13, 9, method="naive")
    calls = []
    run = Incremental.run

    def flaky(self, boxes, locations=None):
        calls.append(len(boxes))
        if len(calls) == 2:
            raise RuntimeError("view size is not compatible with input tensor's size and stride")
        return run(self, boxes, locations)

    monkeypatch.setattr(Incremental, "run", flaky)
    fast, boxes = _occlude(m, x, 13, 9, method="incremental")
    assert fast.method == "incremental+naive" and fast.positions == {"incremental": calls[0],
                                                                     "naive": len(boxes) - calls[0]}
    assert "failed after" in fast.reason and "view size is not compatible" in fast.reason
    assert torch.allclose(fast.outputs, slow.outputs, rtol=1e-5, atol=1e-5 * slow.outputs.abs().max().item())


class _Clock:
    """A stand-in for time.perf_counter in zfnet.engine.occluder: `cost` seconds per position of each method."""

    def __init__(self, monkeypatch, cost):
        import zfnet.engine.occluder as occ

        self.now, self.cost = 0.0, cost
        clock = self

        class _Time:
            @staticmethod
            def perf_counter():
                return clock.now

            process_time = perf_counter

        monkeypatch.setattr(occ, "time", _Time)
        run, naive = Incremental.run, occ._naive

        def timed_run(engine, boxes, locations=None):
            clock.now += cost["incremental"] * len(boxes)
            return run(engine, boxes, locations)

        def timed_naive(model, x, boxes, *args):
            clock.now += cost["naive"] * len(boxes)
            return naive(model, x, boxes, *args)

        monkeypatch.setattr(Incremental, "run", timed_run)
        monkeypatch.setattr(occ, "_naive", timed_naive)


@pytest.mark.parametrize("incremental,expect", [(1.0, "incremental+naive"), (3.0, "naive")])
def test_auto_keeps_the_method_measured_faster(monkeypatch, incremental, expect):
    """The probe times a few positions both ways and keeps the faster; the full passes' results on the probe
    are kept."""
    torch.manual_seed(0)
    m = _ResNetLike().eval()
    x = torch.randn(1, 3, 64, 64)
    _Clock(monkeypatch, {"incremental": incremental, "naive": 2.0})
    ran, boxes = _occlude(m, x, 13, 9)
    engine = len(boxes) - 8 if expect != "naive" else 0
    assert ran.method == expect and ran.positions == {"incremental": engine, "naive": len(boxes) - engine}
    assert f"{2.0 / incremental:.2f}x the speed of full passes in batches of 8 (timed on 8 probe" in ran.reason


def test_auto_refuses_an_engine_that_disagrees_with_full_passes(monkeypatch, always_build):
    torch.manual_seed(0)
    m = _ResNetLike().eval()
    x = torch.randn(1, 3, 64, 64)
    run = Incremental.run

    def wrong(self, boxes, locations=None):
        out, tracks = run(self, boxes, locations)
        return out + 1.0, tracks

    monkeypatch.setattr(Incremental, "run", wrong)
    slow, _ = _occlude(m, x, 13, 9, method="naive")
    ran, boxes = _occlude(m, x, 13, 9)
    assert ran.method == "naive" and "differed from full passes" in ran.reason
    assert torch.allclose(ran.outputs, slow.outputs, rtol=1e-6, atol=1e-6)  # the engine's answers are not used
