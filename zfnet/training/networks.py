"""The networks a training run builds (Sec. 3, Fig. 3; the Table 3 variants) and the one constraint the
recipe keeps on them, feature scale clipping.

`build_model` rebuilds a network from the `arch` record every checkpoint stores, so the recipe, checkpoints
and the Fig. 4 / Fig. 6 tools all construct it the same way. `filter_rms` is the measure that clipping
bounds and that the Fig. 6 diagnosis reports.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..core.errors import ZfnetError
from ..models.networks import TABLE3_VARIANTS, ConvNetConfig, alexnet, zfnet

__all__ = ["build_model", "filter_rms", "clip_filters"]


def filter_rms(weight: torch.Tensor) -> torch.Tensor:
    """(O, I, kh, kw) -> (O,) root mean square of each filter."""
    return weight.detach().float().flatten(1).pow(2).mean(1).sqrt()


def build_model(arch: dict) -> nn.Module:
    """ZFNet / AlexNet (dense or two-group) / a Table 3 variant at the configured width, with its classifier
    sized for the configured crop (the paper's fc6 sees 6x6 maps of 224 inputs; smaller inputs give smaller
    maps), initialized as the record says: weights N(0, init_std) (0: He normal), biases 1 in the layers
    listed in `bias_one` (AlexNet's Sec. 5), 0 elsewhere."""
    name = arch["model"]
    kw = {"num_classes": int(arch["num_classes"]), "dropout": float(arch.get("dropout", 0.5))}
    if arch.get("fc"):
        kw["fc"] = int(arch["fc"])
    if name in ("alexnet", "alexnet2"):
        widths = tuple(arch["widths"]) if arch.get("widths") else None
        if name == "alexnet2" and widths and any(w % 2 for w in widths):
            raise ZfnetError(f"alexnet2 splits every layer into two groups: widths {widths} must be even")
        model = alexnet(widths=widths, groups=2 if name == "alexnet2" else 1, **kw)
    elif name in TABLE3_VARIANTS:
        variant = dict(TABLE3_VARIANTS[name], **kw)
        if arch.get("widths"):
            # Table 3's wider variants scale conv3-5; keep that ratio at a reduced width.
            w = list(arch["widths"])
            base = TABLE3_VARIANTS[name].get("widths")
            if base:
                w = [max(1, round(w[i] * base[i] / ConvNetConfig.widths[i])) for i in range(5)]
            variant["widths"] = tuple(w)
        model = zfnet(**variant)
    else:
        raise ZfnetError(f"unknown model {name!r}; use alexnet, alexnet2 or one of {', '.join(TABLE3_VARIANTS)}")
    crop = int(arch.get("crop", 224))
    with torch.no_grad():  # size the first fully connected layer to what the conv stack gives at this crop
        x = torch.zeros(1, 3, crop, crop)
        upto = model.order.index("flatten") + 1
        for n in model.order[:upto]:
            try:
                x = getattr(model, n)(x)
            except RuntimeError:
                raise ZfnetError(f"a {crop}x{crop} input is too small for {name} (its maps vanish at {n}); "
                                 f"use --crop 48 or more") from None
        first_fc = next(n for n in model.order[upto:] if isinstance(getattr(model, n), nn.Linear))
        old = getattr(model, first_fc)
        if old.in_features != x.shape[1]:
            setattr(model, first_fc, nn.Linear(x.shape[1], old.out_features))
    std = float(arch.get("init_std", 1e-2))
    ones = set(arch.get("bias_one") or ())
    layers = {n: m for n, m in model.named_children() if isinstance(m, (nn.Conv2d, nn.Linear))}
    if ones - set(layers):
        raise ZfnetError(f"bias_one names {', '.join(sorted(ones - set(layers)))}, which {name} does not have "
                         f"(its layers: {', '.join(layers)})")
    for n, m in layers.items():  # ZF Sec. 3 / Krizhevsky Sec. 5: weights N(0, 1e-2)
        if std > 0:
            nn.init.normal_(m.weight, 0.0, std)
        else:
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        nn.init.constant_(m.bias, 1.0 if n in ones else 0.0)
    return model


@torch.no_grad()
def clip_filters(model: nn.Module, radius: float = 0.1) -> int:
    """Sec. 3 "feature scale clipping": every conv filter whose RMS exceeds `radius` is rescaled to RMS
    exactly `radius` (direction kept; smaller filters untouched). Returns how many were rescaled."""
    n = 0
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            rms = filter_rms(m.weight)
            over = rms > radius
            if over.any():
                scale = torch.where(over, radius / rms.clamp_min(1e-30), torch.ones_like(rms))
                m.weight.mul_(scale.view(-1, *([1] * (m.weight.dim() - 1))).to(m.weight.dtype))
                n += int(over.sum())
    return n
