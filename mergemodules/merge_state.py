"""The merge state: all a merged model needs (B, factors, λ, ℓ, buffers, the method and its fitted transform)
to rebuild it on its architecture without the checkpoints, as one safetensors file written atomically.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from .build import persistent_buffers
from .files import atomic_write
from .layers import MergedTensor, MergedWeight, BaseMerged
from .layouts import Layout
from .methods import METHODS, Method, Transform
from .surgery import MergedModel, install
from .targets import plan
from .transform_state import UnknownTransformError, decode_transform, encode_transform

__all__ = ["save_merge_state", "load_merge_state", "FORMAT", "VERSION"]

FORMAT = "mergemodules.merge_state"
VERSION = 3  # 2: buffers are stored; 3: the method's transform and the fitted transform are stored
READABLE_VERSIONS = (1, 2, 3)
_SEP = "::"
_TRANSFORM_ROLES = ("method", "fitted")  # Method.transform as given, and MergedModel.transform (after fit)


def _module_tensors(merged: BaseMerged) -> dict[str, Tensor]:
    tensors = dict(merged.named_buffers(recurse=False))
    if getattr(merged, "mask_logits", None) is not None:
        tensors["mask_logits"] = merged.mask_logits.detach()
    return tensors


def _encode_transforms(merged: MergedModel, tensors: dict[str, Tensor]) -> dict[str, object]:
    """The method's transform and the fitted one as JSON, their tensors added to ``tensors`` as ``::transform::ROLE::i``
    (no parameter name starts with ``::``).

    One that cannot be stored (a user transform that is no dataclass of storable fields) is None, with a warning.
    """
    encoded: dict[str, object] = {}
    lost = []
    for role, transform in zip(_TRANSFORM_ROLES, (merged.method.transform, merged.transform)):
        own: dict[str, Tensor] = {}
        prefix = f"{_SEP}transform{_SEP}{role}{_SEP}"
        try:
            encoded[role] = None if transform is None else encode_transform(transform, own, prefix)
        except TypeError as err:
            encoded[role] = None
            lost.append(f"{role}: {err}")
        tensors.update(own)
    if lost:
        warnings.warn(f"save_merge_state: transform not stored ({'; '.join(lost)}); a reload reports the identity",
                      stacklevel=3)
    return encoded


def save_merge_state(merged: MergedModel, path: str | os.PathLike) -> Path:
    """Save all a merged model needs (B, Δ or U/σ/V, λ, ℓ, buffers) to rebuild it without the checkpoints,
    and the method with its fitted transform (TIES's thresholds, AWD's δ, ...) so that a reload reports them."""
    if not isinstance(merged, MergedModel):
        raise TypeError(f"merged must be a MergedModel, got {type(merged).__name__}")
    groups: dict[int, str] = {}
    tensors: dict[str, Tensor] = {}
    layout: dict[str, dict] = {}
    for name, module in merged.merged_tensors().items():
        info: dict = {"kind": "weight" if isinstance(module, MergedWeight) else "tensor"}
        if isinstance(module, MergedWeight):
            info.update(layout=module.layout.value, shape=list(module.parameter_shape), temperature=module.temperature)
        if module.coef is not None:
            group = groups.setdefault(id(module.coef), f"coef{len(groups)}")
            tensors[f"{group}{_SEP}coef"] = module.coef.detach()
            info["coef"] = group
            if module.coef_range is not None:
                info["coef_range"] = list(module.coef_range)
        for key, tensor in _module_tensors(module).items():
            tensors[f"{name}{_SEP}{key}"] = tensor.detach().contiguous()
        layout[name] = info
    buffers = persistent_buffers(merged.model)
    tensors.update({f"{name}{_SEP}buffer": tensor.detach().clone() for name, tensor in buffers.items()})
    method = {f.name: getattr(merged.method, f.name) for f in dataclasses.fields(Method) if f.name != "transform"}
    header = {
        "format": FORMAT, "version": VERSION, "num_tasks": merged.num_tasks, "method": method, "tensors": layout,
        "buffers": list(buffers), "transform": _encode_transforms(merged, tensors),
    }
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={FORMAT: json.dumps(header)}))


def _read_merge_state(path: str | os.PathLike) -> tuple[dict, dict[str, Tensor]]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"merge state {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            # copies in fresh (64-byte aligned) memory, not views into the mapped file at whatever offset the header
            # leaves: BLAS rounds unaligned data differently, and the rebuilt model must equal the saved one bit for bit
            tensors = {k: f.get_tensor(k).clone() for k in f.keys()}
    except Exception as err:  # safetensors raises its own error types for corrupt files
        raise ValueError(f"{str(path)!r} is not a readable safetensors file: {err}") from err
    if FORMAT not in metadata:
        raise ValueError(f"{str(path)!r} is not a mergemodules merge state (no {FORMAT!r} metadata)")
    try:
        header = json.loads(metadata[FORMAT])
    except ValueError as err:
        raise _metadata_error(path, FORMAT, f"not JSON ({err})") from None
    _check_header(path, header, tensors)
    return header, tensors


def _metadata_error(path: Path, key: str, problem: str) -> ValueError:
    return ValueError(f"{str(path)!r}: merge-state metadata {key}: {problem}")


def _check_header(path: Path, header: object, tensors: dict[str, Tensor]) -> None:
    """Check the types and references of the merge-state metadata, naming the file and the key at fault."""
    if not isinstance(header, dict):
        raise _metadata_error(path, FORMAT, f"expected a JSON object, got {type(header).__name__}")
    if header.get("version") not in READABLE_VERSIONS:
        raise ValueError(f"{str(path)!r} has merge-state version {header.get('version')!r}, "
                         f"this library reads {list(READABLE_VERSIONS)}")
    num_tasks = header.get("num_tasks")
    if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
        raise _metadata_error(path, "'num_tasks'", f"expected a positive integer, got {num_tasks!r}")
    if not isinstance(header.get("method"), dict):
        raise _metadata_error(path, "'method'", f"expected an object of method fields, got {header.get('method')!r}")
    if not isinstance(header.get("tensors"), dict):
        raise _metadata_error(path, "'tensors'", "expected an object: parameter name → how it is stored")
    for name, info in header["tensors"].items():
        key = f"'tensors'[{name!r}]"
        if not isinstance(info, dict) or info.get("kind") not in ("weight", "tensor"):
            raise _metadata_error(path, key, f"expected {{'kind': 'weight' | 'tensor', ...}}, got {info!r}")
        if f"{name}{_SEP}base" not in tensors:
            raise _metadata_error(path, key, f"the file holds no tensor {name}{_SEP}base")
        if info["kind"] == "weight" and info.get("layout") not in [x.value for x in Layout]:
            raise _metadata_error(path, f"{key}['layout']", f"expected one of {[str(x) for x in Layout]}, "
                                                              f"got {info.get('layout')!r}")
        shape = info.get("shape")
        if shape is not None and not (isinstance(shape, list) and all(type(n) is int and n > 0 for n in shape)):
            raise _metadata_error(path, f"{key}['shape']", f"expected a list of positive integers, got {shape!r}")
        if info["kind"] == "weight" and not isinstance(info.get("temperature"), (int, float)):
            raise _metadata_error(path, f"{key}['temperature']", f"expected a number, got {info.get('temperature')!r}")
        if "coef" in info and f"{info['coef']}{_SEP}coef" not in tensors:
            raise _metadata_error(path, f"{key}['coef']", f"the file holds no tensor {info['coef']}{_SEP}coef")
    buffers = header.get("buffers", [])
    if not isinstance(buffers, list) or not all(isinstance(b, str) and f"{b}{_SEP}buffer" in tensors for b in buffers):
        raise _metadata_error(path, "'buffers'", f"expected the names of the buffers the file holds, got {buffers!r}")
    transforms = header.get("transform")
    if header["version"] >= 3 and (not isinstance(transforms, dict) or set(transforms) != set(_TRANSFORM_ROLES)):
        raise _metadata_error(path, "'transform'", f"expected {{'method': ..., 'fitted': ...}}, got {transforms!r:.80}")


def _rebuild(name: str, info: dict, tensors: dict[str, Tensor], coefs: dict[str, nn.Parameter]) -> BaseMerged:
    own = {k.split(_SEP, 1)[1]: v for k, v in tensors.items() if k.startswith(name + _SEP)}
    coef = coefs[info["coef"]] if "coef" in info else None
    coef_range = info.get("coef_range")  # files written before λ could be clamped: none
    if info["kind"] == "tensor":
        return MergedTensor(own["base"], own.get("deltas"), coef, coef_range)
    base = Layout(info["layout"]).from_matrix(own["base"], info.get("shape"))  # older files: 2-D layouts, no shape
    logits = own.get("mask_logits")
    return MergedWeight(
        base, U=own.get("U"), S=own.get("S"), V=own.get("V"), deltas=own.get("deltas"), coef=coef,
        mask_logits=None if logits is None else nn.Parameter(logits), temperature=info["temperature"],
        layout=info["layout"], coef_range=coef_range,
    )


def _load_buffers(path: str | os.PathLike, header: dict, tensors: dict[str, Tensor], model: nn.Module) -> None:
    """Copy the stored buffers (BatchNorm statistics, ...) into ``model``, which must have exactly these."""
    own = persistent_buffers(model)
    if header["version"] < 2:
        if own:
            warnings.warn(f"{str(path)!r} predates stored buffers (version {header['version']}): the model's own "
                          f"values of {sorted(own)[:5]} are used", stacklevel=3)
        return
    saved = set(header["buffers"])
    if saved != set(own):
        missing, extra = sorted(set(own) - saved), sorted(saved - set(own))
        raise KeyError(f"{str(path)!r} does not match the model's buffers: missing {missing[:5]}, "
                       f"unexpected {extra[:5]}")
    with torch.no_grad():
        for name, buffer in own.items():
            value = tensors[f"{name}{_SEP}buffer"]
            if value.shape != buffer.shape:
                raise ValueError(f"{str(path)!r}: buffer {name!r} has shape {tuple(value.shape)}, "
                                 f"the model {tuple(buffer.shape)}")
            buffer.copy_(value)


def _decode_transforms(path: Path, header: dict, tensors: dict[str, Tensor]) -> tuple[Transform, Transform | None]:
    """The method's transform and the fitted one. What cannot be restored (a state older than version 3 of a
    method with a transform, a class not loaded here, a transform not stored) is (identity, None), with a warning."""
    name = header["method"].get("name")
    if header["version"] < 3:
        registered = METHODS.get(name) if isinstance(name, str) else None
        if registered is None or type(registered.transform) is not Transform:
            warnings.warn(f"{str(path)!r} predates stored transforms (version {header['version']}): method {name!r} "
                          "is reported with the identity transform (its stored tensors are exact)", stacklevel=3)
        return Transform(), None
    stored = header["transform"]
    try:
        method, fitted = (None if stored[r] is None else decode_transform(stored[r], tensors) for r in _TRANSFORM_ROLES)
    except ValueError as err:
        raise _metadata_error(path, "'transform'", str(err)) from None
    except UnknownTransformError as err:
        method, fitted, problem = None, None, str(err)
    else:
        problem = "it was not stored"
    if method is None:
        warnings.warn(f"{str(path)!r}: the transform of method {name!r} cannot be restored ({problem}): it is "
                      "reported as the identity (the stored tensors are exact)", stacklevel=3)
        return Transform(), None
    return method, fitted


def load_merge_state(model: nn.Module, path: str | os.PathLike) -> MergedModel:
    """Rebuild a :class:`MergedModel` on ``model``'s architecture from a merge state: its tensors and buffers, its
    ``method`` and fitted ``transform`` (the identity, with a warning, where these cannot be restored).

    Tampered or inconsistent files are a ValueError (or KeyError for a mismatched architecture) naming the file and key.
    """
    header, tensors = _read_merge_state(path)
    entries = plan(model)
    saved, expected = set(header["tensors"]), {e.name for e in entries}
    if saved != expected:
        missing, extra = sorted(expected - saved), sorted(saved - expected)
        raise KeyError(f"{str(path)!r} does not match the model: missing {missing[:5]}, unexpected {extra[:5]}")
    coefs = {k.split(_SEP)[0]: nn.Parameter(v) for k, v in tensors.items() if k.endswith(f"{_SEP}coef")}
    merged = {}
    for entry in entries:
        try:
            module = _rebuild(entry.name, header["tensors"][entry.name], tensors, coefs)
        except (ValueError, TypeError) as err:
            raise ValueError(f"{str(path)!r}: tensor {entry.name!r}: {err}") from err
        if module.parameter_shape != entry.shape:
            raise ValueError(f"{str(path)!r}: tensor {entry.name!r} has shape {module.parameter_shape}, the model {entry.shape}")
        entry.layout = getattr(module, "layout", None)
        merged[entry.name] = module
    transform, fitted = _decode_transforms(Path(path), header, tensors)
    try:
        # states written before the svd and matrix_set options were built with these (issue #11)
        method = Method(**{"svd": "auto", "matrix_set": "rule", **header["method"], "transform": transform})
    except (ValueError, TypeError) as err:
        raise _metadata_error(Path(path), "'method'", str(err)) from err
    params = {id(p): p for p in model.parameters()}
    shell = copy.deepcopy(model, memo=dict(params))
    _load_buffers(path, header, tensors, shell)
    return MergedModel(install(shell, entries, merged), method, header["num_tasks"], merged, fitted)
