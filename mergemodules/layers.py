"""Merged tensors: the one layer every merging method is a setting of (DESIGN.md, "The one idea").

``MergedWeight`` computes a 2-D weight

    W(λ, m) = B + Σ_t λ_t · U_t · diag(m_t ⊙ σ_t) · V_tᵀ          (low-rank task term)
    W(λ)    = B + Σ_t λ_t · Δ_t                                      (dense task term)

``MergedTensor`` computes any other tensor densely, ``b(λ) = b_B + Σ_t λ_t · Δ_t``. A weight of
any shape is a matrix through its :class:`~mergemodules.layouts.Layout` (a convolution kernel
(out, in, kh, kw) is the (out, in·kh·kw) matrix).
``MergedLinear`` and ``MergedConv2d`` are an ``nn.Linear`` / ``nn.Conv2d`` whose weight and bias are
merged; each picks, per call, the cheaper of materialising W or applying the factors to the input
(low-rank path).

Only λ (``coef``) and the mask logits ℓ are parameters; B, Δ and the factors are buffers.
λ may be a scalar (one global coefficient) or a vector of length T, and the same Parameter
object may be shared by many layers (task-wise λ).
"""
from __future__ import annotations

import contextlib
import copy
import math
import warnings
from typing import Any, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from .layouts import Layout, parse_layout

__all__ = [
    "BaseMerged", "MergedTensor", "MergedWeight", "MergedLayer", "MergedLinear", "MergedConv2d", "check_finite",
    "straight_through_mask", "weight_cache",
]

_cache: dict[int, Tensor] | None = None


@contextlib.contextmanager
def weight_cache(values: Mapping[nn.Module, Tensor] | None = None) -> Iterator[None]:
    """Compute each merged tensor at most once inside this block (one forward of a merged model).

    Code that reads a weight several times per forward (tied embeddings, attention reading
    ``out_proj.weight``) then pays for one evaluation. Nested blocks share the outer cache.
    ``values`` (merged tensor module → tensor) pre-fills the block: those modules return the given
    tensor, e.g. a detached leaf that gathers the weight's gradient over several backward passes.
    """
    global _cache
    if _cache is not None:
        if values:
            raise RuntimeError("weight_cache: values can only pre-fill the outermost block")
        yield
        return
    _cache = {id(module): value for module, value in (values or {}).items()}
    try:
        yield
    finally:
        _cache = None


def check_finite(tensor: Tensor, where: str, values: bool = True) -> Tensor:
    """``tensor`` itself if it holds values and all are finite; else a ValueError naming ``where``.

    ``values=False`` checks only that it holds values (no meta tensor), reading none of them.
    """
    if tensor.is_meta:
        raise ValueError(f"{where} is a meta tensor (a shape without values): load real weights first")
    if values and not all_finite(tensor):
        raise ValueError(f"{where} contains NaN or Inf")
    return tensor


def all_finite(tensor: Tensor) -> bool:
    """Whether every entry of ``tensor`` is finite.

    A sum is finite only if every term is, so one reduction (10× faster than ``isfinite(t).all()`` on
    CPU, no temporaries) decides the common case; only a non-finite sum (a NaN/Inf entry, or an
    overflow of the sum) needs the entrywise test.
    """
    if not tensor.dtype.is_floating_point:
        return True
    if bool(torch.isfinite(tensor.sum())):
        return True
    return bool(torch.isfinite(tensor).all())


def straight_through_mask(logits: Tensor, temperature: float) -> Tensor:
    """AdaRank's binary mask: forward ``1[sigmoid(ℓ/T) ≥ 0.5]``, backward through ``sigmoid(ℓ/T)``.

    The forward value is exactly 0 or 1: ``hard + (soft − soft.detach())`` adds an exact zero.
    """
    soft = torch.sigmoid(logits / temperature)
    hard = (soft >= 0.5).to(soft.dtype)
    return hard + (soft - soft.detach())


