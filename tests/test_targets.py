"""The matrix rule and target selection."""
import pytest
import torch
from helpers import hf_bert, hf_gpt2, open_clip_visual, perturbed
from torch import nn

import mergemodules as mm
from mergemodules import targets
from mergemodules.layers import MergedConv2d, MergedLinear
from mergemodules.layouts import Layout
from mergemodules.targets import MATRIX_KINDS, MatrixKind, merged_layer_for, plan


def layouts(model, **kw):
    return {e.name: e.layout for e in plan(model, **kw)}


def test_linear_attention_and_dense_tensors():
    model = nn.TransformerEncoderLayer(8, 2, 16)
    got = layouts(model)
    assert got["self_attn.in_proj_weight"] == "out_in"
    assert got["self_attn.out_proj.weight"] == "out_in"
    assert got["linear1.weight"] == "out_in"
    assert got["self_attn.in_proj_bias"] is None and got["norm1.weight"] is None


def test_mha_with_separate_projections():
    got = layouts(nn.MultiheadAttention(8, 2, kdim=4, vdim=6))
    assert {k: got[k] for k in ("q_proj_weight", "k_proj_weight", "v_proj_weight")} == dict.fromkeys(
        ("q_proj_weight", "k_proj_weight", "v_proj_weight"), "out_in"
    )


def test_gpt2_conv1d_is_in_out_and_tied_embedding_is_dense():
    got = layouts(hf_gpt2())
    assert got["transformer.h.0.attn.c_attn.weight"] == "in_out"
    assert got["transformer.h.0.mlp.c_proj.weight"] == "in_out"
    assert got["transformer.wte.weight"] is None and "lm_head.weight" not in got
    (wte,) = [e for e in plan(hf_gpt2()) if e.name == "transformer.wte.weight"]
    assert wte.aliases == ("lm_head.weight",)


def test_bert_embeddings_are_dense_and_projections_matrices():
    got = layouts(hf_bert())
    assert got["embeddings.word_embeddings.weight"] is None
    assert got["embeddings.position_embeddings.weight"] is None
    assert got["encoder.layer.0.attention.self.query.weight"] == "out_in"
    assert got["pooler.dense.weight"] == "out_in"


def test_open_clip_visual_proj_and_tokens():
    got = layouts(open_clip_visual("ViT-B-32"))
    assert got["proj"] == "in_out"
    assert got["class_embedding"] is None and got["positional_embedding"] is None
    assert got["conv1.weight"] is None
    matrices = [n for n, layout in got.items() if layout]
    assert len(matrices) == 12 * 4 + 1


def test_custom_matrices_and_patterns():
    model = nn.Module()
    model.table = nn.Parameter(nn.init.normal_(nn.Linear(3, 4).weight.detach().clone()))
    assert layouts(model)["table"] is None
    assert layouts(model, matrices={"tab*": "in_out"})["table"] == "in_out"
    with pytest.raises(ValueError, match=r"matrices\['table'\]='rows': layout must be one of 'out_in', 'in_out'"):
        plan(model, matrices={"table": "rows"})
    with pytest.raises(ValueError, match="targets: invalid regular expression"):
        plan(model, targets="(")
    with pytest.raises(TypeError, match="exclude"):
        plan(model, exclude=[3])


def test_targets_and_exclude_mark_what_is_merged():
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2))
    merged = {e.name: e.merged for e in plan(model, targets=["0"], exclude=["*.bias"])}
    assert merged == {"0.weight": True, "0.bias": False, "2.weight": False, "2.bias": False}


def test_conv2d_kernels_are_matrices_only_when_named():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4, 2), nn.Conv1d(2, 2, 3))
    assert layouts(model) == {"0.weight": None, "0.bias": None, "2.weight": "out_in", "2.bias": None,
                              "3.weight": None, "3.bias": None}
    named = layouts(model, matrices={"*": "out_in_kernel"})  # fits every ≥3-D parameter, leaves 2-D ones alone
    assert named["0.weight"] is Layout.OUT_IN_KERNEL and named["3.weight"] is Layout.OUT_IN_KERNEL
    assert named["2.weight"] is Layout.OUT_IN and named["0.bias"] is None
    assert layouts(model, matrices={"*": "in_out"})["0.weight"] is None  # a 2-D layout does not fit a kernel


def test_the_merged_layer_of_a_module():
    class OwnForward(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    assert merged_layer_for(nn.Linear(2, 3)) is MergedLinear
    assert merged_layer_for(nn.modules.linear.NonDynamicallyQuantizableLinear(2, 3)) is MergedLinear
    assert merged_layer_for(nn.Conv2d(2, 3, 1)) is MergedConv2d
    assert merged_layer_for(OwnForward(2, 3)) is None  # its forward must run: the weight becomes an attribute
    assert merged_layer_for(nn.Conv1d(2, 3, 1)) is None and merged_layer_for(nn.MultiheadAttention(4, 2)) is None
    assert [k.name for k in MATRIX_KINDS] == ["linear", "attention", "conv1d", "projection", "conv2d"]


def test_a_new_kind_is_one_entry(monkeypatch):
    """Embedding tables as matrices: one MatrixKind, no other change; merged and fused like any matrix."""
    embedding = MatrixKind("embedding", lambda m, a: isinstance(m, nn.Embedding) and a == "weight", Layout.OUT_IN)
    monkeypatch.setattr(targets, "MATRIX_KINDS", [*MATRIX_KINDS, embedding])
    torch.manual_seed(0)
    base = nn.Sequential(nn.Embedding(10, 6), nn.Linear(6, 3))
    tuned = [perturbed(base, seed=s) for s in (1, 2)]
    assert layouts(base)["0.weight"] is Layout.OUT_IN
    merged = mm.merge(base, tuned, "cart", rank=1.0)
    assert merged.merged_weights()["0.weight"].rank == 6
    average = (tuned[0][0].weight + tuned[1][0].weight) / 2
    torch.testing.assert_close(merged.fuse()[0].weight, average, rtol=0, atol=1e-6)
    ids = torch.tensor([[1, 4, 9]])
    torch.testing.assert_close(merged(ids), merged.fuse()(ids), rtol=0, atol=1e-6)
