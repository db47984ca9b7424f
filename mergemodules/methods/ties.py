"""TIES-Merging (Yadav et al., 2023): trim, elect sign, disjoint mean."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .base import TaskVectorSource, Transform

__all__ = ["Ties"]

_BUCKET_BITS = 16
_NUM_BUCKETS = 2**_BUCKET_BITS
_CHUNK = 2**18  # entries merged at a time by Ties.vectors


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
    """Keep each task's top-``density`` entries by magnitude (over all merged tensors of the model),
    elect per entry the sign of the summed trimmed values, and average the entries that agree.

    The result is one merged task vector τ_m (one term), used as θ = θ₀ + λ·τ_m.
    """

    density: float = 0.2
    thresholds: tuple[float, ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        if not 0.0 < self.density <= 1.0:
            raise ValueError(f"density={self.density!r} must lie in (0, 1]")

    def fit(self, source: TaskVectorSource) -> "Ties":
        """Find each task's global magnitude threshold (its ⌈density·N⌉-th largest |τ| entry), exactly.

        Streams the task vectors twice instead of holding all |τ| (T model sizes): pass 1 counts the
        magnitudes per bucket of their top bits (monotone in the value), pass 2 keeps only the bucket
        that holds the threshold and selects it there.
        """
        counts: Tensor | None = None
        for _, task_vectors, _ in source():
            buckets = _buckets(_magnitudes(task_vectors))
            if counts is None:
                counts = torch.zeros(buckets.shape[0], _NUM_BUCKETS, dtype=torch.int64)
            for t, bucket in enumerate(buckets):
                counts[t] += torch.bincount(bucket.flatten(), minlength=_NUM_BUCKETS).cpu()
        if counts is None:
            raise ValueError("TIES needs at least one merged tensor")
        keep = [max(1, int(round(self.density * int(c.sum())))) for c in counts]
        from_top = counts.flip(1).cumsum(1)  # entries at or above each bucket, highest bucket first
        target = [_NUM_BUCKETS - 1 - int(torch.searchsorted(from_top[t], keep[t])) for t in range(len(keep))]
        above = [int(from_top[t, _NUM_BUCKETS - 2 - b]) if b < _NUM_BUCKETS - 1 else 0 for t, b in enumerate(target)]
        candidates: list[list[Tensor]] = [[] for _ in keep]
        for _, task_vectors, _ in source():
            magnitudes = _magnitudes(task_vectors)
            for t, bucket in enumerate(_buckets(magnitudes)):
                candidates[t].append(magnitudes[t][bucket == target[t]])
        thresholds = []
        for t, values in enumerate(candidates):
            inside = torch.cat(values)
            thresholds.append(float(torch.topk(inside, keep[t] - above[t], sorted=False).values.min()))
        return Ties(density=self.density, thresholds=tuple(thresholds))

    def vectors(self, name: str, task_vectors: Tensor, is_matrix: bool) -> Tensor:
        """The disjoint mean of the trimmed, sign-elected task vectors, shape (1, *shape).

        Every entry is merged independently, so the work runs over chunks of ``_CHUNK`` entries:
        the temporaries are T chunks, not T copies of the tensor.
        """
        if len(self.thresholds) != task_vectors.shape[0]:
            raise RuntimeError("Ties.vectors needs the thresholds computed by Ties.fit")
        thresholds = torch.tensor(self.thresholds, dtype=task_vectors.dtype, device=task_vectors.device)[:, None]
        flat = task_vectors.reshape(task_vectors.shape[0], -1)
        merged = torch.cat([_disjoint_mean(chunk, thresholds) for chunk in flat.split(_CHUNK, dim=1)], dim=0)
        return merged.view(1, *task_vectors.shape[1:])


def _disjoint_mean(task_vectors: Tensor, thresholds: Tensor) -> Tensor:
    """TIES on (T, n) entries: trim below each task's threshold, elect the sign of the sum, average the agreeing."""
    trimmed = torch.where(task_vectors.abs() >= thresholds, task_vectors, torch.zeros_like(task_vectors))
    elected = torch.sign(trimmed.sum(dim=0))
    agree = (torch.sign(trimmed) == elected) & (trimmed != 0)
    total = (trimmed * agree).sum(dim=0)
    count = agree.sum(dim=0).clamp(min=1)
    return total / count
