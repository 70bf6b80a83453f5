"""Receptive fields through modern ops, against brute force on small hand-built models.

Each model holds one pattern of a modern CNN: channels-last LayerNorm and Linear (ConvNeXt), chunk + channel
shuffle (ShuffleNet), tokens (flatten / transpose / reshape), splits and concatenations along the map,
strided slices, reflect padding, grouped and depthwise convolutions, Ghost modules (concatenate, slice),
squeeze-and-excitation gates and group norm. The exact field must equal the bounding box of the input pixels
whose change changes the layer at that position (perturbation); past a global gate the exact field is the
whole image and the local field equals the support of the gradient with the gates held constant.
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from tiny import channel_shuffle

from zfnet.inspect.layers import Field, layer_table, run_with_taps

SIZE = (29, 33)


def _at(out: torch.Tensor, layout: str, y: int, x: int, width: int) -> torch.Tensor:
    """The values of a layer output (N, ...) at map position (y, x), per image, whatever its layout."""
    index = [slice(None)]
    for d in layout:
        index.append({"H": y, "W": x, "L": y * width + x}.get(d, slice(None)))
    return out[tuple(index)].reshape(out.shape[0], -1)


def perturbation_boxes(model, layers, size=SIZE):
    """For every layer, a function (info, y, x) -> bounding box of the pixels whose change changes any value
    of the layer at (y, x): one float64 forward pass of the image with each pixel perturbed in turn."""
    H, W = size
    torch.manual_seed(1)
    base = torch.rand(1, 1, H, W, dtype=torch.float64)
    imgs = base.repeat(H * W + 1, 1, 1, 1)
    idx = torch.arange(H * W)
    imgs[idx + 1, 0, idx // W, idx % W] += 3.0
    with torch.no_grad():
        outs = run_with_taps(model.double(), imgs, layers, stop=False)
    model.float()

    def box(info, y, x):
        v = _at(outs[info.name], info.layout, y, x, info.width)
        hit = ((v[1:] - v[:1]).abs() > 1e-9 * max(1.0, v.abs().max().item())).any(1).view(H, W).nonzero()
        return (hit[:, 0].min().item(), hit[:, 0].max().item() + 1, hit[:, 1].min().item(),
                hit[:, 1].max().item() + 1)
    return box


def gradient_box(model, layer, info, y, x, size=SIZE):
    """Bounding box of the gradient support of the layer at (y, x) (random weights over its channels)."""
    torch.manual_seed(2)
    img = torch.rand(1, 1, *size, requires_grad=True)
    out = _at(run_with_taps(model, img, [layer], detach=False)[layer], info.layout, y, x, info.width)
    (g,) = torch.autograd.grad((out * torch.randn_like(out)).sum(), img)
    nz = g[0, 0].nonzero()
    return nz[:, 0].min().item(), nz[:, 0].max().item() + 1, nz[:, 1].min().item(), nz[:, 1].max().item() + 1


def positions(info):
    h, w = info.height, info.width
    return sorted({(0, 0), (h // 2, w // 2), (h - 1, w - 1), (0, w - 1), (h - 1, 0)})


# ----------------------------------------------------------------------------------------------------
class LayerNorm2d(nn.LayerNorm):
    """torchvision's ConvNeXt norm: permute to channels-last, normalise over channels, permute back."""

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class CNBlock(nn.Module):
    """torchvision's ConvNeXt block: depthwise 7x7, channels-last LayerNorm + Linear MLP, layer scale."""

    def __init__(self, c):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c)
        self.pw1 = nn.Linear(c, 4 * c)
        self.act = nn.GELU()
        self.pw2 = nn.Linear(4 * c, c)
        self.gamma = nn.Parameter(torch.full((c, 1, 1), 0.5))

    def forward(self, x):
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.pw2(self.act(self.pw1(self.norm(y)))).permute(0, 3, 1, 2)
        return x + self.gamma * y


