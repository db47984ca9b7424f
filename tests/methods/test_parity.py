"""Parity with the authors' released code (docs/methods.md).

Part 1 pins each convention on a case small enough to check by hand; part 2 checks, in float64 on a small
open_clip vision tower, that ``merge(...).fuse()`` gives the weights of an independent reference written here
from the papers' equations and the released code's rules, to 1e-10 relative, for every static method and every
adaptive method at initialisation. The reference code (JH-GEECS/CART, david3684/AdaRank,
AntoAndGar/task_singular_vectors, prateeky2806/ties-merging, tanganke/fusion_bench, arcee-ai/mergekit) was read,
not copied: the rules below are restated from it.
"""
from __future__ import annotations

import pytest
import torch
from helpers import hf_bert, perturbed
from torch import Tensor, nn

import mergemodules as mm
from mergemodules.methods.tsv import TaskSingularVectors
from mergemodules.targets import method_layout, plan

TOL = 1e-10


def fused(pretrained: nn.Module, finetuned, method: str, **options) -> dict[str, Tensor]:
    merged = mm.merge(pretrained, finetuned, method, **options)
    return {k: v.detach() for k, v in merged.fuse().state_dict().items()}


def diag(*values: float, rows: int = 6) -> Tensor:
    """A rows × len(values) matrix with ``values`` on its diagonal (singular values, vectors e_i)."""
    out = torch.zeros(rows, len(values), dtype=torch.float64)
    out[range(len(values)), range(len(values))] = torch.tensor(values, dtype=torch.float64)
    return out


class Vector(nn.Module):
    """One parameter of 10 entries, to pin TIES's entry-wise rules."""

    def __init__(self) -> None:
        super().__init__()
        self.v = nn.Parameter(torch.zeros(10, dtype=torch.float64))


def linear_6x4(*deltas: Tensor) -> tuple[nn.Module, list[dict[str, Tensor]]]:
    """A bias-free Linear(4 → 6) at zero and one fine-tune per task vector given (6×4, rank r = 4)."""
    pretrained = nn.Linear(4, 6, bias=False).double()
    with torch.no_grad():
        pretrained.weight.zero_()
    return pretrained, [{"weight": delta} for delta in deltas]


# ------------------------------------------------------------------------------ 1. conventions by hand


def test_kept_rank_is_int_of_gamma_r_on_a_6x4_matrix():
    """CART's code keeps max(1, int(γ·r)): γ = 0.6 of r = 4 keeps 2 components (⌈2.4⌉ would keep 3)."""
    pretrained, tuned = linear_6x4(diag(4.0, 3.0, 2.0, 1.0))
    weight = fused(pretrained, tuned, "task_vector_svd", rank=0.6, scaling=1.0)["weight"]
    assert torch.equal(weight, diag(4.0, 3.0, 0.0, 0.0))
    weight = fused(pretrained, tuned, "task_vector_svd", rank=0.1, scaling=1.0)["weight"]  # int(0.4) = 0 → 1
    assert torch.equal(weight, diag(4.0, 0.0, 0.0, 0.0))


def test_cart_keeps_int_of_gamma_r_centred_components():
    """T = 3 random 6×4 task vectors: CART = θ_avg + Σ_t SVD_2(θ_t − θ_avg) at γ = 0.6, not SVD_3."""
    gen = torch.Generator().manual_seed(0)
    deltas = [torch.randn(6, 4, generator=gen, dtype=torch.float64) for _ in range(3)]
    pretrained, tuned = linear_6x4(*deltas)
    average = sum(deltas) / 3

    def top(matrix: Tensor, k: int) -> Tensor:
        U, S, Vh = torch.linalg.svd(matrix)
        return U[:, :k] @ torch.diag(S[:k]) @ Vh[:k]

    merged = mm.merge(pretrained, tuned, "cart", rank=0.6)
    assert merged.merged_weights()["weight"].rank == 2
    expected = average + sum(top(delta - average, 2) for delta in deltas)
    torch.testing.assert_close(merged.fuse().weight.detach(), expected, rtol=0, atol=1e-14)
    assert not torch.allclose(expected, average + sum(top(delta - average, 3) for delta in deltas))


