"""Projection of activations back to pixel space (Sec. 2.1): deconvnet, guided backprop, saliency.

`project(model, images, units)` seeds the backward pass with a unit's own activation(s), every other
activation of its layer set to zero, as the paper passes a feature map into the attached deconvnet, and
returns the input-space result. The same engine gives Captum's seed of one (`seed="one"`), output class
scores (`target=`: Simonyan et al.'s saliency, CS231n's data gradient, and their deconv / guided
versions), several units summed as one objective (`aggregate=True`), and SmoothGrad / VarGrad over any of
them (`smooth=`). The backward rules live in zfnet.engine.rules; speed comes from
zfnet.engine.passes (shared forward passes, batched backward rounds) and zfnet.engine.crop (each single
activation computed on its dependency cone only, exactly).
"""

from __future__ import annotations

import math
import sys
import weakref
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn as nn

from ..core.errors import ZfnetError
from ..inspect.layers import Unit, feature_layers, layer_table, parse_unit, run_with_taps
from .crop import plan_crop
from .passes import SCORES, Counts, Job, run_jobs
from .rules import MODES, BackwardRules, projection_state

__all__ = ["project", "strongest_map", "ProjectionInfo", "MODES", "SEEDS", "SCORES", "SMOOTHING"]

SEEDS = ("activation", "one")
SMOOTHING = ("smoothgrad", "smoothgrad_sq", "vargrad")
# Default batch: 6 full ImageNet images' worth of pixels. Smaller batches keep a pass's maps in the cache and
# under glibc's 32 MiB mmap threshold (larger blocks are mapped and page-faulted in afresh on every
# allocation: ZFNet's first maps, 96 channels at half resolution, pass it at 8 images). bench_project's
# workload (ZFNet relu3-5 and SqueezeNet features.9-12, 2 threads): 2.62 s at 8 images, 2.39 s at 6,
# 2.44 s at 5, 2.47 s at 4; 32 ran 1.1-1.4x slower than 8.
_PIXEL_BUDGET = 6 * 224 * 224


@dataclass
class ProjectionInfo:
    """What `project` computed and how (`return_info=True`); `to_json()` for result files."""

    mode: str
    seed: str  # "activation", "one" or "tensor"
    projections: int
    target: list | None = None  # output classes, one per image
    score: str | None = None  # "logit", "log_prob" or "prob"
    score_source: str | None = None  # which tensor the score was read from
    aggregate: bool = False
    smooth: dict | None = None  # {"kind", "samples", "sigma", "noise_seed"}
    zero_seed: list = field(default_factory=list)  # projections seeded with 0 (blank): "unit on image i"
    crops: dict = field(default_factory=dict)  # layer -> how its single activations were computed, and why
    forward_rows: int = 0  # rows through forward passes (fewer than projections where they share one)
    backward_rows: int = 0

    def to_json(self) -> dict:
        return asdict(self)


_WARNED: "weakref.WeakKeyDictionary[nn.Module, set]" = weakref.WeakKeyDictionary()


def _note_once(model: nn.Module, key: str, line: str):
    """One stderr line per model and reason: a projection that falls back says so, without flooding a
    loop of calls (the metadata always says it)."""
    seen = _WARNED.setdefault(model, set())
    if key not in seen:
        seen.add(key)
        print(f"zfnet: {line}", file=sys.stderr)


