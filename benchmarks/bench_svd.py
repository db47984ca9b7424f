"""The exact top-k per matrix shape: ``decompose.truncated_svd`` against the per-task ``torch.linalg.svd`` loop.

For each shape, T task matrices with singular values ∝ i^(−power) (random singular vectors) and their
top k (8 % of min(out, in), CART's γ = 0.08), timed side by side (interleaved, medians) at each thread count:

* ``loop float32`` / ``loop float64``: ``torch.linalg.svd`` of every task's whole matrix, top k kept;
* ``exact``: ``truncated_svd(A, k)`` (the default ``svd="exact"``) of the float32 stack.

Error: the subspace error ‖U·Uᵀ − U₆₄·U₆₄ᵀ‖₂ of the top-k left vectors against the float64 loop (max over tasks).
The issue's target (#15): the exact path ≥ 3× faster than the loop that gives the same result (float64).

    nice python benchmarks/bench_svd.py                 # 768², 3072×768, 768×3072; 1 and 2 threads
"""
from __future__ import annotations

import argparse

import torch
from torch import Tensor

from bench_construction import subspace_error
from common import decaying_spectrum, interleaved_times, machine, markdown_table, setup_threads
from mergemodules.decompose import truncated_svd

SHAPES = ((768, 768), (3072, 768), (768, 3072))


def task_matrices(shape: tuple[int, int], tasks: int, power: float, seed: int = 0) -> Tensor:
    """``tasks`` float32 matrices of ``shape``, singular values ∝ i^(−power), random orthonormal singular vectors."""
    gen = torch.Generator().manual_seed(seed)
    m, n = shape
    r = min(m, n)
    U = torch.linalg.qr(torch.randn(tasks, m, r, generator=gen, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(tasks, n, r, generator=gen, dtype=torch.float64)).Q
    return ((U * decaying_spectrum(r, power).double()) @ V.mT).float()


def loop_top_k(A: Tensor, k: int, dtype: torch.dtype) -> Tensor:
    """Top-k left singular vectors of each task by a full ``torch.linalg.svd`` in ``dtype``."""
    return torch.stack([torch.linalg.svd(a.to(dtype), full_matrices=False).U[:, :k] for a in A])


def main() -> None:
    """Time the loop and the exact path per shape and thread count, and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--power", type=float, default=0.5, help="singular values ∝ i^-power")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    rows = []
    for shape in SHAPES:
        A = task_matrices(shape, args.tasks, args.power)
        k = int(0.08 * min(shape))
        reference = loop_top_k(A, k, torch.float64)
        error32 = subspace_error(loop_top_k(A, k, torch.float32), reference).max().item()
        error = subspace_error(truncated_svd(A, k).U, reference).max().item()
        for threads in args.threads:
            setup_threads(threads)
            times = interleaved_times({
                "loop32": lambda: loop_top_k(A, k, torch.float32),
                "loop64": lambda: loop_top_k(A, k, torch.float64),
                "exact": lambda: truncated_svd(A, k),
            }, repeat=args.repeat)
            rows.append([f"{shape[0]}×{shape[1]}", threads, f"{times['loop32']:.3f}", f"{times['loop64']:.3f}",
                         f"{times['exact']:.3f}", f"{times['loop32'] / times['exact']:.1f}×",
                         f"**{times['loop64'] / times['exact']:.1f}×**", f"{error32:.0e}", f"{error:.0e}"])
    print(f"# top 8 % of T = {args.tasks} task matrices, spectrum i^(−{args.power}), medians of {args.repeat} "
          f"interleaved runs; {machine()}")
    print(markdown_table(["shape", "threads", "loop float32 (s)", "loop float64 (s)", "exact (s)",
                          "exact vs float32 loop", "exact vs float64 loop", "subspace error float32 loop",
                          "subspace error exact"], rows))


if __name__ == "__main__":
    main()
