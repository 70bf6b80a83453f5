"""The receptive-field tracker: one forward pass with a TorchFunctionMode that follows every tensor (module
and functional calls alike) and attaches to each its exact and local geometry (zfnet.inspect.fields).
zfnet.inspect.layers reads it at every module call to build the layer table.

Each op is read by its name and arguments: sliding windows (conv, pools), padding, reshapes and
permutations, splits, indexing, concatenation, reductions, normalisations, linear maps over one
dimension; anything else whose output broadcasts from its inputs is elementwise. Ops that may keep the
shape without being elementwise (flips, attention, interpolation...) are never guessed: they are not
followed, and every unit after them sees everything.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass, replace

import torch
from torch.overrides import TorchFunctionMode

from . import fields
from .fields import GLOBAL, Geom, arg, pair

__all__ = ["FieldTracker", "RECTIFIERS"]


# ----------------------------------------------------------------------------------------------------
# Op vocabularies.
_WINDOWS = {"conv2d", "max_pool2d", "_max_pool2d", "max_pool2d_with_indices", "avg_pool2d", "lp_pool2d"}
_RESHAPES = {"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as", "reshape_as", "ravel",
             "squeeze_", "unsqueeze_", "_reshape_alias", "expand_dims"}
_PERMUTES = {"permute", "transpose", "swapaxes", "swapdims", "movedim", "moveaxis", "transpose_"}
_SPLITS = {"split", "chunk", "tensor_split", "split_with_sizes", "unsafe_split", "unsafe_chunk", "unbind", "narrow"}
_CATS = {"cat", "concat", "concatenate", "stack"}
_REDUCTIONS = {"mean", "sum", "nansum", "nanmean", "amax", "amin", "max", "min", "std", "var", "std_mean",
               "var_mean", "norm", "logsumexp", "prod", "median", "nanmedian", "all", "any", "count_nonzero",
               "argmax", "argmin", "aminmax"}
# Normalisations and softmax: statistics over some dimensions (when those hold positions: the exact
# answer mixes them, the local answer treats the statistics as constants).
_NORMS = {"layer_norm", "group_norm", "instance_norm", "batch_norm", "normalize", "softmax", "log_softmax",
          "softmin", "rms_norm"}
# Ops whose output may have their input's shape without being elementwise: never guessed as elementwise.
_NOT_POINTWISE = {
    "conv1d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "avg_pool1d", "avg_pool3d",
    "max_pool1d", "max_pool3d", "max_unpool2d", "fold", "unfold", "interpolate", "upsample", "upsample_nearest",
    "upsample_bilinear", "grid_sample", "affine_grid", "pixel_shuffle", "pixel_unshuffle", "flip", "fliplr",
    "flipud", "roll", "rot90", "cumsum", "cumprod", "cummax", "cummin", "logcumsumexp", "sort", "argsort",
    "msort", "topk", "kthvalue", "gather", "scatter", "scatter_add", "scatter_reduce", "index_select",
    "index_add", "index_copy", "take", "take_along_dim", "put", "masked_scatter", "scaled_dot_product_attention",
    "einsum", "bmm", "baddbmm", "addbmm", "tensordot", "diff", "embedding", "glu", "tile", "repeat",
    "repeat_interleave", "adaptive_avg_pool1d", "adaptive_max_pool1d", "adaptive_avg_pool3d",
    "adaptive_max_pool3d", "multi_head_attention_forward", "channel_shuffle", "native_channel_shuffle"}
# Activations whose output is a rectified map (the paper's feature maps), and ops that keep that property.
RECTIFIERS = {"relu", "relu_", "relu6", "hardtanh", "hardtanh_", "leaky_relu", "leaky_relu_", "elu", "elu_",
              "selu", "selu_", "celu", "celu_", "gelu", "silu", "mish", "hardswish", "softplus", "prelu", "rrelu",
              "rrelu_", "threshold", "threshold_"}
_KEEPS_RECTIFIED = {"cat", "concat", "concatenate", "__getitem__"}
# New tensors shaped like an input but not computed from it, and ops that read only their first argument.
_CONSTANT_LIKE = {"zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like", "randint_like",
                  "new_zeros", "new_ones", "new_empty", "new_full", "new_tensor"}
_FIRST_ONLY = {"expand_as", "type_as", "to"}


@dataclass
class _Entry:
    tensor: torch.Tensor  # kept alive so that its id is not reused during the pass
    exact: Geom | None
    local: object  # Geom, GLOBAL or None
    rectified: bool = False


def _apply(fn, g):
    """fn on a geometry; None (not followed) and GLOBAL (no local path) stay what they are."""
    return fn(g) if isinstance(g, Geom) else g


def _both(fn, e) -> tuple:
    """fn on the exact and on the local answer of a tensor's entry."""
    return _apply(fn, e.exact), _apply(fn, e.local)


