"""``python -m benchmarks.accuracy``: build (or reuse) the zoo, merge with every method, print the table.

    python -m benchmarks.accuracy                 # reduced default: both suites, fewer tasks/steps
    python -m benchmarks.accuracy --full          # the full benchmark (all tasks, paper-like budgets)
    python -m benchmarks.accuracy --suite text    # one suite only
    python -m benchmarks.accuracy --cache DIR     # zoo cache (default $MERGEMODULES_BENCH_CACHE or ~/.cache/mergemodules/bench)
    python -m benchmarks.accuracy --results benchmarks/RESULTS.md --plots benchmarks/plots

Nothing is downloaded: the data and the pretrained text model come from installed packages
(``.ci/install-data.sh`` installs the Debian ones).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from . import presets
from .report import run_suite


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.accuracy", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true", help="the full benchmark (all tasks, longer fine-tuning and TTA)")
    p.add_argument("--suite", choices=("text", "vision", "all"), default="all")
    p.add_argument("--cache", default=None, help="zoo cache directory")
    p.add_argument("--rebuild", action="store_true", help="ignore the cache and rebuild the zoo")
    p.add_argument("--results", default=None, help="Markdown file to write this benchmark's sections into "
                   "(e.g. benchmarks/RESULTS.md); other sections of the file are kept")
    p.add_argument("--plots", default=None, help="directory for the plots (e.g. benchmarks/plots)")
    p.add_argument("--json", default=None, help="directory for the raw results as JSON (default: the zoo directory)")
    p.add_argument("--methods", default=None, help="comma-separated row labels to run (default: all)")
    p.add_argument("--tta-steps", type=int, default=None, help="override the preset's test-time adaptation steps")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: torch's choice, or 1 when the load average exceeds the cores: "
                        "on a shared machine one thread is several times faster than threads that spin-wait)")
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
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    elif hasattr(os, "getloadavg") and os.getloadavg()[0] > 1.5 * (os.cpu_count() or 1):
        logging.getLogger("benchmarks.accuracy").info(
            "load average %.1f on %d cores: using 1 torch thread (--threads N to override)", os.getloadavg()[0], os.cpu_count())
        torch.set_num_threads(1)
    suites = ("text", "vision") if args.suite == "all" else (args.suite,)
    command = "python -m benchmarks.accuracy " + " ".join(argv if argv is not None else sys.argv[1:])
    t0 = time.time()
    for suite in suites:
        cfg, rc = presets.get(suite, full=args.full)
        preset = "full" if args.full else "default"
        if args.methods:
            rc = presets.replace(rc, rows=tuple(m.strip() for m in args.methods.split(",")))
            preset += "-subset"
        if args.tta_steps is not None:
            rc = presets.replace(rc, tta_steps=args.tta_steps)
            preset += f"-tta{args.tta_steps}"
        out = run_suite(cfg, rc, cache_dir=args.cache, rebuild=args.rebuild, results_md=args.results,
                        plots_dir=args.plots, json_dir=args.json, command=command.strip(), preset=preset)
        print()
        print(f"## {suite} suite ({'full' if args.full else 'reduced default'}): accuracy (%) on held-out test data")
        print(out["table"])
        print(f"\n{out['summary']}")
    print(f"\ntotal: {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
