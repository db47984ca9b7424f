"""Construction time and fidelity of a CART merge (γ = 0.08): the exact default vs the per-task full-SVD loop.

All variants go through the same ``merge()`` (same task vectors, same centring, same buffers); only
the factorisation differs:

* ``loop full SVD``: for every matrix, for every task, ``torch.linalg.svd`` of the whole matrix in the
  compute dtype, then the top k kept (what the public CART/AdaRank code does);
* ``mergemodules exact``: the default ``svd="exact"`` (``decompose.truncated_svd``): per task (tasks side by
  side on the torch threads), the top-k eigenpairs of the smaller Gram matrix in float64 (LAPACK ``syevr``), U = A·V/σ;
* ``mergemodules randomized``: ``svd="randomized"`` (Halko et al., 10 oversamples, 3 subspace iterations),
  the default before issue #11.

Fidelity: every variant's top-k factors against ``torch.linalg.svd`` in float64 of the same centred task
vectors: the relative Frobenius error of the low-rank term U·diag(σ)·Vᵀ and the subspace error
‖U·Uᵀ − U₆₄·U₆₄ᵀ‖₂ (max over matrices and tasks).

    nice python benchmarks/bench_construction.py --threads 1               # ViT-B-32, 2 blocks, T = 8
    nice python benchmarks/bench_construction.py --threads 1 --power 0.5   # flatter spectra
    nice python benchmarks/bench_construction.py --threads 1 --dtype float64
    nice python benchmarks/bench_construction.py --tuning                  # what the randomised solver needs
"""
from __future__ import annotations

import argparse
from typing import Any, Mapping

import torch
from torch import Tensor

from common import finetuned_zoo, interleaved_times, machine, markdown_table, setup_threads, vision_tower
from mergemodules import merge, resolve_rank
from mergemodules.decompose import Factors, truncated_svd
from mergemodules.methods import Transform, get_method


class LoopFullSVD(Transform):
    """The straightforward reference: a full ``torch.linalg.svd`` per task, truncated afterwards."""

    def factorize(self, terms: Tensor, k: int, svd: str = "exact", svd_options: Mapping[str, Any] | None = None) -> Factors:
        """Top-k of the full SVD of every term, one task at a time (``svd`` is ignored)."""
        U, S, V = [], [], []
        for term in terms:
            u, s, vh = torch.linalg.svd(term, full_matrices=False)
            U.append(u[:, :k])
            S.append(s[:k])
            V.append(vh[:k].t())
        return Factors(torch.stack(U), torch.stack(S), torch.stack(V))


def low_rank(U: Tensor, S: Tensor, V: Tensor) -> Tensor:
    """U·diag(S)·Vᵀ per task, in float64."""
    return (U.double() * S.double()[:, None, :]) @ V.double().mT


def subspace_error(U: Tensor, reference: Tensor) -> Tensor:
    """‖U·Uᵀ − R·Rᵀ‖₂ per task: the sine of the largest principal angle between the two spans."""
    U, reference = U.double(), reference.double()
    return torch.linalg.matrix_norm(U @ U.mT - reference @ reference.mT, ord=2)


def exact_reference(zoo: list[dict], names: list[str], rank: float) -> dict[str, Factors]:
    """Top-k of the centred task vectors θ_t − θ_avg of each matrix (formed in the model's dtype, as ``merge``
    forms them, so that every variant decomposes the same matrices) by ``torch.linalg.svd`` in float64."""
    out = {}
    for name in names:
        values = torch.stack([state[name] for state in zoo])
        centred = (values - values.mean(dim=0)).double()
        k = resolve_rank(rank, tuple(centred.shape[1:]))
        U, S, Vh = torch.linalg.svd(centred, full_matrices=False)
        out[name] = Factors(U[..., :k], S[..., :k], Vh[..., :k, :].mT)
    return out


