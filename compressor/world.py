"""Where this process stands among a run's ranks: the one fact evaluation, checkpoints and
the engine ask about, kept apart from the process-group machinery in `distributed`."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    """This process's place among the ranks of a run; a world of one needs no process group."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str = ""  # gloo | nccl; "" for a world of one

    @property
    def leader(self) -> bool:
        """Rank 0: the one writer of metrics, checkpoint pointers, exports and the report."""
        return self.rank == 0

    def slice(self, indices: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous part of a global batch (sizes differ by at most one)."""
        return indices.tensor_split(self.size)[self.rank] if self.size > 1 else indices

    def mine(self, items: list[Any]) -> list[Any]:
        """Every size-th item from this rank's: an even spread of evaluation batches."""
        return items[self.rank :: self.size] if self.size > 1 else items

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """The sum of `values` over the ranks (a new tensor on values' device)."""
        if self.size == 1:
            return values
        out = values.detach().to(self._comm_device(), copy=True)
        dist.all_reduce(out)
        return out.to(values.device)

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order (picklable objects)."""
        if self.size == 1:
            return [obj]
        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def from_leader(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
        if self.size == 1:
            return obj
        box = [obj if self.leader else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def _comm_device(self) -> torch.device:
        return (
            torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")
        )


SOLO = World()
_current = SOLO


def current() -> World:
    return _current


def use(world: World) -> World:
    """Make `world` this process's (`distributed.join` and `leave` do)."""
    global _current
    _current = world
    return world


def launched() -> bool:
    """Whether torchrun (or another launcher) started this process as one of several ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1
