"""The backward rules of the projection engine (Sec. 2.1), for every nonlinearity a convnet uses.

The deconvnet of Zeiler & Fergus (unpool with the switches, rectify, filter with the transposed filters)
is autograd with one change: the backward of every rectifier becomes relu(grad). Max-pool backward already
routes through the switches and conv backward already is the transposed filter. Guided backprop
(Springenberg et al.) also keeps the forward's gate; saliency (Simonyan et al.) is the plain gradient.
Captum and Zennit define the two rules for nn.ReLU modules only. Modern networks rectify with ReLU6, SiLU,
GELU, Hardswish, Mish ..., gate maps with sigmoids and normalize per sample; left alone, all of those keep
their plain gradient and deconv = guided = saliency on EfficientNet or ConvNeXt. The generalisation here
(table and reasons: docs/projection-rules.md), one rule per family of ops:

* rectifiers (ReLU, ReLU6, LeakyReLU, PReLU, ELU, CELU, SELU, SiLU, GELU, Hardswish, Mish, Softplus, and
  clamp(min=0)): every one maps x to about max(0, x), so the deconvnet treats each as the paper treats
  ReLU: deconv rectifies the signal, relu(g), reading nothing from the forward pass (and staying
  positively homogeneous, so a projection scales with its seed); guided also keeps the forward's local
  gate where it opens, relu(g) * max(f'(x), 0), which for ReLU is exactly Springenberg's mask, and keeps
  guided's invariant that only non-negative signal leaves a rectifier. f' is autograd's own derivative of
  the op, so every variant (GELU's tanh form, PReLU's slopes) is exact.
* gates (a sigmoid or hard sigmoid whose output multiplies a map: squeeze-and-excitation): held constant
  in deconv and guided. The map is scaled by the gate's forward value, as a filter weight scales it, and no
  signal enters the gate's own branch, which pools the whole map and would spread every projection over
  the whole image (the "local field" of the layer table makes the same choice).
* saturating ops (Tanh, Hardtanh, a sigmoid that gates nothing): they do not rectify, so the deconvnet
  has nothing to invert and passes the signal through, g, as it passes LRN; guided keeps their gradient.
* normalizations: batch norm in eval is a fixed per-channel affine map (it folds into the filters): its
  gradient, in every mode. LayerNorm and GroupNorm use per-sample statistics: deconv holds them constant
  (g * weight / std), the data-dependent part fixed by the forward as the pooling switches are; LRN is
  passed through as in the paper's deconvnet. `backprop_norm=True` backpropagates all three instead;
  guided and saliency always do.
* pooling: max pooling routes to the switches (the paper's unpooling), average pooling is its transposed
  averaging filter: the gradient, in every mode.

The ops are caught with a TorchFunctionMode rather than module hooks, so functional forms (`F.silu`,
`torch.sigmoid`, `x.sigmoid()`, `x * x.sigmoid()`), in-place variants (`nn.ReLU(inplace=True)`,
`x.relu_()`) and reused modules all get their rule. Never silent: the mode records each kind it met on
the input's path and the rule it applied (`BackwardRules.record`, `rules_on_path`), and a nonlinearity
with no rule gets one stderr line naming it (its plain gradient is used).
"""

from __future__ import annotations

import sys
import weakref
from collections import Counter
from contextlib import contextmanager
from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..inspect.fields import arg
from ..inspect.layers import run_with_taps
from . import backward as B

__all__ = ["MODES", "KINDS", "BackwardRules", "projection_state", "rule_for", "rules_on_path"]

MODES = ("deconv", "guided", "saliency")


