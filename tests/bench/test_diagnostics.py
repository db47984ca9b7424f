"""Task-vector diagnostics against direct computations on the tiny text zoo."""
from __future__ import annotations

import pytest
import torch

from benchmarks.accuracy import diagnostics as G


def _flat(model) -> torch.Tensor:
    return torch.cat([p.detach().double().flatten() for p in model.parameters()])


def test_cosine_is_that_of_the_flattened_task_vectors(text_zoo):
    base = _flat(text_zoo.pretrained)
    tv = [_flat(t.encoder) - base for t in text_zoo.tasks]
    expected = torch.nn.functional.cosine_similarity(tv[0], tv[1], dim=0).item()
    m = G.cosine(text_zoo)
    assert m[0][0] == pytest.approx(1.0) and m[0][1] == pytest.approx(m[1][0]) == pytest.approx(expected, abs=1e-9)
    # two tasks: the centered vectors are exact opposites
    assert G.cosine(text_zoo, centered=True)[0][1] == pytest.approx(-1.0)


def test_spectra_kept_energy(text_zoo):
    fractions = (0.01, 0.5, 1.0)
    spectra = G.spectra(text_zoo, fractions)
    assert set(spectra) == set(text_zoo.names)
    for pts in spectra.values():
        kept = [k for _, k in pts]
        assert kept == sorted(kept) and kept[-1] == pytest.approx(1.0) and 0 < kept[0] < 1
    # one weight by hand: the first Linear weight's top singular value share for task 0
    name = G._linear_weights(text_zoo.pretrained)[0]
    tau = (text_zoo.tasks[0].encoder.get_parameter(name) - text_zoo.pretrained.get_parameter(name)).double()
    s2 = torch.linalg.svdvals(tau) ** 2
    one = G.spectra(text_zoo, (1 / len(s2),))  # ⌈r / r⌉ = 1 component
    shares = []
    for n in G._linear_weights(text_zoo.pretrained):
        t = (text_zoo.tasks[0].encoder.get_parameter(n) - text_zoo.pretrained.get_parameter(n)).double()
        s = torch.linalg.svdvals(t) ** 2
        shares.append(float(s[: max(1, -(-len(s) // len(s2)))].sum() / s.sum()))
    assert one[text_zoo.names[0]][0][1] == pytest.approx(sum(shares) / len(shares))


@pytest.mark.parametrize("shape, rank",
                         [((3, 6, 20), 6), ((3, 20, 6), 6), ((2, 8, 8), 8), ((3, 12, 30), 2), ((1, 5, 9), 0)])
def test_squared_singular_values_are_svdvals_squared(shape, rank):
    """σ² from the smaller Gram matrix, descending and ≥ 0, for wide, tall, square, low-rank and zero matrices."""
    gen = torch.Generator().manual_seed(0)
    b, m, n = shape
    x = torch.randn(b, m, rank, generator=gen, dtype=torch.float64) @ torch.randn(b, rank, n, generator=gen,
                                                                                  dtype=torch.float64)
    got = G._squared_singular_values(x)
    assert got.shape == (b, min(m, n)) and (got >= 0).all()
    assert torch.equal(got, got.sort(-1, descending=True).values)
    torch.testing.assert_close(got, torch.linalg.svdvals(x) ** 2, rtol=1e-10, atol=1e-10 * max(1.0, got.max().item()))
