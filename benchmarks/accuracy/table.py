"""Run every merging method on a zoo: the rows of the accuracy table, with their evidence.

Protocol (the papers'): each task's head is fixed before fine-tuning and stays frozen, so every task
vector lives in the encoder; the merged *encoder* is evaluated with each task's frozen head. Rows:

* **Pretrained**: the pretrained encoder with each task's head (the λ = 0 end of every merge).
* **Individual**: each task's own fine-tuned encoder (the upper reference; normalized accuracy is
  merged / individual, per task).
* the merging methods, by registry name (an unknown name is the library's ``UnknownMethodError``).

Choices as the papers make them: a λ grid scored by mean accuracy on the labelled ``val`` split
(TA, TIES, CART, AWD-TA), with the paper's default λ evaluated beside the grid's choice; the
paper's fixed values elsewhere. Adaptive rows (AdaMerging, CART++, AdaRank, AWD-AdaMerging) are
**transductive**: they minimise the entropy on the unlabeled inputs of every task's ``test`` split
(labels are used only for accuracy), Adam (0.9, 0.999), batch 16 per task, for the step budget; the
entropy curve is then checked for a plateau (:func:`stats.plateau_step`) and rows without one are marked.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import nn

from mergemodules import hard_masks

from . import rowcache, stats
from .zoo import Zoo, _progress, encode

logger = logging.getLogger(__name__)

# the papers' grids
TA_GRID = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)  # Task Arithmetic, CART (papers/000 §C)
TIES_GRID = (0.4, 0.6, 0.8, 1.0, 1.2, 1.4, 1.6, 1.8)
AWD_SCALING_GRID = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)  # AWD-TA's λ (papers/003 §7.3)
AWD_ALPHA_GRID = (1e-2, 1e-3, 1e-4, 1e-5, 1e-6)  # AWD's α (papers/003 §7.3)
CART_RANKS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.0)


@dataclasses.dataclass(frozen=True)
class Row:
    """One row of the table: a reference or a registered method and how its hyperparameters are chosen."""

    label: str
    method: str | None  # registry name; None for the references
    grid: tuple[float, ...] = ()  # λ grid scored on val (empty: the paper's fixed value)
    tta: bool = False
    options: tuple[tuple[str, Any], ...] = ()
    init_from: str | None = None  # take the initial λ from another row's chosen λ (CART+AdaRank)
    alpha_from: str | None = None  # take AWD's α from another row's chosen α (AWD-AdaMerging)


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
    Row("AWD-AdaMerging", "awd_adamerging", tta=True, alpha_from="AWD-TA"),
)

#: the papers' orderings (item 8 of issue #12): checked on every suite with paired intervals
STATIC_ORDER = ("Weight Averaging", "Task Arithmetic", "TIES", "CART")
ADAPTIVE_ORDER = ("AdaMerging (layer-wise)", "CART++", "CART+AdaRank")

KEEP_FOR_PLOTS = ("TA+AdaRank", "CART+AdaRank")  # rows whose hard masks are handed back for the mask plot


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """How the rows are run: adaptation budget and plateau rule, grids, AWD, the CART rank sweep."""

    tta_steps: int = 500  # step budget (AdaMerging's 500 iterations), checked afterwards by the plateau rule
    tta_lr: float = 1e-3  # AdaMerging / AdaRank (vision)
    adarank_lr: float | None = None  # AdaRank rows' rate (None: tta_lr; the AdaRank paper uses 5e-5 for language)
    tta_batch_size: int = 16  # per task
    track_every: int = 25  # entropy curve: mean batch entropy per window of k steps; accuracy every k steps
    track_examples: int = 128  # accuracy vs step on the first n test examples of each task
    plateau_window: int = 100  # plateau: the last W steps gave ≤ plateau_rel of the decrease so far
    plateau_rel: float = 0.05
    plateau_tol: float = 1e-3  # ... plus this fraction of the initial entropy (numerical floor)
    stop_at_plateau: bool = True  # stop at the first window end where the rule holds (False: run the whole budget)
    grid_on_test: bool = False  # also score every grid λ on test (the diagnostic λ curves; never used to choose)
    awd_steps: int = 200
    awd_alphas: tuple[float, ...] = (1e-4,)
    cart_ranks: tuple[float, ...] = (0.02, 0.04, 0.08, 0.16, 0.32, 1.0)
    seed: int = 0
    rows: tuple[str, ...] | None = None  # subset of row labels (None: all)
    grid: tuple[float, ...] | None = None  # replaces every λ grid (tests, quick looks); None: the papers' grids

    def __post_init__(self) -> None:
        for name in ("tta_steps", "tta_batch_size", "track_every", "track_examples", "plateau_window", "awd_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"RunConfig.{name} must be a positive integer, got {value!r}")
        if self.plateau_window % self.track_every:
            raise ValueError(f"RunConfig.plateau_window ({self.plateau_window}) must be a multiple of "
                             f"track_every ({self.track_every})")
        if self.rows is not None:
            unknown = sorted(set(self.rows) - {r.label for r in ROWS})
            if unknown:
                raise ValueError(f"RunConfig.rows: unknown row(s) {unknown}; rows: {[r.label for r in ROWS]}")


@dataclasses.dataclass
class Result:
    """One row's outcome: test accuracy per task (and per example), the choices made and their evidence."""

    label: str
    method: str | None
    status: str  # "ok" | "diverged"
    test: dict[str, float] = dataclasses.field(default_factory=dict)
    correct: dict[str, np.ndarray] = dataclasses.field(default_factory=dict, repr=False)  # per test example
    val: dict[str, float] = dataclasses.field(default_factory=dict)
    chosen: dict[str, Any] = dataclasses.field(default_factory=dict)
    paper: dict[str, Any] = dataclasses.field(default_factory=dict)  # the paper's default λ: val/test accuracy
    curves: dict[str, list[tuple[float, float]]] = dataclasses.field(default_factory=dict)  # λ → mean (val/test)
    adaptation: dict[str, Any] = dataclasses.field(default_factory=dict)
    note: str = ""
    seconds: float = 0.0
    ran: str = ""  # when the row was run (UTC); a row read from the cache keeps its own

    @property
    def mean(self) -> float:
        """Mean test accuracy over tasks (NaN when the row has none)."""
        return sum(self.test.values()) / len(self.test) if self.test else float("nan")

    def ci(self) -> tuple[float, float, float]:
        """(mean, low, high): the 95 % interval of the mean over tasks (see :mod:`stats`)."""
        return stats.mean_ci(self.correct) if self.correct else (float("nan"),) * 3

    def cache_json(self) -> dict[str, Any]:
        """The fields but the per-example vectors (:mod:`rowcache` stores those beside)."""
        d = dataclasses.asdict(self)
        d.pop("correct")
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "Result":
        """A row back from :meth:`to_json` (without the per-example vectors: ``ci`` is then NaN)."""
        names = {f.name for f in dataclasses.fields(cls)} - {"correct"}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_json(self) -> dict[str, Any]:
        """Everything but the per-example vectors, plus the mean, its interval and per-task Wilson intervals."""
        d = self.cache_json()
        mean, lo, hi = self.ci()
        d.update(mean=mean, mean_ci=[lo, hi], n_test={k: len(v) for k, v in self.correct.items()},
                 test_ci={k: stats.wilson(int(v.sum()), len(v)) for k, v in self.correct.items()})
        return d