def _tensors(args, kwargs):
    for a in list(args) + list(kwargs.values()):
        if isinstance(a, torch.Tensor):
            yield a
        elif isinstance(a, (list, tuple)):
            yield from (t for t in a if isinstance(t, torch.Tensor))


class FieldTracker(TorchFunctionMode):
    """Propagates geometry along every tensor of one forward pass (functional calls included)."""

    def __init__(self):
        super().__init__()
        self.entries: dict[int, _Entry] = {}

    def entry(self, t) -> _Entry | None:
        """The tensor's geometry, or None if it does not derive from the input."""
        e = self.entries.get(id(t)) if isinstance(t, torch.Tensor) else None
        return e if e is not None and e.tensor is t else None

    def set(self, t, exact, local=None, rectified=False):
        self.entries[id(t)] = _Entry(t, exact, exact if local is None and exact is not None else local, rectified)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        ins = [(t, e) for t in _tensors(args, kwargs) if (e := self.entry(t)) is not None]
        if name in _FIRST_ONLY:
            ins = ins[:1] if ins and ins[0][0] is args[0] else []
        if not ins or name in _CONSTANT_LIKE:
            return out
        if name == "__setitem__":
            self._overwrite(args[0], args[2] if len(args) > 2 else None)
            return out
        outs = [o for o in (out if isinstance(out, (tuple, list)) else (out,)) if isinstance(o, torch.Tensor)]
        if not outs:
            return out
        try:
            results = self._rule(name, args, kwargs, ins, outs)
        except Exception:  # a call whose arguments this reading does not cover: not followed
            results = [(None, None)] * len(outs)
        rect = name in RECTIFIERS or (name in _KEEPS_RECTIFIED and all(e.rectified for _, e in ins))
        for o, (exact, local) in zip(outs, results):
            exact = exact if fields.fits(exact, o) else None
            local = local if local is GLOBAL or fields.fits(local, o) else None
            self.entries[id(o)] = _Entry(o, exact, local, rect)
        return out

    def _rule(self, name, args, kwargs, ins, outs) -> list[tuple]:
        x = args[0] if args and isinstance(args[0], torch.Tensor) else None
        ex = self.entry(x)
        o = outs[0]
        n = len(outs)

        def each(fn, local_fn=None):  # a map of x's geometry, for the exact and the local answer
            return [(_apply(fn, ex.exact), _apply(local_fn or fn, ex.local))] * n

        if name in _WINDOWS and ex:
            return each(lambda g: fields.window(g, tuple(o.shape[-2:]), *_window_args(name, args, kwargs)))
        if name in ("adaptive_avg_pool2d", "adaptive_max_pool2d") and ex:
            h, w = x.shape[-2:]
            oh, ow = o.shape[-2:]
            fn = lambda g: fields.adaptive_pool(g, (h, w), (oh, ow))  # noqa: E731
            return each(fn, (lambda g: GLOBAL) if oh * ow == 1 < h * w else fn)
        if name == "pad" and ex:
            pads, mode = list(arg(args, kwargs, 1, "pad", ())), arg(args, kwargs, 2, "mode", "constant")
            return each(lambda g: fields.pad(g, x.dim(), pads, mode))
        if name in _RESHAPES and ex:
            return [_both(functools.partial(fields.reshape, old=tuple(x.shape), new=tuple(t.shape)), ex)
                    for t in outs]
        if name in _PERMUTES and ex:
            perm = _permutation(name, args, kwargs, x.dim())
            return each(lambda g: replace(g, axes=tuple(g.axes[d] for d in perm)))
        if name in _SPLITS and ex:
            return self._split(name, args, kwargs, x, ex, outs)
        if name == "__getitem__" and ex:
            return each(lambda g: fields.index(g, tuple(x.shape), args[1]))
        if name in _CATS:
            return [self._cat(name, args, kwargs, o)] * n
        if name in _REDUCTIONS and ex and not (len(args) > 1 and isinstance(args[1], torch.Tensor)):
            dims = _dims(arg(args, kwargs, 2 if name == "norm" else 1, "dim", None), x.dim())
            drop = o.dim() != x.dim()
            return each(lambda g: fields.mix(g, dims, collapse=True, drop=drop),
                        lambda g: GLOBAL if fields.spatial(g, dims) else fields.mix(g, dims, True, drop=drop))
        if name in _NORMS and ex:
            dims = _norm_dims(name, args, kwargs, x.dim())
            g = ex.exact or (ex.local if isinstance(ex.local, Geom) else None)
            if dims and g is not None and fields.spatial(g, dims):
                return [(ex.exact and fields.mix(ex.exact, dims, collapse=False), ex.local)] * n
        if name == "linear" and ex and len(ins) == 1:
            last = [x.dim() - 1]  # a linear map over positions mixes them; over channels it is pointwise
            return each(lambda g: fields.mix(g, last, True, relabel=True) if fields.spatial(g, last) else g,
                        lambda g: GLOBAL if fields.spatial(g, last) else g)
        if name in ("matmul", "mm", "__matmul__", "__rmatmul__") and len(ins) == 1:
            return self._matmul(args, ins, o)
        if name in _NOT_POINTWISE or name.startswith("fft_") or (
                name == "__get__" and (o.shape != x.shape or o.stride() != x.stride())):  # .T, .mT
            return [(None, None)] * n
        return self._elementwise(ins, outs)

    def _elementwise(self, ins, outs):
        shape = tuple(outs[0].shape)
        fits = all(tuple(t.shape) == shape for t in outs) and all(
            t.dim() <= len(shape) and all(a in (1, b) for a, b in zip(reversed(t.shape), reversed(shape)))
            for t, _ in ins)
        if not fits:
            return [(None, None)] * len(outs)
        exacts = [e.exact for _, e in ins]
        exact = None if any(g is None for g in exacts) else fields.combine(exacts, len(shape))
        return [(exact, fields.combine_local([e.local for _, e in ins], len(shape)))] * len(outs)

    def _split(self, name, args, kwargs, x, ex, outs):
        if name == "unbind":
            dim = int(arg(args, kwargs, 1, "dim", 0)) % x.dim()
            parts = [(i, i + 1, False) for i in range(len(outs))]
        elif name == "narrow":
            dim = int(arg(args, kwargs, 1, "dim", 0)) % x.dim()
            start = int(arg(args, kwargs, 2, "start", 0)) % x.shape[dim]
            parts = [(start, start + outs[0].shape[dim], True)]
        else:
            dim = int(arg(args, kwargs, 2, "dim", 0)) % x.dim()
            ends = list(itertools.accumulate(t.shape[dim] for t in outs))
            parts = [(e - t.shape[dim], e, True) for e, t in zip(ends, outs)]
        return [_both(functools.partial(fields.take, dim=dim, start=a, stop=b, keep=keep), ex) for a, b, keep in parts]

    def _cat(self, name, args, kwargs, o):
        tensors = args[0] if args else kwargs.get("tensors")
        dim = int(arg(args, kwargs, 1, "dim", 0)) % o.dim()
        entries = [self.entry(t) for t in tensors]
        known = [e for e in entries if e is not None]
        if name == "stack":  # a new dimension in front of `dim`: one more non-spatial dimension
            known = [_Entry(e.tensor, *_both(lambda g: replace(g, axes=g.axes[:dim] + ("",) + g.axes[dim:]), e))
                     for e in known]
        label = next((e.exact.axes[dim] for e in known if e.exact is not None), "") if name != "stack" else ""
        if label in ("h", "w", "hw"):  # along the map: the pieces' spans one after the other
            if label == "hw" or len(known) < len(entries) or any(e.exact is None for e in known):
                return None, None
            joined = fields.join([e.exact for e in known], label)
            locals_ = [e.local for e in known]
            local = fields.join(locals_, label) if all(isinstance(v, Geom) for v in locals_) else None
            return joined, local
        exacts = [e.exact for e in known]
        return (None if None in exacts else fields.combine(exacts, o.dim())), \
            fields.combine_local([e.local for e in known], o.dim())

    def _matmul(self, args, ins, o):
        """A product with a constant matrix: a linear map over the contracted dimension only."""
        a, b = args[0], args[1]
        t, e = ins[0]
        if t is a and b.dim() <= 2:
            d = a.dim() - 1
        elif t is b and a.dim() <= 2 and b.dim() >= 2:
            d = b.dim() - 2
        else:
            return [(None, None)]
        if o.dim() != t.dim():
            return [(None, None)]
        return [(_apply(lambda g: fields.mix(g, [d], True, relabel=True) if fields.spatial(g, [d]) else g, e.exact),
                 _apply(lambda g: GLOBAL if fields.spatial(g, [d]) else g, e.local))]

    def _overwrite(self, x, value):
        """x[...] = value: x's elements now also see what value sees (anywhere: a conservative union)."""
        ex, ev = self.entry(x), self.entry(value)
        if ev is None:
            return
        if ex is None or ex.exact is None or ev.exact is None:
            self.set(x, None, None)
            return
        n = x.dim()
        exact = fields.combine([ex.exact, fields.spread(ev.exact, n)], n)
        local = ex.local
        if isinstance(ev.local, Geom) and isinstance(local, Geom):
            local = fields.combine([local, fields.spread(ev.local, n)], n)
        elif ev.local is None:
            local = None
        self.entries[id(x)] = _Entry(x, exact, local)