def fidelity(built: dict, reference: dict[str, Factors]) -> tuple[float, float, float]:
    """(max relative low-rank error, median of it, max subspace error of U) over matrices and tasks."""
    errors, angles = [], []
    for name, ref in reference.items():
        weight = built[name]
        exact = low_rank(*ref)
        errors.append(torch.linalg.matrix_norm(low_rank(weight.U, weight.S, weight.V) - exact) / torch.linalg.matrix_norm(exact))
        angles.append(subspace_error(weight.U, ref.U))
    errors, angles = torch.cat(errors), torch.cat(angles)
    return float(errors.max()), float(errors.median()), float(angles.max())


def tuning_table(k: int = 61, shape: tuple[int, int] = (3072, 768), matrices: int = 2) -> str:
    """Relative low-rank error of the randomised top-k against the exact one (max over ``matrices``)."""
    from common import synthetic_task_vector

    gen = torch.Generator().manual_seed(0)
    powers = (1.0, 0.5, 0.3)
    settings = [(10, 3), (10, 10), (40, 3), (40, 10), (100, 20)]
    mats = {p: torch.stack([synthetic_task_vector(shape, gen, power=p) for _ in range(matrices)]) for p in powers}
    exact = {p: low_rank(*truncated_svd(A, k, dtype=torch.float64)) for p, A in mats.items()}
    rows = []
    for oversample, iters in settings:
        cells = []
        for p, A in mats.items():
            approx = low_rank(*truncated_svd(A, k, method="randomized", oversample=oversample, power_iters=iters))
            error = torch.linalg.matrix_norm(approx - exact[p]) / torch.linalg.matrix_norm(exact[p])
            cells.append(f"{float(error.max()):.2e}")
        rows.append([oversample, iters, *cells])
    return markdown_table(["oversample", "power iterations", *(f"p = {p}" for p in powers)], rows)


def main() -> None:
    """Time the variants side by side, check their factors against float64 LAPACK and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="ViT-B-32", choices=["ViT-B-32", "ViT-L-14"])
    parser.add_argument("--layers", type=int, default=2, help="transformer blocks (12 in ViT-B-32)")
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--rank", type=float, default=0.08, help="CART's γ")
    parser.add_argument("--power", type=float, default=1.0, help="singular values of the task vectors ∝ i^-power")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tuning", action="store_true", help="only the fidelity table of randomised settings")
    args = parser.parse_args()
    setup_threads(args.threads)
    if args.tuning:
        print(f"# randomised top-61 of 3072×768 matrices with spectrum i^(−p): relative error of the low-rank term "
              f"against the exact one, max of 2; {machine()}")
        print(tuning_table())
        return

    dtype = getattr(torch, args.dtype)
    pretrained = vision_tower(args.arch, args.layers).to(dtype)
    zoo = finetuned_zoo(pretrained, args.tasks, power=args.power)
    cart = get_method("cart", rank=args.rank)
    variants = {
        "loop full SVD (reference)": cart.with_options(transform=LoopFullSVD()),
        "mergemodules exact (default)": cart,
        "mergemodules randomized": cart.with_options(svd="randomized"),
    }
    built: dict[str, dict] = {}

    def build(name):
        return lambda: built.__setitem__(name, merge(pretrained, zoo, variants[name]).merged_weights())

    times = interleaved_times({name: build(name) for name in variants}, repeat=args.repeat, warmup=0)
    names = list(built["mergemodules exact (default)"])
    reference = exact_reference(zoo, names, args.rank)
    baseline = times["loop full SVD (reference)"]
    rows = []
    for name, seconds in times.items():
        worst, median, angle = fidelity(built[name], reference)
        rows.append([name, f"{seconds:.2f}", f"{seconds / len(names):.3f}", f"{baseline / seconds:.2f}×",
                     f"{worst:.1e}", f"{median:.1e}", f"{angle:.1e}"])
    print(f"# CART γ={args.rank} construction, {args.arch} with {args.layers} blocks ({len(names)} matrices), "
          f"T={args.tasks}, {args.dtype}, spectrum i^-{args.power}; {machine()}; median of {args.repeat}")
    print(markdown_table(["variant", "seconds", "s / matrix", "speed-up vs loop", "max rel. error of low-rank term",
                          "median", "max subspace error (U)"], rows))


if __name__ == "__main__":
    main()
