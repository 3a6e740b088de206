"""Splitting an atlas over processes (``torchrun --nproc_per_node N -m captum_vit atlas``).

Image batches have fixed global boundaries (batch ``b`` holds images ``b*B ... b*B+B-1``
whatever the number of processes) and are dealt out round-robin; every image is thus
computed in the same batch as in one process, and the top-k merge of
:class:`~captum_vit.TopActivatingExamples` is exact, so the files are identical. Units for
feature visualization are dealt out the same way, in fixed chunks.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

__all__ = ["Shard", "fixed_batches"]

T = TypeVar("T")


@dataclass
class Shard:
    """This process's place among the atlas's processes."""

    rank: int = 0
    world: int = 1
    started_group: bool = False

    @classmethod
    def from_environment(cls) -> Shard:
        """Join the process group that ``torchrun`` describes (``WORLD_SIZE`` > 1; gloo on
        CPU, NCCL with CUDA), or run alone."""
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return cls()
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
        return cls(dist.get_rank(), dist.get_world_size(), started_group=True)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def mine(self, items: Sequence[T]) -> list[T]:
        """This process's share of ``items`` (round-robin)."""
        return list(items[self.rank :: self.world])

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def gather(self, value: Any) -> list[Any]:
        """Every process's ``value``, in rank order, on every process."""
        if self.world == 1:
            return [value]
        values: list[Any] = [None] * self.world
        dist.all_gather_object(values, value)
        return values

    def agree(self, ok: bool, message: str) -> None:
        """Raise ``ValueError(message)`` on every process if any process failed."""
        if not all(self.gather(ok)):
            raise ValueError(message)

    def close(self) -> None:
        if self.started_group:
            dist.destroy_process_group()


def fixed_batches(count: int, batch_size: int) -> list[list[int]]:
    """Image indices ``0..count-1`` in batches of ``batch_size`` (the last may be short)."""
    return [
        list(range(start, min(start + batch_size, count))) for start in range(0, count, batch_size)
    ]
