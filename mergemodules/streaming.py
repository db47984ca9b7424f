"""Static export without a merged model: build, evaluate and drop one merged tensor at a time.

``merge(...).fuse()`` holds the whole merged model (B plus dense task vectors or factors: up to
T model sizes). For a static export only the fused tensors are needed, so ``fuse_streaming``
builds each tensor's merged module with the same builder (``build.iter_merged_tensors``),
evaluates it, hands out the fused tensor and drops the module. With lazy checkpoints
(:class:`~mergemodules.sources.SafetensorsCheckpoint`) and :func:`save_fused_streaming`, peak
memory is about one tensor's values of all tasks plus its factors. A large tensor of an entrywise
merge (task arithmetic, AdaMerging's initial λ) or of per-tensor TIES, and every averaged tensor (weight
averaging) is merged chunk by chunk straight from its memory-mapped inputs
(:func:`~mergemodules.build.merge_in_chunks`: the same values, bit for bit, in a float32 or float64
``dtype``): then only T chunks of 1 MiB are held besides the fused tensor.

Precision: every tensor is merged in ``dtype`` (default float32, float64 for float64 checkpoints)
from the checkpoints' values cast to it, and the fused tensor is rounded once to its output dtype
(default: the dtype the pretrained checkpoint stores it in), so a bf16/fp16 merge rounds each
entry once, not each task's change.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from .build import (
    Workspace, can_merge_in_chunks, check_inputs, check_sources, iter_merged_tensors, merge_buffers, merge_in_chunks,
    prepare, propagates_non_finite,
)
from .layers import all_finite, check_finite
from .methods import Method
from .safetensors_files import parse_size, write_safetensors, write_safetensors_shards
from .sources import _Converted, check_floating_dtype, compute_dtype_of, output_dtypes, shapes_of
from .targets import Entry, Patterns

__all__ = ["fuse_streaming", "merge_to_state_dict", "save_fused_streaming", "check_weights"]


class _EntryValues(Mapping[str, Tensor]):
    """Entry name → its pretrained tensor, read lazily under whichever of the entry's names ``weights`` holds."""

    def __init__(self, weights: Mapping[str, Tensor], entries: Sequence[Entry]) -> None:
        self.weights = weights
        self.names = {e.name: next(n for n in e.names if n in weights) for e in entries}

    def __getitem__(self, name: str) -> Tensor:
        return self.weights[self.names[name]]

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def view(self, name: str) -> Tensor | None:
        """The entry's pretrained tensor as stored, mapped without being read, where ``weights`` can (else None)."""
        view = getattr(self.weights, "view", None)
        return None if view is None else view(self.names[name])


def check_weights(entries: Sequence[Entry], weights: Mapping[str, Tensor], model: nn.Module) -> list[str]:
    """Check ``weights`` against the architecture; returns the buffer keys (state-dict keys that are no parameter)."""
    as_merged = [dataclasses.replace(e, merged=True) for e in entries]
    shapes = shapes_of(weights, "weights")
    model_keys = set(model.state_dict())
    check_sources(as_merged, [shapes], model_keys, labels=["the pretrained weights"])
    parameter_names = {n for e in entries for n in e.names}
    buffers = [k for k in model.state_dict() if k not in parameter_names]
    missing = [k for k in buffers if k not in shapes]
    if missing:
        raise KeyError(f"the pretrained weights are missing {len(missing)} buffer(s) of the model: {missing[:5]}")
    state = model.state_dict()
    for key in buffers:
        if tuple(shapes[key].shape) != tuple(state[key].shape):
            raise ValueError(f"the pretrained weights' buffer {key!r} has shape {tuple(shapes[key].shape)}, "
                             f"the model has {tuple(state[key].shape)}")
    return buffers


