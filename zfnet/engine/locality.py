"""How far each op of a traced model reaches: the spatial locality incremental occlusion relies on.

zfnet.engine.incremental recomputes, per occluder position, only the units an occluder can change. For that
it needs the model's graph of op calls (zfnet.engine.graph) and, per node, whether
it is a sliding window (kernel, stride, padding), pointwise in space (in whatever layout its value has:
NCHW, NHWC inside a ConvNeXt block, 5-D inside a channel shuffle), a channel split, a global average, or
something that mixes all positions. This module answers that from the op itself (module type and
arguments), and for modules fx cannot trace (data-dependent Python), which stay opaque leaves, from their
receptive field measured on their own input.
"""

from __future__ import annotations

import math
import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..inspect.fields import Field, Geom, pair
from ..inspect.tracker import FieldTracker
from .graph import Unsupported

__all__ = ["classify"]


# ----------------------------------------------------------------------------------------------------
# What each op is.
# Spatially pointwise modules: every output unit depends only on the input units at its own position.
_POINT_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.CELU, nn.SELU, nn.GELU, nn.SiLU,
                  nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Mish, nn.Softplus,
                  nn.Identity, nn.Dropout, nn.Dropout2d, nn.AlphaDropout)
_CHANNEL_MODULES = (nn.BatchNorm2d, nn.LocalResponseNorm)  # pointwise in space, mixing dim 1
_POINT_FUNCTIONS = {torch.relu, torch.relu_, F.relu, F.relu_, F.relu6, F.leaky_relu, F.elu, F.gelu, F.silu,
                    F.mish, F.hardswish, F.hardsigmoid, F.hardtanh, F.softplus, F.sigmoid, F.tanh, torch.sigmoid,
                    torch.tanh, torch.exp, torch.abs, torch.clamp, torch.where, F.dropout, F.dropout2d,
                    operator.add, operator.mul, operator.sub, operator.truediv, operator.neg, operator.iadd,
                    operator.imul, operator.isub, operator.itruediv, torch.add, torch.mul, torch.sub, torch.div,
                    torch.neg, torch.maximum, torch.minimum}
_POINT_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "exp", "abs", "neg", "add", "add_",
                  "mul", "mul_", "sub", "sub_", "div", "div_", "clamp", "clamp_", "clamp_min", "clamp_max",
                  "clamp_min_", "contiguous", "float", "to", "type_as", "sqrt", "rsqrt", "pow"}
_PERMUTES = {torch.permute, torch.transpose, "permute", "transpose"}
_RESHAPES = {torch.reshape, torch.flatten, torch.unflatten, "view", "reshape", "flatten", "unflatten"}
_SPLITS = {torch.chunk, torch.split, torch.tensor_split, torch.unbind, "chunk", "split", "tensor_split", "unbind"}
_CATS = {torch.cat, torch.concat, torch.concatenate}
_REDUCTIONS = {torch.mean, torch.sum, torch.amax, torch.amin, "mean", "sum", "amax", "amin"}