@pytest.mark.parametrize("mask_rank, on", [(0.6, 2), (0.2, 0)])
def test_adarank_initial_mask_count_is_int_of_ratio_times_r(mask_rank, on):
    """AdaRank's code switches on int(r·ratio) components (0 allowed): ℓ = +0.1 on, −0.1 off."""
    pretrained, tuned = linear_6x4(diag(4.0, 3.0, 2.0, 1.0))
    merged = mm.merge(pretrained, tuned, "adarank_ta", mask_rank=mask_rank)
    weight = merged.merged_weights()["weight"]
    assert torch.equal(weight.mask_logits.detach()[0], torch.tensor([0.1] * on + [-0.1] * (4 - on)))
    values = [4.0, 3.0, 2.0, 1.0][:on] + [0.0] * (4 - on)
    torch.testing.assert_close(merged.fuse().weight.detach(), 0.3 * diag(*values), rtol=0, atol=1e-15)


@pytest.mark.parametrize("tasks, per_task", [(3, 1), (5, 0)])
def test_tsv_keeps_int_of_r_over_t_components_per_task(tasks, per_task):
    """TSV-M's code keeps int(r·(1/T)) per task: r = 4 gives 1 at T = 3 and 0 at T = 5 (the matrix stays θ₀)."""
    pretrained, tuned = linear_6x4(*[diag(4.0 + t, 3.0, 2.0, 1.0) for t in range(tasks)])
    merged = mm.merge(pretrained, tuned, "tsv")
    assert merged.merged_weights()["weight"].rank == per_task
    if per_task == 0:
        assert torch.equal(merged.fuse().weight.detach(), torch.zeros(6, 4, dtype=torch.float64))


def test_tsv_per_task_count_is_rounded_in_floating_point_as_the_code():
    """int(49·(1/49)) = int(0.9999999999999999) = 0: a 49-wide matrix with 49 tasks keeps nothing."""
    terms = torch.randn(49, 49, 49, dtype=torch.float64)
    assert TaskSingularVectors().factorize(terms, 49).S.shape == (49, 0)
    assert TaskSingularVectors().factorize(terms[:7], 49).S.shape == (7, 7)


TASK_0 = [5.0, -6.0, 5.0, 5.0, 0.1, 0.0, 0.0, 0.0, 0.0, 0.0]
TASK_1 = [-5.0, -2.0, 0.0, -3.0, 0.2, 0.0, 0.0, 0.0, 0.0, 0.0]


def test_ties_keeps_int_dn_plus_one_and_ties_and_elects_the_majority_where_values_cancel():
    """density 0.2 of N = 10 keeps int(2) + 1 = 3 per task (kthvalue(8) with ≥): task 0 keeps 5, −6, 5, 5
    (a tie at the threshold 5), task 1 keeps −5, −2, −3. Entry 0 cancels (5 − 5 = 0): its sign is the global
    majority, sign(0 − 1 + 1 + 1) = +, so it keeps 5. Entry 1 averages −6 and −2; entries 2 and 3 keep 5."""
    tuned = [{"v": torch.tensor(TASK_0, dtype=torch.float64)}, {"v": torch.tensor(TASK_1, dtype=torch.float64)}]
    merged = fused(Vector(), tuned, "ties", density=0.2)["v"]
    assert merged.tolist() == [5.0, -4.0, 5.0, 5.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]


def test_ties_tensor_scope_follows_mergekit():
    """mergekit: int(0.2·10) = 2 per task per tensor, the first of equal magnitudes kept (task 0: −6 and the 5 at
    entry 0), + elected where the sum is ≥ 0 (entry 0: 5 − 5), the mean of the entries with the elected sign."""
    tuned = [{"v": torch.tensor(TASK_0, dtype=torch.float64)}, {"v": torch.tensor(TASK_1, dtype=torch.float64)}]
    merged = fused(Vector(), tuned, "ties", density=0.2, scope="tensor")["v"]
    assert merged.tolist() == [5.0, -6.0, 0.0, -3.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]