def fuse_streaming(
    pretrained: nn.Module,
    finetuned: Sequence[nn.Module | Mapping[str, Tensor]],
    method: str | Method = "task_arithmetic",
    *,
    weights: Mapping[str, Tensor] | None = None,
    targets: Patterns = None,
    exclude: Patterns = None,
    matrices: Mapping[str, str] | None = None,
    dtype: torch.dtype | None = None,
    out_dtype: torch.dtype | None = None,
    progress: bool = False,
    reuse_outputs: bool = False,
    **options: Any,
) -> Iterator[tuple[tuple[str, ...], Tensor]]:
    """Yield ``(state-dict names, fused tensor)`` one tensor at a time: the values of ``merge(...).fuse()``.

    Same arguments as :func:`mergemodules.merge`. ``pretrained`` gives the architecture and, unless
    ``weights`` (a name → tensor mapping, e.g. a lazy safetensors checkpoint) is given, the
    pretrained values; with ``weights`` it may live on the meta device. Tied tensors come once
    with all their names; buffers come last, merged as by ``merge`` (README, "Buffers"). λ and
    masks are the method's initial values, so this is the static merge.

    ``dtype``: the floating tensors of ``weights`` and ``finetuned`` are cast to it before merging
    (default float32, float64 when ``weights`` holds float64 tensors). ``out_dtype``: the floating
    tensors come out in it, each rounded once (default: the dtype ``weights`` holds each in). So
    the values are those of ``merge(...).fuse()`` on models cast to ``dtype``, cast to the output dtype —
    except for the tensors merged in chunks in a half ``dtype``: those are computed in float32 from the inputs
    rounded to it and rounded to it once (:func:`~mergemodules.build.merge_in_chunks`).

    ``reuse_outputs``: a large tensor merged in chunks (:func:`~mergemodules.build.merge_in_chunks`) comes in one
    reused buffer, which the next such tensor overwrites: for a consumer that is done with each tensor before it
    takes the next, as a writer is (:func:`save_fused_streaming`). It spares a page fault per page of every
    fresh output tensor.
    """
    check_floating_dtype(dtype, "dtype")
    check_floating_dtype(out_dtype, "out_dtype")
    weights = pretrained.state_dict() if weights is None else weights
    setup = prepare(pretrained, finetuned, method, targets=targets, exclude=exclude, matrices=matrices, **options)
    entries = setup.entries
    buffers = check_weights(entries, weights, pretrained)
    stored = shapes_of(weights, "weights")
    dtype = dtype or compute_dtype_of(stored)
    values = _EntryValues(_Converted(weights, dtype, None), entries)
    sources = [_Converted(source, dtype, None) for source in setup.sources]
    out = output_dtypes(stored, out_dtype)
    # buffers in their output dtype: a merged one (a float64 mean) is then rounded once, straight to it
    buffers = merge_buffers({key: weights[key].to(out[key]) for key in buffers}, sources, setup.selected)
    outputs = Workspace() if reuse_outputs else None
    return _fused(entries, values, buffers, sources, setup.method, dtype, out, progress, outputs)


def _mapped_inputs(entry: Entry, values: _EntryValues, sources: Sequence[_Converted]) -> tuple[Tensor, list[Tensor]] | None:
    """The pretrained and fine-tuned tensors of ``entry`` mapped from their files (not read), or None unless every
    one can be (each source holding it under one name: tied names present twice are compared by the lookup)."""
    pretrained = values.view(entry.name)
    tasks = []
    for source in sources:
        present = [name for name in entry.names if name in source]
        tasks.append(source.view(present[0]) if len(present) == 1 else None)
    return None if pretrained is None or any(t is None for t in tasks) else (pretrained, tasks)


