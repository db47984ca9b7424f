"""MergedTensor, MergedWeight and MergedLinear against the formula they implement."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from mergemodules import MergedLinear, MergedTensor, MergedWeight, straight_through_mask, truncated_svd


def factors(T: int, out: int, inp: int, k: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    tv = torch.randn(T, out, inp, generator=gen, dtype=torch.float64)
    return tv, truncated_svd(tv, k, dtype=torch.float64, method="exact")


def reference_weight(base, U, S, V, lam, masks=None):
    """W = B + Σ_t λ_t U_t diag(m_t σ_t) V_tᵀ, task by task."""
    W = base.clone()
    for t in range(S.shape[0]):
        m = torch.ones_like(S[t]) if masks is None else masks[t]
        W += lam[t] * U[t] @ torch.diag(m * S[t]) @ V[t].T
    return W


@settings(max_examples=25, deadline=None)
@given(T=st.integers(1, 4), out=st.integers(1, 9), inp=st.integers(1, 9), data=st.data())
def test_merged_weight_matches_formula(T, out, inp, data):
    k = data.draw(st.integers(0, min(out, inp)))
    _, (U, S, V) = factors(T, out, inp, k)
    base = torch.randn(out, inp, dtype=torch.float64)
    lam = torch.randn(T, dtype=torch.float64)
    logits = torch.randn(T, k, dtype=torch.float64)
    layer = MergedWeight(base, U=U, S=S, V=V, coef=nn.Parameter(lam.clone()), mask_logits=nn.Parameter(logits))
    masks = (logits >= 0).double()
    torch.testing.assert_close(layer(), reference_weight(base, U, S, V, lam, masks), rtol=1e-12, atol=1e-12)


def test_full_rank_factors_reproduce_dense_task_vectors():
    tv, (U, S, V) = factors(3, 6, 4, 4)
    base = torch.randn(6, 4, dtype=torch.float64)
    lam = nn.Parameter(torch.tensor([0.3, -0.5, 1.2], dtype=torch.float64))
    low_rank = MergedWeight(base, U=U, S=S, V=V, coef=lam)
    dense = MergedWeight(base, deltas=tv, coef=lam)
    torch.testing.assert_close(low_rank(), dense(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dense(), base + torch.einsum("t,toi->oi", lam.detach(), tv))


def test_in_out_layout_returns_the_transposed_weight():
    tv, (U, S, V) = factors(2, 5, 3, 2)
    base = torch.randn(5, 3, dtype=torch.float64)
    lam = nn.Parameter(torch.tensor(0.7, dtype=torch.float64))
    canonical = MergedWeight(base, U=U, S=S, V=V, coef=lam)
    transposed = MergedWeight(base.t(), U=U, S=S, V=V, coef=lam, layout="in_out")
    assert transposed().shape == (3, 5)
    torch.testing.assert_close(transposed(), canonical().t())


def test_merged_tensor_is_base_plus_weighted_deltas():
    base, deltas = torch.randn(7), torch.randn(3, 7)
    lam = nn.Parameter(torch.tensor([0.1, 0.2, 0.3]))
    torch.testing.assert_close(MergedTensor(base, deltas, lam)(), base + 0.1 * deltas[0] + 0.2 * deltas[1] + 0.3 * deltas[2])
    assert MergedTensor(base)() is not None and torch.equal(MergedTensor(base)(), base)


def test_scalar_coefficient_is_shared_by_all_tasks():
    base, deltas = torch.randn(4), torch.randn(3, 4)
    torch.testing.assert_close(MergedTensor(base, deltas, nn.Parameter(torch.tensor(0.5)))(), base + 0.5 * deltas.sum(0))


def test_straight_through_forward_is_hard_and_gradient_is_sigmoid_derivative():
    logits = torch.tensor([-2.0, -0.1, 0.0, 0.3, 5.0], requires_grad=True)
    mask = straight_through_mask(logits, temperature=10.0)
    assert mask.tolist() == [0.0, 0.0, 1.0, 1.0, 1.0]
    weights = torch.arange(1.0, 6.0)
    (mask * weights).sum().backward()
    soft = torch.sigmoid(logits.detach() / 10.0)
    torch.testing.assert_close(logits.grad, weights * soft * (1 - soft) / 10.0)


def test_gradients_reach_lambda_and_mask_logits_only():
    _, (U, S, V) = factors(2, 6, 5, 3)
    U, S, V = U.float(), S.float(), V.float()
    weight = MergedWeight(torch.randn(6, 5), U=U, S=S, V=V, coef=nn.Parameter(torch.ones(2)),
                          mask_logits=nn.Parameter(torch.full((2, 3), 0.1)))
    layer = MergedLinear(weight, MergedTensor(torch.randn(6), torch.randn(2, 6), weight.coef))
    assert {n for n, _ in layer.named_parameters()} == {"merged_weight.coef", "merged_weight.mask_logits"}
    layer(torch.randn(4, 5)).pow(2).sum().backward()
    assert weight.coef.grad is not None and weight.coef.grad.abs().sum() > 0
    assert weight.mask_logits.grad is not None and weight.mask_logits.grad.abs().sum() > 0
    assert all(not b.requires_grad for b in layer.buffers())


@pytest.mark.parametrize("bias", [True, False])
def test_merged_linear_fuse_is_exact_and_reads_like_a_linear(bias):
    _, (U, S, V) = factors(3, 8, 6, 2)
    coef = nn.Parameter(torch.tensor([0.2, 0.4, 0.6]))
    weight = MergedWeight(torch.randn(8, 6), U=U.float(), S=S.float(), V=V.float(), coef=coef)
    layer = MergedLinear(weight, MergedTensor(torch.randn(8), torch.randn(3, 8), coef) if bias else None)
    x = torch.randn(5, 6)
    fused = layer.fuse()
    assert type(fused) is nn.Linear and (fused.in_features, fused.out_features) == (6, 8)
    assert isinstance(layer.weight, torch.Tensor) and layer.weight.shape == (8, 6)
    assert (fused.bias is None) == (not bias)
    torch.testing.assert_close(fused(x), layer(x), rtol=0, atol=1e-6)
    torch.testing.assert_close(layer(x), nn.functional.linear(x, layer.weight, layer.bias), rtol=0, atol=1e-6)


def test_fuse_keeps_the_original_linear_subclass():
    original = nn.modules.linear.NonDynamicallyQuantizableLinear(4, 3)
    weight = MergedWeight(original.weight.detach())
    layer = MergedLinear(weight, MergedTensor(original.bias.detach()), original=original)
    fused = layer.fuse()
    assert type(fused) is nn.modules.linear.NonDynamicallyQuantizableLinear
    assert torch.equal(fused.weight, original.weight) and original.weight.requires_grad


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(base=torch.randn(3)), "base"),
        (dict(base=torch.randn(3, 2), deltas=torch.randn(2, 2, 3)), "deltas"),
        (dict(base=torch.randn(3, 2), U=torch.randn(1, 3, 1)), "U, S and V"),
        (dict(base=torch.randn(3, 2), U=torch.randn(1, 3, 1), S=torch.randn(1, 1), V=torch.randn(1, 3, 1)), "factors"),
        (dict(base=torch.randn(3, 2), deltas=torch.randn(2, 3, 2)), "coef"),
        (dict(base=torch.randn(3, 2), deltas=torch.randn(2, 3, 2), coef=nn.Parameter(torch.ones(3))), "coef"),
        (dict(base=torch.randn(3, 2), layout="columns"), "layout"),
        (dict(base=torch.randn(3, 2), temperature=0.0), "temperature"),
        (dict(base=torch.randn(3, 2), mask_logits=nn.Parameter(torch.ones(1, 1))), "mask_logits"),
    ],
)
def test_merged_weight_rejects_bad_input(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        MergedWeight(**kwargs)


def test_the_repr_names_the_task_term_dense_svd_or_none():
    coef = nn.Parameter(torch.tensor([0.5, 2.0]))
    _, (U, S, V) = factors(2, 6, 5, 3)
    svd = MergedLinear(MergedWeight(torch.zeros(6, 5, dtype=torch.float64), U=U, S=S, V=V, coef=coef), None)
    dense = MergedLinear(MergedWeight(torch.zeros(6, 5), deltas=torch.randn(2, 6, 5), coef=coef), None)
    none = MergedLinear(MergedWeight(torch.zeros(6, 5)), None)
    assert "tasks=2, svd rank=3" in repr(svd) and "tasks=2, dense" in repr(dense) and "tasks=0, none" in repr(none)
    assert "rank=0" not in repr(dense)


def test_deprecated_lambdas_warns_and_equals_task_coef():
    weight = MergedTensor(torch.zeros(3), torch.randn(2, 3), nn.Parameter(torch.tensor(0.25)))
    with pytest.warns(DeprecationWarning, match=r"lambdas\(\) is deprecated: use task_coef\(\)"):
        old = weight.lambdas()
    torch.testing.assert_close(old, torch.tensor([0.25, 0.25]), rtol=0, atol=0)
    assert torch.equal(old, weight.task_coef())


def test_the_old_names_of_a_merged_layers_parts_warn() -> None:
    """weight_merge/bias_merge (read like verbs) became merged_weight/merged_bias; the old names warn until 0.2."""
    import mergemodules as mm

    base, tuned = nn.Linear(4, 3), nn.Linear(4, 3)
    layer = mm.merge(base, [tuned], "task_arithmetic").model
    with pytest.warns(DeprecationWarning, match="merged_weight"):
        assert layer.weight_merge is layer.merged_weight
    with pytest.warns(DeprecationWarning, match="merged_bias"):
        assert layer.bias_merge is layer.merged_bias
