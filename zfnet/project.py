"""Projection of activations back to pixel space (Sec. 2.1): deconvnet, guided backprop, saliency.

`project(model, images, units)` seeds the backward pass with a unit's own activation(s), every other
activation of its layer set to zero, as the paper passes a feature map into the attached deconvnet, and
returns the input-space result. Many units and images go through one forward and one backward pass per
batch; the forward pass stops at the unit's layer and parameters get no gradients.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import torch
import torch.nn as nn

from .errors import ZfnetError
from .layers import Unit, layer_table, parse_unit, run_with_taps
from .project_rules import MODES, BackwardRules, projection_state

__all__ = ["project", "MODES"]


def project(model: nn.Module, images: torch.Tensor, units: Sequence[str | Unit], mode: str = "deconv", *,
            pairs: bool = False, backprop_norm: bool = False, batch_size: int | None = None) -> torch.Tensor:
    """Project units back to input space.

    Args:
        model: any nn.Module; left exactly as it was (hooks, requires_grad, train/eval mode).
        images: (N, C, H, W) preprocessed input.
        units: addresses ("conv5:17", "conv5:17@3,4") or Units. With a location, that one activation is
            projected; without, the whole feature map.
        mode: "deconv" (Zeiler & Fergus: ReLU backward = relu(grad_out)), "guided" (Springenberg et al.)
            or "saliency" (the plain gradient).
        pairs: False: every unit on every image -> (N, U, C, H, W). True: units[i] on images[i]
            (len(units) == N) -> (N, C, H, W).
        backprop_norm: deconv mode passes LRN straight through (identity backward) as the paper's
            deconvnet does; True backpropagates it (what Captum computes). Guided and saliency always
            backpropagate it.
        batch_size: projections per forward/backward pass (default: as many as ~32 full images' worth).
    Returns: the projections, on the images' device, in the images' dtype.
    """
    if mode not in MODES:
        raise ZfnetError(f"unknown projection mode {mode!r}; choose one of {', '.join(MODES)}")
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise ZfnetError("images must be a (N, C, H, W) tensor")
    n, c, h, w = images.shape
    with projection_state(model), torch.enable_grad():
        # Inside the guard: the table's forward pass must not update batch-norm statistics of a model
        # in train mode.
        table = layer_table(model, (h, w), in_channels=c)
        units = [parse_unit(u, table) for u in units]
        if pairs and len(units) != n:
            raise ZfnetError(f"pairs=True needs one unit per image: got {len(units)} units for {n} images")
        out = images.new_zeros((n, c, h, w) if pairs else (n, len(units), c, h, w))
        jobs = [(i, i) for i in range(n)] if pairs else [(i, u) for i in range(n) for u in range(len(units))]
        groups: dict[str, list] = defaultdict(list)
        for i, u in jobs:
            groups[units[u].layer].append((i, u))
        per_batch = batch_size or 32
        rules = BackwardRules(mode, pass_norm=(mode == "deconv" and not backprop_norm))
        for layer, group in sorted(groups.items(), key=lambda kv: table[kv[0]].index):
            for k in range(0, len(group), per_batch):
                chunk = group[k:k + per_batch]
                grads = _backward(model, images[[i for i, _ in chunk]], layer,
                                  [units[u] for _, u in chunk], rules)
                for (i, u), g in zip(chunk, grads):
                    if pairs:
                        out[i] = g
                    else:
                        out[i, u] = g
    return out


def _backward(model, x, layer: str, units: list[Unit], rules: BackwardRules) -> torch.Tensor:
    """One forward (stopped at `layer`) and one backward for a batch; row b projects units[b]."""
    leaf = x.detach().clone().requires_grad_(True)
    with rules:
        # A clone keeps the leaf out of reach of a model whose first op is in place.
        act = run_with_taps(model, leaf.clone(), [layer], stop=True, detach=False)[layer]
    if not act.requires_grad:  # the layer does not depend on the input
        return torch.zeros_like(leaf)
    seed = torch.zeros_like(act)
    rows = torch.arange(len(units), device=act.device)
    ch = torch.tensor([u.channel for u in units], device=act.device)
    if act.dim() != 4:  # a vector layer (linear): a unit is one number
        seed[rows, ch] = act.detach()[rows, ch]
        return torch.autograd.grad(act, leaf, seed)[0]
    located = [b for b, u in enumerate(units) if u.y is not None]
    whole = [b for b, u in enumerate(units) if u.y is None]
    if whole:
        seed[rows[whole], ch[whole]] = act.detach()[rows[whole], ch[whole]]
    if located:
        ys = torch.tensor([units[b].y for b in located], device=act.device)
        xs = torch.tensor([units[b].x for b in located], device=act.device)
        seed[rows[located], ch[located], ys, xs] = act.detach()[rows[located], ch[located], ys, xs]
    (grad,) = torch.autograd.grad(act, leaf, seed)
    return grad