# --------------------------------------------------------------------------- evaluation
@torch.no_grad()
def predict(zoo: Zoo, encoder: nn.Module | Mapping[str, nn.Module], split: str,
            limit: int | None = None) -> dict[str, dict[str, np.ndarray]]:
    """Per task: per-example correctness and entropy of the frozen head on ``split`` (first ``limit`` examples).

    ``encoder`` is one encoder for every task or a mapping task name → its encoder.
    """
    out = {}
    for t in zoo.tasks:
        x, y = t.x[split][:limit], t.y[split][:limit]
        enc = encoder[t.name] if isinstance(encoder, Mapping) else encoder
        logits = t.head(encode(enc, x, zoo.config.eval_batch_size)).float().cpu()
        log_p = torch.log_softmax(logits, -1)
        out[t.name] = {"correct": (logits.argmax(-1) == y).numpy(),
                       "entropy": (-(log_p.exp() * log_p).sum(-1)).numpy()}
    return out


def _accuracies(pred: dict[str, dict[str, np.ndarray]]) -> dict[str, float]:
    return {k: float(v["correct"].mean()) for k, v in pred.items()}


def _entropies(pred: dict[str, dict[str, np.ndarray]]) -> dict[str, float]:
    return {k: float(v["entropy"].mean()) for k, v in pred.items()}


