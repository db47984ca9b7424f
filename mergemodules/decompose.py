"""Task vectors and batched truncated SVD of all tasks of one layer at once.

Every decomposition runs in float32 (float64 for float64 inputs or when asked) whatever the
checkpoint dtype — fp16/bf16 checkpoints are decomposed in float32 — wide
matrices are decomposed through their transpose, and singular vectors get deterministic signs
(the largest-magnitude entry of each left singular vector is positive).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["Factors", "compute_dtype", "resolve_rank", "truncated_svd"]


class Factors(NamedTuple):
    """Stacked truncated SVD of T matrices: ``A[t] ≈ U[t] @ diag(S[t]) @ V[t].T``."""

    U: Tensor  # (T, out, k)
    S: Tensor  # (T, k)
    V: Tensor  # (T, in, k)


def resolve_rank(rank: int | float | None, shape: tuple[int, int], name: str = "rank") -> int:
    """Number of components kept for a matrix of ``shape``.

    ``None`` keeps all of ``min(out, in)``; a float in (0, 1] is a fraction of it, rounded up
    (CART's k = ⌈γ·min(out, in)⌉); an int is an absolute count. Anything else is an error,
    never a silent clamp.
    """
    full = min(shape)
    if rank is None:
        return full
    if isinstance(rank, bool) or not isinstance(rank, (int, float)):
        raise TypeError(f"{name} must be an int, a float in (0, 1] or None, got {rank!r}")
    if isinstance(rank, float):
        if not 0.0 < rank <= 1.0 or math.isnan(rank):
            raise ValueError(f"{name}={rank!r}: a fractional rank must lie in (0, 1]")
        return max(1, math.ceil(rank * full - 1e-9))
    if rank <= 0:
        raise ValueError(f"{name}={rank!r}: an integer rank must be positive")
    if rank > full:
        raise ValueError(f"{name}={rank!r} exceeds min(out, in)={full} of a {tuple(shape)} matrix")
    return rank


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype merging arithmetic runs in: float32, or float64 for float64 inputs."""
    return torch.promote_types(dtype, torch.float32)


def _fix_signs(U: Tensor, V: Tensor) -> tuple[Tensor, Tensor]:
    """Flip each singular pair so the largest-|·| entry of its left vector is positive."""
    idx = U.abs().argmax(dim=-2, keepdim=True)
    sign = torch.sign(torch.gather(U, -2, idx))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return U * sign, V * sign


def _exact_svd(A: Tensor, k: int) -> Factors:
    U, S, Vh = torch.linalg.svd(A, full_matrices=False)
    return Factors(U[..., :k], S[..., :k], Vh[..., :k, :].mT)


def _randomized_svd(A: Tensor, k: int, oversample: int, power_iters: int, seed: int) -> Factors:
    """Halko–Martinsson–Tropp range finder with subspace iteration, batched over the first dim."""
    m, n = A.shape[-2:]
    p = min(k + oversample, min(m, n))
    gen = torch.Generator(device=A.device).manual_seed(seed)
    omega = torch.randn(*A.shape[:-2], n, p, generator=gen, device=A.device, dtype=A.dtype)
    Q = torch.linalg.qr(A @ omega).Q
    for _ in range(power_iters):
        Q = torch.linalg.qr(A.mT @ Q).Q
        Q = torch.linalg.qr(A @ Q).Q
    # SVD of the tall (n, p) matrix Aᵀ·Q = V·S·Wᵀ, so A ≈ Q·Qᵀ·A = (Q·W)·S·Vᵀ: LAPACK is several
    # times faster on this tall matrix than on the wide Qᵀ·A, for the same factors.
    V, S, Wh = torch.linalg.svd(A.mT @ Q, full_matrices=False)
    return Factors((Q @ Wh.mT)[..., :k], S[..., :k], V[..., :k])


def truncated_svd(
    A: Tensor,
    k: int,
    *,
    method: str = "auto",
    dtype: torch.dtype | None = None,
    oversample: int = 10,
    power_iters: int = 3,
    seed: int = 0,
) -> Factors:
    """Top-``k`` SVD of a batch of matrices ``A`` (T, out, in), all tasks in one call.

    The decomposition runs in ``dtype`` (default: :func:`compute_dtype` of ``A``). ``method`` is
    ``"exact"`` (LAPACK SVD), ``"randomized"`` (Halko et al. 2011, with ``power_iters`` subspace
    iterations; exact to float precision on matrices of rank ≤ k) or ``"auto"`` (randomised when
    k + oversample is at most a quarter of min(out, in)).
    """
    if A.dim() != 3:
        raise ValueError(f"A must have shape (T, out, in), got {tuple(A.shape)}")
    T, m, n = A.shape
    if not 0 <= k <= min(m, n):
        raise ValueError(f"k={k} must lie in [0, min(out, in)={min(m, n)}]")
    if method not in ("auto", "exact", "randomized"):
        raise ValueError(f"method must be 'auto', 'exact' or 'randomized', got {method!r}")
    dtype = dtype or compute_dtype(A.dtype)
    if k == 0:
        return Factors(A.new_zeros(T, m, 0, dtype=dtype), A.new_zeros(T, 0, dtype=dtype), A.new_zeros(T, n, 0, dtype=dtype))
    A = A.to(dtype)
    wide = m < n
    if wide:
        A = A.mT
    if method == "auto":
        method = "randomized" if 4 * (k + oversample) <= min(m, n) else "exact"
    if method == "exact":
        U, S, V = _exact_svd(A, k)
    else:
        U, S, V = _randomized_svd(A, k, oversample, power_iters, seed)
    if wide:
        U, V = V, U
    U, V = _fix_signs(U, V)
    return Factors(U.contiguous(), S.contiguous(), V.contiguous())
