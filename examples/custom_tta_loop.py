"""Your own test-time adaptation loop: ``merged.parameters()``, ``mergemodules.entropy`` and any optimizer.

A small random-init transformer encoder stands in for a pretrained backbone; three "fine-tuned"
copies and one linear head per task stand in for real checkpoints. Runs offline in seconds:

    python examples/custom_tta_loop.py
"""
from __future__ import annotations

import copy

import torch
from torch import nn

import mergemodules as mm

torch.manual_seed(0)
NUM_TASKS, DIM, CLASSES = 3, 32, 10


class Encoder(nn.Module):
    """Token embeddings → one transformer layer → mean pooling."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, DIM)
        self.layer = nn.TransformerEncoderLayer(DIM, nhead=4, dim_feedforward=64, dropout=0.0, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(self.embed(x)).mean(1)


pretrained = Encoder()
finetuned = []
for t in range(NUM_TASKS):  # pretend fine-tuning: a low-rank update of every matrix
    model = copy.deepcopy(pretrained)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.add_(0.15 * torch.randn(p.shape[0], 2) @ torch.randn(2, p.shape[1]))
            else:
                p.add_(0.05 * torch.randn_like(p))
    finetuned.append(model)
heads = [nn.Linear(DIM, CLASSES).requires_grad_(False) for _ in range(NUM_TASKS)]
unlabeled = [torch.randn(64, 6, 8) + t for t in range(NUM_TASKS)]  # each task's test inputs

# TA+AdaRank: layer-wise λ (init 0.3) and mask logits ℓ over all singular components
merged = mm.merge(pretrained, finetuned, "adarank_ta")
print(f"learnables: {sum(p.numel() for p in merged.parameters())} numbers in {len(list(merged.parameters()))} tensors")

optimizer = torch.optim.AdamW(merged.parameters(), lr=5e-3, weight_decay=0.0)  # any optimizer works
for step in range(1, 41):
    batch = torch.randint(0, 64, (16,))
    # every task goes through the same merged encoder: one forward over all tasks' batches joined, each
    # task's rows back to its head (with BatchNorm in training mode, which mixes the examples of a batch,
    # run one forward per task inside `with mm.weight_cache():` instead)
    features = merged(torch.cat([x[batch] for x in unlabeled])).split(len(batch))
    loss = sum(mm.entropy(head(f)) for head, f in zip(heads, features))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    if step % 10 == 0:
        print(f"step {step:3d}  Σ entropy {loss.item():.4f}")

kept = mm.mask_summary(merged, task_names=[f"task{t}" for t in range(NUM_TASKS)])
for row in kept[:NUM_TASKS]:
    print(f"{row['layer']:32s} {row['task']}: kept {row['kept']}/{row['rank']} components")

plain = merged.fuse()  # an ordinary Encoder again, with the adapted weights
with torch.no_grad():
    x = unlabeled[0][:4]
    print("fused model reproduces the merged one:", torch.allclose(plain(x), merged(x), atol=1e-5))
