"""The projection engine against Captum, hand-computed answers, and itself (cropped vs uncropped)."""

import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from zfnet.core.errors import ZfnetError
from zfnet.engine.project import project
from zfnet.inspect.layers import layer_table, parse_unit, run_with_taps
from zfnet.models.networks import zfnet

captum = pytest.importorskip("captum.attr")
CAPTUM = {"deconv": "NeuronDeconvolution", "guided": "NeuronGuidedBackprop", "saliency": "NeuronGradient"}


def captum_projection(ref_model, x, units, mode, layout=torch.contiguous_format):
    """Captum's neuron attribution of units of one layer on a 1-image x, one row per unit, seeded as ours
    (the unit's activation, or its whole map): the selector is sum(a * a.detach()), whose gradient seed is a.
    layout: the memory format of Captum's input."""
    units = [parse_unit(u) for u in units]
    layer = dict(ref_model.named_modules())[units[0].layer]

    def sel(o):
        ts = [o[b, u.channel] if u.y is None else o[b, u.channel, u.y, u.x] for b, u in enumerate(units)]
        return torch.stack([(t * t.detach()).sum() for t in ts])

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return getattr(captum, CAPTUM[mode])(ref_model, layer).attribute(
            x.expand(len(units), -1, -1, -1).contiguous(memory_format=layout), sel)


def check_against_captum(model, twin, x, units, mode, double=True, **kw):
    """Ours on every unit at once vs Captum layer by layer; x is one image. In float64 by default: in
    float32 two pooled values within rounding of each other can pick different switches when the same conv
    runs on a crop (another summation order), which is not what this test is about. In float32 Captum gets
    the engine's CPU layout (channels last), so both sum each convolution in the same order."""
    layout = torch.channels_last if not double and x.device.type == "cpu" else torch.contiguous_format
    if double:
        model, twin, x = copy.deepcopy(model).double(), copy.deepcopy(twin).double(), x.double()
    ours = project(model, x, units, mode, **kw)[0]
    by_layer = {}
    for k, u in enumerate(units):
        by_layer.setdefault(parse_unit(u).layer, []).append(k)
    for ks in by_layer.values():
        ref = captum_projection(twin, x, [units[k] for k in ks], mode, layout)
        for k, r in zip(ks, ref):
            assert ours[k].abs().max() > 0, units[k]
            assert_close(ours[k], r, f"{mode} {units[k]}")


def assert_close(ours, ref, what=""):
    scale = ref.abs().max().item()
    diff = (ours - ref).abs().max().item()
    assert diff <= 1e-5 * scale, f"{what}: max diff {diff:.3g} vs max |ref| {scale:.3g}"


def non_inplace(model):
    """Captum hooks nn.ReLU modules and cannot take in-place ones: a twin with out-of-place ReLUs."""
    twin = copy.deepcopy(model)
    for m in twin.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False
    return twin


def strongest_units(model, x, layers, channel=0):
    """Per layer: the whole map of `channel` and the single strongest activation (so it is not zero)."""
    acts = run_with_taps(model, x, layers)
    units = []
    for name in layers:
        a = acts[name][0]
        c = int(a.flatten(1).amax(1).argmax())
        y, x_ = divmod(int(a[c].argmax()), a.shape[-1])
        units += [f"{name}:{channel}", f"{name}:{c}@{y},{x_}"]
    return units


# ----------------------------------------------------------------------------------------------------
# Captum on the real SqueezeNet and on ZFNet.
@pytest.fixture(scope="module")
def photo(squeezenet, imagenet_samples):
    from zfnet.data.images import Preprocess, load_image

    path = sorted(imagenet_samples.iterdir())[207]  # a golden retriever
    return Preprocess.for_model(squeezenet)(load_image(path)).unsqueeze(0)


@pytest.mark.parametrize("mode", ["deconv", "guided", "saliency"])
def test_squeezenet_equals_captum(squeezenet, photo, mode):
    # float32 (fast) on the whole image; that crops change nothing is tested below in float64. Every
    # feature layer in deconv mode; guided and saliency differ only in the ReLU rule: every other layer.
    layers = squeezenet.feature_layers if mode == "deconv" else squeezenet.feature_layers[::2]
    units = strongest_units(squeezenet, photo, layers)
    check_against_captum(squeezenet, non_inplace(squeezenet), photo, units, mode, double=False, crop=False)


@pytest.fixture(scope="module")
def zf():
    torch.manual_seed(0)
    # ZFNet's layers, kernels, strides, pools and LRN at 224 px; narrower, so Captum's passes stay quick.
    model = zfnet(widths=(32, 48, 64, 64, 48), fc=64).eval()
    x = torch.randn(1, 3, 224, 224)
    return model, x


