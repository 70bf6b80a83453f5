"""How far each op of a traced model reaches: the spatial locality incremental occlusion relies on.

zfnet.engine.incremental recomputes, per occluder position, only the units an occluder can change. For that it
needs, for every op of the model's torch.fx graph, whether it is a sliding window (and its kernel, stride
and padding), pointwise in space, a global average, or something that mixes all positions. This module
answers that from the op itself (module type and arguments), or for opaque modules from the layer table.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..inspect.fields import Field, pair

__all__ = ["Unsupported", "trace", "classify", "call", "maybe_inplace"]

# Spatially pointwise: every output unit depends only on the input units at its own position.
_POINT_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish,
                  nn.Hardsigmoid, nn.Mish, nn.Identity, nn.Dropout, nn.Dropout2d, nn.LocalResponseNorm,
                  nn.BatchNorm2d)
_POINT_FUNCTIONS = {torch.relu, torch.relu_, F.relu, F.relu6, F.leaky_relu, F.gelu, F.silu, torch.sigmoid,
                    torch.tanh, F.hardswish, F.dropout, operator.add, operator.mul, operator.sub, operator.truediv,
                    operator.iadd, torch.add, torch.mul, torch.sub, torch.cat}
_POINT_METHODS = {"relu", "relu_", "sigmoid", "tanh", "add", "add_", "mul", "mul_", "sub", "div", "clamp",
                  "clamp_min", "contiguous"}


class _Tracer(fx.Tracer):
    def __init__(self, leaves: frozenset[str] = frozenset()):
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, m, qualname):
        return qualname in self.leaves or super().is_leaf_module(m, qualname)


def trace(model: nn.Module) -> fx.Graph | None:
    """The model's graph down to torch.nn's own modules; where that fails (data-dependent Python inside
    a block), with the blocks of its Sequentials as opaque modules."""
    blocks = frozenset(f"{name}.{c}" if name else c for name, m in model.named_modules()
                       if isinstance(m, nn.Sequential) for c, _ in m.named_children())
    for leaves in (frozenset(), blocks):
        try:
            return _Tracer(leaves).trace(model)
        except Exception:
            continue
    return None


def _window_op(mod: nn.Module):
    """(axes, op on an exact crop, pad value) for the sliding-window modules we can run unpadded."""
    if isinstance(mod, nn.Conv2d) and mod.padding_mode == "zeros":
        k, s, d = mod.kernel_size, mod.stride, mod.dilation
        keff = [d[i] * (k[i] - 1) + 1 for i in range(2)]
        p = mod.padding
        if p == "valid":
            p = (0, 0)
        elif p == "same":  # PyTorch puts the odd pixel at the end: only the leading pad matters here
            p = tuple((keff[i] - 1) // 2 for i in range(2))
        return (tuple(zip(keff, s, p)),
                lambda t: F.conv2d(t, mod.weight, mod.bias, mod.stride, 0, mod.dilation, mod.groups), 0.0)
    if isinstance(mod, nn.MaxPool2d) and not mod.return_indices:
        k, d, p = pair(mod.kernel_size), pair(mod.dilation), pair(mod.padding)
        s = pair(mod.stride or mod.kernel_size)
        keff = [d[i] * (k[i] - 1) + 1 for i in range(2)]
        # ceil_mode only adds output units whose window runs past the end: -inf there is the same
        return (tuple(zip(keff, s, p)), lambda t: F.max_pool2d(t, k, s, 0, d), float("-inf"))
    if isinstance(mod, nn.AvgPool2d) and not mod.ceil_mode and (mod.count_include_pad or mod.padding in (0, (0, 0))):
        k, p = pair(mod.kernel_size), pair(mod.padding)
        s = pair(mod.stride or mod.kernel_size)
        return (tuple(zip(k, s, p)),
                lambda t: F.avg_pool2d(t, k, s, 0, False, True, mod.divisor_override), 0.0)
    return None


def _local_geometry(fin: Field, fout: Field) -> tuple | None:
    """(k, s, p) per axis of a module mapping field fin to fout, or None if not a plain sliding window."""
    out = []
    for jin, jout, zin, zout, sin, sout in ((fin.jump_y, fout.jump_y, fin.size_y, fout.size_y, fin.start_y,
                                             fout.start_y), (fin.jump_x, fout.jump_x, fin.size_x, fout.size_x,
                                                             fin.start_x, fout.start_x)):
        if jout % jin or (zout - zin) % jin or (sin - sout) % jin:
            return None
        k, s, p = (zout - zin) // jin + 1, jout // jin, (sin - sout) // jin
        if k < 1 or s < 1 or p < 0:
            return None
        out.append((k, s, p))
    return tuple(out)


def _no_spatial_extent(v) -> bool:
    """A constant operand that broadcasts the same way over every spatial position."""
    return not isinstance(v, torch.Tensor) or v.dim() == 0 or (v.dim() >= 3 and tuple(v.shape[-2:]) == (1, 1))


def classify(model: nn.Module, node: fx.Node, env: dict, deps: list, fields: dict, table) -> tuple[str, dict]:
    """How node reaches over its input-dependent inputs `deps`, from their clean values in env:
    (kind, details), kind one of "point", "window", "box", "mean", "global", "meta" (see
    zfnet.engine.incremental). Records the node's receptive field in `fields` where it has one."""
    value = env[node]
    clean_in = [env[d] for d in deps]
    field_in = [fields.get(d) for d in deps]
    kind, extra = "global", {}
    maps = all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in clean_in)
    if not isinstance(value, torch.Tensor):
        if isinstance(value, (tuple, list)) and any(isinstance(v, torch.Tensor) for v in value):
            raise Unsupported  # ops with several tensor outputs: not followed
        kind = "meta"  # sizes and shapes: computed per batch from the full shapes
    elif maps and len(deps) == 1 and _global_mean(model, node, clean_in[0], value):
        kind = "mean"
    elif value.dim() == 4 and maps and len(deps) == 1 and node.op == "call_module":
        mod = model.get_submodule(node.target)
        win = _window_op(mod)
        if win is not None:
            kind, extra = "window", dict(axes=win[0], op=win[1], pad=win[2])
        elif isinstance(mod, _POINT_MODULES) and value.shape[-2:] == clean_in[0].shape[-2:]:
            kind = "point"  # (BatchNorm and dropout in eval mode: Incremental.build declines training mode)
        elif node.target in table and table[node.target].field is not None and field_in[0] is not None \
                and sum(n.op == "call_module" and n.target == node.target for n in node.graph.nodes) == 1:
            # (the layer table knows a module's first call only)
            axes = _local_geometry(field_in[0], table[node.target].field)
            if axes is not None:
                kind, extra = "box", dict(axes=axes)
    elif value.dim() == 4 and maps and node.op in ("call_function", "call_method"):
        known = node.target in _POINT_FUNCTIONS if node.op == "call_function" else node.target in _POINT_METHODS
        others = [a for a in _flat_args(node) if not (isinstance(a, fx.Node) and a in deps)]
        same_grid = all(t.shape[-2:] == value.shape[-2:] for t in clean_in)
        cat_ok = node.target is not torch.cat or _cat_dim(node) in (1, -3)
        if known and same_grid and cat_ok and all(_no_spatial_extent(env[a] if isinstance(a, fx.Node) else a)
                                                   for a in others):
            kind = "point"
    if kind == "window":
        (ky, sy, py), (kx, sx, px) = extra["axes"]
        fields[node] = field_in[0] and field_in[0].pooled((ky, kx), (sy, sx), (py, px))
    elif kind == "point" and all(field_in):
        fields[node] = field_in[0]
        for f in field_in[1:]:
            fields[node] = fields[node].union(f)
    elif kind == "box":
        fields[node] = table[node.target].field
    return kind, extra


