"""The projection phase of the feature atlas (Fig. 2): every top-k entry projected to pixels with the
deconvnet and cut to its unit's receptive field, one sprite of k tiles per unit, and a Fig. 2 panel
(projections beside patches) per layer.

Images are decoded once per atlas run (kept while they fit in a memory budget) and each is also written
once as the input view the network saw (`images/<index>.<ext>`), from which the site draws the patches
and the field boxes. Work goes in chunks of whole units with a fixed composition, and a unit's sprite is
written as soon as its chunk is done, so a killed run resumes at the first unfinished chunk and, since
a chunk is always computed with the same inputs, ends with the same files as an uninterrupted run.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..data.images import ImageDataset
from ..engine.mine import MineResult
from ..engine.project import project
from ..inspect.layers import LayerInfo, Unit, file_safe
from ..present.render import PICTURE_EXT, grid, save_picture
from ..present.tiles import TileLayout, image_tiles, paste_fields, projection_tiles, sprite

__all__ = ["Inputs", "layer_layout", "field_box", "unit_picture", "image_view", "project_units", "layer_panel"]

# A chunk's size: the more units it holds, the more of their projections share an image's forward pass (the
# engine also crops less where many share one). Its projections stream into tiles (a few KB each, kept until
# the chunk's sprites are written); its distinct input images are stacked for the engine.
CHUNK_PAIRS = 4096
CHUNK_INPUT_BYTES = 640 << 20  # about a thousand 224 px images in float32
# Projections turned into tiles together: as many field canvases as fit in TILE_BYTES, which stays under
# glibc's largest mmap threshold (32 MiB). Larger buffers are mapped afresh and page-faulted in on every
# allocation; 256 canvases of features.12 (131 MB) took 2.1x as long per tile as batches of 32 (16 MB).
TILE_BYTES = 16 << 20


def unit_picture(layer: str, channel: int) -> str:
    """The sprite of one unit's k projections, relative to the atlas folder."""
    return f"units/{Unit(layer, channel).slug}.{PICTURE_EXT}"


def image_view(index: int) -> str:
    """The input view (what the network saw) of dataset image `index`, relative to the atlas folder. JPEG
    without chroma subsampling: patches of small fields are cut from it and enlarged, and WebP's lossy
    mode always halves the colour resolution."""
    return f"images/{index}.jpg"


# ----------------------------------------------------------------------------------------------------
# Geometry: the one place where the atlas asks the layer table where a unit looks.
def layer_layout(info: LayerInfo, input_size: tuple[int, int], max_tile: int) -> TileLayout:
    """The layer's tile: its full receptive field (at most the image), shown at a readable size. Past a
    global gate (squeeze-and-excitation) every unit sees the whole image: tiles show the local field."""
    H, W = input_size
    f = info.affine(local=True)
    fh, fw = (H, W) if f is None else (min(f.size_y, H), min(f.size_x, W))
    return TileLayout.for_field(fh, fw, min_tile=max(1, round(0.75 * max_tile)), max_tile=max_tile)


def field_box(info: LayerInfo, y: int, x: int, input_size: tuple[int, int], layout: TileLayout):
    """((y0, y1, x0, x1): the input box unit (y, x) sees, clipped to the image; (oy, ox): where that box
    lies inside the layer's tile, so that a clipped field keeps its place and its scale)."""
    box = info.window(y, x, input_size, local=True)
    f = info.affine(local=True)
    fy0, fx0 = (0, 0) if f is None else (f.start_y + y * f.jump_y, f.start_x + x * f.jump_x)
    fh, fw = layout.field
    oy = min(max(box[0] - fy0, 0), max(0, fh - (box[1] - box[0])))
    ox = min(max(box[2] - fx0, 0), max(0, fw - (box[3] - box[2])))
    return box, (oy, ox)


# ----------------------------------------------------------------------------------------------------
class Inputs:
    """Preprocessed inputs by dataset index, decoded once per run while they fit in `budget` bytes (least
    recently used ones are dropped beyond it), and their views written once into the atlas folder."""

    def __init__(self, dataset: ImageDataset, out: Path, budget: int = 1 << 30):
        self.dataset, self.out, self.budget = dataset, out, budget
        self._cache: OrderedDict[int, torch.Tensor | None] = OrderedDict()
        self._bytes = 0
        self.decoded = 0  # decodes done (a test and the bench read it)
        self.unreadable: set[int] = set()

    def get(self, i: int) -> torch.Tensor | None:
        if i in self._cache:
            self._cache.move_to_end(i)
            return self._cache[i]
        x = self.dataset[i][0]  # None when the file can no longer be read
        self.decoded += 1
        if x is None:
            self.unreadable.add(i)
        else:
            self._bytes += x.numel() * x.element_size()
        self._cache[i] = x
        while self._bytes > self.budget and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            if old is not None:
                self._bytes -= old.numel() * old.element_size()
        return x

    def display(self, x: torch.Tensor) -> torch.Tensor:
        """An input tensor as RGB in [0, 1]."""
        un = getattr(self.dataset.transform, "unnormalize", None)
        return (un(x.float()) if un else x.float()).clamp(0, 1)

    def write_view(self, i: int):
        path = self.out / image_view(i)
        if not path.exists():
            x = self.get(i)
            if x is not None:
                rgb = (self.display(x) * 255 + 0.5).to(torch.uint8).permute(1, 2, 0).numpy()
                save_picture(rgb, path, quality=85)