@pytest.mark.parametrize("mode", ["deconv", "guided", "saliency"])
def test_zfnet_equals_captum_with_norm_backprop(zf, mode):
    model, x = zf
    layers = ["conv1", "conv2", "relu3", "relu4", "relu5", "pool5"]
    layers = layers if mode == "deconv" else layers[1::2]
    units = strongest_units(model, x, layers, channel=7)
    check_against_captum(model, model, x, units, mode, backprop_norm=True)


class StraightThroughLRN(nn.Module):
    """LRN forward, identity backward: the reference for deconv's default pass-through."""

    def __init__(self, lrn):
        super().__init__()
        self.lrn = lrn

    def forward(self, x):
        return x + (self.lrn(x) - x).detach()


def test_deconv_passes_norm_through_by_default(zf):
    model, x = zf
    twin = copy.deepcopy(model)
    twin.norm1, twin.norm2 = StraightThroughLRN(twin.norm1), StraightThroughLRN(twin.norm2)
    units = strongest_units(model, x, ["relu3", "relu5"])[1:]
    ours = project(model, x, units)[0]
    backprop = project(model, x, units, backprop_norm=True)[0]
    check_against_captum(model, twin, x, units, "deconv")
    for p, b in zip(ours, backprop):
        assert (p - b).abs().max() > 1e-3 * b.abs().max()  # the option changes the answer


# ----------------------------------------------------------------------------------------------------
# Hand-computed: one channel, a few pixels.
def tiny_model():
    """conv 2x2 -> relu -> maxpool 2x2 stride 1 (overlapping) -> conv 1x2 with weights (1, -2)."""
    m = nn.Sequential(nn.Conv2d(1, 1, 2, bias=False), nn.ReLU(), nn.MaxPool2d(2, 1),
                      nn.Conv2d(1, 1, (1, 2), bias=False))
    with torch.no_grad():
        m[0].weight.copy_(torch.tensor([[1.0, -1.0], [0.0, 2.0]]).view(1, 1, 2, 2))
        m[3].weight.copy_(torch.tensor([1.0, -2.0]).view(1, 1, 1, 2))
    return m


TINY_X = torch.tensor([[1.0, 0.0, 2.0, -1.0], [0.0, 3.0, 0.0, 1.0], [1.0, -2.0, 1.5, 0.0]]).view(1, 1, 3, 4)


def test_hand_computed_switches_and_projection():
    m = tiny_model()
    # conv: out[i,j] = x[i,j] - x[i,j+1] + 2 x[i+1,j+1] = [[7, -2, 5], [-7, 6, -1]]; relu: [[7,0,5],[0,6,0]]
    # maxpool windows: cols 0-1 -> 7 at (0,0); cols 1-2 -> 6 at (1,1): the switches. conv2: 7 - 2*6 = -5.
    acts = run_with_taps(m, TINY_X, ["1", "2", "3"])
    assert acts["1"].flatten().tolist() == [7, 0, 5, 0, 6, 0]
    assert acts["2"].flatten().tolist() == [7, 6] and acts["3"].item() == -5
    # Seed -5 at "3"; back through (1, -2): [-5, 10] at the pool output; unpooled to (0,0), (1,1).
    # deconv rectifies: only the 10 survives -> 10 * w placed at (1,1).
    deconv = torch.tensor([[0, 0, 0, 0], [0, 10, -10, 0], [0, 0, 20, 0]], dtype=torch.float32)
    # saliency keeps -5 (relu was on at both switches): -5 w at (0,0) + 10 w at (1,1).
    saliency = torch.tensor([[-5, 5, 0, 0], [0, 0, -10, 0], [0, 0, 20, 0]], dtype=torch.float32)
    assert torch.equal(project(m, TINY_X, ["3:0"], "deconv")[0, 0, 0], deconv)
    assert torch.equal(project(m, TINY_X, ["3:0"], "guided")[0, 0, 0], deconv)
    assert torch.equal(project(m, TINY_X, ["3:0"], "saliency")[0, 0, 0], saliency)
    # The whole pool map seeded with itself: 7 w at (0,0) + 6 w at (1,1), same in every mode.
    pool = torch.tensor([[7, -7, 0, 0], [0, 20, -6, 0], [0, 0, 12, 0]], dtype=torch.float32)
    for mode in ("deconv", "guided", "saliency"):
        assert torch.equal(project(m, TINY_X, ["2:0"], mode)[0, 0, 0], pool)


