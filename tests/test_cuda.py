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
    for (name, p_gpu), (_, p_cpu) in zip(gpu.named_parameters(), cpu.named_parameters()):
        torch.testing.assert_close(p_gpu.detach().cpu(), p_cpu.detach(), rtol=1e-4, atol=1e-5, msg=name)

    fused = gpu.eval().fuse()
    assert _devices(fused) == {"cuda"}
    with torch.no_grad():
        x = inputs[0].cuda()
        torch.testing.assert_close(output_tensor(fused(x)), output_tensor(gpu(x)), rtol=1e-4, atol=1e-5)

    path = mm.io.save_fused(gpu, tmp_path / "fused.safetensors")
    state = load_file(path)
    reference = cpu.eval().fuse().state_dict()
    for key, value in state.items():
        torch.testing.assert_close(value, reference[key].contiguous(), rtol=1e-4, atol=1e-5, msg=key)