def _conv_window(weight, bias, stride, padding, dilation, groups):
    k, s, d = tuple(weight.shape[-2:]), pair(stride), pair(dilation)
    keff = [d[i] * (k[i] - 1) + 1 for i in range(2)]
    if padding == "valid":
        p = (0, 0)
    elif padding == "same":  # PyTorch puts the odd pixel at the end: only the leading pad matters here
        p = tuple((keff[i] - 1) // 2 for i in range(2))
    else:
        p = pair(padding)
    return tuple(zip(keff, s, p)), lambda t: F.conv2d(t, weight, bias, s, 0, d, groups), 0.0


def _max_window(kernel, stride, padding, dilation, return_indices=False):
    if return_indices:
        return None
    k, d, p = pair(kernel), pair(dilation), pair(padding)
    s = pair(stride or kernel)
    keff = [d[i] * (k[i] - 1) + 1 for i in range(2)]
    # ceil_mode only adds output units whose window runs past the end: -inf there is the same
    return tuple(zip(keff, s, p)), lambda t: F.max_pool2d(t, k, s, 0, d), float("-inf")


def _avg_window(kernel, stride, padding, ceil_mode, count_include_pad, divisor_override):
    k, p = pair(kernel), pair(padding)
    if ceil_mode or not (count_include_pad or p == (0, 0)):
        return None
    s = pair(stride or kernel)
    return tuple(zip(k, s, p)), lambda t: F.avg_pool2d(t, k, s, 0, False, True, divisor_override), 0.0


def _window_op(mod: nn.Module):
    """(axes, op on an exact crop, pad value) for the sliding-window modules we can run unpadded."""
    if isinstance(mod, nn.Conv2d) and mod.padding_mode == "zeros":
        return _conv_window(mod.weight, mod.bias, mod.stride, mod.padding, mod.dilation, mod.groups)
    if isinstance(mod, nn.MaxPool2d):
        return _max_window(mod.kernel_size, mod.stride, mod.padding, mod.dilation, mod.return_indices)
    if isinstance(mod, nn.AvgPool2d):
        return _avg_window(mod.kernel_size, mod.stride, mod.padding, mod.ceil_mode, mod.count_include_pad,
                           mod.divisor_override)
    return None


def _window_function(node, env, deps):
    """The same for F.conv2d (constant weights), F.max_pool2d and F.avg_pool2d calls."""
    def arg(i, name, default):
        v = node.args[i] if len(node.args) > i else node.kwargs.get(name, default)
        if isinstance(v, fx.Node):
            if v in deps:
                raise Unsupported  # weights computed from the image
            return env[v]
        return v

    try:
        if node.target is F.conv2d:
            return _conv_window(arg(1, "weight", None), arg(2, "bias", None), arg(3, "stride", 1),
                                arg(4, "padding", 0), arg(5, "dilation", 1), arg(6, "groups", 1))
        if node.target is F.max_pool2d:
            return _max_window(arg(1, "kernel_size", None), arg(2, "stride", None), arg(3, "padding", 0),
                               arg(4, "dilation", 1), arg(6, "return_indices", False))
        if node.target is F.avg_pool2d:
            return _avg_window(arg(1, "kernel_size", None), arg(2, "stride", None), arg(3, "padding", 0),
                               arg(4, "ceil_mode", False), arg(5, "count_include_pad", True),
                               arg(6, "divisor_override", None))
    except Unsupported:
        return None
    return None


def _leaf_geometry(mod: nn.Module, x: torch.Tensor, out: torch.Tensor) -> tuple | None:
    """(k, s, p) per axis of an opaque module, measured on its own input grid (one call under the
    receptive-field tracker), or None where it is not a plain sliding window."""
    H, W = x.shape[-2:]
    tracker = FieldTracker()
    probe = x.clone()
    tracker.set(probe, Geom(Field(1, 1, 1, 1, 0, 0), tuple((i, i) for i in range(H)), tuple((i, i) for i in range(W))))
    with torch.no_grad(), tracker:
        res = mod(probe)
    res = res[0] if isinstance(res, (tuple, list)) else res
    e = tracker.entry(res) if isinstance(res, torch.Tensor) else None
    geom = e.exact if e is not None else None  # (None: not derived from the input, or global)
    if geom is None or geom.field is None or not isinstance(res, torch.Tensor) or res.shape != out.shape:
        return None
    f = geom.field
    axes = ((f.size_y, f.jump_y, -f.start_y), (f.size_x, f.jump_x, -f.start_x))
    return axes if all(k >= 1 and s >= 1 and p >= 0 for k, s, p in axes) else None


def _no_spatial_extent(v, rank: int, layout: tuple) -> bool:
    """A constant operand that broadcasts the same way over every position and every batch entry."""
    if not isinstance(v, torch.Tensor) or v.dim() == 0:
        return True
    if v.dim() > rank:
        return False
    return all(v.shape[i] == 1 for i in range(v.dim()) if rank - v.dim() + i in (0, *layout))


def _on_grid(v, value, lay) -> bool:
    """A constant (1, ..., H, W) tensor on the NCHW grid of `value`, spatially varying."""
    return (isinstance(v, torch.Tensor) and lay == (2, 3) and v.dim() == value.dim() == 4 and v.shape[0] == 1
            and tuple(v.shape[2:]) == tuple(value.shape[2:]) and tuple(v.shape[2:]) != (1, 1))


def _dim_arg(node, i, name, default):
    d = node.args[i] if len(node.args) > i else node.kwargs.get(name, default)
    return d


def _norm(d, rank):
    return d % rank if isinstance(d, int) else None


def _moved_layout(node, rank, layout) -> tuple | None:
    """Spatial axes after permute / transpose (None if they move the batch dimension)."""
    if node.target in (torch.permute, "permute"):
        dims = node.args[1:] if node.op == "call_method" else (node.args[1],)
        dims = dims[0] if len(dims) == 1 and isinstance(dims[0], (tuple, list)) else dims
        if "dims" in node.kwargs:
            dims = node.kwargs["dims"]
        perm = [d % rank for d in dims]
    else:
        a, b = _norm(_dim_arg(node, 1, "dim0", None), rank), _norm(_dim_arg(node, 2, "dim1", None), rank)
        if a is None or b is None:
            return None
        perm = list(range(rank))
        perm[a], perm[b] = perm[b], perm[a]
    if len(perm) != rank or perm[0] != 0:
        return None
    return perm.index(layout[0]), perm.index(layout[1])


def _reshaped_layout(shape_in, shape_out, layout) -> tuple | None:
    """Spatial axes after a reshape that keeps the batch and both spatial axes and regroups only the other
    dimensions on either side of them (a channel shuffle's view to 5-D and back)."""
    ay, ax = layout
    H, W = shape_in[ay], shape_in[ax]
    if H == 1 or W == 1 or not shape_out or shape_out[0] != shape_in[0]:
        return None
    pre, mid, post = (math.prod(shape_in[1:ay]), tuple(shape_in[ay + 1:ax]), math.prod(shape_in[ax + 1:]))
    for by in range(1, len(shape_out)):
        bx = by + 1 + len(mid)
        if bx < len(shape_out) and shape_out[by] == H and shape_out[bx] == W and tuple(shape_out[by + 1:bx]) == mid \
                and math.prod(shape_out[1:by]) == pre and math.prod(shape_out[bx + 1:]) == post:
            return by, bx
    return None


def _split_dim(node, rank):
    if node.target in (torch.unbind, "unbind"):
        return _norm(_dim_arg(node, 1, "dim", 0), rank)
    return _norm(_dim_arg(node, 2, "dim", 0), rank)


def classify(model: nn.Module, node: fx.Node, env: dict, deps: list, layouts: dict) -> tuple[str, dict]:
    """How node reaches over its input-dependent inputs `deps`, from their clean values in env:
    (kind, details), kind one of "point", "window", "box", "mean", "split", "pick", "global", "meta" (see
    zfnet.engine.incremental). Records in `layouts` where the node's value is a map: (row axis, column axis)."""
    value = env[node]
    maps = [d for d in deps if d in layouts]
    if isinstance(value, (tuple, list)):
        if any(isinstance(v, torch.Tensor) for v in value):
            return _classify_split(node, env, deps, maps, layouts)
        return "meta", {}
    if not isinstance(value, torch.Tensor):
        return "meta", {}
    if node.op == "call_function" and node.target is operator.getitem and deps and deps[0] in layouts \
            and isinstance(env[deps[0]], (tuple, list)) and isinstance(node.args[1], int):
        layouts[node] = layouts[deps[0]]
        return "pick", dict(index=node.args[1])
    if not maps:
        return "global", {}
    src = maps[0]
    lay = layouts[src]
    x = env[src]
    if _global_mean(model, node, x, value, lay) and len(deps) == 1:
        return "mean", {}
    if node.op == "call_function" and len(deps) == 1 and value.dim() == 4 and lay == (2, 3):
        win = _window_function(node, env, deps)
        if win is not None:
            layouts[node] = (2, 3)
            return "window", dict(axes=win[0], op=win[1], pad=win[2])
    if node.op == "call_module":
        mod = model.get_submodule(node.target)
        if len(deps) != 1 or value.dim() != 4 or lay != (2, 3):
            return _point(model, node, env, deps, maps, layouts)
        win = _window_op(mod)
        if win is not None:
            layouts[node] = (2, 3)
            return "window", dict(axes=win[0], op=win[1], pad=win[2])
        if not isinstance(mod, (_POINT_MODULES, _CHANNEL_MODULES, nn.LayerNorm, nn.Linear, nn.Softmax)) \
                and not type(mod).__module__.startswith("torch.nn"):
            axes = _leaf_geometry(mod, x, value)
            if axes is not None:
                layouts[node] = (2, 3)
                return "box", dict(axes=axes)
    return _point(model, node, env, deps, maps, layouts)


def _classify_split(node, env, deps, maps, layouts):
    target = node.target
    x = env[deps[0]] if deps else None
    if node.op in ("call_function", "call_method") and target in _SPLITS and len(deps) == 1 and maps:
        lay = layouts[deps[0]]
        d = _split_dim(node, x.dim())
        if d is not None and d not in (0, *lay) and all(isinstance(v, torch.Tensor) and v.dim() == x.dim()
                                                       for v in env[node]):
            layouts[node] = lay
            return "split", {}
    return "global", {}


def _point(model, node, env, deps, maps, layouts) -> tuple[str, dict]:
    """Ops that are pointwise in space on maps of one grid; everything else mixes positions ("global")."""
    value = env[node]
    lay = layouts[maps[0]]
    x = env[maps[0]]
    rank = value.dim()
    same_grid = all(env[d].dim() == x.dim() and layouts[d] == lay
                    and tuple(env[d].shape[i] for i in lay) == tuple(x.shape[i] for i in lay) for d in maps)
    if not same_grid or any(d not in layouts and isinstance(env[d], torch.Tensor) for d in deps):
        return "global", {}  # a map next to a per-position vector (squeeze-excitation): all of it changes
    out_lay, extra = None, {}
    target = node.target
    if node.op == "call_module":
        mod = model.get_submodule(target)
        if isinstance(mod, _POINT_MODULES) or (isinstance(mod, _CHANNEL_MODULES) and 1 not in lay):
            out_lay = lay
        elif isinstance(mod, nn.LayerNorm) and not set(range(rank - len(mod.normalized_shape), rank)) & set(lay):
            out_lay = lay
        elif isinstance(mod, nn.Linear) and rank - 1 not in lay:
            out_lay = lay
        elif isinstance(mod, nn.Softmax) and mod.dim is not None and mod.dim % rank not in (0, *lay):
            out_lay = lay
    elif node.op in ("call_function", "call_method"):
        others = [a for a in _flat_args(node) if not (isinstance(a, fx.Node) and a in deps)]
        # constant maps on the grid (a positional bias, x + buffer): cropped with the window
        grid = [a for a in others if isinstance(a, fx.Node) and _on_grid(env[a], value, lay)]
        consts_ok = all(_no_spatial_extent(env[a] if isinstance(a, fx.Node) else a, rank, lay) for a in others
                        if a not in grid)
        if grid:
            extra = dict(grid=grid)
        if (target in _POINT_FUNCTIONS if node.op == "call_function" else target in _POINT_METHODS) and consts_ok:
            out_lay = lay
        elif target is operator.getitem and len(deps) == 1:
            out_lay = lay if _channel_slice(node.args[1], rank, lay) else None
        elif getattr(target, "__name__", "") == "stochastic_depth" and _dim_arg(node, 3, "training", True) is False:
            out_lay = lay  # torchvision's, in eval mode: the identity
        elif target in _CATS:
            d = _norm(_dim_arg(node, 1, "dim", 0), rank)
            out_lay = lay if d is not None and d not in (0, *lay) and consts_ok else None
        elif target in _PERMUTES and len(deps) == 1:
            out_lay = _moved_layout(node, rank, lay)
        elif target in _RESHAPES and len(maps) == 1:
            out_lay = _reshaped_layout(tuple(x.shape), tuple(value.shape), lay)
            extra = dict(reshape=True)
        elif target in _REDUCTIONS and len(deps) == 1 and _keepdim(node) and value.dim() == rank:
            dims = _dim_arg(node, 1, "dim", None)
            dims = [dims] if isinstance(dims, int) else dims
            if dims and all(isinstance(d, int) and d % rank not in (0, *lay) for d in dims):
                out_lay = lay
        elif target is F.layer_norm:
            shape = _dim_arg(node, 1, "normalized_shape", ())
            out_lay = lay if not set(range(rank - len(shape), rank)) & set(lay) else None
        elif target is F.linear:
            out_lay = lay if rank - 1 not in lay else None
        elif target is F.batch_norm:
            training = _dim_arg(node, 5, "training", False)
            out_lay = lay if training is False and 1 not in lay else None
        elif target in (F.softmax, F.log_softmax, torch.softmax, "softmax", "log_softmax"):
            d = _norm(_dim_arg(node, 1, "dim", None), rank)
            out_lay = lay if d is not None and d not in (0, *lay) else None
    if out_lay is None or value.shape[0] != x.shape[0]:
        return "global", {}
    if extra.get("reshape") is None and tuple(value.shape[i] for i in out_lay) != tuple(x.shape[i] for i in lay):
        return "global", {}
    layouts[node] = out_lay
    return "point", extra


def _channel_slice(index, rank, lay) -> bool:
    """x[:, a:b] and the like: plain slices that keep the batch and both spatial axes whole."""
    index = index if isinstance(index, tuple) else (index,)
    if len(index) > rank or any(not isinstance(i, slice) for i in index):
        return False
    return all(index[d] == slice(None) for d in (0, *lay) if d < len(index))


def _keepdim(node):
    return bool(node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False))


def _global_mean(model, node, x, value, lay) -> bool:
    """Average over all positions of a map (global average pooling, x.mean((2, 3))): one value per map."""
    if not (isinstance(value, torch.Tensor) and value.numel() * x.shape[lay[0]] * x.shape[lay[1]] == x.numel()):
        return False
    if node.op == "call_module":
        return lay == (2, 3) and isinstance(model.get_submodule(node.target), nn.AdaptiveAvgPool2d)
    if node.target is F.adaptive_avg_pool2d:
        return lay == (2, 3)
    if node.target in (torch.mean, "mean"):
        dims = _dim_arg(node, 1, "dim", None)
        return isinstance(dims, (tuple, list)) and {d % x.dim() for d in dims} == set(lay)
    return False


def _flat_args(node):
    out = []
    fx.node.map_aggregate((node.args, node.kwargs), lambda a: out.append(a) or a)
    return out
