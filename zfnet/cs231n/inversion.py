"""Reconstructing an image from its code (CS231n notes, "Reconstructing original images based on CNN codes";
Mahendran & Vedaldi, "Understanding Deep Image Representations by Inverting Them", CVPR 2015).

Given the code Phi0 = Phi(x0) of an image at one layer, find the image x whose code is closest, with the
regularisers that make it look like an image:

    || Phi(x) - Phi0 ||^2 / || Phi0 ||^2  +  l_alpha * R_alpha(x)  +  l_tv * R_tv(x)

    R_alpha = sum |x - m|^alpha / (H W B^alpha)                                  (alpha-norm, default 6)
    R_tv    = sum ((x[i,j+1] - x[i,j])^2 + (x[i+1,j] - x[i,j])^2)^(beta/2) / (H W V^beta)   (TV, beta 2)

with M&V's normalisation: x in [0, 1] pixels, m the mean pixel, B = 80/255 the typical pixel range
(their 80 on a 0..255 scale) and V = B / 6.5 the typical step between neighbours, so both regularisers are
about 1 for a natural image and the weights are independent of the image size. x is optimised with Adam
(zfnet.cs231n.ascent) on the [0, 1] image, the model's preprocessing applied inside, so the box constraint
[0, 1] is exact; it starts from the mean pixel plus a little noise, the learning rate decayed by a cosine.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ..core.errors import ZfnetError
from ..core.progress import progress_bar
from ..core.results import save_npz, write_json
from ..data.images import Preprocess, as_input
from ..inspect.layers import feature_layers, file_safe, layer_table, run_with_taps
from ..present.render import image_to_rgb, save_figure, save_png
from .ascent import Adam, frozen

__all__ = ["Reconstruction", "InversionResult", "invert_code", "invert", "inversion", "default_layers",
           "render_inversion", "tv_weight", "B", "V", "TV_RANGE"]

SCHEMA = 1
B = 80.0 / 255.0  # M&V's typical pixel range on a [0, 1] scale
V = B / 6.5  # their typical difference between neighbouring pixels


TV_RANGE = (0.005, 0.5)  # automatic TV weight: at the first feature layer .. at the last (geometric between)


def tv_weight(model: nn.Module, layer: str) -> float:
    """The automatic TV weight of a layer: deeper codes pin the image down less and need a stronger image
    prior (M&V raise it with depth too). Geometric in the layer's place between the first and the last
    feature layer in execution order: TV_RANGE[0] there, TV_RANGE[1] at the last and beyond."""
    table = layer_table(model)
    feats = feature_layers(model, table)
    first, last, here = table[feats[0]].index, table[feats[-1]].index, table[layer].index
    d = min(1.0, max(0.0, (here - first) / max(last - first, 1)))
    lo, hi = TV_RANGE
    return float(lo * (hi / lo) ** d)


def default_layers(model: nn.Module) -> list[str]:
    """Three feature layers: shallow, middle and deep (the first, middle and last of feature_layers)."""
    feats = feature_layers(model)
    return list(dict.fromkeys([feats[0 if len(feats) < 3 else 1], feats[len(feats) // 2], feats[-1]]))


@dataclass
class Reconstruction:
    layer: str
    image: np.ndarray  # (3, H, W) in [0, 1]
    code_error: float  # || Phi(x) - Phi0 || / || Phi0 ||
    pixel_rmse: float  # RMS difference to the original image, [0, 1] pixel units
    loss: float
    history: list = field(default_factory=list)  # (step, relative code error) every few steps
    lambda_tv: float | None = None  # the TV weight used

    def to_json(self) -> dict:
        return {"layer": self.layer, "code_error": self.code_error, "pixel_rmse": self.pixel_rmse,
                "loss": self.loss, "lambda_tv": self.lambda_tv, "history": self.history}


def _tv(u: torch.Tensor, beta: float) -> torch.Tensor:
    dx = u[..., :-1, 1:] - u[..., :-1, :-1]
    dy = u[..., 1:, :-1] - u[..., :-1, :-1]
    s = dx * dx + dy * dy
    # beta < 2 has no derivative at a zero step: a tiny floor keeps the gradient finite
    return (s + 1e-12).pow(beta / 2).sum() if beta != 2 else s.sum()


def invert_code(model: nn.Module, target: torch.Tensor, layer: str, *, preprocess: Preprocess,
                steps: int = 200, lr: float = 0.05, alpha: float = 6.0, beta: float = 2.0,
                lambda_alpha: float = 1e-5, lambda_tv: float = 1.0, seed: int = 0, size=None,
                progress: bool = False) -> tuple[torch.Tensor, dict]:
    """Find an image whose code at `layer` matches `target` (a code tensor (1, ...) of that layer).

    Returns: (the image (1, 3, H, W) in [0, 1], {"loss", "code_error", "history"}).
    """
    if steps < 1:
        raise ZfnetError(f"steps must be at least 1, not {steps}")
    p = next(model.parameters())
    H, W = size or (preprocess.size, preprocess.size)
    g = torch.Generator().manual_seed(seed)
    mean = preprocess.unnormalize(torch.zeros(3, H, W)).mean((1, 2)).view(1, 3, 1, 1)
    u = (mean + 0.02 * torch.randn(1, 3, H, W, generator=g)).clamp(0, 1).to(p.device, p.dtype)
    mean = mean.to(p.device, p.dtype)
    target = target.detach().to(p.device, p.dtype)
    norm0 = target.pow(2).sum().clamp_min(1e-12)
    opt = Adam(u)
    hw = H * W
    history = []
    with frozen(model):
        for t in progress_bar(range(steps), desc=f"invert {layer}", unit="step", enabled=progress):
            x = u.detach().requires_grad_(True)
            code = run_with_taps(model, preprocess.normalize(x), [layer], detach=False)[layer]
            data = (code - target).pow(2).sum() / norm0
            r_alpha = (x - mean).abs().pow(alpha).sum() / (hw * B ** alpha)
            r_tv = _tv(x, beta) / (hw * V ** beta)
            loss = data + lambda_alpha * r_alpha + lambda_tv * r_tv
            (grad,) = torch.autograd.grad(loss, x)
            opt.step(grad, lr * (0.1 + 0.45 * (1 + math.cos(math.pi * t / steps))))  # cosine decay to lr / 10
            u.clamp_(0, 1)
            if t % 25 == 0 or t == steps - 1:
                history.append([t, float(data.detach().sqrt())])
        with torch.no_grad():
            code = run_with_taps(model, preprocess.normalize(u), [layer])[layer]
            err = float((code - target).norm() / norm0.sqrt())
    return u, {"loss": float(loss.detach()), "code_error": err, "history": history}


@dataclass
class InversionResult:
    file: str | None
    original: np.ndarray  # (3, H, W) in [0, 1]: the crop the model saw
    reconstructions: list  # [Reconstruction], in the order of the layers
    config: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"schema": SCHEMA, "kind": "inversion", "file": self.file,
                "input_size": list(self.original.shape[1:]),
                "layers": {r.layer: r.to_json() for r in self.reconstructions}, "config": self.config}


def invert(model: nn.Module, image, layers=None, *, preprocess: Preprocess | None = None, steps: int = 200,
           lr: float = 0.05, alpha: float = 6.0, beta: float = 2.0, lambda_alpha: float = 1e-5,
           lambda_tv: float | None = None, seed: int = 0, progress: bool = False) -> InversionResult:
    """Reconstruct one image from its code at each of `layers` (default: shallow, middle, deep).

    Args:
        image: an image file, a PIL image, or a preprocessed (3, H, W) tensor.
        lambda_alpha, lambda_tv: regulariser weights (normalised as M&V: see the module docstring);
            lambda_tv None = per layer, growing with depth (tv_weight).
    """
    pre = preprocess or Preprocess.for_model(model)
    name, x = as_input(image, pre)
    table = layer_table(model, tuple(x.shape[-2:]))
    layers = list(dict.fromkeys(layers or default_layers(model)))
    for n in layers:
        table[n]  # noqa: B018 -- ZfnetError naming the valid layers
    p = next(model.parameters())
    original = pre.unnormalize(x.float())
    x0 = pre.normalize(original[None].to(p.device, p.dtype))
    recs = []
    with frozen(model), torch.no_grad():
        targets = run_with_taps(model, x0, layers)
    for n in layers:
        tv = tv_weight(model, n) if lambda_tv is None else lambda_tv
        u, info = invert_code(model, targets[n], n, preprocess=pre, steps=steps, lr=lr, alpha=alpha, beta=beta,
                              lambda_alpha=lambda_alpha, lambda_tv=tv, seed=seed, size=tuple(x.shape[-2:]),
                              progress=progress)
        img = u[0].float().cpu()
        rmse = float((img - original).pow(2).mean().sqrt())
        recs.append(Reconstruction(n, img.numpy(), info["code_error"], rmse, info["loss"], info["history"], tv))
    config = {"layers": layers, "steps": steps, "lr": lr, "alpha": alpha, "beta": beta,
              "lambda_alpha": lambda_alpha, "lambda_tv": "auto" if lambda_tv is None else lambda_tv,
              "tv_range": list(TV_RANGE), "seed": seed, "B": B, "V": V,
              "preprocessing": pre.preset, "input_size": list(x.shape[-2:])}
    return InversionResult(name, original.numpy(), recs, config)


def render_inversion(result: InversionResult, path: str | os.PathLike) -> Path:
    """The original and one reconstruction per layer, each with its code and pixel error."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = 1 + len(result.reconstructions)
    fig, axes = plt.subplots(1, n, figsize=(2.9 * n, 3.3), squeeze=False)
    axes = axes[0]
    axes[0].imshow(image_to_rgb(result.original))
    axes[0].set_title("original", fontsize=9)
    for ax, r in zip(axes[1:], result.reconstructions):
        ax.imshow(image_to_rgb(r.image))
        ax.set_title(f"from {r.layer}\ncode error {r.code_error:.1%}, pixel RMS {r.pixel_rmse:.3f}", fontsize=8)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    return save_figure(fig, path)


def inversion(model: nn.Module, image, out: str | os.PathLike, layers=None, *, config: dict | None = None,
              **kw) -> InversionResult:
    """`zfnet invert`: `invert` written to `out`: result.json, reconstructions.npz (original + one array per
    layer), inversion.png (the figure) and <layer>.png (each reconstruction)."""
    res = invert(model, image, layers, **kw)
    out = Path(out)
    figures = {"figure": "inversion.png"}
    for r in res.reconstructions:
        rel = f"{file_safe(r.layer)}.png"
        save_png(image_to_rgb(r.image), out / rel)
        figures[r.layer] = rel
    render_inversion(res, out / "inversion.png")
    save_npz(out / "reconstructions.npz", original=res.original,
             **{f"layer_{i}": r.image for i, r in enumerate(res.reconstructions)})
    meta = res.to_json()
    meta["config"].update(config or {})
    meta["figures"] = figures
    write_json(out / "result.json", meta)
    return res
