"""``python -m benchmarks.accuracy``: build (or reuse) the zoo, merge with every method, print the table.

    python -m benchmarks.accuracy                 # reduced default: both suites, fewer tasks/steps
    python -m benchmarks.accuracy --full          # the full benchmark (all tasks, paper-like budgets)
    python -m benchmarks.accuracy --suite text    # one suite only
    python -m benchmarks.accuracy --cache DIR     # zoo cache (default $MERGEMODULES_BENCH_CACHE or ~/.cache/mergemodules/bench)
    python -m benchmarks.accuracy --results benchmarks/RESULTS.md --plots benchmarks/plots
    python -m benchmarks.accuracy --seeds 0,1,2   # one zoo per seed, the spread of every method's mean
    python -m benchmarks.accuracy --seeds-from a.json b.json c.json   # the same table from seeds run apart
    python -m benchmarks.accuracy --tasks-from my_tasks.py --suite my_suite   # your own tasks/backbone

Nothing is downloaded: the data and the pretrained text model come from installed packages
(``.ci/install-data.sh`` installs the Debian ones).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from . import plugins, presets
from .report import given_choices, run_seeds, run_suite, seeds_from_json


def _seeds(text: str) -> tuple[int, ...]:
    try:
        seeds = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds: comma-separated integers, got {text!r}") from None
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"--seeds: distinct seeds, got {text!r}")
    return seeds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.accuracy", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true", help="the full benchmark (all tasks, longer fine-tuning and TTA)")
    p.add_argument("--suite", default="all", help=f"one of {', '.join(presets.SUITES + presets.FULL_ONLY_SUITES)}, a suite "
                   "registered by --tasks-from, or 'all' (the built-in suites; the decoder suite only with --full)")
    p.add_argument("--tasks-from", action="append", default=[], metavar="FILE",
                   help="a Python file that registers your own tasks, backbones and suites (see the README); repeatable")
    p.add_argument("--seeds", type=_seeds, default=None,
                   help=f"comma-separated seeds, one zoo each (default: 0; --full: {','.join(map(str, presets.FULL_SEEDS))})")
    p.add_argument("--seeds-from", nargs="+", default=None, metavar="JSON",
                   help="run nothing: the seeds table of runs made apart (one seed each, e.g. one per GPU session), "
                        "from their results-*.json files; with --results/--plots, its section and plot")
    p.add_argument("--cache", default=None, help="zoo cache directory")
    p.add_argument("--rebuild", action="store_true", help="ignore the cache and rebuild the zoo")
    p.add_argument("--results", default=None, help="Markdown file to write this benchmark's sections into "
                   "(e.g. benchmarks/RESULTS.md); other sections of the file are kept")
    p.add_argument("--plots", default=None, help="directory for the plots (e.g. benchmarks/plots)")
    p.add_argument("--json", default=None, help="directory for the raw results as JSON (default: the zoo directory)")
    p.add_argument("--methods", default=None, help="comma-separated row labels to run (default: all)")
    p.add_argument("--chosen-from", default=None, metavar="JSON",
                   help="with --methods and one seed: the rows not run hand on their choices (CART's λ, AWD-TA's α) "
                        "from this earlier results JSON of the same suite and seed")
    p.add_argument("--tta-steps", type=int, default=None,
                   help="the adaptation's step budget (it stops earlier at a plateau unless --full)")
    p.add_argument("--adarank-lr", type=float, default=None,
                   help="AdaRank rows' learning rate (default: the AdaMerging rate 1e-3; the AdaRank paper's language "
                        "rate is 5e-5)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: torch's choice, or 1 when the load average exceeds the cores: "
                        "on a shared machine one thread is several times faster than threads that spin-wait)")
    p.add_argument("--device", default="cpu", help="torch device for fine-tuning, merging and adaptation (e.g. cuda); "
                   "the data stays on the CPU")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)

    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("transformers", "urllib3", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if args.quiet:
        os.environ["MERGEMODULES_BENCH_QUIET"] = "1"
    if args.seeds_from:
        try:
            out = seeds_from_json(args.seeds_from, plots_dir=args.plots, results_md=args.results)
        except ValueError as e:
            p.error(f"--seeds-from: {e}")
        print(out["table"])
        print("\n".join(f"- {line}" for line in out["orderings"]))
        return 0
    import torch

    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        p.error(f"--device: {args.device!r} is not a torch device ({e})")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device: {args.device!r}, but torch sees no CUDA GPU here")
    if args.threads:
        torch.set_num_threads(args.threads)
    elif hasattr(os, "getloadavg") and os.getloadavg()[0] > 1.5 * (os.cpu_count() or 1):
        logging.getLogger("benchmarks.accuracy").info(
            "load average %.1f on %d cores: using 1 torch thread (--threads N to override)", os.getloadavg()[0], os.cpu_count())
        torch.set_num_threads(1)
    for path in args.tasks_from:
        plugins.load(path)
    known = (*presets.SUITES, *presets.FULL_ONLY_SUITES, *plugins.SUITES)
    if args.suite != "all" and args.suite not in known:
        p.error(f"--suite: unknown suite {args.suite!r}; known: {', '.join(known)} or all")
    everything = (*presets.SUITES, *presets.FULL_ONLY_SUITES) if args.full else presets.SUITES  # decoder: --full only
    suites = everything if args.suite == "all" else (args.suite,)
    command = "python -m benchmarks.accuracy " + " ".join(argv if argv is not None else sys.argv[1:])
    t0 = time.time()
    for suite in suites:
        preset = presets.preset_name(suite, args.full)
        if suite in plugins.SUITES:
            cfg, rc = plugins.SUITES[suite](args.full)
            preset = f"{suite}-{preset}"  # its own RESULTS section and files, never a built-in suite's
        else:
            cfg, rc = presets.get(suite, full=args.full)
        if args.methods:
            rc = presets.replace(rc, rows=tuple(m.strip() for m in args.methods.split(",")))
            preset += "-subset"
        if args.tta_steps is not None:
            rc = presets.replace(rc, tta_steps=args.tta_steps)
            preset += f"-tta{args.tta_steps}"
        if args.adarank_lr is not None:
            rc = presets.replace(rc, adarank_lr=args.adarank_lr)
            preset += f"-adarank{args.adarank_lr:g}"
        seeds = args.seeds or (presets.FULL_SEEDS if args.full else (cfg.seed,))
        given = None
        if args.chosen_from:
            if not args.methods or len(seeds) > 1:
                p.error("--chosen-from: needs --methods and one seed (--seeds N)")
            try:
                given = given_choices(args.chosen_from, presets.replace(cfg, seed=seeds[0]))
            except ValueError as e:
                p.error(f"--chosen-from: {e}")
        kw = dict(given=given, cache_dir=args.cache, rebuild=args.rebuild, results_md=args.results, plots_dir=args.plots,
                  json_dir=args.json, command=command.strip(), preset=preset, device=args.device)
        if len(seeds) > 1:
            out = run_seeds(cfg, rc, seeds, **kw)
            outs = list(out["per_seed"].values())
        else:
            outs = [run_suite(presets.replace(cfg, seed=seeds[0]), presets.replace(rc, seed=seeds[0]), **kw)]
        for o in outs:
            print(f"\n## {suite} suite ({preset}, seed {o['zoo'].config.seed}): accuracy (%) on the test data")
            print(o["table"])
            print("\n".join(f"- {line}" for line in o["orderings"]))
            print(f"\n{o['summary']}")
        if len(seeds) > 1:
            print(f"\n## {suite} suite over seeds {list(seeds)}\n{out['table']}")
            print("\n".join(f"- {line}" for line in out["orderings"]))
    print(f"\ntotal: {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
