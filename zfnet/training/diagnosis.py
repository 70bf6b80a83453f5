"""Architecture diagnosis (Sec. 4.1, Fig. 6): what made Zeiler & Fergus shrink AlexNet's 11x11 stride-4
first layer to 7x7 stride 2 and clip filter scales, measured and drawn for any convnet.

Measures (all on the first conv layer unless said otherwise):
  * dead filters: never active (the rectified output is <= 0 on every position of every image of a
    data set), or near-zero norm (filter RMS <= `zero_tol` x the layer's median filter RMS);
  * frequency coverage: each filter's power spectrum (its DTFT, sampled on a 64 x 64 grid, summed over
    input channels, DC included) split into radial bands of spatial frequency r = sqrt(fx^2 + fy^2)
    in cycles per input pixel: low r < 1/8, mid 1/8 <= r < 1/4, high r >= 1/4. The edges are the
    Nyquist limits of stride-4 and stride-2 sampling (AlexNet's and ZFNet's conv1): "mid" is what a
    stride-4 layer 1 cannot pass on un-aliased and a stride-2 one can. The paper saw AlexNet's filters
    "a mix of extremely high and low frequency information, with little coverage of the mid frequencies";
  * aliasing of layer-2 features: each layer-2 channel's strongest activation over the data set is
    projected to pixels (deconvnet) and cut to its receptive field; aliasing = the share of that
    projection's power (Hann-windowed) at frequencies the layer-1 stride s folds over, i.e. with
    max(|fx|, |fy|) > 1/(2 s) cycles/pixel. In the forward pass such frequencies fold onto lower ones;
    in the projection they appear as the stride-periodic grid artefacts of Fig. 6(d). The share above a
    fixed 1/8 cycles/pixel is reported too, so two networks with different strides compare on one scale;
  * filter-scale domination: max / median filter RMS per conv layer (a few filters dominating is what
    feature scale clipping, Sec. 3, prevents).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ..core.errors import ZfnetError
from ..core.results import save_npz, write_json
from ..inspect.layers import Unit, feature_layers, layer_table
from ..present.render import filter_tiles, grid, save_png, signed_to_rgb
from .networks import filter_rms

__all__ = ["BANDS", "power_spectrum", "frequency_bands", "domination", "near_zero",
           "aliasing_share", "conv_layers", "Diagnosis", "diagnose"]

BANDS = (0.125, 0.25)  # radial band edges in cycles/pixel: low | mid | high


def conv_layers(model: nn.Module) -> list[tuple[str, nn.Conv2d]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def power_spectrum(weight: torch.Tensor, n: int = 64) -> torch.Tensor:
    """(O, I, kh, kw) -> (O, n, n) |DTFT|^2 summed over input channels, frequencies in fft order."""
    w = weight.detach().double()
    return torch.fft.fft2(w, s=(n, n)).abs().pow(2).sum(1)


def _freq_grid(n: int, m: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    fy = torch.fft.fftfreq(n, dtype=torch.float64)[:, None].expand(n, m or n)
    fx = torch.fft.fftfreq(m or n, dtype=torch.float64)[None, :].expand(n, m or n)
    return fy, fx


def frequency_bands(weight: torch.Tensor, n: int = 64, edges=BANDS) -> torch.Tensor:
    """(O, I, kh, kw) -> (O, 3) share of each filter's spectral energy in the low / mid / high band.

    An all-zero filter has no spectrum: its row is NaN.
    """
    p = power_spectrum(weight, n)
    fy, fx = _freq_grid(n)
    r = (fy ** 2 + fx ** 2).sqrt()
    masks = [r < edges[0], (r >= edges[0]) & (r < edges[1]), r >= edges[1]]
    total = p.sum((1, 2))
    shares = torch.stack([(p * m).sum((1, 2)) for m in masks], 1) / total[:, None]
    shares[total <= 0] = math.nan
    return shares.float()


def domination(weight: torch.Tensor) -> float:
    """max / median filter RMS of a conv layer (1 = all filters the same scale)."""
    rms = filter_rms(weight)
    med = rms.median()
    return float(rms.max() / med) if med > 0 else math.inf


def near_zero(weight: torch.Tensor, zero_tol: float = 1e-2) -> torch.Tensor:
    """(O,) bool: filters whose RMS is at most zero_tol x the layer's median filter RMS."""
    rms = filter_rms(weight)
    return rms <= zero_tol * rms.median()


