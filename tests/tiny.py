"""Tiny models, image files and references shared by tests in several folders (mining, atlas, site,
CLI, layers)."""

import re
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from zfnet.data.images import Preprocess

PRE = Preprocess(resize=36, size=32)


class Tiny(nn.Module):
    """Two conv layers (one with an in-place ReLU) and a vector layer, float64 so that comparisons with
    the brute force are exact even though batches are composed differently."""

    def __init__(self, dtype=torch.float64):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 6, 5, 2, 2)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(6, 5, 3, 1, 1)
        self.relu2 = nn.ReLU(inplace=True)
        self.grid = nn.AdaptiveAvgPool2d(8)  # identity at 32x32; lets the CLI's 224 input through
        self.flat = nn.Flatten(1)
        self.fc = nn.Linear(5 * 8 * 8, 4)
        with torch.no_grad():  # channel 5 of conv1 is dead: all its values tie at 0
            self.conv1.weight[5] = -self.conv1.weight[5].abs()
            self.conv1.bias[5] = -1.0
        self.to(dtype).eval()

    def forward(self, x):
        x = self.pool1(self.relu1(self.conv1(x)))
        return self.fc(self.flat(self.grid(self.relu2(self.conv2(x)))))


def make_folder(root, n=13, seed=0):
    """n small random photos; a few exact duplicates and a flat image make ties."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        if i == 3:
            a = np.full((40, 44, 3), 128, np.uint8)  # flat: its maxima tie across locations
        else:
            a = rng.integers(0, 256, (40 + i % 3, 44, 3), dtype=np.uint8)
        Image.fromarray(a).save(root / f"img{i:02d}.png")
    for dup in (7, 11):  # identical files: equal values, so the lower index must come first
        shutil.copy(root / "img02.png", root / f"img{dup:02d}.png")
    return root


def png_claiming(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims width x height over one compressed row: bytes on disk, gigabytes decoded
    (a decompression bomb's shape)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def module_calls(model, x):
    """Every module call's output, cloned by a plain forward hook the moment the call returns: {layer name:
    tensor}, a module's later calls named NAME#2, NAME#3, ... (the reference for taps)."""
    calls, out, handles = {}, {}, []

    def hook(name):
        def fn(module, args, output):
            t = output[0] if isinstance(output, (tuple, list)) and output else output
            k = calls[name] = calls.get(name, 0) + 1
            if isinstance(t, torch.Tensor):
                out[name if k == 1 else f"{name}#{k}"] = t.detach().clone()
        return fn

    for name, module in model.named_modules():
        if name:
            handles.append(module.register_forward_hook(hook(name)))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return out


# A progress line (`zfnet: predict 1/1 img (100%), 632 img/s in 0:00`): printed on stderr where it is not a
# terminal, and not an error line.
PROGRESS = re.compile(r"^zfnet: \S.* \d+(/\d+)? \S+( \(\d+%\))?, [\d.e+-]+ \S+/s")


def message_lines(err: str) -> list[str]:
    """The non-empty lines of stderr that are not progress lines."""
    return [ln for ln in err.splitlines() if ln.strip() and not PROGRESS.match(ln)]


def channel_shuffle(x, groups):
    """torchvision's ShuffleNetV2 channel shuffle (a 5-D view and a transpose): the op pattern the receptive
    fields and the occlusion engine must both follow."""
    b, c, h, w = x.size()
    x = x.view(b, groups, c // groups, h, w)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(b, -1, h, w)
