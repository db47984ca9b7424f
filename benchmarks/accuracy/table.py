"""Run every merging method on a zoo and produce the accuracy table.

Protocol (the papers'): the merged *encoder* is evaluated with each task's own fine-tuned head,
which stays fixed. Rows:

* **Pretrained**: the pretrained encoder with each task's fine-tuned head (the λ = 0 end of every
  merge; the papers' zero-shot row). The linear-probe accuracy on the frozen pretrained encoder is
  recorded in the zoo manifest too.
* **Individual**: each task's own fine-tuned encoder (the upper reference).
* the merging methods, looked up by registry name at run time. A name the library does not know
  (``mergemodules.UnknownMethodError``) or a missing TTA loop shows as ``missing``: never a number.

Hyperparameters as the papers choose them: a λ grid scored by mean accuracy on the held-out
labelled ``val`` split where the paper grids (TA, TIES, CART, AWD-TA); the paper's fixed values
elsewhere (TSV-M α = 1; AdaMerging/CART++/AdaRank: Adam, λ init from the paper, entropy on the
unlabeled ``tta`` split, batch 16). Test accuracy is computed once, after every choice is made.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from typing import Any, Callable

import torch
from torch import nn

from .zoo import Zoo, accuracy, atomic_write_json

logger = logging.getLogger(__name__)

# the papers' grids
TA_GRID = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)  # Task Arithmetic, CART (papers/000 §C)
TIES_GRID = (0.4, 0.6, 0.8, 1.0, 1.2, 1.4, 1.6, 1.8)
AWD_SCALING_GRID = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)  # papers/003 §7.3
AWD_ALPHA_GRID = (1e-2, 1e-3, 1e-4, 1e-5, 1e-6)
CART_RANKS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.0)


@dataclasses.dataclass(frozen=True)
class Row:
    label: str
    method: str | None  # registry name; None for the references
    grid: tuple[float, ...] = ()  # λ grid scored on val (empty: the paper's fixed value)
    tta: bool = False
    options: tuple[tuple[str, Any], ...] = ()
    init_from: str | None = None  # take the initial λ from another row's chosen λ (CART+AdaRank)


ROWS: tuple[Row, ...] = (
    Row("Pretrained", None),
    Row("Individual", None),
    Row("Weight Averaging", "weight_averaging"),
    Row("Task Arithmetic", "task_arithmetic", grid=TA_GRID),
    Row("TIES", "ties", grid=TIES_GRID),
    Row("TSV-M", "tsv"),
    Row("CART", "cart", grid=TA_GRID),
    Row("AdaMerging (task-wise)", "adamerging_taskwise", tta=True),
    Row("AdaMerging (layer-wise)", "adamerging_layerwise", tta=True),
    Row("CART++", "cart_pp", tta=True),
    Row("TA+AdaRank", "adarank_ta", tta=True),
    Row("CART+AdaRank", "adarank_cart", tta=True, init_from="CART"),
    Row("AWD-TA", "awd_ta", grid=AWD_SCALING_GRID),
    Row("AWD-AdaMerging", "awd_adamerging", tta=True),
)


KEEP_FOR_PLOTS = ("TA+AdaRank", "CART+AdaRank")  # merged models handed back for the mask plot (memory)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    tta_steps: int = 40
    tta_lr: float = 1e-3
    tta_batch_size: int = 16
    awd_steps: int = 200
    awd_alphas: tuple[float, ...] = (1e-4,)
    cart_ranks: tuple[float, ...] = (0.02, 0.04, 0.08, 0.16, 0.32, 1.0)
    seed: int = 0
    rows: tuple[str, ...] | None = None  # subset of row labels (None: all)
    grid: tuple[float, ...] | None = None  # replaces every λ grid (tests, quick looks); None: the papers' grids


@dataclasses.dataclass
class Result:
    label: str
    method: str | None
    status: str  # "ok" | "missing" | "diverged"
    test: dict[str, float] = dataclasses.field(default_factory=dict)
    val: dict[str, float] = dataclasses.field(default_factory=dict)
    chosen: dict[str, Any] = dataclasses.field(default_factory=dict)
    note: str = ""
    seconds: float = 0.0

    @property
    def mean(self) -> float:
        return sum(self.test.values()) / len(self.test) if self.test else float("nan")


class MissingMethod(Exception):
    """The library has no such method (or no TTA loop) yet."""


def _library():
    import mergemodules

    return mergemodules


def _unknown_method_error() -> type[BaseException]:
    try:
        from mergemodules import UnknownMethodError
    except ImportError:  # older core: nothing is registered yet
        return type("_NeverRaised", (Exception,), {})
    return UnknownMethodError


def _merge(zoo: Zoo, method: str, **options: Any) -> nn.Module:
    mm = _library()
    merge = getattr(mm, "merge", None)
    if merge is None:
        raise MissingMethod("mergemodules.merge does not exist")
    try:
        return merge(zoo.pretrained, [t.encoder for t in zoo.tasks], method, **options)
    except _unknown_method_error() as e:
        raise MissingMethod(str(e)) from None


def _evaluate(zoo: Zoo, encoder: nn.Module, split: str, batch_size: int) -> dict[str, float]:
    return {t.name: accuracy(encoder, t.head, t.x[split], t.y[split], batch_size) for t in zoo.tasks}


def _mean(d: dict[str, float]) -> float:
    return sum(d.values()) / len(d)


def _fused(merged: nn.Module) -> nn.Module:
    return merged.fuse() if hasattr(merged, "fuse") else merged


def _set_scaling(merged: nn.Module, value: float) -> None:
    with torch.no_grad():
        for p in merged.parameters():
            p.fill_(value)


def _grid(zoo: Zoo, merged: nn.Module, grid: tuple[float, ...], bs: int, desc: str) -> tuple[float, dict[str, float], list]:
    """Choose λ on the val split (mean accuracy; ties go to the smaller λ)."""
    from .zoo import _progress

    scores = []
    for lam in _progress(grid, desc=desc):
        _set_scaling(merged, lam)
        val = _evaluate(zoo, _fused(merged), "val", bs)
        scores.append((lam, _mean(val), val))
    best = max(scores, key=lambda s: (s[1], -s[0]))
    _set_scaling(merged, best[0])
    return best[0], best[2], [(lam, round(m, 4)) for lam, m, _ in scores]


def _adapt(zoo: Zoo, merged: nn.Module, rc: RunConfig) -> dict[str, Any]:
    try:
        from mergemodules.tta import Task as TTATask
        from mergemodules.tta import adapt
    except ImportError as e:
        raise MissingMethod(f"no test-time adaptation loop ({e})") from None
    tasks = {}
    for t in zoo.tasks:
        x = t.x["tta"]
        tasks[t.name] = TTATask(data=[x[i: i + rc.tta_batch_size] for i in range(0, len(x), rc.tta_batch_size)],
                                head=t.head)
    quiet = os.environ.get("MERGEMODULES_BENCH_QUIET") == "1"
    history = adapt(merged, tasks, steps=rc.tta_steps, lr=rc.tta_lr, seed=rc.seed, progress=not quiet)
    first, last = history[0] if history else {}, history[-1] if history else {}
    return {"steps": rc.tta_steps, "lr": rc.tta_lr, "batch_size": rc.tta_batch_size,
            "entropy_first": round(first.get("loss", float("nan")), 4),
            "entropy_last": round(last.get("loss", float("nan")), 4)}


def run_row(zoo: Zoo, row: Row, rc: RunConfig, chosen: dict[str, dict[str, Any]],
            keep: dict[str, nn.Module] | None = None) -> Result:
    bs = zoo.config.eval_batch_size
    t0 = time.time()
    res = Result(row.label, row.method, "ok")
    try:
        if row.label == "Pretrained":
            res.test = _evaluate(zoo, zoo.pretrained, "test", bs)
        elif row.label == "Individual":
            res.test = {t.name: accuracy(t.encoder, t.head, t.x["test"], t.y["test"], bs) for t in zoo.tasks}
        else:
            options = dict(row.options)
            if row.init_from and "scaling" in chosen.get(row.init_from, {}):
                options["scaling"] = chosen[row.init_from]["scaling"]
                res.chosen["scaling_init"] = options["scaling"]
            alphas: tuple[float | None, ...] = (None,)
            if row.method and row.method.startswith("awd"):
                alphas = rc.awd_alphas if row.grid else (chosen.get("AWD-TA", {}).get("alpha", rc.awd_alphas[0]),)
                options["steps"] = rc.awd_steps
            grid = (rc.grid if rc.grid is not None else row.grid) if row.grid else ()
            best: tuple[float, Any, Any] | None = None
            for alpha in alphas:
                opts = dict(options)
                if alpha is not None:
                    opts["alpha"] = alpha
                merged = _merge(zoo, row.method, **opts)
                if grid:
                    lam, val, scores = _grid(zoo, merged, grid, bs, desc=f"{row.label}: λ grid")
                    info = {"scaling": lam, "grid": scores}
                    if alpha is not None:
                        info["alpha"] = alpha
                    if best is None or _mean(val) > _mean(best[1]):
                        best = (lam, val, (merged, info))
                else:
                    info = {"alpha": alpha} if alpha is not None else {}
                    if row.tta:
                        info.update(_adapt(zoo, merged, rc))
                    best = (float("nan"), {}, (merged, info))
            assert best is not None
            merged, info = best[2]
            res.chosen.update(info)
            if best[1]:
                res.val = best[1]
            fused = _fused(merged)
            res.test = _evaluate(zoo, fused, "test", bs)
            if keep is not None and row.label in KEEP_FOR_PLOTS:
                keep[row.label] = merged
    except MissingMethod as e:
        res.status, res.note = "missing", str(e)
        logger.warning("%s: missing (%s)", row.label, e)
    except FloatingPointError as e:  # TTA diverged: report it, never a number
        res.status, res.note, res.test = "diverged", str(e), {}
        logger.error("%s: diverged (%s)", row.label, e)
    res.seconds = round(time.time() - t0, 1)
    if res.status == "ok":
        logger.info("%s: mean test accuracy %.4f (%s) in %.0fs", row.label, res.mean, res.chosen or "-", res.seconds)
    return res


def run_all(zoo: Zoo, rc: RunConfig, keep: dict[str, nn.Module] | None = None,
            on_result: Callable[[Result], None] | None = None) -> list[Result]:
    chosen: dict[str, dict[str, Any]] = {}
    results = []
    for row in ROWS:
        if rc.rows is not None and row.label not in rc.rows:
            continue
        r = run_row(zoo, row, rc, chosen, keep)
        chosen[row.label] = r.chosen
        results.append(r)
        if on_result:
            on_result(r)
    return results


def cart_rank_sweep(zoo: Zoo, ranks: tuple[float, ...], split: str = "test") -> list[tuple[float, float]]:
    """CART (λ = 1, the paper's value) mean accuracy against the kept rank fraction γ."""
    from .zoo import _progress

    out = []
    for r in _progress(ranks, desc="CART rank sweep"):
        merged = _merge(zoo, "cart", rank=r, scaling=1.0)
        out.append((r, _mean(_evaluate(zoo, _fused(merged), split, zoo.config.eval_batch_size))))
        logger.info("CART rank %.2f: mean %s accuracy %.4f", r, split, out[-1][1])
    return out


# --------------------------------------------------------------------------- output
def _fmt(x: float) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def _chosen_str(r: Result) -> str:
    c = {k: v for k, v in r.chosen.items() if k not in ("grid",)}
    if not c:
        return ""
    parts = []
    for k, v in c.items():
        parts.append(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}")
    return ", ".join(parts)


def markdown_table(zoo: Zoo, results: list[Result]) -> str:
    names = zoo.names
    n = {t.name: len(t.y["test"]) for t in zoo.tasks}
    head = "| method | " + " | ".join(f"{m} (n={n[m]})" for m in names) + " | mean | chosen on val / settings |"
    sep = "| --- | " + " | ".join("---:" for _ in names) + " | ---: | --- |"
    lines = [head, sep]
    for r in results:
        if r.status != "ok":
            cells = [r.status] * len(names) + [r.status]
            note = r.note.split(";")[0][:80]
            lines.append(f"| {r.label} | " + " | ".join(cells) + f" | {note} |")
        else:
            cells = [_fmt(r.test.get(m, float("nan"))) for m in names] + [f"**{_fmt(r.mean)}**"]
            lines.append(f"| {r.label} | " + " | ".join(cells) + f" | {_chosen_str(r)} |")
    return "\n".join(lines)


def results_json(zoo: Zoo, results: list[Result], extra: dict[str, Any]) -> dict[str, Any]:
    return {
        "suite": zoo.config.suite, "config": zoo.config.to_json(), "zoo": zoo.directory,
        "tasks": {t.name: {"n_test": len(t.y["test"]), "classes": len(t.data.classes), "source": t.data.source,
                           "individual": t.entry["accuracy"], "linear_probe": t.entry.get("linear_probe_accuracy")}
                  for t in zoo.tasks},
        "results": [dataclasses.asdict(r) | {"mean": r.mean} for r in results],
        **extra,
    }


def write_json(obj: dict[str, Any], path: str) -> None:
    atomic_write_json(json.loads(json.dumps(obj, default=float)), path)
