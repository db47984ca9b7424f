"""TIES-Merging (Yadav et al., 2023): trim, elect sign, disjoint mean (docs/methods.md)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import torch
from torch import Tensor

from .base import TaskVectorProvider, Transform

__all__ = ["Ties", "ChunkedTrim"]

_BUCKET_BITS = 16
_NUM_BUCKETS = 2**_BUCKET_BITS
_CHUNK = 2**20  # entries merged at a time by Ties.vectors: T·4 MiB temporaries (2^18 cost 1.4x on 2 cores)
SCOPES = ("model", "tensor")


def _magnitudes(task_vectors: Tensor) -> Tensor:
    """|τ| as float32 or float64 (exact for half-precision inputs)."""
    magnitudes = task_vectors.abs()
    return magnitudes if magnitudes.dtype in (torch.float32, torch.float64) else magnitudes.float()


def _buckets(magnitudes: Tensor) -> Tensor:
    """The top bits below the sign of each magnitude's bit pattern: for non-negative floats, ordered as the values."""
    bits, width = (torch.int32, 32) if magnitudes.dtype == torch.float32 else (torch.int64, 64)
    return magnitudes.view(bits) >> (width - 1 - _BUCKET_BITS)


@dataclass(frozen=True)
class Ties(Transform):
    """Trim each task vector to its largest-magnitude entries, elect a sign per entry, average the agreeing.

    ``scope="model"`` (default, the authors' code prateeky2806/ties-merging and FusionBench): each task
    keeps its ``int(density·N) + 1`` largest |τ| entries over all N merged entries of the model (their
    ``kthvalue(N − int(density·N))`` threshold with ``>=``: every entry tied with the threshold is
    kept; ``density=1`` keeps all); the elected sign is that of the summed trimmed values, and where
    that sum is exactly 0 the global majority sign, sign(Σ over all entries of the elected signs).

    ``scope="tensor"`` (mergekit's ``ties``): each task keeps exactly ``int(density·n)`` entries of
    each tensor of n entries (at a tie with the threshold, the first in row-major order), and the
    elected sign is + where the summed trimmed values are ≥ 0.

    Either way the merged task vector τ_m is the mean of the trimmed entries whose sign is the
    elected one (0 where none is), one term used as θ = θ₀ + λ·τ_m.
    """

    density: float = 0.2
    scope: str = "model"
    thresholds: tuple[float, ...] = field(default=(), repr=False, metadata={"fitted": True})
    majority: float = field(default=0.0, repr=False, metadata={"fitted": True})

    def __post_init__(self) -> None:
        if isinstance(self.density, bool) or not isinstance(self.density, (int, float)) or not 0.0 < self.density <= 1.0:
            raise ValueError(f"density={self.density!r} must lie in (0, 1]")
        if self.scope not in SCOPES:
            raise ValueError(f"scope={self.scope!r}: expected one of {SCOPES}")

    def stored_terms(self, tasks: int) -> int:
        """One term per tensor: the disjoint mean of all tasks."""
        return 1

    def _kept(self, total: int) -> int:
        """Entries kept per task over the model: the reference's int(density·N) + 1 (all at density 1)."""
        return total if self.density == 1.0 else int(self.density * total) + 1

    def fit(self, provider: TaskVectorProvider) -> "Ties":
        """``scope="model"``: each task's global magnitude threshold and the global majority sign, exactly.

        Streams the task vectors three times instead of holding all |τ| (T model sizes): pass 1 counts
        the magnitudes per bucket of their top bits (monotone in the value), pass 2 keeps only the
        bucket that holds the threshold and selects it there, pass 3 sums the elected signs.
        """
        if self.scope == "tensor":
            return self
        def vectors() -> Iterator[Tensor]:
            return (task_vectors for _, task_vectors, _ in provider())

        counts = _bucket_counts(vectors)
        keep = [self._kept(int(c.sum())) for c in counts]
        thresholds = [float(threshold) for threshold in _kth_largest(vectors, counts, keep)[0]]
        fitted = dataclasses.replace(self, thresholds=tuple(thresholds))
        signs = 0
        for _, task_vectors, _ in provider():
            for chunk, kept in fitted._chunks(task_vectors):
                signs += int(torch.sign(torch.where(kept, chunk, 0).sum(dim=0)).sum())
        return dataclasses.replace(fitted, majority=float((signs > 0) - (signs < 0)))

    def _chunks(self, task_vectors: Tensor) -> Iterator[tuple[Tensor, Tensor]]:
        """(values, kept) over chunks of ``_CHUNK`` entries of the flattened (T, n) task vectors."""
        flat = task_vectors.reshape(task_vectors.shape[0], -1)
        if self.scope == "tensor":
            kept = _top_entries(flat, int(self.density * flat.shape[1]))
            yield from zip(flat.split(_CHUNK, dim=1), kept.split(_CHUNK, dim=1))
            return
        if len(self.thresholds) != flat.shape[0]:
            raise RuntimeError("Ties.vectors needs the thresholds computed by Ties.fit")
        thresholds = torch.tensor(self.thresholds, dtype=flat.dtype, device=flat.device)[:, None]
        for chunk in flat.split(_CHUNK, dim=1):
            yield chunk, chunk.abs() >= thresholds

    def vectors(self, name: str, task_vectors: Tensor, is_matrix: bool) -> Tensor:
        """The disjoint mean of the trimmed, sign-elected task vectors, shape (1, *shape).

        Every entry is merged independently, so the work runs over chunks of ``_CHUNK`` entries:
        the temporaries are T chunks, not T copies of the tensor.
        """
        zero_sign = self.majority if self.scope == "model" else 1.0
        merged = task_vectors.new_empty(task_vectors[0].numel())
        for (chunk, kept), out in zip(self._chunks(task_vectors), merged.split(_CHUNK)):
            out.copy_(_disjoint_mean(chunk, kept, zero_sign))
        return merged.view(1, *task_vectors.shape[1:])


