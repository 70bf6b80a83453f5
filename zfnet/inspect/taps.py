"""Taps: read any set of layers (module calls) in one forward pass, exactly as they were computed.

Every experiment of the paper reads feature maps; this module records them with forward hooks. A hook
fires when a module returns, but the model may keep working on that very tensor in place:
torchvision's BasicConv2d does `F.relu(self.bn(x), inplace=True)`, residual blocks do `out += identity`,
others `x.relu_()`. Copying every output would make mining a dataset pay a copy per layer and batch;
instead a TorchFunctionMode watches the recorded storages and copies a recorded tensor just before an op
is about to write into it (copy-on-write). Ops the mode cannot see (TorchScript, C++ extensions) still
bump the tensor's version counter: a forward pass that changed a recorded tensor behind our back is run
again with copies taken at once (`run_with_taps`), or fails with a clear error (`taps`).
"""

from __future__ import annotations

import sys
import weakref
from contextlib import contextmanager, nullcontext
from typing import Iterable

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

from ..core.errors import ZfnetError, unknown_layer
from .units import split_call

__all__ = ["taps", "run_with_taps", "TapOverwritten"]


class _StopForward(Exception):
    pass


class TapOverwritten(ZfnetError):
    """A recorded output was changed in place by an op the taps could not see."""

    def __init__(self, names):
        self.names = list(names)
        super().__init__(f"layer output(s) {', '.join(self.names)} were overwritten in place by an operation "
                         f"zfnet cannot watch (TorchScript or a C++ extension); read them with run_with_taps "
                         f"(it re-runs with copies) or taps(..., copy=True)")


# Names that end in "_" without writing into the tensor's values.
_NOT_WRITES = {"requires_grad_", "share_memory_", "retain_grad_", "pin_memory_", "record_stream_"}
_IN_PLACE_DUNDERS = {"__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__", "__imod__", "__ipow__",
                     "__iand__", "__ior__", "__ixor__", "__ilshift__", "__irshift__", "__imatmul__", "__setitem__"}


def _written(func, args, kwargs) -> list:
    """The tensors an intercepted call is about to write into."""
    name = getattr(func, "__name__", "")
    out = []
    if (name.endswith("_") and not name.endswith("__") and name not in _NOT_WRITES) or name in _IN_PLACE_DUNDERS \
            or kwargs.get("inplace") is True:
        first = args[0] if args else kwargs.get("input", kwargs.get("tensor", kwargs.get("self")))
        if isinstance(first, torch.Tensor):
            out.append(first)
    dest = kwargs.get("out")
    if isinstance(dest, torch.Tensor):
        out.append(dest)
    elif isinstance(dest, (tuple, list)):
        out += [t for t in dest if isinstance(t, torch.Tensor)]
    return out


def _storage(t: torch.Tensor):
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # sparse, nested, ...: no plain storage to watch
        return None


class _Recorder:
    """The state of one taps() block: which calls to record, what was recorded, what is watched."""

    def __init__(self, names, wanted, detach, stop, reduce, copy):
        self.names, self.wanted = names, wanted  # wanted: module name -> {call number: layer name}
        self.detach, self.stop, self.reduce, self.copy = detach, stop, reduce, copy
        self.out: dict = {}
        self.calls: dict[str, int] = {}  # calls of each tapped module in this forward pass
        self.seen: set[str] = set()  # layers recorded in this forward pass
        self.watch: dict[int, list[str]] = {}  # storage -> recorded layers not yet copied
        self.versions: dict[str, tuple] = {}  # layer -> (tensor, its version when recorded)
        self.running = False
        self.stale: list[str] = []  # recorded outputs changed behind the mode's back

    def start(self, module, args):
        self.calls.clear()
        self.seen.clear()
        self.watch.clear()
        self.versions.clear()
        self.running = True

    def end(self, module, args, output=None):
        # (runs also when the forward pass raises, e.g. to stop early: torch silences errors raised here
        # then, so the check is reported when the block ends)
        self.running = False
        self.stale += [n for n, (t, v) in self.versions.items() if t._version != v]
        self.versions.clear()

    def hook(self, module_name: str):
        calls = self.wanted[module_name]

        def fn(module, args, output):
            k = self.calls[module_name] = self.calls.get(module_name, 0) + 1
            name = calls.get(k)
            if name is None:
                return
            t = output[0] if isinstance(output, (tuple, list)) and output else output
            if not isinstance(t, torch.Tensor):
                return
            self.running = True  # (also when a submodule is called on its own)
            with torch._C.DisableTorchFunction():  # our bookkeeping is not part of the model
                self._record(name, t)
            if self.stop and len(self.seen) == len(self.names):
                raise _StopForward
        return fn

    def _record(self, name: str, t: torch.Tensor):
        self.seen.add(name)
        if self.reduce is not None:  # reduced now, before anything can change t
            self.out[name] = self.reduce(name, t)
            return
        v = t.detach() if self.detach else t
        ptr = None if self.copy else _storage(v)
        if ptr is None:
            v = v.clone()
        else:
            self.watch.setdefault(ptr, []).append(name)
            if not v.is_inference():  # inference tensors have no version counter (the mode still watches)
                self.versions[name] = (v, v._version)
        self.out[name] = v

    def before_write(self, tensors):
        """Copy the recorded outputs that share storage with tensors about to be written."""
        for t in tensors:
            for name in self.watch.pop(_storage(t), ()):
                self.out[name] = self.out[name].clone()
                self.versions.pop(name, None)