def project(model: nn.Module, images: torch.Tensor, units: Sequence[str | Unit] | None = None,
            mode: str = "deconv", *, pairs: bool = False, backprop_norm: bool = False,
            batch_size: int | None = None, crop: bool = True, seed: str | torch.Tensor | None = None,
            target: int | Sequence[int] | torch.Tensor | None = None, score: str = "logit",
            aggregate: bool = False, smooth: str | None = None, samples: int = 50, sigma: float = 0.15,
            noise_seed: int = 0, window: bool = False, rows: Sequence[int] | None = None,
            each: Callable[[int, torch.Tensor], None] | None = None, return_info: bool = False):
    """Project units (or an output class score) back to input space.

    Args:
        model: any nn.Module; left exactly as it was (hooks, requires_grad, train/eval mode).
        images: (N, C, H, W) preprocessed input.
        units: addresses ("conv5:17", "conv5:17@3,4", "fc7:3") or Units, of any layer. With a location,
            that one activation is projected; without, the whole feature map (or the feature, in a vector
            layer).
        mode: "deconv" (Zeiler & Fergus: ReLU backward = relu(grad_out)), "guided" (Springenberg et al.)
            or "saliency" (the plain gradient).
        pairs: False: every unit on every image -> (N, U, C, H, W). True: units[i] on images[i]
            (len(units) == N) -> (N, C, H, W), or on images[rows[i]] with `rows`.
        rows: with pairs=True, the image of each unit (U indices into images) -> (U, C, H, W): many
            units on few images without a copy of each image per unit (their projections share passes).
        backprop_norm: deconv mode passes LRN straight through (identity backward) as the paper's
            deconvnet does; True backpropagates it (what Captum computes). Guided and saliency always
            backpropagate it.
        batch_size: rows per forward pass (default: ~8 full 224 px images' worth of pixels).
        crop: compute single activations on their dependency cone only, where the model allows it
            (exact; the metadata says where and why not). False computes everything on the whole image.
        seed: what the backward pass starts from at the unit: "activation" (the paper's: the activation
            itself, so one activation gives `a * d a / d x` under the chosen rule; the default for units),
            "one" (Captum's and the plain gradient's: the unit's own derivative, whatever its sign or value;
            the default for targets), or a tensor of seed values broadcastable to (N, U) ((N,) with
            pairs or a target). A unit seeded with 0 projects to zeros: reported on stderr and in the
            metadata.
        target: an output class (int) for every image, or one per image (N ints): projects its score
            instead of units -> (N, C, H, W). A spatial output's class map is summed over positions.
        score: the target's score: "logit" (default: pre-softmax; a model whose output is a final
            softmax is scored on its input), "log_prob" (log-softmax) or "prob" (softmax).
        aggregate: sum all the units into one objective per image (one backward pass, so deconv and
            guided rectify the summed signal) -> (N, C, H, W).
        smooth: "smoothgrad" (the mean projection over noisy copies of each image, Smilkov et al.),
            "smoothgrad_sq" (the mean of their squares) or "vargrad" (their variance, Adebayo et al.);
            None: off.
        samples, sigma, noise_seed: noisy copies per image; noise standard deviation as a fraction of
            each image's range (max - min); the seed of the noise generator (same seed, same noise).
        window: return each projection's receptive-field window only, (..., C, field h, field w), zeros
            where the field leaves the image (nothing outside the field reaches the unit, so nothing is
            lost): single activations of one layer; a fraction of the memory for small fields.
        each: stream the projections instead of returning them: each(i, projection) as soon as projection i
            (flat index into the result's leading dimensions) is ready; the tensor is reused afterwards, so
            copy what you keep. Memory for one projection instead of all (not with smooth=).
        return_info: also return a ProjectionInfo.
    Returns: the projections, in the images' dtype and device; (projections, ProjectionInfo) with
        return_info; with `each`, None (or the ProjectionInfo).
    """
    if mode not in MODES:
        raise ZfnetError(f"unknown projection mode {mode!r}; choose one of {', '.join(MODES)}")
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise ZfnetError("images must be a (N, C, H, W) tensor")
    if (units is None) == (target is None):
        raise ZfnetError("give units to project or a target class, not both" if units is not None
                         else "nothing to project: give units (e.g. conv5:17) or a target class")
    if score not in SCORES:
        raise ZfnetError(f"unknown score {score!r}; choose one of {', '.join(SCORES)}")
    if smooth is not None and smooth not in SMOOTHING:
        raise ZfnetError(f"unknown smoothing {smooth!r}; choose one of {', '.join(SMOOTHING)}")
    if smooth is not None and (int(samples) != samples or samples < 1 or not (sigma >= 0 and math.isfinite(sigma))):
        raise ZfnetError(f"smoothing needs samples >= 1 and a finite sigma >= 0 (got samples={samples}, "
                         f"sigma={sigma})")
    if each is not None and smooth is not None:
        raise ZfnetError("each= streams finished projections: not with smooth= (its projections are averages)")
    if aggregate and (pairs or target is not None):
        raise ZfnetError("aggregate sums several units on each image: not with pairs=True or a target")
    n, c, h, w = images.shape
    with projection_state(model), torch.enable_grad():
        # Inside the guard: the table's forward pass must not update the batch-norm statistics of a
        # model in train mode.
        table = layer_table(model, (h, w), in_channels=c)
        units = [parse_unit(u, table) for u in units] if units is not None else []
        given = _pair_rows(rows, pairs, len(units), n)
        src = _same_images(images, given) if given is not None and smooth is None else given
        targets = _targets(target, n)
        seed_name, values = _seed_values(seed, len(src) if pairs else n, len(units), target is not None, pairs,
                                         aggregate)
        info = ProjectionInfo(mode, seed_name, 0, targets, score if targets else None, aggregate=aggregate)
        jobs, shape = _jobs(model, table, units, targets, values, n, src, aggregate, crop, info, c)
        info.projections = len(jobs)
        field = _window_field(table, units, window, target)
        # Whole-image projections are written whole (put clears what lies outside a crop), so only windows
        # and averages need a zeroed buffer.
        alloc = images.new_empty if field is None and smooth is None else images.new_zeros
        out = alloc((1 if each else len(jobs), c) + ((field.size_y, field.size_x) if field else (h, w)))
        rules = BackwardRules(mode, pass_norm=(mode == "deconv" and not backprop_norm))
        counts = Counts()
        run = dict(rules=rules, seed=seed_name, score=score, pixel_budget=_PIXEL_BUDGET, batch_size=batch_size,
                   counts=counts)
        if smooth is None:
            put = _placer(field)
            if each is None:
                run_jobs(model, images, jobs, emit=lambda job, g, box: put(out[job.slot], job, g, box), **run)
            else:
                def emit(job, g, box):
                    if field is not None:
                        out[0].zero_()
                    put(out[0], job, g, box)
                    each(job.slot, out[0])
                run_jobs(model, images, jobs, emit=emit, **run)
        else:
            info.smooth = {"kind": smooth, "samples": int(samples), "sigma": float(sigma), "noise_seed": noise_seed}
            _smoothed(model, images, jobs, out, smooth, int(samples), float(sigma), noise_seed, run, _placer(field))
    info.forward_rows, info.backward_rows, info.score_source = counts.forward_rows, counts.backward_rows, \
        counts.score_source
    _report_zero_seeds(model, counts, jobs, info, units, targets, given, aggregate)
    if each is not None:
        return info if return_info else None
    out = out.view(*shape, *out.shape[1:])
    return (out, info) if return_info else out