class ChunkedTrim:
    """The per-tensor trim of :func:`_top_entries` (each task keeps exactly its ``k`` largest |τ| entries, the first
    in order at a tie with the k-th) for a tensor seen chunk by chunk, never whole.

    ``chunks()`` yields the (T, c) task-vector chunks in order, each call from the start. Two passes find each
    task's k-th largest |τ| exactly: pass 1 counts the magnitudes per bucket of their top bits (monotone in the
    value), pass 2 selects inside the one bucket that holds the k-th. Then :meth:`kept` gives the mask of each chunk
    in turn, keeping the entries tied with the k-th by a running count.
    """

    def __init__(self, chunks: Callable[[], Iterable[Tensor]], k: int) -> None:
        counts = _bucket_counts(chunks)
        T, n = counts.shape[0], int(counts[0].sum())
        self.seen = torch.zeros(T, dtype=torch.int64)  # entries tied with the k-th passed so far, per task
        if not 0 < k < n:  # all or nothing kept: no threshold to find
            self.thresholds = torch.full((T, 1), -1.0 if k >= n else float("inf"))
            self.tied_kept = torch.zeros(T, dtype=torch.int64)
            return
        thresholds, greater = _kth_largest(chunks, counts, [k] * T)
        self.thresholds = thresholds.view(T, 1)
        self.tied_kept = torch.tensor([k - g for g in greater], dtype=torch.int64)

    def vectors(self, chunk: Tensor) -> Tensor:
        """The (1, c) disjoint mean of the next chunk's trimmed task vectors: :meth:`Ties.vectors` on it."""
        return _disjoint_mean(chunk, self.kept(chunk), 1.0).view(1, -1)

    def kept(self, chunk: Tensor) -> Tensor:
        """The mask of the next chunk (the chunks of ``chunks()`` in their order, once each)."""
        magnitudes = _magnitudes(chunk)
        thresholds = self.thresholds.to(magnitudes.device, magnitudes.dtype)
        kept = magnitudes >= thresholds
        tied = (magnitudes == thresholds).sum(dim=1).cpu()
        for t in (self.seen + tied > self.tied_kept).nonzero().flatten().tolist():  # more tied than kept: usually none
            positions = (magnitudes[t] == thresholds[t]).nonzero().flatten()
            kept[t, positions[max(int(self.tied_kept[t] - self.seen[t]), 0):]] = False  # the first ones stay
        self.seen += tied
        return kept


