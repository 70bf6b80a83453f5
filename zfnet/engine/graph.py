"""The graph of op calls of a model, as incremental occlusion follows it: torch.fx's trace with every module
call recorded by its layer name (a module called twice is two calls, `name` and `name#2`, as in the layer
table), modules fx cannot trace kept as opaque calls, and one node run at a time.

A trace is kept per model (weakly: it goes with the model) for as long as the model's structure is the one
traced, so a batch of images, or repeated calls, trace once.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn

from ..inspect.units import call_name

__all__ = ["Unsupported", "Traced", "trace", "is_cached", "forget", "structure", "call", "maybe_inplace", "standard",
           "describe"]


class Unsupported(Exception):
    """The graph uses something the engine does not follow: occlusion falls back to full forward passes."""


def describe(e: BaseException) -> str:
    """An exception in one line: its type and the first line of its message."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


# ----------------------------------------------------------------------------------------------------
# Tracing: the graph of op calls, with every module call recorded by layer name.
@dataclass
class Traced:
    graph: fx.Graph
    calls: dict[str, fx.Node]  # layer name of each module call ("layer1.0.relu", "layer1.0.relu#2") -> its output
    leaves: list[str] = field(default_factory=list)  # modules fx could not trace, kept as opaque calls


class _Tracer(fx.Tracer):
    """fx's tracer, but a module whose forward cannot be traced (Python control flow on values or shapes)
    becomes one opaque call instead of failing the whole model; and each module call's output is recorded."""

    def __init__(self):
        super().__init__()
        self.leaves: list[str] = []
        self.calls: list[tuple[str, object]] = []

    def is_leaf_module(self, m, qualname):
        return qualname in self.leaves or super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        name = self.path_of_module(m)
        last = next(iter(reversed(self.graph.nodes)), None)
        n_calls, stack, counts = len(self.calls), len(self.module_stack), dict(self.num_calls)
        try:
            out = super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.is_leaf_module(m, name):
                raise
            # Undo what the failed attempt added to the graph, then record the module as one call.
            for node in list(reversed(self.graph.nodes)):
                if node is last:
                    break
                self.graph.erase_node(node)
            del self.calls[n_calls:]
            while len(self.module_stack) > stack:
                self.module_stack.popitem()
            self.num_calls = counts
            self.leaves.append(name)
            out = super().call_module(m, forward, args, kwargs)
        self.calls.append((name, out.node if isinstance(out, fx.Proxy) else None))
        return out


_TRACES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> (its structure, Traced)


def structure(model: nn.Module) -> tuple:
    """What a trace of the model depends on beyond its code: each module's name, identity and type, its
    training flag (fx bakes `self.training` in) and any forward set on the instance. A change of any of
    these (a submodule replaced, model.eval()) makes an earlier trace stale."""
    return tuple((name, id(m), type(m), m.training, id(vars(m).get("forward"))) for name, m in model.named_modules())


def trace(model: nn.Module, fresh: bool = False) -> Traced:
    """The model's graph down to torch.nn's own modules (and the opaque modules fx cannot trace). The same
    Traced is returned again while structure(model) is unchanged (not with fresh=True); the caller checks
    it by replaying it (what a trace cannot see, e.g. a plain attribute its forward reads, is not in the
    key). A graph is symbolic: it serves every input size."""
    key = structure(model)
    kept = None if fresh else _TRACES.get(model)
    if kept is None or kept[0] != key:
        try:
            kept = key, _trace(model)
        except Unsupported as e:  # kept too: a model fx cannot trace is not traced again for each image
            kept = key, e
        _TRACES[model] = kept
    if isinstance(kept[1], Unsupported):
        raise Unsupported(str(kept[1]))
    return kept[1]


def is_cached(model: nn.Module) -> bool:
    """Whether trace(model) would return a kept trace."""
    kept = _TRACES.get(model)
    return kept is not None and kept[0] == structure(model)


def forget(model: nn.Module):
    """Drop the kept trace of the model."""
    _TRACES.pop(model, None)


def _trace(model: nn.Module) -> Traced:
    tracer = _Tracer()
    try:
        graph = tracer.trace(model)
        graph.lint()
    except Exception as e:  # the model's own forward, outside any submodule, cannot be traced
        raise Unsupported(f"torch.fx cannot trace {type(model).__name__}.forward ({describe(e)})") from None
    calls, seen = {}, {}
    for name, node in tracer.calls:
        seen[name] = seen.get(name, 0) + 1
        if node is not None:
            calls[call_name(name, seen[name])] = node
    return Traced(graph, calls, tracer.leaves)


# ----------------------------------------------------------------------------------------------------
# Running one node.
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
    raise Unsupported(f"graph node {node.name} ({node.op})")


def maybe_inplace(model, node) -> bool:
    """Whether the op may write into its input (relu_, x += y, nn.ReLU(inplace=True), F.relu(x, True))."""
    if node.op == "call_module":
        return bool(getattr(model.get_submodule(node.target), "inplace", False))
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    module = getattr(node.target, "__module__", "") or ""
    return (name.endswith("_") and not name.endswith("__")) or module.endswith("functional") \
        or (module in ("operator", "_operator") and name.startswith("i"))


def standard(v):
    """A tensor in PyTorch's default (row-major) strides, as the model's own ops produce them from a
    default-strided input: ops we do not model (view, flatten, ...) may depend on it. A one-channel map
    passes `is_contiguous()` in channels-last strides too (and a conv then answers in channels last), so the
    strides themselves are compared."""
    if not isinstance(v, torch.Tensor):
        return v
    expect, acc = [], 1
    for n in reversed(v.shape):
        expect.append(acc)
        acc *= n
    if list(v.stride()) == expect[::-1]:
        return v
    return v.clone(memory_format=torch.contiguous_format)