# ----------------------------------------------------------------------------------------------------
# The table: kind -> family; a family's rule per mode is in `rule_for`.
KINDS = {
    "ReLU": "rectifier", "ReLU6": "rectifier", "clipped ReLU": "rectifier", "clamp(min=0)": "rectifier",
    "LeakyReLU": "rectifier", "PReLU": "rectifier", "ELU": "rectifier", "CELU": "rectifier",
    "SELU": "rectifier", "SiLU": "rectifier", "SiLU (x * sigmoid(x))": "rectifier", "GELU": "rectifier",
    "Hardswish": "rectifier", "Hardswish (x * hardsigmoid(x))": "rectifier", "Mish": "rectifier",
    "Softplus": "rectifier",
    "Sigmoid gate": "gate", "Hardsigmoid gate": "gate",
    "Sigmoid": "saturating", "Hardsigmoid": "saturating", "Tanh": "saturating", "Hardtanh": "saturating",
    "BatchNorm": "batch norm", "LayerNorm": "sample norm", "GroupNorm": "sample norm",
    "LocalResponseNorm": "lrn",
    "MaxPool": "max pool", "AvgPool": "avg pool",
}

_RULES = {
    ("rectifier", "deconv"): "rectify the signal: relu(g)",
    ("rectifier", "guided"): "rectify the signal, keep the forward's gate: relu(g) * max(f'(x), 0)",
    ("gate", "deconv"): "held constant: the map is scaled by the gate's forward value, nothing enters its branch",
    ("saturating", "deconv"): "passed through: g",
    ("sample norm", "deconv"): "statistics held constant: g * weight / std",
    ("lrn", "deconv"): "passed through: g",
    ("max pool", None): "gradient: routed to the forward's switches (unpooling)",
    ("avg pool", None): "gradient: the averaging filter, transposed",
    ("batch norm", None): "gradient: in eval a fixed per-channel affine map",
}
_RULES[("gate", "guided")] = _RULES[("gate", "deconv")]
_UNRULED = "gradient (no projection rule for this kind)"


def rule_for(kind: str, mode: str, pass_norm: bool = True) -> str:
    """What `mode` does at an op of `kind` (a KINDS key, or any other name: an op with no rule).

    pass_norm: deconv's default (LayerNorm / GroupNorm statistics held constant, LRN passed through);
    False backpropagates them (`project(..., backprop_norm=True)`).
    """
    family = KINDS.get(kind)
    if family is None:
        return "gradient" if mode == "saliency" else _UNRULED
    if family in ("sample norm", "lrn") and not pass_norm:
        return "gradient"
    return _RULES.get((family, mode)) or _RULES.get((family, None)) or "gradient"


_WARNED: set[str] = set()  # kinds already named on stderr in this process


def _warn(kind: str, mode: str):
    if kind not in _WARNED:
        _WARNED.add(kind)
        print(f"zfnet: warning: no {mode} projection rule for {kind}: its plain gradient is used "
              f"(rules: docs/projection-rules.md)", file=sys.stderr)