class ConvNeXtish(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 6, 4, stride=4), LayerNorm2d(6))
        self.stage1 = nn.Sequential(CNBlock(6))
        self.down = nn.Sequential(LayerNorm2d(6), nn.Conv2d(6, 8, 2, stride=2))
        self.stage2 = nn.Sequential(CNBlock(8), CNBlock(8))

    def forward(self, x):
        return self.stage2(self.down(self.stage1(self.stem(x))))


class ShuffleUnit(nn.Module):
    """torchvision's ShuffleNetV2 unit: chunk, one branch (1x1, depthwise 3x3, 1x1), cat, channel shuffle."""

    def __init__(self, c, stride):
        super().__init__()
        self.stride = stride
        half = c // 2
        cin = c if stride > 1 else half
        self.branch1 = nn.Sequential(nn.Conv2d(c, c, 3, stride, 1, groups=c), nn.Conv2d(c, half, 1), nn.GELU()) \
            if stride > 1 else None
        self.branch2 = nn.Sequential(nn.Conv2d(cin, half, 1), nn.GELU(),
                                     nn.Conv2d(half, half, 3, stride, 1, groups=half), nn.BatchNorm2d(half),
                                     nn.Conv2d(half, half, 1), nn.GELU())

    def forward(self, x):
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class ShuffleNetish(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(1, 8, 3, 2, 1), nn.GELU())
        self.stage2 = nn.Sequential(ShuffleUnit(8, 2), ShuffleUnit(8, 1))
        self.stage3 = nn.Sequential(ShuffleUnit(8, 2), ShuffleUnit(8, 1))

    def forward(self, x):
        return self.stage3(self.stage2(self.conv1(x)))


class Tokens(nn.Module):
    """Maps as tokens and back, rows split and joined, strided slices, reflect and zero padding.

    The table keeps one column span per column: rows joined after different horizontal reach would make
    a unit's columns depend on its row, so the top half's conv reaches along rows only (`wide=True`: also
    along columns, where the table may only err on the large side)."""

    def __init__(self, wide=False):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 3, stride=2, padding=1, padding_mode="reflect")
        self.mix = nn.Linear(6, 6)
        self.top = nn.Conv2d(6, 6, 3 if wide else (3, 1), padding=1 if wide else (1, 0), groups=3)
        self.conv3 = nn.Conv2d(6, 4, 3)

    def forward(self, x):
        x = torch.tanh(self.conv1(x))
        n, c, h, w = x.shape
        t = self.mix(x.flatten(2).transpose(1, 2))  # (N, H*W, C)
        x = t.transpose(1, 2).reshape(n, c, h, w)
        top, bottom = x.chunk(2, dim=2)
        x = torch.cat([self.top(top), bottom], dim=2)
        x = x[:, :, 1:, ::2]
        return self.conv3(F.pad(x, (1, 0, 0, 2)))


class Ghost(nn.Module):
    """GhostNet's module: a primary conv, a cheap depthwise conv of it, concatenated and cut to size."""

    def __init__(self, cin, cout):
        super().__init__()
        self.cout = cout
        self.primary = nn.Sequential(nn.Conv2d(cin, 4, 1), nn.GELU())
        self.cheap = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.GELU())

    def forward(self, x):
        x1 = self.primary(x)
        return torch.cat([x1, self.cheap(x1)], dim=1)[:, :self.cout]


class Ghostish(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, 2, 1)
        self.ghost1 = Ghost(4, 6)
        self.ghost2 = Ghost(6, 5)

    def forward(self, x):
        return self.ghost2(F.avg_pool2d(self.ghost1(self.conv(x)), 2, ceil_mode=True))


