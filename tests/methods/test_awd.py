"""AWD (papers/003 §3.3): the loss, its streamed gradient, the learned δ, and AWD inside merge()."""
from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from mergemodules import get_method, merge
from mergemodules import methods
from mergemodules.methods import Ties, with_awd
from mergemodules.methods.awd import AWD, FittedAWD, awd_gradient, awd_loss, cosine_matrix, learn_redundant_vector


def overlapping(T: int, shapes: list[tuple[int, ...]], shared: float = 1.0, specific: float = 1.0, seed: int = 0,
                dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """Stacked task vectors τ_i = shared·c + specific·s_i per tensor.

    The expected cos(τ_i, τ_j) is shared² / (shared² + specific²).
    """
    gen = torch.Generator().manual_seed(seed)
    out = []
    for shape in shapes:
        common = shared * torch.randn(shape, generator=gen, dtype=dtype)
        out.append(torch.stack([common + specific * torch.randn(shape, generator=gen, dtype=dtype) for _ in range(T)]))
    return out


def reference_loss(task_vectors: list[torch.Tensor], deltas: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """Eq. 14 the obvious way: concatenate everything, pairwise F.cosine_similarity, autograd-friendly."""
    T = task_vectors[0].shape[0]
    flat = torch.cat([tv.reshape(T, -1) for tv in task_vectors], dim=1)
    delta = torch.cat([d.reshape(-1) for d in deltas])
    hat = flat - delta
    pairs = [F.cosine_similarity(hat[i], hat[j], dim=0).abs() for i in range(T) for j in range(T) if i != j]
    return torch.stack(pairs).mean() + alpha * delta.norm()


def mean_abs_cos(task_vectors: list[torch.Tensor]) -> float:
    T = task_vectors[0].shape[0]
    flat = torch.cat([tv.reshape(T, -1) for tv in task_vectors], dim=1).double()
    cos = cosine_matrix(flat @ flat.T)
    return float(cos[~torch.eye(T, dtype=torch.bool)].abs().mean())


# ---- the objective and its gradient ------------------------------------------------------------

def test_loss_equals_concatenated_reference() -> None:
    tvs = overlapping(5, [(6, 4), (3,), (2, 2, 2)], dtype=torch.float64)
    deltas = [0.3 * torch.randn(tv.shape[1:], dtype=torch.float64) for tv in tvs]
    assert awd_loss(tvs, deltas, 0.05) == pytest.approx(float(reference_loss(tvs, deltas, 0.05)), rel=1e-12)


def test_gradient_matches_finite_differences() -> None:
    tvs = overlapping(4, [(5, 3), (4,)], dtype=torch.float64)
    deltas = [0.4 * torch.randn(tv.shape[1:], dtype=torch.float64) for tv in tvs]
    alpha, eps = 0.1, 1e-6
    grads = awd_gradient(tvs, deltas, alpha)
    for l, delta in enumerate(deltas):
        for idx in itertools.product(*(range(n) for n in delta.shape)):
            plus = [d.clone() for d in deltas]
            minus = [d.clone() for d in deltas]
            plus[l][idx] += eps
            minus[l][idx] -= eps
            numeric = (awd_loss(tvs, plus, alpha) - awd_loss(tvs, minus, alpha)) / (2 * eps)
            assert float(grads[l][idx]) == pytest.approx(numeric, abs=1e-8)


def test_gradient_equals_autograd_of_reference() -> None:
    tvs = overlapping(6, [(7, 5), (9,)], dtype=torch.float64)
    deltas = [(0.5 * torch.randn(tv.shape[1:], dtype=torch.float64)).requires_grad_() for tv in tvs]
    reference_loss(tvs, deltas, 0.02).backward()
    grads = awd_gradient(tvs, [d.detach() for d in deltas], 0.02)
    for g, d in zip(grads, deltas):
        torch.testing.assert_close(g, d.grad, rtol=1e-10, atol=1e-12)


def test_gradient_at_zero_is_the_minimum_norm_subgradient() -> None:
    tvs = overlapping(3, [(4, 4)], dtype=torch.float64)
    zero = [torch.zeros(4, 4, dtype=torch.float64, requires_grad=True)]
    reference_loss(tvs, zero, 0.0).backward()  # ∇L_O at δ = 0
    g0 = zero[0].grad
    norm = float(g0.norm())
    torch.testing.assert_close(awd_gradient(tvs, [zero[0].detach()], 0.0)[0], g0)
    torch.testing.assert_close(awd_gradient(tvs, [zero[0].detach()], norm / 4)[0], g0 * 0.75)
    assert torch.equal(awd_gradient(tvs, [zero[0].detach()], 2 * norm)[0], torch.zeros(4, 4, dtype=torch.float64))


@settings(max_examples=25, deadline=None)
@given(
    T=st.integers(2, 5),
    sizes=st.lists(st.integers(1, 6), min_size=2, max_size=4),
    seed=st.integers(0, 2**16),
)
def test_streaming_over_tensors_equals_one_concatenated_tensor(T: int, sizes: list[int], seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    tvs = [torch.randn(T, n, generator=gen, dtype=torch.float64) + 0.5 for n in sizes]
    deltas = [0.3 * torch.randn(n, generator=gen, dtype=torch.float64) for n in sizes]
    joined_tv, joined_delta = [torch.cat(tvs, dim=1)], [torch.cat(deltas)]
    assert awd_loss(tvs, deltas, 0.3) == pytest.approx(awd_loss(joined_tv, joined_delta, 0.3), rel=1e-12)
    assert 0.0 <= awd_loss(tvs, deltas, 0.0) <= 1.0 + 1e-12
    torch.testing.assert_close(torch.cat(awd_gradient(tvs, deltas, 0.3)), awd_gradient(joined_tv, joined_delta, 0.3)[0])


def test_float32_streaming_matches_float64() -> None:
    tvs = overlapping(8, [(64, 48), (64,)], shared=3.0, specific=1.0)
    deltas = [0.9 * tv.mean(dim=0) for tv in tvs]  # removes most of the shared part: cancellation-prone
    exact = awd_loss([tv.double() for tv in tvs], [d.double() for d in deltas], 1e-3)
    assert awd_loss(tvs, deltas, 1e-3) == pytest.approx(exact, rel=1e-5)


# ---- learning δ ------------------------------------------------------------------------------

def test_learning_reduces_loss_and_cosine_on_overlapping_task_vectors() -> None:
    tvs = overlapping(4, [(20, 10), (7,)], shared=1.0, specific=1.0)
    before = mean_abs_cos(tvs)
    assert before == pytest.approx(0.5, abs=0.1)  # shared² / (shared² + specific²)
    deltas, history, cos_before, cos_after = learn_redundant_vector(tvs, alpha=1e-3, steps=150, lr=0.02)
    assert len(history) == 151
    assert history[0] == pytest.approx(before, rel=1e-6)  # δ⁰ = 0: L = L_O(τ)
    assert history[-1] < 0.2 * history[0]
    after = mean_abs_cos([tv - d for tv, d in zip(tvs, deltas)])
    assert after < 0.1 < before
    learned_mean = cos_after[~torch.eye(4, dtype=torch.bool)].abs().mean().item()
    assert learned_mean == pytest.approx(after, rel=1e-4, abs=1e-6)
    torch.testing.assert_close(cos_before.diagonal(), torch.ones(4, dtype=torch.float64))
    assert [d.shape for d in deltas] == [torch.Size([20, 10]), torch.Size([7])]


def test_plain_gradient_descent_also_reduces_the_loss() -> None:
    tvs = overlapping(4, [(20, 10)])
    _, history, _, _ = learn_redundant_vector(tvs, alpha=1e-3, steps=100, lr=50.0, optimizer="sgd")
    assert history[-1] < 0.5 * history[0]


def test_large_alpha_keeps_delta_exactly_zero() -> None:
    tvs = overlapping(3, [(8, 8)])
    deltas, history, before, after = learn_redundant_vector(tvs, alpha=10.0, steps=20, lr=0.01)
    assert torch.equal(deltas[0], torch.zeros(8, 8))
    assert history == [history[0]] * 21
    torch.testing.assert_close(before, after)


# ---- bad input -------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "options, parameter",
    [
        ({"alpha": -1e-3}, "alpha"), ({"alpha": float("nan")}, "alpha"), ({"steps": 0}, "steps"),
        ({"steps": -5}, "steps"), ({"steps": 2.5}, "steps"), ({"lr": 0.0}, "lr"), ({"lr": -1.0}, "lr"),
        ({"optimizer": "lbfgs"}, "optimizer"), ({"scope": "blocks"}, "scope"), ({"scope": []}, "scope"),
    ],
)
def test_bad_options_name_the_parameter(options: dict, parameter: str) -> None:
    with pytest.raises(ValueError, match=parameter):
        AWD(**options)
    with pytest.raises(ValueError, match=parameter):
        get_method("awd_ta", **options)


def test_fewer_than_two_tasks_is_an_error() -> None:
    with pytest.raises(ValueError, match="at least two tasks"):
        learn_redundant_vector([torch.randn(1, 4, 4)], alpha=0.0, steps=1, lr=0.1)
    model = tiny_transformer()
    with pytest.raises(ValueError, match="at least two tasks"):
        merge(model, [finetune(model, 0)], "awd_ta", steps=1)


def test_zero_task_vector_is_an_error() -> None:
    tvs = overlapping(3, [(4, 4)])
    tvs[0][1] = 0
    with pytest.raises(ValueError, match=r"task vector\(s\) \[1\] are zero"):
        learn_redundant_vector(tvs, alpha=0.0, steps=1, lr=0.1)


def test_vectors_before_fit_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="AWD.fit"):
        AWD().vectors("w", torch.zeros(2, 3), True)


# ---- AWD inside merge() ----------------------------------------------------------------------

def tiny_transformer() -> nn.Module:
    return nn.Sequential(nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, batch_first=True), nn.Linear(16, 3))


