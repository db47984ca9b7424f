"""Every figure the library draws: AdaRank's masks and AWD's cosine heatmaps (needs the ``plot`` extra).

matplotlib is imported when a figure is drawn, never at import time; without it, drawing raises an
ImportError that names ``pip install 'mergemodules[plot]'``. The data behind each figure stays in the
objects that own it (``masks.hard_masks``, ``FittedAWD.cosine_before``/``cosine_after``).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from .files import atomic_write
from .masks import hard_masks, task_labels
from .methods.awd import FittedAWD

__all__ = ["plot_masks", "plot_awd_cosine"]

_KEPT, _PRUNED = torch.tensor([0x2A, 0x62, 0xB8]) / 255, torch.tensor([0xF2, 0xD1, 0x3A]) / 255  # AdaRank's Figure 5


def _figure(what: str, **options: Any) -> Any:
    """A matplotlib Figure on the Agg canvas (no display, no pyplot state); ``what`` names the caller in the error."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError(f"{what} needs matplotlib: pip install 'mergemodules[plot]'") from err
    figure = Figure(layout="constrained", **options)
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Any, path: str | os.PathLike[str]) -> Path:
    """Write ``figure`` as a PNG at ``path`` atomically; returns the path."""
    return atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=120))


def plot_masks(
    merged: nn.Module | Mapping[str, Tensor],
    path: str | os.PathLike[str],
    *,
    layers: Sequence[str] | None = None,
    task_names: Sequence[str] | None = None,
    fraction: float = 1.0,
) -> Path:
    """Save a PNG of the masks as AdaRank's Figure 5: one panel per layer, a row per task, blue kept, yellow pruned.

    Args:
        merged: an AdaRank-merged model, or its :func:`~mergemodules.hard_masks` (layer name → boolean (T, k)),
            e.g. saved after adaptation and plotted later.
        path: the PNG file to write (written atomically).
        layers: layer names to plot, in order (default: all masked layers; Figure 5 shows a few blocks).
        task_names: row labels (default ``task 0``, ``task 1``, ...).
        fraction: the leading fraction of components shown (Figure 5 shows the top 50%).
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must lie in (0, 1], got {fraction!r}")
    masks = dict(merged) if isinstance(merged, Mapping) else hard_masks(merged)
    if layers is not None:
        unknown = [name for name in layers if name not in masks]
        if unknown or not layers:
            raise KeyError(f"layers: no masked layer {unknown}; masked layers: {list(masks)}")
        masks = {name: masks[name] for name in layers}
    names = task_labels(task_names, next(iter(masks.values())).shape[0])
    figure = _figure("plot_masks", figsize=(8, 0.25 * len(names) * len(masks) + 0.6 * len(masks) + 0.5))
    for ax, (layer, m) in zip(figure.subplots(len(masks), 1, squeeze=False)[:, 0], masks.items()):
        shown = max(1, round(fraction * m.shape[1]))
        colours = torch.where(m[:, :shown, None], _KEPT, _PRUNED)  # (T, shown, RGB)
        ax.imshow(colours.numpy(), aspect="auto", interpolation="nearest")
        ax.set_title(f"{layer} (kept {int(m.sum())}/{m.numel()})", fontsize=9)
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.set_xlabel("singular component index", fontsize=8)
    return _save(figure, path)


def plot_awd_cosine(
    awd: FittedAWD, path: str | os.PathLike[str], task_names: Sequence[str] | None = None
) -> Path:
    """Save a PNG of the pairwise cosines of the task vectors before and after AWD (the paper's Fig. 4).

    Args:
        awd: the fitted AWD transform (``merged.transform`` after an AWD merge).
        path: the PNG file to write (written atomically).
        task_names: axis labels (default ``task 0``, ``task 1``, ...).
    """
    if not isinstance(awd, FittedAWD):
        raise TypeError(f"awd must be a FittedAWD (merged.transform after an AWD merge), got {type(awd).__name__}")
    T = awd.cosine_before.shape[0]
    labels = task_labels(task_names, T)
    before, after = (m.detach().cpu().double() for m in (awd.cosine_before, awd.cosine_after))
    limit = max(float(before[~torch.eye(T, dtype=torch.bool)].abs().max()), 1e-12)
    figure = _figure("plot_awd_cosine", figsize=(4.5 * 2 + 1.5, 4.2 + 0.25 * T))
    axes = figure.subplots(1, 2, sharey=True)
    panels = (
        ("task vectors", before, awd.mean_abs_cosine_before),
        (f"AWD (‖δ‖ = {awd.delta_norm:.3g})", after, awd.mean_abs_cosine_after),
    )
    for ax, (title, matrix, mean) in zip(axes, panels):
        values = matrix.numpy()
        image = ax.imshow(values, cmap="RdBu_r", vmin=-limit, vmax=limit)
        for i in range(T):
            for j in range(T):
                colour = "white" if abs(values[i, j]) > 0.6 * limit else "black"
                ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=7, color=colour)
        ax.set_title(f"{title}\nmean |cos| = {mean:.3f}")
        ax.set_xticks(range(T), labels, rotation=90)
    axes[0].set_yticks(range(T), labels)
    figure.colorbar(image, ax=list(axes), shrink=0.8, label="cosine similarity")
    return _save(figure, path)
