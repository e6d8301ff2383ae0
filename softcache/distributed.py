"""Running under `torchrun`: the process group, this process's rank, and the few collectives softcache needs.

`torchrun --nproc-per-node N -m softcache CMD ...` starts N processes with RANK, WORLD_SIZE, LOCAL_RANK and
the rendezvous address in their environment; `init()` joins them into one group (nccl on CUDA, gloo on CPU).
Without torchrun (or with one process) everything here is a no-op and softcache runs as a single process.
"""
from __future__ import annotations

import atexit
import os
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
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
        # leave the group before the interpreter tears down: a group still alive at exit can abort a rank
        # ("terminate called without an active exception") after its work is done
        atexit.register(_leave)
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def _leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


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


def rank_share(order: np.ndarray, batch: int, world: World) -> np.ndarray:
    """This rank's samples of an epoch visited in `order` by global batches of `batch`: its `batch / size`
    consecutive samples of every full global batch (rank r takes slice r), so the ranks together visit exactly
    what one process visits per step. The last, partial global batch is dropped, as training drops it."""
    if world.size <= 1:
        return order
    per = batch // world.size
    full = len(order) // batch * batch
    return order[:full].reshape(-1, batch)[:, world.rank * per:(world.rank + 1) * per].reshape(-1)


def share_position(position: int, batch: int, world: World, total: int) -> int:
    """How many of this rank's samples come before global position `position` of an epoch's order of
    `total` samples (maps window bounds of the global order onto `rank_share`)."""
    if world.size <= 1:
        return position
    per = batch // world.size
    position = min(position, total // batch * batch)
    inside = min(max(position % batch - world.rank * per, 0), per)
    return position // batch * per + inside


def check_global_batch(batch: int, world: World) -> int:
    """The per-rank batch of global batch `batch`; refuses one that does not split evenly."""
    if batch % world.size:
        from softcache.errors import SoftcacheError
        raise SoftcacheError(f"--batch-size {batch} is the global batch and must split evenly among {world.size} "
                             f"processes; give a multiple of {world.size}")
    return batch // world.size


def all_reduce_sum(value: torch.Tensor, world: World) -> torch.Tensor:
    if world.size > 1:
        dist.all_reduce(value)
    return value


class GlobalBatchNorm(torch.nn.BatchNorm2d):
    """BatchNorm whose training statistics are those of the global batch, for CPU process groups (gloo):
    torch's SyncBatchNorm runs on CUDA only. Per channel, the sums of x and x^2 over every rank's share are
    all-reduced with `torch.distributed.nn.functional.all_reduce`, which carries gradients back to every rank,
    so the forward and the backward are those of one BatchNorm over the global batch. Evaluation uses the
    running statistics, updated (momentum, unbiased variance) as BatchNorm updates them."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce  # differentiable: gradients reach every rank
        dims = [0] + list(range(2, x.dim()))
        count = x.numel() // x.shape[1] * dist.get_world_size()
        with warnings.catch_warnings():  # deprecated for a private replacement; the public one still works
            warnings.simplefilter("ignore", FutureWarning)
            total = all_reduce(torch.cat([x.sum(dims), (x * x).sum(dims)]))
        mean, mean_sq = total[:x.shape[1]] / count, total[x.shape[1]:] / count
        var = mean_sq - mean * mean
        with torch.no_grad():
            self.num_batches_tracked += 1
            self.running_mean.mul_(1 - self.momentum).add_(mean.detach(), alpha=self.momentum)
            self.running_var.mul_(1 - self.momentum).add_(var.detach() * count / max(1, count - 1), alpha=self.momentum)
        shape = [1, -1] + [1] * (x.dim() - 2)
        y = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + self.eps)
        return y * self.weight.view(shape) + self.bias.view(shape) if self.affine else y


def sync_batchnorm(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Every BatchNorm of `model` computing global-batch statistics: torch's SyncBatchNorm on CUDA,
    `GlobalBatchNorm` on CPU. Parameters and running statistics are kept."""
    if device.type == "cuda":
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in model.named_children():
        if isinstance(child, torch.nn.modules.batchnorm._BatchNorm) and not isinstance(child, GlobalBatchNorm):
            replaced = GlobalBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                       child.track_running_stats)
            replaced.load_state_dict(child.state_dict())
            setattr(model, name, replaced)
        else:
            sync_batchnorm(child, device)
    return model


def all_gather(value: torch.Tensor, world: World) -> torch.Tensor:
    """Every rank's `value` (of one shape on all ranks), concatenated in rank order along the first axis."""
    if world.size <= 1:
        return value
    parts = [torch.empty_like(value) for _ in range(world.size)]
    dist.all_gather(parts, value.contiguous())
    return torch.cat(parts)


def current() -> World:
    """The process group this process is in (a single process when there is none)."""
    if not dist.is_initialized():
        return World()
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
