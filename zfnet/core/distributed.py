"""Distributed plumbing shared by training and mining: torchrun's environment -> (Dist, device).

`torchrun --nproc_per_node N -m zfnet train|atlas ...` sets RANK / WORLD_SIZE / LOCAL_RANK; every process
joins one group (NCCL for CUDA, gloo for CPU) and `Dist` carries what the code needs from it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["Dist", "init_distributed"]


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: str = "cpu"  # where collectives run (NCCL reduces only CUDA tensors)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            x = t.to(self.device)
            dist.all_reduce(x)
            return x.to(t.device)
        return t


def init_distributed(device_hint: str | None = None) -> tuple[Dist, torch.device]:
    """Join the process group torchrun describes in RANK / WORLD_SIZE / LOCAL_RANK (NCCL on CUDA, gloo on
    CPU) and pick this process's device; a group the caller already initialized is used as it is; a plain
    process is rank 0 of 1."""
    if dist.is_available() and dist.is_initialized():
        nccl = dist.get_backend() == "nccl"
        dev = (torch.device("cuda", torch.cuda.current_device()) if nccl
               else torch.device(device_hint or "cpu"))
        d = Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)),
                 str(dev) if nccl else "cpu")
        return d, dev
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) < 2:
        dev = torch.device(device_hint or ("cuda" if torch.cuda.is_available() else "cpu"))
        return Dist(), dev
    d = Dist(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    use_cuda = torch.cuda.is_available() and (device_hint is None or device_hint.startswith("cuda"))
    if use_cuda:
        dev = torch.device("cuda", d.local_rank)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    d.device = str(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return d, dev