def test_matrix_sets_of_each_method():
    tower = small_tower()
    entries = {e.name: e for e in plan(tower)}
    layers = [n for n, e in entries.items() if method_layout(e, "layers")]
    assert layers == [n for n in entries if reference_block_matrix(n, entries[n].shape)]  # CART's and AdaRank's rule
    all_2d = [n for n, e in entries.items() if method_layout(e, "all_2d")]
    assert all_2d == [n for n, e in entries.items() if len(e.shape) == 2]  # TSV-M's: positional table and proj too
    assert method_layout(entries["proj"], "rule") == "in_out" and method_layout(entries["proj"], "layers") is None
    expected = {"weight_averaging": "rule", "task_arithmetic": "rule", "ties": "rule", "tsv": "all_2d",
                "task_vector_svd": "layers", "cart": "layers", "cart_pp": "layers", "adarank_ta": "layers",
                "adarank_cart": "layers"}
    assert {name: mm.get_method(name).matrix_set for name in expected} == expected


def test_on_hugging_face_bert_the_layer_rule_is_kept_where_the_reference_names_match_nothing():
    """Documented difference: CART's ``attn``/``mlp`` name rule matches no BERT key; the Linear rule is used."""
    entries = plan(hf_bert())
    assert not any(reference_block_matrix(e.name, e.shape) for e in entries)
    decomposed = [e.name for e in entries if method_layout(e, "layers")]
    assert "encoder.layer.0.attention.self.query.weight" in decomposed and len(decomposed) == 13


def test_released_configurations_are_one_name_away():
    cart, adarank = mm.get_method("cart_released"), mm.get_method("adarank_cart_released")
    assert (cart.rank, cart.scaling) == (0.12, 2.0) and cart.base == "average"
    assert (adarank.mask_rank, adarank.scaling, adarank.rank) == (0.16, 2.3, None) and adarank.masks
    assert (mm.get_method("cart").rank, mm.get_method("cart").scaling) == (0.08, 1.0)  # the paper's stay default


def test_defaults_decompose_exactly():
    assert all(method.svd == "exact" for method in mm.METHODS.values())


# ------------------------------------------------------------------------------ 2. float64 references


def small_tower() -> nn.Module:
    """open_clip's VisionTransformer, 2 blocks of width 32, in float64 (the key names of the authors' CLIP code)."""
    from open_clip.model import _build_vision_tower

    torch.manual_seed(0)
    cfg = {"image_size": 16, "layers": 2, "width": 32, "patch_size": 8, "head_width": 8}
    return _build_vision_tower(16, cfg).double().eval()


def reference_block_matrix(key: str, shape: tuple[int, ...]) -> bool:
    """CART's and AdaRank's code: a key holding 'attn' or 'mlp' and neither 'ln' nor 'bias' is decomposed."""
    return ("attn" in key or "mlp" in key) and not ("ln" in key or "bias" in key)


def reference_tsv_matrix(key: str, shape: tuple[int, ...]) -> bool:
    """TSV-M's code: every 2-D tensor but one named text_projection is decomposed."""
    return len(shape) == 2 and "text_projection" not in key


def svd_top(matrix: Tensor, k: int) -> Tensor:
    """SVD_k of the papers: the sum of the top-k singular triplets (torch.linalg.svd, float64)."""
    U, S, Vh = torch.linalg.svd(matrix, full_matrices=False)
    return U[:, :k] @ torch.diag(S[:k]) @ Vh[:k]


def kept(gamma: float, shape: tuple[int, ...], minimum: int = 1) -> int:
    return max(minimum, int(gamma * min(shape)))


