"""Data-parallel training with torch.distributed, set up from torchrun's environment.

`torchrun --nproc_per_node=N -m vggtrain fit ...` starts N processes with RANK, LOCAL_RANK and
WORLD_SIZE set; each trains DistributedDataParallel replicas on its own shard of every epoch.
Without those variables everything here is a no-op and vggtrain runs as one process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from vggtrain.errors import UserError


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


SINGLE = Dist()


def from_env() -> Dist:
    """The process's place in a torchrun job, or SINGLE outside one."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        raise UserError("usage error: RANK, LOCAL_RANK and WORLD_SIZE must be integers") from None
    return Dist(rank, world, local_rank) if world > 1 else SINGLE


def init(d: Dist, device_spec: str) -> str:
    """Join the process group: nccl with one GPU per local rank on CUDA, gloo on the CPU.
    Returns the device the rank must use (the config's device, pinned to the local rank's GPU)."""
    if not d.enabled:
        return device_spec
    use_cuda = device_spec.startswith("cuda") or (device_spec == "auto" and torch.cuda.is_available())
    if use_cuda:
        if d.local_rank >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK {d.local_rank} has no GPU (this machine has "
                            f"{torch.cuda.device_count()}): start at most that many processes per node")
        torch.cuda.set_device(d.local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return f"cuda:{d.local_rank}" if use_cuda else "cpu"


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_sum(t: torch.Tensor, d: Dist) -> torch.Tensor:
    """Sum a tensor over all ranks, in place (a no-op for one process)."""
    if d.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def agree(value: Any, d: Dist) -> Any:
    """Rank 0's value of a small picklable object, on every rank (among trusted peers)."""
    if not d.enabled:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_max(t: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def sync_buffers(model: torch.nn.Module, d: Dist) -> None:
    """Give every rank rank 0's buffers (BN running statistics). DDP broadcasts them before each
    training forward, but that forward then updates each rank's copy from its own batch."""
    if d.enabled:
        for buf in model.buffers():
            dist.broadcast(buf, src=0)
