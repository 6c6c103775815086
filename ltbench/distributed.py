"""Data-parallel training across processes (``torchrun --nproc_per_node N -m ltbench run ...``).

Every rank runs the same engine on its shard of each global batch. Gradients are averaged with one
coalesced all-reduce per optimizer step (after the local micro-batches are accumulated), which is
what DistributedDataParallel computes for a no-sync accumulation step, without wrapping the
methods' modules: state-dict keys stay plain, so a checkpoint resumes on any number of GPUs.
Evaluation shards the test set without padding and gathers every prediction before any metric. This module
holds only the collectives; launching local processes is ``ltbench.launcher``'s job.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def context() -> DistContext:
    """The process group from torchrun's environment, initialised on first use; single-process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and os.environ.get("LTBENCH_DIST_BACKEND") != "gloo" else "gloo"
        dist.init_process_group(backend)
    return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


@torch.no_grad()
def average_gradients(params: list[torch.Tensor], world: int) -> None:
    """Average ``.grad`` over ranks with one flat all-reduce (a rank without a grad contributes zeros)."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone()
        offset += n


def gather(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def shard(n: int, rank: int, world: int) -> range:
    """A contiguous, unpadded, even split of ``range(n)``: process ``rank``'s part of a test set or global batch
    (no sample is evaluated or trained twice)."""
    per, extra = divmod(n, world)
    start = rank * per + min(rank, extra)
    return range(start, start + per + (1 if rank < extra else 0))
