"""A method's transform (TIES's thresholds, AWD's δ, ...) as JSON plus tensors, and back, for the merge state.

A transform is stored as its class (``module:qualname``) and its dataclass fields, each a JSON value
or a tagged container: ``{"tensor": key}`` (the tensor is saved beside the merge state under
``key``), ``{"tuple": [...]}``, ``{"list": [...]}``, ``{"dict": {...}}`` or a nested
``{"transform": {"class": ..., "fields": {...}}}``. Loading only instantiates classes already
imported that derive from :class:`~mergemodules.methods.Transform`: nothing is imported or run
because a file names it.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from torch import Tensor

from .methods import Transform

__all__ = ["encode_transform", "decode_transform", "UnknownTransformError"]

_TAGS = ("tensor", "tuple", "list", "dict", "transform")


class UnknownTransformError(LookupError):
    """A stored transform whose class is not loaded in this process (e.g. a user transform not imported yet)."""


def _class_name(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def encode_transform(transform: Transform, tensors: dict[str, Tensor], prefix: str) -> dict[str, Any]:
    """JSON for ``transform``; its tensors are added to ``tensors`` under ``prefix`` + a number.

    A transform that is neither the identity nor a dataclass of storable fields (numbers, strings,
    tensors, transforms, and tuples, lists and str-keyed dicts of them) is a TypeError naming the field.
    """
    return _encode(transform, type(transform).__name__, tensors, prefix)


def _encode(value: Any, where: str, tensors: dict[str, Tensor], prefix: str) -> Any:
    if isinstance(value, Transform):
        if type(value) is not Transform and not dataclasses.is_dataclass(value):
            raise TypeError(f"{where}: transform {type(value).__qualname__} is not a dataclass, its state is unknown")
        fields = dataclasses.fields(value) if dataclasses.is_dataclass(value) else ()
        encoded = {f.name: _encode(getattr(value, f.name), f"{where}.{f.name}", tensors, prefix) for f in fields}
        return {"transform": {"class": _class_name(type(value)), "fields": encoded}}
    if isinstance(value, Tensor):
        key = f"{prefix}{len(tensors)}"
        shared = any(t.untyped_storage().data_ptr() == value.untyped_storage().data_ptr() for t in tensors.values())
        tensors[key] = value.detach().clone() if shared else value.detach().contiguous()  # safetensors refuses sharing
        return {"tensor": key}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (tuple, list)):
        items = [_encode(v, f"{where}[{i}]", tensors, prefix) for i, v in enumerate(value)]
        return {"tuple" if isinstance(value, tuple) else "list": items}
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {"dict": {k: _encode(v, f"{where}[{k!r}]", tensors, prefix) for k, v in value.items()}}
    raise TypeError(f"{where}: a {type(value).__name__} cannot be stored in a merge state")


def _transform_classes() -> dict[str, type]:
    """``module:qualname`` → class, for Transform and every subclass loaded in this process."""
    found, stack = {}, [Transform]
    while stack:
        cls = stack.pop()
        found[_class_name(cls)] = cls
        stack.extend(cls.__subclasses__())
    return found


def decode_transform(encoded: Any, tensors: Mapping[str, Tensor]) -> Transform:
    """The transform :func:`encode_transform` stored; ValueError for a malformed entry, UnknownTransformError
    for a class that is not loaded."""
    transform = _decode(encoded, tensors, _transform_classes(), "transform")
    if not isinstance(transform, Transform):
        raise ValueError(f"expected a stored transform, got {str(encoded)[:80]}")
    return transform


def _decode(value: Any, tensors: Mapping[str, Tensor], classes: Mapping[str, type], where: str) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if not isinstance(value, dict) or len(value) != 1 or next(iter(value)) not in _TAGS:
        tags = ", ".join(_TAGS)
        raise ValueError(f"{where}: expected a number, string or one of {{{tags}: ...}}, got {str(value)[:80]}")
    ((tag, inner),) = value.items()
    if tag == "tensor":
        if not isinstance(inner, str) or inner not in tensors:
            raise ValueError(f"{where}: the file holds no tensor {inner!r}")
        return tensors[inner]
    if tag in ("tuple", "list"):
        if not isinstance(inner, list):
            raise ValueError(f"{where}: expected a list of values, got {str(inner)[:80]}")
        items = [_decode(v, tensors, classes, f"{where}[{i}]") for i, v in enumerate(inner)]
        return tuple(items) if tag == "tuple" else items
    if tag == "dict":
        if not isinstance(inner, dict):
            raise ValueError(f"{where}: expected an object, got {str(inner)[:80]}")
        return {k: _decode(v, tensors, classes, f"{where}[{k!r}]") for k, v in inner.items()}
    if not isinstance(inner, dict) or set(inner) != {"class", "fields"} or not isinstance(inner["fields"], dict):
        raise ValueError(f"{where}: expected {{'class': ..., 'fields': {{...}}}}, got {str(inner)[:80]}")
    cls = classes.get(inner["class"])
    if cls is None:
        raise UnknownTransformError(f"transform class {inner['class']!r} is not loaded (import its module first)")
    fields = {k: _decode(v, tensors, classes, f"{where}.{k}") for k, v in inner["fields"].items()}
    try:
        return cls(**fields)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: {cls.__qualname__}({', '.join(fields)}): {err}") from None
