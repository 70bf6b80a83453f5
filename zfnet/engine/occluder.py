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
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..core.errors import ZfnetError
from ..core.progress import progress_bar
from ..inspect.units import split_call
from .graph import describe
from .incremental import Incremental, Unsupported

__all__ = ["Occluded", "occluder_boxes", "occluded_outputs", "module_calls"]

METHODS = ("auto", "incremental", "naive")
PROBE = 8  # positions run both ways to choose the method
MAX_FRACTION = 0.9  # an incremental pass estimated to do more of the full passes' work cannot win


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
                     progress: bool = False, report: bool = True) -> Occluded:
    """Model outputs for the image x (1, C, H, W) with each box (y0, y1, x0, x1) set to `baseline`.

    Args:
        baseline: (1, C, H, W) (or broadcastable) values of occluded pixels; default zeros.
        tracks: layer names (module calls, "layer4.1.relu#2") whose per-channel totals are also returned;
            locations[t] = (y, x): that layer's values at one position instead.
        method: "auto" (the faster of the two, measured on a probe), "incremental" (the exact incremental
            engine wherever it can follow the model) or "naive" (a full forward pass per position).
        report: say on stderr which method ran and why.
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

    def keep(chunk, o, ts, how):
        for k, i in enumerate(chunk):
            outs[i] = o[k]
            for t, v in enumerate(ts):
                trk[t][i] = v[k]
        done[how] += len(chunk)
        bar.update(len(chunk))

    def naive(chunk):
        nonlocal layout
        try:
            return _naive(model, x, [boxes[i] for i in chunk], base, tracks, locations, layout)
        except Exception:
            if layout == torch.contiguous_format:
                raise
            layout = torch.contiguous_format  # the model refused channels last after all
            return _naive(model, x, [boxes[i] for i in chunk], base, tracks, locations, layout)

    def incremental(chunk):
        return engine.run([boxes[i] for i in chunk], locations)

    engine, reason = None, "requested"
    with torch.no_grad():
        ref = model(x)
        layout = _full_pass_layout(model, x, ref)
        if method != "naive":
            try:
                engine = Incremental.build(model, x, tracks, base, ref)
            except Unsupported as e:
                reason = f"the incremental engine cannot follow this model: {e}"
        if engine is not None:
            ext, inc, full = engine.plan(torch.tensor(boxes, dtype=torch.long, device=x.device).view(-1, 4))
            fraction = float(inc.mean()) / max(full, 1.0)
            batches = _batches(ext.tolist(), batch_size)
            reason = f"requested; estimated {fraction:.0%} of the work of full passes"
            if method == "auto" and fraction > MAX_FRACTION:
                engine, reason = None, (f"an exact incremental pass would still do {fraction:.0%} of the work of "
                                        f"full passes (an occluder changes every position early in this network)")
            elif method == "auto":
                engine, reason, batches = _probe(engine, batches, ext.tolist(), incremental, naive, keep, x,
                                                 fraction)
        else:
            batches = [list(range(b, min(b + batch_size, P))) for b in range(0, P, batch_size)]
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
        name = {"incremental": "exact incremental inference", "naive": "full forward passes"}.get(used, used)
        print(f"zfnet: occlusion by {name}: {reason}", file=sys.stderr)
    return Occluded(torch.stack(outs), [torch.stack(t) for t in trk], used, reason, done)


def _probe(engine, batches, ext, incremental, naive, keep, x, fraction):
    """Run a few positions both ways: check that they agree, and keep the faster method for the rest.
    Returns (engine or None, reason, the batches still to run)."""
    areas = [sum(ext[i][0] * ext[i][1] for i in b) / len(b) for b in batches]
    mean = sum(a * len(b) for a, b in zip(areas, batches)) / sum(len(b) for b in batches)
    pick = min(range(len(batches)), key=lambda i: abs(areas[i] - mean))  # a typical batch
    first = batches[pick][:PROBE]
    rest = [b for i, b in enumerate(batches) if i != pick] + ([batches[pick][PROBE:]] if batches[pick][PROBE:] else [])
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)

    def timed(fn):
        sync()
        t0 = time.perf_counter()
        out = fn(first)
        sync()
        return out, (time.perf_counter() - t0) / len(first)

    try:
        (o_i, tr_i), t_inc = timed(incremental)
    except Exception as e:
        keep(first, *naive(first), "naive")
        return None, f"the incremental engine failed on its first positions ({describe(e)})", rest
    (o_n, tr_n), t_full = timed(naive)
    diff = max(_relative(a, b) for a, b in zip([o_i, *tr_i], [o_n, *tr_n]))
    if diff > 1e-3:
        keep(first, o_n, tr_n, "naive")
        return None, f"the incremental engine differed from full passes by {diff:.1e} (relative) on a probe", rest
    speed = t_full / max(t_inc, 1e-12)
    probe = (f"{speed:.2f}x the speed of full passes on {len(first)} probe positions; estimated {fraction:.0%} of "
             f"their work")
    if speed >= 1.0:
        keep(first, o_i, tr_i, "incremental")
        return engine, probe, rest
    keep(first, o_n, tr_n, "naive")
    return None, f"the incremental engine ran at {probe}", rest


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


def _full_pass_layout(model, x, ref):
    """The memory format of full forward passes: channels last for a convnet on the CPU where the model,
    given channels-last images, answers the same (PyTorch's layout for CPU convnets: 1.0-1.7x faster on every
    model of the zoo but ConvNeXt, which is even), else the default one."""
    if x.dim() != 4 or x.device.type != "cpu" or not isinstance(ref, torch.Tensor) or not any(
            isinstance(m, nn.Conv2d) for m in model.modules()):
        return torch.contiguous_format
    try:  # a batch of two: with one image, more layouts look contiguous than in the batches that follow
        got = model(x.expand(2, *x.shape[1:]).contiguous(memory_format=torch.channels_last))
    except Exception:  # e.g. a .view() that needs default strides
        return torch.contiguous_format
    same = isinstance(got, torch.Tensor) and got.shape[1:] == ref.shape[1:] and len(got) == 2 and torch.allclose(
        got, ref.expand_as(got), rtol=1e-4, atol=1e-5 * float(ref.abs().max()))
    return torch.channels_last if same else torch.contiguous_format


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