@pytest.fixture(scope="module")
def zoo() -> tuple[nn.Module, list[nn.Module], dict[str, Tensor], list[dict[str, Tensor]]]:
    tower = small_tower()
    tuned = [perturbed(tower, seed=s, scale=0.05) for s in range(1, 5)]
    return tower, tuned, tower.state_dict(), [t.state_dict() for t in tuned]


def weight_average(tuned: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    return {k: sum(s[k] for s in tuned) / len(tuned) for k in tuned[0]}


def task_arithmetic(base, tuned, lam):
    """Ilharco et al.: θ₀ + λ Σ_t τ_t."""
    return {k: base[k] + lam * sum(s[k] - base[k] for s in tuned) for k in base}


def cart(base, tuned, gamma, lam, minimum=1):
    """papers/000 Eq. (4): θ_avg + λ Σ_t SVD_k(θ_t − θ_avg) on the block matrices; θ_avg elsewhere."""
    average = weight_average(tuned)
    out = dict(average)
    for k, value in average.items():
        if reference_block_matrix(k, value.shape):
            rank = kept(gamma, value.shape, minimum)
            out[k] = value + lam * sum(svd_top(s[k] - value, rank) for s in tuned)
    return out


def ties(base, tuned, density, lam):
    """Yadav et al. Algorithm 1 as the authors' code: per task the entries ≥ its kthvalue(N − int(dN)) over the
    flattened model, sign of the sum (global majority where it is 0), mean of the entries with that sign."""
    keys = list(base)
    flat = torch.stack([torch.cat([(s[k] - base[k]).flatten() for k in keys]) for s in tuned])
    N = flat.shape[1]
    threshold = flat.abs().kthvalue(N - int(density * N), dim=1, keepdim=True).values
    trimmed = flat * (flat.abs() >= threshold)
    sign = torch.sign(trimmed.sum(0))
    sign[sign == 0] = torch.sign(sign.sum())
    chosen = torch.where(sign > 0, trimmed > 0, trimmed < 0)
    merged = (trimmed * chosen).sum(0) / chosen.sum(0).clamp(min=1)
    return unflatten(base, merged, lam)


def ties_per_tensor(base, tuned, density, lam):
    """mergekit's ties: per tensor and task the int(d·n) largest |τ|, + where the sum is ≥ 0, disjoint mean."""
    out = {}
    for k in base:
        deltas = torch.stack([(s[k] - base[k]).flatten() for s in tuned])
        n = deltas.shape[1]
        keep = torch.zeros_like(deltas, dtype=torch.bool)
        for t, delta in enumerate(deltas):
            keep[t, torch.argsort(delta.abs(), descending=True, stable=True)[: int(density * n)]] = True
        trimmed = deltas * keep
        majority = torch.where(trimmed.sum(0) >= 0, 1.0, -1.0)
        chosen = (torch.sign(trimmed) == majority) & keep
        merged = (trimmed * chosen).sum(0) / chosen.sum(0).clamp(min=1)
        out[k] = base[k] + lam * merged.view_as(base[k])
    return out


def unflatten(base, merged, lam):
    out, offset = {}, 0
    for k in base:
        n = base[k].numel()
        out[k] = base[k] + lam * merged[offset:offset + n].view_as(base[k])
        offset += n
    return out


def procrustes(X: Tensor) -> Tensor:
    P, _, Qh = torch.linalg.svd(X, full_matrices=False)
    return P @ Qh


def tsv(base, tuned, alpha):
    """Gargiulo et al. (TSV-M): per task the top int(r·(1/T)) of SVD(τ_t), the concatenated U and V each
    replaced by its orthogonal Procrustes factor, θ₀ + α·U⊥ diag(σ) V⊥ᵀ; the mean task vector elsewhere."""
    T = len(tuned)
    out = {}
    for k in base:
        deltas = [s[k] - base[k] for s in tuned]
        if not reference_tsv_matrix(k, base[k].shape):
            out[k] = base[k] + alpha * sum(deltas) / T
            continue
        per_task = int(min(base[k].shape) * (1 / T))
        Us, Ss, Vs = [], [], []
        for delta in deltas:
            U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
            Us.append(U[:, :per_task]), Ss.append(S[:per_task]), Vs.append(Vh[:per_task].T)
        merged = procrustes(torch.cat(Us, 1)) @ torch.diag(torch.cat(Ss)) @ procrustes(torch.cat(Vs, 1)).T
        out[k] = base[k] + alpha * merged
    return out


def low_rank_ta(base, tuned, gamma, lam):
    """papers/002 Eq. (2) (TA with SVD_k): θ₀ + λ Σ_t SVD_k(τ_t) on the block matrices, TA elsewhere."""
    out = task_arithmetic(base, tuned, lam)
    for k in base:
        if reference_block_matrix(k, base[k].shape):
            out[k] = base[k] + lam * sum(svd_top(s[k] - base[k], kept(gamma, base[k].shape)) for s in tuned)
    return out


def adarank(base, tuned, origin, on_ratio, lam):
    """papers/002 Eq. (5) at initialisation, as the AdaRank code builds it: origin + λ Σ_t U (B ⊙ Σ) Vᵀ with the
    first int(r·ratio) components on (all at ratio 1) on the block matrices, origin + λ Σ_t (θ_t − origin)
    (layer-wise λ) on every other tensor."""
    out = {}
    for k in base:
        deltas = [s[k] - origin[k] for s in tuned]
        if reference_block_matrix(k, base[k].shape):
            on = int(min(base[k].shape) * on_ratio) if on_ratio < 1 else min(base[k].shape)
            out[k] = origin[k] + lam * sum(svd_top(delta, on) for delta in deltas)
        else:
            out[k] = origin[k] + lam * sum(deltas)
    return out


REFERENCES = {
    "weight_averaging": ({}, lambda base, tuned: weight_average(tuned)),
    "task_arithmetic": ({}, lambda base, tuned: task_arithmetic(base, tuned, 0.3)),
    "ties": ({}, lambda base, tuned: ties(base, tuned, 0.2, 1.0)),
    "ties_tensor": ({"scope": "tensor"}, lambda base, tuned: ties_per_tensor(base, tuned, 0.2, 1.0)),
    "tsv": ({}, lambda base, tuned: tsv(base, tuned, 1.0)),
    "cart": ({}, lambda base, tuned: cart(base, tuned, 0.08, 1.0)),
    "cart_released": ({}, lambda base, tuned: cart(base, tuned, 0.12, 2.0)),
    "task_vector_svd": ({}, lambda base, tuned: low_rank_ta(base, tuned, 0.08, 0.3)),
    "adamerging_taskwise": ({}, lambda base, tuned: task_arithmetic(base, tuned, 0.3)),
    "adamerging_layerwise": ({}, lambda base, tuned: task_arithmetic(base, tuned, 0.3)),
    "cart_pp": ({}, lambda base, tuned: cart(base, tuned, 0.08, 1.0)),
    "adarank_ta": ({}, lambda base, tuned: adarank(base, tuned, base, 1.0, 0.3)),
    "adarank_cart": ({}, lambda base, tuned: adarank(base, tuned, weight_average(tuned), 0.08, 1.0)),
    "adarank_cart_released": ({}, lambda base, tuned: adarank(base, tuned, weight_average(tuned), 0.16, 2.3)),
}


@pytest.mark.parametrize("name", list(REFERENCES))
def test_merged_weights_equal_the_float64_reference(zoo, name):
    tower, tuned_models, base, tuned = zoo
    options, reference = REFERENCES[name]
    method = "ties" if name == "ties_tensor" else name
    actual, expected = fused(tower, tuned_models, method, **options), reference(base, tuned)
    assert actual.keys() == expected.keys()
    for key in expected:
        error = torch.linalg.vector_norm(actual[key] - expected[key]) / torch.linalg.vector_norm(expected[key])
        assert error <= TOL, f"{name}: {key} differs from the reference by {float(error):.2e} (relative)"
