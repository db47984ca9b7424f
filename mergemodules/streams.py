"""Reproducible data streams for test-time adaptation: isolated random state and resume positions.

Each task's loader is read under its own random state, seeded from ``(seed, task name, pass over
the data)`` at the start of every pass; the torch, ``random`` and NumPy global generators and any
``torch.Generator`` attached to a ``DataLoader`` or its sampler are seeded so. A resumed run
re-creates the current pass and skips the batches already used, so the loaders must give the same
batches for the same random state (true of map-style and deterministic iterable datasets; not of
``persistent_workers=True`` loaders with random augmentations in the workers).
"""
from __future__ import annotations

import contextlib
import hashlib
import random
from typing import Any, Iterable, Iterator, Mapping

import torch

try:
    import numpy as np
except ImportError:  # NumPy is optional; without it there is no NumPy generator to manage
    np = None

__all__ = ["Stream", "derived_seed", "isolated_rng", "seeded_rng_state"]


def derived_seed(*parts: object) -> int:
    """A 63-bit seed that depends on every part (stable across processes, unlike ``hash``)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def seeded_rng_state(seed: int) -> dict[str, Any]:
    """Global-RNG states (torch CPU, ``random``, NumPy) as seeding each with ``seed`` would leave them."""
    state = {"torch": torch.Generator().manual_seed(seed).get_state(), "random": random.Random(seed).getstate()}
    if np is not None:
        state["numpy"] = np.random.RandomState(seed % 2**32).get_state()
    return state


def _current_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "random": random.getstate()}
    if np is not None:
        state["numpy"] = np.random.get_state()
    return state


def _set_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["random"])
    if np is not None:
        np.random.set_state(state["numpy"])


@contextlib.contextmanager
def isolated_rng(state: dict[str, Any]) -> Iterator[None]:
    """Run the block with the global generators in ``state``; afterwards ``state`` holds where they got."""
    saved = _current_state()
    _set_state(state)
    try:
        yield
    finally:
        state.update(_current_state())
        _set_state(saved)


def _loader_generators(data: object) -> list[torch.Generator]:
    """``torch.Generator``s a ``DataLoader`` shuffles or seeds its workers with."""
    found: list[torch.Generator] = []
    batch_sampler = getattr(data, "batch_sampler", None)
    for owner in (data, getattr(data, "sampler", None), getattr(batch_sampler, "sampler", None)):
        gen = getattr(owner, "generator", None)
        if isinstance(gen, torch.Generator) and all(gen is not g for g in found):
            found.append(gen)
    return found


class Stream:
    """Endless, reproducible batches of one task: pass ``epoch`` is read under RNG seeded from (seed, name, epoch)."""

    def __init__(self, name: str, data: Iterable[Any], seed: int) -> None:
        self.name, self.data, self.seed = name, data, seed
        self.epoch, self.position = 0, 0  # the current pass and the batches used from it
        self._iterator: Iterator[Any] | None = None
        self._rng: dict[str, Any] = {}

    def state(self) -> dict[str, int]:
        """Where the stream is: enough to re-create it exactly."""
        return {"epoch": self.epoch, "position": self.position}

    def restore(self, state: Mapping[str, int]) -> None:
        """Continue at a saved position (the pass is re-created lazily and the used batches skipped)."""
        self.epoch, self.position, self._iterator = int(state["epoch"]), int(state["position"]), None

    def _start_pass(self, epoch: int) -> None:
        seed = derived_seed(self.seed, self.name, epoch)
        self._rng = seeded_rng_state(seed)
        with isolated_rng(self._rng):
            for i, gen in enumerate(_loader_generators(self.data)):
                gen.manual_seed(derived_seed(seed, i))
            self._iterator = iter(self.data)
        self.epoch = epoch

    def _fetch(self) -> Any:
        with isolated_rng(self._rng):
            return next(self._iterator)

    def next(self) -> Any:
        """The next batch; a new pass starts when the loader is exhausted."""
        if self._iterator is None:
            self._start_pass(self.epoch)
            for skipped in range(self.position):
                try:
                    self._fetch()
                except StopIteration:
                    raise ValueError(
                        f"tasks[{self.name!r}]: cannot resume, its data gave {skipped} batches in pass {self.epoch} "
                        f"but the checkpoint had used {self.position}"
                    ) from None
        try:
            batch = self._fetch()
        except StopIteration:
            if self.position == 0:
                raise ValueError(f"tasks[{self.name!r}]: the data loader yielded no batch") from None
            self._start_pass(self.epoch + 1)
            self.position = 0
            try:
                batch = self._fetch()
            except StopIteration:
                raise ValueError(
                    f"tasks[{self.name!r}]: the data loader yielded no batch in pass {self.epoch}"
                ) from None
        self.position += 1
        return batch
