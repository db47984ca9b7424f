"""Task vectors' truncated SVD, all tasks of one layer in one call.

Three solvers (the ``svd`` option of every SVD-based method):

* ``"exact"`` (default): the exact top-k singular triplets, as ``torch.linalg.svd`` gives them, to
  float64 accuracy whatever the checkpoint dtype. Computed per task (tasks side by side on the torch
  threads) through the top-k eigenpairs of the smaller Gram matrix in float64 (``AᵀA = V·diag(σ²)·Vᵀ``
  by LAPACK's ``syevr``, which computes only the k wanted eigenvectors (:mod:`.lapack`), then ``U = A·V·diag(σ)⁻¹``;
  ``torch.linalg.eigh`` on a GPU): its error for the kept subspace is
  ε₆₄·σ₁²/(σ_k² − σ_{k+1}²), far below float32 rounding. Where the smallest kept singular value is under 1e-4·σ₁ the left vectors
  A·v/σ would lose accuracy (≈ ε₆₄·(σ₁/σ_k)²), and that matrix goes to LAPACK's SVD in float64.
* ``"randomized"``: Halko–Martinsson–Tropp range finder with subspace iterations (options
  ``oversample``, ``power_iters``, ``seed``). Approximate: on the flat spectra of real task vectors
  its top-k is a rotated subspace (see docs/methods.md); exact only for matrices of rank ≤ k.
* ``"auto"``: ``"randomized"`` where k + oversample is at most a quarter of min(out, in), else
  ``"exact"`` (the library's default before issue #11; approximate for the same reason).

Factors come back in float32 (float64 for float64 inputs) whatever the checkpoint dtype; wide
matrices are decomposed through their transpose, and singular vectors get deterministic signs
(the largest-magnitude entry of each left singular vector is positive).
"""
from __future__ import annotations

import functools
import math
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Mapping, NamedTuple

import torch
from threadpoolctl import ThreadpoolController
from torch import Tensor

from .lapack import top_eigenpairs

__all__ = ["Factors", "SVD_SOLVERS", "check_svd", "compute_dtype", "resolve_rank", "truncated_svd"]

SVD_SOLVERS = ("exact", "randomized", "auto")
_SOLVER_OPTIONS = {"exact": (), "randomized": ("oversample", "power_iters", "seed"), "auto": ("oversample", "power_iters", "seed")}
_GRAM_MIN_RATIO = 1e-4  # σ_k/σ₁ below this: the eigenvalue route's left vectors A·v/σ lose accuracy


class Factors(NamedTuple):
    """Stacked truncated SVD of T matrices: ``A[t] ≈ U[t] @ diag(S[t]) @ V[t].T``."""

    U: Tensor  # (T, out, k)
    S: Tensor  # (T, k)
    V: Tensor  # (T, in, k)


def resolve_rank(rank: int | float | None, shape: tuple[int, int], name: str = "rank", minimum: int = 1) -> int:
    """Number of components kept for a matrix of ``shape``.

    ``None`` keeps all of r = min(out, in); a float γ in (0, 1] keeps ``max(minimum, int(γ·r))``
    components, rounded down as the CART and AdaRank code does (``int(rank_ratio * dim)``; CART keeps
    at least one component, AdaRank's initial mask count may be 0: ``minimum=0``); an int is an
    absolute count. Anything else is an error, never a silent clamp.
    """
    full = min(shape)
    if rank is None:
        return full
    if isinstance(rank, bool) or not isinstance(rank, (int, float)):
        raise TypeError(f"{name} must be an int, a float in (0, 1] or None, got {rank!r}")
    if isinstance(rank, float):
        if not 0.0 < rank <= 1.0 or math.isnan(rank):
            raise ValueError(f"{name}={rank!r}: a fractional rank must lie in (0, 1]")
        return max(minimum, int(rank * full))
    if rank <= 0:
        raise ValueError(f"{name}={rank!r}: an integer rank must be positive")
    if rank > full:
        raise ValueError(f"{name}={rank!r} exceeds min(out, in)={full} of a {tuple(shape)} matrix")
    return rank


