"""mergemodules: model merging as one differentiable layer (see README.md and DESIGN.md)."""
from .decompose import Factors, resolve_rank, truncated_svd
from .layers import BaseMerged, MergedConv2d, MergedLinear, MergedTensor, MergedWeight, straight_through_mask, weight_cache
from .layouts import Layout
from .methods import METHODS, Method, Transform, UnknownMethodError, get_method, register_method
from .surgery import MergedModel, merge
from .export import save_fused
from .merge_state import load_merge_state, save_merge_state
from .masks import hard_masks, mask_summary
from .plotting import plot_masks
from .tta import Task, adapt, entropy, evaluate
from . import deprecated as _deprecated  # last: the deprecated aliases of names that moved up a floor

__all__ = [
    "Factors", "resolve_rank", "truncated_svd",
    "BaseMerged", "MergedConv2d", "MergedLinear", "MergedTensor", "MergedWeight", "straight_through_mask",
    "weight_cache", "Layout",
    "METHODS", "Method", "Transform", "UnknownMethodError", "get_method", "register_method",
    "MergedModel", "merge",
    "save_fused", "save_merge_state", "load_merge_state",
    "hard_masks", "mask_summary", "plot_masks",
    "Task", "adapt", "entropy", "evaluate",
]
__version__ = "0.1.0"
