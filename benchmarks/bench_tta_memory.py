"""Memory of one ``mm.adapt`` step vs the number of tasks T: joined forward vs ``per_task_backward=True``.

The default step keeps every task's activations alive until the one backward; ``per_task_backward``
runs each task's forward and backward in turn (one task's activations at a time) while the merged
weights are still evaluated once per step, their gradients gathered and passed to λ and ℓ once.
Each (T, mode) runs in a fresh subprocess: the merge is built, one step taken (it includes the
one-off check of the joined forward and creates Adam's state), freed memory handed back to the system
(glibc ``malloc_trim``; large blocks are mapped, not kept in the heap: ``MALLOC_MMAP_THRESHOLD_``), the
RSS read and the kernel's peak RSS reset (Linux ``/proc/self/clear_refs``), and a second step measured:
"+step" is its peak above the RSS before it, the memory the step itself needs. The time of the two
modes is in ``bench_tta_step.py`` (interleaved).

    nice python benchmarks/bench_tta_memory.py                       # ViT-B-32, 2 blocks, T = 2, 4, 8
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from common import (GIB, finetuned_zoo, heads, images, machine, markdown_table, peak_rss_bytes, reset_peak_rss,
                    rss_bytes, setup_threads, vision_tower)

MODES = {"joined": False, "per_task_backward": True}


def child(arch: str, layers: int, tasks: int, per_task: int, mode: str, rank: float | None) -> dict:
    """One adaptation step's peak memory (run in a fresh process)."""
    from mergemodules import Task, merge
    from mergemodules.distributed import World
    from mergemodules.tta import _Adaptation

    setup_threads(1)  # the factorisation's LAPACK calls; memory does not depend on threads
    pretrained = vision_tower(arch, layers)
    zoo = finetuned_zoo(pretrained, tasks)
    options = {} if rank is None else {"rank": rank}
    merged = merge(pretrained, zoo, "adarank_cart", **options).train()
    del zoo
    setup_threads(2)
    batches = images(tasks, per_task, pretrained.image_size[0])
    task_set = {f"task{t}": Task([b], h) for t, (b, h) in enumerate(zip(batches, heads(tasks, pretrained.output_dim)))}
    run = _Adaptation(merged, task_set, lr=1e-3, seed=0, world=World(), concat=True, pad_id=0,
                      per_task_backward=MODES[mode], autocast=None)
    run.seed_rng()
    run.step(1)  # also the one-off check of the joined forward (no gradient) and Adam's state
    reset_peak_rss()  # what the build and the first step freed goes back to the system first
    start = rss_bytes()
    run.step(2)
    return {"extra": peak_rss_bytes() - start}


def main() -> None:
    """Run every (T, mode) in a subprocess and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="ViT-B-32", choices=["ViT-B-32", "ViT-L-14"])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--tasks", default="2,4,8", help="comma-separated numbers of tasks")
    parser.add_argument("--per-task", type=int, default=16, help="images per task and step")
    parser.add_argument("--rank", type=float, default=None, help="stored rank of CART+AdaRank (default: full)")
    parser.add_argument("--child", nargs=2, metavar=("TASKS", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.arch, args.layers, int(args.child[0]), args.per_task, args.child[1], args.rank)))
        return
    rows = []
    for tasks in (int(t) for t in args.tasks.split(",")):
        runs = {}
        for mode in MODES:
            cmd = [sys.executable, __file__, "--arch", args.arch, "--layers", str(args.layers), "--per-task",
                   str(args.per_task), "--child", str(tasks), mode]
            cmd += [] if args.rank is None else ["--rank", str(args.rank)]
            env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(2**20))  # blocks ≥ 1 MiB mapped, unmapped when freed
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
            runs[mode] = json.loads(out.splitlines()[-1])
        joined, alone = runs["joined"], runs["per_task_backward"]
        rows.append([tasks, f"{joined['extra'] / GIB:.3f}", f"{alone['extra'] / GIB:.3f}",
                     f"{alone['extra'] / joined['extra']:.2f}"])
    print(f"# Memory of one mm.adapt step, CART+AdaRank ({'full rank' if args.rank is None else f'rank {args.rank}'}), "
          f"{args.arch} with {args.layers} blocks, {args.per_task} images per task; {machine()}")
    print(markdown_table(["T", "joined forward: +step GiB", "per_task_backward: +step GiB", "ratio"], rows))


if __name__ == "__main__":
    main()
