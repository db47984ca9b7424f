"""open_clip ViT: the attention in-projections (raw ``in_proj_weight`` of ``nn.MultiheadAttention``) and the
``[in, out]`` projection ``proj`` are merged as matrices, and the attention still reads them as tensors.

A small random-init open_clip ``VisionTransformer`` stands in for ViT-B/32's visual tower (same classes,
fewer and narrower blocks); nothing is downloaded. Runs offline in seconds:

    python examples/open_clip_vit.py
"""
from __future__ import annotations

import copy

import torch
from open_clip.transformer import VisionTransformer

import mergemodules as mm

torch.manual_seed(0)
pretrained = VisionTransformer(image_size=32, patch_size=8, width=64, layers=2, heads=4, mlp_ratio=4.0,
                               output_dim=32).eval()
finetuned = []
for t in range(4):
    model = copy.deepcopy(pretrained)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape))
    finetuned.append(model)

# Which tensors are merged as matrices, and how (targets.plan is the matrix rule).
for entry in mm.targets.plan(pretrained):
    if entry.is_matrix:
        print(f"  {entry.name:45s} {str(entry.shape):14s} layout={entry.layout}")

# TSV-M keeps ⌊min(out, in) / T⌋ singular components per task, orthogonalised across tasks.
merged = mm.merge(pretrained, finetuned, "tsv")
attention = merged.model.transformer.resblocks[0].attn
in_proj = merged.merged_weights()["transformer.resblocks.0.attn.in_proj_weight"]
print("in_proj_weight is computed:", type(attention.in_proj_weight).__name__, tuple(attention.in_proj_weight.shape),
      f"from factors U {tuple(in_proj.U.shape)}, V {tuple(in_proj.V.shape)}")

images = torch.randn(2, 3, 32, 32)
with torch.no_grad():
    features = merged(images)
    fused = merged.fuse()
    difference = (fused(images) - features).abs().max().item()
print(f"features {tuple(features.shape)}; fused model matches: max |Δ| = {difference:.2e}")
assert difference < 1e-4
assert isinstance(fused.transformer.resblocks[0].attn.in_proj_weight, torch.nn.Parameter)
