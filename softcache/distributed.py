"""Running under `torchrun`: the process group, this process's rank, and the few collectives softcache needs.

`torchrun --nproc-per-node N -m softcache CMD ...` starts N processes with RANK, WORLD_SIZE, LOCAL_RANK and
the rendezvous address in their environment; `init()` joins them into one group (nccl on CUDA, gloo on CPU).
Without torchrun (or with one process) everything here is a no-op and softcache runs as a single process.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init(device: str = "cpu") -> World:
    """Join the torchrun process group, if this process was started by torchrun with more than one process."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    if not dist.is_initialized():
        cuda = torch.device(device).type == "cuda"
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def local_device(device: str, world: World) -> str:
    """`cuda` means this process's own GPU (`cuda:LOCAL_RANK`) under torchrun; anything else as given."""
    if world.size > 1 and device == "cuda":
        return f"cuda:{world.local_rank}"
    return device


def barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier()


def broadcast(value: Any, world: World) -> Any:
    """Rank 0's `value`, on every rank."""
    if world.size <= 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