def test_hand_computed_guided_differs_from_deconv():
    # x = [1, -1] -> 1x1 conv (w=1) -> relu [1, 0] -> conv 1x2 (1, 1) = 1. Seed 1: [1, 1] at the relu.
    m = nn.Sequential(nn.Conv2d(1, 1, 1, bias=False), nn.ReLU(), nn.Conv2d(1, 1, (1, 2), bias=False))
    with torch.no_grad():
        m[0].weight.fill_(1.0)
        m[2].weight.fill_(1.0)
    x = torch.tensor([1.0, -1.0]).view(1, 1, 1, 2)
    assert project(m, x, ["2:0"], "deconv").flatten().tolist() == [1, 1]  # ignores the forward sign
    assert project(m, x, ["2:0"], "guided").flatten().tolist() == [1, 0]
    assert project(m, x, ["2:0"], "saliency").flatten().tolist() == [1, 0]


# ----------------------------------------------------------------------------------------------------
# Every kind of layer, functional and in-place rectifiers included, against Captum on a module-only twin.
class Branches(nn.Module):
    def __init__(self, functional):
        super().__init__()
        self.functional = functional
        self.a = nn.Conv2d(8, 4, 1)
        self.b = nn.Conv2d(8, 4, 3, padding=1)
        self.relu_a, self.relu_b = nn.ReLU(), nn.ReLU()

    def forward(self, x):
        if self.functional:
            return torch.cat([torch.relu(self.a(x)), self.b(x).relu_()], 1)
        return torch.cat([self.relu_a(self.a(x)), self.relu_b(self.b(x))], 1)


class Zoo(nn.Module):
    """In-place ReLU, F.relu, torch.relu, relu_, ReLU6, overlapping ceil-mode max pool, avg and adaptive
    pools, padded / grouped / dilated conv, concatenation, batch norm (eval), linear."""

    def __init__(self, functional=True):
        super().__init__()
        self.functional = functional
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu1 = nn.ReLU(inplace=True) if functional else nn.ReLU()
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=2)
        self.relu2 = nn.ReLU()
        self.fire = Branches(functional)
        self.act6 = nn.ReLU6() if functional else nn.ReLU()
        self.pool2 = nn.AvgPool2d(2)
        self.conv3 = nn.Conv2d(8, 6, 3, padding=1)
        self.relu3 = nn.ReLU()
        self.pool3 = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(24, 5)

    def forward(self, x):
        x = self.pool1(self.relu1(self.bn1(self.conv1(x))))
        x = self.conv2(x)
        x = F.relu(x) if self.functional else self.relu2(x)
        x = self.act6(self.fire(x))
        x = self.relu3(self.conv3(self.pool2(x)))
        return self.fc(torch.flatten(self.pool3(x), 1))


def zoo_pair():
    torch.manual_seed(1)
    ours = Zoo(functional=True)
    with torch.no_grad():
        ours.bn1.running_mean.uniform_(-0.2, 0.2)
        ours.bn1.running_var.uniform_(0.5, 2.0)
        ours.bn1.weight.uniform_(0.5, 1.5)
    twin = Zoo(functional=False)
    twin.load_state_dict(ours.state_dict())
    return ours, twin.eval()


@pytest.mark.parametrize("mode", ["deconv", "guided", "saliency"])
def test_every_layer_kind_equals_captum(mode):
    ours, twin = zoo_pair()
    x = torch.randn(1, 3, 21, 19)
    with torch.no_grad():
        assert run_with_taps(twin, x, ["act6"])["act6"].max() < 6  # ReLU6 acts as ReLU: same reference
    units = ["conv1:2", "relu1:3@4,5", "pool1:1", "conv2:5@2,3", "fire:6", "fire:4@4,4", "act6:7",
             "conv3:2@1,1", "relu3:4", "fc:3"]
    ours.train()  # projection must switch to eval (batch norm statistics) and back
    check_against_captum(ours, twin, x, units, mode)
    assert ours.training


def test_relu6_guided_masks_saturated_units():
    m = nn.Sequential(nn.Conv2d(1, 1, 1, bias=False), nn.ReLU6(), nn.Conv2d(1, 1, (1, 3), bias=False))
    with torch.no_grad():
        m[0].weight.fill_(1.0)
        m[2].weight.fill_(1.0)
    x = torch.tensor([8.0, 2.0, -1.0]).view(1, 1, 1, 3)  # relu6: [6, 2, 0]; seed = 8
    assert project(m, x, ["2:0"], "deconv").flatten().tolist() == [8, 8, 8]
    assert project(m, x, ["2:0"], "guided").flatten().tolist() == [0, 8, 0]
    assert project(m, x, ["2:0"], "saliency").flatten().tolist() == [0, 8, 0]