class _CopyOnWrite(TorchFunctionMode):
    def __init__(self, rec: _Recorder):
        super().__init__()
        self.rec = rec

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.rec.watch and self.rec.running:
            written = _written(func, args, kwargs)
            if written:
                with torch._C.DisableTorchFunction():
                    self.rec.before_write(written)
        return func(*args, **kwargs)


@contextmanager
def taps(model: nn.Module, names: Iterable[str], *, detach: bool = True, stop: bool = False, reduce=None,
         copy: bool = False):
    """Record the outputs of the named layers while the block runs; hooks are removed on every exit.

    Args:
        names: layer names: module names as in `model.named_modules()` for a module's first call,
            `NAME#2`, `NAME#3`, ... for its later calls in the same forward pass (call numbers restart at
            each call of `model`).
        detach: store detached tensors (False keeps the autograd graph, for projections).
        stop: raise inside the forward pass once every tap is recorded, so deeper layers never run;
            use `run_with_taps`, which catches it.
        reduce: optional fn(name, tensor) -> value stored instead of the tensor (e.g. a spatial max),
            so that full maps are never kept.
        copy: copy every recorded output at once (default: only when an op is about to write into it).
    Yields: dict name -> recorded value (filled as the forward pass runs; a later forward pass in the same
        block replaces the values).
    Raises: TapOverwritten (a ZfnetError) when the block ends, if an op the taps cannot see changed a
        recorded output.
    """
    names = list(dict.fromkeys(names))
    modules = dict(model.named_modules())
    wanted: dict[str, dict[int, str]] = {}
    missing = []
    for n in names:
        module, k = split_call(n)
        if not module or module not in modules:
            missing.append(n)
        else:
            wanted.setdefault(module, {})[k] = n
    if missing:
        raise unknown_layer(missing[0], modules)
    rec = _Recorder(names, wanted, detach, stop, reduce, copy)
    handles = [model.register_forward_pre_hook(rec.start),
               model.register_forward_hook(rec.end, always_call=True)]
    watching = reduce is None and not copy and names
    try:
        for module in wanted:
            handles.append(modules[module].register_forward_hook(rec.hook(module)))
        with _CopyOnWrite(rec) if watching else nullcontext():
            yield rec.out
        rec.end(model, ())
        if rec.stale:
            raise TapOverwritten(dict.fromkeys(rec.stale))
    finally:
        for h in handles:
            h.remove()


_NEEDS_COPY: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()  # models that write where the mode cannot see


def run_with_taps(model: nn.Module, x: torch.Tensor, names: Iterable[str], *, stop: bool = True,
                  detach: bool = True, reduce=None) -> dict:
    """One forward pass returning {layer name: output}; with stop=True it ends at the deepest tap.

    A model caught writing into a recorded output behind the taps' back (TapOverwritten) is run again
    with copies taken at once, and so are its later passes (one line on stderr says so)."""
    names = list(names)
    while True:
        copy = model in _NEEDS_COPY
        try:
            with taps(model, names, stop=stop, detach=detach, reduce=reduce, copy=copy) as out:
                try:
                    model(x)
                except _StopForward:
                    pass
            return out
        except TapOverwritten as e:
            if copy:
                raise
            _NEEDS_COPY.add(model)
            print(f"zfnet: {', '.join(e.names)}: changed in place by an op taps cannot watch; "
                  f"forward passes of this model now record copies", file=sys.stderr)
