"""The batched truncated SVD: randomised against exact, exactness on low rank, wide matrices, signs, dtypes."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mergemodules.decompose import truncated_svd


def with_spectrum(T: int, out: int, inp: int, spectrum: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """T matrices (out, inp) with exactly the singular values ``spectrum`` (random orthonormal vectors)."""
    gen = torch.Generator().manual_seed(seed)
    r = spectrum.numel()
    mats = []
    for _ in range(T):
        U = torch.linalg.qr(torch.randn(out, r, generator=gen, dtype=torch.float64)).Q
        V = torch.linalg.qr(torch.randn(inp, r, generator=gen, dtype=torch.float64)).Q
        mats.append((U * spectrum.double()) @ V.t())
    return torch.stack(mats).float()


def captured_energy(A: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
    """‖U_tᵀ A_t‖²_F per matrix: the energy of A_t in the span of the found left vectors."""
    return (U.double().mT @ A.double()).pow(2).sum((-2, -1))


@pytest.mark.parametrize("power", [1.0, 0.5])
@pytest.mark.parametrize("shape", [(384, 96), (96, 384)])
def test_randomized_captures_energy_within_one_percent_of_optimal(shape, power):
    out, inp = shape
    spectrum = torch.arange(1, min(shape) + 1, dtype=torch.float64).pow(-power)
    A = with_spectrum(3, out, inp, spectrum)
    k = 8  # CART's γ = 0.08 of min(out, in) = 96
    U, S, V = truncated_svd(A, k, method="randomized")
    optimal = spectrum[:k].pow(2).sum()
    energy = captured_energy(A, U)
    assert torch.all(energy <= optimal * (1 + 1e-5))
    assert torch.all(energy >= 0.99 * optimal), (energy / optimal).tolist()
    assert torch.allclose(S.double(), spectrum[:k].expand(3, k), rtol=0.05)
    # the factors are the SVD of A projected on their span: orthonormal vectors, Uᵀ A V = diag(σ)
    eye = torch.eye(k).expand(3, k, k)
    assert torch.allclose(U.mT @ U, eye, atol=1e-5) and torch.allclose(V.mT @ V, eye, atol=1e-5)
    assert torch.allclose(U.mT @ A @ V, torch.diag_embed(S), atol=1e-5)


def test_auto_picks_randomized_on_cart_shapes_and_matches_exact():
    """CART's γ = 0.08 on a 768-wide matrix: 'auto' is randomised, and as good as exact on a decaying spectrum."""
    spectrum = torch.arange(1, 257, dtype=torch.float64).pow(-1.0)
    A = with_spectrum(2, 768, 256, spectrum, seed=1)
    k = 21
    auto = truncated_svd(A, k)
    randomized = truncated_svd(A, k, method="randomized")
    exact = truncated_svd(A, k, method="exact")
    assert torch.equal(auto.S, randomized.S)
    assert torch.allclose(randomized.S, exact.S, rtol=5e-3)
    assert torch.all(captured_energy(A, randomized.U) >= (1 - 1e-3) * captured_energy(A, exact.U))


@settings(max_examples=15, deadline=None)
@given(
    out=st.integers(8, 60), inp=st.integers(8, 60), T=st.integers(1, 3), data=st.data(),
    method=st.sampled_from(["exact", "randomized"]),
)
def test_exact_on_matrices_of_rank_at_most_k(out, inp, T, data, method):
    rank = data.draw(st.integers(1, min(out, inp) // 2))
    k = data.draw(st.integers(rank, min(out, inp)))
    spectrum = torch.linspace(3.0, 0.5, rank, dtype=torch.float64)
    A = with_spectrum(T, out, inp, spectrum, seed=data.draw(st.integers(0, 99)))
    U, S, V = truncated_svd(A, k, method=method)
    assert U.shape == (T, out, k) and S.shape == (T, k) and V.shape == (T, inp, k)
    assert torch.allclose((U * S[:, None, :]) @ V.mT, A, atol=1e-5)
    assert torch.allclose(S[:, :rank].double(), spectrum.expand(T, rank), atol=1e-5)
    assert torch.all(S[:, rank:].abs() < 1e-5)


def test_wide_matrices_are_decomposed_through_their_transpose():
    spectrum = torch.arange(1, 41, dtype=torch.float64).pow(-1.0)
    A = with_spectrum(2, 40, 200, spectrum, seed=2)
    for method in ("exact", "randomized"):
        wide = truncated_svd(A, 5, method=method)
        tall = truncated_svd(A.mT.contiguous(), 5, method=method)
        assert torch.allclose(wide.S, tall.S, atol=1e-6)
        # up to the per-component sign convention, the wide factors are the tall ones swapped
        assert torch.allclose((wide.U * wide.S[:, None]) @ wide.V.mT, ((tall.U * tall.S[:, None]) @ tall.V.mT).mT, atol=1e-5)
        assert wide.U.shape == (2, 40, 5) and wide.V.shape == (2, 200, 5)


@pytest.mark.parametrize("method", ["exact", "randomized"])
def test_signs_are_deterministic(method):
    A = with_spectrum(2, 64, 48, torch.arange(1, 49, dtype=torch.float64).pow(-1.0), seed=3)
    first = truncated_svd(A, 4, method=method)
    flipped = truncated_svd(-A, 4, method=method)
    again = truncated_svd(A.clone(), 4, method=method)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    peak = first.U.gather(-2, first.U.abs().argmax(-2, keepdim=True))
    assert torch.all(peak > 0)
    # negating A flips V, never U: the largest entry of each left vector stays positive
    assert torch.allclose(flipped.U, first.U, atol=1e-5) and torch.allclose(flipped.V, -first.V, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method", ["exact", "randomized"])
def test_half_precision_inputs_decompose_in_float32(dtype, method):
    A = with_spectrum(2, 64, 48, torch.arange(1, 49, dtype=torch.float64).pow(-1.0), seed=4)
    half = A.to(dtype)
    U, S, V = truncated_svd(half, 6, method=method)
    assert U.dtype == S.dtype == V.dtype == torch.float32
    reference = truncated_svd(half.float(), 6, method=method)
    assert all(torch.equal(a, b) for a, b in zip((U, S, V), reference))


def test_float64_inputs_decompose_in_float64():
    A = with_spectrum(1, 30, 20, torch.linspace(2.0, 1.0, 4, dtype=torch.float64))
    U, S, V = truncated_svd(A.double(), 4)
    assert S.dtype == torch.float64
    assert torch.allclose(S[0], torch.linspace(2.0, 1.0, 4, dtype=torch.float64), atol=1e-6)


def test_zero_rank_gives_empty_factors():
    U, S, V = truncated_svd(torch.randn(2, 5, 3), 0)
    assert U.shape == (2, 5, 0) and S.shape == (2, 0) and V.shape == (2, 3, 0)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: truncated_svd(torch.randn(5, 3), 1), "A must have shape"),
        (lambda: truncated_svd(torch.randn(1, 5, 3), 4), "k=4"),
        (lambda: truncated_svd(torch.randn(1, 5, 3), 1, method="lanczos"), "method"),
    ],
)
def test_bad_input_is_an_error_naming_it(call, match):
    with pytest.raises(ValueError, match=match):
        call()

