"""Peak memory of learning AWD's redundant vector δ on the ViT-B-32-sized case, against the task vectors' size.

Scope as in the paper: the linear weights of the transformer blocks of open_clip's ViT-B-32 visual tower,
12 blocks × (in_proj 2304×768, out_proj 768×768, c_fc 3072×768, c_proj 768×3072) = 84.9 M entries, T = 8
synthetic task vectors (random, float32). Each case runs in a fresh subprocess; its peak RSS is the
kernel's high-water mark (``resource.getrusage``), so cases do not see each other's allocations:

* ``python``: the interpreter after one AWD step on a 2×4 case (torch, mergemodules and the lazily imported
  optimizer machinery loaded, ≈150 MiB of it for ``torch.optim``): the fixed floor;
* ``vectors``: only the task vectors, held per tensor as ``fit`` receives them;
* ``awd``: the task vectors, then ``learn_redundant_vector`` (streaming, Adam) for ``--steps`` steps;
* ``naive`` (``--naive``): the obvious implementation — all task vectors concatenated into one (T, P) copy,
  τ − δ materialised, pairwise cosines and autograd — for comparison (memory-hungry: use ``--blocks``).

Usage: ``nice python benchmarks/bench_awd_memory.py [--blocks 12] [--tasks 8] [--steps 5] [--naive]``
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

BLOCK_SHAPES = [(2304, 768), (768, 768), (3072, 768), (768, 3072)]  # in_proj, out_proj, c_fc, c_proj
MIB = 2**20


def _task_vectors(blocks: int, tasks: int):
    import torch

    gen = torch.Generator().manual_seed(0)
    return [torch.randn(tasks, *shape, generator=gen).mul_(1e-3) for _ in range(blocks) for shape in BLOCK_SHAPES]


def _naive(task_vectors, steps: int, alpha: float, lr: float) -> None:
    import torch

    T = task_vectors[0].shape[0]
    flat = torch.cat([tv.reshape(T, -1) for tv in task_vectors], dim=1)
    delta = torch.zeros(flat.shape[1], requires_grad=True)
    opt = torch.optim.Adam([delta], lr=lr)
    off = ~torch.eye(T, dtype=torch.bool)
    for _ in range(steps):
        hat = flat - delta
        gram = hat @ hat.T
        norms = gram.diagonal().sqrt()
        loss = (gram / (norms[:, None] * norms[None, :]))[off].abs().mean() + alpha * delta.norm()
        opt.zero_grad()
        loss.backward()
        opt.step()


def child(case: str, blocks: int, tasks: int, steps: int, threads: int) -> dict:
    """Run one case in this process and report its peak RSS and time per step."""
    import torch

    from mergemodules.methods.awd import learn_redundant_vector

    torch.set_num_threads(threads)
    result = {"case": case, "seconds_per_step": None}
    learn_redundant_vector([torch.randn(2, 4)], alpha=1e-4, steps=1, lr=1e-5)  # load everything once
    if case != "python":
        task_vectors = _task_vectors(blocks, tasks)
        result["vector_bytes"] = sum(tv.numel() * tv.element_size() for tv in task_vectors)
        start = time.perf_counter()
        if case == "awd":
            learn_redundant_vector(task_vectors, alpha=1e-4, steps=steps, lr=1e-5)
        elif case == "naive":
            _naive(task_vectors, steps, alpha=1e-4, lr=1e-5)
        if case in ("awd", "naive"):
            result["seconds_per_step"] = (time.perf_counter() - start) / steps
    result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=12)
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--naive", action="store_true", help="also run the concatenating autograd implementation")
    parser.add_argument("--child", choices=["python", "vectors", "awd", "naive"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.blocks, args.tasks, args.steps, args.threads)))
        return
    cases = ["python", "vectors", "awd"] + (["naive"] if args.naive else [])
    results = {}
    for case in cases:
        command = [sys.executable, __file__, "--child", case, "--blocks", str(args.blocks), "--tasks", str(args.tasks),
                   "--steps", str(args.steps), "--threads", str(args.threads)]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results[case] = json.loads(output.strip().splitlines()[-1])
    floor = results["python"]["peak_rss_bytes"]
    vector_bytes = results["vectors"]["vector_bytes"]
    entries = vector_bytes // 4 // args.tasks
    print(f"AWD memory: {args.blocks} blocks, {entries / 1e6:.1f} M entries in scope, T = {args.tasks}, "
          f"{args.steps} steps, {args.threads} thread(s); task vectors {vector_bytes / MIB:.0f} MiB")
    cpu = platform.processor() or platform.machine()
    print(f"machine: {cpu}, {os.cpu_count()} cores, python {platform.python_version()}")
    print("| case | peak RSS (MiB) | above interpreter (MiB) | ÷ task vectors | s/step |")
    print("| --- | --- | --- | --- | --- |")
    for case in cases:
        r = results[case]
        above = r["peak_rss_bytes"] - floor
        step = "" if r["seconds_per_step"] is None else f"{r['seconds_per_step']:.2f}"
        ratio = "" if case == "python" else f"{above / vector_bytes:.2f}"
        print(f"| {case} | {r['peak_rss_bytes'] / MIB:.0f} | {above / MIB:.0f} | {ratio} | {step} |")


if __name__ == "__main__":
    main()