# ----------------------------------------------------------------------------------------------------
def chunks(mined: MineResult, layer: str, channels: list[int], k: int, image_bytes: int) -> list[list[int]]:
    """Channels in groups of whole units, in order, each of at most CHUNK_PAIRS projections and
    CHUNK_INPUT_BYTES of distinct images (a fixed composition for one mining result: a resumed run
    computes every chunk with the same inputs)."""
    out, cur, pairs, images = [], [], 0, set()
    for c in channels:
        top = mined.top(layer, c, k)
        ids = {e["index"] for e in top}
        if cur and (pairs + len(top) > CHUNK_PAIRS
                    or (len(images) + len(ids - images)) * image_bytes > CHUNK_INPUT_BYTES):
            out.append(cur)
            cur, pairs, images = [], 0, set()
        cur.append(c)
        pairs += len(top)
        images |= ids
    return out + [cur] if cur else out


def project_units(model, mined: MineResult, layer: str, info: LayerInfo, layout: TileLayout, inputs: Inputs,
                  out: Path, channels: list[int], *, k: int, mode: str, device, dtype, bar=None) -> int:
    """Project the top-k entries of `channels` (one chunk) and write their sprites (and the views of the
    images they use). Returns the number of projections made."""
    H, W = info.input_size
    # (image, channel, rank, unit at its location): sorted by image, so a chunk's projections on one
    # image sit together for the engine
    pairs = sorted((e["index"], c, j, Unit(layer, c, e["y"], e["x"])) for c in channels
                   for j, e in enumerate(mined.top(layer, c, k)))
    tiles: dict[tuple[int, int], np.ndarray] = {}
    ok = [p for p in pairs if inputs.get(p[0]) is not None]  # a file that changed since mining: no tile
    pending: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # (pair, its field canvas, mask)
    fh, fw = layout.field

    def tile_pending():
        if pending:
            canvas, mask = torch.cat([p[1] for p in pending]), torch.cat([p[2] for p in pending])
            for (i, _, _), t in zip(pending, projection_tiles(canvas, mask, layout)):
                tiles[ok[i][1], ok[i][2]] = t
            if bar is not None:
                bar.update(len(pending))
            pending.clear()

    def each(i: int, g: torch.Tensor):  # streamed: the chunk never holds its whole-image projections
        box, offset = geo[i]
        pending.append((i, *paste_fields(g[None].float().cpu(), [0], [box], [offset], layout)))
        if len(pending) >= max(1, TILE_BYTES // (g.shape[0] * fh * fw * 4)):  # float32 canvases
            tile_pending()

    if ok:
        images = sorted({p[0] for p in ok})  # each image once: its projections share the engine's passes
        row = {i: r for r, i in enumerate(images)}
        x = torch.stack([inputs.get(i) for i in images]).to(device, dtype)
        geo = [field_box(info, u.y, u.x, (H, W), layout) for *_, u in ok]
        project(model, x, [p[3] for p in ok], mode, pairs=True, rows=[row[p[0]] for p in ok], each=each)
        del x
        tile_pending()
    for i in sorted({p[0] for p in ok}):  # views first: a unit's sprite on disk implies its images
        inputs.write_view(i)
    for c in channels:
        n = len(mined.top(layer, c, k))
        blank = np.full((*layout.size, 3), 255, np.uint8)
        save_picture(sprite([tiles.get((c, j), blank) for j in range(n)], layout, k), out / unit_picture(layer, c),
                     quality=80)
    if bar is not None:
        bar.update(len(pairs) - len(ok))  # the entries whose image could not be read
    return len(pairs)


def panel_units(mined: MineResult, layer: str, n: int, seed: int) -> list[int]:
    """A seeded random choice of n units of the layer that fire, in channel order."""
    C = mined.layers[layer]["value"].shape[0]
    alive = sorted(set(range(C)) - set(mined.dead(layer)))
    return sorted(random.Random(f"{seed}|{layer}").sample(alive, min(n, len(alive))))


def layer_panel(out: Path, mined: MineResult, layer: str, info: LayerInfo, layout: TileLayout, inputs: Inputs,
                units: list[int], k: int) -> tuple[str, str] | None:
    """Fig. 2 for one layer: for each unit its k projections beside its k patches, about 1600 px wide;
    and a thumbnail (the first unit). Returns the two files, relative to `out` (None without units)."""
    if not units:
        return None
    H, W = info.input_size
    blocks = []
    for c in units:
        proj = np.asarray(Image.open(out / unit_picture(layer, c)).convert("RGB"))
        ents = [e for e in mined.top(layer, c, k) if inputs.get(e["index"]) is not None]
        pics = torch.stack([inputs.display(inputs.get(e["index"])) for e in ents])
        geo = [field_box(info, e["y"], e["x"], (H, W), layout) for e in ents]
        canvas, mask = paste_fields(pics, list(range(len(ents))), [b for b, _ in geo], [o for _, o in geo], layout)
        patches = sprite(list(image_tiles(canvas, mask, layout)), layout, k)
        blocks.append(grid([proj, patches], 2, pad=4, fill=255))
    ncol = max(1, min(len(blocks), 1600 // (blocks[0].shape[1] + 12)))
    panel = grid(blocks, ncol, pad=12, fill=255)
    name = file_safe(layer)
    fig, thumb = f"layers/{name}.{PICTURE_EXT}", f"layers/{name}_thumb.{PICTURE_EXT}"
    save_picture(panel, out / fig, quality=88)
    b = blocks[0]
    w = 320
    small = Image.fromarray(b).resize((w, max(1, round(b.shape[0] * w / b.shape[1]))), Image.LANCZOS)
    save_picture(np.asarray(small), out / thumb, quality=88)
    return fig, thumb
