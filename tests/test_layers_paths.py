"""The fast paths of a merged layer: materialised vs low-rank, the automatic choice, one evaluation per forward.

The basic formula, fuse and error tests are in ``test_layers.py``; these check that every faster
way of computing the same thing gives the same values and the same gradients.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from mergemodules import MergedLinear, MergedTensor, MergedWeight, merge, weight_cache


def random_weight(T: int, out: int, inp: int, k: int, seed: int = 0, dtype=torch.float64, off: float = 0.5) -> MergedWeight:
    """A merged weight with random factors, λ and mask logits (about ``off`` of the components masked out)."""
    gen = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(T, out, k, generator=gen, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(T, inp, k, generator=gen, dtype=torch.float64)).Q
    S = torch.rand(T, k, generator=gen, dtype=torch.float64).sort(descending=True).values + 0.1
    logits = torch.randn(T, k, generator=gen, dtype=torch.float64) + (0.5 - off) * 3
    coef = nn.Parameter(torch.randn(T, generator=gen, dtype=torch.float64).to(dtype))
    return MergedWeight(torch.randn(out, inp, generator=gen, dtype=torch.float64).to(dtype), U=U.to(dtype), S=S.to(dtype),
                        V=V.to(dtype), coef=coef, mask_logits=nn.Parameter(logits.to(dtype)))


def autograd_reference(weight: MergedWeight) -> torch.Tensor:
    """B + Σ_t λ_t U_t diag(m_t σ_t) V_tᵀ written with plain autograd operations, every component multiplied."""
    scales = weight.task_coef()[:, None] * weight.S * weight.masks()
    return weight.base + torch.einsum("tok,tk,tik->oi", weight.U, scales, weight.V)


def grads(weight: MergedWeight, loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.autograd.grad(loss, [weight.coef, weight.mask_logits])


@settings(max_examples=20, deadline=None)
@given(T=st.integers(1, 4), out=st.integers(1, 12), inp=st.integers(1, 12), off=st.sampled_from([0.0, 0.5, 1.0]), data=st.data())
def test_materialised_weight_and_its_gradients_match_plain_autograd(T, out, inp, off, data):
    """Skipping masked-out components in the forward pass changes nothing, and they still get gradients."""
    k = data.draw(st.integers(1, min(out, inp)))
    weight = random_weight(T, out, inp, k, seed=data.draw(st.integers(0, 999)), off=off)
    probe = torch.randn(out, inp, dtype=torch.float64)
    fast = weight()
    reference = autograd_reference(weight)
    torch.testing.assert_close(fast, reference, rtol=1e-12, atol=1e-12)
    for g_fast, g_ref in zip(grads(weight, (fast * probe).sum()), grads(weight, (reference * probe).sum())):
        torch.testing.assert_close(g_fast, g_ref, rtol=1e-10, atol=1e-12)


def test_masked_out_components_still_get_straight_through_gradients():
    weight = random_weight(2, 7, 5, 4, seed=1)
    with torch.no_grad():
        weight.mask_logits[0, 1:] = -1.0  # task 0 keeps only its first component
    _, g_logits = grads(weight, weight().pow(2).sum())
    assert weight.masks()[0].tolist() == [1.0, 0.0, 0.0, 0.0]
    assert torch.all(g_logits[0, 1:] != 0)


@pytest.mark.parametrize("layout", ["out_in", "in_out"])
def test_weight_in_either_layout_has_the_reference_gradient(layout):
    weight = random_weight(3, 6, 4, 3, seed=2)
    if layout == "in_out":
        weight = MergedWeight(weight.base.t(), U=weight.U, S=weight.S, V=weight.V, coef=weight.coef,
                              mask_logits=weight.mask_logits, layout="in_out")
    probe = torch.randn(6, 4, dtype=torch.float64)
    value = weight() if layout == "out_in" else weight().t()
    expected = autograd_reference(weight)
    torch.testing.assert_close(value, expected, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads(weight, (value * probe).sum()), grads(weight, (expected * probe).sum())):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("bias", [True, False])
def test_low_rank_path_equals_materialised_path(dtype, bias):
    weight = random_weight(3, 10, 8, 4, seed=3, dtype=dtype)
    layer = MergedLinear(weight, MergedTensor(torch.randn(10, dtype=dtype), torch.randn(3, 10, dtype=dtype), weight.coef) if bias else None)
    x = torch.randn(2, 5, 8, dtype=dtype)
    outputs, gradients = {}, {}
    for path in ("materialize", "low_rank"):
        weight.path = path
        y = layer(x)
        outputs[path] = y
        gradients[path] = grads(weight, y.pow(2).sum())
    tol = {"rtol": 1e-10, "atol": 1e-10} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-4}
    torch.testing.assert_close(outputs["low_rank"], outputs["materialize"], **tol)
    for a, b in zip(gradients["low_rank"], gradients["materialize"]):
        torch.testing.assert_close(a, b, **tol)


class CountingWeight(MergedWeight):
    """A merged weight that counts its evaluations."""

    calls = 0

    def compute(self) -> torch.Tensor:
        CountingWeight.calls += 1
        return super().compute()


def counting(weight: MergedWeight) -> MergedWeight:
    weight.__class__ = CountingWeight
    return weight


def test_automatic_choice_follows_the_token_count():
    out, inp = 12, 6  # break-even out·in/(out+in) = 4 tokens
    weight = counting(random_weight(2, out, inp, 3, seed=4))
    layer = MergedLinear(weight)
    assert [weight.use_low_rank(t) for t in (1, 3, 4, 5, 100)] == [True, True, False, False, False]
    CountingWeight.calls = 0
    layer(torch.randn(3, inp, dtype=torch.float64))  # 3 tokens: factors applied to x, W never built
    assert CountingWeight.calls == 0
    layer(torch.randn(2, 2, inp, dtype=torch.float64))  # 4 tokens (leading dims count): W built once
    assert CountingWeight.calls == 1
    weight.path = "low_rank"
    assert weight.use_low_rank(100)
    weight.path = "materialize"
    assert not weight.use_low_rank(1)


def test_a_weight_already_built_in_this_forward_is_reused_whatever_the_token_count():
    weight = counting(random_weight(2, 12, 6, 3, seed=5))
    layer = MergedLinear(weight)
    x = torch.randn(1, 6, dtype=torch.float64)
    CountingWeight.calls = 0
    with weight_cache():
        layer(torch.randn(50, 6, dtype=torch.float64))
        assert not weight.use_low_rank(1)
        small = layer(x)
    assert CountingWeight.calls == 1
    weight.path = "low_rank"
    torch.testing.assert_close(small, layer(x), rtol=1e-12, atol=1e-12)


def test_dense_and_base_only_weights_never_take_the_low_rank_path():
    dense = MergedWeight(torch.randn(4, 3), deltas=torch.randn(2, 4, 3), coef=nn.Parameter(torch.ones(2)))
    assert not dense.use_low_rank(1) and not MergedWeight(torch.randn(4, 3)).use_low_rank(1)


class Block(nn.Module):
    """Self-attention (reads ``in_proj_weight`` and ``out_proj.weight`` as tensors) and an MLP."""

    def __init__(self, width: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.fc = nn.Linear(width, 4 * width)
        self.proj = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(x, x, x, need_weights=False)[0]
        return x + self.proj(torch.relu(self.fc(x)))


def tuned(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: v.detach() + 0.05 * torch.randn(v.shape, generator=gen) for k, v in model.named_parameters()}


def test_every_merged_weight_is_computed_once_per_forward_and_once_per_cached_step(monkeypatch):
    model = Block()
    merged = merge(model, [tuned(model, s) for s in range(3)], "adarank_cart")
    calls: dict[int, int] = {}
    original = MergedWeight.compute

    def compute(self):
        calls[id(self)] = calls.get(id(self), 0) + 1
        return original(self)

    monkeypatch.setattr(MergedWeight, "compute", compute)
    weights = merged.merged_weights()
    assert {"attn.in_proj_weight", "attn.out_proj.weight", "fc.weight", "proj.weight"} <= set(weights)
    x = torch.randn(2, 30, 16)  # 60 tokens: above every break-even, so every weight is materialised
    merged(x).sum().backward()
    assert sorted(calls.values()) == [1] * len(weights)
    # a TTA step over several tasks: one evaluation for all the forwards inside one weight_cache block
    calls.clear()
    with weight_cache():
        loss = sum(merged(torch.randn(2, 30, 16)).pow(2).mean() for _ in range(3))
    loss.backward()
    assert sorted(calls.values()) == [1] * len(weights)
    # outside the block the cache is gone: a new forward sees updated λ
    calls.clear()
    merged(x)
    assert sorted(calls.values()) == [1] * len(weights)


def test_one_cached_step_gives_the_gradient_of_separate_forwards():
    model = Block()
    merged = merge(model, [tuned(model, s) for s in range(2)], "adarank_ta")
    xs = [torch.randn(1, 40, 16) for _ in range(2)]
    params = list(merged.parameters())
    separate = torch.autograd.grad(sum(merged(x).pow(2).mean() for x in xs), params)
    with weight_cache():
        cached = torch.autograd.grad(sum(merged(x).pow(2).mean() for x in xs), params)
    for a, b in zip(cached, separate):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
