"""AWD, Adaptive Weight Disentanglement (Xiong et al., 2025; ``papers/003``, §3.3, Algorithm 1).

A redundant vector δ, initialised to zero, is learned so that the disentangled task vectors
τ̂_i = τ_i − δ are as orthogonal as possible while δ stays small (Eqs. 11–14):

    L(δ) = 1/(K(K−1)) · Σ_{i≠j} |cos(τ_i − δ, τ_j − δ)| + α·‖δ‖₂

The cosine is global: over the whole flattened task vector of the tensors in scope, not per layer.
Every method then uses τ̂_i in place of τ_i: Task Arithmetic (AWD-TA, θ = θ₀ + λ·Σ_i τ̂_i) and
layer-wise AdaMerging (AWD-AdaMerging), and through ``inner`` or ``Method.transform`` any other
method that takes task vectors (CART, AdaRank, TIES, TSV-M; untested by the paper, see docs/awd.md).

Memory: the task vectors of the tensors in scope are held once, as they come from the provider (one
(T, n) block per tensor, never concatenated). Each step streams over the blocks twice with
matrix-vector products: ``p_i = Σ_l ⟨τ_il, δ_l⟩`` gives the Gram matrix of the τ̂_i through
G = G₀ − p1ᵀ − 1pᵀ + ‖δ‖² (G₀ = Gram of the τ_i, once, float64); autograd runs on the T×T matrix
only, and ∂L/∂δ_l = −Σ_i c_i τ_il + (Σ_i c_i)·δ_l with c = (A + Aᵀ)·1, A = ∂L_O/∂G. Beyond the task
vectors this costs δ, its gradient and the optimizer's state: 4 floats per parameter in scope (Adam).
"""
from __future__ import annotations

import fnmatch
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..decompose import Factors
from .base import TaskVectorProvider, Transform

__all__ = ["AWD", "FittedAWD", "awd_loss", "awd_gradient", "cosine_matrix", "learn_redundant_vector"]

logger = logging.getLogger(__name__)

OPTIMIZERS = ("adam", "sgd")
SCOPES = ("matrices", "all")


def cosine_matrix(gram: Tensor) -> Tensor:
    """Pairwise cosine similarities from a Gram matrix: G_ij / (‖·_i‖‖·_j‖)."""
    norms = gram.diagonal().sqrt()
    return gram / (norms[:, None] * norms[None, :])


def _off_diagonal(matrix: Tensor) -> Tensor:
    """The entries i ≠ j of a square matrix, flattened."""
    T = matrix.shape[0]
    return matrix[~torch.eye(T, dtype=torch.bool, device=matrix.device)]


def _orthogonality(gram: Tensor) -> Tensor:
    """L_O of Eq. 11: the mean |cos| over ordered pairs i ≠ j."""
    return _off_diagonal(cosine_matrix(gram)).abs().mean()


