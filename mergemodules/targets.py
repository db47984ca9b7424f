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
kernels — is merged densely by the method's rule. A method narrows or widens this set with its
``matrix_set`` (:func:`method_layout`): ``"layers"`` drops the free projections (CART's and
AdaRank's code decompose only attention and MLP weights), ``"all_2d"`` adds every other 2-D tensor
but ``text_projection`` (TSV-M's code). ``targets``/``exclude`` choose which parameters
are merged at all; the rest stay at their pretrained value and are not trained.
"""
from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from torch import nn

__all__ = ["Entry", "MATRIX_SETS", "plan", "matrix_layout", "method_layout", "is_selected", "Patterns"]

Patterns = str | Sequence[str] | None

MHA_MATRICES = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")
PROJECTION_NAMES = ("proj", "text_projection")
MATRIX_SETS = ("rule", "layers", "all_2d")


@dataclass
class Entry:
    """One parameter tensor of the model (tied names share one entry)."""

    name: str
    aliases: tuple[str, ...]
    shape: tuple[int, ...]
    layout: str | None  # "out_in" / "in_out" for matrices, None for dense tensors
    merged: bool  # False: kept at the pretrained value
    owners: list[tuple[str, str]] = field(default_factory=list)  # (module name, attribute)
    matrix_rule: str | None = None  # what made it a matrix: "layer" (Linear, attention, Conv1D), "projection", "pattern"

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


def _matrix_rule(module: nn.Module, attr: str, ndim: int) -> tuple[str, str] | None:
    """(rule, layout) if the matrix rule merges ``module.<attr>`` as a matrix, else None."""
    if ndim != 2:
        return None
    if isinstance(module, nn.Linear) and attr == "weight":
        return "layer", "out_in"
    if isinstance(module, nn.MultiheadAttention) and attr in MHA_MATRICES:
        return "layer", "out_in"
    if _is_conv1d(module) and attr == "weight":
        return "layer", "in_out"
    if attr in PROJECTION_NAMES and not isinstance(module, nn.Linear):
        return "projection", "in_out"
    return None


def matrix_layout(module: nn.Module, attr: str, ndim: int) -> str | None:
    """The layout of ``module.<attr>`` if the matrix rule merges it as a matrix, else None."""
    found = _matrix_rule(module, attr, ndim)
    return None if found is None else found[1]


def method_layout(entry: Entry, matrix_set: str) -> str | None:
    """The layout ``entry`` is merged with under a method's ``matrix_set`` (None: merged densely).

    ``"rule"``: the matrix rule as planned. ``"layers"``: without the free projections (open_clip's
    ``proj``/``text_projection``), as CART's and AdaRank's code (which decompose the ``attn``/``mlp``
    weights only). ``"all_2d"``: also every other 2-D tensor, laid out as stored, except a tensor
    named ``text_projection``, as TSV-M's code (which decomposes every 2-D tensor of the task vector
    but ``text_projection``, and averages that one).
    """
    if matrix_set not in MATRIX_SETS:
        raise ValueError(f"matrix_set={matrix_set!r}: expected one of {MATRIX_SETS}")
    if matrix_set == "layers" and entry.matrix_rule == "projection":
        return None
    if matrix_set == "all_2d":
        if entry.name.rpartition(".")[2] == "text_projection":
            return None
        if entry.layout is None and len(entry.shape) == 2:
            return "out_in"
    return entry.layout


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
            rule, layout = _matrix_rule(module, attr, param.dim()) or (None, None)
            for pattern, custom in (matrices or {}).items():
                if param.dim() == 2 and fnmatch.fnmatchcase(name, pattern):
                    rule, layout = "pattern", custom
            entry = Entry(name, (), tuple(param.shape), layout, is_selected(name, targets, exclude), matrix_rule=rule)
            entries[id(param)] = entry
        else:
            entry.aliases += (name,)
            if entry.layout is not None and matrix_layout(module, attr, param.dim()) is None:
                entry.layout = entry.matrix_rule = None  # tied to an embedding or other non-matrix use: merge densely
        entry.owners.append((module_name, attr))
    if targets is not None and not any(e.merged for e in entries.values()):
        raise ValueError(f"targets={targets!r} matches no parameter of the model")
    return list(entries.values())
