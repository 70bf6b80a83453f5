"""The filters of any conv layer (CS231n notes, "Conv/FC Filters"): the first layer in colour, as in Fig. 6 (a)
of the paper, and every deeper layer as one grey grid per output channel over its input channels.

Smooth, varied filters are the sign of a well-trained network; noisy ones of too little training or too
weak a regulariser. Each picture is signed with 0 at mid grey: a colour filter on its own largest
magnitude (zfnet.present.render.filter_tiles, the one drawing diagnose uses), a deeper filter on one scale
for all of its input channels so the inputs it weighs most stand out (render.channel_tiles). A 1x1
convolution has no spatial pattern to draw: it is drawn as its out x in weight matrix instead, and a layer
whose filters have one input channel (depthwise, or a grey-image first layer) as one grid of all of them;
the result and one stderr line say so.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import torch.nn as nn

from ..core.errors import ZfnetError
from ..core.results import write_json
from ..inspect.layers import file_safe, layer_table
from ..present.render import channel_tiles, enlarge, filter_tiles, grid, save_png, signed_to_rgb

__all__ = ["conv_weights", "filter_pictures", "OVERVIEW_CHANNELS"]

SCHEMA = 1
OVERVIEW_CHANNELS = 64  # output channels shown in a deep layer's overview picture


def conv_weights(model: nn.Module, layers=None, input_size: int = 224) -> dict[str, nn.Conv2d]:
    """The named Conv2d modules (default: the first one run), in execution order."""
    modules = dict(model.named_modules())
    if not layers:
        convs = [i.name for i in layer_table(model, input_size) if isinstance(modules.get(i.name), nn.Conv2d)]
        if not convs:  # a model whose convs do not run on a 224 image still has its convs defined
            convs = [n for n, m in modules.items() if isinstance(m, nn.Conv2d)]
        if not convs:
            raise ZfnetError(f"{type(model).__name__} has no Conv2d layer")
        layers = convs[:1]
    out = {}
    for name in layers:
        m = modules.get(name)
        if not isinstance(m, nn.Conv2d):
            valid = ", ".join(n for n, mm in modules.items() if isinstance(mm, nn.Conv2d))
            what = "no such layer" if m is None else f"a {type(m).__name__}, not a Conv2d"
            raise ZfnetError(f"layer {name!r}: {what}; conv layers: {valid}")
        out[name] = m
    return out


def filter_pictures(model: nn.Module, out: str | os.PathLike, layers=None, *, max_channels: int | None = None,
                    tile: int = 32, config: dict | None = None) -> dict:
    """Draw the filters of conv layers into `out`.

    Per layer: `<layer>.png`, an overview (the RGB filters; or, for deeper layers, the grids of the first
    OVERVIEW_CHANNELS output channels side by side), and for deeper layers `<layer>/<o>.png`, one grid per
    output channel over its input channels.
    Args:
        layers: Conv2d module names (default: the first conv layer run).
        max_channels: draw at most this many output channels per layer (default: all).
        tile: side, in pixels, of each input channel's tile in the per-channel grids.
    Returns: the result.json content ({"layers": {name: {"style", "out_channels", "in_channels", ...}}}).
    """
    out = Path(out)
    convs = conv_weights(model, layers)
    result = {"schema": SCHEMA, "kind": "filters", "layers": {}, "config": dict(config or {}, tile=tile,
                                                                                 max_channels=max_channels)}
    for name, conv in convs.items():
        w = conv.weight.detach().float().cpu()  # (O, I / groups, kh, kw)
        o, i, kh, kw = w.shape
        n = o if max_channels is None else min(o, max_channels)
        slug = file_safe(name)
        info = {"out_channels": o, "in_channels": i, "groups": conv.groups, "kernel": [kh, kw],
                "stride": list(conv.stride), "figure": f"{slug}.png", "drawn": n,
                "rms": w.flatten(1).pow(2).mean(1).sqrt().tolist()}
        if i == 3 and kh * kw > 1:
            info["style"] = "rgb"
            save_png(grid(filter_tiles(w[:n]), ncol=math.ceil(math.sqrt(n))), out / info["figure"])
        elif i == 1 or kh * kw == 1:
            if kh * kw == 1:  # no spatial pattern: the (out, in) weight matrix is the whole filter bank
                info["style"] = "matrix"
                note = f"{name} is a 1x1 convolution: drawn as its {n} x {i} weight matrix"
                m = w[:n, :, 0, 0]
                pic = enlarge(signed_to_rgb(m), max(1, 512 // max(n, i)))
            else:  # one input channel per filter: one grey grid of all filters
                info["style"] = "grey"
                note = f"{name} has one input channel per filter: drawn as one grid of its {n} filters"
                pic = grid(filter_tiles(w[:n]), ncol=math.ceil(math.sqrt(n)))
            info["note"] = note
            print(f"zfnet: filters: {note}", file=sys.stderr)
            save_png(pic, out / info["figure"])
        else:
            info["style"] = "channels"
            cols = math.ceil(math.sqrt(i))
            grids = [grid(channel_tiles(w[c], tile), ncol=cols, pad=1, fill=255) for c in range(n)]
            for c, g in enumerate(grids):
                save_png(g, out / slug / f"{c}.png")
            info["channels"] = [f"{slug}/{c}.png" for c in range(n)]
            shown = grids[:OVERVIEW_CHANNELS]
            info["overview_channels"] = len(shown)
            save_png(grid(shown, ncol=math.ceil(math.sqrt(len(shown))), pad=6, fill=255), out / info["figure"])
        result["layers"][name] = info
    write_json(out / "result.json", result)
    return result
