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


def eval_data() -> dict[str, list]:
    """Labelled batches: the head's own argmax on the pretrained encoder as labels."""
    pretrained, _ = models()
    out = {}
    for t, (name, head) in enumerate(heads().items()):
        x = inputs(t)
        with torch.no_grad():
            y = head(pretrained(x)).argmax(-1)
        out[name] = [(x[:12], y[:12]), (x[12:], y[12:])]
    return out


class Interrupt(Exception):
    """Raised by :class:`InterruptingHead` (a run killed mid-way)."""


class InterruptingHead(nn.Module):
    """Wraps a head and raises :class:`Interrupt` after ``calls`` calls."""

    def __init__(self, head: nn.Module, calls: int) -> None:
        super().__init__()
        self.head, self.calls = head, calls

    def forward(self, features: Tensor) -> Tensor:
        self.calls -= 1
        if self.calls < 0:
            raise Interrupt()
        return self.head(features)


def learnables(merged: nn.Module) -> dict[str, Tensor]:
    """A copy of every learnable (λ and ℓ) by name."""
    return {k: v.detach().clone() for k, v in merged.named_parameters()}


def total_entropy(merged: nn.Module, task_set: dict[str, mm.Task]) -> float:
    """Σ_tasks entropy over each task's whole data (no adaptation)."""
    with torch.no_grad():
        return sum(float(mm.entropy(t.head(merged(torch.cat(list(t.data)))))) for t in task_set.values())


# ------------------------------------------------------------------------------------ token inputs

VOCAB = 20
LENGTHS = (5, 7, 6)  # each task's sequence length: joining them needs padding


class TokenEncoder(nn.Module):
    """Token embeddings → a transformer layer that masks padding; returns ``{"last_hidden_state": (B, L, D)}``.

    ``pools=True``: mean over every position, padding included, so its output depends on the padding.
    """

    def __init__(self, pools: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.layer = nn.TransformerEncoderLayer(D, 2, 32, dropout=0.0, batch_first=True)
        self.pools = pools

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> dict[str, Tensor] | Tensor:
        h = self.layer(self.embed(input_ids), src_key_padding_mask=attention_mask == 0)
        return h.mean(1) if self.pools else {"last_hidden_state": h}


def token_models(pools: bool = False) -> tuple[TokenEncoder, list[TokenEncoder]]:
    """A pretrained token encoder and NUM_TASKS fine-tuned copies."""
    torch.manual_seed(0)
    pretrained = TokenEncoder(pools)
    return pretrained, [perturbed(pretrained, seed=t + 1, scale=0.3, rank=3) for t in range(NUM_TASKS)]


def token_tasks(pools: bool = False) -> dict[str, mm.Task]:
    """Keyword batches {input_ids, attention_mask} of a different length per task (each padded to its own length)."""
    out = {}
    for t, (name, head) in enumerate(heads().items()):
        gen = torch.Generator().manual_seed(200 + t)
        batches = []
        for _ in range(2):
            ids = torch.randint(1, VOCAB, (6, LENGTHS[t]), generator=gen)
            mask = torch.ones_like(ids)
            mask[: 3, LENGTHS[t] - 2:] = 0  # some examples end early: the task's own padding
            batches.append({"input_ids": ids * mask, "attention_mask": mask})
        read = head if pools else (lambda out, h=head: h(out["last_hidden_state"].mean(1)))  # mean over its L
        out[name] = mm.Task(batches, read)
    return out


def grad_forwards(model: nn.Module) -> list[int]:
    """A list that grows by one at every forward of ``model`` that records a graph (not the no-grad checks)."""
    calls: list[int] = []
    model.register_forward_hook(lambda *_: calls.append(1) if torch.is_grad_enabled() else None)
    return calls
