"""Layer table vs runtime shapes and brute-force receptive fields; taps; unit addresses."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from zfnet.core.errors import ZfnetError
from zfnet.inspect.layers import Unit, feature_layers, layer_table, parse_unit, run_with_taps, taps
from zfnet.models.networks import alexnet, squeezenet1_1, zfnet


class Branchy(nn.Module):
    """Strides, padding, dilation, ceil-mode and average pools, a concat of unequal branches and
    functional ops: the geometry the table must follow."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, stride=1, padding=1)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(4, 4, 3, stride=2, padding=2, dilation=2)
        self.left = nn.Conv2d(4, 3, 1)
        self.right = nn.Conv2d(4, 3, 3, padding=1)
        self.avg = nn.AvgPool2d(2, 2)
        self.head = nn.Conv2d(6, 2, 3, padding=0)

    def forward(self, x):
        x = self.pool1(torch.relu(self.conv1(x)))
        x = F.relu(self.conv2(x))
        x = torch.cat([self.left(x), F.relu(self.right(x))], 1)
        return self.head(self.avg(x))


def _positive(model):
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.abs() + 0.05)
    return model.eval()


def _brute_force_box(model, layer, y, x, size):
    """Bounding box of the input pixels whose change changes any channel at (y, x): perturb each pixel.

    The table describes a layer, so the union over channels (a concat's channels have different fields)."""
    H, W = size
    base = torch.rand(1, 1, H, W) * 0.1
    imgs = base.repeat(H * W, 1, 1, 1)
    idx = torch.arange(H * W)
    imgs[idx, 0, idx // W, idx % W] = 50.0  # large and positive: wins every max-pool window it reaches
    with torch.no_grad():
        ref = run_with_taps(model, base, [layer])[layer][0, :, y, x]
        out = run_with_taps(model, imgs, [layer])[layer][:, :, y, x]
    hit = ((out - ref).abs() > 1e-6 * max(1.0, ref.abs().max().item())).any(1).view(H, W).nonzero()
    return (hit[:, 0].min().item(), hit[:, 0].max().item() + 1, hit[:, 1].min().item(), hit[:, 1].max().item() + 1)


@pytest.mark.parametrize("layer", ["conv1", "pool1", "conv2", "left", "right", "avg", "head"])
def test_receptive_fields_match_brute_force(layer):
    torch.manual_seed(0)
    model = _positive(Branchy())
    size = (37, 41)
    info = layer_table(model, size, in_channels=1)[layer]
    h, w = info.height, info.width
    for y, x in {(0, 0), (h // 2, w // 2), (h - 1, w - 1), (0, w - 1)}:
        assert _brute_force_box(model, layer, y, x, size) == info.window(y, x, size), (layer, y, x)


def test_receptive_field_equals_gradient_support_without_max_pool():
    torch.manual_seed(0)
    model = _positive(nn.Sequential(nn.Conv2d(1, 2, 5, stride=2, padding=1), nn.ReLU(), nn.AvgPool2d(3, 2, 1),
                                    nn.Conv2d(2, 2, 3, dilation=2)))
    size = (40, 40)
    info = layer_table(model, size, in_channels=1)["3"]
    x = torch.rand(1, 1, *size, requires_grad=True)
    for y, xx in [(0, 0), (2, 3), (info.height - 1, info.width - 1)]:
        (g,) = torch.autograd.grad(model(x)[0, 0, y, xx], x)
        nz = g[0, 0].nonzero()
        box = (nz[:, 0].min().item(), nz[:, 0].max().item() + 1, nz[:, 1].min().item(), nz[:, 1].max().item() + 1)
        assert box == info.window(y, xx, size)


@pytest.mark.parametrize("make,size", [
    (zfnet, 224), (lambda: zfnet(input_size=160), 160), (alexnet, 224), (lambda: alexnet(groups=2), 224),
    (lambda: alexnet(input_size=128), 128), (lambda: alexnet(layout="torchvision"), (160, 192)),
    (squeezenet1_1, 224), (squeezenet1_1, (160, 192))])
def test_table_matches_runtime_shapes(make, size):
    model = make().eval()
    table = layer_table(model, size)
    names = [i.name for i in table]
    x = torch.zeros(1, 3, *((size, size) if isinstance(size, int) else size))
    with torch.no_grad():
        outs = run_with_taps(model, x, names, stop=False)
    for info in table:
        out = outs[info.name]
        shape = (info.channels, info.height, info.width) if out.dim() == 4 else (info.channels,)
        assert tuple(out.shape[1:]) == shape, info.name
    assert [i.index for i in table] == list(range(len(table)))


def test_squeezenet_fire_field_is_union_of_branches():
    t = layer_table(squeezenet1_1())
    fire = t["features.3"].field
    assert fire == t["features.3.expand3x3"].field  # the 3x3 branch encloses the 1x1 branch
    assert t["features.3.expand1x1"].field.size_y < fire.size_y
    assert t["classifier.3"].field is None  # global average pool sees everything...
    assert t["classifier.3"].window(0, 0) == (0, 223, 0, 223)  # ...but the 3x3/2 conv1 never reads row 223


def test_taps_stop_early_and_remove_hooks_on_error():
    model = zfnet(num_classes=10)
    calls = []
    model.fc8.register_forward_hook(lambda *a: calls.append(1))
    out = run_with_taps(model, torch.zeros(1, 3, 224, 224), ["relu2"])
    assert out["relu2"].shape == (1, 256, 26, 26) and not calls  # never reached fc8

    def boom(*a):
        raise RuntimeError("mid-forward")

    h = model.conv3.register_forward_hook(boom)
    with pytest.raises(RuntimeError):
        run_with_taps(model, torch.zeros(1, 3, 224, 224), ["relu1", "relu5"])
    h.remove()
    assert all(not m._forward_hooks for m in model.modules() if m is not model.fc8)
    with pytest.raises(ZfnetError, match="unknown layer 'conv9'; closest: conv5, conv4, conv3"):
        with taps(model, ["conv9"]):
            pass


def test_taps_survive_inplace_relu():
    model = squeezenet1_1().eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        out = run_with_taps(model, x, ["features.0", "features.1"])
        conv = model.features[0](x)
    assert torch.equal(out["features.0"], conv)  # not overwritten by the in-place ReLU after it
    assert (out["features.0"] < 0).any() and torch.equal(out["features.1"], conv.clamp(min=0))


def test_taps_reduce_keeps_only_reduced():
    model = zfnet(num_classes=10)
    out = run_with_taps(model, torch.randn(2, 3, 224, 224), ["relu1", "relu5"],
                        reduce=lambda name, t: t.amax(dim=(2, 3)))
    assert out["relu1"].shape == (2, 96) and out["relu5"].shape == (2, 256)


def test_unit_addresses():
    t = layer_table(zfnet())
    assert parse_unit("conv5:17") == Unit("conv5", 17)
    u = parse_unit("conv5:17@3,4", t)
    assert (u.layer, u.channel, u.y, u.x) == ("conv5", 17, 3, 4) and str(u) == "conv5:17@3,4"
    assert u.slug == "conv5_17_y3_x4"
    assert parse_unit("features.3.expand3x3:5").layer == "features.3.expand3x3"
    with pytest.raises(ZfnetError, match="unknown layer 'conv9'; closest: conv"):
        parse_unit("conv9:1", t)
    with pytest.raises(ZfnetError, match=r"out of range 0\.\.255"):
        parse_unit("conv5:256", t)
    with pytest.raises(ZfnetError, match="outside the 13x13"):
        parse_unit("conv5:1@13,0", t)
    with pytest.raises(ZfnetError, match="bad unit address"):
        parse_unit("conv5-17")


def test_feature_layers():
    assert feature_layers(zfnet()) == ["relu1", "relu2", "relu3", "relu4", "relu5"]
    assert feature_layers(zfnet(remove=(3, 4))) == ["relu1", "relu2", "relu5"]
    generic = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                            nn.Flatten(), nn.Linear(4, 2), nn.ReLU())
    assert feature_layers(generic) == ["1", "3"]


def test_table_leaves_batch_norm_and_mode_alone():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5)).train()
    model[3].eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    layer_table(model, 16)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.training and model[1].training and not model[3].training
