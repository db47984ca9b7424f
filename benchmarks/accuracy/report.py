"""One suite end to end (zoo, every row, diagnostics, plots, JSON, its RESULTS.md sections), and seeds."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import re
import time
from typing import Any, Callable, Sequence

import torch

from . import diagnostics, plots, rowcache, stats
from . import table as T
from .zoo import SuiteConfig, Zoo, atomic_write_json, build_zoo

logger = logging.getLogger(__name__)

SPECTRUM_FRACTIONS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.0)


def _load() -> str:
    try:
        return " / ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def machine_line(device: torch.device | None = None) -> str:
    """The machine in one line: the GPU the zoo runs on (if any), cores, CPU model, torch and its threads, Python, OS."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    gpu = f"{torch.cuda.get_device_name(device)} GPU, " if device is not None and device.type == "cuda" else ""
    return (f"{gpu}{os.cpu_count()} CPU cores ({cpu}), torch {torch.__version__} with {torch.get_num_threads()} threads, "
            f"Python {platform.python_version()}, {platform.system()} {platform.release()}")


def write_section(md_path: str, key: str, body: str) -> None:
    """Replace (or append) the block between this benchmark's ``key`` markers; the rest of the file is kept."""
    from mergemodules.files import atomic_write

    begin, end = f"<!-- benchmarks.accuracy {key} BEGIN -->", f"<!-- benchmarks.accuracy {key} END -->"
    block = f"{begin}\n{body.rstrip()}\n{end}\n"
    text = ""
    if os.path.isfile(md_path):
        with open(md_path) as f:
            text = f.read()
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end) + r"\n?", re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text)
    else:
        text = (text or "# Benchmark results\n").rstrip() + "\n\n" + block

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    os.makedirs(os.path.dirname(md_path) or ".", exist_ok=True)
    atomic_write(md_path, write)


# --------------------------------------------------------------------------- tables
def _pct(x: float | None) -> str:
    return "–" if x is None or x != x else f"{100 * x:.1f}"


def _individual(results: list[T.Result]) -> dict[str, float]:
    ind = next((r for r in results if r.label == "Individual" and r.status == "ok"), None)
    return ind.test if ind else {}


def normalized(r: T.Result, individual: dict[str, float]) -> dict[str, float]:
    """Per task merged / individual accuracy (the papers' normalized accuracy); empty without the Individual row."""
    if not individual or r.status != "ok":
        return {}
    return {k: v / individual[k] for k, v in r.test.items() if individual.get(k)}


def _settings(r: T.Result) -> str:
    parts = [f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.chosen.items()]
    a = r.adaptation
    if a:
        parts.append(f"{a['steps']} steps{'' if a['converged'] else ' (NO plateau)'}")
    return ", ".join(parts)


def accuracy_table(zoo: Zoo, results: list[T.Result]) -> str:
    """Absolute test accuracy per task (± the larger side of the Wilson 95 % interval), mean [95 % CI], normalized."""
    names, individual = zoo.names, _individual(results)
    n = {t.name: len(t.y["test"]) for t in zoo.tasks}
    lines = ["| method | " + " | ".join(f"{m} (n={n[m]})" for m in names)
             + " | mean [95 % CI] | normalized mean | settings (chosen on val / adaptation) |",
             "| --- | " + " | ".join("---:" for _ in names) + " | ---: | ---: | --- |"]
    for r in results:
        if r.status != "ok":
            lines.append(f"| {r.label} | " + " | ".join([r.status] * (len(names) + 2)) + f" | {r.note[:80]} |")
            continue
        cells = []
        for m in names:
            c = r.correct[m]
            lo, hi = stats.wilson(int(c.sum()), len(c))
            p = r.test[m]
            cells.append(f"{100 * p:.1f} ±{100 * max(p - lo, hi - p):.1f}")
        mean, lo, hi = r.ci()
        norm = normalized(r, individual)
        nm = _pct(sum(norm.values()) / len(norm)) if norm else "–"
        lines.append(f"| {r.label} | " + " | ".join(cells)
                     + f" | **{100 * mean:.1f}** [{100 * lo:.1f}, {100 * hi:.1f}] | {nm} | {_settings(r)} |")
    return "\n".join(lines)


