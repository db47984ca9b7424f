"""The registry of merging methods, each a declarative :class:`Method` (DESIGN.md, table of methods)."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

from .awd import AWD
from .base import Method, TaskVectorProvider, Transform, UnknownMethodError
from .ties import Ties
from .tsv import TaskSingularVectors

__all__ = [
    "Method", "Transform", "TaskVectorProvider", "UnknownMethodError", "METHODS", "get_method", "method_names",
    "register_method", "with_awd",
]

CART_RANK = 0.08  # CART's γ: keep max(1, int(0.08·min(out, in))) components (papers/000, §4.3)

METHODS: dict[str, Method] = {}


def register_method(method: Method, *aliases: str) -> Method:
    """Make ``method`` available to :func:`get_method` under its name and any aliases."""
    for name in (method.name, *aliases):
        METHODS[name] = method
    return method


# Defaults are the papers' values; every convention follows the authors' released code (docs/methods.md).
register_method(Method("weight_averaging", base="average", matrices="none", dense=False), "average", "wa")
register_method(Method("task_arithmetic", scaling=0.3), "ta")
register_method(Method("ties", scaling=1.0, transform=Ties()), "ties_merging")
register_method(
    Method("tsv", matrices="svd", matrix_set="all_2d", scaling=1.0, transform=TaskSingularVectors()), "tsv_m"
)
register_method(Method("task_vector_svd", matrices="svd", matrix_set="layers", rank=CART_RANK, scaling=0.3))
register_method(
    Method("cart", base="average", matrices="svd", matrix_set="layers", dense=False, rank=CART_RANK, scaling=1.0)
)
# AdaMerging's code clamps λ to [0, 1] in every forward pass (torch.clamp(lambdas_raw, 0, 1)), task- and layer-wise
ADAMERGING_RANGE = (0.0, 1.0)
register_method(Method("adamerging_taskwise", coefficients="task", scaling=0.3, lambda_range=ADAMERGING_RANGE))
register_method(Method("adamerging_layerwise", coefficients="layer", scaling=0.3, lambda_range=ADAMERGING_RANGE),
                "adamerging")
register_method(
    Method(
        "cart_pp", base="average", matrices="svd", matrix_set="layers", rank=CART_RANK, scaling=1.0,
        coefficients="layer",
    ),
    "cart++",
)
register_method(Method("adarank_ta", matrices="svd", matrix_set="layers", coefficients="layer", scaling=0.3, masks=True))
register_method(
    Method(
        "adarank_cart", base="average", matrices="svd", matrix_set="layers", coefficients="layer",
        scaling=1.0, masks=True, mask_rank=CART_RANK,
    )
)
# The authors' released configurations for ViT-B/32 and 8 tasks, one name away from the papers' defaults:
# JH-GEECS/CART configs/CART/ViT-b-32_8_CART.yaml (prior 2.0, initial_rank_ratio 0.12) and
# david3684/AdaRank vision/configs/adarank_B_T8/adarank_CART.yaml (prior 2.3, initial_rank_ratio 0.16).
register_method(dataclasses.replace(METHODS["cart"], name="cart_released", rank=0.12, scaling=2.0))
register_method(dataclasses.replace(METHODS["adarank_cart"], name="adarank_cart_released", mask_rank=0.16, scaling=2.3))
# AWD (papers/003): TA and layer-wise AdaMerging on τ_i − δ; λ = 0.3 (first of the paper's grid, and its
# AdaMerging init). Other methods compose: get_method("cart", transform=AWD()) or with_awd("cart").
register_method(Method("awd_ta", scaling=0.3, transform=AWD()), "awd_task_arithmetic")
register_method(
    Method("awd_adamerging", coefficients="layer", scaling=0.3, transform=AWD(), lambda_range=ADAMERGING_RANGE),
    "awd_adamerging_layerwise",
)


def get_method(method: str | Method, **options: Any) -> Method:
    """The registered method called ``method`` (or ``method`` itself) with ``options`` applied.

    Options that are fields of the method's transform (e.g. TIES's ``density``) go to the transform;
    its other fields keep their values (e.g. the ``inner`` transform of a composed AWD).
    """
    if isinstance(method, str):
        if method not in METHODS:
            raise UnknownMethodError(f"unknown method {method!r}; available: {sorted(set(METHODS))}")
        method = METHODS[method]
    elif not isinstance(method, Method):
        raise TypeError(f"method must be a name or a Method, got {type(method).__name__}")
    fields = getattr(method.transform, "__dataclass_fields__", {})
    transform_fields = {name for name, f in fields.items() if not f.metadata.get("fitted")}
    transform_options = {k: options.pop(k) for k in list(options) if k in transform_fields}
    if transform_options:
        options["transform"] = dataclasses.replace(method.transform, **transform_options)
    return method.with_options(**options) if options else method


def with_awd(method: str | Method, **options: Any) -> Method:
    """``method`` run on the disentangled task vectors: AWD first, then the method's own transform.

    ``options`` are :class:`AWD` fields (``alpha``, ``steps``, ``lr``, ``scope``, ...). The method's
    base decides what the task vectors are (θ_t − θ₀, or θ_t − θ_avg for CART).
    """
    method = get_method(method)
    return dataclasses.replace(method, name=f"awd_{method.name}", transform=AWD(inner=method.transform, **options))


def method_names(where: Callable[[Method], bool]) -> list[str]:
    """The registered names (not aliases) of the methods for which ``where`` holds, in registration order."""
    return list(dict.fromkeys(method.name for method in METHODS.values() if where(method)))