SHARED_SEED = 100


def finetune(model: nn.Module, seed: int, shared: float = 0.02, specific: float = 0.02) -> nn.Module:
    """A fine-tuned copy with a component shared by all tasks plus a task-specific one."""
    shared_gen, own_gen = torch.Generator().manual_seed(SHARED_SEED), torch.Generator().manual_seed(seed)
    tuned = copy.deepcopy(model)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(shared * torch.randn(p.shape, generator=shared_gen))
            p.add_(specific * torch.randn(p.shape, generator=own_gen))
    return tuned


def task_vectors_of(model: nn.Module, finetuned: list[nn.Module], base: str = "pretrained") -> dict[str, torch.Tensor]:
    tuned = [dict(f.named_parameters()) for f in finetuned]
    values = {n: torch.stack([t[n].detach() for t in tuned]) for n, _ in model.named_parameters()}
    if base == "pretrained":
        return {n: v - dict(model.named_parameters())[n].detach() for n, v in values.items()}
    return {n: v - v.mean(dim=0) for n, v in values.items()}


MATRICES = [
    "0.self_attn.in_proj_weight", "0.self_attn.out_proj.weight", "0.linear1.weight", "0.linear2.weight", "1.weight",
]


@pytest.fixture(scope="module")
def models() -> tuple[nn.Module, list[nn.Module]]:
    torch.manual_seed(0)
    model = tiny_transformer().eval()
    return model, [finetune(model, seed) for seed in range(4)]


