"""Running top-k buffers behind dataset mining (Fig. 2's "top 9 activations across the validation data").

One total order everywhere, so that batches, shards and resumed runs give the same answer: higher value
first, then lower image index, then lower location index (y * W + x). `TopK` keeps, per layer, a (C, k)
buffer and merges each batch's candidates into it; `merge_topk` is the same merge for lists that come
from other processes.
"""

from __future__ import annotations

import torch

__all__ = ["NO_IMAGE", "TopK", "merge_topk"]

NO_IMAGE = torch.iinfo(torch.int64).max  # sorts after every real image index (internal only; -1 outside)
_LOW = 0xFFFFFFFF


def merge_topk(value: torch.Tensor, image: torch.Tensor, loc: torch.Tensor, k: int):
    """Top-k along dim 1 of candidate lists (C, M) under the total order (value desc, image asc, loc asc).

    Three stable sorts, least significant key first, give the lexicographic order.
    """
    loc, order = loc.sort(dim=1, stable=True)
    value, image = value.gather(1, order), image.gather(1, order)
    image, order = image.sort(dim=1, stable=True)
    value, loc = value.gather(1, order), loc.gather(1, order)
    value, order = value.sort(dim=1, descending=True, stable=True)
    return value[:, :k], image.gather(1, order[:, :k]), loc.gather(1, order[:, :k])


def _encode(value: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """float32 values and image indices -> int64 keys whose numeric order IS the ranking order.

    High 32 bits: the float's bits made order-preserving as a signed int (negative floats have their
    magnitude bits flipped); low 32 bits: 2^32-1 - image, so a lower index ranks higher; 0 = no image.
    With one candidate per image, keys are unique per channel, so one topk (no stable sorts) gives the
    deterministic top-k.
    """
    bits = (value + 0.0).contiguous().view(torch.int32).long()  # + 0.0 turns -0.0 into +0.0 (they tie)
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    low = torch.where(image == NO_IMAGE, torch.zeros_like(image), _LOW - image)
    return (ordered << 32) + low


def _decode(key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    ordered = key >> 32
    bits = torch.where(ordered < 0, ordered ^ 0x7FFFFFFF, ordered)
    value = bits.to(torch.int32).view(torch.float32)
    low = key & _LOW
    return value, torch.where(low == 0, torch.full_like(low, NO_IMAGE), _LOW - low)


class TopK:
    """Running top-k buffers of one process, per layer (C, k).

    Args:
        k: entries kept per channel.
        positive: keep only values > 0 (a unit that never fires keeps no entry).
        packed: float32 candidates with one location per image are kept as packed int64 keys merged with
            one topk per batch; otherwise (float64 models, several locations per image) as (value, image,
            loc) merged with `merge_topk`. Both give the same order.
    """

    def __init__(self, k: int, positive: bool = True, packed: bool = True):
        self.k, self.positive, self.packed = k, positive, packed
        self._key: dict[str, list[torch.Tensor]] = {}  # layer -> [key, loc]
        self._vil: dict[str, list[torch.Tensor]] = {}  # layer -> [value, image, loc]
        self.sizes: dict[str, tuple[int, int]] = {}

    def __contains__(self, name: str) -> bool:
        return name in self._key or name in self._vil

    def add(self, name: str, values: torch.Tensor, loc: torch.Tensor, index: torch.Tensor, size):
        """values, loc: (B, C) or (B, C, m) candidates of images `index` (B,); size: the layer's (H, W)."""
        values = values.to(torch.promote_types(values.dtype, torch.float32))  # half models -> float32
        if values.dim() == 2:
            values, loc = values[..., None], loc[..., None]
        B, C, m = values.shape
        values = torch.nan_to_num(values, nan=float("-inf"), posinf=float("inf"))  # NaN ranks last
        values = values.permute(1, 0, 2).reshape(C, B * m)
        loc = loc.permute(1, 0, 2).reshape(C, B * m)
        index = index.to(values.device).view(1, -1, 1).expand(C, B, m).reshape(C, B * m)
        drop = values <= 0 if self.positive else values == float("-inf")  # -inf: no candidate there
        if bool(drop.any()):
            values = values.masked_fill(drop, float("-inf"))
            index = index.masked_fill(drop, NO_IMAGE)
            loc = loc.masked_fill(drop, -1)
        if name not in self:
            self.sizes[name] = tuple(int(s) for s in size)
            dev = values.device
            self.set(name, torch.full((C, self.k), float("-inf"), dtype=values.dtype, device=dev),
                     torch.full((C, self.k), NO_IMAGE, dtype=torch.long, device=dev),
                     torch.full((C, self.k), -1, dtype=torch.long, device=dev))
        if name in self._key:
            key, lc = self._key[name]
            key = torch.cat([key, _encode(values, index)], 1)
            key, order = key.topk(self.k, dim=1)  # unique keys: deterministic, sorted best first
            self._key[name] = [key, torch.cat([lc, loc], 1).gather(1, order)]
        else:
            v, i, lc = self._vil[name]
            self._vil[name] = list(merge_topk(torch.cat([v, values], 1), torch.cat([i, index], 1),
                                              torch.cat([lc, loc], 1), self.k))

    def get(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(value, image, loc), each (C, k), best first; image NO_IMAGE where there is none."""
        if name in self._key:
            key, lc = self._key[name]
            return (*_decode(key), lc)
        return tuple(self._vil[name])

    def set(self, name: str, value: torch.Tensor, image: torch.Tensor, loc: torch.Tensor):
        if self.packed and value.dtype == torch.float32:
            self._key[name] = [_encode(value, image), loc]
        else:
            self._vil[name] = [value, image, loc]

    def names(self) -> list[str]:
        return [*self._key, *self._vil]

    def state(self) -> dict:
        return {n: [t.cpu() for t in self.get(n)] for n in self.names()}
