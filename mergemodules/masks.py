"""Inspect AdaRank's masks: which singular components each layer keeps for each task, and a plot of them.

The masks reported are the hard ones the forward pass uses, ``1[sigmoid(ℓ/T) ≥ 0.5]`` (AdaRank,
appendix A); component ``i`` is the i-th largest singular direction of the task vector.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from .files import atomic_write
from .layers import MergedWeight

__all__ = ["hard_masks", "mask_summary", "plot_masks"]


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
        raise ValueError("merged has no mask logits: masks exist only for AdaRank methods (adarank_ta, adarank_cart)")
    return masks


def mask_summary(merged: nn.Module, task_names: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """One row per (layer, task): stored ``rank``, ``kept`` count and the kept component ``indices``.

    The rows are plain dicts (``pandas.DataFrame(rows)`` makes a table of them).
    """
    masks = hard_masks(merged)
    names = _task_names(task_names, next(iter(masks.values())).shape[0])
    return [
        {"layer": layer, "task": names[t], "rank": int(m.shape[1]), "kept": int(m[t].sum()),
         "indices": torch.nonzero(m[t]).flatten().tolist()}
        for layer, m in masks.items()
        for t in range(m.shape[0])
    ]


def _task_names(task_names: Sequence[str] | None, num_tasks: int) -> list[str]:
    if task_names is None:
        return [f"task {t}" for t in range(num_tasks)]
    if len(task_names) != num_tasks:
        raise ValueError(f"task_names: {len(task_names)} names for {num_tasks} tasks")
    return [str(n) for n in task_names]


def plot_masks(
    merged: nn.Module,
    path: str | os.PathLike[str],
    *,
    layers: Sequence[str] | None = None,
    task_names: Sequence[str] | None = None,
    fraction: float = 1.0,
) -> Path:
    """Save a PNG of the masks as AdaRank's Figure 5: one panel per layer, a row per task, blue kept, yellow pruned.

    Args:
        merged: an AdaRank-merged model.
        path: the PNG file to write (written atomically).
        layers: layer names to plot, in order (default: all masked layers; Figure 5 shows a few blocks).
        task_names: row labels (default ``task 0``, ``task 1``, ...).
        fraction: the leading fraction of components shown (Figure 5 shows the top 50%).
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.colors import ListedColormap
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError("plot_masks needs matplotlib: pip install 'mergemodules[plot]'") from exc
    if not isinstance(fraction, (int, float)) or not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must lie in (0, 1], got {fraction!r}")
    masks = hard_masks(merged)
    if layers is not None:
        unknown = [name for name in layers if name not in masks]
        if unknown or not layers:
            raise KeyError(f"layers: no masked layer {unknown}; masked layers: {list(masks)}")
        masks = {name: masks[name] for name in layers}
    names = _task_names(task_names, next(iter(masks.values())).shape[0])

    fig = Figure(figsize=(8, 0.25 * len(names) * len(masks) + 0.6 * len(masks) + 0.5), layout="constrained")
    FigureCanvasAgg(fig)
    colors = ListedColormap(["#f2d13a", "#2a62b8"])  # pruned yellow, kept blue (Figure 5)
    for ax, (layer, m) in zip(fig.subplots(len(masks), 1, squeeze=False)[:, 0], masks.items()):
        shown = max(1, round(fraction * m.shape[1]))
        image = m[:, :shown].numpy().astype(float)
        ax.imshow(image, cmap=colors, vmin=0, vmax=1, aspect="auto", interpolation="nearest")
        ax.set_title(f"{layer} (kept {int(m.sum())}/{m.numel()})", fontsize=9)
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.set_xlabel("singular component index", fontsize=8)
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