def aliasing_share(images: torch.Tensor, stride: int, *, window: bool = True) -> torch.Tensor:
    """(N, C, H, W) -> (N,): share of power at max(|fx|, |fy|) > 1/(2*stride) cycles/pixel.

    The mean of each channel is removed first (DC is not aliasing) and a Hann window tapers the patch
    edges so that the cut itself does not read as high frequency.
    """
    x = images.detach().double()
    x = x - x.mean((-2, -1), keepdim=True)
    H, W = x.shape[-2:]
    if window:
        x = x * (torch.hann_window(H, periodic=False, dtype=torch.float64)[:, None]
                 * torch.hann_window(W, periodic=False, dtype=torch.float64)[None, :])
    p = torch.fft.fft2(x).abs().pow(2).sum(1)  # (N, H, W)
    fy, fx = _freq_grid(H, W)
    folded = torch.maximum(fy.abs(), fx.abs()) > 1.0 / (2 * stride)
    total = p.sum((1, 2))
    out = (p * folded).sum((1, 2)) / total
    out[total <= 0] = math.nan
    return out.float()


# ----------------------------------------------------------------------------------------------------
@dataclass
class Diagnosis:
    """Fig. 6 measured. Per-filter arrays go to arrays.npz; result.json holds the summary."""

    config: dict
    layer1: str  # the first conv layer (module name)
    stride1: int
    filters: int
    dead_never_active: list[int]  # layer-1 channels never > 0 over the data set
    dead_near_zero: list[int]  # layer-1 filters with near-zero norm
    bands: dict  # mean share of layer-1 spectral energy {"low", "mid", "high"} over non-zero filters
    band_edges: tuple = BANDS
    domination: dict = field(default_factory=dict)  # conv layer -> max/median filter RMS
    layer2: dict = field(default_factory=dict)  # {"layer", "dead_never_active", "aliasing", "above_1_8", "units"}
    images: int = 0
    skipped: list = field(default_factory=list)

    def to_json(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["dead"] = sorted(set(self.dead_never_active) | set(self.dead_near_zero))
        return {"schema": 1, **d}


def _first_conv(model):
    convs = conv_layers(model)
    if not convs:
        raise ZfnetError(f"{type(model).__name__} has no Conv2d layer to diagnose")
    return convs[0]


def diagnose(model: nn.Module, data=None, out: str | Path | None = None, *, max_images: int | None = None,
             batch_size: int = 32, preprocess=None, zero_tol: float = 1e-2, progress: bool = True,
             project_layer2: bool = True, config: dict | None = None) -> Diagnosis:
    """Measure (and, with `out`, draw) Fig. 6 for `model`.

    Args:
        data: image folder (or ImageDataset) for the data-dependent measures (never-active filters, layer-2
            projections); None measures the weights only.
        out: result folder: result.json, arrays.npz, layer1_filters.png, layer2_features.png.
        max_images: use at most this many images of `data` (evenly spaced).
    """
    name1, conv1 = _first_conv(model)
    w1 = conv1.weight.detach().cpu()
    stride1 = int(conv1.stride[0])
    bands = frequency_bands(w1)
    ok = ~torch.isnan(bands[:, 0])
    mean_bands = bands[ok].mean(0).tolist() if ok.any() else [math.nan] * 3
    dom = {n: domination(m.weight) for n, m in conv_layers(model)}
    zero = near_zero(w1, zero_tol)
    diag = Diagnosis(config=dict(config or {}, zero_tol=zero_tol, max_images=max_images), layer1=name1,
                     stride1=stride1, filters=int(w1.shape[0]), dead_never_active=[],
                     dead_near_zero=torch.nonzero(zero).flatten().tolist(),
                     bands=dict(zip(("low", "mid", "high"), mean_bands)), domination=dom)
    arrays = {"layer1_bands": bands.numpy(), "layer1_rms": filter_rms(w1).numpy()}
    patches = []
    if data is not None:
        diag, arrays, patches = _with_data(model, data, diag, arrays, max_images, batch_size, preprocess,
                                           progress, project_layer2)
    if out is not None:
        out = Path(out)
        save_npz(out / "arrays.npz", **arrays)
        save_png(grid(filter_tiles(w1), ncol=int(math.ceil(math.sqrt(len(w1))))),
                 out / "layer1_filters.png")
        if patches:
            side = max(p.shape[-1] for p in patches)
            tiles = [np.kron(signed_to_rgb(p), np.ones((max(1, 64 // side),) * 2 + (1,), np.uint8)) for p in patches]
            save_png(grid(tiles, ncol=int(math.ceil(math.sqrt(len(tiles))))), out / "layer2_features.png")
        write_json(out / "result.json", diag.to_json())
    return diag


def _with_data(model, data, diag, arrays, max_images, batch_size, preprocess, progress, project_layer2):
    from ..data.images import ImageDataset
    from ..engine.mine import mine
    from ..engine.project import project
    from .checkpoints import preprocess_for

    pre = preprocess or preprocess_for(model)
    ds = data if isinstance(data, ImageDataset) else ImageDataset.from_folder(data, pre)
    ds = ds.spread(max_images, pre)
    table = layer_table(model, pre.size)
    feats = feature_layers(model, table)
    if len(feats) < 2:
        raise ZfnetError("the model has fewer than two rectified conv layers to diagnose")
    l1, l2 = feats[0], feats[1]
    res = mine(model, ds, [l1, l2], k=1, batch_size=batch_size, preprocess=pre, progress=progress)
    diag.images, diag.skipped = res.images, list(res.skipped)
    v1 = res.layers[l1]["value"][:, 0]
    v2 = res.layers[l2]["value"][:, 0]
    if len(v1) == diag.filters:  # the first rectified layer is the first conv's output
        diag.dead_never_active = torch.nonzero(~(v1 > 0)).flatten().tolist()
    arrays.update(layer1_max=v1.numpy(), layer2_max=v2.numpy())
    layer2 = {"layer": l2, "channels": len(v2), "dead_never_active": torch.nonzero(~(v2 > 0)).flatten().tolist()}
    patches = []
    if project_layer2:
        alive = torch.nonzero(v2 > 0).flatten().tolist()
        info = table[l2]
        units, imgs, boxes = [], [], []
        for c in alive:
            t = res.top(l2, c)[0]
            x, _, _, err = ds[t["index"]]
            if err:
                continue
            units.append(Unit(l2, c, t["y"], t["x"]))
            imgs.append(x)
            boxes.append(info.window(t["y"], t["x"]))
        if units:
            dev = next(model.parameters()).device
            proj = project(model, torch.stack(imgs).to(dev), units, "deconv", pairs=True).cpu()
            patches = [_field_patch(proj[i], info, u, box) for i, (u, box) in enumerate(zip(units, boxes))]
            # Units at the image border see a clipped box; their patches are zero-padded to the full
            # receptive field (nothing outside the image projects), so every share is over one grid.
            stack = torch.stack([p for p in patches if p.shape == patches[0].shape])
            a_own = aliasing_share(stack, diag.stride1)
            a_8 = aliasing_share(stack, 4)
            layer2.update(aliasing=float(a_own.nanmean()), above_1_8=float(a_8.nanmean()), units=len(stack))
            arrays.update(layer2_aliasing=a_own.numpy(), layer2_above_1_8=a_8.numpy())
    diag.layer2 = layer2
    return diag, arrays, patches


def _field_patch(proj: torch.Tensor, info, unit: Unit, box) -> torch.Tensor:
    """The projection inside a unit's full receptive field (size_y, size_x), zero where it leaves the image."""
    y0, y1, x0, x1 = box
    f = info.field
    if f is None:
        return proj[:, y0:y1, x0:x1]
    ay, ax = f.start_y + unit.y * f.jump_y, f.start_x + unit.x * f.jump_x
    out = proj.new_zeros(proj.shape[0], f.size_y, f.size_x)
    oy0, ox0 = max(y0, ay), max(x0, ax)
    oy1, ox1 = min(y1, ay + f.size_y), min(x1, ax + f.size_x)
    out[:, oy0 - ay:oy1 - ay, ox0 - ax:ox1 - ax] = proj[:, oy0:oy1, ox0:ox1]
    return out