def _mean(d: dict[str, float]) -> float:
    return sum(d.values()) / len(d)


def _merge(zoo: Zoo, method: str, **options: Any) -> nn.Module:
    import mergemodules

    return mergemodules.merge(zoo.pretrained, [t.encoder for t in zoo.tasks], method, **options)


def _set_scaling(merged: nn.Module, value: float) -> None:
    with torch.no_grad():
        for p in merged.parameters():
            p.fill_(value)


def _paper_scaling(method: str) -> float:
    import mergemodules

    return float(mergemodules.get_method(method).scaling)


def _grid(zoo: Zoo, merged: nn.Module, row: Row, grid: tuple[float, ...]) -> dict[str, Any]:
    """Score every λ of ``grid`` on val (ties to the smaller λ) and the paper's λ beside them; sets the chosen λ."""
    paper = _paper_scaling(row.method)
    scores, paper_val = [], None
    for lam in _progress(grid, desc=f"{row.label}: λ grid"):
        _set_scaling(merged, lam)
        val = _accuracies(predict(zoo, merged.fuse(), "val"))
        scores.append((lam, _mean(val), val))
        if lam == paper:
            paper_val = val
    if paper_val is None:
        _set_scaling(merged, paper)
        paper_val = _accuracies(predict(zoo, merged.fuse(), "val"))
    best = max(scores, key=lambda s: (s[1], -s[0]))
    _set_scaling(merged, best[0])
    return {"scaling": best[0], "val": best[2], "curves": {"val": [(lam, m) for lam, m, _ in scores], "test": []},
            "paper": {"scaling": paper, "val_mean": _mean(paper_val)}}


def _grid_on_test(zoo: Zoo, merged: nn.Module, info: dict[str, Any], grid: tuple[float, ...], curve: bool) -> None:
    """Fill in the chosen merge's test accuracy at the paper's λ and, with ``curve``, at every λ of ``grid``.

    Run once, for the winning α only (AWD-TA scores several): the test numbers never choose anything.
    """
    paper, tests = info["paper"], {}
    for lam in (_progress(grid, desc="λ curve on test") if curve else ()):
        _set_scaling(merged, lam)
        tests[lam] = _accuracies(predict(zoo, merged.fuse(), "test"))
        info["curves"]["test"].append((lam, _mean(tests[lam])))
    if paper["scaling"] not in tests:  # the paper's λ off the grid, or no curve asked for
        _set_scaling(merged, paper["scaling"])
        tests[paper["scaling"]] = _accuracies(predict(zoo, merged.fuse(), "test"))
    paper["test"] = tests[paper["scaling"]]
    paper["test_mean"] = _mean(paper["test"])
    _set_scaling(merged, info["scaling"])


# --------------------------------------------------------------------------- adaptation
def _coefs(merged: nn.Module) -> torch.Tensor:
    """Every λ as the merged weights use it (clamped to the method's range: AdaMerging's [0, 1]), once each."""
    coefs = {id(m.coef): m.task_coef() for m in merged.merged_tensors().values() if m.coef is not None}
    return torch.cat([c.detach().flatten().cpu() for c in coefs.values()])


def _lambda_stats(values: torch.Tensor) -> dict[str, float]:
    return {"mean": float(values.mean()), "min": float(values.min()), "max": float(values.max()), "n": int(values.numel())}


def _masks(merged: nn.Module) -> dict[str, torch.Tensor]:
    from mergemodules import hard_masks

    has_masks = any(n.endswith("mask_logits") for n, _ in merged.named_parameters())
    return {k: v.to("cpu", copy=True) for k, v in hard_masks(merged).items()} if has_masks else {}


