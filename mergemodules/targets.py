"""Which tensors of a model are merged, and which of them are merged as matrices.

The matrix rule (a parameter is merged through the low-rank/dense *matrix* term when it is):

* the ``weight`` of an ``nn.Linear`` (or a subclass) — layout (out, in);
* ``in_proj_weight`` / ``q_proj_weight`` / ``k_proj_weight`` / ``v_proj_weight`` of
  ``nn.MultiheadAttention`` — layout (out, in);
* the ``weight`` of Hugging Face's ``Conv1D`` (GPT-2) — layout (in, out);
* a 2-D parameter called ``proj`` or ``text_projection`` held by a module that is not a Linear
  (open_clip's ``visual.proj`` and ``text_projection``, used as ``x @ proj``) — layout (in, out);
* any 2-D parameter whose name matches a pattern of the ``matrices`` option.

Every other tensor — biases, norms, embeddings, positional tables, class tokens, convolution
kernels — is merged densely by the method's rule. ``targets``/``exclude`` choose which parameters
are merged at all; the rest stay at their pretrained value and are not trained.
"""
from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from torch import nn

__all__ = ["Entry", "plan", "matrix_layout", "is_selected", "Patterns"]

Patterns = str | Sequence[str] | None

MHA_MATRICES = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")
PROJECTION_NAMES = ("proj", "text_projection")


@dataclass
class Entry:
    """One parameter tensor of the model (tied names share one entry)."""

    name: str
    aliases: tuple[str, ...]
    shape: tuple[int, ...]
    layout: str | None  # "out_in" / "in_out" for matrices, None for dense tensors
    merged: bool  # False: kept at the pretrained value
    owners: list[tuple[str, str]] = field(default_factory=list)  # (module name, attribute)

    @property
    def is_matrix(self) -> bool:
        """Whether the tensor is merged through the matrix term."""
        return self.layout is not None

    @property
    def names(self) -> tuple[str, ...]:
        """All names of the tensor in the model's state dict."""
        return (self.name, *self.aliases)


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def matrix_layout(module: nn.Module, attr: str, ndim: int) -> str | None:
    """The layout of ``module.<attr>`` if the matrix rule merges it as a matrix, else None."""
    if ndim != 2:
        return None
    if isinstance(module, nn.Linear) and attr == "weight":
        return "out_in"
    if isinstance(module, nn.MultiheadAttention) and attr in MHA_MATRICES:
        return "out_in"
    if _is_conv1d(module) and attr == "weight":
        return "in_out"
    if attr in PROJECTION_NAMES and not isinstance(module, nn.Linear):
        return "in_out"
    return None


def _matches(name: str, module_name: str, patterns: Patterns) -> bool:
    """PEFT-style matching: a string is a regex (full match); a list holds globs or name suffixes."""
    if isinstance(patterns, str):
        return bool(re.fullmatch(patterns, name) or re.fullmatch(patterns, module_name))
    for pattern in patterns or ():
        for candidate in (name, module_name):
            if candidate == pattern or candidate.endswith("." + pattern) or fnmatch.fnmatchcase(candidate, pattern):
                return True
    return False


def is_selected(name: str, targets: Patterns, exclude: Patterns) -> bool:
    """Whether ``targets``/``exclude`` let the tensor ``name`` (a parameter or buffer) be merged."""
    module_name = name.rpartition(".")[0]
    targeted = targets is None or _matches(name, module_name, targets)
    return targeted and not (exclude is not None and _matches(name, module_name, exclude))


def _check_patterns(patterns: Patterns, option: str) -> None:
    if patterns is None or isinstance(patterns, str):
        if isinstance(patterns, str):
            try:
                re.compile(patterns)
            except re.error as err:
                raise ValueError(f"{option}: invalid regular expression {patterns!r}: {err}") from None
        return
    if not all(isinstance(p, str) for p in patterns):
        raise TypeError(f"{option} must be a regex string or a list of name patterns, got {patterns!r}")


def plan(
    model: nn.Module,
    targets: Patterns = None,
    exclude: Patterns = None,
    matrices: Mapping[str, str] | None = None,
) -> list[Entry]:
    """List the model's parameters with how each is merged; tied parameters appear once."""
    _check_patterns(targets, "targets")
    _check_patterns(exclude, "exclude")
    for pattern, layout in (matrices or {}).items():
        if layout not in ("out_in", "in_out"):
            raise ValueError(f"matrices[{pattern!r}]={layout!r}: layout must be 'out_in' or 'in_out'")
    modules = dict(model.named_modules(remove_duplicate=False))
    entries: dict[int, Entry] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        module_name, _, attr = name.rpartition(".")
        module = modules[module_name]
        entry = entries.get(id(param))
        if entry is None:
            layout = matrix_layout(module, attr, param.dim())
            for pattern, custom in (matrices or {}).items():
                if param.dim() == 2 and fnmatch.fnmatchcase(name, pattern):
                    layout = custom
            entry = Entry(name, (), tuple(param.shape), layout, is_selected(name, targets, exclude))
            entries[id(param)] = entry
        else:
            entry.aliases += (name,)
            if entry.layout is not None and matrix_layout(module, attr, param.dim()) is None:
                entry.layout = None  # tied to an embedding or other non-matrix use: merge densely
        entry.owners.append((module_name, attr))
    if targets is not None and not any(e.merged for e in entries.values()):
        raise ValueError(f"targets={targets!r} matches no parameter of the model")
    return list(entries.values())