def _fused(
    entries: Sequence[Entry], values: _EntryValues, buffers: Mapping[str, Tensor], sources: Sequence[_Converted],
    method: Method, dtype: torch.dtype, out: Mapping[str, torch.dtype], progress: bool, outputs: Workspace | None,
) -> Iterator[tuple[tuple[str, ...], Tensor]]:
    check = not propagates_non_finite(method)  # else an input's NaN/Inf shows in the output: checked only then
    workspace = Workspace()  # each module is dropped before the next is built
    mapped: dict[str, tuple[Tensor, list[Tensor]]] = {}

    def in_chunks(entry: Entry) -> bool:  # a large tensor merged in chunks, its inputs mapped from their files
        inputs = _mapped_inputs(entry, values, sources) if can_merge_in_chunks(entry, method) else None
        if inputs is not None:
            mapped[entry.name] = inputs
        return inputs is not None

    for entry, module in iter_merged_tensors(entries, values, sources, method, progress, check=check,
                                             workspace=workspace, skip=in_chunks):
        out_dtype = out[values.names[entry.name]]
        with torch.no_grad():
            if module is None:
                pretrained, tasks = mapped.pop(entry.name)
                into = None if outputs is None else outputs.empty(entry.shape, out_dtype)
                fused = merge_in_chunks(entry, pretrained, tasks, method, dtype, out_dtype, workspace, into,
                                        mapped=True)
                del pretrained, tasks  # the maps are released with their tensors
            else:
                fused = module().detach().to(out_dtype).contiguous()  # the one rounding
        del module
        if workspace.holds(fused):  # the next tensor's values overwrite it
            fused = fused.clone()
        if not all_finite(fused):  # one pass over the output; the inputs are read again only on this error path
            check_inputs(entry, values[entry.name], sources, method)  # names an unchecked input (an average's)
            check_finite(fused, f"the fused tensor {entry.name!r}")  # raises, naming the output
        yield entry.names, fused
    for key, value in buffers.items():  # already in their output dtype (fuse_streaming)
        yield (key,), value


def merge_to_state_dict(
    pretrained: nn.Module,
    finetuned: Sequence[nn.Module | Mapping[str, Tensor]],
    method: str | Method = "task_arithmetic",
    **kwargs: Any,
) -> dict[str, Tensor]:
    """The fused state dict (``merge(...).fuse().state_dict()``) built tensor by tensor; see :func:`fuse_streaming`."""
    stream = fuse_streaming(pretrained, finetuned, method, **kwargs)
    fused = {name: tensor for names, tensor in stream for name in names}
    return {key: fused[key] for key in pretrained.state_dict()}


def save_fused_streaming(
    path: str | os.PathLike,
    pretrained: nn.Module,
    finetuned: Sequence[nn.Module | Mapping[str, Tensor]],
    method: str | Method = "task_arithmetic",
    *,
    weights: Mapping[str, Tensor] | None = None,
    out_dtype: torch.dtype | None = None,
    max_shard_size: int | str | None = None,
    **kwargs: Any,
) -> Path:
    """Write the static merge to a safetensors file tensor by tensor, under the keys ``weights`` holds.

    With ``weights`` a checkpoint of the pretrained model, the output has exactly its keys (tied
    tensors stored as it stores them), shapes and dtypes (floating ones: ``out_dtype`` when given);
    without, the model's state-dict keys. ``dtype``/``out_dtype``: see :func:`fuse_streaming`.
    With ``max_shard_size`` (bytes or ``"5GB"``), ``path`` is an existing folder that receives
    ``model.safetensors`` or its shards and index (:func:`~mergemodules.safetensors_files.write_safetensors_shards`).
    """
    weights = pretrained.state_dict() if weights is None else weights
    check_floating_dtype(out_dtype, "out_dtype")
    shard_size = None if max_shard_size is None else parse_size(max_shard_size)
    stored = shapes_of(weights, "weights")
    out = output_dtypes(stored, out_dtype)
    order = {key: i for i, key in enumerate(pretrained.state_dict())}  # the model's order, as save_pretrained's
    keys = sorted(stored, key=lambda key: order.get(key, len(order)))
    layout = {key: (tuple(stored[key].shape), out[key]) for key in keys}
    tensors = fuse_streaming(pretrained, finetuned, method, weights=weights, out_dtype=out_dtype, reuse_outputs=True,
                             **kwargs)
    items = ((name, tensor) for names, tensor in tensors for name in names if name in layout)
    if shard_size is None:
        return write_safetensors(path, layout, items)
    write_safetensors_shards(path, layout, items, shard_size)
    return Path(path)