def _mask_flips(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> dict[str, int]:
    if not before:
        return {}
    on = sum(int((~b & after[k]).sum()) for k, b in before.items())
    off = sum(int((b & ~after[k]).sum()) for k, b in before.items())
    return {"on_to_off": off, "off_to_on": on, "kept_before": sum(int(b.sum()) for b in before.values()),
            "kept_after": sum(int(a.sum()) for a in after.values()), "total": sum(b.numel() for b in before.values())}


def _entropy_curve(history: list[dict[str, Any]], start: dict[str, dict[str, np.ndarray]], rc: RunConfig
                   ) -> tuple[list[float], list[dict[str, Any]], int | None]:
    """(batch losses, the tracked curve, the plateau step or None) of an adaptation's history so far."""
    losses = [float(h["loss"]) for h in history if "loss" in h]
    accuracy = {h["step"]: _mean(h["accuracy"]) for h in history if "accuracy" in h}
    k = rc.track_every
    track = [{"step": 0, "entropy": sum(_entropies(start).values()), "accuracy": accuracy[0]}]
    track += [{"step": s, "entropy": float(np.mean(losses[s - k: s])), "accuracy": accuracy.get(s, float("nan"))}
              for s in range(k, len(losses) + 1, k)]
    # the rule compares means over whole windows of W steps (the last W vs the W before), with their noise
    smooth, se = [(0, track[0]["entropy"])], {}
    for s in range(k, len(losses) + 1, k):
        w = losses[max(0, s - rc.plateau_window): s]
        smooth.append((s, float(np.mean(w))))
        se[s] = float(np.std(w, ddof=1) / math.sqrt(len(w))) if len(w) > 1 else 0.0
    return losses, track, stats.plateau_step(smooth, rc.plateau_window, rc.plateau_rel, rc.plateau_tol, se=se)


def _adapt(zoo: Zoo, merged: nn.Module, row: Row, rc: RunConfig, start: dict[str, dict[str, np.ndarray]],
           checkpoint: Path | None = None) -> dict[str, Any]:
    """Entropy minimisation on every task's unlabeled test inputs up to the step budget, with the plateau rule.

    The library's loop in chunks of ``plateau_window`` steps, each resumed from the previous one's checkpoint
    (Adam state and data order carried over: the same numbers as one uninterrupted call); with
    ``rc.stop_at_plateau`` it stops after the first chunk at whose end the rule holds. The entropy curve: E(0) over
    all test inputs, then the mean batch entropy over each window of ``track_every`` steps (plotted); the
    plateau rule compares the means of the last ``plateau_window`` steps and of the window before. Accuracy on
    the first ``track_examples`` test examples of each task every ``track_every`` steps (labels used only there).
    With ``checkpoint`` (a file kept across runs) the state is saved every ``plateau_window`` steps and a run
    killed mid-row resumes from it: the same numbers as one uninterrupted run.
    """
    from torch.utils.data import DataLoader, TensorDataset

    from mergemodules import Task, adapt

    from .models import PAD_ID

    lr = rc.adarank_lr if (rc.adarank_lr is not None and "adarank" in row.method) else rc.tta_lr
    tasks = {t.name: Task(DataLoader(TensorDataset(t.x["test"]), batch_size=rc.tta_batch_size, shuffle=True), t.head)
             for t in zoo.tasks}
    tracked = {t.name: [(t.x["test"][:rc.track_examples], t.y["test"][:rc.track_examples])] for t in zoo.tasks}
    coef0, masks0 = _coefs(merged), _masks(merged)
    budgets = list(range(rc.plateau_window, rc.tta_steps, rc.plateau_window)) + [rc.tta_steps]
    history: list[dict[str, Any]] = []
    saved = _saved_step(checkpoint)
    # chunks resumed from a checkpoint: bit-identical to one run; a scratch file when the caller keeps none
    with (contextlib.nullcontext() if checkpoint else tempfile.TemporaryDirectory()) as tmp:
        for budget in (budgets if rc.stop_at_plateau else budgets[-1:]):
            if budget < saved:  # run before the interruption, without a plateau (or the row would have stopped)
                continue
            history = adapt(merged, tasks, steps=budget, lr=lr, seed=rc.seed, eval_data=tracked,
                            eval_every=rc.track_every, checkpoint=checkpoint or os.path.join(tmp, "adapt.pt"),
                            checkpoint_every=rc.plateau_window, resume=bool(history) or saved > 0,
                            progress=os.environ.get("MERGEMODULES_BENCH_QUIET") != "1", pad_id=PAD_ID)
            losses, track, plateau = _entropy_curve(history, start, rc)
            if plateau is not None:
                break
    coef1 = _coefs(merged)
    return {"steps": len(losses), "budget": rc.tta_steps, "lr": lr, "batch_size": rc.tta_batch_size,
            "converged": plateau is not None, "plateau_step": plateau, "stop_at_plateau": rc.stop_at_plateau,
            "resumed_at_step": saved or None,
            "rule": {"window": rc.plateau_window, "rel": rc.plateau_rel, "tol": rc.plateau_tol, "every": rc.track_every,
                     "tracked": rc.track_examples},
            "entropy_before": _entropies(start), "accuracy_before": _accuracies(start), "track": track,
            "batch_loss": [round(v, 5) for v in losses],
            "lambda_before": _lambda_stats(coef0), "lambda_after": _lambda_stats(coef1),
            "lambda_change": {"mean_abs": float((coef1 - coef0).abs().mean()), "max_abs": float((coef1 - coef0).abs().max())},
            "mask_flips": _mask_flips(masks0, _masks(merged))}


def utc_now() -> str:
    """The current time as the benchmark writes it: ``YYYY-MM-DD HH:MM UTC``."""
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())


