"""The strided stem's input gradient in phase form (zfnet.engine.backward.StemConv): exactly the transposed
convolution, on every shape the form has edge cases for, and projections through it are the projections
without it."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import zfnet.engine.backward as B
from zfnet.engine.project import project
from zfnet.models.networks import alexnet, zfnet


@pytest.mark.parametrize("shape", [
    # C, out, kh, kw, sy, sx, py, px, H, W
    (3, 96, 7, 7, 2, 2, 1, 1, 224, 224),  # ZFNet
    (3, 96, 11, 11, 4, 4, 0, 0, 227, 227),  # AlexNet (paper)
    (3, 64, 11, 11, 4, 4, 2, 2, 224, 224),  # AlexNet (torchvision)
    (3, 64, 7, 7, 2, 2, 3, 3, 57, 61),  # ResNet's stem on an odd crop
    (1, 8, 5, 4, 3, 2, 0, 1, 31, 29),  # grey, non-square kernel and stride, rows past the last window
    (4, 16, 4, 4, 4, 4, 0, 0, 30, 33),  # patchify (ConvNeXt), RGBA
    (3, 8, 6, 9, 2, 3, 2, 4, 20, 26),  # kernel longer than the padded input allows in one direction
])
def test_stem_input_grad_is_the_transposed_convolution(shape):
    C, out, kh, kw, sy, sx, py, px, H, W = shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, C, H, W, dtype=torch.float64, generator=g)
    w = torch.randn(out, C, kh, kw, dtype=torch.float64, generator=g)
    grad = torch.randn_like(F.conv2d(x, w, None, (sy, sx), (py, px)))
    want = torch.nn.grad.conv2d_input(x.shape, w, grad, stride=(sy, sx), padding=(py, px))
    got = B.stem_input_grad(grad, w, (sy, sx), (py, px), (H, W))
    assert got.shape == want.shape
    assert torch.allclose(got, want, rtol=0, atol=1e-12 * want.abs().max().item())


def test_which_convolutions_are_stems():
    def call(cin, k, s, device="cpu", **kw):
        conv = nn.Conv2d(cin, 8, k, s, device=device, **kw).requires_grad_(False)
        x = torch.zeros(1, cin, 32, 32, device=device)
        return B.stem_conv((x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups), {})

    assert call(3, 7, 2) is not None and call(3, 11, 4) is not None and call(3, 4, 4) is not None
    assert call(3, 3, 2) is None  # SqueezeNet / MobileNet: no faster in phase form
    assert call(3, 7, 1) is None  # no stride: no phases
    assert call(16, 7, 2) is None  # not a stem: oneDNN's own backward is fast there
    assert call(3, 7, 2, dilation=2) is None
    assert call(3, 7, 2, device="meta") is None  # off the CPU: the device's own backward (not measured there)


@pytest.mark.parametrize("mode", ["deconv", "guided", "saliency"])
@pytest.mark.parametrize("net", ["zfnet", "alexnet"])
def test_projections_through_the_stem_are_unchanged(net, mode, monkeypatch):
    torch.manual_seed(0)
    model = (zfnet() if net == "zfnet" else alexnet()).double().eval()
    x = torch.randn(2, 3, 224, 224, dtype=torch.float64)
    units = ["relu2:7@3,4", "relu3:11", "relu5:3@2,2"]
    calls = []
    apply = B.StemConv.apply
    monkeypatch.setattr(B.StemConv, "apply", lambda *a: calls.append(1) or apply(*a))
    fast = project(model, x, units, mode)
    assert calls, "the stem's phase form was not used"
    monkeypatch.setattr(B, "stem_conv", lambda args, kwargs: None)
    plain = project(model, x, units, mode)
    assert torch.allclose(fast, plain, rtol=0, atol=1e-10 * plain.abs().max().item())