class Unsupported(Exception):
    """The graph uses something the engine does not follow: occlusion falls back to full forward passes."""


def call(model, node, args, kwargs):
    """Run one fx node's op on the given arguments."""
    if node.op == "call_module":
        return model.get_submodule(node.target)(*args, **kwargs)
    if node.op == "call_function":
        return node.target(*args, **kwargs)
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    if node.op == "get_attr":
        obj = model
        for part in node.target.split("."):
            obj = getattr(obj, part)
        return obj
    raise Unsupported


def maybe_inplace(model, node) -> bool:
    """Whether the op may write into its input (relu_, x += y, nn.ReLU(inplace=True), F.relu(x, True))."""
    if node.op == "call_module":
        return bool(getattr(model.get_submodule(node.target), "inplace", False))
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    module = getattr(node.target, "__module__", "") or ""
    return (name.endswith("_") and not name.endswith("__")) or module.endswith("functional") \
        or (module in ("operator", "_operator") and name.startswith("i"))


def _global_mean(model, node, x, value) -> bool:
    """Average over all positions of a map (global average pooling, x.mean((2, 3))): one value per map."""
    if not (isinstance(x, torch.Tensor) and x.dim() == 4 and isinstance(value, torch.Tensor)
            and value.numel() == x.shape[0] * x.shape[1]):
        return False
    if node.op == "call_module":
        return isinstance(model.get_submodule(node.target), nn.AdaptiveAvgPool2d)
    if node.target is F.adaptive_avg_pool2d:
        return True
    if node.target in (torch.mean, "mean"):
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        return isinstance(dims, (tuple, list)) and {d % 4 for d in dims} == {2, 3}
    return False


def _flat_args(node):
    out = []
    fx.node.map_aggregate((node.args, node.kwargs), lambda a: out.append(a) or a)
    return out


def _cat_dim(node):
    return node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
