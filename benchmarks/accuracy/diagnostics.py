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


def _vectors(zoo: Zoo, centered: bool) -> list[dict[str, torch.Tensor]]:
    """Per task, parameter name → τ_t = θ_t − θ₀ (or the centered τ̄_t = θ_t − θ_avg), float parameters only."""
    pre = {k: v.detach().float() for k, v in zoo.pretrained.state_dict().items() if v.is_floating_point()}
    tuned = [{k: v.detach().float() for k, v in t.encoder.state_dict().items() if k in pre} for t in zoo.tasks]
    base = {k: torch.stack([sd[k] for sd in tuned]).mean(0) for k in pre} if centered else pre
    return [{k: sd[k] - base[k] for k in pre} for sd in tuned]


def cosine(zoo: Zoo, centered: bool = False) -> list[list[float]]:
    """T × T cosine similarity of the task vectors flattened over every float parameter of the encoder."""
    flat = torch.stack([torch.cat([v.flatten() for v in tv.values()]) for tv in _vectors(zoo, centered)]).double()
    return cosine_matrix(flat @ flat.T).tolist()


def _linear_weights(model: nn.Module) -> list[str]:
    return [f"{name}.weight" if name else "weight" for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def spectra(zoo: Zoo, fractions: tuple[float, ...], centered: bool = False) -> dict[str, list[tuple[float, float]]]:
    """Per task: the fraction of ‖τ‖² kept by the top ⌈f·r⌉ singular values, averaged over the Linear weights."""
    names = _linear_weights(zoo.pretrained)
    if not names:
        raise ValueError("spectra: the encoder has no nn.Linear weight")
    out = {}
    for t, tv in zip(zoo.tasks, _vectors(zoo, centered)):
        kept = torch.zeros(len(fractions), dtype=torch.float64)
        for name in names:
            s2 = torch.linalg.svdvals(tv[name].double()) ** 2
            total = s2.sum()
            if total == 0:
                kept += 1.0
                continue
            cum = s2.cumsum(0) / total
            r = len(s2)
            kept += torch.tensor([float(cum[max(1, min(r, math.ceil(f * r))) - 1]) for f in fractions],
                                 dtype=torch.float64)
        out[t.name] = [(f, float(k / len(names))) for f, k in zip(fractions, kept)]
    return out