def _pair_rows(rows, pairs: bool, u: int, n: int) -> list[int] | None:
    """The image of each unit with pairs=True (None without pairs)."""
    if rows is None:
        if pairs and u != n:
            raise ZfnetError(f"pairs=True needs one unit per image: got {u} units for {n} images")
        return list(range(n)) if pairs else None
    if not pairs:
        raise ZfnetError("rows gives the image of each unit: it needs pairs=True")
    try:
        src = [int(r) for r in rows]
    except (TypeError, ValueError):
        raise ZfnetError(f"rows must be image indices, one per unit; got {rows!r}") from None
    if len(src) != u:
        raise ZfnetError(f"rows must give one image per unit: got {len(src)} rows for {u} units")
    bad = [r for r in src if not 0 <= r < n]
    if bad:
        raise ZfnetError(f"rows: image index {bad[0]} out of range 0..{n - 1}")
    return src


def _targets(target, n: int) -> list[int] | None:
    if target is None:
        return None
    if isinstance(target, torch.Tensor):
        target = target.flatten().tolist() if target.dim() else int(target)
    if isinstance(target, (int,)) and not isinstance(target, bool):
        return [int(target)] * n
    try:
        out = [int(t) for t in target]
    except (TypeError, ValueError):
        raise ZfnetError(f"target must be a class index or one per image, got {target!r}") from None
    if len(out) != n:
        raise ZfnetError(f"target must be a class index or one per image: got {len(out)} for {n} images")
    return out


def _seed_values(seed, n: int, u: int, target: bool, pairs: bool, aggregate: bool):
    """(seed name, per-job seed values or None)."""
    if seed is None:
        return ("one" if target else "activation"), None
    if isinstance(seed, str):
        if seed not in SEEDS:
            raise ZfnetError(f"unknown seed {seed!r}; choose one of {', '.join(SEEDS)}, or give a tensor")
        return seed, None
    grid = (n,) if target or pairs else (n, u)
    try:
        values = torch.as_tensor(seed, dtype=torch.float64).broadcast_to(grid)
    except (RuntimeError, TypeError, ValueError):
        raise ZfnetError(f"a seed tensor must broadcast to {tuple(grid)} (images{', units' if len(grid) > 1 else ''})"
                         f"; got shape {tuple(torch.as_tensor(seed).shape)}") from None
    return "tensor", values.tolist()


