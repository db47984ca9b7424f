"""One suite end to end: zoo, every method, the CART rank sweep, plots, JSON and the RESULTS.md section."""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import platform
import re
import time
from typing import Any

import torch

from . import table as T
from .zoo import SuiteConfig, build_zoo

logger = logging.getLogger(__name__)


def _load() -> str:
    try:
        return " / ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def machine_line() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return (f"{os.cpu_count()} CPU cores ({cpu}), torch {torch.__version__} with {torch.get_num_threads()} threads, "
            f"Python {platform.python_version()}, {platform.system()} {platform.release()}")


def plot_cart_rank(sweep: list[tuple[float, float]], refs: dict[str, float], path: str, title: str) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from mergemodules.io import atomic_write

    fig = Figure(figsize=(5.5, 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
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
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    return path


def plot_adarank_masks(merged: torch.nn.Module, names: list[str], path: str) -> str | None:
    """AdaRank's Figure 5 for a few layers (first, middle and last masked matrices), if the library has it."""
    try:
        from mergemodules.masks import hard_masks, plot_masks
    except ImportError as e:
        logger.warning("AdaRank mask plot: missing (%s)", e)
        return None
    layers = list(hard_masks(merged))
    if not layers:
        return None
    pick = sorted({0, len(layers) // 2, len(layers) - 1, 1, len(layers) - 2} & set(range(len(layers))))
    plot_masks(merged, path, layers=[layers[i] for i in pick], task_names=names, fraction=0.5)
    return path


def _section(md_path: str, key: str, body: str) -> None:
    """Replace (or append) the block between this benchmark's markers; the rest of the file is kept."""
    from mergemodules.io import atomic_write

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
        if not text:
            text = "# Benchmark results\n"
        text = text.rstrip() + "\n\n" + block
    os.makedirs(os.path.dirname(md_path) or ".", exist_ok=True)

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    atomic_write(md_path, write)


HEAD_INIT = {"zeroshot": "a zero-shot head (class descriptions)", "probe": "a linear probe",
             "prototype": "a {shots}-shot prototype head (class means of {shots} train examples)"}


def _zoo_table(zoo) -> str:
    def pct(d):
        return "–" if not d else f"{100 * d['test']:.1f}"

    lines = ["| task | source (package: input -> label) | classes | train / val / tta / test | initial head (zero-shot / few-shot) | "
             "linear probe | fine-tuned (Individual) |", "| --- | --- | ---: | --- | ---: | ---: | ---: |"]
    for t in zoo.tasks:
        s = t.entry.get("sizes", {})
        lines.append(f"| {t.name} | {t.data.source} | {len(t.data.classes)} | {s.get('train')} / {s.get('val')} / "
                     f"{s.get('tta')} / {s.get('test')} | {pct(t.entry.get('zero_shot_accuracy'))} | "
                     f"{pct(t.entry.get('linear_probe_accuracy'))} | {pct(t.entry['accuracy'])} |")
    return "\n".join(lines)


def run_suite(cfg: SuiteConfig, rc: T.RunConfig, *, cache_dir: str | None = None, rebuild: bool = False,
              results_md: str | None = None, plots_dir: str | None = None, json_dir: str | None = None,
              command: str = "python -m benchmarks.accuracy", preset: str = "default") -> dict[str, Any]:
    t0, c0 = time.time(), time.process_time()
    load_start = _load()
    zoo = build_zoo(cfg, cache_dir, rebuild=rebuild)
    t_zoo = time.time() - t0
    keep: dict[str, torch.nn.Module] = {}
    results = T.run_all(zoo, rc, keep=keep)
    t_methods = time.time() - t0 - t_zoo
    sweep: list[tuple[float, float]] = []
    plots: dict[str, str] = {}
    try:
        sweep = T.cart_rank_sweep(zoo, rc.cart_ranks)
    except T.MissingMethod as e:
        logger.warning("CART rank sweep: missing (%s)", e)
    by_label = {r.label: r for r in results}
    if plots_dir:
        tag = f"{cfg.suite}-{preset}"
        if sweep:
            refs = {k: by_label[k].mean for k in ("Individual", "Weight Averaging", "Pretrained")
                    if k in by_label and by_label[k].status == "ok"}
            plots["cart_rank"] = plot_cart_rank(sweep, refs, os.path.join(plots_dir, f"cart_rank_{tag}.png"),
                                                f"CART on the {cfg.suite} suite ({len(zoo.tasks)} tasks)")
        for label in ("CART+AdaRank", "TA+AdaRank"):
            if label in keep:
                path = plot_adarank_masks(keep[label], zoo.names, os.path.join(
                    plots_dir, f"adarank_masks_{label.split('+')[0].lower()}_{tag}.png"))
                if path:
                    plots[f"masks_{label}"] = path
    keep.clear()
    total, cpu = time.time() - t0, time.process_time() - c0
    extra = {"command": command, "preset": preset, "seconds": {"zoo": round(t_zoo, 1), "methods": round(t_methods, 1),
                                                                 "total": round(total, 1), "cpu": round(cpu, 1)},
             "zoo_rebuilt": zoo.rebuilt, "cart_rank_sweep": sweep, "plots": plots, "run_config": dataclasses.asdict(rc),
             "machine": machine_line(), "load_average": {"start": load_start, "end": _load()},
             "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    obj = T.results_json(zoo, results, extra)
    json_path = os.path.join(json_dir or zoo.directory, f"results-{cfg.suite}-{preset}.json")
    os.makedirs(os.path.dirname(json_path), exist_ok=True)
    T.write_json(obj, json_path)
    table = T.markdown_table(zoo, results)
    built = "built from scratch" if "pretrained" in zoo.rebuilt else (
        f"reused from the cache, {len(zoo.rebuilt)} entries rebuilt" if zoo.rebuilt else "reused from the cache")
    summary = (f"{cfg.suite}: zoo {built} in {t_zoo:.0f} s, methods {t_methods:.0f} s, total {total:.0f} s "
               f"(CPU time {cpu:.0f} s; load average {load_start} -> {_load()}); raw results: {json_path}")
    if results_md:
        md_dir = os.path.dirname(os.path.abspath(results_md))
        rel = {k: os.path.relpath(os.path.abspath(v), md_dir) for k, v in plots.items()}
        title = {"full": "full", "default": "reduced default"}.get(preset, preset)
        body = [f"## Benchmark: {cfg.suite} suite ({title})", "",
                f"`{command}` — {extra['date']}; {machine_line()}.",
                f"Wall time {total:.0f} s (zoo {built}: {t_zoo:.0f} s; methods and plots {total - t_zoo:.0f} s), "
                f"CPU time {cpu:.0f} s; "
                f"load average (1/5/15 min) {load_start} at the start, {_load()} at the end — other processes "
                "shared the cores when the load exceeds the core count.", "",
                "Accuracy (%) of the merged encoder with each task's own fine-tuned head on the held-out test split "
                "(n = test examples per task). λ grids are scored on the labelled val split; TTA uses the unlabeled "
                "tta split. `missing` = the library has no such method yet.", "",
                table, "", "Zoo: every model fine-tuned (encoder and head) from the same pretrained encoder, "
                f"head initialised by {HEAD_INIT[cfg.finetune.head_init].format(shots=cfg.finetune.shots)}; "
                f"{dataclasses.asdict(cfg.finetune)}. Test accuracy (%) of the pretrained encoder with the initial heads, and of "
                "the fine-tuned models:", "", _zoo_table(zoo), ""]
        if sweep:
            body += ["CART rank sweep (λ = 1, mean test accuracy): " + ", ".join(f"γ={r:g}: {100 * a:.1f}" for r, a in sweep), ""]
        for k, v in rel.items():
            body.append(f"![{k}]({v})")
        _section(results_md, f"{cfg.suite}-{preset}", "\n".join(body))
    return {"zoo": zoo, "results": results, "table": table, "summary": summary, "json": json_path, "plots": plots}