def normalized_table(zoo: Zoo, results: list[T.Result]) -> str:
    """Normalized accuracy (%) per task: merged / individual."""
    individual = _individual(results)
    lines = ["| method | " + " | ".join(zoo.names) + " | mean |", "| --- | " + " | ".join("---:" for _ in zoo.names) + " | ---: |"]
    for r in results:
        norm = normalized(r, individual)
        if norm and r.label != "Individual":
            lines.append(f"| {r.label} | " + " | ".join(_pct(norm.get(m)) for m in zoo.names)
                         + f" | **{_pct(sum(norm.values()) / len(norm))}** |")
    return "\n".join(lines)


def grid_table(results: list[T.Result]) -> str:
    """λ chosen on val beside the paper's default λ, both evaluated on test."""
    lines = ["| method | λ chosen on val | val mean at it | test mean at it | paper's λ | val mean at it | test mean at it |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        if r.paper:
            val_mean = sum(r.val.values()) / len(r.val) if r.val else float("nan")
            lines.append(f"| {r.label} | {r.chosen['scaling']:g} | {_pct(val_mean)} | {_pct(r.mean)} | "
                         f"{r.paper['scaling']:g} | {_pct(r.paper['val_mean'])} | {_pct(r.paper['test_mean'])} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def adaptation_table(results: list[T.Result]) -> str:
    """Per adaptive row: steps and plateau, entropy over all test inputs before → after, accuracy, λ, mask flips."""
    lines = ["| method | lr | steps (budget) | plateau | entropy, all test inputs (Σ tasks) | test mean acc | "
             "λ mean [min, max] before → after | mean \\|Δλ\\| (max) | masks kept, on→off / off→on |",
             "| --- | ---: | ---: | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        a = r.adaptation
        if not a or "entropy_after" not in a:
            continue
        eb, ea = sum(a["entropy_before"].values()), sum(a["entropy_after"].values())
        ab = sum(a["accuracy_before"].values()) / len(a["accuracy_before"])
        lb, la = a["lambda_before"], a["lambda_after"]
        f = a["mask_flips"]
        masks = (f"{f['kept_before']} → {f['kept_after']} of {f['total']}, {f['on_to_off']} / {f['off_to_on']}"
                 if f else "–")
        lines.append(
            f"| {r.label} | {a['lr']:g} | {a['steps']} ({a['budget']}) | "
            f"{'at step ' + str(a['plateau_step']) if a['converged'] else '**not reached**'} | "
            f"{eb:.3f} → {ea:.3f} | {_pct(ab)} → {_pct(r.mean)} | "
            f"{lb['mean']:.3f} [{lb['min']:.2f}, {lb['max']:.2f}] → {la['mean']:.3f} [{la['min']:.2f}, {la['max']:.2f}] | "
            f"{a['lambda_change']['mean_abs']:.3f} ({a['lambda_change']['max_abs']:.3f}) | {masks} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def ordering_lines(results: list[T.Result]) -> list[str]:
    """The papers' two orderings, each judged with paired 95 % intervals on the test examples."""
    correct = {r.label: r.correct for r in results if r.status == "ok" and r.correct}
    return [stats.ordering(T.STATIC_ORDER, correct), stats.ordering(T.ADAPTIVE_ORDER, correct)]


def _off_diagonal_abs(m: list[list[float]]) -> float:
    vals = [abs(v) for i, row in enumerate(m) for j, v in enumerate(row) if i != j]
    return sum(vals) / len(vals) if vals else float("nan")


def diagnostics_line(results: list[T.Result], diag: dict[str, Any]) -> str:
    """The diagnostics in numbers, for reading the orderings: interference, spectra, λ choices, adaptation."""
    def top8(spectra):
        return sum(dict(v)[0.08] for v in spectra.values()) / len(spectra)

    parts = [f"mean off-diagonal |cos| of τ {_off_diagonal_abs(diag['cosine']):.2f} (of centered τ̄ "
             f"{_off_diagonal_abs(diag['cosine_centered']):.2f})",
             f"the top 8 % of singular values keep {top8(diag['spectra']):.2f} of ‖τ‖² ({top8(diag['spectra_centered']):.2f} of ‖τ̄‖²)"]
    for r in results:
        if r.paper:
            parts.append(f"{r.label} λ {r.chosen['scaling']:g} on val vs paper {r.paper['scaling']:g}: test "
                         f"{100 * r.mean:.1f} vs {100 * r.paper['test_mean']:.1f}")
    stuck = [r.label for r in results if r.adaptation and not r.adaptation["converged"]]
    if stuck:
        parts.append(f"no entropy plateau within the budget: {', '.join(stuck)}")
    return "Diagnostics in numbers: " + "; ".join(parts) + "."


def cosine_table(names: list[str], m: list[list[float]]) -> str:
    """A cosine matrix as a Markdown table."""
    lines = ["| | " + " | ".join(names) + " |", "| --- | " + " | ".join("---:" for _ in names) + " |"]
    lines += [f"| {a} | " + " | ".join(f"{v:.2f}" for v in row) + " |" for a, row in zip(names, m)]
    return "\n".join(lines)


def _zoo_table(zoo: Zoo) -> str:
    def pct(d):
        return "–" if not d else f"{100 * d['test']:.1f}"

    lines = ["| task | source (package: input -> label) | classes | train / val / test | initial (frozen) head | "
             "linear probe | fine-tuned (Individual) |", "| --- | --- | ---: | --- | ---: | ---: | ---: |"]
    for t in zoo.tasks:
        s = t.entry.get("sizes", {})
        lines.append(f"| {t.name} | {t.data.source} | {len(t.data.classes)} | {s.get('train')} / {s.get('val')} / "
                     f"{s.get('test')} | {pct(t.entry.get('zero_shot_accuracy'))} | "
                     f"{pct(t.entry.get('linear_probe_accuracy'))} | {pct(t.entry['accuracy'])} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- one suite
def _plots(zoo: Zoo, results: list[T.Result], sweep, diag: dict[str, Any], keep: dict[str, dict[str, torch.Tensor]],
           plots_dir: str, tag: str) -> dict[str, str]:
    suite, out = zoo.config.suite, {}
    by_label = {r.label: r for r in results if r.status == "ok"}
    path = lambda name: os.path.join(plots_dir, f"{name}_{tag}.png")  # noqa: E731
    if sweep:
        refs = {k: by_label[k].mean for k in ("Individual", "Weight Averaging", "Pretrained") if k in by_label}
        out["cart_rank"] = plots.cart_rank(sweep, refs, path("cart_rank"), f"CART on the {suite} suite ({len(zoo.tasks)} tasks)")
    for label, masks in keep.items():
        out[f"masks_{label}"] = plots.adarank_masks(masks, zoo.names, path(f"adarank_masks_{label.split('+')[0].lower()}"))
    tracks = {r.label: r.adaptation["track"] for r in by_label.values() if r.adaptation}
    if tracks:
        out["adaptation"] = plots.adaptation(tracks, path("adaptation"), f"{suite}: adaptation on the unlabeled test inputs")
    curves = {r.label: r.curves for r in by_label.values() if r.curves}
    if curves:
        out["lambda"] = plots.lambda_curves(curves, {k: by_label[k].chosen["scaling"] for k in curves},
                                            {k: by_label[k].paper["scaling"] for k in curves}, path("lambda"),
                                            f"{suite}: mean accuracy against λ")
    out["cosine"] = plots.cosine({"τ = θ_t − θ₀": diag["cosine"], "centered τ̄ = θ_t − θ_avg": diag["cosine_centered"]},
                                 zoo.names, path("cosine"), f"{suite}: cosine of task vectors")
    out["spectra"] = plots.spectra({"τ = θ_t − θ₀": diag["spectra"], "centered τ̄ = θ_t − θ_avg": diag["spectra_centered"]},
                                   path("spectra"), f"{suite}: singular-value spectra of the task vectors")
    return out


def _cached(zoo: Zoo, what: str, config: dict[str, Any], compute: Callable[[], Any], use_cache: bool) -> Any:
    """``compute()``'s JSON value, read from :mod:`rowcache` when its inputs are unchanged (and stored there)."""
    k = rowcache.key(zoo, what, config)
    hit = rowcache.load(zoo, what, k) if use_cache else None
    if hit:
        return hit[0]["value"]
    return rowcache.save(zoo, what, k, {"value": compute()})["value"]  # the stored form, as a later run reads it


def _diagnostics(zoo: Zoo) -> dict[str, Any]:
    return {"cosine": diagnostics.cosine(zoo), "cosine_centered": diagnostics.cosine(zoo, centered=True),
            "spectra": diagnostics.spectra(zoo, SPECTRUM_FRACTIONS),
            "spectra_centered": diagnostics.spectra(zoo, SPECTRUM_FRACTIONS, centered=True)}


def _rows_ran(results: list[T.Result]) -> str:
    """" (rows run from A to B)": when the rows ran, also those read from the cache (a cached pass's date is not)."""
    ran = sorted(r.ran for r in results if r.ran)
    if not ran:
        return ""
    return f" (rows run at {ran[0]})" if ran[0] == ran[-1] else f" (rows run from {ran[0]} to {ran[-1]})"


def _body(cfg: SuiteConfig, zoo: Zoo, results: list[T.Result], sweep, diag, rel: dict[str, str], extra: dict[str, Any],
          built: str, rc: T.RunConfig) -> str:
    s = extra["seconds"]
    title = {"full": "full", "default": "reduced default"}.get(extra["preset"], extra["preset"])
    body = [f"## Benchmark: {cfg.suite} suite ({title}, seed {cfg.seed})", "",
            f"`{extra['command']}` — {extra['date']}{_rows_ran(results)}; {extra['machine']}.",
            f"Wall time {s['total']:.0f} s (zoo {built}: {s['zoo']:.0f} s; methods {s['methods']:.0f} s), CPU time "
            f"{s['cpu']:.0f} s; load average (1/5/15 min) {extra['load_average']['start']} at the start, "
            f"{extra['load_average']['end']} at the end.", "",
            "Accuracy (%) of the merged encoder with each task's frozen head on the test split (n per task in the "
            "header). Per task: ± the larger side of the Wilson 95 % interval; mean: 95 % normal interval of a mean "
            "of binomial proportions; normalized = merged / individual per task, averaged. λ grids are scored on "
            "the labelled val split; adaptive rows adapt on the unlabeled test inputs (labels only for accuracy).", "",
            accuracy_table(zoo, results), "", "**The papers' orderings** (paired differences on the same test "
            "examples, percentage points [95 % CI]; `<` significant, `≈` within the interval, `>` reversed):", ""]
    body += [f"- {line}" for line in ordering_lines(results)] + ["", diagnostics_line(results, diag), ""]
    body += ["Normalized accuracy (%), merged / individual:", "", normalized_table(zoo, results), ""]
    grid = grid_table(results)
    if grid:
        body += ["λ chosen on val beside the paper's default λ (both on test):", "", grid, ""]
    adapt = adaptation_table(results)
    if adapt:
        body += [f"Adaptation (Adam (0.9, 0.999), batch {rc.tta_batch_size} per task, on every task's test inputs, "
                 f"{'up to ' if rc.stop_at_plateau else ''}{rc.tta_steps} steps"
                 f"{', stopping at the first window end where the rule holds' if rc.stop_at_plateau else ''}). "
                 f"Plateau rule on the entropy curve (E(0) over all test inputs, then the mean "
                 f"batch entropy of each {rc.track_every}-step window): plateau at step s when the entropy fell by at "
                 f"most {rc.plateau_rel:g} × its decrease since step 0 (+ {rc.plateau_tol:g} × E(0) + the 95 % noise of the "
                 f"window means) over the last "
                 f"{rc.plateau_window} steps (means over whole {rc.plateau_window}-step windows). Rows marked **not reached** "
                 "have no plateau within the budget.", "", adapt, ""]
    body += ["Diagnostics: cosine of the task vectors (flattened encoder) — τ = θ_t − θ₀:", "",
             cosine_table(zoo.names, diag["cosine"]), "", "centered τ̄ = θ_t − θ_avg:", "",
             cosine_table(zoo.names, diag["cosine_centered"]), "",
             "Fraction of ‖τ‖² in the top 8 % of singular values (mean over Linear weights): "
             + ", ".join(f"{k} {dict(v)[0.08]:.2f}" for k, v in diag["spectra"].items()) + "; centered: "
             + ", ".join(f"{k} {dict(v)[0.08]:.2f}" for k, v in diag["spectra_centered"].items()) + ".", ""]
    body += ["Zoo: every head fixed before fine-tuning and frozen; " f"{dataclasses.asdict(cfg.finetune)}:", "",
             _zoo_table(zoo), ""]
    if sweep:
        body += ["CART rank sweep (λ = 1, mean test accuracy): " + ", ".join(f"γ={r:g}: {100 * a:.1f}" for r, a in sweep), ""]
    body += [f"![{k}]({v})" for k, v in rel.items()]
    return "\n".join(body)


def run_suite(cfg: SuiteConfig, rc: T.RunConfig, *, cache_dir: str | None = None, rebuild: bool = False,
              results_md: str | None = None, plots_dir: str | None = None, json_dir: str | None = None,
              command: str = "python -m benchmarks.accuracy", preset: str = "default",
              device: str | torch.device = "cpu", given: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Build (or reuse) the zoo on ``device``, run every row, write JSON, plots and this suite's RESULTS.md section.

    ``given``: choices of rows not run here (:func:`given_choices`), handed on to the rows that need them.
    """
    t0, c0 = time.time(), time.process_time()
    load_start = _load()
    zoo = build_zoo(cfg, cache_dir, rebuild=rebuild, device=device)
    t_zoo = time.time() - t0
    tag = f"{cfg.suite}-{preset}" + (f"-seed{cfg.seed}" if cfg.seed else "")
    json_path = os.path.join(json_dir or zoo.directory, f"results-{tag}.json")
    base = {"suite": cfg.suite, "config": cfg.to_json(), "zoo": zoo.directory,
            "tasks": {t.name: {"n_test": len(t.y["test"]), "classes": len(t.data.classes), "source": t.data.source,
                               "individual": t.entry["accuracy"], "linear_probe": t.entry.get("linear_probe_accuracy")}
                      for t in zoo.tasks},
            "command": command, "preset": preset, "run_config": dataclasses.asdict(rc),
            "machine": machine_line(zoo.device)}

    def save(rows: list[T.Result], **extra: Any) -> None:  # after every row too: a run cut short keeps its rows
        obj = {**base, "rows_complete": False, "date": T.utc_now(),
               "results": [r.to_json() for r in rows], **extra}
        atomic_write_json(json.loads(json.dumps(obj, default=float)), json_path)

    keep: dict[str, dict[str, torch.Tensor]] = {}
    done: list[T.Result] = []
    results = T.run_all(zoo, rc, keep=keep, cache=not rebuild, given=given,
                        on_result=lambda r: (done.append(r), save(done)))
    sweep = _cached(zoo, "cart rank sweep", {"ranks": rc.cart_ranks}, lambda: T.cart_rank_sweep(zoo, rc.cart_ranks),
                    not rebuild) if rc.cart_ranks else []
    save(results, rows_complete=True, cart_rank_sweep=sweep)  # before the diagnostics, which take minutes
    diag = _cached(zoo, "diagnostics", {"fractions": SPECTRUM_FRACTIONS}, lambda: _diagnostics(zoo), not rebuild)
    t_methods = time.time() - t0 - t_zoo
    plot_paths = _plots(zoo, results, sweep, diag, keep, plots_dir, tag) if plots_dir else {}
    keep.clear()
    total, cpu = time.time() - t0, time.process_time() - c0
    extra = {"seconds": {"zoo": round(t_zoo, 1), "methods": round(t_methods, 1), "total": round(total, 1),
                         "cpu": round(cpu, 1)},
             "zoo_rebuilt": zoo.rebuilt, "cart_rank_sweep": sweep, "plots": plot_paths,
             "load_average": {"start": load_start, "end": _load()}, "diagnostics": diag,
             "orderings": ordering_lines(results), "date": T.utc_now()}
    save(results, rows_complete=True, **extra)
    built = "built from scratch" if "pretrained" in zoo.rebuilt else (
        f"reused from the cache, {len(zoo.rebuilt)} entries rebuilt" if zoo.rebuilt else "reused from the cache")
    summary = (f"{cfg.suite}: zoo {built} in {t_zoo:.0f} s, methods {t_methods:.0f} s, total {total:.0f} s "
               f"(CPU time {cpu:.0f} s; load average {load_start} -> {_load()}); raw results: {json_path}")
    if results_md:
        md_dir = os.path.dirname(os.path.abspath(results_md))
        rel = {k: os.path.relpath(os.path.abspath(v), md_dir) for k, v in plot_paths.items()}
        write_section(results_md, tag, _body(cfg, zoo, results, sweep, diag, rel, {**base, **extra}, built, rc))
    return {"zoo": zoo, "results": results, "table": accuracy_table(zoo, results), "orderings": ordering_lines(results),
            "summary": summary, "json": json_path, "plots": plot_paths}


def given_choices(path: str, cfg: SuiteConfig) -> dict[str, dict[str, Any]]:
    """Every row's chosen settings (λ, α, ...) from an earlier run's JSON on the same suite configuration and seed."""
    try:
        with open(path) as f:
            obj = json.load(f)
        earlier = obj["config"]
        if not isinstance(earlier, dict):
            raise TypeError("its config is not an object")
        given = {r["label"]: dict(r["chosen"]) for r in obj["results"] if r.get("status") == "ok"}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{path}: not a benchmark results JSON ({type(e).__name__}: {e})") from None
    ours = json.loads(json.dumps(cfg.to_json(), default=float))
    if earlier != ours:
        diff = sorted(k for k in set(earlier) | set(ours) if earlier.get(k) != ours.get(k))
        raise ValueError(f"{path}: ran on another zoo configuration (differs in {', '.join(diff)})")
    return given


# --------------------------------------------------------------------------- seeds
def seeds_table(per_seed: dict[int, list[T.Result]]) -> str:
    """Each method's mean test accuracy (and normalized mean) over seeds: mean ± sample std [min, max]."""
    seeds = sorted(per_seed)
    labels = [r.label for r in per_seed[seeds[0]]]
    lines = [f"| method | mean accuracy over {len(seeds)} seeds: mean ± std [min, max] | normalized mean ± std | "
             + " | ".join(f"seed {s}" for s in seeds) + " |", "| --- | ---: | ---: | " + " | ".join("---:" for _ in seeds) + " |"]
    over_seeds = _means_over_seeds(per_seed)
    for label in labels:
        rows = {s: next((r for r in per_seed[s] if r.label == label), None) for s in seeds}
        means = over_seeds[label]
        norms = []
        for s, r in rows.items():
            n = normalized(r, _individual(per_seed[s])) if r else {}
            norms.append(sum(n.values()) / len(n) if n else float("nan"))
        m, nm = stats.spread(means), stats.spread(norms)
        lines.append(f"| {label} | **{_pct(m['mean'])}** ± {_pct(m['std'])} [{_pct(m['min'])}, {_pct(m['max'])}] | "
                     f"{_pct(nm['mean'])} ± {_pct(nm['std'])} | " + " | ".join(_pct(x) for x in means) + " |")
    return "\n".join(lines)


def run_seeds(cfg: SuiteConfig, rc: T.RunConfig, seeds: Sequence[int], *, plots_dir: str | None = None,
              results_md: str | None = None, preset: str = "default", **kw: Any) -> dict[str, Any]:
    """One zoo per seed (data splits, fine-tuning and adaptation seeded alike); the spread of every row's mean."""
    if len(set(seeds)) != len(seeds) or not seeds:
        raise ValueError(f"seeds: need distinct seeds, got {list(seeds)}")
    outs = {}
    for s in seeds:  # the first seed's full section goes to RESULTS.md; every seed's JSON and plots are kept
        outs[s] = run_suite(dataclasses.replace(cfg, seed=s), dataclasses.replace(rc, seed=s), plots_dir=plots_dir,
                            results_md=results_md if s == seeds[0] else None, preset=preset, **kw)
    section = seeds_section(cfg.suite, preset, {s: o["results"] for s, o in outs.items()}, plots_dir=plots_dir,
                            results_md=results_md, orderings={s: o["orderings"] for s, o in outs.items()})
    return {"per_seed": outs, **section}


def seeds_ordering_lines(per_seed: dict[int, list[T.Result]]) -> list[str]:
    """The papers' two orderings judged over seeds (t intervals of the per-seed differences of the means)."""
    means = _means_over_seeds(per_seed)
    return [stats.seeds_ordering(T.STATIC_ORDER, means), stats.seeds_ordering(T.ADAPTIVE_ORDER, means)]


def _means_over_seeds(per_seed: dict[int, list[T.Result]]) -> dict[str, list[float]]:
    seeds = sorted(per_seed)
    labels = [r.label for r in per_seed[seeds[0]]]
    return {lab: [next((r.mean for r in per_seed[s] if r.label == lab and r.status == "ok"), float("nan"))
                  for s in seeds] for lab in labels}


def seeds_section(suite: str, preset: str, per_seed: dict[int, list[T.Result]], *, plots_dir: str | None = None,
                  results_md: str | None = None, runs: Sequence[str] = (),
                  orderings: dict[int, Sequence[str]] | None = None) -> dict[str, Any]:
    """The seeds table, the orderings over seeds, its plot and its RESULTS.md section (``runs``: a line on where
    each seed ran, if apart; ``orderings``: each seed's own ordering lines, paired on its test examples)."""
    seeds = sorted(per_seed)
    table, over_seeds = seeds_table(per_seed), seeds_ordering_lines(per_seed)
    tag = f"{suite}-{preset}-seeds"
    plot = None
    if plots_dir:
        plot = plots.seeds(_means_over_seeds(per_seed), os.path.join(plots_dir, f"seeds_{tag}.png"),
                           f"{suite}: each method's mean test accuracy over seeds {seeds}")
    if results_md:
        body = [f"## Benchmark: {suite} suite over seeds {seeds}", "",
                "One zoo per seed (its own data split, fine-tuning and adaptation seed); the spread is over seeds "
                "of each method's mean test accuracy (%).", "", *[f"- {line}" for line in runs], *([""] if runs else []),
                table, "", "**The papers' orderings over seeds** (each step: the mean over seeds of the difference of "
                "the two methods' mean accuracies, percentage points, with Student's t 95 % interval over the seeds, "
                "i.e. the zoo-to-zoo spread; `<` significant, `≈` within the interval, `>` reversed):", "",
                *[f"- {line}" for line in over_seeds], ""]
        if orderings:
            body += ["Per seed (paired 95 % intervals on that seed's test examples):", ""]
            body += [f"- seed {s}: {line}" for s in seeds for line in orderings.get(s, ())] + [""]
        if plot:
            body.append(f"![seeds]({os.path.relpath(os.path.abspath(plot), os.path.dirname(os.path.abspath(results_md)))})")
        write_section(results_md, tag, "\n".join(body))
    return {"table": table, "orderings": over_seeds, "plot": plot}


def seeds_from_json(paths: Sequence[str], *, plots_dir: str | None = None,
                    results_md: str | None = None) -> dict[str, Any]:
    """The seeds section of runs made apart (e.g. one seed per GPU session), from their ``results-*.json`` files.

    Every file must hold the same suite, preset and rows, each a different seed, from a run whose rows all ended.
    """
    runs, per_seed, orderings, first = [], {}, {}, None
    for path in paths:
        try:
            with open(path, encoding="utf-8") as f:
                obj = json.load(f)
            key = (obj["suite"], obj["preset"], obj["config"]["seed"], [r["label"] for r in obj["results"]])
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{path}: not a results-*.json file of `python -m benchmarks.accuracy` ({err})") from None
        suite, preset, seed, labels = key
        if obj.get("rows_complete") is False:  # files written before the flag existed were complete
            raise ValueError(f"{path}: a run cut short (its rows so far: {', '.join(labels) or 'none'})")
        first = first or (path, suite, preset, labels)
        if (suite, preset, labels) != first[1:]:
            raise ValueError(f"{path}: suite {suite!r}, preset {preset!r} and its rows differ from {first[0]}'s "
                             f"({first[1]!r}, {first[2]!r})")
        if seed in per_seed:
            raise ValueError(f"{path}: seed {seed} is already given by another file")
        per_seed[seed] = [T.Result.from_json(r) for r in obj["results"]]
        orderings[seed] = obj.get("orderings", [])
        runs.append(f"seed {seed}: `{obj.get('command', '?')}` — {obj.get('date', '?')}; {obj.get('machine', '?')}")
    if len(per_seed) < 2:
        raise ValueError(f"need the results of at least two seeds, got {len(per_seed)}")
    return seeds_section(first[1], first[2], per_seed, plots_dir=plots_dir, results_md=results_md, runs=runs,
                         orderings=orderings)
