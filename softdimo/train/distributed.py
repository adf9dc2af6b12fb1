"""Training past one process: the torchrun world, each rank's share of a global batch, DDP-wrapped modules."""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class World:
    """Where this process stands: its rank among `size` processes, and its GPU on this machine."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def rows(self, total: int) -> slice:
        """This rank's rows of a global batch of `total`; every rank draws the whole batch's randomness and keeps
        its share, so the k-th step sees the same examples and random draws whatever the number of processes."""
        if self.size == 1:
            return slice(None)
        if total % self.size:
            raise ValueError(f"a global batch of {total} does not split evenly over {self.size} processes")
        share = total // self.size
        return slice(self.rank * share, (self.rank + 1) * share)


def current() -> World:
    """The world of this process: one process unless a process group has been started (see `init`)."""
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    return World(rank=dist.get_rank(), size=dist.get_world_size(), local_rank=int(os.environ.get("LOCAL_RANK", 0)))


def init(device: torch.device) -> World:
    """Join the process group that torchrun describes (WORLD_SIZE > 1 in the environment); else stay one process.

    NCCL on CUDA, gloo on CPU. A CUDA process takes the GPU of its local rank."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return current()
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return current()


def local_device(device: torch.device) -> torch.device:
    """The device this rank trains on: its own GPU under a multi-GPU world."""
    if device.type == "cuda" and current().size > 1:
        return torch.device("cuda", current().local_rank)
    return device


def wrap(module: nn.Module) -> nn.Module:
    """`module` in DistributedDataParallel when there is more than one process (its gradients are averaged over
    ranks in backward); the module itself otherwise, so one process runs exactly the code it always ran."""
    if current().size == 1:
        return module
    device = next(module.parameters()).device
    return nn.parallel.DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)


def barrier() -> None:
    if current().size > 1:
        dist.barrier()


def close() -> None:
    """Leave the process group together: every rank waits for the others (one may still be writing files) and drops
    its DDP wrappers before the group is destroyed, so no rank tears gloo down under another's feet."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        gc.collect()
        dist.destroy_process_group()
