"""Every path on a GPU: merge → adapt → fuse → export, for a ViT and a decoder (skipped without CUDA).

Each test checks that nothing was left on the CPU by accident (the merged model, the learnables, the
optimizer state and the fused model all live on the GPU) and that the GPU results equal the CPU
results of the same calls to float32 tolerance.
"""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import mergemodules as mm
from helpers import MODEL_FAMILIES, output_tensor, perturbed

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def hf_llama() -> nn.Module:
    """A tiny Llama decoder (the architecture mergekit users merge)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config)


FAMILIES = {
    "timm_vit": MODEL_FAMILIES["timm_vit"],
    "hf_llama": (hf_llama, lambda: (torch.randint(0, 100, (2, 12)),)),
}


def _devices(module: nn.Module) -> set[str]:
    return {t.device.type for t in (*module.parameters(), *module.buffers())}


def _adapt(pretrained: nn.Module, tuned: list[nn.Module], inputs: tuple, device: str) -> tuple[nn.Module, list]:
    """Merge with CART+AdaRank on ``device``, adapt 3 steps on two tasks, return (merged, history)."""
    merged = mm.merge(pretrained.to(device), [t.to(device) for t in tuned], "adarank_cart").to(device)
    x = inputs[0].to(device)
    heads = [lambda out, k=k: output_tensor(out)[..., k::2] for k in range(2)]  # two 'tasks' on one output
    tasks = {f"task{k}": mm.Task([x], heads[k]) for k in range(2)}
    history = mm.adapt(merged, tasks, steps=3, lr=1e-2, seed=0)
    return merged, history


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_merge_adapt_fuse_export_on_cuda(family: str, tmp_path) -> None:
    build, make_inputs = FAMILIES[family]
    torch.manual_seed(0)
    pretrained = build().eval()
    tuned = [perturbed(pretrained, seed=s) for s in range(3)]
    inputs = make_inputs()

    gpu, gpu_history = _adapt(pretrained, tuned, inputs, "cuda")
    assert _devices(gpu) == {"cuda"}
    cpu, cpu_history = _adapt(pretrained.cpu(), [t.cpu() for t in tuned], inputs, "cpu")
    for a, b in zip(gpu_history, cpu_history):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-5)
    # λ within 1 % of the most Adam can move it (steps × lr = 0.03): Adam divides each gradient by its own running
    # scale, so a λ whose gradient changes sign between steps carries the relative rounding difference of two
    # float32 reductions (GPU vs CPU order) into its step (seen on an H200: 1.4e-4 on one λ of a ViT block).
    # Mask logits by the masks they give: Adam's first step divides by √v + eps, so a logit whose gradient is
    # below eps moves by an amount that magnifies rounding differences a millionfold
    for (name, p_gpu), (_, p_cpu) in zip(gpu.named_parameters(), cpu.named_parameters()):
        if "mask_logits" in name:
            assert torch.equal(p_gpu.detach().cpu() >= 0, p_cpu.detach() >= 0), name
        else:
            torch.testing.assert_close(p_gpu.detach().cpu(), p_cpu.detach(), rtol=0, atol=3e-4, msg=name)

    fused = gpu.eval().fuse()
    assert _devices(fused) == {"cuda"}
    with torch.no_grad():
        x = inputs[0].cuda()
        torch.testing.assert_close(output_tensor(fused(x)), output_tensor(gpu(x)), rtol=1e-4, atol=1e-5)

    path = mm.save_fused(gpu, tmp_path / "fused.safetensors")
    state = load_file(path)
    reference = cpu.eval().fuse().state_dict()
    for key, value in state.items():
        torch.testing.assert_close(value, reference[key].contiguous(), rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_streaming_merge_with_device_cuda(method: str, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``device: cuda`` in a recipe: shards read on the CPU, every merged tensor built and evaluated on the GPU,
    the fused tensor handed to the writer (which copies it back) from the GPU; the output equals the CPU merge."""
    import mergemodules.safetensors_files
    import mergemodules.streaming
    from mergemodules.cli import main
    from recipe_setup import write_recipe

    model = hf_llama().to(torch.bfloat16)
    model.save_pretrained(tmp_path / "base", max_shard_size=20_000)
    for i in range(2):
        perturbed(model, seed=i + 1).save_pretrained(tmp_path / f"task{i}", max_shard_size=20_000)
    merged_on, written_from = set(), set()
    iterate, write = mergemodules.streaming.iter_merged_tensors, mergemodules.safetensors_files._SafetensorsWriter.write

    def watched_iterate(*args, **kwargs):
        for entry, module in iterate(*args, **kwargs):
            merged_on.update(t.device.type for t in (*module.parameters(), *module.buffers()))
            yield entry, module

    def watched_write(self, name, tensor) -> None:
        written_from.add(tensor.device.type)
        write(self, name, tensor)

    monkeypatch.setattr(mergemodules.streaming, "iter_merged_tensors", watched_iterate)
    monkeypatch.setattr(mergemodules.safetensors_files._SafetensorsWriter, "write", watched_write)
    outputs = {}
    for device in ("cuda", "cpu"):
        merged_on.clear()
        written_from.clear()
        recipe = write_recipe(tmp_path, {"model": {"hf": "base"}, "tasks": ["task0", "task1"], "method": method,
                                         "dtype": "float32", "out_dtype": "bfloat16", "device": device,
                                         "max_shard_size": "20KB"}, f"{device}.yaml")
        assert main(["-q", "merge", str(recipe), "-o", str(tmp_path / device)]) == 0
        assert merged_on == written_from == {device}
        assert (tmp_path / device / "model.safetensors.index.json").is_file()
        outputs[device] = {}
        for shard in sorted((tmp_path / device).glob("model-*.safetensors")):
            outputs[device].update(load_file(shard))
    assert sorted(outputs["cuda"]) == sorted(outputs["cpu"])
    for key, value in outputs["cpu"].items():  # float32 sums in another order: at most one bf16 step apart
        assert outputs["cuda"][key].dtype == torch.bfloat16
        torch.testing.assert_close(outputs["cuda"][key].float(), value.float(), rtol=2**-7, atol=1e-6, msg=key)