def check_svd(svd: str, options: Mapping[str, Any] | None) -> None:
    """Refuse an unknown solver or an option that the solver does not take, naming it."""
    if svd not in SVD_SOLVERS:
        raise ValueError(f"svd={svd!r}: expected one of {SVD_SOLVERS}")
    if options is None:
        return
    if not isinstance(options, Mapping):
        raise TypeError(f"svd_options must be a mapping of solver options, got {options!r}")
    unknown = sorted(set(options) - set(_SOLVER_OPTIONS[svd]))
    if unknown:
        raise ValueError(f"svd_options {unknown} are not options of svd={svd!r}; it takes {list(_SOLVER_OPTIONS[svd])}")
    for name in ("oversample", "power_iters", "seed"):
        value = options.get(name, 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"svd_options[{name!r}]={value!r} must be a non-negative integer")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype merging arithmetic runs in: float32, or float64 for float64 inputs."""
    return torch.promote_types(dtype, torch.float32)


def _fix_signs(U: Tensor, V: Tensor) -> tuple[Tensor, Tensor]:
    """Flip each singular pair so the largest-|·| entry of its left vector is positive."""
    idx = U.abs().argmax(dim=-2, keepdim=True)
    sign = torch.sign(torch.gather(U, -2, idx))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return U * sign, V * sign


def _top_eigenpairs(G: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k largest eigenvalues (descending) and eigenvectors of the symmetric float64 matrix G.

    On the CPU LAPACK's ``syevr`` computes only those k (:mod:`mergemodules.lapack`, without the GIL, so
    tasks on threads run side by side): the tridiagonal reduction, then k eigenvectors by MRRR and k
    back-transformations instead of n; elsewhere ``torch.linalg.eigh``.
    """
    if G.device.type != "cpu":
        eigenvalues, eigenvectors = torch.linalg.eigh(G)  # ascending
        return eigenvalues.flip(-1)[:k], eigenvectors.flip(-1)[:, :k]
    eigenvalues, eigenvectors = top_eigenpairs(G.numpy(), k)
    return torch.from_numpy(eigenvalues[::-1].copy()), torch.from_numpy(eigenvectors[:, ::-1].copy())


def _matmul(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b``; on the CPU by numpy's BLAS, which keeps to :func:`_each_task`'s one thread per task."""
    return torch.from_numpy(a.numpy() @ b.numpy()) if a.device.type == "cpu" else a @ b


def _exact_svd(A: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Exact top-k of one tall matrix (m, n), m ≥ n, in float64: eigenpairs of AᵀA, LAPACK's SVD where σ_k < 1e-4·σ₁."""
    A = A.to(torch.float64, memory_format=torch.contiguous_format)  # one copy, also of a transposed wide matrix
    eigenvalues, V = _top_eigenpairs(_matmul(A.mT, A), k)
    S = eigenvalues.clamp(min=0).sqrt()
    if S[-1] > 0 and S[-1] >= _GRAM_MIN_RATIO * S[0]:  # False for a zero matrix (σ = 0) and NaN too
        return _matmul(A, V) / S, S, V
    U, S, Vh = torch.linalg.svd(A, full_matrices=False)
    return U[:, :k], S[:k], Vh[:k].mT


@functools.cache
def _blas_threads() -> ThreadpoolController:
    """The loaded BLAS libraries (numpy's, scipy's), inspected once: limiting them is then a cheap call."""
    return ThreadpoolController()


def _each_task(A: Tensor, k: int) -> list[tuple[Tensor, Tensor, Tensor]]:
    """:func:`_exact_svd` of every ``A[t]``; on the CPU tasks run side by side on ``torch.get_num_threads()``
    threads, LAPACK on one thread each (the tridiagonal reduction gains little from more)."""
    threads = torch.get_num_threads()
    workers = min(A.shape[0], threads) if A.device.type == "cpu" else 1
    with _blas_threads().limit(limits=1 if workers > 1 else threads, user_api="blas"):
        if workers == 1:
            return [_exact_svd(a, k) for a in A]
        with ThreadPoolExecutor(workers) as pool:
            return list(pool.map(lambda a: _exact_svd(a, k), A))


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
    method: str = "exact",
    dtype: torch.dtype | None = None,
    oversample: int = 10,
    power_iters: int = 3,
    seed: int = 0,
) -> Factors:
    """Top-``k`` SVD of a batch of matrices ``A`` (T, out, in), all tasks in one call.

    ``method`` is a solver of :data:`SVD_SOLVERS` (module docstring): ``"exact"`` (default),
    ``"randomized"`` (``oversample``, ``power_iters`` and ``seed`` apply) or ``"auto"``. The factors
    come back in ``dtype`` (default: :func:`compute_dtype` of ``A``).
    """
    if A.dim() != 3:
        raise ValueError(f"A must have shape (T, out, in), got {tuple(A.shape)}")
    T, m, n = A.shape
    if not 0 <= k <= min(m, n):
        raise ValueError(f"k={k} must lie in [0, min(out, in)={min(m, n)}]")
    check_svd(method, None)
    dtype = dtype or compute_dtype(A.dtype)
    if k == 0:
        return Factors(A.new_zeros(T, m, 0, dtype=dtype), A.new_zeros(T, 0, dtype=dtype), A.new_zeros(T, n, 0, dtype=dtype))
    wide = m < n
    if wide:
        A = A.mT
    if method == "auto":
        method = "randomized" if 4 * (k + oversample) <= min(m, n) else "exact"
    if method == "exact":  # float64 temporaries of as many matrices as threads run side by side
        rows, cols = A.shape[1:]
        U, S, V = (A.new_empty(T, rows, k, dtype=dtype), A.new_empty(T, k, dtype=dtype),
                   A.new_empty(T, cols, k, dtype=dtype))
        for t, (u, s, v) in enumerate(_each_task(A, k)):
            U[t], S[t], V[t] = u, s, v
    else:
        U, S, V = _randomized_svd(A.to(dtype), k, oversample, power_iters, seed)
    if wide:
        U, V = V, U
    U, V = _fix_signs(U, V)
    return Factors(U.contiguous(), S.contiguous(), V.contiguous())
