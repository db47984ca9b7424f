"""Model surgery: turn any model into a merged model, and fuse it back into a plain one.

Every ``nn.Linear`` becomes a :class:`MergedLinear` (and every ``nn.Conv2d`` whose kernel is merged as a
matrix a :class:`MergedConv2d`: ``targets.merged_layer_for``). Every other parameter (attention
in-projections, ``Conv1D`` weights, projections, biases, norms, embeddings) is replaced by a
computed attribute, as ``torch.nn.utils.parametrize`` does: the module's class is swapped for a
per-instance subclass with a property that evaluates the merged tensor, so code reading
``module.in_proj_weight`` directly gets an ordinary tensor. ``fuse`` undoes both. Such a module
pickles (``torch.save``, ``copy.deepcopy``) as its original class plus the names of its merged
attributes, and unpickles to a new per-instance subclass.
"""
from __future__ import annotations

from copy import deepcopy
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from .build import fit_transform, iter_merged_tensors, merge_buffers, persistent_buffers, prepare
from .layers import MergedLayer, MergedWeight, BaseMerged, check_finite, weight_cache
from .methods import Method, Transform
from .targets import Entry, Patterns, merged_layer_for

__all__ = ["MergedModel", "merge", "install"]

_ORIGINAL_CLASS = "_mergemodules_original_class"


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    root.get_submodule(parent_name).add_module(child, module)


def _merged_property(attr: str) -> property:
    return property(lambda self: self.merged_tensors[attr](), doc=f"merged {attr}")


def _swap_class(module: nn.Module) -> None:
    """Give ``module`` a per-instance subclass of its class, to hold the properties of its merged attributes."""
    original = type(module)
    namespace = {_ORIGINAL_CLASS: original, "__reduce_ex__": _reduce_swapped}
    module.__class__ = type(original.__name__, (original,), namespace)


def _reduce_swapped(module: nn.Module, protocol: int) -> tuple:
    """Pickle a module with merged attributes as (its original class, the attribute names) and its state."""
    original = type(module).__dict__[_ORIGINAL_CLASS]
    return _unpickle_swapped, (original, tuple(module.merged_tensors)), module.__getstate__()


def _unpickle_swapped(original: type, attrs: Sequence[str]) -> nn.Module:
    """An empty module of a new per-instance subclass of ``original``; pickle then restores its state."""
    module = original.__new__(original)
    _swap_class(module)
    for attr in attrs:
        setattr(type(module), attr, _merged_property(attr))
    return module


def _attach(module: nn.Module, attr: str, merged: BaseMerged) -> None:
    """Replace ``module.<attr>`` by a property computing ``merged()``."""
    module._parameters.pop(attr, None)
    if _ORIGINAL_CLASS not in type(module).__dict__:
        _swap_class(module)
        module.add_module("merged_tensors", nn.ModuleDict())
    module.merged_tensors[attr] = merged
    setattr(type(module), attr, _merged_property(attr))


def _layer_replacement(model: nn.Module, module_name: str, entries: Mapping[str, Entry], merged: Mapping[str, BaseMerged]) -> MergedLayer | None:
    """A merged layer (MergedLinear, MergedConv2d) for a module whose untied weight is a matrix in its layout, else None."""
    module = model.get_submodule(module_name)
    layer = merged_layer_for(module)
    if layer is None:
        return None
    prefix = f"{module_name}." if module_name else ""
    weight, bias = entries.get(prefix + "weight"), entries.get(prefix + "bias")
    if weight is None or weight.aliases or weight.layout is not layer.layout or (bias is not None and bias.aliases):
        return None
    return layer(merged[weight.name], None if bias is None else merged[bias.name], original=module)


def install(model: nn.Module, entries: Sequence[Entry], merged: Mapping[str, BaseMerged]) -> nn.Module:
    """Put the merged tensors into ``model`` in place; returns the root (a MergedLayer if the root was a Linear or Conv2d)."""
    by_name = {e.name: e for e in entries}
    owner_modules = dict.fromkeys(owner for e in entries for owner, _ in e.owners)
    replaced = set()
    for module_name in owner_modules:
        replacement = _layer_replacement(model, module_name, by_name, merged)
        if replacement is None:
            continue
        replaced.add(module_name)
        if module_name == "":
            model = replacement
        else:
            _set_submodule(model, module_name, replacement)
    for entry in entries:
        for module_name, attr in entry.owners:
            if module_name not in replaced:
                _attach(model.get_submodule(module_name), attr, merged[entry.name])
    return model


