"""Batches of test-time adaptation: model inputs, rows of a batch, and one forward over several tasks' batches.

Every task's inputs go through the same merged encoder, so one forward over the concatenated
batches (split afterwards, each part to its task's head) gives the per-task forwards' outputs at
the cost of one larger forward. :func:`concatenate` joins tensors of equal trailing shapes, and
mappings of keyword inputs (token inputs of different lengths are right-padded to a common length
with ``attention_mask`` 0 and ``input_ids`` ``pad_id``); :func:`split_output` cuts the output back
into the tasks' parts, each sliced back to its own sequence length.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "Joined", "batch_size", "call", "concatenate", "labelled", "mixes_examples", "outputs_match", "rows",
    "split_output", "to_device", "unlabeled_inputs",
]


def to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor (in tuples, lists and mappings) moved to ``device``."""
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def call(model: Callable[..., Any], inputs: Any) -> Any:
    """``model(**inputs)`` for a mapping of keyword inputs, else ``model(inputs)``."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    return model(inputs)


def unlabeled_inputs(batch: Any) -> Any:
    """The model input of an unlabeled batch: the tensor, a tuple's first element, a mapping without ``labels``."""
    if isinstance(batch, Mapping):
        return {k: v for k, v in batch.items() if k != "labels"}
    if isinstance(batch, (list, tuple)):
        if not batch:
            raise ValueError("a batch is an empty tuple/list")
        return batch[0]
    return batch


def labelled(batch: Any, name: str) -> tuple[Any, Tensor]:
    """(inputs, labels) of a labelled batch: a pair ``(x, y)`` or a mapping with ``"labels"``."""
    if isinstance(batch, Mapping) and "labels" in batch:
        return {k: v for k, v in batch.items() if k != "labels"}, batch["labels"]
    if isinstance(batch, (list, tuple)) and len(batch) == 2:
        return batch[0], batch[1]
    raise ValueError(f"eval_data[{name!r}]: a labelled batch must be (inputs, labels) or a mapping with 'labels', "
                     f"got {type(batch).__name__}")


# ------------------------------------------------------------------------------------------- rows


def batch_size(inputs: Any, name: str) -> int:
    """The number of examples of a task's inputs: the first dimension of the tensor (of a mapping's first tensor)."""
    tensors = list(inputs.values()) if isinstance(inputs, Mapping) else [inputs]
    for value in tensors:
        if isinstance(value, Tensor) and value.dim() >= 1:
            return value.shape[0]
    raise ValueError(f"tasks[{name!r}]: its inputs hold no tensor with a batch dimension to split "
                     f"(got {type(inputs).__name__})")


def rows(inputs: Any, start: int, stop: int, total: int) -> Any:
    """Examples ``start:stop`` of inputs of ``total`` examples (every tensor whose first dimension is ``total``)."""
    if isinstance(inputs, Mapping):
        return {k: rows(v, start, stop, total) for k, v in inputs.items()}
    if isinstance(inputs, Tensor) and inputs.dim() >= 1 and inputs.shape[0] == total:
        return inputs[start:stop]
    return inputs


# ---------------------------------------------------------------------------------------- joining


@dataclass
class Joined:
    """Several tasks' inputs as one batch: ``sizes`` examples per part; ``lengths`` their sequence lengths if padded."""

    inputs: Any
    sizes: list[int]
    lengths: list[int] | None = None


def _same_trailing(tensors: Sequence[Tensor]) -> bool:
    first = tensors[0]
    return all(t.dim() >= 1 and t.shape[1:] == first.shape[1:] and t.dtype == first.dtype and t.device == first.device
               for t in tensors)


def _pad(tensor: Tensor, length: int, value: int) -> Tensor:
    """``tensor`` right-padded along dimension 1 to ``length`` with ``value``."""
    missing = length - tensor.shape[1]
    if missing == 0:
        return tensor
    pad = [0, 0] * (tensor.dim() - 2) + [0, missing]  # F.pad lists the last dimension first
    return F.pad(tensor, pad, value=value)