class _Objective:
    """Eq. 14 over task vectors held as one flattened (T, n_l) block per tensor."""

    def __init__(self, blocks: Sequence[Tensor], alpha: float) -> None:
        self.blocks = list(blocks)
        self.alpha = float(alpha)
        T = self.blocks[0].shape[0]
        self.gram0 = torch.zeros(T, T, dtype=torch.float64, device=self.blocks[0].device)
        for block in self.blocks:
            self.gram0 += (block @ block.T).double()
        zero = (self.gram0.diagonal() == 0).nonzero().flatten().tolist()
        if zero:
            raise ValueError(f"task vector(s) {zero} are zero on the AWD scope: their cosine is undefined")

    def gram(self, deltas: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """Gram matrix of τ_i − δ and ‖δ‖², both float64, streamed over the blocks."""
        p = torch.zeros_like(self.gram0[0])
        squared = torch.zeros((), dtype=torch.float64, device=p.device)
        for block, delta in zip(self.blocks, deltas):
            p += (block @ delta).double()
            squared += torch.dot(delta, delta).double()
        return self.gram0 - p[:, None] - p[None, :] + squared, squared

    def loss(self, deltas: Sequence[Tensor]) -> float:
        """L(δ) of Eq. 14."""
        gram, squared = self.gram(deltas)
        return float(_orthogonality(gram) + self.alpha * squared.sqrt())

    def loss_and_gradient(self, deltas: Sequence[Tensor], grads: Sequence[Tensor]) -> float:
        """L(δ); writes ∂L/∂δ per block into ``grads`` (at δ = 0 the minimum-norm subgradient of α‖δ‖,
        which is 0 when α ≥ ‖∇L_O‖)."""
        gram, squared = self.gram(deltas)
        with torch.enable_grad():
            gram = gram.detach().requires_grad_(True)
            orthogonality = _orthogonality(gram)
            (A,) = torch.autograd.grad(orthogonality, gram)
        c = (A + A.T).sum(dim=1)
        norm = float(squared.sqrt())
        for block, delta, grad in zip(self.blocks, deltas, grads):
            torch.addmv(delta, block.T, c.to(block.dtype), beta=float(c.sum()), alpha=-1.0, out=grad)
            if norm > 0:
                grad.add_(delta, alpha=self.alpha / norm)
        if norm == 0:
            grad_norm = math.sqrt(sum(float(torch.dot(g, g)) for g in grads))
            shrink = max(0.0, 1.0 - self.alpha / grad_norm) if grad_norm > 0 else 0.0
            for grad in grads:
                grad.mul_(shrink)
        return float(orthogonality.detach()) + self.alpha * norm


def _blocks(task_vectors: Sequence[Tensor]) -> list[Tensor]:
    if len(task_vectors) == 0:
        raise ValueError("task_vectors: need at least one tensor of stacked task vectors")
    T = task_vectors[0].shape[0]
    for i, tv in enumerate(task_vectors):
        if tv.dim() < 1 or tv.shape[0] != T:
            raise ValueError(f"task_vectors[{i}] has shape {tuple(tv.shape)}; expected ({T}, ...) like task_vectors[0]")
    if T < 2:
        raise ValueError(f"task_vectors: AWD needs at least two tasks (fine-tuned models), got {T}")
    return [tv.reshape(T, -1) for tv in task_vectors]


def awd_loss(task_vectors: Sequence[Tensor], deltas: Sequence[Tensor], alpha: float) -> float:
    """L(δ) of Eq. 14 for stacked task vectors (T, *shape_l) and redundant vectors (*shape_l) per tensor."""
    blocks = _blocks(task_vectors)
    return _Objective(blocks, alpha).loss([d.reshape(-1) for d in deltas])


def awd_gradient(task_vectors: Sequence[Tensor], deltas: Sequence[Tensor], alpha: float) -> list[Tensor]:
    """∂L/∂δ of Eq. 14, one tensor per δ_l, computed by streaming sums (see the module docstring)."""
    blocks = _blocks(task_vectors)
    grads = [torch.empty_like(block[0]) for block in blocks]
    _Objective(blocks, alpha).loss_and_gradient([d.reshape(-1) for d in deltas], grads)
    return [g.view_as(d) for g, d in zip(grads, deltas)]


def _check_options(alpha: float, steps: int, lr: float, optimizer: str) -> None:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha >= 0 or math.isinf(alpha):
        raise ValueError(f"alpha={alpha!r} must be a finite number ≥ 0")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0:
        raise ValueError(f"steps={steps!r} must be a positive integer")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0 or math.isinf(lr):
        raise ValueError(f"lr={lr!r} must be a finite number > 0")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer={optimizer!r}: expected one of {OPTIMIZERS}")


def learn_redundant_vector(
    task_vectors: Sequence[Tensor],
    alpha: float,
    steps: int,
    lr: float,
    optimizer: str = "adam",
    progress: bool = False,
) -> tuple[list[Tensor], list[float], Tensor, Tensor]:
    """Algorithm 1: minimise Eq. 14 from δ = 0 for ``steps`` steps.

    Args:
        task_vectors: per tensor, the stacked task vectors (T, *shape); held, never copied.
        alpha: α of Eq. 14.
        steps: number of optimizer steps (the paper's N).
        lr: learning rate (the paper's β).
        optimizer: ``"adam"`` or ``"sgd"`` (Algorithm 1's plain gradient step).
        progress: show a progress bar.

    Returns:
        δ per tensor (shaped like one task vector of it), the loss at δ⁰ … δᴺ (N + 1 values), and the
        pairwise cosine matrices of the task vectors before and after (T × T, float64).
    """
    _check_options(alpha, steps, lr, optimizer)
    blocks = _blocks(task_vectors)
    objective = _Objective(blocks, alpha)
    entries = sum(block.shape[1] for block in blocks)
    rms = math.sqrt(float(objective.gram0.trace()) / (entries * len(objective.gram0)))
    logger.info(
        "AWD: %d tensors, %d entries, T = %d, RMS task-vector entry %.3g; %s lr %.3g for %d steps",
        len(blocks), entries, len(objective.gram0), rms, optimizer, lr, steps,
    )
    deltas = [torch.zeros_like(block[0]) for block in blocks]
    for delta in deltas:  # written in place every step
        delta.grad = torch.empty_like(delta)
    # foreach=False: one tensor at a time, so the update needs no temporaries the size of all of δ
    optimizer_class = torch.optim.Adam if optimizer == "adam" else torch.optim.SGD
    opt = optimizer_class(deltas, lr=lr, foreach=False)
    history = []
    bar = tqdm(range(steps), desc="AWD δ", disable=not progress, unit="step")
    for _ in bar:
        loss = objective.loss_and_gradient(deltas, [delta.grad for delta in deltas])
        if not math.isfinite(loss):
            raise RuntimeError(f"AWD loss became {loss} after {len(history)} steps (lr={lr!r} too large?)")
        history.append(loss)
        bar.set_postfix(loss=f"{loss:.5f}", refresh=False)
        opt.step()
    history.append(objective.loss(deltas))
    for delta in deltas:
        delta.grad = None
    before = cosine_matrix(objective.gram0)
    after = cosine_matrix(objective.gram(deltas)[0])
    return [d.view(tv.shape[1:]) for d, tv in zip(deltas, task_vectors)], history, before, after


class _Composed(Transform):
    """A transform that runs ``inner`` on its own task vectors: it stores what ``inner`` stores."""

    inner: Transform

    def stored_terms(self, tasks: int) -> int:
        """``inner``'s terms per tensor."""
        return self.inner.stored_terms(tasks)

    def stored_rank(self, rank: int, tasks: int) -> int:
        """``inner``'s components per term."""
        return self.inner.stored_rank(rank, tasks)


@dataclass(frozen=True)
class AWD(_Composed):
    """Learn the redundant vector δ (Eq. 14) in ``fit``; the fitted transform stores τ_i − δ.

    Attributes:
        alpha: α, weight of ‖δ‖ (the paper tunes it over {1e-2, …, 1e-6}, §7.3; 1e-4 is its middle).
        steps: optimizer steps (the paper's Table 5 uses 1000).
        lr: learning rate β. The paper does not state it; Adam moves each entry of δ by about ``lr``
            per step, so it is in the units of the task vectors' entries (the INFO log prints their
            RMS). 1e-5 is a guess for CLIP fine-tunes, not validated on real checkpoints.
        optimizer: ``"adam"`` (default) or ``"sgd"``, Algorithm 1's plain step δ ← δ − β∇L.
        scope: which tensors δ covers: ``"matrices"`` (every tensor merged as a matrix: Linear
            weights, attention in-projections, projections), ``"all"`` (every merged tensor), or a
            sequence of globs on parameter names that narrows the matrices (the paper's "linear
            weights in the transformer blocks" for open_clip: ``["*resblocks*"]``). Tensors outside
            the scope keep τ_i.
        progress: show a progress bar while learning δ.
        inner: the transform applied to the disentangled task vectors (the identity, or e.g. TIES).
    """

    alpha: float = 1e-4
    steps: int = 1000
    lr: float = 1e-5
    optimizer: str = "adam"
    scope: str | tuple[str, ...] = "matrices"
    progress: bool = False
    inner: Transform = field(default_factory=Transform)

    def __post_init__(self) -> None:
        _check_options(self.alpha, self.steps, self.lr, self.optimizer)
        if isinstance(self.scope, str):
            if self.scope not in SCOPES:
                raise ValueError(f"scope={self.scope!r}: expected one of {SCOPES} or a list of name patterns")
        elif not self.scope or not all(isinstance(p, str) for p in self.scope):
            raise ValueError(f"scope={self.scope!r}: a pattern scope must be a non-empty list of strings")
        else:
            object.__setattr__(self, "scope", tuple(self.scope))
        if not isinstance(self.inner, Transform):
            raise TypeError(f"inner must be a Transform, got {type(self.inner).__name__}")

    def in_scope(self, name: str, is_matrix: bool) -> bool:
        """Whether δ covers the tensor ``name``."""
        if self.scope == "all":
            return True
        if not is_matrix:
            return False
        return self.scope == "matrices" or any(fnmatch.fnmatchcase(name, p) for p in self.scope)

    def fit(self, provider: TaskVectorProvider) -> "FittedAWD":
        """Learn δ on the task vectors in scope (Algorithm 1), then fit ``inner`` on τ_i − δ."""
        names, task_vectors = [], []
        for name, tv, is_matrix in provider():
            if self.in_scope(name, is_matrix):
                names.append(name)
                task_vectors.append(tv.detach())
        if not names:
            raise ValueError(f"scope={self.scope!r} selects no merged tensor")
        deltas, history, before, after = learn_redundant_vector(
            task_vectors, self.alpha, self.steps, self.lr, self.optimizer, self.progress
        )
        task_vectors.clear()
        deltas_by_name = dict(zip(names, deltas))
        inner = self.inner.fit(lambda: ((n, _subtract(deltas_by_name, n, tv), m) for n, tv, m in provider()))
        fitted = FittedAWD(
            deltas=deltas_by_name, inner=inner, loss_history=tuple(history), cosine_before=before, cosine_after=after,
            delta_norm=math.sqrt(sum(float(torch.dot(d.flatten(), d.flatten())) for d in deltas)),
        )
        logger.info(
            "AWD: mean |cos| %.4f -> %.4f, ||delta|| = %.4g over %d tensors, loss %.5f -> %.5f in %d steps",
            fitted.mean_abs_cosine_before, fitted.mean_abs_cosine_after, fitted.delta_norm, len(names),
            history[0], history[-1], self.steps,
        )
        return fitted

    def vectors(self, name: str, task_vectors: Tensor, is_matrix: bool) -> Tensor:
        """Unavailable before ``fit``: δ is not learned yet."""
        raise RuntimeError("AWD.vectors needs the redundant vector learned by AWD.fit")


def _subtract(deltas: dict[str, Tensor], name: str, task_vectors: Tensor) -> Tensor:
    delta = deltas.get(name)
    if delta is None:
        return task_vectors
    if tuple(delta.shape) != tuple(task_vectors.shape[1:]):
        raise ValueError(f"{name!r}: task vectors of shape {tuple(task_vectors.shape[1:])}, δ of {tuple(delta.shape)}")
    return task_vectors - delta.to(task_vectors.dtype)


@dataclass(frozen=True, eq=False)
class FittedAWD(_Composed):
    """AWD after ``fit``: stores τ_i − δ (then ``inner``'s terms) and keeps the diagnostics.

    Attributes:
        deltas: δ per tensor in scope, in the parameter's layout.
        inner: the fitted inner transform.
        loss_history: L(δ) at δ⁰ (the original task vectors) … δᴺ.
        cosine_before: pairwise cosine similarities of the τ_i over the scope (T × T).
        cosine_after: the same for τ_i − δ.
        delta_norm: ‖δ‖₂ over the scope.
    """

    deltas: dict[str, Tensor]
    inner: Transform
    loss_history: tuple[float, ...]
    cosine_before: Tensor
    cosine_after: Tensor
    delta_norm: float

    @property
    def mean_abs_cosine_before(self) -> float:
        """Mean |cos| over pairs i ≠ j of the original task vectors (L_O at δ = 0)."""
        return float(_off_diagonal(self.cosine_before).abs().mean())

    @property
    def mean_abs_cosine_after(self) -> float:
        """Mean |cos| over pairs i ≠ j of the disentangled task vectors."""
        return float(_off_diagonal(self.cosine_after).abs().mean())

    def vectors(self, name: str, task_vectors: Tensor, is_matrix: bool) -> Tensor:
        """``inner``'s terms of τ_i − δ (τ_i where the tensor is outside the scope)."""
        return self.inner.vectors(name, _subtract(self.deltas, name, task_vectors), is_matrix)

    def factorize(self, terms: Tensor, k: int, svd: str = "exact", svd_options: Mapping[str, Any] | None = None) -> Factors:
        """``inner``'s factorisation."""
        return self.inner.factorize(terms, k, svd, svd_options)
