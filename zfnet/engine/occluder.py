"""Model outputs for many occluded copies of one image (the computation behind Fig. 7), exactly and as fast
as this machine allows: zfnet.engine.incremental where it follows the model and is faster, full forward
passes otherwise. Speed is measured, never assumed: on a probe of a few positions both methods run, their
answers are compared, and the faster one does the rest. Which method ran and why is returned and said on
stderr in one line.
"""

from __future__ import annotations

import collections
import math
import sys
import time
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..core.errors import ZfnetError
from ..core.progress import progress_bar
from ..inspect.units import split_call
from . import graph
from .graph import describe, is_cached, structure, trace
from .incremental import Incremental, Unsupported

__all__ = ["Occluded", "occluder_boxes", "occluded_outputs", "module_calls", "forget"]

METHODS = ("auto", "incremental", "naive")
PROBE = 8  # positions run both ways to choose the method
MAX_FRACTION = 0.9  # an incremental pass estimated to do more of the full passes' work cannot win
# What building the engine costs, measured (process time, one thread, under load) on the 20 zoo models,
# at 128 and 224 px (not on SqueezeNet 1.1 or ZFNet): the fx trace 0.2-0.75 ms per module (0.03 s on ResNet-50,
# 0.12 s on DenseNet-121, 0.24 s on timm's EfficientNet-B0); the replay of the graph on the clean image
# 1.0-1.9x one forward pass of the image plus up to 0.5 ms per module (RegNetX-002: 600 small ops,
# 0.17 s for a 0.026 s forward). That is 1.3-18x the time of one position of full passes. The estimate
# below is at or above every one of these: 2 forward passes + 0.5 ms per module, + 0.75 ms per module
# where the model has no kept trace; a forward pass of one image is at most 4x the time per position of
# a batch of full passes (1.1-3.7x measured), which bounds the estimate where the one forward timed was
# a first, cold call.
BUILD_FORWARDS, BUILD_MODULE_S, TRACE_MODULE_S, FORWARD_PER_POSITION = 2.0, 0.5e-3, 0.75e-3, 4.0
# The engine is tried (built, then run on the probe) only where the full passes left would take PAYBACK
# times what a try costs: it then pays for itself from 1.5x the speed of full passes, and where it turns
# out slower (the probe says so) at most a third of the job is lost. After one image of a model its build
# time and speed are known and decide the next images exactly.
PAYBACK = 3.0


def occluder_boxes(n: int, size: int, stride: int, what: str = "occluder") -> list[tuple[int, int]]:
    """Occluder extents along one axis of n pixels: starts 0, stride, ... up to ceil((n-size)/stride)*stride,
    the last one truncated at the border (exactly Captum's Occlusion positions). A stride larger than the
    size is refused where it would leave pixels between positions never occluded."""
    if size < 1 or stride < 1:
        raise ZfnetError(f"{what} size and stride must be >= 1 (got size {size}, stride {stride})")
    if size > n:
        raise ZfnetError(f"{what} size {size} exceeds the {n}-pixel input")
    if stride > size and size < n:
        raise ZfnetError(f"{what} stride {stride} exceeds its size {size}: pixels between positions would never "
                         f"be occluded")
    steps = math.ceil((n - size) / stride) + 1
    return [(i * stride, min(n, i * stride + size)) for i in range(steps)]


@dataclass
class Occluded:
    """What occluded_outputs computed, and how."""

    outputs: torch.Tensor  # (P, K) model outputs, one row per box
    tracks: list[torch.Tensor]  # per tracked layer, (P, C)
    method: str  # "incremental", "naive" (full forward passes) or "incremental+naive"
    reason: str
    positions: dict = field(default_factory=dict)  # positions computed by each method

    def to_json(self) -> dict:
        return {"method": self.method, "reason": self.reason, "positions": dict(self.positions)}


