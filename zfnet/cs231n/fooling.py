"""Fooling ConvNets (CS231n notes, "Fooling ConvNets"): adversarial examples and fooling images.

  * FGSM (Goodfellow, Shlens & Szegedy 2015): one step of eps * sign(gradient).
  * PGD (Madry et al. 2018): `steps` steps of size `step` along the gradient's sign from a random start in
    the ball, each projected back onto the L-inf ball of radius eps around the image and onto [0, 1].
Both untargeted (raise the loss of the true class, by default the clean prediction) and targeted (lower the
loss of a chosen class: "turn this image into class c"). The budget eps is in pixels of the [0, 1] image
that the model's preprocessing normalises (8/255 = eight grey levels), not in units of the normalised
input, so one eps means the same for every model. Success is also checked after rounding the adversarial
image to 8 bits, as it would be saved.
  * Fooling images (Nguyen, Yosinski & Clune, CVPR 2015): noise that the model calls a chosen class with
    high confidence, found by gradient ascent on log p(class) from uniform noise.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.errors import NoInputError, ZfnetError
from ..core.progress import progress_bar
from ..core.results import save_npz, write_json
from ..data.images import Preprocess, load_image
from ..models.weights import model_meta
from ..present.render import image_to_rgb, save_figure
from .ascent import Adam, frozen

__all__ = ["METHODS", "attack", "fooling_images", "FoolingResult", "fool", "fooling", "render_fooling",
           "resolve_class", "random_targets"]

SCHEMA = 1
METHODS = ("fgsm", "pgd")


def _logits(model, pre: Preprocess, u: torch.Tensor) -> torch.Tensor:
    return model(pre.normalize(u)).reshape(len(u), -1)


def attack(model: nn.Module, images: torch.Tensor, *, method: str = "pgd", eps: float = 8 / 255,
           steps: int = 10, step: float | None = None, target: torch.Tensor | None = None,
           label: torch.Tensor | None = None, random_start: bool = True, early_stop: bool = True, seed: int = 0,
           preprocess: Preprocess | None = None, progress: bool = False) -> tuple[torch.Tensor, dict]:
    """Adversarial versions of `images` (N, 3, H, W) in [0, 1] within an L-inf ball of radius `eps`.

    Args:
        method: "fgsm" (one step of eps) or "pgd".
        target: (N,) classes to turn the images into (targeted); None: untargeted.
        label: (N,) classes to move away from when untargeted (default: the clean predictions).
        step: PGD step size (default 2.5 * eps / steps, Madry et al.'s choice).
        early_stop: PGD stops once every image is fooled (misclassified, or classified as its target).
    Returns: (adversarial images in [0, 1], {"steps_run"}).
    """
    if method not in METHODS:
        raise ZfnetError(f"unknown attack {method!r}; use one of {', '.join(METHODS)}")
    if not 0 < eps <= 1:
        raise ZfnetError(f"eps must be in (0, 1] (pixel units of the [0, 1] image), not {eps}")
    if steps < 1:
        raise ZfnetError(f"steps must be at least 1, not {steps}")
    pre = preprocess or Preprocess.for_model(model)
    p = next(model.parameters())
    x = images.detach().to(p.device, p.dtype)
    with frozen(model):
        if label is None and target is None:
            with torch.no_grad():
                label = _logits(model, pre, x).argmax(1)
        y = (target if target is not None else label).to(x.device)
        sign = -1.0 if target is not None else 1.0  # targeted: descend the target's loss

        def grad_of(u):
            u = u.detach().requires_grad_(True)
            logits = _logits(model, pre, u)
            loss = F.cross_entropy(logits, y, reduction="sum")
            (g,) = torch.autograd.grad(loss, u)
            return g, logits.detach()

        if method == "fgsm":
            g, _ = grad_of(x)
            return (x + sign * eps * g.sign()).clamp(0, 1).detach(), {"steps_run": 1}
        step = step or 2.5 * eps / steps
        gen = torch.Generator(device="cpu").manual_seed(seed)
        u = x.clone()
        if random_start:
            u = (x + (torch.rand(x.shape, generator=gen) * 2 - 1).to(x) * eps).clamp(0, 1)
        run = 0
        for _ in progress_bar(range(steps), desc=f"{method} eps={eps:.4g}", unit="step", enabled=progress):
            g, logits = grad_of(u)
            if early_stop and run and _fooled(logits, y, target is not None).all():
                break
            u = u + sign * step * g.sign()
            u = torch.min(torch.max(u, x - eps), x + eps).clamp(0, 1).detach()
            run += 1
    return u, {"steps_run": run}


def _fooled(logits: torch.Tensor, y: torch.Tensor, targeted: bool) -> torch.Tensor:
    pred = logits.argmax(1)
    return pred == y if targeted else pred != y


def fooling_images(model: nn.Module, classes, *, steps: int = 200, lr: float = 0.05, confidence: float = 0.99,
                   seed: int = 0, size: int | None = None, preprocess: Preprocess | None = None,
                   progress: bool = False) -> tuple[torch.Tensor, dict]:
    """Nguyen et al.'s fooling images: from uniform noise, Adam ascent on log p(class) over the [0, 1]
    image until p(class) >= `confidence` for every class (or `steps` run out).

    Returns: ((K, 3, H, W) images in [0, 1], {"prob": [p(class)], "steps_run"}).
    """
    pre = preprocess or Preprocess.for_model(model)
    p = next(model.parameters())
    size = size or pre.size
    y = torch.as_tensor(list(classes), dtype=torch.long, device=p.device)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    u = torch.rand(len(y), 3, size, size, generator=gen).to(p.device, p.dtype)
    opt = Adam(u)
    run = 0
    with frozen(model):
        for _ in progress_bar(range(steps), desc="fooling images", unit="step", enabled=progress):
            x = u.detach().requires_grad_(True)
            logp = _logits(model, pre, x).log_softmax(1).gather(1, y[:, None])[:, 0]
            if bool((logp.detach().exp() >= confidence).all()):
                break
            (grad,) = torch.autograd.grad(-logp.sum(), x)
            opt.step(grad, lr)
            u.clamp_(0, 1)
            run += 1
        with torch.no_grad():
            prob = _logits(model, pre, u).softmax(1).gather(1, y[:, None])[:, 0]
    return u.detach(), {"prob": prob.tolist(), "steps_run": run}


def resolve_class(model: nn.Module, value) -> int:
    """A class index from an int, a digit string or a category name (case-insensitive)."""
    cats = list(model_meta(model).categories or [])
    text = str(value).strip()
    if text.lstrip("-").isdigit():
        return int(text)
    low = [c.lower() for c in cats]
    if text.lower() in low:
        return low.index(text.lower())
    hint = f"; e.g. {', '.join(cats[:3])}" if cats else " (this model's classes have no names)"
    raise ZfnetError(f"unknown class {value!r}: give a class index or name{hint}")


def random_targets(labels, num_classes: int, seed: int = 0) -> list[int]:
    """One target per image, drawn at random (seeded) among the classes other than its label."""
    rng = np.random.default_rng(seed)
    out = []
    for y in labels:
        t = int(rng.integers(num_classes - 1))
        out.append(t + (t >= int(y)))
    return out


# ----------------------------------------------------------------------------------------------------
@dataclass
class FoolingResult:
    method: str
    eps: float
    targeted: bool
    files: list[str]
    clean: np.ndarray  # (N, 3, H, W) in [0, 1]
    adversarial: np.ndarray  # (N, 3, H, W) in [0, 1]
    examples: list[dict]  # per image: label, target, predictions before/after, success
    fooling: list[dict] = field(default_factory=list)  # per fooling image: class, name, prob
    fooling_images: np.ndarray | None = None  # (K, 3, H, W)
    skipped: list = field(default_factory=list)
    config: dict = field(default_factory=dict)

    def summary(self) -> dict:
        n = max(len(self.examples), 1)
        return {"images": len(self.examples), "success": sum(e["success"] for e in self.examples),
                "success_rate": sum(e["success"] for e in self.examples) / n,
                "success_8bit": sum(e["success_8bit"] for e in self.examples),
                "max_linf": max((e["linf"] for e in self.examples), default=0.0)}

    def to_json(self) -> dict:
        return {"schema": SCHEMA, "kind": "fooling", "method": self.method, "eps": self.eps,
                "targeted": self.targeted, "summary": self.summary(), "examples": self.examples,
                "fooling": self.fooling, "skipped": [list(s) for s in self.skipped], "config": self.config}


def _top(probs: torch.Tensor, cats: list[str]) -> list[dict]:
    p, i = probs.max(1)
    return [{"index": int(c), "label": cats[int(c)] if int(c) < len(cats) else str(int(c)), "prob": float(q)}
            for q, c in zip(p, i)]


def fool(model: nn.Module, images, *, method: str = "pgd", eps: float = 8 / 255, steps: int = 10,
         step: float | None = None, targets=None, labels=None, seed: int = 0, fooling_classes=None,
         fooling_steps: int = 200, confidence: float = 0.99, preprocess: Preprocess | None = None,
         batch_size: int = 16, progress: bool = False) -> FoolingResult:
    """Attack image files (unreadable ones are skipped and listed) and make fooling images.

    Args:
        targets: None (untargeted), "random" (a seeded random other class per image), or one class per
            image / one for all (indices or names).
        labels: true classes (default: the clean predictions).
        fooling_classes: classes to make Nguyen fooling images of (default: none).
        batch_size: images attacked together (the seed of each batch is seed + its first index).
    """
    pre = preprocess or Preprocess.for_model(model)
    cats = list(model_meta(model).categories or [])
    files, xs, skipped = [], [], []
    for f in images:
        try:
            xs.append(pre.unnormalize(pre(load_image(f))))
            files.append(str(f))
        except ZfnetError as e:
            skipped.append((str(f), str(e)))
    if not xs:
        raise NoInputError("no readable image to attack", skipped)
    p = next(model.parameters())
    x = torch.stack(xs).to(p.device, p.dtype)
    with frozen(model), torch.no_grad():
        clean = _logits(model, pre, x).softmax(1)
    k = clean.shape[1]
    lab = (clean.argmax(1) if labels is None
           else torch.as_tensor([resolve_class(model, v) for v in labels], device=x.device))
    if len(lab) != len(x):
        raise ZfnetError(f"got {len(lab)} labels for {len(x)} images")
    tgt = None
    if targets is not None:
        if isinstance(targets, str) and targets == "random":
            tgt = random_targets(lab.tolist(), k, seed)
        else:
            vals = [targets] if isinstance(targets, (int, str)) else list(targets)
            vals = vals * len(x) if len(vals) == 1 else vals
            if len(vals) != len(x):
                raise ZfnetError(f"got {len(vals)} targets for {len(x)} images")
            tgt = [resolve_class(model, v) for v in vals]
        bad = [t for t in tgt if not 0 <= t < k]
        if bad:
            raise ZfnetError(f"target class {bad[0]} out of range 0..{k - 1}")
        tgt = torch.as_tensor(tgt, device=x.device)
    parts, run = [], 0
    for s in range(0, len(x), batch_size):  # a batch at a time: the graph of a big batch would not fit
        sl = slice(s, s + batch_size)
        a, info = attack(model, x[sl], method=method, eps=eps, steps=steps, step=step,
                         target=None if tgt is None else tgt[sl], label=lab[sl], seed=seed + s, preprocess=pre,
                         progress=progress)
        parts.append(a)
        run = max(run, info["steps_run"])
    adv = torch.cat(parts)
    with frozen(model), torch.no_grad():
        after = _logits(model, pre, adv).softmax(1)
        after8 = _logits(model, pre, (adv * 255).round() / 255).softmax(1)
    y = tgt if tgt is not None else lab
    ok = _fooled(after, y, tgt is not None)
    ok8 = _fooled(after8, y, tgt is not None)
    examples = []
    for i, (c, a) in enumerate(zip(_top(clean, cats), _top(after, cats))):
        e = {"file": files[i], "label": int(lab[i]), "label_name": cats[int(lab[i])] if int(lab[i]) < len(cats)
             else str(int(lab[i])), "clean": c, "adversarial": a,
             "p_label": [float(clean[i, lab[i]]), float(after[i, lab[i]])], "success": bool(ok[i]),
             "success_8bit": bool(ok8[i]), "linf": float((adv[i] - x[i]).abs().max())}
        if tgt is not None:
            e.update(target=int(tgt[i]), target_name=cats[int(tgt[i])] if int(tgt[i]) < len(cats) else str(int(tgt[i])),
                     p_target=[float(clean[i, tgt[i]]), float(after[i, tgt[i]])])
        examples.append(e)
    fool_list, fool_imgs = [], None
    if fooling_classes:
        ids = [resolve_class(model, c) for c in fooling_classes]
        fool_imgs, finfo = fooling_images(model, ids, steps=fooling_steps, confidence=confidence, seed=seed,
                                          size=x.shape[-1], preprocess=pre, progress=progress)
        fool_list = [{"class": c, "name": cats[c] if c < len(cats) else str(c), "prob": q, "steps": finfo["steps_run"]}
                     for c, q in zip(ids, finfo["prob"])]
        fool_imgs = fool_imgs.float().cpu().numpy()
    config = {"method": method, "eps": eps, "steps": steps, "step": step or (2.5 * eps / steps),
              "steps_run": run, "targets": _as_given(targets), "seed": seed, "batch_size": batch_size,
              "labels": "the clean predictions" if labels is None else [str(v) for v in labels],
              "fooling_classes": list(fooling_classes or []), "fooling_steps": fooling_steps,
              "confidence": confidence, "preprocessing": pre.preset, "input_size": pre.size}
    return FoolingResult(method, eps, tgt is not None, files, x.float().cpu().numpy(), adv.float().cpu().numpy(),
                         examples, fool_list, fool_imgs, skipped, config)


def _as_given(targets):
    """The targets argument as JSON records it: None, "random", one class, or the list."""
    return targets if targets is None or isinstance(targets, (str, int)) else [str(v) for v in targets]


def render_fooling(result: FoolingResult, path: str | os.PathLike, max_rows: int = 8) -> Path:
    """One row per image: original, amplified perturbation, adversarial, with their probabilities; then a
    row of fooling images with p(class)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = min(len(result.examples), max_rows)
    extra = 1 if result.fooling else 0
    ncols = max(3, len(result.fooling))
    fig, axes = plt.subplots(rows + extra, ncols, figsize=(3.0 * ncols, 3.2 * (rows + extra)), squeeze=False)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
        ax.axis("off")
    amp = 0.5 / result.eps
    for r in range(rows):
        e = result.examples[r]
        delta = result.adversarial[r] - result.clean[r]
        ax = axes[r]
        ax[0].imshow(image_to_rgb(result.clean[r]))
        ax[0].set_title(f"{e['clean']['label'][:22]}\np = {e['clean']['prob']:.2f}", fontsize=8)
        ax[1].imshow(image_to_rgb(0.5 + amp * delta))
        ax[1].set_title(f"perturbation x{amp:.0f}\nL-inf {e['linf'] * 255:.1f}/255", fontsize=8)
        ax[2].imshow(image_to_rgb(result.adversarial[r]))
        title = f"{e['adversarial']['label'][:22]}\np = {e['adversarial']['prob']:.2f}"
        if "target" in e:
            title += f" (target {e['target_name'][:14]}: {e['p_target'][1]:.2f})"
        ax[2].set_title(title, fontsize=7 if "target" in e else 8, color="black" if e["success"] else "red")
        for a in ax[:3]:
            a.axis("on")
    for j, f in enumerate(result.fooling):
        ax = axes[rows][j]
        ax.imshow(image_to_rgb(result.fooling_images[j]))
        ax.set_title(f"fooling image: {f['name'][:18]}\np = {f['prob']:.3f}", fontsize=8)
        ax.axis("on")
    kind = "targeted" if result.targeted else "untargeted"
    fig.suptitle(f"{result.method.upper()} {kind}, eps = {result.eps * 255:.1f}/255", fontsize=10)
    return save_figure(fig, path, dpi=80)


def fooling(model: nn.Module, images, out: str | os.PathLike, *, config: dict | None = None, **kw) -> FoolingResult:
    """`zfnet fool`: `fool` written to `out`: result.json, fooling.png, images.npz (clean, adversarial,
    fooling images)."""
    res = fool(model, images, **kw)
    out = Path(out)
    render_fooling(res, out / "fooling.png")
    arrays = {"clean": res.clean, "adversarial": res.adversarial}
    if res.fooling_images is not None:
        arrays["fooling"] = res.fooling_images
    save_npz(out / "images.npz", **arrays)
    meta = res.to_json()
    meta["config"].update(config or {})
    meta["figures"] = {"figure": "fooling.png"}
    write_json(out / "result.json", meta)
    return res
