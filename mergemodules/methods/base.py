"""A merging method as a declarative description: which base, which task term, which learnables."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping

from torch import Tensor

from ..decompose import Factors, check_svd, truncated_svd
from ..layers import check_coef_range
from ..targets import MATRIX_SETS

__all__ = ["Method", "Transform", "TaskVectorProvider", "UnknownMethodError"]

BASES = ("pretrained", "average")
MATRIX_TERMS = ("none", "dense", "svd")
COEFFICIENT_SCOPES = ("global", "task", "layer")

# What Transform.fit is given: a callable yielding (parameter name, stacked task vectors (T, *shape), is_matrix).
TaskVectorProvider = Callable[[], Iterator[tuple[str, Tensor, bool]]]


class UnknownMethodError(KeyError):
    """Raised for a method name that is not registered."""

    def __str__(self) -> str:  # KeyError quotes its message; show it plainly
        return str(self.args[0])


class Transform:
    """How a method turns task vectors into stored task terms. The default keeps them as they are.

    ``fit`` sees every task vector once before anything is built (TIES's magnitude thresholds,
    AWD's redundant vector) and returns the transform to use; ``vectors`` maps one tensor's
    stacked task vectors (T, *shape) to its stored terms (T', *shape); ``factorize`` turns one
    matrix's terms (T', out, in) into k-component factors. ``stored_terms`` and ``stored_rank`` state
    T' and the components per term without computing them (``inspect``'s memory plan asks them).
    """

    def stored_terms(self, tasks: int) -> int:
        """How many terms ``vectors`` stores per tensor for ``tasks`` task vectors: one per task."""
        return tasks

    def stored_rank(self, rank: int, tasks: int) -> int:
        """How many components ``factorize`` keeps per term when asked for ``rank``: all of them."""
        return rank

    def fit(self, provider: TaskVectorProvider) -> "Transform":
        """Gather global statistics; the identity needs none."""
        return self

    def vectors(self, name: str, task_vectors: Tensor, is_matrix: bool) -> Tensor:
        """The stored terms of one tensor."""
        return task_vectors

    def factorize(self, terms: Tensor, k: int, svd: str = "exact", svd_options: Mapping[str, Any] | None = None) -> Factors:
        """Top-k SVD of every term of one matrix, all terms in one batched call (solver ``svd``)."""
        return truncated_svd(terms, k, method=svd, **(svd_options or {}))


@dataclass(frozen=True)
class Method:
    """One setting of the merged layer (DESIGN.md, "Methods and their settings").

    Attributes:
        name: registry name.
        base: B — ``"pretrained"`` (θ₀) or ``"average"`` (θ_avg = mean_t θ_t).
        matrices: the task term of matrices — ``"none"``, ``"dense"`` (Σ λ_t τ_t) or ``"svd"``
            (stacked truncated SVD factors, ``rank`` components per task).
        dense: whether non-matrix tensors get the dense task term (else they stay at B).
        matrix_set: which tensors get the matrix term (``targets.MATRIX_SETS``): ``"rule"`` (the
            matrix rule of targets.py), ``"layers"`` (the rule without open_clip's free ``proj`` /
            ``text_projection``: the attention and MLP weights CART's and AdaRank's code decompose)
            or ``"all_2d"`` (every 2-D tensor but ``text_projection``, as TSV-M's code).
        rank: stored rank of ``"svd"`` matrices: None (full), a fraction in (0, 1] or an int.
        scaling: initial λ.
        coefficients: ``"global"`` (one λ), ``"task"`` (one per task, shared by all layers) or
            ``"layer"`` (one per task per tensor).
        masks: learn AdaRank mask logits over the stored components.
        mask_rank: components initially switched on per task (None: all).
        mask_init: |ℓ| at initialisation (ℓ = +mask_init on, −mask_init off; AdaRank's code uses 0.1).
        temperature: the straight-through temperature.
        lambda_range: (low, high): λ is clamped to it in every forward pass and in ``fuse()``, as AdaMerging's
            code does with ``torch.clamp(lambdas_raw, 0, 1)``. No gradient reaches a λ beyond the range. None means
            λ is not clamped.
        svd: the truncated-SVD solver (``decompose.SVD_SOLVERS``): ``"exact"`` (default),
            ``"randomized"`` or ``"auto"``.
        svd_options: the solver's options, e.g. ``{"oversample": 20, "power_iters": 6}`` for
            ``"randomized"``.
        transform: task-vector transform (TIES, TSV-M, AWD); the identity by default.
    """

    name: str
    base: str = "pretrained"
    matrices: str = "dense"
    dense: bool = True
    matrix_set: str = "rule"
    rank: int | float | None = None
    scaling: float = 1.0
    coefficients: str = "global"
    masks: bool = False
    mask_rank: int | float | None = None
    mask_init: float = 0.1
    temperature: float = 10.0
    lambda_range: tuple[float, float] | None = None
    svd: str = "exact"
    svd_options: dict[str, Any] | None = None
    transform: Transform = field(default_factory=Transform)

    def __post_init__(self) -> None:
        for attr, allowed in (
            ("base", BASES), ("matrices", MATRIX_TERMS), ("coefficients", COEFFICIENT_SCOPES), ("matrix_set", MATRIX_SETS)
        ):
            if getattr(self, attr) not in allowed:
                raise ValueError(f"{attr}={getattr(self, attr)!r}: expected one of {allowed}")
        check_svd(self.svd, self.svd_options)
        if self.masks and self.matrices != "svd":
            raise ValueError("masks: AdaRank masks need matrices='svd'")
        for attr in ("scaling", "temperature", "mask_init", "rank", "mask_rank"):
            value = getattr(self, attr)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{attr}={value!r} must be finite")
        if self.temperature <= 0:
            raise ValueError(f"temperature={self.temperature!r} must be positive")
        if self.mask_init <= 0:
            raise ValueError(f"mask_init={self.mask_init!r} must be positive")
        if isinstance(self.scaling, bool) or not isinstance(self.scaling, (int, float)):
            raise ValueError(f"scaling={self.scaling!r} must be a number")
        object.__setattr__(self, "lambda_range", check_coef_range(self.lambda_range, "lambda_range"))
        if self.lambda_range is not None and not self.lambda_range[0] <= self.scaling <= self.lambda_range[1]:
            raise ValueError(f"scaling={self.scaling!r} lies outside lambda_range={self.lambda_range}: the initial λ "
                             "would be clamped (give lambda_range=None for no clamp, or a range that holds it)")

    @property
    def is_adaptive(self) -> bool:
        """Whether the method learns its coefficients or masks by test-time adaptation (per task/layer λ, or ℓ)."""
        return self.coefficients != "global" or self.masks

    def with_options(self, **options: Any) -> "Method":
        """A copy with some fields replaced; an unknown option is an error naming it."""
        names = {f.name for f in dataclasses.fields(self)} - {"name"}
        unknown = sorted(set(options) - names)
        if unknown:
            raise TypeError(f"unknown option(s) {unknown} for method {self.name!r}; valid options: {sorted(names)}")
        return dataclasses.replace(self, **options)