def _saved_step(checkpoint: Path | None) -> int:
    """The step an earlier run of this row saved in ``checkpoint`` (0: none; an unreadable file is removed)."""
    if checkpoint is None or not checkpoint.is_file():
        return 0
    try:
        return int(torch.load(checkpoint, map_location="cpu", weights_only=True)["step"])
    except Exception as e:  # a file cut short by a kill between writes: atomic_write makes this unlikely
        logger.warning("%s: unreadable adaptation checkpoint (%s); the row starts over", checkpoint, e)
        checkpoint.unlink()
        return 0


# --------------------------------------------------------------------------- rows
def _set_test(res: Result, pred: dict[str, dict[str, np.ndarray]]) -> None:
    res.correct = {k: v["correct"] for k, v in pred.items()}
    res.test = _accuracies(pred)


def _options(row: Row, rc: RunConfig, chosen: dict[str, dict[str, Any]], res: Result) -> dict[str, Any]:
    options = dict(row.options)
    if row.init_from:
        options["scaling"] = _handed(row, row.init_from, "scaling", chosen, "initial λ")
        res.chosen["scaling_init"] = options["scaling"]
    if row.method.startswith("awd"):
        options["steps"] = rc.awd_steps
    return options


def _handed(row: Row, source: str | None, key: str, chosen: dict[str, dict[str, Any]], what: str) -> Any:
    """The ``key`` that the ``source`` row chose, handed on to ``row``; an error when that row has not run."""
    if key not in chosen.get(source or "", {}):
        raise ValueError(f"{row.label}: its {what} comes from the {source} row; run that row too")
    return chosen[source][key]


def _handed_alpha(row: Row, rc: RunConfig, chosen: dict[str, dict[str, Any]]) -> float:
    """AWD's α for a row without an α grid: the ``alpha_from`` row's choice, or the only α of ``rc.awd_alphas``."""
    if len(rc.awd_alphas) == 1 and "alpha" not in chosen.get(row.alpha_from or "", {}):
        return rc.awd_alphas[0]
    return _handed(row, row.alpha_from, "alpha", chosen, "α")


def run_row(zoo: Zoo, row: Row, rc: RunConfig, chosen: dict[str, dict[str, Any]],
            keep: dict[str, nn.Module] | None = None, scratch: Path | None = None) -> Result:
    """Run one row: merge, choose (grid on val / paper value / adaptation), evaluate on test.

    ``scratch``: a folder kept across runs for the row's adaptation checkpoints (resumed if present).
    """
    t0 = time.time()
    res = Result(row.label, row.method, "ok")
    try:
        if row.label == "Pretrained":
            _set_test(res, predict(zoo, zoo.pretrained, "test"))
        elif row.label == "Individual":
            _set_test(res, predict(zoo, {t.name: t.encoder for t in zoo.tasks}, "test"))
        else:
            options = _options(row, rc, chosen, res)
            grid = (rc.grid if rc.grid is not None else row.grid) if row.grid else ()
            alphas: tuple[float | None, ...] = (None,)
            if row.method.startswith("awd"):
                alphas = rc.awd_alphas if grid else (_handed_alpha(row, rc, chosen),)
            best: tuple[float, nn.Module, dict[str, Any]] | None = None
            for alpha in alphas:
                opts = dict(options) | ({"alpha": alpha} if alpha is not None else {})
                merged = _merge(zoo, row.method, **opts)
                info: dict[str, Any] = {"alpha": alpha} if alpha is not None else {}
                if grid:
                    info.update(_grid(zoo, merged, row, grid))
                    score = _mean(info["val"])
                else:
                    score = 0.0
                    if row.tta:
                        start = predict(zoo, merged.fuse(), "test")
                        name = "adapt.pt" if alpha is None else f"adapt-alpha{alpha:g}.pt"
                        info["adaptation"] = _adapt(zoo, merged, row, rc, start, scratch and scratch / name)
                if best is None or score > best[0]:
                    best = (score, merged, info)
            assert best is not None
            _, merged, info = best
            if grid:
                _grid_on_test(zoo, merged, info, grid, rc.grid_on_test)
            res.val, res.paper, res.curves = info.pop("val", {}), info.pop("paper", {}), info.pop("curves", {})
            res.adaptation = info.pop("adaptation", {})
            res.chosen.update(info)
            pred = predict(zoo, merged.fuse(), "test")
            _set_test(res, pred)
            if res.adaptation:
                res.adaptation["entropy_after"] = _entropies(pred)
            if keep is not None and row.label in KEEP_FOR_PLOTS:
                keep[row.label] = {k: v.cpu() for k, v in hard_masks(merged).items()}
    except FloatingPointError as e:  # TTA diverged: report it, never a number
        res.status, res.note, res.test, res.correct = "diverged", str(e), {}, {}
        logger.error("%s: diverged (%s)", row.label, e)
    res.seconds = round(time.time() - t0, 1)
    res.ran = utc_now()
    if res.status == "ok":
        logger.info("%s: mean test accuracy %.4f (%s) in %.0fs", row.label, res.mean, res.chosen or "-", res.seconds)
    return res


