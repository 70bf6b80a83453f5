"""Projection tiles: the picture is the documented map (0 at grey, +-s at white / black, s the Q_STRETCH
quantile of |p| over the in-image values, clipped beyond), computed at the field's resolution and then
brought to the tile's size, whichever order the implementation takes."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from zfnet.present.tiles import PAD, Q_STRETCH, TileLayout, projection_tiles


def _reference(canvas: torch.Tensor, mask: torch.Tensor, layout: TileLayout) -> np.ndarray:
    """The map written out one tile at a time: quantile by sorting, map, resize, PAD outside."""
    out = []
    for c, m in zip(canvas, mask):
        inside = c.abs()[m.expand_as(c) > 0].flatten()
        mags = inside.sort(descending=True).values
        s = mags[max(1, math.ceil((1 - Q_STRETCH) * mags.numel())) - 1].item()
        s = s or mags[0].item()
        shown = 0.5 + 0.5 * (c / s).clamp(-1, 1) if s > 0 else torch.full_like(c, 0.5)
        shown, mm = shown[None].float(), m[None].float()
        if tuple(layout.size) != tuple(layout.field):
            big = layout.size[0] >= layout.field[0]
            kw = dict(mode="nearest") if big else dict(mode="bilinear", antialias=True, align_corners=False)
            shown, mm = F.interpolate(shown, size=layout.size, **kw), F.interpolate(mm, size=layout.size, **kw)
        pad = torch.tensor(PAD, dtype=torch.float32).view(1, 3, 1, 1) / 255
        x = torch.where(mm > 0.5, shown.clamp(0, 1), pad)
        out.append((x * 255 + 0.5).to(torch.uint8)[0].permute(1, 2, 0).numpy())
    return np.stack(out)


@pytest.mark.parametrize("field", [(207, 207), (23, 23), (112, 112)])  # reduced, enlarged, as is
def test_projection_tiles_match_the_documented_map(field):
    g = torch.Generator().manual_seed(0)
    layout = TileLayout.for_field(*field, min_tile=84, max_tile=112)
    B = 6
    # sparse, heavy-tailed values as deconvnet projections are, with a clipped field in two of the tiles
    canvas = torch.randn(B, 3, *field, generator=g) ** 3 * (torch.rand(B, 1, *field, generator=g) < 0.3)
    mask = torch.ones(B, 1, *field)
    mask[1, :, :, field[1] // 2:] = 0
    mask[2, :, : field[0] // 3] = 0
    canvas *= mask
    canvas[3] = 0  # a tile with nothing in it: mid grey
    got, want = projection_tiles(canvas, mask, layout), _reference(canvas, mask, layout)
    assert got.shape == (B, *layout.size, 3) and got.dtype == np.uint8
    diff = np.abs(got.astype(int) - want.astype(int))
    assert diff.max() <= 1, diff.max()  # float rounding only: the same picture
    live = np.delete(diff, 3, axis=0)  # (the reference's resize of a grey 0.5 field rounds some pixels to 127)
    assert (live > 0).mean() < 0.01, (live > 0).mean()
    assert (got[3] == 128).all()
    assert (got[1][:, -2:] == np.array(PAD, np.uint8)).all()  # outside the image: PAD
