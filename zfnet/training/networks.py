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
    """ZFNet / AlexNet / a Table 3 variant at the configured width, with its classifier sized for the
    configured crop (the paper's fc6 sees 6x6 maps of 224 inputs; smaller inputs give smaller maps)."""
    name = arch["model"]
    kw = {"num_classes": int(arch["num_classes"]), "dropout": float(arch.get("dropout", 0.5))}
    if arch.get("fc"):
        kw["fc"] = int(arch["fc"])
    if name == "alexnet":
        model = alexnet(widths=tuple(arch["widths"]) if arch.get("widths") else None, **kw)
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
        raise ZfnetError(f"unknown model {name!r}; use alexnet or one of {', '.join(TABLE3_VARIANTS)}")
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
    for m in model.modules():  # Sec. 3: weights N(0, 1e-2), biases 0
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            if std > 0:
                nn.init.normal_(m.weight, 0.0, std)
            else:
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.zeros_(m.bias)
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
