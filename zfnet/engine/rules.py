"""The three backward rules of the projection engine, and the guard that leaves a model as it was.

The deconvnet of Sec. 2.1 (unpool with the switches, rectify, filter with the transposed filters) is
autograd with one change: the backward of every rectifier becomes relu(grad_out). Max-pool backward
already routes through the switches and conv backward already is the transposed filter. Guided backprop
(Springenberg et al.) also keeps the forward mask; saliency (Simonyan et al.) is the plain gradient.

The rectifiers are caught with a TorchFunctionMode rather than module hooks, so functional `F.relu`,
`torch.relu`, `x.relu_()`, in-place `nn.ReLU(inplace=True)` and ReLU6 (`hardtanh(0, 6)`) all get the rule.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..inspect.fields import arg

__all__ = ["MODES", "BackwardRules", "projection_state"]

MODES = ("deconv", "guided", "saliency")

_RELU = {F.relu, torch.relu, torch.Tensor.relu}
_RELU_INPLACE = {F.relu_, torch.relu_, torch.Tensor.relu_}
_HARDTANH = {F.hardtanh, F.hardtanh_, F.relu6}


class _Rectify(torch.autograd.Function):
    """relu / clamp(0, hi) whose backward is relu(grad_out) (deconv), times the forward mask (guided)."""

    @staticmethod
    def forward(ctx, x, guided: bool, inplace: bool, hi):
        if inplace:
            out = x.clamp_(min=0, max=hi)
            ctx.mark_dirty(x)
        else:
            out = x.clamp(min=0, max=hi)
        # The mask, not the output, is kept: code after an in-place ReLU may modify its output again.
        ctx.mask = ((out > 0) if hi is None else (out > 0) & (out < hi)) if guided else None
        return out

    @staticmethod
    def backward(ctx, g):
        g = g.clamp(min=0)
        if ctx.mask is not None:
            g = g * ctx.mask
        return g, None, None, None


class _PassThrough(torch.autograd.Function):
    """A normalization computed forward, identity backward: the paper's deconvnet has no LRN layer."""

    @staticmethod
    def forward(ctx, x, fn, args, kwargs):
        return fn(x, *args, **kwargs)

    @staticmethod
    def backward(ctx, g):
        return g, None, None, None


class BackwardRules(TorchFunctionMode):
    """While active, every rectifier called gets the backward of `mode`; LRN is passed through if asked."""

    def __init__(self, mode: str, pass_norm: bool):
        super().__init__()
        self.rectify = mode in ("deconv", "guided")  # saliency keeps autograd's own ReLU backward
        self.guided = mode == "guided"
        self.pass_norm = pass_norm

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.rectify:
            if func in _RELU or func in _RELU_INPLACE:
                inplace = func in _RELU_INPLACE or bool(arg(args, kwargs, 1, "inplace", False))
                return _Rectify.apply(args[0], self.guided, inplace, None)
            if func in _HARDTANH:
                if func is F.relu6:
                    lo, hi, inplace = 0.0, 6.0, arg(args, kwargs, 1, "inplace", False)
                else:
                    lo = arg(args, kwargs, 1, "min_val", -1.0)
                    hi = arg(args, kwargs, 2, "max_val", 1.0)
                    inplace = func is F.hardtanh_ or arg(args, kwargs, 3, "inplace", False)
                if lo == 0:  # ReLU6 and other clipped ReLUs; hardtanh(-1, 1) is not a rectifier
                    return _Rectify.apply(args[0], self.guided, bool(inplace), float(hi))
        if self.pass_norm and func is F.local_response_norm:
            return _PassThrough.apply(args[0], func, tuple(args[1:]), kwargs)
        return func(*args, **kwargs)


@contextmanager
def projection_state(model: nn.Module):
    """Eval mode and no parameter gradients while projecting; everything restored on every exit."""
    params = [(p, p.requires_grad) for p in model.parameters()]
    modes = [(m, m.training) for m in model.modules()]
    try:
        for p, _ in params:
            p.requires_grad_(False)
        model.eval()  # dropout off, batch norm on running statistics: projections are deterministic
        yield
    finally:
        for p, r in params:
            p.requires_grad_(r)
        for m, t in modes:
            m.training = t
