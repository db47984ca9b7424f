"""AWD on Task Arithmetic: learn the redundant vector δ, read its diagnostics, save the cosine heatmaps.

A small random-init transformer stands in for a pretrained backbone; four "fine-tuned" copies share one
component (as real task vectors do) plus a task-specific one. Runs offline in seconds:

    python examples/awd_diagnostics.py [heatmap.png]
"""
from __future__ import annotations

import copy
import sys

import torch
from torch import nn

import mergemodules as mm
from mergemodules.methods import with_awd
from mergemodules.plotting import plot_awd_cosine

torch.manual_seed(0)
pretrained = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True), 2).eval()
shared = {n: 0.01 * torch.randn_like(p) for n, p in pretrained.named_parameters()}
finetuned = []
for _ in range(4):
    model = copy.deepcopy(pretrained)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.add_(shared[n] + 0.01 * torch.randn_like(p))
    finetuned.append(model)

# AWD-TA: δ on the weight matrices of the layers ("matrices"), then θ = θ₀ + λ·Σ(τ_i − δ).
merged = mm.merge(pretrained, finetuned, "awd_ta", alpha=1e-3, steps=100, lr=1e-3, scaling=0.3)
awd = merged.transform
print(f"mean |cos| of the task vectors: {awd.mean_abs_cosine_before:.3f} -> {awd.mean_abs_cosine_after:.3f}")
print(f"||delta|| = {awd.delta_norm:.4f}; loss {awd.loss_history[0]:.4f} -> {awd.loss_history[-1]:.4f}")
print("cosine similarities after AWD:\n", awd.cosine_after.numpy().round(3))
print("AWD covers:", sorted(awd.deltas)[:3], "...")
plot_awd_cosine(awd, sys.argv[1] if len(sys.argv) > 1 else "awd_cosine.png", task_names=["A", "B", "C", "D"])

# Only the blocks' feed-forward weights, and AWD before another method (not tested by the paper).
ffn_only = mm.merge(pretrained, finetuned, "awd_ta", scope=["*linear*"], alpha=1e-3, steps=100, lr=1e-3)
print("feed-forward scope:", sorted(ffn_only.transform.deltas))
cart = mm.merge(pretrained, finetuned, with_awd("cart"), alpha=1e-3, steps=100, lr=1e-3)
print(f"AWD + CART (centred at the average): mean |cos| {cart.transform.mean_abs_cosine_before:.3f}"
      f" -> {cart.transform.mean_abs_cosine_after:.3f}")
plain = merged.fuse()  # an ordinary nn.TransformerEncoder with the AWD-TA weights
