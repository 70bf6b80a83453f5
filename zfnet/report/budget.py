"""What the report runs, sized to the data: how many images each experiment sees, which layers the atlas
projects, how long the optimisations run.

The atlas dominates the cost: every feature map of a layer gets k deconvnet projections, each about as
dear as a forward and backward pass over the unit's receptive field. The layers are chosen spread over
the depth (the first feature layer, one a third in and one two thirds in) and, when their projected
pixels (channels x k x receptive-field area) pass `atlas_pixels`, the deepest ones give way to shallower
ones; the report says which layers it took and why.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch.nn as nn

from ..inspect.layers import feature_layers, layer_table

__all__ = ["Budgets", "budgets_for", "atlas_layers"]


@dataclass
class Budgets:
    atlas_layers: list[str] | None = None  # None: chosen by atlas_layers() within atlas_pixels
    atlas_k: int = 9  # top activations per feature map (the paper's 9)
    atlas_pixels: float = 8e7  # projected pixels the auto-chosen atlas layers may cost
    few_images: int = 3  # images for invariance (Fig. 5) and occlusion (Fig. 7)
    occlusion_size: int = 48
    occlusion_stride: int = 16
    data_images: int = 400  # images for diagnose, activations and t-SNE (evenly spaced over the data)
    probe_folds: int = 3
    probe_per_class: int = 30  # at most; fewer when the smallest class has fewer images
    inversion_steps: int = 150
    inversion_layers: list[str] | None = None  # None: shallow, middle and deep
    fooling_images: int = 4
    fooling_steps: int = 10  # PGD steps
    fooling_image_steps: int = 100  # gradient steps of the Nguyen fooling image
    fooling_eps: float = 8 / 255
    notes: list[str] = field(default_factory=list)  # what was chosen and why

    def to_json(self) -> dict:
        return asdict(self)


def atlas_layers(model: nn.Module, budget_pixels: float, k: int = 9, size: int = 224) -> tuple[list[str], str]:
    """Feature layers spread over the depth whose projections fit `budget_pixels`, and why these."""
    table = layer_table(model, size)
    feats = feature_layers(model, table)
    n = len(feats)
    picks = list(dict.fromkeys(feats[i] for i in (0, n // 3, (2 * n) // 3)))

    def cost(name):
        info = table[name]
        f = info.field
        area = size * size if f is None else min(f.size_y, size) * min(f.size_x, size)
        return info.channels * k * area

    total = lambda names: sum(cost(x) for x in names)  # noqa: E731
    why = f"feature layers spread over the depth ({', '.join(picks)})"
    if len(picks) > 1 and total(picks) > budget_pixels:
        while len(picks) > 1 and total(picks) > budget_pixels:
            deepest = picks.pop()  # the deepest layer between the last pick and the dropped one that still fits
            fit = [f for f in feats[feats.index(picks[-1]) + 1:feats.index(deepest)]
                   if total(picks) + cost(f) <= budget_pixels]
            if fit:
                picks.append(fit[-1])
        why = (f"layers spread over the depth, the deepest ones replaced by shallower ones to stay within "
               f"{budget_pixels:.3g} projected pixels: {', '.join(picks)}")
    return picks, why


def budgets_for(model: nn.Module, images: int, class_counts: list[int] | None, base: Budgets | None = None) -> Budgets:
    """Budgets that fit a data set of `images` images (with these per-class counts, if it has classes)."""
    b = Budgets(**{k: v for k, v in asdict(base or Budgets()).items() if k != "notes"})
    b.few_images = max(1, min(b.few_images, images))
    b.fooling_images = max(1, min(b.fooling_images, images))
    b.data_images = min(b.data_images, images)
    if b.atlas_layers is None:
        b.atlas_layers, why = atlas_layers(model, b.atlas_pixels, b.atlas_k)
        b.notes.append(f"atlas: {why}")
    if class_counts:
        smallest = min(class_counts)
        b.probe_per_class = max(1, min(b.probe_per_class, smallest - 1))
        b.notes.append(f"probes: {b.probe_per_class} training image(s) per class (the smallest class has {smallest})")
    return b
