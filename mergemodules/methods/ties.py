"""TIES-Merging (Yadav et al., 2023): trim, elect sign, disjoint mean."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .base import TaskVectorSource, Transform

__all__ = ["Ties"]


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
        """Find each task's global magnitude threshold (its ⌈density·N⌉-th largest |τ| entry)."""
        magnitudes: list[list[Tensor]] = []
        for _, task_vectors, _ in source():
            if not magnitudes:
                magnitudes = [[] for _ in range(task_vectors.shape[0])]
            for t, tv in enumerate(task_vectors):
                magnitudes[t].append(tv.abs().flatten())
        thresholds = []
        for values in magnitudes:
            flat = torch.cat(values)
            values.clear()
            keep = max(1, int(round(self.density * flat.numel())))
            thresholds.append(float(torch.topk(flat, keep, sorted=False).values.min()))
        return Ties(density=self.density, thresholds=tuple(thresholds))

    def vectors(self, name: str, task_vectors: Tensor, is_matrix: bool) -> Tensor:
        """The disjoint mean of the trimmed, sign-elected task vectors, shape (1, *shape)."""
        if len(self.thresholds) != task_vectors.shape[0]:
            raise RuntimeError("Ties.vectors needs the thresholds computed by Ties.fit")
        shape = (-1,) + (1,) * (task_vectors.dim() - 1)
        thresholds = torch.tensor(self.thresholds, dtype=task_vectors.dtype).view(shape)
        trimmed = torch.where(task_vectors.abs() >= thresholds, task_vectors, torch.zeros_like(task_vectors))
        elected = torch.sign(trimmed.sum(dim=0))
        agree = (torch.sign(trimmed) == elected) & (trimmed != 0)
        total = (trimmed * agree).sum(dim=0)
        count = agree.sum(dim=0).clamp(min=1)
        return (total / count).unsqueeze(0)
