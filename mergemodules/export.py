"""Export of fused weights: a safetensors file with the original state-dict keys, written atomically.

For a static merge that never holds the merged model, see :mod:`mergemodules.streaming`; to keep a
merged model's λ, masks and factors instead of its fused values, :mod:`mergemodules.merge_state`.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from .files import atomic_write
from .layers import check_finite
from .sources import check_floating_dtype
from .surgery import MergedModel

__all__ = ["fused_state_dict", "save_fused"]


def fused_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The plain state dict of ``model`` (fused first if it is a MergedModel), tied tensors un-shared."""
    plain = model.fuse() if isinstance(model, MergedModel) else model
    state, seen = {}, set()
    for key, tensor in plain.state_dict().items():
        tensor = tensor.detach()
        storage = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        state[key] = tensor.clone().contiguous() if storage in seen else tensor.contiguous()
        seen.add(storage)
    return state


def save_fused(model: nn.Module, path: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
    """Save the fused model as safetensors with the original state-dict keys (loads with ``load_state_dict``).

    ``dtype``: floating tensors are written in it, each rounded once from the computed values
    (merge a float32 copy of a bf16 model and pass ``torch.bfloat16``); default: as computed.
    """
    check_floating_dtype(dtype, "dtype")
    state = fused_state_dict(model)
    if dtype is not None:
        state = {key: t.to(dtype) if t.is_floating_point() else t for key, t in state.items()}
    for key, tensor in state.items():
        check_finite(tensor, f"save_fused({str(path)!r}): tensor {key!r} ({tensor.dtype})")
    return atomic_write(path, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