class Splits(nn.Module):
    """split / narrow / unbind + stack / unflatten + flatten / movedim: the other ways to cut and regroup;
    tensors shaped like a global one (zeros_like) and casts to another tensor's type carry no field of it."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 3, stride=2, padding=1)
        self.left = nn.Conv2d(2, 2, 3, padding=1)
        self.norm = nn.LayerNorm(6)
        self.conv2 = nn.Conv2d(6, 3, (1, 3), stride=(1, 2))

    def forward(self, x):
        x = torch.tanh(self.conv1(x))
        x = x.type_as(x.mean()) + torch.zeros_like(x.amax((2, 3), keepdim=True))
        a, b = x.split([2, 4], dim=1)
        x = torch.cat([self.left(a), b], 1).narrow(2, 1, x.shape[2] - 2)  # rows 1 .. h-2
        x = torch.stack(x.unbind(1), 1).unflatten(1, (2, 3)).flatten(1, 2)
        x = self.norm(x.movedim(1, -1)).movedim(-1, 1)
        return self.conv2(x)


MODELS = {"convnext": ConvNeXtish, "shufflenet": ShuffleNetish, "tokens": Tokens, "ghost": Ghostish,
          "splits": Splits}


@pytest.fixture(scope="module")
def models():
    out = {}
    for key, make in MODELS.items():
        torch.manual_seed(0)
        out[key] = make().eval()
    return out


@pytest.mark.parametrize("key", MODELS)
def test_exact_field_equals_perturbation_box(models, key):
    model = models[key]
    table = layer_table(model, SIZE, in_channels=1)
    maps = [i for i in table if i.height * i.width > 1]
    box = perturbation_boxes(model, [i.name for i in maps])
    for info in maps:
        assert info.rows is not None and not info.gated, info.name  # nothing global in these models
        for y, x in positions(info):
            assert box(info, y, x) == info.window(y, x), (info.name, y, x)


def test_rows_joined_after_unequal_column_reach_are_never_too_small():
    torch.manual_seed(0)
    model = Tokens(wide=True).eval()
    info = layer_table(model, SIZE, in_channels=1)["conv3"]
    box = perturbation_boxes(model, ["conv3"])
    for y, x in positions(info):
        (a0, a1, b0, b1), (w0, w1, v0, v1) = box(info, y, x), info.window(y, x)
        assert w0 <= a0 and a1 <= w1 and v0 <= b0 and b1 <= v1 and (a0, a1) == (w0, w1)


def test_channels_last_layers_report_their_channels(models):
    t = layer_table(models["convnext"], SIZE, in_channels=1)
    h, w = t["stage1.0.dw"].height, t["stage1.0.dw"].width
    for name, c in [("stage1.0.norm", 6), ("stage1.0.pw1", 24), ("stage1.0.act", 24), ("stage1.0.pw2", 6)]:
        assert (t[name].channels, t[name].height, t[name].width, t[name].layout) == (c, h, w, "HWC"), name
    assert t["stage1.0.pw1"].field == t["stage1.0.dw"].field  # a Linear on channels is pointwise in space
    assert t["stage1.0"].layout == t["stem.1"].layout == "CHW"
    tokens = layer_table(models["tokens"], SIZE, in_channels=1)["mix"]
    assert (tokens.channels, tokens.layout) == (6, "LC")


def test_shapes_match_runtime_for_every_layout(models):
    for model in models.values():
        table = layer_table(model, SIZE, in_channels=1)
        outs = run_with_taps(model, torch.rand(1, 1, *SIZE), table.names(), stop=False)
        for info in table:
            shape = outs[info.name].shape[1:]
            assert len(shape) == len(info.layout), info.name
            spatial = {"H": info.height, "W": info.width, "L": info.height * info.width}
            assert all(s == spatial[d] for s, d in zip(shape, info.layout) if d in spatial), info.name
            assert shape.numel() == info.channels * info.height * info.width, info.name


# ----------------------------------------------------------------------------------------------------
# Global gates: squeeze-and-excitation (torchvision's and timm's forms) and group norm. `frozen` holds
# the gates and statistics at their values as constants, which is what the local field describes.
class SE(nn.Module):
    def __init__(self, c, timm_style=False):
        super().__init__()
        self.timm_style, self.frozen = timm_style, False
        self.fc1, self.fc2 = nn.Conv2d(c, 2, 1), nn.Conv2d(2, c, 1)

    def forward(self, x):
        s = x.mean((2, 3), keepdim=True) if self.timm_style else F.adaptive_avg_pool2d(x, 1)
        s = torch.sigmoid(self.fc2(F.silu(self.fc1(s))))
        return x * (s.detach() if self.frozen else s)


class GN(nn.GroupNorm):
    frozen = False

    def forward(self, x):
        if not self.frozen:
            return super().forward(x)
        g = x.view(x.shape[0], self.num_groups, -1)
        mean, var = g.mean(-1, keepdim=True).detach(), g.var(-1, unbiased=False, keepdim=True).detach()
        y = ((g - mean) / (var + self.eps).sqrt()).view_as(x)
        return y * self.weight[:, None, None] + self.bias[:, None, None]


class Gated(nn.Module):
    """MobileNetV3 / EfficientNet pattern: conv, SE gate, depthwise conv, group norm, a second SE."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, 2, 1)
        self.se1 = SE(4)
        self.dw = nn.Conv2d(4, 4, 5, padding=2, groups=4)
        self.gn = GN(2, 4)
        self.se2 = SE(4, timm_style=True)
        self.conv3 = nn.Conv2d(4, 3, 3, 2)

    def forward(self, x):
        x = self.se1(F.silu(self.conv1(x)))
        x = F.silu(self.gn(self.dw(x)))
        return self.conv3(x + self.se2(x))

    def freeze(self, frozen=True):
        for m in (self.se1, self.se2, self.gn):
            m.frozen = frozen
        return self