def _jobs(model, table, units, targets, values, n, src, aggregate, crop, info, channels):
    """The jobs in output order, and the output's leading shape."""
    def plan(u: Unit):
        if not crop or u.y is None:
            return None
        if u.layer not in plans:
            plans[u.layer] = p = plan_crop(model, table, u.layer, in_channels=channels, share=share[u.layer])
            info.crops[u.layer] = p.reason
            if p.limited and table[u.layer].height * table[u.layer].width > 1:
                _note_once(model, f"crop:{u.layer}", f"{u.layer}: {p.reason}; its projections are computed on "
                                                     f"the whole image (exact, slower)")
        p = plans[u.layer]
        return p if p.axes else None

    def job(slot, i, terms, tgt=None):
        depth = math.inf if tgt is not None else max(table[t.layer].index for t, _ in terms)
        j = Job(slot, i, tuple(terms), tgt, depth)
        p = plan(terms[0][0]) if len(terms) == 1 else None
        if p is not None:
            j.plan, j.place = p, p.place(terms[0][0])
        return j

    plans: dict = {}
    share = _share(units, src)
    if not crop:
        info.crops = {u.layer: "not cropped: crop=False" for u in units if u.y is not None}
    val = (lambda i, k: None) if values is None else (lambda i, k: values[i][k] if isinstance(values[i], list)
                                                       else values[i])
    if targets is not None:
        return [Job(i, i, (), targets[i], math.inf) for i in range(n)], (n,)
    if src is not None:  # pairs
        return [job(i, r, [(units[i], val(i, 0))]) for i, r in enumerate(src)], (len(src),)
    if aggregate:
        return [Job(i, i, tuple((u, val(i, k)) for k, u in enumerate(units)),
                    None, max(table[u.layer].index for u in units)) for i in range(n)], (n,)
    return [job(i * len(units) + k, i, [(u, val(i, k))]) for i in range(n) for k, u in enumerate(units)], \
        (n, len(units))


def _share(units, src) -> dict[str, float]:
    """Projections of single activations per image, by layer: what the crop rule weighs (zfnet.engine.crop)."""
    share: dict[str, float] = {}
    for layer in {u.layer for u in units if u.y is not None}:
        if src is None:  # every unit on every image
            share[layer] = float(sum(u.layer == layer and u.y is not None for u in units))
        else:
            mine = [r for u, r in zip(units, src) if u.layer == layer and u.y is not None]
            share[layer] = len(mine) / len(set(mine))
    return share


