"""Projection of activations back to pixel space (Sec. 2.1): deconvnet, guided backprop, saliency.

`project(model, images, units)` seeds the backward pass with a unit's own activation(s), every other
activation of its layer set to zero, as the paper passes a feature map into the attached deconvnet, and
returns the input-space result. The backward rules live in `project_rules`; this module makes it fast:
  * many projections go through one forward and one backward pass (one batch row each);
  * the forward pass stops at the unit's layer, and parameters get no gradients;
  * a single activation is computed on a crop of the input around its receptive field only
    (`project_crop`), which is exact: see there for why borders and padding come out identical.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import torch
import torch.nn as nn

from ..core.errors import ZfnetError
from ..inspect.layers import Unit, feature_layers, layer_table, parse_unit, run_with_taps
from .crop import Crop, plan_crop
from .rules import MODES, BackwardRules, projection_state

__all__ = ["project", "strongest_map", "MODES"]

_PIXEL_BUDGET = 32 * 224 * 224  # default batch: about 32 full ImageNet images' worth of input pixels


def project(model: nn.Module, images: torch.Tensor, units: Sequence[str | Unit], mode: str = "deconv", *,
            pairs: bool = False, backprop_norm: bool = False, batch_size: int | None = None,
            crop: bool = True) -> torch.Tensor:
    """Project units back to input space.

    Args:
        model: any nn.Module; left exactly as it was (hooks, requires_grad, train/eval mode).
        images: (N, C, H, W) preprocessed input.
        units: addresses ("conv5:17", "conv5:17@3,4") or Units. With a location, that one activation is
            projected; without, the whole feature map. The backward pass is seeded with the activation
            itself (so one activation gives `a * d a / d x` under the chosen rule).
        mode: "deconv" (Zeiler & Fergus: ReLU backward = relu(grad_out)), "guided" (Springenberg et al.)
            or "saliency" (the plain gradient).
        pairs: False: every unit on every image -> (N, U, C, H, W). True: units[i] on images[i]
            (len(units) == N) -> (N, C, H, W).
        backprop_norm: deconv mode passes LRN straight through (identity backward) as the paper's
            deconvnet does; True backpropagates it (what Captum computes). Guided and saliency always
            backpropagate it.
        batch_size: projections per forward/backward pass (default: ~32 full images' worth of pixels).
        crop: compute single activations on their receptive field only (exact; False is for testing).
    Returns: the projections, in the images' dtype and device.
    """
    if mode not in MODES:
        raise ZfnetError(f"unknown projection mode {mode!r}; choose one of {', '.join(MODES)}")
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise ZfnetError("images must be a (N, C, H, W) tensor")
    n, c, h, w = images.shape
    with projection_state(model), torch.enable_grad():
        # Inside the guard: the table's forward pass must not update the batch-norm statistics of a
        # model in train mode.
        table = layer_table(model, (h, w), in_channels=c)
        units = [parse_unit(u, table) for u in units]
        if pairs and len(units) != n:
            raise ZfnetError(f"pairs=True needs one unit per image: got {len(units)} units for {n} images")
        out = images.new_zeros((n, c, h, w) if pairs else (n, len(units), c, h, w))
        jobs = [(i, i) for i in range(n)] if pairs else [(i, u) for i in range(n) for u in range(len(units))]
        crops = [plan_crop(model, table, unit, (h, w), c) if crop else None for unit in units]
        # Jobs that share a layer and a crop shape share a batch.
        groups: dict[tuple, list] = defaultdict(list)
        for i, u in jobs:
            groups[(units[u].layer, crops[u].shape if crops[u] else (h, w))].append((i, u))
        rules = BackwardRules(mode, pass_norm=(mode == "deconv" and not backprop_norm))
        for (layer, (hc, wc)), group in sorted(groups.items(), key=lambda kv: table[kv[0][0]].index):
            per_batch = batch_size or max(1, _PIXEL_BUDGET // (hc * wc))
            for k in range(0, len(group), per_batch):
                chunk = group[k:k + per_batch]
                cs = [crops[u] for _, u in chunk]
                x = _gather(images, [i for i, _ in chunk], cs)
                grads = _backward(model, x, layer, [_local(units[u], cr) for (_, u), cr in zip(chunk, cs)], rules)
                for (i, u), g, cr in zip(chunk, grads, cs):
                    dst = out[i] if pairs else out[i, u]
                    if cr is None:
                        dst.copy_(g)
                    else:
                        (y0, y1, x0, x1), (a0, a1, b0, b1) = cr.paste(h, w)
                        dst[:, y0:y1, x0:x1] = g[:, a0:a1, b0:b1]
    return out


def _local(unit: Unit, cr: Crop | None) -> Unit:
    """The unit's address inside its crop."""
    return unit if cr is None else Unit(unit.layer, unit.channel, unit.y - cr.dy, unit.x - cr.dx)


def _gather(images: torch.Tensor, rows: list[int], crops: list[Crop | None]) -> torch.Tensor:
    if crops[0] is None:
        return images[rows]
    hc, wc = crops[0].shape
    h, w = images.shape[-2:]
    x = images.new_zeros((len(rows), images.shape[1], hc, wc))  # pixels beyond the image stay 0: unseen
    for b, (i, cr) in enumerate(zip(rows, crops)):
        (y0, y1, x0, x1), (a0, a1, b0, b1) = cr.paste(h, w)
        x[b, :, a0:a1, b0:b1] = images[i, :, y0:y1, x0:x1]
    return x


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


def strongest_map(model: nn.Module, images: torch.Tensor) -> Unit:
    """The feature map of the deepest feature layer with the largest activation (summed over images):
    what `zfnet project` shows when no unit is given."""
    layer = feature_layers(model)[-1]
    with projection_state(model), torch.no_grad():
        act = run_with_taps(model, images, [layer])[layer]
    per_channel = act.flatten(2).amax(2).sum(0) if act.dim() == 4 else act.sum(0)
    return Unit(layer, int(per_channel.argmax()))
