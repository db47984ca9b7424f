"""Model sources and checkpoint files: build an architecture, read weights lazily, write them streaming.

Architectures come from a timm or open_clip model name (built with pretrained weights off), a
local Hugging Face folder, or a Python callable ``module:function`` / ``file.py:function``.
Checkpoints are safetensors files (read lazily through a memory map, one tensor per lookup),
PyTorch files (``torch.load(weights_only=True)``, memory-mapped) or Hugging Face folders.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import logging
import math
import os
import pickle
import re
import shutil
import struct
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from .files import new_temp, remove_stale_temps
from .io import atomic_write

__all__ = [
    "MODEL_KINDS", "build_model", "load_callable", "SafetensorsCheckpoint", "open_checkpoint",
    "shapes_of", "hf_weight_files", "write_safetensors", "write_hf_folder", "WEIGHT_SUFFIXES",
    "compute_dtype_of", "output_dtypes", "cast_tensors_", "check_floating_dtype", "declare_dtype",
    "write_safetensors_shards", "plan_shards", "parse_size", "DEFAULT_MAX_SHARD_SIZE",
]

logger = logging.getLogger(__name__)

MODEL_KINDS = ("timm", "open_clip", "hf", "callable")

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    **{name: getattr(torch, attr) for name, attr in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"))
       if hasattr(torch, attr)},
}
_DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
MAX_HEADER_BYTES = 100_000_000  # the limit of the safetensors library itself
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".ckpt", ".index.json")


# ------------------------------------------------------------------------------------ architectures


def load_callable(spec: str, base_dir: str | os.PathLike | None = None) -> Callable[..., Any]:
    """The function named by ``"package.module:function"`` or ``"path/to/file.py:function"``."""
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"callable {spec!r}: expected 'module:function' or 'file.py:function'")
    if module_name.endswith(".py"):
        path = Path(base_dir or ".") / module_name
        if not path.is_file():
            raise FileNotFoundError(f"callable {spec!r}: file {str(path)!r} does not exist")
        module_spec = importlib.util.spec_from_file_location(f"_mergemodules_user_{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_spec.name] = module
        module_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            raise ImportError(f"callable {spec!r}: cannot import {module_name!r}: {err}") from err
    function = getattr(module, attr, None)
    if not callable(function):
        raise AttributeError(f"callable {spec!r}: {module_name!r} has no function {attr!r}")
    return function


def _hf_class(folder: Path) -> tuple[Any, Any]:
    import transformers

    config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    names = getattr(config, "architectures", None) or []
    cls = getattr(transformers, names[0], None) if names else None
    return config, cls if cls is not None else transformers.AutoModel


def _build(kind: str, name: str, kwargs: Mapping[str, Any], meta: bool, base_dir: Path | None) -> nn.Module:
    if kind == "timm":
        import timm

        if not timm.is_model(name):
            raise ValueError(f"timm has no model called {name!r}")
        return timm.create_model(name, pretrained=False, **kwargs)
    if kind == "open_clip":
        import open_clip

        if name not in open_clip.list_models():
            raise ValueError(f"open_clip has no model called {name!r}")
        return open_clip.create_model(name, pretrained=None, device="meta" if meta else "cpu", **kwargs)
    if kind == "hf":
        folder = Path(base_dir or ".") / name
        config, cls = _hf_class(folder)
        if meta:  # shapes only: the weights are read from the folder's files
            return cls.from_config(config) if cls.__name__.startswith("Auto") else cls(config)
        return cls.from_pretrained(folder, local_files_only=True, **kwargs)
    if kind == "callable":
        return load_callable(name, base_dir)(**kwargs)
    raise ValueError(f"model kind {kind!r}: expected one of {MODEL_KINDS}")


def build_model(
    kind: str,
    name: str,
    kwargs: Mapping[str, Any] | None = None,
    *,
    submodule: str | None = None,
    meta: bool = False,
    base_dir: str | os.PathLike | None = None,
) -> nn.Module:
    """Build an architecture without downloading anything.

    ``kind`` is ``"timm"``/``"open_clip"`` (random init, pretrained weights off), ``"hf"`` (a local
    folder: ``from_pretrained``, so it holds the folder's weights) or ``"callable"``
    (``module:function`` called with ``kwargs``). ``meta=True`` builds on the meta device (shapes
    only, no memory); ``submodule`` picks a part, e.g. ``"visual"`` of an open_clip model.
    """
    kwargs = dict(kwargs or {})
    base_dir = Path(base_dir) if base_dir is not None else None
    if meta:
        with torch.device("meta"):
            try:
                model = _build(kind, name, kwargs, True, base_dir)
            except (NotImplementedError, RuntimeError) as err:
                if kind != "callable":
                    raise
                logger.debug("building %s on the meta device failed (%s); building it for real", name, err)
                model = None
        if model is None:
            model = _build(kind, name, kwargs, False, base_dir)
    else:
        model = _build(kind, name, kwargs, False, base_dir)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model {name!r} ({kind}) built a {type(model).__name__}, not an nn.Module")
    if submodule:
        try:
            model = model.get_submodule(submodule)
        except AttributeError:
            raise AttributeError(f"model {name!r} has no submodule {submodule!r}") from None
    return model


# -------------------------------------------------------------------------------------- checkpoints


class SafetensorsCheckpoint(Mapping[str, Tensor]):
    """One or more safetensors files as a lazy name → tensor mapping (one tensor read per lookup).

    Files are memory-mapped; nothing is read until a tensor is looked up, and its pages stay
    resident only while the returned tensor lives. Floating tensors are
    cast to ``dtype`` when given; every tensor is moved to ``device``.
    """

    def __init__(
        self,
        paths: str | os.PathLike | Iterable[str | os.PathLike],
        dtype: torch.dtype | None = None,
        device: str = "cpu",
    ) -> None:
        paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
        self.paths = [Path(p) for p in paths]
        self.dtype, self.device = dtype, device
        self._files: dict[str, Path] = {}
        self._header: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        for path in self.paths:
            for key, (shape, dtype_) in read_safetensors_header(path).items():
                if key in self._files:
                    raise ValueError(f"{str(path)!r}: tensor {key!r} also appears in {str(self._files[key])!r}")
                self._files[key] = path
                self._header[key] = (shape, dtype_)

    def __getitem__(self, key: str) -> Tensor:
        # A fresh mapping per lookup: the tensor is a view of the file's pages, which leave the
        # process's resident memory when the tensor is freed (a long-lived handle would keep every
        # page ever read resident, T model sizes of RSS by the end of a merge).
        try:
            with safe_open(str(self._files[key]), framework="pt", device="cpu") as f:
                tensor = f.get_tensor(key)
        except SafetensorError as err:  # e.g. the file changed since its header was checked
            raise ValueError(f"{str(self._files[key])!r}: cannot read tensor {key!r}: {err}") from None
        return _convert(tensor, self.dtype, self.device)

    def __iter__(self) -> Iterator[str]:
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)

    def __contains__(self, key: object) -> bool:
        return key in self._files

    def meta(self) -> dict[str, Tensor]:
        """The same mapping with meta tensors of the stored shapes and (converted) dtypes, read from the headers."""
        return {
            key: torch.empty(shape, dtype=_target_dtype(dtype, self.dtype), device="meta")
            for key, (shape, dtype) in self._header.items()
        }


def read_safetensors_header(path: str | os.PathLike) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name → (shape, dtype) of every tensor in a safetensors file, from its header alone, fully validated.

    The header must be a JSON object of entries ``{"dtype", "shape", "data_offsets"}`` with a known
    dtype, a shape of non-negative ints and offsets that match shape × item size and tile the data
    section exactly (so a truncated or padded file is refused). Any problem is a ValueError naming
    the file (and the tensor).
    """
    path = Path(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise ValueError(f"{size} bytes: too short for a safetensors header")
            (length,) = struct.unpack("<Q", prefix)
            if not 2 <= length <= min(size - 8, MAX_HEADER_BYTES):
                raise ValueError(f"header length {length} does not fit a file of {size} bytes")
            text = f.read(length).decode("utf-8")
        header = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise ValueError(f"{str(path)!r} is not a safetensors file: its header is not valid JSON: {err}") from None
    except ValueError as err:
        raise ValueError(f"{str(path)!r} is not a safetensors file: {err}") from None
    if not isinstance(header, dict):
        raise ValueError(f"{str(path)!r} is not a safetensors file: its header is a JSON {type(header).__name__}, "
                         "not an object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError(f"{str(path)!r}: '__metadata__' must map names to strings")
    tensors = {key: _header_entry(path, key, info) for key, info in header.items()}
    _check_offsets(path, {key: offsets for key, (_, _, offsets) in tensors.items()}, size - 8 - length)
    return {key: (shape, dtype) for key, (shape, dtype, _) in tensors.items()}


def _header_entry(path: Path, key: str, info: Any) -> tuple[tuple[int, ...], torch.dtype, tuple[int, int]]:
    """(shape, dtype, data offsets) of one header entry, checked."""
    where = f"{str(path)!r}: tensor {key!r}"
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise ValueError(f"{where}: expected {{'dtype', 'shape', 'data_offsets'}}, got {str(info)[:80]}")
    dtype = SAFETENSORS_DTYPES.get(info["dtype"]) if isinstance(info["dtype"], str) else None
    if dtype is None:
        raise ValueError(f"{where}: unknown dtype {info['dtype']!r}; known: {sorted(SAFETENSORS_DTYPES)}")
    shape, offsets = info["shape"], info["data_offsets"]
    if not isinstance(shape, list) or not all(_is_count(n) for n in shape):
        raise ValueError(f"{where}: shape {shape!r} is not a list of non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(n) for n in offsets):
        raise ValueError(f"{where}: data_offsets {offsets!r} is not a pair of non-negative integers")
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if offsets[1] - offsets[0] != nbytes:
        raise ValueError(f"{where}: data_offsets {offsets} span {offsets[1] - offsets[0]} bytes, shape {shape} "
                         f"of {info['dtype']} needs {nbytes}")
    return tuple(shape), dtype, (offsets[0], offsets[1])


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_offsets(path: Path, offsets: Mapping[str, tuple[int, int]], data_size: int) -> None:
    """The tensors' byte ranges must tile the data section exactly: no gap, no overlap, nothing missing."""
    position, previous = 0, None
    for key, (begin, end) in sorted(offsets.items(), key=lambda item: item[1]):
        if begin != position:
            problem = f"overlaps tensor {previous!r}" if begin < position else f"leaves a gap at byte {position}"
            raise ValueError(f"{str(path)!r}: tensor {key!r} at data_offsets {[begin, end]} {problem}")
        position, previous = end, key
    if position != data_size:
        raise ValueError(f"{str(path)!r}: the header describes {position} bytes of tensor data, the file holds "
                         f"{data_size} (truncated or padded file)")


def _target_dtype(stored: torch.dtype, dtype: torch.dtype | None) -> torch.dtype:
    return dtype if dtype is not None and stored.is_floating_point else stored


def _convert(tensor: Tensor, dtype: torch.dtype | None, device: str | None) -> Tensor:
    return tensor.to(device=device, dtype=_target_dtype(tensor.dtype, dtype))


class _Converted(Mapping[str, Tensor]):
    """A mapping whose floating tensors are cast to ``dtype`` and moved to ``device`` (None: kept) on lookup."""

    def __init__(self, state: Mapping[str, Tensor], dtype: torch.dtype | None, device: str | None) -> None:
        self.state, self.dtype, self.device = state, dtype, device

    def __getitem__(self, key: str) -> Tensor:
        return _convert(self.state[key], self.dtype, self.device)

    def __iter__(self) -> Iterator[str]:
        return iter(self.state)

    def __len__(self) -> int:
        return len(self.state)

    def __contains__(self, key: object) -> bool:
        return key in self.state  # without reading the tensor (the state may be lazy)

    def meta(self) -> dict[str, Tensor]:
        """Meta tensors of the (converted) shapes and dtypes, read without the values when the state is lazy."""
        return {
            k: torch.empty(v.shape, dtype=_target_dtype(v.dtype, self.dtype), device="meta")
            for k, v in shapes_of(self.state).items()
        }


def _torch_load(path: Path, key: str | None) -> dict[str, Tensor]:
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "zip" not in str(err).lower():
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)  # legacy format: no mmap
    except pickle.UnpicklingError as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        first = next((line for line in lines if "global" in line.lower()), lines[0] if lines else type(err).__name__)
        raise ValueError(
            f"{str(path)!r}: refusing to load: it is not a plain tensor file that torch.load(weights_only=True) "
            f"accepts (unsafe pickle?): {first}"
        ) from None
    except (RuntimeError, EOFError, OSError) as err:
        raise ValueError(f"{str(path)!r} is not a readable PyTorch file: {err}") from err
    if key is not None:
        if not isinstance(state, Mapping) or key not in state:
            raise KeyError(f"{str(path)!r} has no entry {key!r}")
        state = state[key]
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        keys = list(state)[:5] if isinstance(state, Mapping) else type(state).__name__
        raise ValueError(
            f"{str(path)!r} does not hold a name → tensor state dict (found {keys}); "
            "name the entry that holds it with 'key:'"
        )
    return dict(state)


def hf_weight_files(folder: str | os.PathLike) -> list[Path]:
    """The weight files of a Hugging Face model folder (safetensors preferred, sharded or not)."""
    folder = Path(folder)
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = folder / index_name
        if index.is_file():
            return [folder / name for name in _index_files(index)]
        if (folder / single).is_file():
            return [folder / single]
    raise FileNotFoundError(f"{str(folder)!r} holds no model.safetensors or pytorch_model.bin (sharded or not)")


def _index_files(index: Path) -> list[str]:
    """The shard file names of a sharded checkpoint's index, each a plain file name in the index's folder."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        names = list(dict.fromkeys(weight_map.values()))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"{str(index)!r} is not a checkpoint index with a 'weight_map': {err!r}") from None
    for name in names:
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
            raise ValueError(f"{str(index)!r}: shard {name!r} is not a file name in the index's folder")
        if not (index.parent / name).is_file():
            raise FileNotFoundError(f"{str(index)!r}: shard {name!r} does not exist")
    return names


def open_checkpoint(
    path: str | os.PathLike, *, key: str | None = None, dtype: torch.dtype | None = None, device: str = "cpu"
) -> Mapping[str, Tensor]:
    """A checkpoint as a name → tensor mapping: a safetensors file (lazy), a PyTorch file or a Hugging Face folder.

    ``key`` names the entry of a PyTorch file that holds the state dict (e.g. ``"state_dict"``).
    Floating tensors are cast to ``dtype`` when given. Unsafe pickles are refused.
    """
    path = Path(path)
    if path.is_dir():
        files = hf_weight_files(path)
        if files[0].suffix == ".safetensors":
            return SafetensorsCheckpoint(files, dtype, device)
        state: dict[str, Tensor] = {}
        for file in files:
            state.update(_torch_load(file, None))
        return _Converted(state, dtype, device)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        if key is not None:
            raise ValueError(f"{str(path)!r}: 'key' applies to PyTorch files only")
        return SafetensorsCheckpoint(path, dtype, device)
    return _Converted(_torch_load(path, key), dtype, device)


def shapes_of(state: Mapping[str, Tensor]) -> Mapping[str, Tensor]:
    """A view of ``state`` whose tensors need not be read: meta tensors for lazy checkpoints."""
    meta = getattr(state, "meta", None)
    return meta() if callable(meta) else state


def compute_dtype_of(stored: Mapping[str, Tensor]) -> torch.dtype:
    """The default dtype to merge ``stored`` in: float32, or float64 when any floating tensor is float64."""
    return torch.float64 if any(t.dtype == torch.float64 for t in stored.values()) else torch.float32


def output_dtypes(stored: Mapping[str, Tensor], out_dtype: torch.dtype | None = None) -> dict[str, torch.dtype]:
    """Name → the dtype a tensor is written in: ``out_dtype`` for floating tensors when given, else its stored dtype."""
    return {key: _target_dtype(tensor.dtype, out_dtype) for key, tensor in stored.items()}


def cast_tensors_(module: nn.Module, dtypes: Mapping[str, torch.dtype]) -> nn.Module:
    """Cast, in place, each parameter and buffer of ``module`` named in ``dtypes`` (tied ones under any name)."""
    tensors = [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
    with torch.no_grad():
        for name, tensor in tensors:
            if name in dtypes and tensor.dtype != dtypes[name]:
                tensor.data = tensor.data.to(dtypes[name])
    return module


def check_floating_dtype(dtype: torch.dtype | None, name: str) -> None:
    """Refuse a ``dtype``/``out_dtype`` argument that is not a floating torch.dtype (None passes)."""
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"{name} must be a floating torch.dtype such as torch.bfloat16 or None, got {dtype!r}")


# ------------------------------------------------------------------------------------------ writing

DEFAULT_MAX_SHARD_SIZE = 5 * 10**9  # "5GB": mergekit's default and transformers 4's (transformers 5 uses 50GB)
SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
              "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
INDEX_NAME = "model.safetensors.index.json"


def parse_size(value: int | str) -> int:
    """Bytes of a size given as a positive int or a string such as ``"5GB"``, ``"500MB"``, ``"2GiB"``.

    Units as transformers' ``max_shard_size``: KB, MB, GB, TB are powers of 1000; KiB … TiB powers of 1024.
    """
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([kmgt]i?b|b)?\s*", value, re.IGNORECASE)
        if match is None:
            raise ValueError(f"{value!r}: expected a size such as '5GB', '500MB', '2GiB' or a number of bytes")
        size = int(float(match[1]) * SIZE_UNITS[(match[2] or "B").upper()])
    elif isinstance(value, int) and not isinstance(value, bool):
        size = value
    else:
        raise ValueError(f"{value!r}: expected a size such as '5GB', '500MB', '2GiB' or a number of bytes")
    if size <= 0:
        raise ValueError(f"{value!r}: expected a positive size")
    return size


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def plan_shards(layout: Mapping[str, tuple[tuple[int, ...], torch.dtype]], max_shard_size: int) -> list[list[str]]:
    """The names of each shard, in ``layout``'s order: a new shard starts when the next tensor would take the
    current one past ``max_shard_size`` bytes of tensor data (a larger tensor gets a shard of its own), as
    transformers' ``save_pretrained`` splits a state dict."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, (shape, dtype) in layout.items():
        nbytes = _nbytes(shape, dtype)
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


class _SafetensorsWriter:
    """One safetensors file being written: its header (from the layout) first, then each tensor at its offset."""

    def __init__(self, path: Path, file: Any, layout: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
                 metadata: Mapping[str, str] | None) -> None:
        self.path, self.file, self.layout = path, file, layout
        header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
        self.offsets, position = {}, 0
        for name, (shape, dtype) in layout.items():
            size = _nbytes(shape, dtype)
            header[name] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape),
                            "data_offsets": [position, position + size]}
            self.offsets[name] = position
            position += size
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        self.start = 8 + len(encoded)
        file.write(struct.pack("<Q", len(encoded)) + encoded)
        file.truncate(self.start + position)
        self.written: set[str] = set()

    def write(self, name: str, tensor: Tensor) -> None:
        """Write ``tensor`` at its place; it must be declared, new, and of its declared shape and dtype."""
        if name not in self.layout:
            raise KeyError(f"{str(self.path)!r}: tensor {name!r} is not in the declared layout")
        if name in self.written:
            raise KeyError(f"{str(self.path)!r}: tensor {name!r} written twice")
        shape, dtype = self.layout[name]
        if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
            raise ValueError(f"{str(self.path)!r}: tensor {name!r} is {tuple(tensor.shape)} {tensor.dtype}, "
                             f"declared {tuple(shape)} {dtype}")
        self.file.seek(self.start + self.offsets[name])
        self.file.write(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().data)
        self.written.add(name)

    def check_complete(self) -> None:
        """Raise a KeyError naming the declared tensors that never came."""
        missing = [name for name in self.layout if name not in self.written]
        if missing:
            raise KeyError(f"{str(self.path)!r}: {len(missing)} tensor(s) never written: {missing[:5]}")


def write_safetensors(
    path: str | os.PathLike,
    layout: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
    tensors: Iterable[tuple[str, Tensor]],
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write a safetensors file tensor by tensor, as ``tensors`` yields them (any order).

    ``layout`` (name → shape, dtype) fixes the header up front, so no more than one tensor is held
    here at a time. Every name must arrive exactly once with its declared shape and dtype; the file
    is written atomically and left absent on any error.
    """
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            writer = _SafetensorsWriter(Path(path), f, layout, metadata)
            for name, tensor in tensors:
                writer.write(name, tensor)
            writer.check_complete()

    return atomic_write(path, write)


def write_safetensors_shards(
    folder: str | os.PathLike,
    layout: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
    tensors: Iterable[tuple[str, Tensor]],
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    metadata: Mapping[str, str] | None = None,
) -> list[Path]:
    """Write weights into ``folder`` as ``save_pretrained`` does; returns the files written.

    ``model.safetensors`` when they fit in ``max_shard_size`` bytes (an int or ``"5GB"``), else
    ``model-0000k-of-0000n.safetensors`` shards (:func:`plan_shards`) and ``model.safetensors.index.json``
    (``metadata.total_size``, ``weight_map``). As :func:`write_safetensors`: tensor by tensor in any
    order, every shard's header first. The files go straight into ``folder``, which must exist; on
    an error they are removed. Build the folder with :func:`write_hf_folder` for an atomic output.
    """
    folder = Path(folder)
    shards = plan_shards(layout, parse_size(max_shard_size))
    if len(shards) == 1:
        return [write_safetensors(folder / "model.safetensors", layout, tensors, metadata)]
    files = [folder / f"model-{k:05d}-of-{len(shards):05d}.safetensors" for k in range(1, len(shards) + 1)]
    shard_of = {name: k for k, names in enumerate(shards) for name in names}
    created: list[Path] = []  # removed on an error (files already there are never touched: "x" mode)
    try:
        with contextlib.ExitStack() as stack:
            writers = []
            for path, names in zip(files, shards):
                file = stack.enter_context(open(path, "xb"))
                created.append(path)
                writers.append(_SafetensorsWriter(path, file, {name: layout[name] for name in names}, metadata))
            for name, tensor in tensors:
                if name not in shard_of:
                    raise KeyError(f"{str(folder)!r}: tensor {name!r} is not in the declared layout")
                writers[shard_of[name]].write(name, tensor)
            for writer in writers:
                writer.check_complete()
        total = {"total_parameters": sum(math.prod(shape) for shape, _ in layout.values()),
                 "total_size": sum(_nbytes(shape, dtype) for shape, dtype in layout.values())}
        weight_map = {name: files[shard_of[name]].name for name in layout}
        with open(folder / INDEX_NAME, "x", encoding="utf-8") as f:
            created.append(folder / INDEX_NAME)
            f.write(json.dumps({"metadata": total, "weight_map": weight_map}, indent=2, sort_keys=True) + "\n")
    except BaseException:
        for path in created:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        raise
    return created


def write_hf_folder(out: Path, model_folder: Path, write: Callable[[Path], None], force: bool = False) -> Path:
    """A Hugging Face folder ``from_pretrained`` loads: the model folder's config and tokenizer files plus
    the weights ``write(folder)`` puts there; built beside ``out`` and renamed into place.

    Its ``config.json`` states the dtype of the weights written (:func:`declare_dtype`).
    """
    remove_stale_temps(out)
    tmp = new_temp(out, folder=True)  # the umask's mode, as mkdir gives
    try:
        for item in model_folder.iterdir():
            if item.is_file() and not item.name.endswith(WEIGHT_SUFFIXES):
                shutil.copy2(item, tmp / item.name)
        write(tmp)
        declare_dtype(tmp)
        file_mode = tmp.stat().st_mode & 0o666  # as open() gives under the umask (save_file writes 0600)
        for item in tmp.iterdir():
            if item.is_file() and not item.is_symlink():
                item.chmod(file_mode)
        if force and out.is_dir() and not out.is_symlink():
            shutil.rmtree(out)
        elif force and out.exists():
            out.unlink()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def declare_dtype(folder: Path) -> torch.dtype | None:
    """Make ``folder/config.json`` state the dtype of the weights in ``folder``; returns it (None: nothing to state).

    The dtype is that of most floating weight entries; ``from_pretrained`` loads in the config's
    ``dtype`` (transformers ≥ 5, which prefers it) or ``torch_dtype``, so every one of those keys
    present is set (``torch_dtype``, read by every version, when neither is).
    """
    config_path = folder / "config.json"
    counts: dict[torch.dtype, int] = {}
    for tensor in shapes_of(open_checkpoint(folder)).values():
        if tensor.is_floating_point():
            counts[tensor.dtype] = counts.get(tensor.dtype, 0) + tensor.numel()
    if not counts or not config_path.is_file():
        return None
    dtype = max(counts, key=counts.__getitem__)
    if len(counts) > 1:
        logger.info("%s: weights in %s; config.json states %s, the dtype of most entries",
                    folder, sorted(map(str, counts)), dtype)
    config = json.loads(config_path.read_text())
    name = str(dtype).removeprefix("torch.")
    keys = [key for key in ("dtype", "torch_dtype") if key in config] or ["torch_dtype"]
    if any(config.get(key) != name for key in keys):
        config.update(dict.fromkeys(keys, name))
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return dtype
