"""A small multi-task setting for adaptation tests: an encoder, fine-tuned copies, a head and data per task."""
from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

import mergemodules as mm
from helpers import perturbed

@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread for these tiny models (two threads oversubscribe the shared 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


NUM_TASKS = 3
CLASSES = (4, 5, 6)
D_IN, D = 12, 16


class Encoder(nn.Module):
    """Linear → self-attention (raw ``in_proj_weight``) → LayerNorm → MLP → mean over tokens."""

    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.embed = nn.Linear(D_IN, D)
        self.attn = nn.MultiheadAttention(D, 2, batch_first=True)
        self.norm = nn.LayerNorm(D)
        self.fc1, self.fc2 = nn.Linear(D, 40), nn.Linear(40, D)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        h = self.norm(h)
        return (h + self.fc2(self.drop(torch.relu(self.fc1(h))))).mean(1)


class NoisyInputs(Dataset):
    """Inputs with fresh noise on every read (a random augmentation drawing from the global RNG)."""

    def __init__(self, x: Tensor) -> None:
        self.x = x

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> Tensor:
        return self.x[i] + 0.05 * torch.randn(self.x[i].shape)


def models(dropout: float = 0.0) -> tuple[Encoder, list[Encoder]]:
    """A pretrained encoder and NUM_TASKS fine-tuned copies (low-rank-ish updates)."""
    torch.manual_seed(0)
    pretrained = Encoder(dropout)
    return pretrained, [perturbed(pretrained, seed=t + 1, scale=0.3, rank=3) for t in range(NUM_TASKS)]


def heads() -> dict[str, nn.Linear]:
    """One fixed linear classification head per task."""
    gen = torch.Generator().manual_seed(1)
    out = {}
    for t, c in enumerate(CLASSES):
        head = nn.Linear(D, c)
        with torch.no_grad():
            head.weight.copy_(2.0 * torch.randn(c, D, generator=gen))
            head.bias.zero_()
        out[f"task{t}"] = head.requires_grad_(False)
    return out


def inputs(task: int, n: int = 24) -> Tensor:
    """Unlabeled inputs of one task (a task-specific shift)."""
    gen = torch.Generator().manual_seed(100 + task)
    return torch.randn(n, 4, D_IN, generator=gen) + 0.5 * (task + 1)


def tasks(batch_size: int = 8, noisy: bool = False) -> dict[str, mm.Task]:
    """Task name → Task(shuffled DataLoader of unlabeled inputs, head)."""
    out = {}
    for t, (name, head) in enumerate(heads().items()):
        data = NoisyInputs(inputs(t)) if noisy else inputs(t)
        out[name] = mm.Task(DataLoader(data, batch_size=batch_size, shuffle=True), head)
    return out


def learnables(merged: nn.Module) -> dict[str, Tensor]:
    """A copy of every learnable (λ and ℓ) by name."""
    return {k: v.detach().clone() for k, v in merged.named_parameters()}


def total_entropy(merged: nn.Module, task_set: dict[str, mm.Task]) -> float:
    """Σ_tasks entropy over each task's whole data (no adaptation)."""
    with torch.no_grad():
        return sum(float(mm.entropy(t.head(merged(torch.cat(list(t.data)))))) for t in task_set.values())
