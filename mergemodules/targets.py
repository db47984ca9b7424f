"""Which tensors of a model are merged, and which of them are merged as matrices.

The matrix rule (a parameter is merged through the low-rank/dense *matrix* term when it is), one
:class:`MatrixKind` per line of :data:`MATRIX_KINDS`:

* the ``weight`` of an ``nn.Linear`` (or a subclass) — layout (out, in), run by ``MergedLinear``;
* ``in_proj_weight`` / ``q_proj_weight`` / ``k_proj_weight`` / ``v_proj_weight`` of
  ``nn.MultiheadAttention`` — layout (out, in);
* the ``weight`` of Hugging Face's ``Conv1D`` (GPT-2) — layout (in, out);
* a 2-D parameter called ``proj`` or ``text_projection`` held by a module that is not a Linear
  (open_clip's ``visual.proj`` and ``text_projection``, used as ``x @ proj``) — layout (in, out);
* any parameter whose name matches a pattern of the ``matrices`` option and fits its layout
  (2-D for ``"out_in"``/``"in_out"``, 3-D or more for ``"out_in_kernel"``).

The ``weight`` of an ``nn.Conv2d`` is a kind outside the rule (``default=False``): it is merged as
the (out, in·kh·kw) matrix, run by ``MergedConv2d``, where ``matrices={"<glob>": "out_in_kernel"}``
names it. Every other tensor — biases, norms, embeddings, positional tables, class tokens,
convolution kernels not so named — is merged densely by the method's rule. A new kind of layer is
one more :class:`MatrixKind` in :data:`MATRIX_KINDS`. A method narrows or widens this set with its
``matrix_set`` (:func:`method_layout`): ``"layers"`` drops the free projections (CART's and
AdaRank's code decompose only attention and MLP weights), ``"all_2d"`` adds every other 2-D tensor
but ``text_projection`` (TSV-M's code). ``targets``/``exclude`` choose which parameters
are merged at all; the rest stay at their pretrained value and are not trained.
"""
from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

from torch import nn

from .layers import MergedConv2d, MergedLayer, MergedLinear
from .layouts import Layout, parse_layout

__all__ = [
    "Entry", "MatrixKind", "MATRIX_KINDS", "MATRIX_SETS", "plan", "matrix_layout", "method_layout", "merged_layer_for",
    "is_selected", "Patterns",
]

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
    layout: Layout | None  # how a matrix is seen as (out, in); None for dense tensors
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


@dataclass(frozen=True)
class MatrixKind:
    """A kind of parameter merged as a matrix: where it is found, its layout, and the merged layer running its module."""

    name: str
    applies: Callable[[nn.Module, str], bool]  # (module, attribute name) -> whether module.<attribute> is of this kind
    layout: Layout
    rule: str = "layer"  # Entry.matrix_rule: "layer" or "projection" (free projections, dropped by matrix_set="layers")
    layer: type[MergedLayer] | None = None  # replaces the whole module; None: the parameter becomes a computed attribute
    default: bool = True  # in the matrix rule; False: a matrix only where the ``matrices`` option names it


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


MATRIX_KINDS: list[MatrixKind] = [
    MatrixKind("linear", lambda m, a: isinstance(m, nn.Linear) and a == "weight", Layout.OUT_IN, layer=MergedLinear),
    MatrixKind("attention", lambda m, a: isinstance(m, nn.MultiheadAttention) and a in MHA_MATRICES, Layout.OUT_IN),
    MatrixKind("conv1d", lambda m, a: _is_conv1d(m) and a == "weight", Layout.IN_OUT),
    MatrixKind("projection", lambda m, a: a in PROJECTION_NAMES and not isinstance(m, nn.Linear), Layout.IN_OUT,
               rule="projection"),
    MatrixKind("conv2d", lambda m, a: isinstance(m, nn.Conv2d) and a == "weight", Layout.OUT_IN_KERNEL,
               layer=MergedConv2d, default=False),
]


def _matrix_rule(module: nn.Module, attr: str, ndim: int) -> tuple[str, Layout] | None:
    """(rule, layout) if the matrix rule merges ``module.<attr>`` as a matrix, else None."""
    for kind in MATRIX_KINDS:
        if kind.default and kind.layout.fits(ndim) and kind.applies(module, attr):
            return kind.rule, kind.layout
    return None


def matrix_layout(module: nn.Module, attr: str, ndim: int) -> Layout | None:
    """The layout of ``module.<attr>`` if the matrix rule merges it as a matrix, else None."""
    found = _matrix_rule(module, attr, ndim)
    return None if found is None else found[1]


def merged_layer_for(module: nn.Module) -> type[MergedLayer] | None:
    """The merged layer class that replaces ``module`` when its weight is a matrix in that layer's layout, else None.

    A subclass that overrides ``forward`` (timm's ``StdConv2d``, ``Conv2dSame``) is not replaced: its
    own forward runs, reading the merged weight as a computed attribute.
    """
    for kind in MATRIX_KINDS:
        layer = kind.layer
        if layer is not None and kind.applies(module, "weight") and type(module).forward is layer.replaces.forward:
            return layer
    return None


def method_layout(entry: Entry, matrix_set: str) -> Layout | None:
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
            return Layout.OUT_IN
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
    custom = {pattern: parse_layout(layout, f"matrices[{pattern!r}]") for pattern, layout in (matrices or {}).items()}
    modules = dict(model.named_modules(remove_duplicate=False))
    entries: dict[int, Entry] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        module_name, _, attr = name.rpartition(".")
        module = modules[module_name]
        entry = entries.get(id(param))
        if entry is None:
            rule, layout = _matrix_rule(module, attr, param.dim()) or (None, None)
            for pattern, named in custom.items():
                if named.fits(param.dim()) and fnmatch.fnmatchcase(name, pattern):
                    rule, layout = "pattern", named
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