AWD_OPTIONS = {"alpha": 1e-3, "steps": 60, "lr": 2e-3}


def test_awd_ta_is_task_arithmetic_on_the_disentangled_vectors(models) -> None:
    model, finetuned = models
    merged = merge(model, finetuned, "awd_ta", **AWD_OPTIONS)
    fitted = merged.transform
    assert isinstance(fitted, FittedAWD)
    assert sorted(fitted.deltas) == sorted(MATRICES)  # scope="matrices": no bias, no norm
    tvs = task_vectors_of(model, finetuned)
    expected_deltas, history, before, after = learn_redundant_vector([tvs[n] for n in MATRICES], **AWD_OPTIONS)
    for name, delta in zip(MATRICES, expected_deltas):
        torch.testing.assert_close(fitted.deltas[name], delta)
    assert fitted.loss_history == pytest.approx(history)
    torch.testing.assert_close(fitted.cosine_before, before)
    assert fitted.mean_abs_cosine_after < 0.5 * fitted.mean_abs_cosine_before
    assert fitted.delta_norm == pytest.approx(math.sqrt(sum(float(d.pow(2).sum()) for d in expected_deltas)))
    fused = dict(merged.fuse().named_parameters())
    for name, pretrained in model.named_parameters():
        tv = tvs[name] - fitted.deltas[name] if name in fitted.deltas else tvs[name]
        torch.testing.assert_close(fused[name], pretrained + 0.3 * tv.sum(dim=0), rtol=1e-5, atol=1e-6)


def test_awd_ta_with_large_alpha_equals_task_arithmetic(models) -> None:
    model, finetuned = models
    merged = merge(model, finetuned, "awd_ta", alpha=1e3, steps=5, lr=1e-2)
    assert merged.transform.delta_norm == 0.0
    awd = merged.fuse().state_dict()
    ta = merge(model, finetuned, "task_arithmetic").fuse().state_dict()
    assert awd.keys() == ta.keys()
    for key in ta:
        assert torch.equal(awd[key], ta[key]), key


def test_awd_adamerging_has_layerwise_lambdas_on_the_disentangled_vectors(models) -> None:
    model, finetuned = models
    merged = merge(model, finetuned, "awd_adamerging", **AWD_OPTIONS)
    lambdas = list(merged.parameters())
    assert len(lambdas) == len(list(model.parameters()))  # one λ vector per merged tensor
    assert all(torch.equal(lam.detach(), torch.full((4,), 0.3)) for lam in lambdas)
    weight = merged.merged_tensors()["0.linear1.weight"]
    with torch.no_grad():
        weight.coef.copy_(torch.tensor([0.1, 0.2, 0.3, 0.4]))
    tv = task_vectors_of(model, finetuned)["0.linear1.weight"] - merged.transform.deltas["0.linear1.weight"]
    expected = model[0].linear1.weight + torch.tensordot(torch.tensor([0.1, 0.2, 0.3, 0.4]), tv, dims=1)
    torch.testing.assert_close(weight(), expected, rtol=1e-5, atol=1e-6)