def _same_images(images: torch.Tensor, src: list[int]) -> list[int]:
    """Each row's first row with equal pixels, so their projections share a forward pass (a caller may
    send one image row per (unit, image) pair). Candidates have equal strided samples; they are compared
    exactly."""
    flat = images.flatten(1)
    stride = max(1, flat.shape[1] // 256)
    keys = [tuple(r) for r in flat[:, ::stride].tolist()]
    reps: dict[tuple, list[int]] = {}
    first: dict[int, int] = {}
    for i in sorted(set(src)):
        cands = reps.setdefault(keys[i], [])
        first[i] = next((r for r in cands if torch.equal(images[r], images[i])), i)
        if first[i] == i:
            cands.append(i)
    return [first[i] for i in src]


def _window_field(table, units, window: bool, target):
    """The layer's field when projections are returned as receptive-field windows (else None)."""
    if not window:
        return None
    layers = {u.layer for u in units}
    if target is not None or not units or len(layers) != 1 or any(u.y is None for u in units) \
            or table[units[0].layer].field is None:
        raise ZfnetError("window=True needs single activations (LAYER:CH@Y,X) of one layer with a receptive field")
    return table[units[0].layer].field


def _placer(field):
    """put(dest, job, g, box): write a pass's gradient g (the whole image, or its crop box) into dest, the
    whole image or (with a field) the unit's receptive-field window."""
    def put(dest, job: Job, g: torch.Tensor, box):
        (oy, ly), (ox, lx) = box if box is not None else ((0, g.shape[-2]), (0, g.shape[-1]))
        if field is None:  # dest is written whole: zeros around a crop
            dest[:, :oy] = 0
            dest[:, oy + ly:] = 0
            dest[:, oy:oy + ly, :ox] = 0
            dest[:, oy:oy + ly, ox + lx:] = 0
            dest[:, oy:oy + ly, ox:ox + lx] = g
            return
        u = job.terms[0][0]
        ry, rx = field.start_y + u.y * field.jump_y, field.start_x + u.x * field.jump_x
        y0, y1 = max(ry, oy), min(ry + field.size_y, oy + ly)
        x0, x1 = max(rx, ox), min(rx + field.size_x, ox + lx)
        dest[:, y0 - ry:y1 - ry, x0 - rx:x1 - rx] = g[:, y0 - oy:y1 - oy, x0 - ox:x1 - ox]
    return put


def _smoothed(model, images, jobs, out, kind, samples, sigma, noise_seed, run, put):
    """SmoothGrad / VarGrad: the jobs on `samples` noisy copies of each image, in batched passes; the noise
    of copy s is the s-th draw of one generator, whatever the batching (so results do not depend on it)."""
    n = images.shape[0]
    gen = torch.Generator().manual_seed(int(noise_seed))
    lo = images.flatten(1).amin(1).view(n, 1, 1, 1)
    std = sigma * (images.flatten(1).amax(1).view(n, 1, 1, 1) - lo)
    mean, m2 = torch.zeros_like(out), torch.zeros_like(out)
    count = torch.zeros(len(out), dtype=torch.long)
    # Welford's update, in any order of arrival: numerically safe for a variance near zero.

    def emit(job, g, box):
        full = torch.zeros_like(out[job.slot])
        put(full, job, g, box)
        count[job.slot] += 1
        d = full - mean[job.slot]
        mean[job.slot] += d / count[job.slot].item()
        m2[job.slot] += d * (full - mean[job.slot])

    per_chunk = max(1, _PIXEL_BUDGET // max(1, images[0].numel() // images.shape[1] * n))  # noisy copies held
    for s0 in range(0, samples, per_chunk):
        ss = range(s0, min(samples, s0 + per_chunk))
        noise = torch.stack([torch.randn(images.shape, generator=gen, dtype=torch.float32) for _ in ss])
        noisy = (images.unsqueeze(0) + noise.to(images.device, images.dtype) * std.unsqueeze(0)).flatten(0, 1)
        chunk = [Job(j.slot, k * n + j.source, j.terms, j.target, j.depth, j.plan, j.place)
                 for k in range(len(ss)) for j in jobs]
        run_jobs(model, noisy, chunk, emit=emit, **run)
    if kind == "smoothgrad":
        out.copy_(mean)
    else:  # vargrad: the variance; smoothgrad_sq: the mean square
        out.copy_(m2 / samples if kind == "vargrad" else m2 / samples + mean * mean)


def _report_zero_seeds(model, counts: Counts, jobs, info, units, targets, src, aggregate):
    if not counts.zero_seed:
        return
    labels = []
    for _, job in sorted({j.slot: j for j in counts.zero_seed}.items()):  # once each (SmoothGrad: per sample)
        what = f"class {job.target}" if job.target is not None else "+".join(str(u) for u, _ in job.terms)
        image = src[job.slot] if src is not None else job.slot if aggregate or targets is not None \
            else job.slot // max(1, len(units))
        labels.append(f"{what} on image {image}")
    info.zero_seed = labels
    if info.seed == "activation":
        hint = "its activation is 0 there: seed='one' projects it anyway"
    else:
        hint = "its seed is 0"
    print(f"zfnet: warning: {len(labels)} of {info.projections} projections are blank ({hint}): "
          f"{', '.join(labels[:3])}{' ...' if len(labels) > 3 else ''}", file=sys.stderr)


def strongest_map(model: nn.Module, images: torch.Tensor) -> Unit:
    """The feature map of the deepest feature layer with the largest activation (summed over images):
    what `zfnet project` shows when no unit is given."""
    layer = feature_layers(model)[-1]
    with projection_state(model), torch.no_grad():
        act = run_with_taps(model, images, [layer])[layer]
    per_channel = act.flatten(2).amax(2).sum(0) if act.dim() == 4 else act.sum(0)
    return Unit(layer, int(per_channel.argmax()))