def occluded_outputs(model: nn.Module, x: torch.Tensor, boxes, *, baseline: torch.Tensor | None = None,
                     tracks=(), locations=None, method: str = "auto", batch_size: int = 64,
                     progress: bool = False, report: bool = True, reference: torch.Tensor | None = None) -> Occluded:
    """Model outputs for the image x (1, C, H, W) with each box (y0, y1, x0, x1) set to `baseline`.

    Args:
        baseline: (1, C, H, W) (or broadcastable) values of occluded pixels; default zeros.
        tracks: layer names (module calls, "layer4.1.relu#2") whose per-channel totals are also returned;
            locations[t] = (y, x): that layer's values at one position instead.
        method: "auto" (full passes on a probe of a few positions; then, where the rest is long enough to
            pay for building it, the exact incremental engine if it is measured faster on the same probe),
            "incremental" (the engine wherever it can follow the model) or "naive" (a full forward pass
            per position).
        report: say on stderr which method ran and why.
        reference: model(x), where the caller has it.
    """
    if method not in METHODS:
        raise ZfnetError(f"unknown occlusion method {method!r}; use one of {', '.join(METHODS)}")
    boxes = [tuple(int(v) for v in b) for b in boxes]
    tracks, P = list(tracks), len(boxes)
    locations = list(locations) if locations is not None else [None] * len(tracks)
    base = torch.zeros_like(x) if baseline is None else baseline.to(x).expand_as(x)
    outs, trk = [None] * P, [[None] * P for _ in tracks]
    done = {"incremental": 0, "naive": 0}
    bar = progress_bar(total=P, desc="occlusion", unit="pos", enabled=progress)
    memory = _memory(model, x, tracks, boxes, batch_size)

    def keep(chunk, o, ts, how):
        for k, i in enumerate(chunk):
            outs[i] = o[k]
            for t, v in enumerate(ts):
                trk[t][i] = v[k]
        done[how] += len(chunk)
        bar.update(len(chunk))

    def naive(chunk):
        """Full passes; the first decides their memory layout: channels last where a clean copy of x in the
        same batch gives the model's own answer (PyTorch's layout for CPU convnets: 1.0-1.7x faster on
        every model of the zoo but ConvNeXt, which is even), else the default one."""
        chosen = memory.get("layout")
        bx = [boxes[i] for i in chunk]
        if chosen is None and not _may_use_channels_last(model, x, ref):
            chosen = memory["layout"] = torch.contiguous_format
        if chosen is None:
            try:
                o, ts = _naive(model, x, bx + [(0, 0, 0, 0)], base, tracks, locations, torch.channels_last)
                rows[0] += len(bx) + 1
                if _agrees(o[-1:], ref):
                    memory["layout"] = torch.channels_last
                    return o[:-1], [t[:-1] for t in ts]
            except Exception:  # e.g. a .view() that needs default strides
                pass
            chosen = memory["layout"] = torch.contiguous_format
        rows[0] += len(bx)
        try:
            return _naive(model, x, bx, base, tracks, locations, chosen)
        except Exception:
            if chosen == torch.contiguous_format:
                raise
            memory["layout"] = torch.contiguous_format  # the model refused channels last after all
            return _naive(model, x, bx, base, tracks, locations, torch.contiguous_format)

    def incremental(chunk, built=None):
        return (built or engine).run([boxes[i] for i in chunk], locations)

    engine, reason, rows = None, "requested", [0]
    with torch.no_grad():
        clock = _clock(x)
        t0 = clock()
        ref = model(x) if reference is None else reference
        t_ref = clock() - t0 if reference is None else None
        todo, ext = list(range(P)), None
        if method == "incremental":
            try:
                engine = Incremental.build(model, x, tracks, base, ref)
                ext, inc, full = engine.plan(torch.tensor(boxes, dtype=torch.long, device=x.device).view(-1, 4))
                reason = f"requested; estimated {float(inc.mean()) / max(full, 1.0):.0%} of the work of full passes"
            except Unsupported as e:
                reason = f"the incremental engine cannot follow this model: {e}"
        elif method == "auto":
            engine, reason, todo, ext = _auto(model, x, boxes, tracks, base, ref, t_ref, memory, incremental, naive,
                                              keep, rows, batch_size, clock)
        if engine is not None:
            batches = [[todo[i] for i in b] for b in _batches(ext.tolist(), batch_size)]
        else:
            batches = [todo[b:b + batch_size] for b in range(0, len(todo), batch_size)]
        for chunk in batches:
            if engine is not None:
                try:
                    keep(chunk, *incremental(chunk), "incremental")
                    continue
                except Exception as e:  # never worse than full passes: they are always right
                    engine = None
                    reason = (f"the incremental engine failed after {done['incremental']} positions "
                              f"({describe(e)}); full passes for the rest")
            keep(chunk, *naive(chunk), "naive")
    bar.close()
    used = "+".join(k for k in ("incremental", "naive") if done[k]) or "naive"
    if report:
        names = {"incremental": "exact incremental inference", "naive": "full forward passes"}
        name = names.get(used) or " and ".join(f"{names[k]} ({done[k]} positions)" for k in names)
        print(f"zfnet: occlusion by {name}: {reason}", file=sys.stderr)
    return Occluded(torch.stack(outs), [torch.stack(t) for t in trk], used, reason, done)