def _sources(rc: RunConfig, given: set[str]) -> set[str]:
    """The rows that ``rc.rows`` take a choice from (CART's λ, AWD-TA's α) and that ``given`` does not supply."""
    assert rc.rows is not None
    rows = [r for r in ROWS if r.label in rc.rows]
    need = {r.init_from for r in rows if r.init_from}
    need |= {r.alpha_from for r in rows if r.alpha_from and len(rc.awd_alphas) > 1}
    return need - given


def run_all(zoo: Zoo, rc: RunConfig, keep: dict[str, dict[str, torch.Tensor]] | None = None,
            on_result: Callable[[Result], None] | None = None, cache: bool = True,
            given: dict[str, dict[str, Any]] | None = None) -> list[Result]:
    """Every row of :data:`ROWS` (or ``rc.rows`` and the rows their handed-on choices come from) in order.

    ``keep`` receives the hard masks of the :data:`KEEP_FOR_PLOTS` rows; with ``cache`` a row whose inputs are
    unchanged is read from :mod:`rowcache` instead of run, and every row run is stored there. ``given``: the
    choices of rows not run here (label -> chosen settings, from an earlier run of the same configuration and
    seed), handed on as if those rows had run, so a subset re-run starts from the earlier run's λ and α.
    """
    given = given or {}
    wanted = None if rc.rows is None else set(rc.rows) | _sources(rc, set(given))
    chosen: dict[str, dict[str, Any]] = {}
    results = []
    for row in ROWS:
        if wanted is not None and row.label not in wanted:
            if row.label in given:
                chosen[row.label] = given[row.label]
            continue
        k = rowcache.key(zoo, row.label, rc, chosen)
        hit = rowcache.load(zoo, row.label, k) if cache else None
        if hit:
            obj, correct, masks = hit
            r = Result(**obj, correct=correct)
            logger.info("%s: mean test accuracy %.4f (from the row cache)", row.label, r.mean)
        else:
            kept: dict[str, dict[str, torch.Tensor]] = {}
            r = run_row(zoo, row, rc, chosen, kept, scratch=rowcache.scratch(zoo, row.label, k) if cache else None)
            masks = kept.get(row.label, {})
            rowcache.save(zoo, row.label, k, r.cache_json(), r.correct, masks)
        if keep is not None and masks:
            keep[row.label] = masks
        chosen[row.label] = r.chosen
        results.append(r)
        if on_result:
            on_result(r)
    return results


def cart_rank_sweep(zoo: Zoo, ranks: tuple[float, ...], split: str = "test") -> list[tuple[float, float]]:
    """CART (λ = 1, the paper's value) mean accuracy against the kept rank fraction γ."""
    out = []
    for r in _progress(ranks, desc="CART rank sweep"):
        merged = _merge(zoo, "cart", rank=r, scaling=1.0)
        out.append((r, _mean(_accuracies(predict(zoo, merged.fuse(), split)))))
        logger.info("CART rank %.2f: mean %s accuracy %.4f", r, split, out[-1][1])
    return out
