"""Export of fused weights and of the merge state."""
import os

import pytest
import torch
from helpers import hf_gpt2, perturbed, timm_vit
from safetensors.torch import load_file

import mergemodules as mm
from mergemodules.io import load_merge_state, save_fused, save_merge_state


def merged_vit(method="adarank_cart"):
    pretrained = timm_vit().eval()
    finetuned = [perturbed(pretrained, s) for s in (1, 2)]
    merged = mm.merge(pretrained, finetuned, method).eval()
    with torch.no_grad():
        for p in merged.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return pretrained, merged


def test_fused_safetensors_load_into_the_original_architecture(tmp_path):
    pretrained, merged = merged_vit()
    path = save_fused(merged, tmp_path / "fused.safetensors")
    fresh = timm_vit().eval()
    fresh.load_state_dict(load_file(path))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), merged.fuse()(x), rtol=0, atol=0)
    assert set(load_file(path)) == set(pretrained.state_dict())


def test_tied_weights_are_saved_under_every_key(tmp_path):
    pretrained = hf_gpt2()
    merged = mm.merge(pretrained, [perturbed(pretrained, 1)], "task_arithmetic")
    state = load_file(save_fused(merged, tmp_path / "gpt2.safetensors"))
    assert set(state) == set(pretrained.state_dict())
    assert torch.equal(state["lm_head.weight"], state["transformer.wte.weight"])
    fresh = hf_gpt2()
    fresh.load_state_dict(state)


@pytest.mark.parametrize("method", ["adarank_cart", "adamerging_taskwise", "tsv", "weight_averaging"])
def test_merge_state_rebuilds_the_merged_model_without_checkpoints(tmp_path, method):
    _, merged = merged_vit(method)
    path = save_merge_state(merged, tmp_path / "state.safetensors")
    rebuilt = load_merge_state(timm_vit(), path).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), merged(x), rtol=0, atol=0)
    assert [n for n, _ in rebuilt.named_parameters()] == [n for n, _ in merged.named_parameters()]
    assert rebuilt.method.name == merged.method.name and rebuilt.num_tasks == 2
    if method == "adamerging_taskwise":  # one λ shared by all layers stays one Parameter
        assert len(list(rebuilt.parameters())) == 1


def test_merge_state_keeps_tied_and_in_out_weights(tmp_path):
    pretrained = hf_gpt2().eval()
    merged = mm.merge(pretrained, [perturbed(pretrained, 1), perturbed(pretrained, 2)], "cart")
    rebuilt = load_merge_state(hf_gpt2(), save_merge_state(merged, tmp_path / "s.safetensors")).eval()
    ids = torch.randint(0, 100, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(ids).logits, merged.eval()(ids).logits, rtol=0, atol=0)
    fused = rebuilt.fuse()
    assert fused.lm_head.weight is fused.transformer.wte.weight


def test_export_is_atomic(tmp_path, monkeypatch):
    _, merged = merged_vit("task_arithmetic")
    target = tmp_path / "fused.safetensors"
    target.write_bytes(b"previous")

    def fail(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr("mergemodules.io.save_file", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        save_fused(merged, target)
    assert target.read_bytes() == b"previous"
    assert os.listdir(tmp_path) == ["fused.safetensors"]


def test_export_errors_name_the_file(tmp_path):
    _, merged = merged_vit("task_arithmetic")
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        save_fused(merged, tmp_path / "no_such_dir" / "x.safetensors")
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_merge_state(timm_vit(), tmp_path / "missing.safetensors")
    plain = save_fused(merged, tmp_path / "plain.safetensors")
    with pytest.raises(ValueError, match="not a mergemodules merge state"):
        load_merge_state(timm_vit(), plain)
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(ValueError, match="junk.safetensors"):
        load_merge_state(timm_vit(), tmp_path / "junk.safetensors")
    with pytest.raises(TypeError, match="MergedModel"):
        save_merge_state(timm_vit(), tmp_path / "y.safetensors")


def test_merge_state_on_the_wrong_architecture_is_refused(tmp_path):
    _, merged = merged_vit("task_arithmetic")
    path = save_merge_state(merged, tmp_path / "state.safetensors")
    with pytest.raises(KeyError, match="does not match the model"):
        load_merge_state(hf_gpt2(), path)