# ----------------------------------------------------------------------------------------------------
class BackwardRules(TorchFunctionMode):
    """While active, every op on the input's path gets the backward of `mode` (see the module docstring),
    and is recorded: `record()` lists each kind met and the rule applied.

    Args:
        mode: "deconv", "guided" or "saliency".
        pass_norm: deconv only: hold LayerNorm / GroupNorm statistics constant and pass LRN through
            (the default of `project`); False backpropagates them.
    """

    def __init__(self, mode: str, pass_norm: bool):
        super().__init__()
        self.mode = mode
        self.rectify = mode in ("deconv", "guided")  # saliency keeps autograd's own backward everywhere
        self.guided = mode == "guided"
        self.pass_norm = pass_norm and mode == "deconv"
        self.calls: Counter = Counter()  # kind -> calls met on the path (every entry of the mode adds up)
        self._roles: list[B.Role] = []  # sigmoid-like calls: counted by the role they turned out to have
        self._outputs: dict = {}  # id(sigmoid output) -> (weakref to it, its Role), for this entry only

    def __exit__(self, *exc):
        self._outputs.clear()
        return super().__exit__(*exc)

    def record(self) -> dict:
        """{"mode", "kinds": [{"kind", "calls", "rule"}] in table order (kinds with no rule last),
        "unruled": [kinds with no rule]}."""
        calls = Counter(self.calls)
        for r in self._roles:
            if r.role != "fused":  # a fused sigmoid is counted as the SiLU / Hardswish it belongs to
                calls[f"{r.kind} gate" if r.role == "gate" else r.kind] += 1
        order = list(KINDS)
        names = sorted(calls, key=lambda k: (order.index(k) if k in KINDS else len(order), k))
        kinds = [{"kind": k, "calls": calls[k], "rule": rule_for(k, self.mode, self.pass_norm)} for k in names]
        unruled = [k for k in names if k not in KINDS] if self.mode != "saliency" else []
        return {"mode": self.mode, "kinds": kinds, "unruled": unruled}

    def _met(self, kind: str):
        self.calls[kind] += 1
        if kind not in KINDS and self.mode != "saliency":
            _warn(kind, self.mode)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        x = args[0] if args else None
        # Only ops that autograd records on the input's path need (or get) a rule; backward passes run with
        # grad disabled, so the rules' own backward arithmetic is never caught.
        if not (torch.is_grad_enabled() and isinstance(x, torch.Tensor) and x.requires_grad):
            if func in B.MUL and self._outputs:
                return self._mul(func, args, kwargs)
            return func(*args, **kwargs)
        if func in B.RECTIFIERS:
            kind, pos = B.RECTIFIERS[func]
            return self._rectifier(kind, func, args, kwargs, pos)
        if func in B.HARDTANH or func in B.CLAMP:
            return self._clip(func, args, kwargs)
        if func in B.SIGMOIDS:
            return self._sigmoid(func, args, kwargs)
        if func in B.TANH:
            return self._saturating("Tanh", func, args, kwargs, B.TANH[func])
        if func in B.MUL:
            return self._mul(func, args, kwargs)
        if func in B.NORMS:
            self._met(B.NORMS[func])
            if self.pass_norm:
                return B.Rule.apply(x, lambda t: func(t, *args[1:], **kwargs), False, B.norm_scale(func, args, kwargs),
                                    None, False)
            return func(*args, **kwargs)
        if func in B.RECORDED:
            self._met(B.RECORDED[func])
            if self.pass_norm and func is F.local_response_norm:
                return B.Rule.apply(x, lambda t: func(t, *args[1:], **kwargs), False, None, None, False)
            return func(*args, **kwargs)
        if func in B.CONV2D:
            # Not a rule: the exact input gradient of a strided stem, computed in a faster form
            stem = B.stem_conv(args, kwargs)
            return B.StemConv.apply(x, *stem) if stem else func(*args, **kwargs)
        if func in B.NO_RULE:
            self._met(B.NO_RULE[func])
        elif func in B.MEANS and x.dim() == 4 and B.spatial_mean(arg(args, kwargs, 1, "dim", None)):
            self._met("AvgPool")  # global average pooling written as x.mean((2, 3))
        return func(*args, **kwargs)

    # -- the families ---------------------------------------------------------------------------------
    def _rectifier(self, kind, func, args, kwargs, pos, gate=None):
        self._met(kind)
        if not self.rectify:
            return func(*args, **kwargs)
        if self.guided and gate is None:
            gate = B.slope(B.pure(func, args, kwargs, pos))
        call = lambda t: func(t, *args[1:], **kwargs)
        return B.Rule.apply(args[0], call, True, gate if self.guided else None, None, B.is_inplace(args, kwargs, pos))

    def _clip(self, func, args, kwargs):
        """hardtanh / relu6 / clamp: a rectifier when the lower bound is 0, else saturating (hardtanh) or
        without a rule (clamp)."""
        if func is F.relu6:
            lo, hi = 0.0, 6.0
        elif func in B.HARDTANH:
            lo, hi = arg(args, kwargs, 1, "min_val", -1.0), arg(args, kwargs, 2, "max_val", 1.0)
        else:
            lo, hi = arg(args, kwargs, 1, "min", None), arg(args, kwargs, 2, "max", None)
            if not (isinstance(lo, (int, float)) and lo == 0 and (hi is None or isinstance(hi, (int, float)))):
                self._met("clamp")
                return func(*args, **kwargs)
        pos = B.HARDTANH.get(func, B.CLAMP.get(func))
        if lo != 0:
            return self._saturating("Hardtanh", func, args, kwargs, pos)
        kind = "clamp(min=0)" if func in B.CLAMP else "ReLU6" if hi == 6 else "clipped ReLU"
        hi = None if hi is None else float(hi)
        mask = (lambda x: x > 0) if hi is None else (lambda x: (x > 0) & (x < hi))  # f' is 0 or 1
        return self._rectifier(kind, func, args, kwargs, pos, gate=mask)

    def _saturating(self, kind, func, args, kwargs, pos):
        self._met(kind)
        if not self.rectify:
            return func(*args, **kwargs)
        slope = B.slope(B.pure(func, args, kwargs, pos)) if self.guided else None
        call = lambda t: func(t, *args[1:], **kwargs)
        return B.Rule.apply(args[0], call, False, slope, None, B.is_inplace(args, kwargs, pos))

    def _sigmoid(self, func, args, kwargs):
        kind, pos = B.SIGMOIDS[func]
        x = args[0]
        role = B.Role(kind, x)
        self._roles.append(role)
        if self.rectify:
            slope = B.slope(B.pure(func, args, kwargs, pos)) if self.guided else None
            out = B.Rule.apply(x, lambda t: func(t, *args[1:], **kwargs), False, slope, role,
                               B.is_inplace(args, kwargs, pos))
        else:
            out = func(*args, **kwargs)
        self._outputs[id(out)] = (weakref.ref(out), role)
        return out

    def _mul(self, func, args, kwargs):
        """x * sigmoid(z): a gate (z is not x) or SiLU / Hardswish written out (z is x)."""
        kw = {k: v for k, v in kwargs.items() if k != "other"}
        ops = [args[0], args[1] if len(args) > 1 else kwargs.get("other")]
        for i, t in enumerate(ops):
            entry = self._outputs.get(id(t)) if isinstance(t, torch.Tensor) else None
            if entry is None or entry[0]() is not t:
                continue
            role, x = entry[1], ops[1 - i]
            if not (isinstance(x, torch.Tensor) and role.input() is x and x.requires_grad):
                role.role = "gate"
                continue
            role.role = "fused"
            if B.MUL[func] and i == 0:  # sigmoid(x).mul_(x): the result lives in the sigmoid's output
                self._met(f"{role.kind.lower()}(x).mul_(x)")
                return func(*args, **kwargs)
            kind = "SiLU (x * sigmoid(x))" if role.kind == "Sigmoid" else "Hardswish (x * hardsigmoid(x))"
            self._met(kind)
            if not self.rectify:
                return func(*args, **kwargs)
            sig = torch.sigmoid if role.kind == "Sigmoid" else F.hardsigmoid
            call = (lambda u, t=t: func(u, t, **kw)) if i == 1 else (lambda u, t=t: func(t, u, **kw))
            gate = B.slope(lambda u, sig=sig: u * sig(u)) if self.guided else None
            return B.Rule.apply(x, call, True, gate, None, B.MUL[func])
        return func(*args, **kwargs)


