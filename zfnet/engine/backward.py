"""The torch calls the projection rules catch, by kind, and the autograd functions that replace their backward.

zfnet.engine.rules decides which rule each call gets (and records it); this module only knows how to catch a
call (functional, method and in-place forms of one op) and how to run it with another backward: computed
exactly as the model asked, in place or not, with a backward of relu(g) [* the forward's gate], g * a
scale taken from the forward, or 0 for a gate held constant.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from ..inspect.fields import arg, pair

T = torch.Tensor


# ----------------------------------------------------------------------------------------------------
# Which torch calls are which kind.
def _fns(*names, where=F):
    return [getattr(where, n) for n in names if hasattr(where, n)]


# Rectifiers: function -> (kind, position of its `inplace` argument, or True for the in-place variants).
RECTIFIERS: dict = {}
for _f, _kind, _pos in [
    (F.relu, "ReLU", 1), (torch.relu, "ReLU", None), (T.relu, "ReLU", None),
    (F.relu_, "ReLU", True), (torch.relu_, "ReLU", True), (T.relu_, "ReLU", True),
    (F.leaky_relu, "LeakyReLU", 2), (F.leaky_relu_, "LeakyReLU", True), (F.prelu, "PReLU", None),
    (F.elu, "ELU", 2), (F.elu_, "ELU", True), (F.celu, "CELU", 2), (F.celu_, "CELU", True),
    (F.selu, "SELU", 1), (F.selu_, "SELU", True), (F.silu, "SiLU", 1), (F.gelu, "GELU", None),
    (F.hardswish, "Hardswish", 1), (F.mish, "Mish", 1), (F.softplus, "Softplus", None),
]:
    RECTIFIERS[_f] = (_kind, _pos)
HARDTANH = {F.hardtanh: 3, F.relu6: 1, F.hardtanh_: True}
CLAMP = {torch.clamp: None, T.clamp: None, torch.clip: None, T.clip: None, T.clamp_: True, T.clip_: True}
# The out-of-place twin of each always-in-place variant (its derivative is taken on a copy).
OUT_OF_PLACE = {F.relu_: F.relu, torch.relu_: torch.relu, T.relu_: T.relu, F.leaky_relu_: F.leaky_relu,
                 F.elu_: F.elu, F.celu_: F.celu, F.selu_: F.selu, F.hardtanh_: F.hardtanh, T.clamp_: T.clamp,
                 T.clip_: T.clip, torch.sigmoid_: torch.sigmoid, T.sigmoid_: T.sigmoid, torch.tanh_: torch.tanh,
                 T.tanh_: T.tanh}
SIGMOIDS = {torch.sigmoid: ("Sigmoid", None), T.sigmoid: ("Sigmoid", None), torch.sigmoid_: ("Sigmoid", True),
          T.sigmoid_: ("Sigmoid", True), F.hardsigmoid: ("Hardsigmoid", 1)}
TANH = {torch.tanh: None, T.tanh: None, torch.tanh_: True, T.tanh_: True}
MUL = {torch.mul: False, T.mul: False, T.__mul__: False, T.__rmul__: False, T.mul_: True, T.__imul__: True}
RECORDED = {F.batch_norm: "BatchNorm", F.local_response_norm: "LocalResponseNorm",
             **{f: "MaxPool" for f in _fns("max_pool1d", "max_pool2d", "max_pool3d", "max_pool1d_with_indices",
                                           "max_pool2d_with_indices", "max_pool3d_with_indices",
                                           "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d")},
             **{f: "AvgPool" for f in _fns("avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d",
                                           "adaptive_avg_pool2d", "adaptive_avg_pool3d")}}
NORMS = {F.layer_norm: "LayerNorm", F.group_norm: "GroupNorm"}
MEANS = {torch.mean, T.mean}  # global average pooling when over (H, W)
# Nonlinearities (and normalizations written with them) that have no rule: their plain gradient is used,
# and the user is told.
NO_RULE = {f: f.__name__.strip("_") for f in [
    *_fns("softsign", "tanhshrink", "hardshrink", "softshrink", "logsigmoid", "rrelu", "rrelu_", "glu",
          "threshold", "threshold_", "softmax", "log_softmax", "softmin", "instance_norm", "lp_pool1d",
          "lp_pool2d", "lp_pool3d"),
    torch.erf, T.erf, torch.exp, T.exp]}

# ----------------------------------------------------------------------------------------------------
# The backward functions.
def slope(fn):
    """x -> max(f'(x), 0) for a pointwise op f = fn (autograd's own derivative, taken on a copy of x)."""
    def gate(x):
        with torch.enable_grad():
            xx = x.detach().requires_grad_(True)
            (d,) = torch.autograd.grad(fn(xx), xx, torch.ones_like(xx))
        return d.clamp_(min=0)
    return gate


class Rule(torch.autograd.Function):
    """An op computed exactly as the model asked (in place or not) with the backward
    0 if `role` turned out to be a gate, else [relu](g) [* factor(x)]; the factor is taken from the forward
    (the guided gate, a normalization's weight / std), before an in-place op or later code can change x."""

    @staticmethod
    def forward(ctx, x, call, rectify: bool, factor, role, inplace: bool):
        ctx.rectify, ctx.role = rectify, role
        ctx.factor = factor(x) if factor is not None else None
        out = call(x)
        if inplace:
            ctx.mark_dirty(x)
        return out

    @staticmethod
    def backward(ctx, g):
        if ctx.role is not None and ctx.role.role == "gate":
            return torch.zeros_like(g), None, None, None, None, None
        if ctx.rectify:
            g = g.clamp(min=0)
        if ctx.factor is not None:
            g = g * ctx.factor
        return g, None, None, None, None, None


def norm_scale(func, args, kwargs):
    """weight / std of a LayerNorm / GroupNorm call, shaped to broadcast over its input."""
    weight = arg(args, kwargs, 2, "weight", None)
    eps = arg(args, kwargs, 4, "eps", 1e-5)

    def scale(x):
        if func is F.layer_norm:
            dims = tuple(range(x.dim() - len(arg(args, kwargs, 1, "normalized_shape", ())), x.dim()))
            s = (x.var(dims, unbiased=False, keepdim=True) + eps).rsqrt()
            return s * weight if weight is not None else s
        groups = arg(args, kwargs, 1, "num_groups", 1)
        n, c = x.shape[:2]
        s = (x.reshape(n, groups, -1).var(-1, unbiased=False) + eps).rsqrt().repeat_interleave(c // groups, 1)
        s = s.view(n, c, *([1] * (x.dim() - 2)))
        return s * weight.view(1, c, *([1] * (x.dim() - 2))) if weight is not None else s
    return scale


class Role:
    """What a sigmoid-like output turned out to be: "activation", "gate" (multiplied a map) or "fused" (the
    sigmoid of x multiplied x: SiLU / Hardswish written out)."""

    __slots__ = ("kind", "input", "role", "__weakref__")

    def __init__(self, kind, x):
        self.kind, self.input, self.role = kind, weakref.ref(x), "activation"


def pure(func, args, kwargs, pos):
    """The op as an out-of-place function of its first argument."""
    func = OUT_OF_PLACE.get(func, func)
    args, kwargs = list(args[1:]), dict(kwargs)
    if isinstance(pos, int) and not isinstance(pos, bool):
        if len(args) >= pos:
            args[pos - 1] = False
        if "inplace" in kwargs:
            kwargs["inplace"] = False
    return lambda t: func(t, *args, **kwargs)


def is_inplace(args, kwargs, pos) -> bool:
    return pos is True or (pos is not None and bool(arg(args, kwargs, pos, "inplace", False)))


def spatial_mean(dim) -> bool:
    dims = {d % 4 for d in (dim if isinstance(dim, (tuple, list)) else [dim])} if dim is not None else set()
    return dims == {2, 3}


# ----------------------------------------------------------------------------------------------------
# The input gradient of a strided stem (the first convolution: few input channels, a large kernel, a
# stride): the transposed convolution that writes a projection's pixels. oneDNN computes it as a backward
# convolution with 3 output channels, which it does slowly; the same sum is a plain convolution with
# C * sy * sx outputs (one per colour and output phase) followed by a pixel shuffle. Measured on this
# project's CPU (2 threads, 8 images of 224 px, channels last): ZFNet's 7x7 / 2 stem 52 -> 27 ms, ResNet's
# 7x7 / 2 30 -> 12 ms, AlexNet's 11x11 / 4 26 -> 7 ms, ConvNeXt's 4x4 / 4 4.9 -> 1.9 ms; a 3x3 / 2 stem
# (SqueezeNet, MobileNet) gains nothing (7.2 against 7.4 ms) and keeps autograd's own backward.
CONV2D = {F.conv2d, torch.conv2d}
_STEM_CHANNELS = 4  # input channels of a stem (RGB, RGBA, grey)


def stem_conv(args, kwargs):
    """(weight, bias, stride, padding) when this conv2d call is a stem whose input gradient the phase form
    computes faster, else None."""
    x, weight = args[0], arg(args, kwargs, 1, "weight", None)
    stride, padding = arg(args, kwargs, 3, "stride", 1), arg(args, kwargs, 4, "padding", 0)
    dilation, groups = arg(args, kwargs, 5, "dilation", 1), arg(args, kwargs, 6, "groups", 1)
    # CPU only: measured against oneDNN; on a GPU cuDNN's own backward is kept (the form is not measured there)
    if not (x.device.type == "cpu" and isinstance(weight, torch.Tensor) and not weight.requires_grad
            and x.dim() == 4 and weight.dim() == 4
            and x.shape[1] <= _STEM_CHANNELS and groups == 1 and not isinstance(padding, str)
            and pair(dilation) == (1, 1)):
        return None
    s, k = pair(stride), weight.shape[-2:]
    if max(s) < 2 or max(k) < 4:
        return None
    return weight, arg(args, kwargs, 2, "bias", None), s, pair(padding)


def phase_weight(weight: torch.Tensor, stride: tuple[int, int]) -> torch.Tensor:
    """(O, C, kh, kw) -> (C * sy * sx, O, ceil(kh / sy), ceil(kw / sx)): filter phase (ry, rx) of colour c,
    flipped, so that a plain convolution of the output gradient gives input pixels of that phase."""
    out, C, kh, kw = weight.shape
    sy, sx = stride
    my, mx = -(-kh // sy), -(-kw // sx)
    w = F.pad(weight, (0, mx * sx - kw, 0, my * sy - kh))  # taps past the kernel are 0
    w = w.view(out, C, my, sy, mx, sx).permute(1, 3, 5, 0, 2, 4).flip(-2, -1)  # tap m*s + r -> (r, m), m flipped
    return w.reshape(C * sy * sx, out, my, mx).contiguous()


def stem_input_grad(g: torch.Tensor, weight: torch.Tensor, stride, padding, size) -> torch.Tensor:
    """The input gradient of conv2d(x, weight, stride, padding) for output gradient g (N, O, h, w) and an
    input of spatial `size`: exactly torch.nn.grad.conv2d_input, in phase form."""
    C = weight.shape[1]
    (sy, sx), (py, px), (H, W) = stride, padding, size
    wp = phase_weight(weight.to(g.dtype), stride)
    my, mx = wp.shape[-2:]
    o = F.conv2d(g, wp, padding=(my - 1, mx - 1))  # (N, C*sy*sx, h+my-1, w+mx-1)
    n, _, hq, wq = o.shape
    full = o.view(n, C, sy, sx, hq, wq).permute(0, 1, 4, 2, 5, 3).reshape(n, C, hq * sy, wq * sx)
    if hq * sy < py + H or wq * sx < px + W:  # input rows and columns past the last window get no gradient
        full = F.pad(full, (0, max(0, px + W - wq * sx), 0, max(0, py + H - hq * sy)))
    return full[:, :, py:py + H, px:px + W]


class StemConv(torch.autograd.Function):
    """conv2d exactly as the model asked; its input gradient in phase form (`stem_input_grad`)."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding):
        ctx.save_for_backward(weight)
        ctx.stride, ctx.padding, ctx.size = stride, padding, tuple(x.shape[-2:])
        return F.conv2d(x, weight, bias, stride, padding)

    @staticmethod
    def backward(ctx, g):
        (weight,) = ctx.saved_tensors
        return stem_input_grad(g, weight, ctx.stride, ctx.padding, ctx.size), None, None, None, None
