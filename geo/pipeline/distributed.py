"""torchrun / DDP helpers: process group set-up, contiguous sharding, reductions.

Under ``torchrun --nproc_per_node N`` the environment carries RANK, WORLD_SIZE and
LOCAL_RANK; ``init()`` starts a process group (NCCL on CUDA, gloo otherwise). In a plain
single process every helper degrades to a no-op, so callers never fork their code paths.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    """This process's place in the job: ``rank`` of ``world_size`` (1 = no DDP)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum of ``values`` over all ranks (float64)."""
        if not self.enabled:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64)
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t)
        return t.cpu().tolist()

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is True on at least one rank."""
        return self.sum([float(flag)])[0] > 0


def init(device: torch.device) -> tuple[Dist, torch.device]:
    """Join the torchrun process group if there is one; return (Dist, this rank's device).

    On CUDA each rank takes ``cuda:LOCAL_RANK``.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Dist(), device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world_size, local_rank), device


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shard_range(n_rows: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous rows [start, stop) of ``n_rows`` for ``rank``; shards differ by at most one row
    and, concatenated in rank order, give back 0..n_rows in order."""
    start = rank * n_rows // world_size
    stop = (rank + 1) * n_rows // world_size
    return start, stop