def _auto(model, x, boxes, tracks, base, ref, t_ref, memory, incremental, naive, keep, rows, batch_size, clock):
    """Full passes on a probe of a few positions (kept); then the engine, if the rest can pay for its build
    and it is measured faster than full passes on the same probe, with the same answers.
    Returns (engine or None, reason, the positions still to compute, their extents in the engine's plan)."""
    P = len(boxes)
    n = min(PROBE, batch_size, P)
    probe = [round(i * (P - 1) / max(n - 1, 1)) for i in range(n)]  # spread over the image, all distinct
    rest = sorted(set(range(P)) - set(probe))
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    B = max(1, min(batch_size, len(rest)))  # the batches the rest runs in

    def timed(fn, split=False):
        """fn on the probe: its results, and its seconds per position. split: as two batches (one position,
        then the others), predicting the seconds per position in batches of B: a batch of the engine costs
        about o + c x positions, o (a Python call per graph node) large: the seconds per position in batches
        of 8 put the engine at 0.8-1.1x full passes on three zoo models where in batches of 64 it was
        1.7-2.0x. Full passes gain little from larger batches on the CPU (in batches of 64 they took 0.6-1.5x
        the time per position of batches of 8 on eight zoo models), so they run the probe as one batch."""
        parts = [probe[n // 2:n // 2 + 1], probe[:n // 2] + probe[n // 2 + 1:]] if split else [probe, []]
        times = []
        outs = []
        for part in (p for p in parts if p):
            sync()
            t0, r0 = clock(), rows[0]
            outs.append(fn(part))
            sync()
            times.append((clock() - t0, max(rows[0] - r0, len(part))))
        order = [parts[0][0], *parts[1]] if parts[1] else parts[0]
        at = {i: k for k, i in enumerate(order)}
        o = torch.cat([r[0] for r in outs])[[at[i] for i in probe]]
        ts = [torch.cat([r[1][t] for r in outs])[[at[i] for i in probe]] for t in range(len(outs[0][1]))]
        (ta, na), (tb, nb) = times[0], times[-1]
        c = (tb - ta) / (nb - na) if nb > na else 0.0
        if not 0 < c <= tb / nb:  # noise, or a single batch: no fixed cost measured
            return (o, ts), (ta + tb) / (na + nb)
        return (o, ts), (ta - na * c) / B + c

    (o_n, tr_n), t_full = timed(naive)
    keep(probe, o_n, tr_n, "naive")
    if not rest:
        return None, f"too few positions for the engine to pay: all {P} were computed by the full passes of " \
                     f"the probe", rest, None
    left = len(rest) * t_full
    known, speed = memory.get("build"), memory.get("speed")
    for verdict in (known, speed):
        if isinstance(verdict, str):  # an earlier image found the engine unusable here
            return None, f"{verdict} (on an earlier image of this model)", rest, None
    if known is not None:
        build, how = known, "measured on an earlier image"
    else:
        forward = FORWARD_PER_POSITION * t_full if t_ref is None else min(t_ref, FORWARD_PER_POSITION * t_full)
        modules = sum(1 for _ in model.modules())
        build = BUILD_FORWARDS * forward + modules * (BUILD_MODULE_S + (0 if is_cached(model) else TRACE_MODULE_S))
        how = "estimated"
    if speed is not None and left * (1 - 1 / max(speed, 1e-9)) < build:
        return None, (f"the engine would not pay: it ran at {speed:.2f}x the speed of full passes on an earlier "
                      f"image of this model; the {len(rest)} full passes left take about {left:.2g} s, a build "
                      f"{build:.2g} s"), rest, None
    trial = build + len(probe) * t_full  # a build, and the engine's run of the probe (about a full pass's)
    if speed is None and left < PAYBACK * trial:
        return None, (f"too few positions for the engine to pay: the {len(rest)} full passes left take about "
                      f"{left:.2g} s, building the engine and timing it on the probe about {trial:.2g} s "
                      f"({how}; it is tried where they take {PAYBACK:g}x that)"), rest, None
    try:
        trace(model)  # timed apart: the next image finds it kept
    except Unsupported:
        pass  # the build says why
    t0 = clock()
    try:
        engine = Incremental.build(model, x, tracks, base, ref)
    except Unsupported as e:
        memory["build"] = reason = f"the incremental engine cannot follow this model: {e}"
        return None, reason, rest, None
    memory["build"] = clock() - t0
    ext, inc, full = engine.plan(torch.tensor([boxes[i] for i in rest], dtype=torch.long,
                                              device=x.device).view(-1, 4))
    fraction = float(inc.mean()) / max(full, 1.0)
    if fraction > MAX_FRACTION:
        memory["speed"] = reason = (f"an exact incremental pass would still do {fraction:.0%} of the work of full "
                                    f"passes (an occluder changes every position early in this network)")
        return None, reason, rest, None
    try:
        (o_i, tr_i), t_inc = timed(lambda chunk: incremental(chunk, engine), split=True)
    except Exception as e:
        return None, f"the incremental engine failed on its first positions ({describe(e)})", rest, None
    diff = max(_relative(a, b) for a, b in zip([o_i, *tr_i], [o_n, *tr_n]))
    if diff > 1e-3:
        memory["build"] = reason = f"the incremental engine differed from full passes by {diff:.1e} (relative) " \
                                   f"on a probe"
        return None, reason, rest, None
    memory["speed"] = speed = t_full / max(t_inc, 1e-12)
    probe_says = (f"{speed:.2f}x the speed of full passes in batches of {B} (timed on {len(probe)} probe "
                  f"positions); estimated {fraction:.0%} of their work")
    if speed >= 1.0:
        return engine, probe_says, rest, ext
    return None, f"the incremental engine ran at {probe_says}", rest, None


def _clock(x):
    """The clock the probe compares the methods by: with one CPU thread, this process's CPU time (the work
    done, whatever the neighbours on a shared machine do: wall time there misjudged the faster method by
    up to 1.7x in a zoo run); else wall time (CPU time would count threads that spin while waiting)."""
    if x.device.type == "cpu" and torch.get_num_threads() == 1:
        return time.process_time
    return time.perf_counter


def _relative(a, b):
    return float((a - b).abs().max()) / max(float(b.abs().max()), 1e-30)


def _batches(extents: list[list[int]], batch_size: int) -> list[list[int]]:
    """Positions grouped so that each batch pads its windows little: a batch computes every position at
    the largest window extent in it. Rows and columns are binned separately into k quantile bins of the
    extents (k^2 cells of about batch_size positions); a cell is cut into batches of batch_size."""
    k = max(1, math.ceil(math.sqrt(len(extents) / batch_size)))

    def bins(values):
        count = collections.Counter(values)
        out, seen = {}, 0
        for v in sorted(count):
            out[v] = min(k - 1, seen * k // len(values))
            seen += count[v]
        return out

    by, bx = bins([e[0] for e in extents]), bins([e[1] for e in extents])
    cells = collections.defaultdict(list)
    for i, (ey, ex) in enumerate(extents):
        cells[by[ey], bx[ex]].append(i)
    return [cell[s:s + batch_size] for _, cell in sorted(cells.items()) for s in range(0, len(cell), batch_size)]


def _may_use_channels_last(model, x, ref) -> bool:
    """Channels last is tried for full passes of a convnet on the CPU only."""
    return x.dim() == 4 and x.device.type == "cpu" and isinstance(ref, torch.Tensor) and any(
        isinstance(m, nn.Conv2d) for m in model.modules())


def _agrees(got, ref) -> bool:
    return isinstance(got, torch.Tensor) and got.shape == ref.reshape(1, -1).shape and torch.allclose(
        got, ref.reshape(1, -1), rtol=1e-4, atol=1e-5 * float(ref.abs().max()))


_SEEN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> (structure, {key: what was learnt})


def forget(model: nn.Module):
    """Forget what earlier calls learnt about the model (its trace, full-pass layout, build time and the
    engine's speed): the next call decides as on a first image."""
    _SEEN.pop(model, None)
    graph.forget(model)


def _memory(model, x, tracks, boxes, batch_size) -> _Memory:
    """What earlier calls learnt about this model on inputs like x: the memory layout of its full passes,
    the time a build of the engine takes (or why the engine is not used), and its speed against full
    passes for these boxes. Forgotten with the model, or when its structure changes."""
    key = structure(model)
    kept = _SEEN.get(model)
    if kept is None or kept[0] != key:
        kept = _SEEN[model] = key, {}
    shape = (tuple(x.shape), x.dtype, str(x.device))
    return _Memory(kept[1], {"layout": (shape,), "build": (shape, tuple(tracks)),
                             "speed": (shape, tuple(tracks), hash(tuple(boxes)), batch_size)})


class _Memory:
    """A view of one model's memory: "layout" per input, "build" (seconds, or why the engine cannot be
    used) per input and tracked layers, "speed" (against full passes, or why the engine cannot win) also
    per boxes and batch size."""

    def __init__(self, store: dict, keys: dict):
        self.store, self.keys = store, keys

    def get(self, name):
        return self.store.get((name, *self.keys[name]))

    def __setitem__(self, name, value):
        self.store[(name, *self.keys[name])] = value


def _naive(model, x, boxes, base, tracks, locations, layout=torch.contiguous_format):
    """A full forward pass per occluder position (in memory format `layout`)."""
    xb = x.expand(len(boxes), *x.shape[1:]).clone(memory_format=layout)  # never a view of the caller's image
    for i, (y0, y1, x0, x1) in enumerate(boxes):
        xb[i, :, y0:y1, x0:x1] = base[0, :, y0:y1, x0:x1]
    if not tracks:
        return model(xb).reshape(len(boxes), -1), []

    def reduce(t, at):  # copies: a later in-place op (F.relu(x, inplace=True), +=) must not change them
        if t.dim() <= 2:
            return t.reshape(len(t), -1).clone()
        return t[:, :, at[0], at[1]].clone() if at is not None else t.flatten(2).sum(-1)

    with module_calls(model, tracks, [lambda t, at=at: reduce(t, at) for at in locations]) as got:
        o = model(xb)
    missing = [n for t, n in enumerate(tracks) if t not in got]
    if missing:
        raise ZfnetError(f"layer {missing[0]} was not called in the forward pass")
    return o.reshape(len(boxes), -1), [got[t] for t in range(len(tracks))]


@contextmanager
def module_calls(model: nn.Module, names, reduces=None):
    """Record reduce(output) of the named module calls ("name" = its first call, "name#k" its k-th) during
    one forward pass; hooks are removed on every exit. Yields a dict: position in `names` -> value (by
    position, not name: one call may be asked for twice, reduced two ways)."""
    modules = dict(model.named_modules())
    out, handles = {}, []
    wanted = collections.defaultdict(list)
    for t, name in enumerate(names):
        base, k = split_call(name)
        if base not in modules or not base:
            raise ZfnetError(f"unknown layer {name!r}; valid layers: {', '.join(n for n in modules if n)}")
        wanted[base].append((k, t, reduces[t] if reduces else (lambda v: v.detach().clone())))
    seen = collections.Counter()

    def hook(base):
        def fn(module, args, output):
            seen[base] += 1
            for k, t, reduce in wanted[base]:
                if k == seen[base]:
                    out[t] = reduce(output[0] if isinstance(output, (tuple, list)) else output)
        return fn

    try:
        for base in wanted:
            handles.append(modules[base].register_forward_hook(hook(base)))
        yield out
    finally:
        for h in handles:
            h.remove()
