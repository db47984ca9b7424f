"""The adaptive method settings: AdaMerging (task-/layer-wise), CART++, TA+AdaRank, CART+AdaRank."""
from __future__ import annotations


import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mergemodules as mm
from helpers import assert_close_to_scale
from mergemodules.layers import MergedTensor, MergedWeight
from tta_setup import one_thread  # noqa: F401  (autouse fixture)
from tta_setup import D_IN, learnables, models, tasks, total_entropy

ADAPTIVE = ["adamerging_taskwise", "adamerging_layerwise", "cart_pp", "adarank_ta", "adarank_cart"]


@pytest.fixture(scope="module")
def setting():
    return models()


def _x() -> torch.Tensor:
    return torch.randn(5, 4, D_IN, generator=torch.Generator().manual_seed(7))


def _assert_same_tensors(a: mm.MergedModel, b: mm.MergedModel, tol: float = 0.0) -> None:
    """Every merged tensor of ``a`` equals that of ``b`` (bit for bit at ``tol=0``, else to ``tol`` of its
    scale), and so do the outputs."""
    ta, tb = a.merged_tensors(), b.merged_tensors()
    assert ta.keys() == tb.keys()
    with torch.no_grad():
        for name in ta:
            if tol == 0:
                assert torch.equal(ta[name](), tb[name]()), name
            else:
                assert_close_to_scale(ta[name](), tb[name](), tol)
        if tol == 0:
            assert torch.equal(a(_x()), b(_x()))
        else:
            assert_close_to_scale(a(_x()), b(_x()), tol)


# ------------------------------------------------------------------------- straight-through estimator


@settings(max_examples=50, deadline=None)
@given(
    values=st.lists(st.floats(-50, 50, allow_nan=False).filter(lambda v: abs(v) > 1e-3), min_size=1, max_size=16),
    temperature=st.sampled_from([1.0, 2.0, 5.0, 10.0]),
)
def test_straight_through_forward_is_hard_and_gradient_is_the_sigmoids(values, temperature):
    logits = torch.tensor(values, requires_grad=True)
    mask = mm.straight_through_mask(logits, temperature)
    assert torch.equal(mask.detach(), (logits > 0).float())  # exactly 0 or 1
    weights = torch.linspace(-1.0, 2.0, len(values))
    (mask * weights).sum().backward()
    s = torch.sigmoid(logits.detach() / temperature)
    torch.testing.assert_close(logits.grad, weights * s * (1 - s) / temperature)


def test_mask_gradient_through_the_merged_weight_is_the_straight_through_one(setting):
    pretrained, finetuned = setting
    merged = mm.merge(pretrained, finetuned, "adarank_ta")
    weight = merged.merged_weights()["fc1.weight"]
    target = torch.randn(weight.out_features, weight.in_features, generator=torch.Generator().manual_seed(3))
    (weight() * target).sum().backward()
    # reference: the same loss with the hard mask as a leaf, chained with d sigmoid(ℓ/T)/dℓ
    hard = (weight.mask_logits.detach() >= 0).float().requires_grad_(True)
    scales = (weight.task_coef().detach()[:, None] * weight.S * hard).reshape(-1)
    U, V = weight._concatenated()
    ((weight.base + (U * scales) @ V.t()) * target).sum().backward()
    s = torch.sigmoid(weight.mask_logits.detach() / weight.temperature)
    torch.testing.assert_close(weight.mask_logits.grad, hard.grad * s * (1 - s) / weight.temperature)


# -------------------------------------------------------------------------- settings and initial state


def test_settings_follow_the_papers():
    ta, cart = mm.get_method("adarank_ta"), mm.get_method("adarank_cart")
    assert (ta.base, ta.matrices, ta.rank, ta.mask_rank) == ("pretrained", "svd", None, None)
    assert (ta.scaling, ta.coefficients, ta.dense, ta.matrix_set) == (0.3, "layer", True, "layers")
    assert (cart.base, cart.rank, cart.mask_rank) == ("average", None, 0.08)
    # like the reference code, CART+AdaRank learns layer-wise λ for biases and norms too
    assert (cart.scaling, cart.coefficients, cart.dense, cart.matrix_set) == (1.0, "layer", True, "layers")
    assert ta.temperature == cart.temperature == 10.0 and ta.mask_init == cart.mask_init == 0.1
    assert mm.get_method("adamerging_taskwise").scaling == mm.get_method("adamerging_layerwise").scaling == 0.3
    pp = mm.get_method("cart_pp")
    assert (pp.base, pp.rank, pp.coefficients, pp.scaling, pp.dense) == ("average", 0.08, "layer", 1.0, True)


def test_adamerging_clamps_lambda_to_0_1_as_its_code_and_the_others_do_not():
    for name in ("adamerging_taskwise", "adamerging_layerwise", "awd_adamerging"):
        assert mm.get_method(name).lambda_range == (0.0, 1.0), name
    for name in ("task_arithmetic", "cart_pp", "adarank_ta", "adarank_cart"):  # AdaRank's clamp_weights is off
        assert mm.get_method(name).lambda_range is None, name


