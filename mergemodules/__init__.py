"""mergemodules: model merging as one differentiable layer (see README.md and DESIGN.md)."""
from .decompose import Factors, resolve_rank, truncated_svd
from .layers import MergedLinear, MergedTensor, MergedWeight, straight_through_mask, weight_cache
from .methods import METHODS, Method, Transform, UnknownMethodError, get_method, register_method
from .surgery import MergedModel, merge

__all__ = [
    "Factors", "resolve_rank", "truncated_svd",
    "MergedLinear", "MergedTensor", "MergedWeight", "straight_through_mask", "weight_cache",
    "METHODS", "Method", "Transform", "UnknownMethodError", "get_method", "register_method",
    "MergedModel", "merge",
]
__version__ = "0.1.0"
