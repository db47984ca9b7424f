"""Every plot of the benchmark (the only module that imports matplotlib); each written atomically as PNG."""

from __future__ import annotations

import logging
import os
from typing import Sequence

import torch

logger = logging.getLogger(__name__)


def _figure(width: float, height: float, ncols: int = 1):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, list(axes)


def _save(fig, path: str) -> str:
    from mergemodules.files import atomic_write

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    return path


def cart_rank(sweep: list[tuple[float, float]], refs: dict[str, float], path: str, title: str) -> str:
    """CART's mean test accuracy against the kept rank fraction γ, with reference lines."""
    fig, (ax,) = _figure(5.5, 3.6)
    xs, ys = [r for r, _ in sweep], [100 * a for _, a in sweep]
    ax.plot(xs, ys, "o-", color="#2a62b8", label="CART (λ = 1)")
    styles = iter(["--", ":", "-."])
    for name, value in refs.items():
        if value == value:  # not NaN
            ax.axhline(100 * value, ls=next(styles, "--"), color="gray", lw=1)
            ax.text(xs[0], 100 * value, f" {name}", va="bottom", fontsize=8, color="gray")
    ax.set_xscale("log")
    ax.set_xticks(xs, [f"{x:g}" for x in xs])
    ax.set_xlabel("kept rank fraction γ (of min(out, in))")
    ax.set_ylabel("mean test accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="center right")
    return _save(fig, path)


def adarank_masks(masks: dict[str, torch.Tensor], names: list[str], path: str) -> str:
    """AdaRank's Figure 5 (from a merged model's hard masks) for the first, second, middle, second-to-last and
    last masked matrices."""
    from mergemodules import plot_masks

    layers = list(masks)
    pick = sorted({0, 1, len(layers) // 2, len(layers) - 2, len(layers) - 1} & set(range(len(layers))))
    plot_masks(masks, path, layers=[layers[i] for i in pick], task_names=names, fraction=0.5)
    return path


def adaptation(curves: dict[str, list[dict]], path: str, title: str) -> str:
    """Per adaptive row: entropy (relative to step 0) and mean accuracy on the tracked test subset vs step."""
    fig, (left, right) = _figure(10, 3.8, ncols=2)
    for label, track in curves.items():
        steps = [r["step"] for r in track]
        e0 = track[0]["entropy"] or 1.0
        line, = left.plot(steps, [r["entropy"] / e0 for r in track], "-", label=label)
        right.plot(steps, [100 * r["accuracy"] for r in track], "-", color=line.get_color(), label=label)
    left.set_xlabel("adaptation step")
    left.set_ylabel("entropy / entropy at step 0")
    left.set_title("entropy on the tracked test inputs", fontsize=10)
    right.set_xlabel("adaptation step")
    right.set_ylabel("mean accuracy (%)")
    right.set_title("accuracy on the same inputs (labels used only here)", fontsize=10)
    right.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def lambda_curves(curves: dict[str, dict[str, list[tuple[float, float]]]], chosen: dict[str, float],
                  paper: dict[str, float], path: str, title: str) -> str:
    """Mean accuracy against λ on val (solid) and test (dashed); the val choice and the paper's λ marked."""
    fig, (ax,) = _figure(6, 4)
    for label, c in curves.items():
        val = c.get("val", [])
        line, = ax.plot([x for x, _ in val], [100 * y for _, y in val], "o-", ms=3, label=f"{label} (val)")
        if c.get("test"):
            ax.plot([x for x, _ in c["test"]], [100 * y for _, y in c["test"]], "--", color=line.get_color(),
                    label=f"{label} (test)")
        if label in chosen:
            ax.axvline(chosen[label], color=line.get_color(), lw=0.8, alpha=0.6)
        if label in paper:
            ax.axvline(paper[label], color=line.get_color(), lw=0.8, ls=":", alpha=0.6)
    ax.set_xlabel("λ (solid vertical: chosen on val; dotted: the paper's default)")
    ax.set_ylabel("mean accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    return _save(fig, path)


def cosine(matrices: dict[str, list[list[float]]], names: Sequence[str], path: str, title: str) -> str:
    """Heatmaps of the task vectors' cosine matrices (e.g. τ and centered τ̄), values printed."""
    fig, axes = _figure(4.2 * len(matrices), 3.8, ncols=len(matrices))
    for ax, (label, m) in zip(axes, matrices.items()):
        im = ax.imshow(m, vmin=-1, vmax=1, cmap="RdBu_r")
        for i, row in enumerate(m):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6)
        ax.set_xticks(range(len(names)), names, rotation=60, fontsize=7)
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.set_title(label, fontsize=9)
    fig.colorbar(im, ax=axes, shrink=0.8)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def spectra(panels: dict[str, dict[str, list[tuple[float, float]]]], path: str, title: str, mark: float = 0.08) -> str:
    """Fraction of ‖τ‖² kept against the kept rank fraction, one line per task, one panel per kind of τ."""
    fig, axes = _figure(5 * len(panels), 3.8, ncols=len(panels))
    for ax, (label, per_task) in zip(axes, panels.items()):
        for task, pts in per_task.items():
            ax.plot([f for f, _ in pts], [k for _, k in pts], "o-", ms=3, label=task)
        ax.axvline(mark, color="gray", ls=":", lw=1)
        ax.set_xscale("log")
        ax.set_xlabel(f"kept rank fraction (dotted: γ = {mark:g})")
        ax.set_ylabel("fraction of ‖τ‖² kept (mean over Linear weights)")
        ax.set_title(label, fontsize=9)
        ax.set_ylim(0, 1.02)
    axes[-1].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def seeds(means: dict[str, list[float]], path: str, title: str) -> str:
    """Each method's mean test accuracy for every seed (dots) and their mean (bar)."""
    fig, (ax,) = _figure(max(5, 0.6 * len(means)), 4)
    labels = list(means)
    for i, label in enumerate(labels):
        vals = [100 * v for v in means[label] if v == v]
        if vals:
            ax.bar(i, sum(vals) / len(vals), color="#c9d6ea")
            ax.plot([i] * len(vals), vals, "o", color="#2a62b8", ms=4)
    ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("mean test accuracy (%)")
    ax.set_title(title, fontsize=10)
    lo = min((100 * v for vs in means.values() for v in vs if v == v), default=0)
    ax.set_ylim(max(0, lo - 5), None)
    return _save(fig, path)
