"""Export a fused Hugging Face model as a folder ``from_pretrained`` loads, and reload it.

A tiny random-init GPT-2 (``Conv1D`` weights, tied input/output embeddings) stands in for a pretrained
model; two noisy copies for fine-tuned ones. The fused model is a plain ``GPT2LMHeadModel``, so
``save_pretrained`` writes config + safetensors with the original keys (the command line does the same
for ``model: {hf: folder}`` recipes). Runs offline in seconds:

    python examples/hf_export.py
"""
from __future__ import annotations

import copy
import tempfile

import torch
from transformers import GPT2Config, GPT2LMHeadModel

import mergemodules as mm

torch.manual_seed(0)
config = GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0)
pretrained = GPT2LMHeadModel(config).eval()
finetuned = []
for t in range(2):
    model = copy.deepcopy(pretrained)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape))
    finetuned.append(model)

merged = mm.merge(pretrained, finetuned, "task_arithmetic", scaling=0.5)
fused = merged.fuse()
tokens = torch.randint(0, 100, (2, 12))

with tempfile.TemporaryDirectory() as folder:
    fused.save_pretrained(folder)  # config.json + model.safetensors
    reloaded = GPT2LMHeadModel.from_pretrained(folder).eval()

assert reloaded.lm_head.weight is reloaded.transformer.wte.weight  # the tie survives the round trip
with torch.no_grad():
    difference = (reloaded(tokens).logits - merged(tokens).logits).abs().max().item()
print(f"reloaded fused GPT-2 reproduces the merged model: max |Δlogits| = {difference:.2e}")
assert difference < 1e-4
