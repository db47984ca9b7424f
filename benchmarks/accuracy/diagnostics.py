"""Task-vector diagnostics for the report: the cosine matrix and the singular-value spectra.

When a suite does not show the papers' ordering, these say why: near-orthogonal task vectors leave
little interference for TIES or CART to remove; a flat spectrum means a top-8 % truncation loses most
of a task vector (CART's premise is that a few components carry it).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mergemodules.methods.awd import cosine_matrix

from .zoo import Zoo


def _task_vectors(zoo: Zoo, name: str, centered: bool) -> torch.Tensor:
    """(T, *shape): τ_t = θ_t − θ₀ (or the centered τ̄_t = θ_t − θ_avg) of one parameter, in float64."""
    tuned = torch.stack([t.encoder.get_parameter(name).detach().double() for t in zoo.tasks])
    base = tuned.mean(0) if centered else zoo.pretrained.get_parameter(name).detach().double()
    return tuned - base


def _names(zoo: Zoo) -> list[str]:
    return [n for n, p in zoo.pretrained.named_parameters() if p.is_floating_point()]


def cosine(zoo: Zoo, centered: bool = False) -> list[list[float]]:
    """T × T cosine similarity of the task vectors flattened over every float parameter of the encoder."""
    gram = torch.zeros(len(zoo.tasks), len(zoo.tasks), dtype=torch.float64)
    for name in _names(zoo):  # one parameter at a time: memory of T copies of the largest tensor only
        v = _task_vectors(zoo, name, centered).flatten(1)
        gram += (v @ v.T).cpu()
    return cosine_matrix(gram).tolist()


def _linear_weights(model: nn.Module) -> list[str]:
    return [f"{name}.weight" if name else "weight" for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def _squared_singular_values(m: torch.Tensor) -> torch.Tensor:
    """(..., r) σ² in descending order, as the eigenvalues of the smaller Gram matrix (faster than ``svdvals``)."""
    gram = m @ m.mT if m.shape[-2] <= m.shape[-1] else m.mT @ m
    return torch.linalg.eigvalsh(gram).flip(-1).clamp_min(0)


def spectra(zoo: Zoo, fractions: tuple[float, ...], centered: bool = False) -> dict[str, list[tuple[float, float]]]:
    """Per task: the fraction of ‖τ‖² kept by the top ⌈f·r⌉ singular values, averaged over the Linear weights."""
    names = _linear_weights(zoo.pretrained)
    if not names:
        raise ValueError("spectra: the encoder has no nn.Linear weight")
    kept = torch.zeros(len(zoo.tasks), len(fractions), dtype=torch.float64)
    for name in names:
        s2 = _squared_singular_values(_task_vectors(zoo, name, centered))  # (T, r)
        r = s2.shape[1]
        cum = s2.cumsum(1) / s2.sum(1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
        cum[s2.sum(1) == 0] = 1.0  # a zero task vector loses nothing
        kept += cum[:, [max(1, min(r, math.ceil(f * r))) - 1 for f in fractions]].cpu()
    kept /= len(names)
    return {t.name: [(f, float(k)) for f, k in zip(fractions, kept[i])] for i, t in enumerate(zoo.tasks)}
