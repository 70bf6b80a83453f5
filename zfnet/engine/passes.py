"""The batched passes behind `project` (Sec. 2.1's deconvnet attached to every layer at once).

Every projection is a job: an objective (one unit, several units summed, or an output score) on one input
row. Jobs that need the same forward computation share it: a row is an image (or the crop of one around a
location, see zfnet.engine.crop), computed once by a forward pass stopped at the deepest layer the batch
needs; the backward passes then run in rounds, round k seeding the k-th job of every row, so K units on
one image cost one forward and K backwards instead of K of each. Rows with many jobs are split so that
rounds do not run mostly empty (a forward costs about as much as a backward).
"""

from __future__ import annotations

import math
import weakref
from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..core.errors import ZfnetError
from ..inspect.layers import run_with_taps, taps
from .crop import CropPlan, take

__all__ = ["Job", "Counts", "run_jobs", "SCORES"]

SCORES = ("logit", "log_prob", "prob")


@dataclass
class Job:
    """One projection: `terms` ((Unit, seed value or None), ...) summed as one objective, or the output
    score of class `target`; on row `source` of the sources; its result goes to `slot`."""

    slot: int
    source: int
    terms: tuple = ()
    target: int | None = None
    depth: float = 0  # execution index of the deepest layer it needs (inf: the output)
    plan: CropPlan | None = None  # a single located unit computed on its crop
    place: tuple = ()  # its crop of the input, ((y0, ly), (x0, lx))


@dataclass
class Counts:
    """What the passes did, for the projection's metadata."""

    forward_rows: int = 0
    backward_rows: int = 0
    zero_seed: list = field(default_factory=list)  # jobs whose seed was all zeros
    score_source: str | None = None  # where output scores were read


class _FinalSoftmax(TorchFunctionMode):
    """Remembers the last softmax / log_softmax and its input, so a model whose output is a probability
    is scored on the logits that feed it (the class score before the softmax, Simonyan et al.)."""

    _NAMES = {"softmax", "log_softmax", "_softmax", "_log_softmax"}

    def __init__(self):
        super().__init__()
        self.last = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if getattr(func, "__name__", "") in self._NAMES and args and isinstance(args[0], torch.Tensor):
            self.last = (out, args[0])
        return out


def _forward(model, x, layers: list[str], output: bool, rules):
    """One forward pass; returns ({layer: activation}, output or None, final-softmax recorder or None)."""
    with rules:
        if not output:  # stopped at the deepest layer
            return run_with_taps(model, x, layers, stop=True, detach=False), None, None
        rec = _FinalSoftmax()
        with taps(model, layers, detach=False) as acts, rec:
            out = model(x)
        return dict(acts), out, rec


def _scores(out, rec, score: str, counts: Counts):
    """The output as scores of each class: logits (default), log-probabilities or probabilities."""
    if isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, torch.Tensor) or out.dim() < 2:
        raise ZfnetError("target needs a model whose output is a (N, classes, ...) tensor")
    logits, source = out, "the model's output"
    if rec is not None and rec.last is not None and rec.last[0] is out:
        logits, source = rec.last[1], "the input of the model's final softmax (its logits)"
    counts.score_source = source
    if score == "logit":
        return logits
    return F.log_softmax(logits, 1) if score == "log_prob" else F.softmax(logits, 1)


def _seed_rows(acts: dict, scores, jobs: list, units: dict, seed: str, counts: Counts) -> list:
    """[(tensor, seed)] of this round: row b seeds jobs[b] (None: the row is idle this round)."""
    seeds: dict[int, tuple] = {}
    for b, job in enumerate(jobs):
        if job is None:
            continue
        terms = list(zip(units[id(job)], (v for _, v in job.terms)))
        if job.target is not None:
            if not 0 <= job.target < scores.shape[1]:
                raise ZfnetError(f"target class {job.target} out of range 0..{scores.shape[1] - 1} for the "
                                 f"model's {scores.shape[1]} outputs")
            terms.append((None, None))
        for u, value in terms:
            if u is None:  # the output score of the target class (summed over positions if it has them)
                t, index = scores, (b, job.target)
            else:
                t = acts[u.layer]
                if t.dim() == 4:
                    index = (b, u.channel) if u.y is None else (b, u.channel, u.y, u.x)
                else:  # a vector layer (or tokens): a unit is one feature, over any middle axes
                    index = (b, Ellipsis, u.channel) if t.dim() > 2 else (b, u.channel)
            s = seeds.setdefault(id(t), (t, torch.zeros_like(t)))[1]
            if value is not None:
                s[index] += value
            elif seed == "activation":
                s[index] += t.detach()[index]
            else:
                s[index] += 1
    live = torch.zeros(len(jobs), dtype=torch.bool)
    for _, s in seeds.values():
        live |= s.detach().flatten(1).ne(0).any(1).cpu()
    counts.zero_seed += [job for b, job in enumerate(jobs) if job is not None and not live[b]]
    return list(seeds.values())