def _dims(d, ndim: int) -> list[int]:
    if d is None or (isinstance(d, (tuple, list)) and len(d) == 0):
        return list(range(ndim))
    return [int(k) % ndim for k in (d if isinstance(d, (tuple, list)) else (d,))]


def _window_args(name, args, kwargs):
    """(kernel, stride, padding, dilation) of a sliding-window call."""
    if name == "conv2d":
        w = arg(args, kwargs, 1, "weight", None)
        k = tuple(w.shape[-2:])
        s = pair(arg(args, kwargs, 3, "stride", 1))
        pad = arg(args, kwargs, 4, "padding", 0)
        d = pair(arg(args, kwargs, 5, "dilation", 1))
        if pad == "valid":
            pad = 0
        if pad == "same":  # PyTorch puts the odd pixel of 'same' padding at the end
            pad = tuple((d[i] * (k[i] - 1)) // 2 for i in range(2))
        return k, s, pair(pad), d
    if name == "lp_pool2d":
        k = pair(arg(args, kwargs, 2, "kernel_size", 1))
        s = arg(args, kwargs, 3, "stride", None)
        return k, (k if s is None else pair(s)), (0, 0), (1, 1)
    k = pair(arg(args, kwargs, 1, "kernel_size", 1))
    s = arg(args, kwargs, 2, "stride", None)
    s = k if s is None or s == [] or s == () else pair(s)
    p = pair(arg(args, kwargs, 3, "padding", 0))
    d = pair(arg(args, kwargs, 4, "dilation", 1)) if "max" in name else (1, 1)
    return k, s, p, d


def _permutation(name, args, kwargs, ndim) -> list[int]:
    if name == "permute":
        dims = args[1:] if len(args) > 2 or (len(args) == 2 and isinstance(args[1], int)) else \
            (args[1] if len(args) > 1 else kwargs["dims"])
        return [int(d) % ndim for d in dims]
    if name in ("movedim", "moveaxis"):
        src = _dims(arg(args, kwargs, 1, "source", None), ndim)
        dst = _dims(arg(args, kwargs, 2, "destination", None), ndim)
        order = [i for i in range(ndim) if i not in src]
        for d, s in sorted(zip(dst, src)):
            order.insert(d, s)
        return order
    a = int(arg(args, kwargs, 1, "dim0", 0)) % ndim
    b = int(arg(args, kwargs, 2, "dim1", 1)) % ndim
    perm = list(range(ndim))
    perm[a], perm[b] = b, a
    return perm


def _norm_dims(name, args, kwargs, ndim) -> list[int]:
    """The dimensions a normalisation takes its statistics over."""
    if name in ("layer_norm", "rms_norm"):
        shape = arg(args, kwargs, 1, "normalized_shape", ())
        k = len(shape) if isinstance(shape, (tuple, list, torch.Size)) else 1
        return list(range(ndim - k, ndim))
    if name in ("group_norm", "instance_norm"):
        return list(range(2, ndim))
    if name == "batch_norm":  # in training mode, statistics of the batch
        return [0] + list(range(2, ndim)) if arg(args, kwargs, 5, "training", False) else []
    if name == "normalize":
        return _dims(arg(args, kwargs, 2, "dim", 1), ndim)
    d = arg(args, kwargs, 1, "dim", None)
    return _dims(d, ndim) if d is not None else list(range(ndim))


