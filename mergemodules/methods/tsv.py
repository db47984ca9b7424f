"""TSV-M (Gargiulo et al., 2025): per-task low-rank task vectors with jointly orthogonalised bases."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from einops import rearrange
from torch import Tensor

from ..decompose import Factors, truncated_svd
from .base import Transform

__all__ = ["TaskSingularVectors", "orthogonalize"]


def orthogonalize(X: Tensor) -> Tensor:
    """The nearest matrix with orthonormal columns (orthogonal Procrustes): ``P·Qᵀ`` for ``X = P·S·Qᵀ``."""
    P, _, Qh = torch.linalg.svd(X, full_matrices=False)
    return P @ Qh


@dataclass(frozen=True)
class TaskSingularVectors(Transform):
    """TSV-M (docs/methods.md): each task keeps its top ``int(k·(1/T))`` singular components of the
    ``k = min(out, in)`` (the method's rank split evenly between tasks, rounded down in floating point
    as the authors' code: 0 where k < T, which leaves that matrix at θ₀); the concatenated left and right
    singular vectors of all tasks are each replaced by their nearest orthonormal matrix (Procrustes),
    removing the interference between tasks' subspaces. Non-matrix tensors are averaged (τ_t/T), so that
    θ = θ₀ + α·Σ_t(...) with α = λ = 1 is the TSV-M merge.
    """

    def vectors(self, name: str, task_vectors: Tensor, is_matrix: bool) -> Tensor:
        """Matrices pass through to ``factorize``; other tensors become τ_t / T."""
        return task_vectors if is_matrix else task_vectors / task_vectors.shape[0]

    def stored_rank(self, rank: int, tasks: int) -> int:
        """``int(rank·(1/T))`` components per task, in floating point as the authors' code (0 where rank < T)."""
        return int(rank * (1.0 / tasks))

    def factorize(self, terms: Tensor, k: int, svd: str = "exact", svd_options: Mapping[str, Any] | None = None) -> Factors:
        """Per-task top-``int(k·(1/T))`` SVD, then orthogonalise the stacked U and V of all tasks."""
        T = terms.shape[0]
        per_task = self.stored_rank(k, T)
        U, S, V = truncated_svd(terms, per_task, method=svd, **(svd_options or {}))
        if per_task == 0:
            return Factors(U, S, V)
        U_perp = orthogonalize(rearrange(U, "t out k -> out (t k)"))  # every task's components side by side
        V_perp = orthogonalize(rearrange(V, "t inp k -> inp (t k)"))
        return Factors(rearrange(U_perp, "out (t k) -> t out k", t=T).contiguous(), S,
                       rearrange(V_perp, "inp (t k) -> t inp k", t=T).contiguous())