def _bucket_counts(chunks: Callable[[], Iterable[Tensor]]) -> Tensor:
    """(T, buckets): how many |τ| of each task fall in each bucket (:func:`_buckets`) over the (T, ...) task-vector
    chunks of ``chunks()``."""
    counts: Tensor | None = None
    for chunk in chunks():
        buckets = _buckets(_magnitudes(chunk)).reshape(chunk.shape[0], -1)  # a fresh tensor: shifted in place
        buckets += torch.arange(buckets.shape[0], dtype=buckets.dtype, device=buckets.device)[:, None] * _NUM_BUCKETS
        found = torch.bincount(buckets.flatten(), minlength=buckets.shape[0] * _NUM_BUCKETS).cpu()  # all tasks at once
        counts = found if counts is None else counts + found
    if counts is None:
        raise ValueError("TIES needs at least one merged tensor")
    return counts.view(-1, _NUM_BUCKETS)


def _kth_largest(
    chunks: Callable[[], Iterable[Tensor]], counts: Tensor, keep: list[int]
) -> tuple[Tensor, list[int]]:
    """Per task t, the ``keep[t]``-th largest |τ_t| over the chunks of ``chunks()`` (1 ≤ keep[t] ≤ its entries),
    exactly, and how many entries exceed it: ``counts`` (:func:`_bucket_counts`) gives the bucket that holds it, one
    more pass keeps only that bucket's entries, and the select runs there."""
    T = counts.shape[0]
    from_top = counts.flip(1).cumsum(1)  # entries at or above each bucket, highest bucket first
    target = [_NUM_BUCKETS - 1 - int(torch.searchsorted(from_top[t], keep[t])) for t in range(T)]
    above = [int(from_top[t, _NUM_BUCKETS - 2 - b]) if b < _NUM_BUCKETS - 1 else 0 for t, b in enumerate(target)]
    candidates: list[list[Tensor]] = [[] for _ in range(T)]
    for chunk in chunks():
        magnitudes = _magnitudes(chunk).reshape(T, -1)
        inside = _buckets(magnitudes) == torch.tensor(target, device=magnitudes.device)[:, None]
        for t, values in enumerate(magnitudes[inside].split(inside.sum(dim=1).tolist())):
            candidates[t].append(values)
    thresholds, greater = [], []
    for t, values in enumerate(candidates):
        inside = torch.cat(values)
        threshold = inside.kthvalue(len(inside) - (keep[t] - above[t]) + 1).values  # the keep[t]-th largest
        thresholds.append(threshold)
        greater.append(above[t] + int((inside > threshold).sum()))
    return torch.stack(thresholds), greater


def _top_entries(flat: Tensor, k: int) -> Tensor:
    """Per row of (T, n), exactly its ``k`` largest |·| entries; at a tie with the k-th, the first in order.

    The magnitudes of as many tasks as torch has threads are held at a time (not all T): they are the peak memory
    of a per-tensor TIES merge.
    """
    T, n = flat.shape
    if k >= n:
        return torch.ones_like(flat, dtype=torch.bool)
    if k <= 0:
        return torch.zeros_like(flat, dtype=torch.bool)
    kept = torch.empty_like(flat, dtype=torch.bool)
    at_once = max(torch.get_num_threads(), 1)  # tasks whose |τ| are held together: a task per thread
    for first in range(0, T, at_once):
        rows = slice(first, first + at_once)
        magnitudes = _magnitudes(flat[rows])
        threshold = magnitudes.kthvalue(n - k + 1, dim=1, keepdim=True).values  # the k-th largest (topk: more memory)
        torch.ge(magnitudes, threshold, out=kept[rows])
        extra = kept[rows].sum(dim=1) - k  # entries tied with the k-th beyond it: usually none
        for t in extra.nonzero().flatten().tolist():
            tied = (magnitudes[t] == threshold[t]).nonzero().flatten()
            kept[first + t, tied[len(tied) - int(extra[t]):]] = False
    return kept


def _disjoint_mean(task_vectors: Tensor, kept: Tensor, zero_sign: float) -> Tensor:
    """TIES on (T, n) entries: keep the ``kept`` ones, elect the sign of their sum (``zero_sign`` where it
    is 0), average those that have the elected sign. As the reference's ``where(sign > 0, τ > 0, τ < 0)``,
    an elected sign of 0 (only when ``zero_sign`` is 0) selects the negative entries."""
    trimmed = torch.where(kept, task_vectors, 0.0)
    elected = trimmed.sum(dim=0).sign_()
    if zero_sign != 0:
        elected = torch.where(elected == 0, zero_sign, elected)
    agree = torch.where(elected > 0, trimmed > 0, trimmed < 0)
    count = agree.sum(dim=0).clamp_(min=1)
    return trimmed.mul_(agree).sum(dim=0).div_(count)