class MergedModel(nn.Module):
    """A model whose parameters are merged tensors; forward and attributes behave like the original.

    ``parameters()`` are exactly the learnables (λ and the mask logits ℓ); ``fuse()`` returns a
    plain model of the original class and state-dict keys with the current merged values.
    ``transform`` is the method's fitted transform (AWD's δ and diagnostics, TIES's thresholds), if known.
    """

    def __init__(
        self, model: nn.Module, method: Method, num_tasks: int, merged: Mapping[str, BaseMerged],
        transform: Transform | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.method = method
        self.num_tasks = num_tasks
        self.transform = transform
        self.__dict__["_merged"] = dict(merged)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The original model's forward, evaluating each merged tensor once."""
        with weight_cache():
            return self.model(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    def merged_tensors(self) -> dict[str, BaseMerged]:
        """Parameter name → its merged tensor module (tied parameters under their first name)."""
        return dict(self._merged)

    def merged_weights(self) -> dict[str, MergedWeight]:
        """The tensors merged as matrices."""
        return {n: m for n, m in self._merged.items() if isinstance(m, MergedWeight)}

    @torch.no_grad()
    def fuse(self) -> nn.Module:
        """A plain model of the original class holding the merged weights (hard masks, current λ).

        Every module keeps its train/eval mode; a fused tensor with NaN or Inf (e.g. a float16
        weight that overflowed) is a ValueError naming it.
        """
        with weight_cache():
            values = {
                id(m): nn.Parameter(check_finite(m().detach().contiguous().clone(), f"the fused tensor {name!r}"))
                for name, m in self._merged.items()
            }
        memo: dict[int, Any] = {id(m): None for m in self.model.modules() if isinstance(m, (BaseMerged, MergedLayer))}
        plain = deepcopy(self.model, memo)
        for name, module in list(self.model.named_modules()):
            if isinstance(module, MergedLayer):
                bias = None if module.merged_bias is None else values[id(module.merged_bias)]
                fused = module.fuse_with(values[id(module.merged_weight)], bias)
                if name == "":
                    return fused
                _set_submodule(plain, name, fused)
            elif _ORIGINAL_CLASS in type(module).__dict__:
                target = plain.get_submodule(name)
                target.__class__ = type(module).__dict__[_ORIGINAL_CLASS]
                del target._modules["merged_tensors"]
                for attr, merged in module.merged_tensors.items():
                    target.register_parameter(attr, values[id(merged)])
        return plain

    def extra_repr(self) -> str:
        weights = self.merged_weights()
        return f"method={self.method.name}, tasks={self.num_tasks}, matrices={len(weights)}, tensors={len(self._merged)}"


def merge(
    pretrained: nn.Module,
    finetuned: Sequence[nn.Module | Mapping[str, Tensor]],
    method: str | Method = "task_arithmetic",
    *,
    targets: Patterns = None,
    exclude: Patterns = None,
    matrices: Mapping[str, str] | None = None,
    progress: bool = False,
    copy: bool = True,
    **options: Any,
) -> MergedModel:
    """Merge fine-tuned versions of ``pretrained`` into one differentiable :class:`MergedModel`.

    Args:
        pretrained: the pretrained model θ₀ (not modified).
        finetuned: T fine-tuned models or state dicts of the same architecture.
        method: a registered name (``"weight_averaging"``, ``"task_arithmetic"``, ``"ties"``,
            ``"tsv"``, ``"cart"``, ``"task_vector_svd"``, ``"adamerging_taskwise"``,
            ``"adamerging_layerwise"``, ``"cart_pp"``, ``"adarank_ta"``, ``"adarank_cart"``, ...)
            or a :class:`Method`.
        targets: which parameters are merged (regex string, or list of globs / module-name
            suffixes as PEFT's ``target_modules``); default all. The rest keep pretrained values.
        exclude: parameters kept at their pretrained value (e.g. ``["head"]``), same syntax.
        matrices: extra parameters to merge as matrices, ``{glob: "out_in" | "in_out" | "out_in_kernel"}``
            (the last for convolution kernels, e.g. ``{"*": "out_in_kernel"}``; README, "Which tensors ...").
        progress: show a progress bar.
        copy: the merged model owns its tensors (True, default: a pretrained tensor it keeps as is —
            B of a θ₀-based method, an excluded tensor — is copied once). With False these share
            storage with ``pretrained``'s parameters (no extra memory), so writing to one changes the
            other: ``merged.load_state_dict`` or an in-place edit of the merged model overwrites
            ``pretrained``, and editing ``pretrained`` later changes the merged model.
        **options: method options, e.g. ``rank`` (fraction of min(out, in) or int), ``scaling`` (λ),
            ``density`` and ``scope`` (TIES), ``mask_rank``, ``temperature``, ``matrix_set``, and the SVD
            solver ``svd`` (``"exact"``, the default; ``"randomized"`` or ``"auto"``) with ``svd_options``
            (e.g. ``{"oversample": 20, "power_iters": 6}``); see docs/methods.md.
    """
    setup = prepare(pretrained, finetuned, method, targets=targets, exclude=exclude, matrices=matrices, **options)
    method, sources, entries = setup.method, setup.sources, setup.entries
    params = dict(pretrained.named_parameters(remove_duplicate=False))
    buffers = merge_buffers(persistent_buffers(pretrained), sources, setup.selected)
    transform = fit_transform(entries, params, sources, method)
    merged = {e.name: module for e, module in iter_merged_tensors(entries, params, sources, method, progress, transform)}
    if copy:
        _own_bases(merged.values(), params.values())
    model = deepcopy(pretrained, memo={id(p): p for p in params.values()})  # buffers are copied
    with torch.no_grad():
        for name, value in buffers.items():
            model.get_buffer(name).copy_(value)
    return MergedModel(install(model, entries, merged), method, len(sources), merged, transform)


def _own_bases(merged: Iterable[BaseMerged], pretrained: Iterable[Tensor]) -> None:
    """Copy every base that shares storage with a pretrained tensor, so the merged model owns it."""
    shared = {p.untyped_storage().data_ptr() for p in pretrained}
    for module in merged:
        if module.base.untyped_storage().data_ptr() in shared:
            module.base = module.base.clone()
