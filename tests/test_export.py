"""Export of fused weights (mergemodules.export), and the deprecated mergemodules.io path."""
import importlib
import os

import pytest
import torch
from helpers import hf_gpt2, perturbed, timm_vit
from safetensors.torch import load_file

import mergemodules as mm
from mergemodules.export import save_fused


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


def test_export_is_atomic(tmp_path, monkeypatch):
    _, merged = merged_vit("task_arithmetic")
    target = tmp_path / "fused.safetensors"
    target.write_bytes(b"previous")

    def fail(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr("mergemodules.export.save_file", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        save_fused(merged, target)
    assert target.read_bytes() == b"previous"
    assert os.listdir(tmp_path) == ["fused.safetensors"]


def test_export_errors_name_the_file(tmp_path):
    _, merged = merged_vit("task_arithmetic")
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        save_fused(merged, tmp_path / "no_such_dir" / "x.safetensors")
    with pytest.raises(TypeError, match="dtype must be a floating torch.dtype"):
        save_fused(merged, tmp_path / "x.safetensors", dtype=torch.int8)


def test_the_public_functions_are_at_the_top_level():
    from mergemodules import export, files, merge_state

    assert (mm.save_fused, mm.save_merge_state, mm.load_merge_state) == (
        export.save_fused, merge_state.save_merge_state, merge_state.load_merge_state)
    assert {"save_fused", "save_merge_state", "load_merge_state"} <= set(mm.__all__)
    assert files.atomic_write.__module__ == "mergemodules.files"


@pytest.mark.parametrize("name, home", [
    ("save_fused", "mergemodules.export"), ("fused_state_dict", "mergemodules.export"),
    ("save_merge_state", "mergemodules.merge_state"), ("load_merge_state", "mergemodules.merge_state"),
    ("FORMAT", "mergemodules.merge_state"), ("atomic_write", "mergemodules.files"),
])
def test_the_io_module_is_a_deprecated_alias(name, home):
    import mergemodules.io as io

    with pytest.warns(DeprecationWarning, match=rf"mergemodules\.io\.{name} is deprecated.*use {home}\.{name}"):
        value = getattr(io, name)
    assert value is getattr(importlib.import_module(home), name)
    with pytest.raises(AttributeError, match="has no attribute 'nothing'"):
        io.nothing