@pytest.mark.parametrize("method", ["adamerging_taskwise", "adamerging_layerwise"])
def test_lambda_beyond_the_range_acts_as_its_bound_in_forward_and_fuse(setting, method):
    """The authors' rule: the merged weights use clamp(λ_raw, 0, 1); λ_raw itself is left as trained."""
    merged, reference = mm.merge(*setting, method), mm.merge(*setting, method, lambda_range=None)
    raw = {}
    with torch.no_grad():
        for i, (p, q) in enumerate(zip(merged.parameters(), reference.parameters())):
            values = torch.tensor([-0.4, 1.7, 0.25])[torch.arange(p.numel()) % 3].reshape(p.shape) + 0.01 * i
            p.copy_(values), q.copy_(values.clamp(0, 1))
            raw[i] = values
    _assert_same_tensors(merged, reference)
    assert all(torch.equal(p.detach(), raw[i]) for i, p in enumerate(merged.parameters()))
    with torch.no_grad():
        assert torch.equal(merged.fuse()(_x()), reference.fuse()(_x()))


def test_no_gradient_reaches_a_lambda_beyond_the_range(setting):
    merged = mm.merge(*setting, "adamerging_taskwise")
    (coef,) = merged.parameters()
    with torch.no_grad():
        coef.copy_(torch.tensor([-0.2, 0.5, 1.3]))
    merged(_x()).square().sum().backward()
    assert coef.grad[0] == 0 and coef.grad[2] == 0 and coef.grad[1] != 0


def test_lambda_range_is_checked():
    with pytest.raises(ValueError, match=r"scaling=1.5 lies outside lambda_range=\(0.0, 1.0\)"):
        mm.get_method("adamerging", scaling=1.5)
    assert mm.get_method("adamerging", scaling=1.5, lambda_range=None).lambda_range is None
    assert mm.get_method("adamerging", lambda_range=[-1, 2]).lambda_range == (-1.0, 2.0)  # JSON lists are read
    for bad in ((1.0, 0.0), (0.0, float("inf")), (0.0,), "01", (True, 2.0)):
        with pytest.raises(ValueError, match="lambda_range="):
            mm.get_method("adamerging", lambda_range=bad)


def test_taskwise_lambda_is_one_vector_shared_by_all_tensors(setting):
    merged = mm.merge(*setting, "adamerging_taskwise")
    params = list(merged.parameters())
    assert len(params) == 1 and params[0].shape == (3,) and torch.equal(params[0].detach(), torch.full((3,), 0.3))
    coefs = {id(m.coef) for m in merged.merged_tensors().values() if m.coef is not None}
    assert coefs == {id(params[0])}


def test_layerwise_lambda_per_task_per_tensor_including_biases_and_norms(setting):
    merged = mm.merge(*setting, "adamerging_layerwise")
    tensors = merged.merged_tensors()
    assert {"norm.weight", "norm.bias", "fc1.bias", "attn.in_proj_bias"} <= set(tensors)
    assert len(list(merged.parameters())) == len(tensors) == len({id(m.coef) for m in tensors.values()})
    assert all(m.coef.shape == (3,) for m in tensors.values())


def test_cart_pp_learns_a_lambda_per_task_for_every_tensor(setting):
    """CART++ (papers/000, Eq. 6 and Algorithm 2): θ_avg + Σ_t λ_t^l τ̄_t^l for every layer l, the matrices'
    τ̄ truncated to max(1, int(0.08·r)) components; at λ = 1 the other tensors start at θ_avg."""
    merged = mm.merge(*setting, "cart_pp")
    for name, m in merged.merged_tensors().items():
        assert m.coef is not None and m.coef.shape == (3,), name
        if isinstance(m, MergedWeight):
            assert m.rank == max(1, int(0.08 * min(m.out_features, m.in_features)))
        else:
            assert isinstance(m, MergedTensor) and m.deltas.shape[0] == 3
            with torch.no_grad():
                assert_close_to_scale(m(), m.base, 1e-6)


def test_adarank_initial_masks(setting):
    ta = mm.merge(*setting, "adarank_ta").merged_weights()
    cart = mm.merge(*setting, "adarank_cart").merged_weights()
    for name, w in ta.items():
        assert w.rank == min(w.out_features, w.in_features)
        assert torch.equal(w.mask_logits.detach(), torch.full_like(w.mask_logits, 0.1))
        assert torch.equal(w.masks(), torch.ones_like(w.S))
        on = int(0.08 * w.rank)  # as the reference's int(dim · initial_rank_ratio)
        logits = cart[name].mask_logits.detach()
        assert cart[name].rank == w.rank  # CART+AdaRank stores full rank
        assert torch.equal(logits[:, :on], torch.full_like(logits[:, :on], 0.1))
        assert torch.equal(logits[:, on:], torch.full_like(logits[:, on:], -0.1))