def test_pattern_scope_narrows_the_matrices(models) -> None:
    model, finetuned = models
    merged = merge(model, finetuned, "awd_ta", scope=["0.linear*"], **AWD_OPTIONS)
    assert sorted(merged.transform.deltas) == ["0.linear1.weight", "0.linear2.weight"]
    merged = merge(model, finetuned, "awd_ta", scope="all", **AWD_OPTIONS)
    assert sorted(merged.transform.deltas) == sorted(n for n, _ in model.named_parameters())
    with pytest.raises(ValueError, match="selects no merged tensor"):
        merge(model, finetuned, "awd_ta", scope=["nothing*"], **AWD_OPTIONS)


def test_awd_cart_learns_delta_on_vectors_centred_at_the_average(models) -> None:
    model, finetuned = models
    merged = merge(model, finetuned, get_method("cart", transform=AWD(**AWD_OPTIONS)))
    centred = task_vectors_of(model, finetuned, base="average")
    expected, _, _, _ = learn_redundant_vector([centred[n] for n in MATRICES], **AWD_OPTIONS)
    for name, delta in zip(MATRICES, expected):
        torch.testing.assert_close(merged.transform.deltas[name], delta, rtol=1e-4, atol=1e-7)
    assert merged.method.name == "cart" and merged.method.rank == 0.08


def test_with_awd_fits_the_inner_transform_on_the_disentangled_vectors(models) -> None:
    model, finetuned = models
    method = with_awd("ties", steps=1)
    assert method.name == "awd_ties" and isinstance(method.transform.inner, Ties)
    fitted = merge(model, finetuned, method, **AWD_OPTIONS).transform  # AWD options given later keep the inner TIES
    assert len(fitted.loss_history) == AWD_OPTIONS["steps"] + 1
    tvs = task_vectors_of(model, finetuned)
    disentangled = {n: tv - fitted.deltas[n] if n in fitted.deltas else tv for n, tv in tvs.items()}
    ties = Ties().fit(lambda: ((n, tv, n in MATRICES) for n, tv in disentangled.items()))
    assert fitted.inner.thresholds == pytest.approx(ties.thresholds)
    name = "0.linear2.weight"
    torch.testing.assert_close(fitted.vectors(name, tvs[name], True), ties.vectors(name, disentangled[name], True))


def test_deprecated_with_awd_path_is_the_registry_one() -> None:
    from mergemodules.methods import awd

    with pytest.warns(DeprecationWarning, match="import it from mergemodules.methods"):
        assert awd.with_awd is methods.with_awd
    with pytest.raises(AttributeError, match="has no attribute 'ALPHA_GRID'"):  # dead code out (#13)
        awd.ALPHA_GRID  # noqa: B018


def test_awd_states_what_its_inner_transform_stores() -> None:
    assert with_awd("ties").transform.stored_terms(8) == 1 and with_awd("ties").transform.stored_rank(96, 8) == 96
    assert with_awd("tsv").transform.stored_terms(8) == 8 and with_awd("tsv").transform.stored_rank(768, 8) == 96
    assert with_awd("cart").transform.stored_rank(61, 8) == 61


def test_awd_adarank_factorises_the_disentangled_vectors(models) -> None:
    model, finetuned = models
    merged = merge(model, finetuned, with_awd("adarank_ta"), **AWD_OPTIONS)
    name = "0.linear1.weight"
    weight = merged.merged_weights()[name]
    assert weight.mask_logits is not None and weight.rank == 16  # full rank, all components on
    tv = task_vectors_of(model, finetuned)[name] - merged.transform.deltas[name]
    torch.testing.assert_close(weight(), model[0].linear1.weight + 0.3 * tv.sum(dim=0), rtol=1e-4, atol=1e-5)


def test_example_runs(tmp_path, monkeypatch) -> None:
    import runpy
    import sys
    from pathlib import Path

    monkeypatch.setattr(sys, "argv", ["awd_diagnostics.py", str(tmp_path / "cosine.png")])
    example = runpy.run_path(str(Path(__file__).parents[2] / "examples" / "awd_diagnostics.py"), run_name="__main__")
    assert example["awd"].mean_abs_cosine_after < 0.1 < example["awd"].mean_abs_cosine_before
    assert (tmp_path / "cosine.png").read_bytes()[:4] == b"\x89PNG"
