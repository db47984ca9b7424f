"""Construction time of a CART merge (γ = 0.08): mergemodules vs the per-layer, per-task full-SVD loop.

Both variants go through the same ``merge()`` (same task vectors, same centring, same buffers); only
the factorisation differs:

* ``loop full SVD``: for every matrix, for every task, ``torch.linalg.svd`` of the whole matrix,
  then the top k kept (what public CART/AdaRank code does);
* ``batched exact``: one batched LAPACK SVD per matrix over all tasks (shows what batching alone gives);
* ``mergemodules``: the library's default, one batched randomised truncated SVD per matrix
  (``decompose.truncated_svd``: Halko et al. with 10 oversamples and 3 subspace iterations, wide
  matrices through their transpose).

The accuracy check compares, on the same matrices, the energy the randomised factors capture
(Σ σ̃², equal to ‖Ũᵀ·A‖²_F) with the optimal top-k energy of the exact SVD.

    nice python benchmarks/bench_construction.py            # ViT-B-32 blocks, T = 8, 2 blocks
    nice python benchmarks/bench_construction.py --tuning   # accuracy of oversample / power-iteration settings
"""
from __future__ import annotations

import argparse

import torch
from torch import Tensor

from common import finetuned_zoo, interleaved_times, machine, markdown_table, setup_threads, vision_tower
from mergemodules import merge
from mergemodules.decompose import Factors
from mergemodules.methods import Transform, get_method


class LoopFullSVD(Transform):
    """The straightforward reference: a full ``torch.linalg.svd`` per task, truncated afterwards."""

    def factorize(self, terms: Tensor, k: int) -> Factors:
        """Top-k of the full SVD of every term, one task at a time."""
        U, S, V = [], [], []
        for term in terms:
            u, s, vh = torch.linalg.svd(term, full_matrices=False)
            U.append(u[:, :k])
            S.append(s[:k])
            V.append(vh[:k].t())
        return Factors(torch.stack(U), torch.stack(S), torch.stack(V))


class BatchedExactSVD(Transform):
    """All tasks of a matrix in one batched exact SVD."""

    def factorize(self, terms: Tensor, k: int) -> Factors:
        """Top-k of the batched exact SVD."""
        from mergemodules.decompose import truncated_svd

        return truncated_svd(terms, k, method="exact")


def energy_ratios(fast: dict, exact: dict) -> Tensor:
    """Per (matrix, task): captured energy of the fast factors over the optimal top-k energy."""
    ratios = [fast[name].S.pow(2).sum(-1) / exact[name].S.pow(2).sum(-1) for name in exact]
    return torch.cat(ratios)


def tuning_table(k: int = 62, shape: tuple[int, int] = (3072, 768), matrices: int = 2) -> str:
    """Captured / optimal top-k energy (min over ``matrices``) for spectra i^(−p) and SVD settings."""
    from common import synthetic_task_vector
    from mergemodules.decompose import truncated_svd

    gen = torch.Generator().manual_seed(0)
    powers = (1.0, 0.5, 0.3)
    settings = [(10, 1), (10, 2), (10, 3), (20, 3), (40, 3)]
    mats = {p: torch.stack([synthetic_task_vector(shape, gen, power=p) for _ in range(matrices)]) for p in powers}
    optimal = {p: torch.linalg.svdvals(A)[:, :k].pow(2).sum(-1) for p, A in mats.items()}
    rows = []
    for oversample, iters in settings:
        cells = []
        for p, A in mats.items():
            S = truncated_svd(A, k, method="randomized", oversample=oversample, power_iters=iters).S
            cells.append(f"{(S.pow(2).sum(-1) / optimal[p]).min():.4f}")
        rows.append([oversample, iters, *cells])
    return markdown_table(["oversample", "power iterations", *(f"p = {p}" for p in powers)], rows)


def main() -> None:
    """Time the variants side by side and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="ViT-B-32", choices=["ViT-B-32", "ViT-L-14"])
    parser.add_argument("--layers", type=int, default=2, help="transformer blocks (12 in ViT-B-32)")
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--rank", type=float, default=0.08, help="CART's γ")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tuning", action="store_true", help="only the accuracy table of the SVD settings")
    args = parser.parse_args()
    setup_threads(args.threads)
    if args.tuning:
        print(f"# randomised top-62 of 3072×768 matrices with spectrum i^(−p): captured / optimal energy; {machine()}")
        print(tuning_table())
        return

    pretrained = vision_tower(args.arch, args.layers)
    zoo = finetuned_zoo(pretrained, args.tasks)
    variants = {
        "loop full SVD (reference)": get_method("cart", rank=args.rank).with_options(transform=LoopFullSVD()),
        "batched exact SVD": get_method("cart", rank=args.rank).with_options(transform=BatchedExactSVD()),
        "mergemodules (batched randomised)": get_method("cart", rank=args.rank),
    }
    built: dict[str, dict] = {}

    def build(name):
        return lambda: built.__setitem__(name, merge(pretrained, zoo, variants[name]).merged_weights())

    times = interleaved_times({name: build(name) for name in variants}, repeat=args.repeat, warmup=0)
    reference = times["loop full SVD (reference)"]
    matrices = len(built["mergemodules (batched randomised)"])
    rows = [[name, f"{t:.2f}", f"{t / matrices:.3f}", f"{reference / t:.2f}×"] for name, t in times.items()]
    ratios = energy_ratios(built["mergemodules (batched randomised)"], built["batched exact SVD"])
    print(f"# CART γ={args.rank} construction, {args.arch} with {args.layers} blocks ({matrices} matrices), "
          f"T={args.tasks}; {machine()}; median of {args.repeat}")
    print(markdown_table(["variant", "seconds", "s / matrix", "speed-up vs reference"], rows))
    print(f"\ncaptured energy of the randomised top-k / optimal (exact) over {ratios.numel()} (matrix, task) pairs: "
          f"min {ratios.min():.5f}, median {ratios.median():.5f}")


if __name__ == "__main__":
    main()