# ----------------------------------------------------------------------------------------------------
# API shape, pairs, and leaving the model as it was.
def test_pairs_equals_diagonal_of_all_pairs():
    ours, _ = zoo_pair()
    x = torch.randn(3, 3, 21, 19)
    units = ["relu3:1@1,2", "fire:3", "conv1:0@0,0"]
    full = project(ours, x, units)
    assert full.shape == (3, 3, 3, 21, 19)
    paired = project(ours, x, units, pairs=True, batch_size=2)
    assert paired.shape == (3, 3, 21, 19)
    for i in range(3):
        assert torch.allclose(paired[i], full[i, i], atol=1e-6)


def test_rows_project_many_units_on_few_images():
    """pairs=True with rows: units[i] on images[rows[i]], the numbers of the same pairs sent one image row
    per unit, with fewer forward rows (the units of an image share its pass)."""
    ours, _ = zoo_pair()
    torch.manual_seed(1)
    x = torch.randn(2, 3, 21, 19)
    units = ["relu3:1@1,2", "fire:3", "conv1:0@0,0", "relu3:0@2,1", "fire:1@1,1"]
    rows = [1, 0, 1, 1, 0]
    got, info = project(ours, x, units, pairs=True, rows=rows, crop=False, return_info=True)
    ref, ref_info = project(ours, x[rows], units, pairs=True, crop=False, return_info=True)
    assert got.shape == (5, 3, 21, 19)
    torch.testing.assert_close(got, ref)
    assert info.forward_rows < len(units)


def test_channels_last_passes_and_a_model_that_refuses_them():
    """The CPU passes run channels last; a model whose .view() needs default strides is run in the default
    format instead, with the same numbers as the plain gradient."""
    import zfnet.engine.passes as passes

    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4 * 6 * 6, 5)

        def forward(self, x):
            y = torch.relu(self.conv(x))
            return self.fc(y.view(len(y), -1))

    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    seen = []
    conv = nn.Conv2d(3, 4, 3)
    conv.register_forward_pre_hook(lambda m, a: seen.append(a[0].is_contiguous(memory_format=torch.channels_last)))
    project(nn.Sequential(conv, nn.ReLU()).eval(), x, ["1:0@2,2"], "saliency")
    assert seen[-1] is True  # the projection pass (the earlier calls build the layer table)
    model = Flat().eval()
    ours = project(model, x, target=3, mode="saliency")
    assert passes._LAYOUT[model] == torch.contiguous_format
    leaf = x.clone().requires_grad_(True)
    (ref,) = torch.autograd.grad(model(leaf)[:, 3].sum(), leaf)
    torch.testing.assert_close(ours, ref)


def test_model_left_as_it_was_after_an_exception():
    ours, _ = zoo_pair()
    ours.train()
    ours.conv2.weight.requires_grad_(False)
    before = [p.requires_grad for p in ours.parameters()]
    calls = []

    def boom(module, args, output):
        calls.append(1)
        raise RuntimeError("boom")

    h = ours.conv3.register_forward_hook(boom)
    with pytest.raises(RuntimeError, match="boom"):
        project(ours, torch.randn(1, 3, 21, 19), ["relu3:0"])
    h.remove()
    assert calls
    assert [p.requires_grad for p in ours.parameters()] == before
    assert all(m.training for m in ours.modules())
    assert all(not m._forward_hooks and not m._backward_hooks and not m._forward_pre_hooks
               for m in ours.modules())
    assert not torch._C._is_torch_function_mode_enabled()
    assert project(ours, torch.randn(1, 3, 21, 19), ["relu3:0"]).abs().max() > 0


def test_bad_arguments():
    from zfnet.core.errors import ZfnetError

    ours, _ = zoo_pair()
    x = torch.randn(2, 3, 21, 19)
    with pytest.raises(ZfnetError, match="mode"):
        project(ours, x, ["relu3:0"], "occlude")
    with pytest.raises(ZfnetError, match="unknown layer"):
        project(ours, x, ["conv9:0"])
    with pytest.raises(ZfnetError, match="out of range"):
        project(ours, x, ["relu3:99"])
    with pytest.raises(ZfnetError, match="one unit per image"):
        project(ours, x, ["relu3:0"], pairs=True)
    with pytest.raises(ZfnetError, match="rows: image index 2 out of range"):
        project(ours, x, ["relu3:0"], pairs=True, rows=[2])
    with pytest.raises(ZfnetError, match="one image per unit"):
        project(ours, x, ["relu3:0", "relu3:1"], pairs=True, rows=[0])
    with pytest.raises(ZfnetError, match="needs pairs=True"):
        project(ours, x, ["relu3:0"], rows=[0])


