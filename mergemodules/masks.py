"""Inspect AdaRank's masks: which singular components each layer keeps for each task (plotting.plot_masks draws them).

The masks reported are the hard ones the forward pass uses, ``1[sigmoid(ℓ/T) ≥ 0.5]`` (AdaRank,
appendix A); component ``i`` is the i-th largest singular direction of the task vector.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn

from .layers import MergedWeight
from .methods import method_names

__all__ = ["hard_masks", "mask_summary", "task_labels"]


def hard_masks(merged: nn.Module) -> dict[str, Tensor]:
    """Layer name → boolean masks (T, k) of every merged weight with mask logits (the forward's masks)."""
    weights = merged.merged_weights() if hasattr(merged, "merged_weights") else {
        name: m for name, m in merged.named_modules() if isinstance(m, MergedWeight)
    }
    masks = {}
    with torch.no_grad():
        for name, weight in weights.items():
            if weight.mask_logits is not None:
                masks[name] = weight.masks().detach().cpu() >= 0.5
    if not masks:
        masked = ", ".join(method_names(lambda method: method.masks))
        raise ValueError(f"merged has no mask logits: masks exist only for AdaRank methods ({masked})")
    return masks


def mask_summary(merged: nn.Module, task_names: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """One row per (layer, task): stored ``rank``, ``kept`` count and the kept component ``indices``.

    The rows are plain dicts (``pandas.DataFrame(rows)`` makes a table of them).
    """
    masks = hard_masks(merged)
    names = task_labels(task_names, next(iter(masks.values())).shape[0])
    return [
        {"layer": layer, "task": names[t], "rank": int(m.shape[1]), "kept": int(m[t].sum()),
         "indices": torch.nonzero(m[t]).flatten().tolist()}
        for layer, m in masks.items()
        for t in range(m.shape[0])
    ]


def task_labels(task_names: Sequence[str] | None, num_tasks: int) -> list[str]:
    """``task_names`` as strings, checked to name ``num_tasks`` tasks (default ``task 0``, ``task 1``, ...)."""
    if task_names is None:
        return [f"task {t}" for t in range(num_tasks)]
    if len(task_names) != num_tasks:
        raise ValueError(f"task_names: {len(task_names)} names for {num_tasks} tasks")
    return [str(n) for n in task_names]