# ----------------------------------------------------------------------------------------------------
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


def rules_on_path(model: nn.Module, images: torch.Tensor | tuple[int, int], layers: Iterable[str],
                  mode: str = "deconv", *, backprop_norm: bool = False, in_channels: int = 3) -> dict:
    """Run the forward pass to the deepest of `layers` under the rules of `mode` and return what it met:
    the metadata a projection's result records (`BackwardRules.record`, plus "backprop_norm").

    Args:
        images: a (N, C, H, W) input (its first image is used) or an input size (a zero image).
    """
    p = next(model.parameters(), None)
    if isinstance(images, torch.Tensor):
        x = images[:1].detach()
    else:
        x = torch.zeros(1, in_channels, *images, device=p.device if p is not None else "cpu",
                        dtype=p.dtype if p is not None and p.is_floating_point() else torch.float32)
    rules = BackwardRules(mode, pass_norm=(mode == "deconv" and not backprop_norm))
    with projection_state(model), torch.enable_grad():
        leaf = x.clone().requires_grad_(True)
        with rules:  # a clone keeps the leaf out of reach of a model whose first op is in place
            run_with_taps(model, leaf.clone(), list(layers), stop=True, detach=False)
    return {**rules.record(), "backprop_norm": bool(backprop_norm)}