def test_layer_table_unchanged_by_projection():
    model = zfnet(widths=(8, 8, 8, 8, 8), fc=16)
    layer_table(model)
    assert project(model, torch.randn(1, 3, 224, 224), ["relu2:1"]).shape == (1, 1, 3, 224, 224)


# ----------------------------------------------------------------------------------------------------
# Receptive-field crops are exact: cropped == uncropped at every border, corner and ceil-mode edge.
def border_units(table, layer, channel, ys=(0, 1, 2, -3, -2, -1), xs=(0, 1, -2, -1)):
    """Units on the borders, corners and next to them (negative = from the end), and the centre."""
    i = table[layer]
    ys = sorted({y % i.height for y in ys} | {i.height // 2})
    xs = sorted({x % i.width for x in xs} | {i.width // 2})
    return [f"{layer}:{channel}@{y},{x}" for y in ys for x in xs]


def assert_crop_exact(model, x, units, mode="deconv"):
    """In float64, where summation order cannot flip a max-pool switch between the two runs."""
    model, x = copy.deepcopy(model).double(), x.double()
    cropped = project(model, x, units, mode)
    full = project(model, x, units, mode, crop=False)
    for k, u in enumerate(units):
        diff, scale = (cropped[:, k] - full[:, k]).abs().max().item(), full[:, k].abs().max().item()
        assert diff <= 1e-12 * scale, f"cropped {u}: max diff {diff:.3g} vs max |ref| {scale:.3g}"
    return full


def test_crop_exact_on_squeezenet(squeezenet, photo):
    from zfnet.engine.crop import plan_crop

    table = layer_table(squeezenet, 224)
    acts = run_with_taps(squeezenet, photo, squeezenet.feature_layers)
    units = []
    for layer in ("features.1", "features.7", "features.12"):
        a = acts[layer][0]
        channel = int((a[:, 0].amax(1) + a[:, -1].amax(1)).argmax())  # strong on the top and bottom rows
        units += border_units(table, layer, channel, ys=(0, -1), xs=(-1,))
    full = assert_crop_exact(squeezenet, photo, units)
    assert (full.flatten(2).abs().amax(2) > 0).float().mean() > 0.5  # most of them are not trivially zero
    plan = plan_crop(squeezenet, table, parse_unit("features.7:0@6,6"), (224, 224))
    hc, wc = plan.input_shape
    assert hc * wc < 0.5 * 224 * 224  # an interior unit is really cropped


@pytest.mark.parametrize("size", [(231, 237)])
def test_crop_exact_on_zfnet_odd_sizes(zf, size):
    model, _ = zf
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(3))
    table = layer_table(model, size)
    units = [u for layer in ("relu1", "norm2", "relu5") for u in border_units(table, layer, 5, ys=(0, -1), xs=(0, -1))]
    assert_crop_exact(model, x, units)
    assert_crop_exact(model, x, units[::4], "guided")


@pytest.mark.parametrize("size", [(21, 19), (24, 23)])
def test_crop_exact_on_every_layer_kind(size):
    ours, _ = zoo_pair()
    x = torch.randn(1, 3, *size)
    table = layer_table(ours, size)
    units = [u for layer, c in (("relu1", 3), ("pool1", 1), ("conv2", 5), ("fire", 4), ("act6", 7), ("relu3", 4))
             for u in border_units(table, layer, c, ys=(0, 1, -2, -1), xs=(0, -1))]
    assert_crop_exact(ours, x, units)
    assert_crop_exact(ours, x, units[::5], "saliency")


class Squeeze(nn.Module):  # squeeze-and-excitation: a global mean feeds back into every position
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3)
        self.conv2 = nn.Conv2d(4, 4, 3)

    def forward(self, x):
        x = self.conv1(x)
        x = x * torch.sigmoid(x.mean((2, 3), keepdim=True))
        return self.conv2(x)


def test_no_crop_after_global_ops_and_it_says_so(capsys):
    from zfnet.engine.crop import croppable

    m = Squeeze()
    assert croppable(m, "conv1", (16, 16)) and not croppable(m, "conv2", (16, 16))
    x = torch.randn(1, 3, 16, 16)
    assert_crop_exact(m, x, ["conv2:1@5,5", "conv2:2@0,11"])  # on a float64 copy
    capsys.readouterr()
    _, info = project(m, x, ["conv2:1@5,5", "conv1:0@3,3"], return_info=True)
    assert info.crops["conv2"] == "not cropped: mean runs before it"
    assert info.crops["conv1"].startswith("cropped to the receptive field")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "conv2: not cropped: mean runs before it" in err[0]  # once per model and layer
    project(m, x, ["conv2:1@5,5"])
    assert capsys.readouterr().err == ""


class Residual(nn.Module):
    """A ResNet-like stem and basic block: skip connection, batch norm (eval), ceil-mode max pool."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
                                  nn.MaxPool2d(3, 2, ceil_mode=True))
        self.conv1, self.bn1 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.head = nn.Conv2d(8, 4, 3, 2)

    def forward(self, x):
        x = self.stem(x)
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return self.head(self.relu(x + y))


def test_crop_exact_through_skip_connections_and_batch_norm():
    torch.manual_seed(2)
    m = Residual().eval()
    for bn in (m.stem[1], m.bn1, m.bn2):
        with torch.no_grad():
            bn.running_mean.uniform_(-0.3, 0.3)
            bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(1, 3, 61, 58)
    table = layer_table(m, (61, 58))
    units = [u for layer in ("stem.3", "bn2", "relu", "head") for u in border_units(table, layer, 1, ys=(0, 1, -1),
                                                                                     xs=(0, -1))]
    full = assert_crop_exact(m, x, units)
    assert (full.flatten(2).abs().amax(2) > 0).float().mean() > 0.5
    assert_crop_exact(m, x, units[::3], "guided")


def test_one_crop_rule_batches_a_layer_in_few_shapes(zf):
    from zfnet.engine.crop import plan_crop

    model, _ = zf
    table = layer_table(model, 224)
    for layer in ("relu2", "relu5"):
        plan = plan_crop(model, table, layer)
        i = table[layer]
        shapes = {tuple(s[1] for s in plan.place(parse_unit(f"{layer}:0@{y},{x}")))
                  for y in range(i.height) for x in range(i.width)}
        assert len(shapes) <= 9, shapes  # three lengths per axis
        f = i.field
        for y in range(i.height):  # every crop holds the field's part inside the image, starts on the grid
            (oy, ly), _ = plan.place(parse_unit(f"{layer}:0@{y},0"))
            r0, r1 = f.start_y + y * f.jump_y, f.start_y + y * f.jump_y + f.size_y
            assert oy % f.jump_y == 0 and oy <= max(r0, 0) and min(r1, 224) <= oy + ly <= 224
            assert (r0 >= 0 or oy == 0) and (r1 <= 224 or oy + ly == 224)  # never crops across a border


def test_shared_forward_passes_give_the_unshared_numbers():
    ours, _ = zoo_pair()
    ours = copy.deepcopy(ours).double().eval()
    x = torch.randn(3, 3, 21, 19, dtype=torch.float64)
    # The atlas's call: one row per (unit, image) pair, so an image comes once for each of its units.
    rows = [0, 0, 1, 0, 2, 1, 0]
    units = ["relu3:1", "fire:6", "fire:6", "fc:2", "relu1:3@4,5", "relu1:3@4,5", "relu1:3@4,5"]
    got, info = project(ours, x[rows], units, pairs=True, return_info=True)
    one_by_one = torch.cat([project(ours, x[r:r + 1], [u], pairs=True) for r, u in zip(rows, units)])
    assert torch.allclose(got, one_by_one, atol=1e-12)
    assert info.forward_rows == 5 and info.projections == 7  # image 0's whole-image units share a pass
    every, info = project(ours, x, ["relu3:1", "fire:6", "fc:2"], return_info=True)
    assert info.forward_rows == 3  # each image's three units: one forward pass, three backward
    assert torch.allclose(every[:, 1], project(ours, x, ["fire:6"])[:, 0], atol=1e-12)


def test_window_returns_the_receptive_field_and_loses_nothing(zf):
    import torch.nn.functional as F

    model, _ = zf
    model = copy.deepcopy(model).double()
    x = torch.randn(2, 3, 224, 224, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    table = layer_table(model, 224)
    units = border_units(table, "relu3", 5, ys=(0, -1), xs=(0, -1))
    f = table["relu3"].field
    full = project(model, x, units)
    win = project(model, x, units, window=True)
    smooth = project(model, x, units[:2], window=True, smooth="smoothgrad", samples=2, sigma=0.1)
    assert win.shape == (2, len(units), 3, f.size_y, f.size_x)
    pad = F.pad(full, (f.size_x, f.size_x, f.size_y, f.size_y))  # so windows past the borders read zeros
    for k, u in enumerate(units):
        u = parse_unit(u)
        y0, x0 = f.start_y + u.y * f.jump_y + f.size_y, f.start_x + u.x * f.jump_x + f.size_x
        inside = pad[:, k, :, y0:y0 + f.size_y, x0:x0 + f.size_x]
        assert torch.equal(win[:, k], inside)
        assert torch.isclose(inside.abs().sum(), full[:, k].abs().sum(), rtol=1e-12)  # nothing outside the field
    full_smooth = F.pad(project(model, x, units[:2], smooth="smoothgrad", samples=2, sigma=0.1),
                        (f.size_x, f.size_x, f.size_y, f.size_y))
    for k, u in enumerate(units[:2]):
        u = parse_unit(u)
        y0, x0 = f.start_y + u.y * f.jump_y + f.size_y, f.start_x + u.x * f.jump_x + f.size_x
        assert torch.allclose(smooth[:, k], full_smooth[:, k, :, y0:y0 + f.size_y, x0:x0 + f.size_x], atol=1e-12)
    with pytest.raises(Exception, match="window=True needs"):
        project(model, x, ["relu3:1"], window=True)


# ----------------------------------------------------------------------------------------------------
# The CLI, in-process.
def test_cli_project_writes_pngs_and_raw_numbers(tmp_path, squeezenet, capsys):
    import numpy as np
    from PIL import Image
    from shared_data import SQUEEZENET_WEIGHTS

    from zfnet.cli import main
    from zfnet.data.images import Preprocess, load_image
    from zfnet.data.samples import sample_dir

    image = sorted(sample_dir().glob("*.jpg"))[0]
    x = Preprocess.for_model(squeezenet)(load_image(image)).unsqueeze(0)
    units = strongest_units(squeezenet, x, ["features.7"])[1:] + ["features.4:10"]
    rc = main(["project", "--model", "squeezenet1_1", "--weights", str(SQUEEZENET_WEIGHTS), str(image),
               "--unit", units[0], "--unit", units[1], "--out", str(tmp_path), "--save-npy"])
    assert rc == 0
    x = np.load(tmp_path / "input.npy")
    assert x.shape == (1, 3, 224, 224) and x.dtype == np.float32
    ref = project(squeezenet, torch.from_numpy(x), units)[0]
    for u, r in zip(units, ref):
        slug = parse_unit(u).slug
        raw = np.load(tmp_path / f"{slug}.npy")
        assert raw.shape == (1, 3, 224, 224) and np.abs(raw[0] - r.numpy()).max() <= 1e-6 * r.abs().max().item()
        png = np.asarray(Image.open(tmp_path / f"{slug}.png"))
        assert png.shape == (224, 224, 3) and png.min() < 100 < png.max()
    assert units[0] in capsys.readouterr().out


def test_cli_project_defaults_to_the_strongest_deepest_map(tmp_path):
    from zfnet.cli import main
    from zfnet.data.samples import sample_dir

    image = sorted(sample_dir().glob("*.jpg"))[1]
    assert main(["project", "--model", "zfnet", "--weights", "none", str(image), "--out", str(tmp_path)]) == 0
    pngs = list(tmp_path.glob("*.png"))
    assert len(pngs) == 1 and pngs[0].name.startswith("relu5_")


@pytest.mark.parametrize("args, message", [
    (["--unit", "conv9:1"], "unknown layer"),
    (["--unit", "relu5:999"], "out of range"),
    (["--unit", "relu5:1@40,40"], "outside"),
    (["--unit", "relu5"], "bad unit address"),
    (["--mode", "deconv", "IMAGE=missing.jpg"], "image not found"),
])
def test_cli_project_bad_input_is_one_line(tmp_path, capsys, args, message):
    from zfnet.cli import main
    from zfnet.data.samples import sample_dir

    image = str(sorted(sample_dir().glob("*.jpg"))[0])
    if args[-1].startswith("IMAGE="):
        image, args = str(tmp_path / args[-1][6:]), args[:-1]
    rc = main(["project", "--model", "zfnet", "--weights", "none", image, "--out", str(tmp_path / "o")] + args)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and message in err and len(err.splitlines()) == 1, err


@pytest.mark.parametrize("extra, slug, kw", [
    (["--target", "3", "--mode", "saliency"], "target_3", dict(target=3, mode="saliency")),
    (["--target", "3", "--score", "log_prob", "--mode", "guided"], "target_3",
     dict(target=3, mode="guided", score="log_prob")),
    (["--unit", "relu5:2", "--unit", "relu4:7@3,3", "--aggregate", "--seed", "one"], "aggregate",
     dict(units=["relu5:2", "relu4:7@3,3"], aggregate=True, seed="one")),
    (["--unit", "relu5:2@6,6", "--seed", "one", "--smooth", "vargrad", "--samples", "3", "--sigma", "0.1",
      "--noise-seed", "5"], "relu5_2_y6_x6",
     dict(units=["relu5:2@6,6"], seed="one", smooth="vargrad", samples=3, sigma=0.1, noise_seed=5)),
])
def test_cli_project_seed_target_aggregate_smooth(tmp_path, extra, slug, kw):
    import numpy as np

    from zfnet.cli import main
    from zfnet.data.samples import sample_dir
    from zfnet.models.weights import load_model

    image = str(sorted(sample_dir().glob("*.jpg"))[0])
    torch.manual_seed(0)
    assert main(["project", "--model", "zfnet", "--weights", "none", image, "--out", str(tmp_path), "--save-npy"]
                + extra) == 0
    raw = np.load(tmp_path / f"{slug}.npy")
    x = torch.from_numpy(np.load(tmp_path / "input.npy"))
    torch.manual_seed(0)  # the same random weights as the CLI's
    model = load_model("zfnet", None)
    ref = project(model, x, **kw)
    ref = ref[0, 0] if ref.dim() == 5 else ref[0]
    assert raw.shape == (1, 3, 224, 224) and ref.abs().max() > 0
    assert np.abs(raw[0] - ref.numpy()).max() <= 1e-5 * ref.abs().max().item()


def test_crop_rule_weighs_the_projections_that_share_an_image(squeezenet, photo):
    """features.11 of SqueezeNet: an interior crop keeps 67 % of the image. A few projections per image are
    cropped (a forward and a backward on 67 % beat a backward of the whole plus a share of its forward);
    with many per image the whole image's forward is shared and one backward each costs less."""
    from zfnet.engine.crop import plan_crop, worth

    table = layer_table(squeezenet, 224)
    assert worth(1) == 0.8 and worth(4) == pytest.approx(0.7) and worth(20) == pytest.approx(0.62)
    alone = plan_crop(squeezenet, table, "features.11", share=1)
    assert plan_crop(squeezenet, table, "features.11", share=4).axes is not None
    shared = plan_crop(squeezenet, table, "features.11", share=20)
    hc, wc = alone.input_shape
    assert 0.6 < hc * wc / 224 ** 2 < 0.7
    assert shared.axes is None and "20.0 projections share each image" in shared.reason
    units = [f"features.11:{c}@6,6" for c in range(20)]
    got, info = project(squeezenet, photo, units, return_info=True)  # twenty units on one image
    assert info.crops["features.11"] == shared.reason and info.forward_rows == 1
    one, info1 = project(squeezenet, photo, units[:1], return_info=True)
    assert info1.crops["features.11"] == alone.reason
    torch.testing.assert_close(got[:, :1], one, rtol=1e-4, atol=1e-4 * float(one.abs().max()))


def test_each_streams_the_projections_it_would_return(zf):
    model, x = zf
    x = torch.cat([x, x.flip(-1)])
    units = ["relu2:3@4,4", "relu5:1", "relu1:0@0,0", "relu2:3@4,4"]
    want = project(model, x[[0, 1, 1, 0]], units, pairs=True, seed="one")
    got = {}
    assert project(model, x[[0, 1, 1, 0]], units, pairs=True, seed="one",
                   each=lambda i, g: got.setdefault(i, g.clone())) is None
    assert sorted(got) == [0, 1, 2, 3]
    for i in range(4):
        assert want[i].abs().max() > 0
        torch.testing.assert_close(got[i], want[i])
    with pytest.raises(ZfnetError, match="each= streams"):
        project(model, x, units[:1], smooth="smoothgrad", each=lambda i, g: None)


def test_a_layer_that_cannot_be_cropped_says_so_once_and_a_cheaper_whole_image_does_not(squeezenet, photo, capfd):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(12), nn.Conv2d(4, 4, 3), nn.ReLU()).eval()
    x = torch.randn(1, 3, 32, 32)
    _, info = project(model, x, ["3:1@4,4", "3:2@5,5"], return_info=True)
    assert info.crops["3"].startswith("not cropped: adaptive_avg_pool2d runs before it")
    err = capfd.readouterr().err
    assert err.count("its projections are computed on the whole image") == 1
    project(squeezenet, photo, [f"features.11:{c}@6,6" for c in range(20)])  # whole image: cheaper, not forced
    assert "computed on the whole image" not in capfd.readouterr().err