GATED = ["se1", "dw", "gn", "se2", "conv3"]


@pytest.mark.parametrize("layer", GATED)
def test_past_a_global_gate_exact_is_the_image_local_is_the_gradient_support(layer):
    torch.manual_seed(0)
    model = Gated().eval()
    info = layer_table(model, SIZE, in_channels=1)[layer]
    assert info.gated and info.field is None and info.local_field is not None
    frozen = Gated().eval()
    frozen.load_state_dict(model.state_dict())
    frozen.freeze()
    box = perturbation_boxes(model, [layer])
    for y, x in positions(info):
        assert box(info, y, x) == (0, SIZE[0], 0, SIZE[1]) == info.window(y, x)
        assert gradient_box(frozen, layer, info, y, x) == info.window(y, x, local=True), (layer, y, x)
    assert layer_table(model, SIZE, in_channels=1)["conv1"].gated is False  # before any gate


def test_unfollowed_ops_see_everything():
    class Flip(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)
            self.after = nn.Identity()

        def forward(self, x):
            return self.after(torch.flip(self.conv(x), [3]))

    torch.manual_seed(0)
    model = Flip().eval()
    info = layer_table(model, SIZE, in_channels=1)["after"]
    assert info.field is None and info.local_field is None and info.window(0, 0) == (0, SIZE[0], 0, SIZE[1])
    assert perturbation_boxes(model, ["after"])(info, 0, 0)[3] == SIZE[1]  # the flip reads the far right


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_padding_modes(mode):
    """Reflected and replicated borders read real positions next to the border: the affine field is the
    interior's; a circular border reads the far side of the map: no affine field, the exact spans hold
    (adaptive pooling's bins then join spans that are not in order)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, stride=2, padding=2, padding_mode=mode), nn.Tanh(),
                          nn.Conv2d(2, 2, 3, padding=1, padding_mode=mode), nn.AdaptiveAvgPool2d((4, 5))).eval()
    table = layer_table(model, SIZE, in_channels=1)
    box = perturbation_boxes(model, table.names())
    for info in table:
        for y, x in positions(info):
            assert box(info, y, x) == info.window(y, x), (info.name, y, x)
    expect = None if mode == "circular" else Field(2, 2, 7, 7, -4, -4)
    assert table["2"].field == expect