def concatenate(parts: Sequence[Any], pad_id: int = 0) -> Joined | None:
    """The tasks' inputs joined along the batch dimension, or None where they cannot be.

    Tensors join when their trailing shapes, dtypes and devices agree. Mappings join when they have
    the same keys, equal non-tensor values and tensors that join; with a 2-D ``attention_mask`` of
    different lengths, every tensor whose dimension 1 is its part's mask length is right-padded to the
    longest: ``input_ids`` with ``pad_id``, everything else (the mask included) with 0.
    """
    if all(isinstance(p, Tensor) for p in parts):
        tensors = list(parts)
        if not _same_trailing(tensors):
            return None
        return Joined(torch.cat(tensors), [t.shape[0] for t in tensors])
    if not all(isinstance(p, Mapping) for p in parts) or any(p.keys() != parts[0].keys() for p in parts):
        return None
    if not all(_has_batch(p) for p in parts):
        return None
    sizes = [batch_size(p, f"part {i}") for i, p in enumerate(parts)]
    masks = [p.get("attention_mask") for p in parts]
    lengths = None
    if all(isinstance(m, Tensor) and m.dim() == 2 for m in masks) and len({m.shape[1] for m in masks}) > 1:
        lengths = [m.shape[1] for m in masks]
    joined = {}
    for key in parts[0]:
        values = [p[key] for p in parts]
        if not all(isinstance(v, Tensor) for v in values):
            if not all(_equal(v, values[0]) for v in values):
                return None
            joined[key] = values[0]
            continue
        if lengths is not None and all(v.dim() >= 2 and v.shape[1] == n for v, n in zip(values, lengths)):
            values = [_pad(v, max(lengths), pad_id if key == "input_ids" else 0) for v in values]
        if not _same_trailing(values) or any(v.shape[0] != n for v, n in zip(values, sizes)):
            return None
        joined[key] = torch.cat(values)
    return Joined(joined, sizes, lengths)


def _has_batch(inputs: Mapping[str, Any]) -> bool:
    return any(isinstance(v, Tensor) and v.dim() >= 1 for v in inputs.values())


def _equal(a: Any, b: Any) -> bool:
    try:
        return a is b or bool(a == b)
    except Exception:  # a comparison that is not a truth value (arrays, ...) counts as different
        return False


class _Unsplittable(Exception):
    pass


def split_output(output: Any, joined: Joined) -> list[Any] | None:
    """The output of a forward over ``joined`` cut into its parts, or None where it cannot be.

    Every tensor must have the joined batch as its first dimension (in tuples, lists, mappings and
    Hugging Face ``ModelOutput``s); other values (None, numbers, strings) go to every part unchanged.
    Of padded inputs, each part's tensors whose dimension 1 is the padded length are cut back to the
    part's own length.
    """
    try:
        return _split(output, joined)
    except _Unsplittable:
        return None


def _split(output: Any, joined: Joined) -> list[Any]:
    n = len(joined.sizes)
    if isinstance(output, Tensor):
        if output.dim() == 0 or output.shape[0] != sum(joined.sizes):
            raise _Unsplittable
        pieces = list(output.split(joined.sizes))
        if joined.lengths is not None:
            longest = max(joined.lengths)
            pieces = [p[:, :n_i] if p.dim() >= 2 and p.shape[1] == longest else p
                      for p, n_i in zip(pieces, joined.lengths)]
        return pieces
    if output is None or isinstance(output, (bool, int, float, str)):
        return [output] * n
    if isinstance(output, Mapping):
        columns = {k: _split(v, joined) for k, v in output.items()}
        rebuilt = [{k: c[i] for k, c in columns.items()} for i in range(n)]
        try:
            if dataclasses.is_dataclass(output):  # a Hugging Face ModelOutput
                return [type(output)(**fields) for fields in rebuilt]
            return [type(output)(fields) for fields in rebuilt]
        except Exception as err:
            raise _Unsplittable from err
    if isinstance(output, (list, tuple)):
        columns = [_split(v, joined) for v in output]
        parts = [[c[i] for c in columns] for i in range(n)]
        if hasattr(output, "_fields"):  # a namedtuple
            return [type(output)(*p) for p in parts]
        return [type(output)(p) for p in parts]
    raise _Unsplittable


def outputs_match(a: Any, b: Any) -> bool:
    """Whether two outputs have the same structure and values (floats to √ε of their dtype, relative to the max)."""
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        if not (isinstance(a, Tensor) and isinstance(b, Tensor)) or a.shape != b.shape or a.dtype != b.dtype:
            return False
        if not a.dtype.is_floating_point:
            return bool(torch.equal(a, b))
        if a.numel() == 0:
            return True
        scale = max(1.0, float(b.detach().abs().max()))
        return float((a.detach() - b.detach()).abs().max()) <= math.sqrt(torch.finfo(a.dtype).eps) * scale
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(outputs_match(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(outputs_match(x, y) for x, y in zip(a, b))
    return _equal(a, b)


def mixes_examples(model: nn.Module) -> str | None:
    """The name of a module whose output (or state) for one example depends on the rest of its batch, else None.

    BatchNorm in training mode (or without running statistics) normalises with the batch's statistics;
    any normalisation that updates running statistics in training mode would update them once for the
    joined batch instead of once per task.
    """
    for name, module in model.named_modules():
        if not isinstance(module, nn.modules.batchnorm._NormBase):
            continue
        batch_statistics = isinstance(module, nn.modules.batchnorm._BatchNorm) and not module.track_running_stats
        if batch_statistics or (module.training and module.track_running_stats):
            return name or type(module).__name__
    return None
