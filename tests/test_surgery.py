"""merge() on real architectures: fuse exactness, original keys, learnables, targets, errors."""
import copy

import pytest
import torch
from helpers import MODEL_FAMILIES, assert_close_to_scale, hf_gpt2, open_clip_visual, output_tensor, perturbed, timm_vit
from torch import nn

import mergemodules as mm
from mergemodules.layers import MergedTensor, MergedWeight

ADAPTIVE_AND_STATIC = ["task_arithmetic", "ties", "tsv", "cart", "adamerging_layerwise", "adarank_cart"]


def zoo(make, tasks=2, **kw):
    pretrained = make().eval()
    return pretrained, [perturbed(pretrained, seed=i + 1, **kw).eval() for i in range(tasks)]


def nudge_learnables(merged, seed=0):
    """Move λ and ℓ away from their initial values so fuse is checked at a non-trivial point."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in merged.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))


@pytest.mark.parametrize("family", sorted(MODEL_FAMILIES))
@pytest.mark.parametrize("method", ADAPTIVE_AND_STATIC)
def test_fused_output_equals_merged_output(family, method):
    make, inputs = MODEL_FAMILIES[family]
    pretrained, finetuned = zoo(make)
    merged = mm.merge(pretrained, finetuned, method).eval()
    nudge_learnables(merged)
    x = inputs()
    with torch.no_grad():
        expected = output_tensor(merged(*x))
        fused = merged.fuse().eval()
        actual = output_tensor(fused(*x))
    assert type(fused) is type(pretrained)
    assert list(fused.state_dict()) == list(pretrained.state_dict())
    assert all(type(m) in (type(o),) for m, o in zip(fused.modules(), pretrained.modules()))
    assert_close_to_scale(actual, expected)


def test_open_clip_vit_b32_visual_merges_in_proj_and_proj():
    pretrained = open_clip_visual("ViT-B-32").eval()
    # rank-16 updates: the kept top 8 are well separated from zero, so the exact SVD takes its fast route
    finetuned = [perturbed(pretrained, seed=s, rank=16) for s in (1, 2)]
    # matrix_set="rule": the library's rule decomposes the free `proj` too (CART's own set averages it)
    merged = mm.merge(pretrained, finetuned, "cart", rank=8, matrix_set="rule").eval()
    weights = merged.merged_weights()
    in_proj = [n for n in weights if n.endswith("attn.in_proj_weight")]
    assert len(in_proj) == 12 and all(weights[n].rank == 8 for n in in_proj)
    assert weights["proj"].layout == "in_out" and weights["proj"].rank == 8
    nudge_learnables(merged)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected, fused = merged(x), merged.fuse().eval()
        actual = fused(x)
    assert list(fused.state_dict()) == list(pretrained.state_dict())
    assert_close_to_scale(actual, expected)


def test_gpt2_tied_embedding_stays_tied_and_is_merged_once():
    pretrained, finetuned = zoo(hf_gpt2)
    merged = mm.merge(pretrained, finetuned, "task_arithmetic")
    assert "lm_head.weight" not in merged.merged_tensors()
    assert merged.model.lm_head.weight is not None
    torch.testing.assert_close(merged.model.lm_head.weight, merged.model.transformer.wte.weight)
    fused = merged.fuse()
    assert fused.lm_head.weight is fused.transformer.wte.weight
    conv = merged.merged_weights()["transformer.h.0.attn.c_attn.weight"]
    assert conv.layout == "in_out" and conv.out_features == 96


def test_parameters_are_exactly_the_learnables():
    pretrained, finetuned = zoo(timm_vit, tasks=3)
    assert list(mm.merge(pretrained, finetuned, "weight_averaging").parameters()) == []
    ta = list(mm.merge(pretrained, finetuned, "task_arithmetic").parameters())
    assert len(ta) == 1 and ta[0].shape == ()
    taskwise = list(mm.merge(pretrained, finetuned, "adamerging_taskwise").parameters())
    assert len(taskwise) == 1 and taskwise[0].shape == (3,)
    adarank = mm.merge(pretrained, finetuned, "adarank_ta")
    names = {n.rsplit(".", 1)[-1] for n, _ in adarank.named_parameters()}
    assert names == {"coef", "mask_logits"}
    n_tensors = len(list(pretrained.parameters()))
    n_matrices = len(adarank.merged_weights())
    assert len(list(adarank.parameters())) == n_tensors + n_matrices


def test_gradients_reach_only_lambda_and_mask_logits():
    pretrained, finetuned = zoo(timm_vit)
    merged = mm.merge(pretrained, finetuned, "adarank_cart")
    merged(torch.randn(2, 3, 32, 32)).logsumexp(-1).sum().backward()
    grads = {n: p.grad for n, p in merged.named_parameters()}
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.endswith("mask_logits"))
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.endswith("coef"))
    assert all(not b.requires_grad for b in merged.buffers())


def test_pretrained_and_finetuned_models_are_left_untouched():
    pretrained, finetuned = zoo(timm_vit)
    before = copy.deepcopy(pretrained.state_dict())
    merged = mm.merge(pretrained, finetuned, "ties")
    merged(torch.randn(1, 3, 32, 32)).sum()
    assert list(pretrained.state_dict()) == list(before)
    assert all(torch.equal(before[k], v) for k, v in pretrained.state_dict().items())
    assert all(isinstance(p, nn.Parameter) for p in pretrained.parameters())


def test_exclude_keeps_the_head_at_its_pretrained_value():
    pretrained, finetuned = zoo(timm_vit)
    merged = mm.merge(pretrained, finetuned, "task_arithmetic", exclude=["head"])
    fused = merged.fuse()
    assert torch.equal(fused.head.weight, pretrained.head.weight)
    assert not torch.equal(fused.blocks[0].mlp.fc1.weight, pretrained.blocks[0].mlp.fc1.weight)


def test_excluded_tensors_may_differ_in_shape():
    pretrained = timm_vit()
    other_head = copy.deepcopy(pretrained)
    other_head.head = nn.Linear(192, 9)
    merged = mm.merge(pretrained, [perturbed(other_head, 1)], "task_arithmetic", exclude=["head"])
    assert merged(torch.randn(1, 3, 32, 32)).shape == (1, 5)


def test_targets_select_modules_like_peft():
    pretrained, finetuned = zoo(timm_vit)
    merged = mm.merge(pretrained, finetuned, "cart", targets=["qkv", "fc1"])
    changed = {n for n, m in merged.merged_tensors().items() if getattr(m, "num_tasks", 0)}
    assert changed == {f"blocks.{i}.{m}.weight" for i in range(2) for m in ("attn.qkv", "mlp.fc1")}
    regex = mm.merge(pretrained, finetuned, "task_arithmetic", targets=r"blocks\.1\..*")
    merged_names = {n for n, m in regex.merged_tensors().items() if m.num_tasks}
    assert merged_names and all(n.startswith("blocks.1.") for n in merged_names)


def test_merged_linear_replaces_linears_and_attention_reads_plain_tensors():
    pretrained = nn.TransformerEncoderLayer(16, 4, 32, batch_first=True).eval()
    finetuned = [perturbed(pretrained, s) for s in (1, 2)]
    merged = mm.merge(pretrained, finetuned, "tsv").eval()
    assert isinstance(merged.model.linear1, mm.MergedLinear)
    assert isinstance(merged.model.self_attn.out_proj, mm.MergedLinear)
    assert isinstance(merged.model.self_attn.in_proj_weight, torch.Tensor)
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        assert_close_to_scale(merged.fuse().eval()(x), merged(x))


def test_merge_of_a_single_linear_fuses_to_a_linear():
    pretrained = nn.Linear(6, 4)
    merged = mm.merge(pretrained, [perturbed(pretrained, 1)], "task_arithmetic", scaling=1.0)
    assert isinstance(merged.model, mm.MergedLinear)
    fused = merged.fuse()
    assert type(fused) is nn.Linear
    torch.testing.assert_close(fused.weight, perturbed(pretrained, 1).weight)


def test_fp16_and_bf16_checkpoints_merge_and_keep_their_dtype():
    for dtype in (torch.float16, torch.bfloat16):
        pretrained = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8)).to(dtype)
        finetuned = [perturbed(pretrained, s, rank=2) for s in (1, 2)]
        merged = mm.merge(pretrained, finetuned, "cart", rank=2)
        weight = merged.merged_weights()["0.weight"]
        assert weight.U.dtype == dtype and weight().dtype == dtype
        fused = merged.fuse()
        assert all(p.dtype == dtype for p in fused.parameters())
        # the float32 decomposition matches a float32 merge of the same values to the dtype's precision
        reference = mm.merge(pretrained.float(), [f.float() for f in finetuned], "cart", rank=2).fuse()
        torch.testing.assert_close(fused[0].weight.float(), reference[0].weight, rtol=0, atol=2e-2)


def test_state_dicts_are_accepted_as_finetuned_models():
    pretrained, finetuned = zoo(timm_vit)
    from_models = mm.merge(pretrained, finetuned, "ties").fuse()
    from_dicts = mm.merge(pretrained, [f.state_dict() for f in finetuned], "ties").fuse()
    assert all(torch.equal(a, b) for a, b in zip(from_models.state_dict().values(), from_dicts.state_dict().values()))


def test_getattr_falls_through_to_the_model():
    pretrained, finetuned = zoo(timm_vit)
    merged = mm.merge(pretrained, finetuned, "task_arithmetic")
    assert merged.num_classes == 5 and merged.forward_features(torch.randn(1, 3, 32, 32)).shape[0] == 1


# ---- bad input ---------------------------------------------------------------------------------


def test_error_on_different_architectures():
    pretrained = timm_vit()
    with pytest.raises(TypeError, match=r"finetuned\[0\] is a Sequential"):
        mm.merge(pretrained, [nn.Sequential(nn.Linear(2, 2))], "task_arithmetic")


def test_error_on_missing_and_extra_keys():
    pretrained, (tuned,) = zoo(timm_vit, tasks=1)
    state = tuned.state_dict()
    missing = {k: v for k, v in state.items() if k != "blocks.0.mlp.fc1.weight"}
    with pytest.raises(KeyError, match=r"finetuned\[0\] is missing .*blocks\.0\.mlp\.fc1\.weight"):
        mm.merge(pretrained, [missing], "task_arithmetic")
    with pytest.raises(KeyError, match=r"finetuned\[1\] has 1 key.*surplus"):
        mm.merge(pretrained, [state, {**state, "surplus": torch.ones(1)}], "task_arithmetic")


def test_error_on_mismatched_shapes():
    pretrained, (tuned,) = zoo(timm_vit, tasks=1)
    state = dict(tuned.state_dict())
    state["blocks.1.attn.proj.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=r"finetuned\[0\]\['blocks\.1\.attn\.proj\.weight'\] has shape \(3, 3\)"):
        mm.merge(pretrained, [state], "task_arithmetic")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_error_on_nan_or_inf_in_a_checkpoint(bad):
    pretrained, (tuned,) = zoo(timm_vit, tasks=1)
    state = {k: v.clone() for k, v in tuned.state_dict().items()}
    state["blocks.0.norm1.bias"][3] = bad
    with pytest.raises(ValueError, match=r"finetuned\[0\]\['blocks\.0\.norm1\.bias'\] contains NaN or Inf"):
        mm.merge(pretrained, [state], "task_arithmetic")


@pytest.mark.parametrize("rank, match", [(0, "rank=0"), (-3, "rank=-3"), (0.0, "rank=0.0"), (1.5, "rank=1.5"), (193, "rank=193")])
def test_error_on_rank_out_of_range(rank, match):
    pretrained, finetuned = zoo(timm_vit)
    with pytest.raises(ValueError, match=match):
        mm.merge(pretrained, finetuned, "cart", rank=rank)


def test_error_on_empty_task_list_and_unknown_method_or_option():
    pretrained = timm_vit()
    with pytest.raises(ValueError, match="finetuned"):
        mm.merge(pretrained, [], "task_arithmetic")
    with pytest.raises(mm.UnknownMethodError, match="'magic'.*available"):
        mm.merge(pretrained, [pretrained], "magic")
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['rnak'\]"):
        mm.merge(pretrained, [pretrained], "cart", rnak=0.1)
    with pytest.raises(ValueError, match="targets"):
        mm.merge(pretrained, [pretrained], "cart", targets=["no_such_module"])


def test_merged_modules_are_the_documented_kinds():
    pretrained, finetuned = zoo(timm_vit)
    merged = mm.merge(pretrained, finetuned, "cart")
    kinds = {n: type(m) for n, m in merged.merged_tensors().items()}
    assert kinds["blocks.0.attn.qkv.weight"] is MergedWeight
    assert kinds["blocks.0.attn.qkv.bias"] is MergedTensor
    assert kinds["pos_embed"] is MergedTensor and kinds["patch_embed.proj.weight"] is MergedTensor
