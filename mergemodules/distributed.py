"""Adaptation over several processes with ``torch.distributed`` (torchrun; gloo on CPU, NCCL on GPU).

Each process holds the merged model and takes its share of every step: ``parallel="data"`` a slice
of every task's batch, ``parallel="tasks"`` a subset of the tasks. The gradients of λ and ℓ (and the
tasks' entropies) are summed over the processes before the optimiser step, each process weighting
its part so that the sum is the single-process gradient of the same global batches, so every process
keeps identical learnables. No launcher: the caller starts the processes (``torchrun``) and calls
``torch.distributed.init_process_group()``.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Sequence, TypeVar

import torch
from torch import Tensor

from .batches import batch_size, rows
from .streams import derived_seed

__all__ = ["PARALLEL", "World"]

PARALLEL = ("data", "tasks")
T = TypeVar("T")


def _dist() -> Any:
    """``torch.distributed`` if a process group is initialised, else None."""
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


@dataclass(frozen=True)
class World:
    """This process's place in the adaptation: ``rank`` of ``size`` processes sharing each step by ``parallel``."""

    rank: int = 0
    size: int = 1
    parallel: str | None = None  # None for one process

    @classmethod
    def current(cls, parallel: str | None = None) -> World:
        """The default process group's world; ``parallel`` defaults to ``"data"`` where it has several processes."""
        if parallel is not None and parallel not in PARALLEL:
            raise ValueError(f"parallel must be 'data', 'tasks' or None, got {parallel!r}")
        dist = _dist()
        if dist is None:
            launched = os.environ.get("WORLD_SIZE", "1")
            if launched.isdigit() and int(launched) > 1:
                warnings.warn(f"WORLD_SIZE={launched} but torch.distributed is not initialised: this process adapts "
                              "alone (call torch.distributed.init_process_group() before adapt to share the work)",
                              stacklevel=3)
            return cls()
        size = dist.get_world_size()
        return cls() if size == 1 else cls(dist.get_rank(), size, parallel or "data")

    def describe(self) -> dict[str, Any]:
        """What a checkpoint records of the world (a resume needs the same)."""
        return {"size": self.size, "parallel": self.parallel}

    def seed(self, seed: int) -> int:
        """The seed of this process's forward randomness (``seed`` itself on rank 0)."""
        return seed if self.rank == 0 else derived_seed(seed, "rank", self.rank)

    def tasks(self, names: Sequence[str]) -> list[str]:
        """The tasks whose batches this process reads: all of them, or with ``parallel="tasks"`` every size-th."""
        if self.parallel == "tasks" and len(names) < self.size:
            raise ValueError(f"parallel='tasks': {len(names)} tasks cannot be shared by {self.size} processes; "
                             "use parallel='data' or fewer processes")
        return list(names[self.rank::self.size]) if self.parallel == "tasks" else list(names)

    def share(self, inputs: Any, name: str) -> tuple[Any, float] | None:
        """This process's part of a task's batch and its weight (its share of the examples); None if it has none."""
        if self.parallel != "data":
            return inputs, 1.0
        total = batch_size(inputs, name)
        start, stop = self.rank * total // self.size, (self.rank + 1) * total // self.size
        if start == stop:
            return None
        return rows(inputs, start, stop, total), (stop - start) / total

    def round_robin(self, names: Sequence[str]) -> list[str]:
        """Every size-th name, from this rank's (work that is split by task whatever ``parallel`` is)."""
        return list(names[self.rank::self.size])

    def all_reduce(self, tensor: Tensor) -> None:
        """Sum ``tensor`` over the processes, in place."""
        if self.size > 1:
            _dist().all_reduce(tensor)

    def broadcast(self, tensors: Sequence[Tensor]) -> None:
        """Give every process rank 0's values of ``tensors`` (same shapes everywhere), in place."""
        if self.size == 1 or not tensors:
            return
        flat = torch.cat([t.detach().reshape(-1) for t in tensors])
        _dist().broadcast(flat, src=0)
        with torch.no_grad():
            for t, value in zip(tensors, flat.split([t.numel() for t in tensors])):
                t.copy_(value.view_as(t))

    def gather(self, value: T) -> list[T]:
        """Every process's ``value`` (picklable), in rank order."""
        if self.size == 1:
            return [value]
        out: list[Any] = [None] * self.size
        _dist().all_gather_object(out, value)
        return out

    def from_rank0(self, fn: Callable[[], T]) -> T:
        """``fn()`` run on rank 0 alone, its result (or its exception) given to every process."""
        result: tuple[bool, Any] = (True, None)
        if self.rank == 0:
            try:
                result = (True, fn())
            except Exception as err:  # raised on every process below, not only on rank 0
                result = (False, err)
        if self.size > 1:
            box = [result]
            _dist().broadcast_object_list(box, src=0)
            result = box[0]
        ok, value = result
        if not ok:
            raise value
        return value
