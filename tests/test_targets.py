"""The matrix rule and target selection."""
import pytest
from helpers import hf_bert, hf_gpt2, open_clip_visual
from torch import nn

from mergemodules.targets import plan


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
    with pytest.raises(ValueError, match="layout"):
        plan(model, matrices={"table": "rows"})
    with pytest.raises(ValueError, match="targets: invalid regular expression"):
        plan(model, targets="(")
    with pytest.raises(TypeError, match="exclude"):
        plan(model, exclude=[3])


def test_targets_and_exclude_mark_what_is_merged():
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2))
    merged = {e.name: e.merged for e in plan(model, targets=["0"], exclude=["*.bias"])}
    assert merged == {"0.weight": True, "0.bias": False, "2.weight": False, "2.bias": False}
