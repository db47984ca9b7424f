"""Small random-init models of the families the library must handle, and fine-tuned copies of them."""
from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn


def perturbed(model: nn.Module, seed: int, scale: float = 0.02, rank: int | None = None) -> nn.Module:
    """A 'fine-tuned' copy: every parameter moved by noise (low-rank for matrices when ``rank`` is set)."""
    gen = torch.Generator().manual_seed(seed)
    tuned = copy.deepcopy(model)
    with torch.no_grad():
        for p in tuned.parameters():
            if rank is not None and p.dim() == 2:
                a = torch.randn(p.shape[0], rank, generator=gen)
                b = torch.randn(rank, p.shape[1], generator=gen)
                p.add_(scale * (a @ b) / rank**0.5)
            else:
                p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return tuned


def timm_vit() -> nn.Module:
    import timm

    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=5, img_size=32, patch_size=8, depth=2
    )


def open_clip_visual(name: str = "ViT-B-32") -> nn.Module:
    import open_clip

    return open_clip.create_model(name, pretrained=None).visual


def hf_bert() -> nn.Module:
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64)
    return BertModel(config)


def hf_gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return GPT2LMHeadModel(config)


MODEL_FAMILIES: dict[str, tuple[Callable[[], nn.Module], Callable[[], tuple]]] = {
    "timm_vit": (timm_vit, lambda: (torch.randn(2, 3, 32, 32),)),
    "hf_bert": (hf_bert, lambda: (torch.randint(0, 100, (2, 12)),)),
    "hf_gpt2": (hf_gpt2, lambda: (torch.randint(0, 100, (2, 12)),)),
}


def output_tensor(out: object) -> torch.Tensor:
    """The main tensor of a model output (plain tensor, HF ModelOutput or tuple)."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    return out[0]


def assert_close_to_scale(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-5) -> None:
    """max |actual − expected| ≤ tol · max |expected| (relative to the output scale)."""
    scale = expected.abs().max().clamp(min=1e-12)
    err = (actual - expected).abs().max()
    assert err <= tol * scale, f"max abs diff {err:.3g} exceeds {tol:g} × output scale {scale:.3g}"