@pytest.mark.parametrize("adaptive, static, options, tol", [
    ("adamerging_taskwise", "task_arithmetic", {}, 0.0),
    ("adamerging_layerwise", "task_arithmetic", {}, 0.0),
    ("adarank_ta", "task_vector_svd", {"rank": None}, 0.0),
    # the CART family's other tensors start at θ_avg + Σ_t 1·(θ_t − θ_avg): θ_avg up to rounding; AdaRank's
    # full-rank factors of these rank-3 task vectors come from LAPACK, CART's top ones from the Gram route
    ("cart_pp", "cart", {}, 1e-6),
])
def test_initial_state_equals_the_static_method(setting, adaptive, static, options, tol):
    _assert_same_tensors(mm.merge(*setting, adaptive), mm.merge(*setting, static, **options), tol)


def test_adarank_cart_starts_at_cart_except_where_no_component_is_on(setting):
    """Both round γ·r down, but CART keeps at least one component and AdaRank's code switches on
    int(0.08·12) = 0 of the 12×16 embedding: that weight starts at θ_avg."""
    adarank, cart = mm.merge(*setting, "adarank_cart"), mm.merge(*setting, "cart")
    with torch.no_grad():
        for name, weight in adarank.merged_weights().items():
            expected = weight.base if name == "embed.weight" else cart.merged_tensors()[name]()
            assert_close_to_scale(weight(), expected, 1e-6)
        assert adarank.merged_weights()["embed.weight"].masks().sum() == 0
        assert cart.merged_weights()["embed.weight"].rank == 1


def test_adarank_cart_at_a_stored_rank_equals_cart_at_that_rank(setting):
    adarank = mm.merge(*setting, "adarank_cart", rank=0.25, mask_rank=0.25)
    _assert_same_tensors(adarank, mm.merge(*setting, "cart", rank=0.25), 1e-6)


def test_adarank_ta_starts_at_dense_task_arithmetic_up_to_rounding(setting):
    adarank, ta = mm.merge(*setting, "adarank_ta"), mm.merge(*setting, "task_arithmetic")
    with torch.no_grad():
        assert_close_to_scale(adarank(_x()), ta(_x()), 1e-5)
        for name, w in adarank.merged_weights().items():
            assert_close_to_scale(w(), ta.merged_tensors()[name](), 1e-5)


def test_is_adaptive_follows_the_settings_not_the_name():
    assert [name for name in ADAPTIVE if mm.get_method(name).is_adaptive] == ADAPTIVE
    static = ["weight_averaging", "task_arithmetic", "ties", "tsv", "cart", "task_vector_svd", "awd_ta"]
    assert not any(mm.get_method(name).is_adaptive for name in static)
    assert mm.get_method("awd_adamerging").is_adaptive and mm.methods.with_awd("adarank_cart").is_adaptive
    assert mm.get_method("task_arithmetic", coefficients="task").is_adaptive
    assert mm.Method("m", matrices="svd", masks=True).is_adaptive


def test_adapt_without_learnables_names_the_registered_adaptive_methods(setting, monkeypatch):
    monkeypatch.setitem(mm.METHODS, "my_adaptive", mm.Method("my_adaptive", coefficients="task"))
    with pytest.raises(ValueError) as error:
        mm.adapt(mm.merge(*setting, "weight_averaging"), tasks(), steps=1)
    assert str(error.value) == (
        "merged has no trainable parameters: merge with an adaptive method (adamerging_taskwise, "
        "adamerging_layerwise, cart_pp, adarank_ta, adarank_cart, adarank_cart_released, awd_adamerging, my_adaptive)"
    )


# ------------------------------------------------------------------------------------ adaptation


@pytest.mark.parametrize("method", ADAPTIVE)
def test_short_adaptation_lowers_entropy_changes_learnables_and_fuses(setting, method):
    merged = mm.merge(*setting, method)
    task_set = tasks()
    before, start = total_entropy(merged, task_set), learnables(merged)
    history = mm.adapt(merged, task_set, steps=10, lr=0.03, seed=0)
    after, end = total_entropy(merged, task_set), learnables(merged)
    assert after < before - 0.05, (before, after)
    assert history[-1]["loss"] < history[0]["loss"]
    coefs = [k for k in end if k.endswith("coef")]
    assert coefs and all(not torch.equal(start[k], end[k]) for k in coefs)
    masks = [k for k in end if k.endswith("mask_logits")]
    assert bool(masks) == method.startswith("adarank")
    if masks:
        assert all(not torch.equal(start[k], end[k]) for k in masks)
        flipped = sum(int(((start[k] >= 0) != (end[k] >= 0)).sum()) for k in masks)
        assert flipped > 0  # some hard masks changed
    plain = merged.fuse()
    assert not any(isinstance(m, (MergedWeight, MergedTensor)) for m in plain.modules())
    with torch.no_grad():
        assert_close_to_scale(plain(_x()), merged(_x()), 1e-5)