def _autocast_enabled(device_type: str) -> bool:
    """Whether autocast is on for ``device_type`` (torch < 2.4 has no device argument; meta has no autocast)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()
    except RuntimeError:
        return False


def check_coef_range(coef_range: Sequence[float] | None, name: str = "coef_range") -> tuple[float, float] | None:
    """``coef_range`` as a (low, high) tuple of finite floats with low < high (None: λ is not clamped)."""
    if coef_range is None:
        return None
    values = tuple(coef_range) if isinstance(coef_range, (tuple, list)) else ()
    if len(values) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                                   for v in values) or not values[0] < values[1]:
        raise ValueError(f"{name}={coef_range!r}: expected (low, high), two finite numbers with low < high")
    return float(values[0]), float(values[1])


def _per_task_coef(coef: Tensor, num_tasks: int) -> Tensor:
    return coef.expand(num_tasks) if coef.dim() == 0 else coef


class BaseMerged(nn.Module):
    """The merged value of one parameter (base class of MergedTensor and MergedWeight): B, λ and per-forward caching."""

    base: Tensor

    def __init__(self, base: Tensor, coef: nn.Parameter | None,
                 coef_range: tuple[float, float] | None = None) -> None:
        super().__init__()
        self.register_buffer("base", base.detach())
        self.coef = coef
        self.coef_range = check_coef_range(coef_range)

    @property
    def num_tasks(self) -> int:
        """Number of task terms T (0 when the tensor is the base alone)."""
        raise NotImplementedError

    @property
    def parameter_shape(self) -> tuple[int, ...]:
        """The shape of the parameter this module computes, known without evaluating it."""
        return tuple(self.base.shape)

    def _check_coef(self) -> None:
        T = self.num_tasks
        if T and self.coef is None:
            raise ValueError("coef: a merged tensor with task terms needs merge coefficients λ")
        if self.coef is not None and self.coef.dim() != 0 and self.coef.shape != (T,):
            raise ValueError(f"coef: expected a scalar or shape ({T},), got {tuple(self.coef.shape)}")

    def task_coef(self) -> Tensor:
        """λ (``coef``) as a length-T vector in the base dtype, clamped to ``coef_range`` when one is set
        (AdaMerging's ``torch.clamp(lambdas_raw, 0, 1)``: no gradient reaches a λ beyond the range)."""
        coef = self.coef if self.coef_range is None else self.coef.clamp(*self.coef_range)
        return _per_task_coef(coef, self.num_tasks).to(self.base.dtype)

    def lambdas(self) -> Tensor:
        """Deprecated (removed in 0.2): use :meth:`task_coef`."""
        warnings.warn("lambdas() is deprecated: use task_coef()", DeprecationWarning, stacklevel=2)
        return self.task_coef()

    def compute(self) -> Tensor:
        """Evaluate the merged tensor (no caching)."""
        raise NotImplementedError

    def forward(self) -> Tensor:
        """The merged tensor in its stored dtype (autocast off), computed once per :func:`weight_cache` block."""
        if _cache is not None and id(self) in _cache:
            return _cache[id(self)]
        if _autocast_enabled(self.base.device.type):
            with torch.autocast(self.base.device.type, enabled=False):
                value = self.compute()
        else:
            value = self.compute()
        if _cache is not None:
            _cache[id(self)] = value
        return value


class MergedTensor(BaseMerged):
    """A densely merged tensor of any shape: ``base + Σ_t λ_t · deltas[t]``."""

    def __init__(self, base: Tensor, deltas: Tensor | None = None, coef: nn.Parameter | None = None,
                 coef_range: tuple[float, float] | None = None) -> None:
        super().__init__(base, coef, coef_range)
        if deltas is not None and deltas.shape[1:] != base.shape:
            raise ValueError(f"deltas: shape {tuple(deltas.shape)} does not stack tensors of shape {tuple(base.shape)}")
        self.register_buffer("deltas", None if deltas is None else deltas.detach().to(base.dtype))
        self._check_coef()

    @property
    def num_tasks(self) -> int:
        return 0 if self.deltas is None else self.deltas.shape[0]

    def compute(self) -> Tensor:
        if self.deltas is None:
            return self.base
        return self.base + torch.tensordot(self.task_coef(), self.deltas, dims=1)


class MergedWeight(BaseMerged):
    """A merged weight, stored canonically as the (out, in) matrix of its layout.

    Args:
        base: B in the parameter's shape: (out, in) in ``layout="out_in"``, (in, out) in ``layout="in_out"``
            (Hugging Face ``Conv1D``, open_clip's ``proj``), (out, in, *kernel) in ``layout="out_in_kernel"``
            (convolutions); ``forward()`` returns that shape.
        U, S, V: stacked truncated SVD factors of the task vectors, (T, out, k), (T, k), (T, in, k).
        deltas: dense task vectors (T, out, in) instead of factors.
        coef: λ, a scalar or (T,) Parameter (may be shared between layers).
        coef_range: (low, high): λ is clamped to it in every use (AdaMerging); None: not clamped.
        mask_logits: AdaRank's ℓ, (T, k); masks are hard in the forward pass (straight-through).
        temperature: the straight-through temperature (AdaRank: 10).
    """

    def __init__(
        self,
        base: Tensor,
        *,
        U: Tensor | None = None,
        S: Tensor | None = None,
        V: Tensor | None = None,
        deltas: Tensor | None = None,
        coef: nn.Parameter | None = None,
        mask_logits: nn.Parameter | None = None,
        temperature: float = 10.0,
        layout: str | Layout = Layout.OUT_IN,
        coef_range: tuple[float, float] | None = None,
    ) -> None:
        layout = parse_layout(layout, "layout")
        if not layout.fits(base.dim()):
            raise ValueError(f"base: a merged weight in layout {layout} cannot have shape {tuple(base.shape)}")
        super().__init__(layout.to_matrix(base).contiguous(), coef, coef_range)
        self.layout = layout
        self._parameter_shape = tuple(base.shape)
        self.temperature = float(temperature)
        if not math.isfinite(temperature) or temperature <= 0:
            raise ValueError(f"temperature must be a finite positive number, got {temperature}")
        has_factors = U is not None or S is not None or V is not None
        if has_factors and deltas is not None:
            raise ValueError("give either factors (U, S, V) or dense deltas, not both")
        dtype = self.base.dtype
        if has_factors:
            self._check_factors(U, S, V)
            U, S, V = (x.detach().to(dtype).contiguous() for x in (U, S, V))
        elif deltas is not None and deltas.shape[1:] != self.base.shape:
            raise ValueError(f"deltas: expected (T, {self.out_features}, {self.in_features}), got {tuple(deltas.shape)}")
        self.register_buffer("U", U)
        self.register_buffer("S", S)
        self.register_buffer("V", V)
        self.register_buffer("deltas", None if deltas is None else deltas.detach().to(dtype))
        if mask_logits is not None and (S is None or mask_logits.shape != S.shape):
            raise ValueError("mask_logits: masks need factors and must have the shape of S (T, k)")
        self.mask_logits = mask_logits
        self._check_coef()
        self.path = "auto"

    def _check_factors(self, U: Tensor | None, S: Tensor | None, V: Tensor | None) -> None:
        if U is None or S is None or V is None:
            raise ValueError("U, S and V must be given together")
        T, k = S.shape
        if U.shape != (T, self.out_features, k) or V.shape != (T, self.in_features, k):
            raise ValueError(
                f"factors: expected U {(T, self.out_features, k)} and V {(T, self.in_features, k)}, "
                f"got {tuple(U.shape)} and {tuple(V.shape)}"
            )

    @property
    def out_features(self) -> int:
        """Rows of the canonical (out, in) weight."""
        return self.base.shape[0]

    @property
    def in_features(self) -> int:
        """Columns of the canonical (out, in) weight."""
        return self.base.shape[1]

    @property
    def parameter_shape(self) -> tuple[int, ...]:
        """The shape of the parameter: (out, in), (in, out) or (out, in, *kernel) by the layout."""
        return self._parameter_shape

    @property
    def num_tasks(self) -> int:
        if self.S is not None:
            return self.S.shape[0]
        return 0 if self.deltas is None else self.deltas.shape[0]

    @property
    def rank(self) -> int:
        """Stored components per task (0 for dense or base-only weights)."""
        return 0 if self.S is None else self.S.shape[1]

    def task_term(self) -> str:
        """What is stored per task: ``"svd rank=k"``, ``"dense"`` (the full τ_t) or ``"none"`` (B alone)."""
        return f"svd rank={self.rank}" if self.S is not None else "dense" if self.num_tasks else "none"

    def masks(self) -> Tensor | None:
        """Masks over singular components, (T, k): hard 0/1 forward, straight-through backward."""
        if self.mask_logits is None:
            return None
        return straight_through_mask(self.mask_logits, self.temperature)

    def _component_scales(self) -> Tensor:
        """λ_t · m_t · σ_t flattened to (T·k,), matching the concatenated factor columns."""
        scales = self.task_coef()[:, None] * self.S
        masks = self.masks()
        if masks is not None:
            scales = scales * masks.to(scales.dtype)
        return scales.reshape(-1)

    def _concatenated(self) -> tuple[Tensor, Tensor]:
        """U and V with all tasks' components side by side: (out, T·k), (in, T·k)."""
        return rearrange(self.U, "t out k -> out (t k)"), rearrange(self.V, "t inp k -> inp (t k)")

    def _factor_sum(self, start: Tensor) -> Tensor:
        """``start + Σ_t U_t diag(λ_t m_t σ_t) V_tᵀ`` (see :class:`_FactorSum`)."""
        scales = self._component_scales().view_as(self.S)
        if self.U.requires_grad or self.V.requires_grad:  # factors being trained: plain autograd
            U, V = self._concatenated()
            return start + (U * scales.reshape(-1)) @ V.t()
        return _FactorSum.apply(start, scales, self.U, self.V)

    def delta_weight(self) -> Tensor:
        """The task term Σ_t λ_t U_t diag(m_t σ_t) V_tᵀ (or Σ_t λ_t Δ_t), canonical (out, in)."""
        if self.S is not None:
            return self._factor_sum(torch.zeros_like(self.base))
        if self.deltas is not None:
            return torch.tensordot(self.task_coef(), self.deltas, dims=1)
        return torch.zeros_like(self.base)

    def compute(self) -> Tensor:
        if self.S is not None:
            weight = self._factor_sum(self.base)
        else:
            weight = self.base if self.num_tasks == 0 else self.base + self.delta_weight()
        return self.layout.from_matrix(weight, self._parameter_shape)

    def matrix(self) -> Tensor:
        """The merged weight as its canonical (out, in) matrix (computed once per :func:`weight_cache` block)."""
        return self.layout.to_matrix(self())

    def use_low_rank(self, tokens: int) -> bool:
        """Whether ``x @ Wᵀ`` for ``tokens`` rows is cheaper through the factors than by materialising W.

        Materialising costs T·k·out·in once; the low-rank path T·k·(out+in) per token, so it
        wins below out·in/(out+in) tokens (DESIGN.md, "Cost of one forward"). A weight already
        computed in this forward is always reused.
        """
        if self.S is None or self.path == "materialize":
            return False
        if self.path == "low_rank":
            return True
        if _cache is not None and id(self) in _cache:
            return False
        return tokens * (self.out_features + self.in_features) < self.out_features * self.in_features

    def linear(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        """``x @ Wᵀ + bias`` for the canonical weight, by the cheaper path."""
        tokens = x.numel() // max(x.shape[-1], 1)
        if not self.use_low_rank(tokens):
            return F.linear(x, self.matrix(), bias)
        U, V = self._concatenated()
        return F.linear(x, self.base, bias) + ((x @ V) * self._component_scales()) @ U.t()


class _FactorSum(torch.autograd.Function):
    """``start + Σ_t U_t·diag(s_t)·V_tᵀ`` with a gradient for the scales ``s`` (T, k) only.

    The forward pass multiplies only the components whose scale is nonzero (AdaRank's hard masks
    switch most of them off: exact, since the others add 0) in one GEMM. The backward pass gives
    every component its gradient ∂L/∂s_tj = u_tjᵀ·G·v_tj from the weight gradient G, as the
    straight-through estimator needs, and saves no copy of the factors.
    """

    @staticmethod
    def forward(ctx: Any, start: Tensor, scales: Tensor, U: Tensor, V: Tensor) -> Tensor:
        ctx.save_for_backward(U, V)
        active = scales != 0
        U_on, V_on = U.transpose(0, 1)[:, active], V.transpose(0, 1)[:, active]
        return torch.addmm(start, U_on * scales[active], V_on.t())

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:
        U, V = ctx.saved_tensors
        grad_scales = None
        if ctx.needs_input_grad[1]:
            grad_scales = (torch.einsum("oi,tik->tok", grad, V) * U).sum(1)
        return (grad if ctx.needs_input_grad[0] else None), grad_scales, None, None


class MergedLayer(nn.Module):
    """A layer whose weight (and bias) are merged: a drop-in replacement for the plain layer it was made from.

    ``.weight`` and ``.bias`` are ordinary tensors (code may read them directly, as
    ``nn.MultiheadAttention`` reads ``out_proj.weight``); the original layer's other attributes
    (``in_features``, ``stride``, ...) are read from a parameter-free copy of it; ``fuse()`` returns
    the plain layer of the original class with the merged values. A subclass names the plain class it
    ``replaces`` and the ``layout`` of its weight, and runs ``forward`` by the cheaper path.
    """

    replaces: type[nn.Module]
    layout: Layout

    def __init__(self, weight: MergedWeight, bias: MergedTensor | None, original: nn.Module) -> None:
        super().__init__()
        name = type(self).__name__
        if not isinstance(original, self.replaces):
            raise TypeError(f"original: {name} replaces an {self.replaces.__name__}, got {type(original).__name__}")
        if weight.layout is not self.layout:
            raise ValueError(f"weight: {name} needs a weight in layout {self.layout}, got {weight.layout}")
        own = getattr(original, "weight", None)
        if isinstance(own, Tensor) and tuple(own.shape) != weight.parameter_shape:
            raise ValueError(f"weight: shape {weight.parameter_shape} differs from the original layer's {tuple(own.shape)}")
        if bias is not None and bias.parameter_shape != (weight.out_features,):
            raise ValueError(f"bias: expected shape ({weight.out_features},), got {bias.parameter_shape}")
        self.merged_weight = weight
        self.merged_bias = bias
        self.__dict__["_shell"] = _empty_shell(original)

    @property
    def weight_merge(self) -> MergedWeight:
        """Deprecated (removed in 0.2): ``merged_weight``."""
        warnings.warn("weight_merge is deprecated: use merged_weight", DeprecationWarning, stacklevel=2)
        return self.merged_weight

    @property
    def bias_merge(self) -> MergedTensor | None:
        """Deprecated (removed in 0.2): ``merged_bias``."""
        warnings.warn("bias_merge is deprecated: use merged_bias", DeprecationWarning, stacklevel=2)
        return self.merged_bias

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            shell = self.__dict__.get("_shell")
            if shell is None or name in ("weight", "bias"):
                raise
            return getattr(shell, name)

    @property
    def weight(self) -> Tensor:
        """The merged weight, in the parameter's shape."""
        return self.merged_weight()

    @property
    def bias(self) -> Tensor | None:
        """The merged bias, or None."""
        return None if self.merged_bias is None else self.merged_bias()

    @torch.no_grad()
    def fuse(self) -> nn.Module:
        """A plain layer of the original class holding the current merged weight and bias (checked finite)."""
        weight = check_finite(self.weight.detach().clone(), "the fused weight")
        bias = None if self.merged_bias is None else check_finite(self.bias.detach().clone(), "the fused bias")
        return self.fuse_with(nn.Parameter(weight), None if bias is None else nn.Parameter(bias))

    def fuse_with(self, weight: nn.Parameter, bias: nn.Parameter | None) -> nn.Module:
        """A plain layer of the original class holding the given weight and bias, in this layer's train/eval mode."""
        layer = copy.deepcopy(self._shell)
        layer.weight, layer.bias = weight, bias
        layer.training = self.training
        return layer

    def extra_repr(self) -> str:
        return f"tasks={self.merged_weight.num_tasks}, {self.merged_weight.task_term()}"


class MergedLinear(MergedLayer):
    """An ``nn.Linear`` with a merged weight (and bias); ``forward`` picks the materialised or low-rank path per call."""

    replaces = nn.Linear
    layout = Layout.OUT_IN

    def __init__(self, weight: MergedWeight, bias: MergedTensor | None = None, original: nn.Linear | None = None) -> None:
        if original is None:
            original = nn.Linear(weight.in_features, weight.out_features, bias=bias is not None, device="meta")
        super().__init__(weight, bias, original)

    def forward(self, x: Tensor) -> Tensor:
        """``x @ Wᵀ + b`` with the merged weight."""
        return self.merged_weight.linear(x, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {super().extra_repr()}"


class MergedConv2d(MergedLayer):
    """An ``nn.Conv2d`` with a merged kernel (and bias), its (out, in/groups·kh·kw) matrix merged.

    The low-rank path convolves the input with the T·k right factors (a convolution with T·k output
    channels and the layer's stride, padding, dilation and padding mode), then mixes them with
    U·diag(λ·m·σ) as a 1×1 convolution, and adds the convolution with B; it is taken for fewer than
    out·in·kh·kw/(out + in·kh·kw) output pixels (about N·H·W/stride²), as :meth:`MergedWeight.use_low_rank`.
    A grouped convolution (``groups > 1``) always materialises the kernel.
    """

    replaces = nn.Conv2d
    layout = Layout.OUT_IN_KERNEL

    def forward(self, x: Tensor) -> Tensor:
        """The convolution of ``x`` with the merged kernel and bias."""
        conv, weight = self._shell, self.merged_weight
        pixels = x.numel() // max(x.shape[-3], 1) // math.prod(conv.stride)
        if conv.groups != 1 or not weight.use_low_rank(pixels):
            return conv._conv_forward(x, self.weight, self.bias)
        shape = weight.parameter_shape
        U, V = weight._concatenated()
        down = rearrange(V, "(inp kh kw) tk -> tk inp kh kw", kh=shape[2], kw=shape[3])
        up = rearrange(U * weight._component_scales(), "out tk -> out tk 1 1")
        base = weight.layout.from_matrix(weight.base, shape)
        return conv._conv_forward(x, base, self.bias) + F.conv2d(conv._conv_forward(x, down, None), up)


def _empty_shell(module: nn.Module) -> nn.Module:
    """A parameter-free copy of ``module`` (its class and settings), used to rebuild the plain layer."""
    params = dict(module._parameters)
    module._parameters.clear()
    try:
        shell = copy.deepcopy(module)
    finally:
        module._parameters.update(params)
    return shell