def _rounds(counts: list[int]) -> int:
    """How many jobs a row takes at most: splitting a row of c jobs into ceil(c / K) rows costs their
    forwards; K rounds of backward cost K passes over every row. Forward and backward cost about the same."""
    best, k_best = math.inf, 1
    for k in range(1, max(counts) + 1):
        rows = sum(-(-c // k) for c in counts)
        if rows * (1 + k) < best:
            best, k_best = rows * (1 + k), k
    return k_best


def run_jobs(model: nn.Module, sources: torch.Tensor, jobs: list[Job], *, rules, seed: str, score: str,
             pixel_budget: int, batch_size: int | None, emit, counts: Counts):
    """Run every job in shared batched passes; emit(job, grad (C, h, w), crop box or None) for each.

    A row is a source image (its jobs computed on it whole), or a source cropped around one location (the
    jobs of one layer there); a batch holds rows of one kind and shape, so it is one tensor."""
    groups: dict[tuple, dict] = defaultdict(lambda: defaultdict(list))
    whole: dict[int, list[Job]] = defaultdict(list)
    for job in jobs:
        if job.plan is not None:
            key = ("crop", job.plan.layer, job.place[0][1], job.place[1][1])
            groups[key][(job.source, job.place)].append(job)
        else:
            whole[job.source].append(job)
    for source, js in whole.items():  # an image's jobs share one pass to the deepest layer they need
        groups[("whole", max(j.depth for j in js))][source] = js
    h, w = sources.shape[-2:]
    for key, rows in sorted(groups.items(), key=lambda kv: str(kv[0])):
        k = _rounds([len(v) for v in rows.values()])
        split = [v[i:i + k] for v in rows.values() for i in range(0, len(v), k)]
        split.sort(key=len, reverse=True)  # rows with as many jobs batch together: few idle rounds
        hc, wc = key[2:] if key[0] == "crop" else (h, w)
        per_batch = batch_size or max(1, pixel_budget // (hc * wc))
        for s in range(0, len(split), per_batch):
            _batch(model, sources, split[s:s + per_batch], rules, seed, score, emit, counts)


# The memory format of the passes, per model. On the CPU, oneDNN runs convolutions and pooling 1.5-2.3x
# faster forward and about 1.5x faster backward on channels-last tensors (SqueezeNet, 224 px); the values
# are the same, only their order in memory differs, so a model that cannot take them (a .view() that needs
# default strides) fails loudly and is then run in the default format.
_LAYOUT: "weakref.WeakKeyDictionary[nn.Module, torch.memory_format]" = weakref.WeakKeyDictionary()


def _batch(model, sources, rows: list[list[Job]], rules, seed, score, emit, counts: Counts):
    """One forward over the rows (the first job of each says what the row is), then one backward per round."""
    plan = rows[0][0].plan
    src = [r[0].source for r in rows]
    x = take(sources, src, [r[0].place for r in rows]) if plan is not None else sources[src]  # a new tensor
    all_jobs = [j for r in rows for j in r]
    layers = sorted({u.layer for j in all_jobs for u, _ in j.terms})
    output = any(j.target is not None for j in all_jobs)
    layout = _LAYOUT.get(model, torch.channels_last if x.device.type == "cpu" and x.dim() == 4
                         else torch.contiguous_format)
    while True:
        leaf = x.contiguous(memory_format=layout).detach().requires_grad_(True)
        try:
            # A clone keeps the leaf out of reach of a model whose first op is in place.
            acts, out, rec = _forward(model, leaf.clone(), layers, output, rules)
            break
        except Exception:
            if layout == torch.contiguous_format:
                raise
            layout = _LAYOUT[model] = torch.contiguous_format  # e.g. a .view() that needs default strides
    counts.forward_rows += len(rows)
    scores = _scores(out, rec, score, counts) if output else None
    units = {id(j): [plan.local(u, j.place) if plan is not None else u for u, _ in j.terms] for j in all_jobs}
    depth = max(len(r) for r in rows)
    for k in range(depth):
        jobs = [r[k] if k < len(r) else None for r in rows]
        live = [(t, s) for t, s in _seed_rows(acts, scores, jobs, units, seed, counts) if t.requires_grad]
        grads = None
        if live:
            grads = torch.autograd.grad([t for t, _ in live], leaf, [s for _, s in live],
                                        retain_graph=k < depth - 1, allow_unused=True)[0]
            counts.backward_rows += len(rows)
        if grads is None:  # nothing seeded here depends on the input
            grads = torch.zeros_like(leaf)
        for b, job in enumerate(jobs):
            if job is not None:
                emit(job, grads[b], job.place if plan is not None else None)
