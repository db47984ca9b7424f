"""Drop-in surgery on a timm model: merge fine-tuned copies, run it, train-ready λ, fuse back.

A small random-init ViT stands in for a pretrained backbone and three noisy copies for fine-tuned
checkpoints (nothing is downloaded). Runs offline in seconds:

    python examples/timm_surgery.py
"""
from __future__ import annotations

import copy

import timm
import torch

import mergemodules as mm

torch.manual_seed(0)
pretrained = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32, patch_size=8,
                               depth=2).eval()
finetuned = []
for t in range(3):  # pretend fine-tuning: a low-rank update of every matrix, noise elsewhere
    model = copy.deepcopy(pretrained)
    with torch.no_grad():
        for p in model.parameters():
            update = torch.randn(p.shape[0], 4) @ torch.randn(4, p.shape[1]) if p.dim() == 2 else torch.randn(p.shape)
            p.add_(0.02 * update)
    finetuned.append(model)

# CART: centred task vectors, top 8% singular components; keep the classifier head at its pretrained value.
merged = mm.merge(pretrained, finetuned, "cart", exclude=["head"])
print(merged.extra_repr())
print("merged as matrices:", len(merged.merged_weights()), "e.g. blocks.0.mlp.fc1 →", merged.model.blocks[0].mlp.fc1)
print("learnable parameters:", sum(p.numel() for p in merged.parameters()), "(λ only for a static method)")

images = torch.randn(4, 3, 32, 32)
with torch.no_grad():
    logits = merged(images)
    fused = merged.fuse()  # a plain timm VisionTransformer, original class and keys
    assert type(fused) is type(pretrained) and fused.state_dict().keys() == pretrained.state_dict().keys()
    difference = (fused(images) - logits).abs().max().item()
print(f"fused model reproduces the merged model: max |Δlogits| = {difference:.2e}")
assert difference < 1e-4
