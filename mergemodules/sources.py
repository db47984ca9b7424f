"""Model sources and checkpoint files: build an architecture, read weights lazily, write a Hugging Face folder.

Architectures come from a timm or open_clip model name (built with pretrained weights off), a
local Hugging Face folder, or a Python callable ``module:function`` / ``file.py:function``.
Checkpoints are safetensors files (read lazily, one tensor per lookup),
PyTorch files (``torch.load(weights_only=True)``, memory-mapped) or Hugging Face folders; each is a
:class:`LazyCheckpoint`, whose shapes are known without reading a tensor. A new format is a class
satisfying that protocol, returned by :func:`open_checkpoint`.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import os
import pickle
import shutil
import sys
import threading
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from . import safetensors_files
from .buffers import Workspace
from .files import new_temp, remove_stale_temps, temp_name
from .safetensors_files import StoredTensor, map_stored_tensor, read_safetensors_layout, read_stored_tensor

__all__ = [
    "MODEL_KINDS", "build_model", "load_callable", "LazyCheckpoint", "SafetensorsCheckpoint", "open_checkpoint",
    "shapes_of", "hf_weight_files", "write_hf_folder", "WEIGHT_SUFFIXES",
    "compute_dtype_of", "output_dtypes", "cast_tensors_", "check_floating_dtype", "declare_dtype",
]

logger = logging.getLogger(__name__)

MODEL_KINDS = ("timm", "open_clip", "hf", "callable")

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


@runtime_checkable
class LazyCheckpoint(Protocol):
    """A checkpoint read lazily: a name → tensor mapping that reads a tensor only when it is looked up,
    and whose ``meta()`` gives every shape and dtype without reading any (from the file's header).

    Every checkpoint :func:`open_checkpoint` returns satisfies it; the checks before a merge use
    ``meta()`` alone (:func:`shapes_of`), and refuse a mapping that is neither a dict nor one of these.
    """

    def __getitem__(self, key: str) -> Tensor:
        """The tensor ``key``, read now (cast and moved as the checkpoint was opened)."""

    def __iter__(self) -> Iterator[str]:
        """The tensor names, without reading any tensor."""

    def __len__(self) -> int:
        """The number of tensors."""

    def __contains__(self, key: object) -> bool:
        """Whether the checkpoint holds ``key``, without reading it."""

    def meta(self) -> Mapping[str, Tensor]:
        """Name → a meta tensor of the shape and dtype ``self[name]`` would have, read without the values."""


class SafetensorsCheckpoint(Mapping[str, Tensor]):
    """One or more safetensors files as a lazy name → tensor mapping (one tensor read per lookup).

    The headers are read when it is opened; nothing else until a tensor is looked up. A lookup reads
    that tensor's bytes into a fresh tensor (plain reads, no memory map: no page faults on a mapping,
    and its memory is freed with the tensor); ``view`` maps a tensor instead, for a caller that reads
    it once in pieces (:func:`~mergemodules.build.merge_in_chunks`). Floating tensors are cast to
    ``dtype`` when given; every tensor is moved to ``device``.
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
        self._stored: dict[str, StoredTensor] = {}
        for path in self.paths:
            for key, stored in read_safetensors_layout(path).items():
                if key in self._files:
                    raise ValueError(f"{str(path)!r}: tensor {key!r} also appears in {str(self._files[key])!r}")
                self._files[key] = path
                self._stored[key] = stored

    def __getitem__(self, key: str) -> Tensor:
        return _convert(self._read(key), self.dtype, self.device)

    def _stored_call(self, read: Callable[..., Any], key: str, *args: Any) -> Any:
        """``read(file, stored, *args)`` for tensor ``key``; a ValueError (the file changed since its header was
        checked; an OSError stays one) names the file and the tensor."""
        try:
            return read(self._files[key], self._stored[key], *args)
        except ValueError as err:
            raise ValueError(f"{str(self._files[key])!r}: cannot read tensor {key!r}: {err}") from None

    def _read(self, key: str, out: Tensor | None = None) -> Tensor:
        """The stored tensor ``key`` as stored, read into ``out`` or a fresh tensor."""
        return self._stored_call(read_stored_tensor, key, out)

    def view(self, key: str) -> Tensor | None:
        """The stored tensor ``key`` as stored (its dtype, on the CPU), mapped from its file without reading it
        (:func:`~mergemodules.safetensors_files.map_stored_tensor`); None where it cannot be."""
        return self._stored_call(map_stored_tensor, key)

    def read_into(self, key: str, out: Tensor) -> bool:
        """``out.copy_(self[key])`` without a fresh tensor: read straight into ``out`` (a contiguous CPU tensor) when
        stored in its dtype, else into this thread's reused scratch buffer and cast from there, when one cast does
        it; returns whether it read (False: nothing read, use ``self[key]``)."""
        stored = self._stored[key]
        if (_target_dtype(stored.dtype, self.dtype) not in (stored.dtype, out.dtype) or not _stays_on_cpu(self.device)
                or out.device.type != "cpu" or not out.is_contiguous()):
            return False
        if stored.dtype == out.dtype:
            self._read(key, out)
        else:
            out.copy_(self._read(key, _scratch(stored.shape, stored.dtype)))
        return True

    def __iter__(self) -> Iterator[str]:
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)

    def __contains__(self, key: object) -> bool:
        return key in self._files

    def meta(self) -> dict[str, Tensor]:
        """The same mapping with meta tensors of the stored shapes and (converted) dtypes, read from the headers."""
        return {
            key: torch.empty(stored.shape, dtype=_target_dtype(stored.dtype, self.dtype), device="meta")
            for key, stored in self._stored.items()
        }



_SCRATCH = threading.local()


def _scratch(shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """An uninitialised ``shape`` CPU tensor in this thread's :class:`~mergemodules.buffers.Workspace`."""
    if not hasattr(_SCRATCH, "workspace"):
        _SCRATCH.workspace = Workspace()
    return _SCRATCH.workspace.empty(shape, dtype)


def _stays_on_cpu(device: str | torch.device | None) -> bool:
    """Whether moving a CPU tensor to ``device`` (None: kept) leaves it where it is."""
    return device is None or torch.device(device).type == "cpu"


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

    def view(self, key: str) -> Tensor | None:
        """The state's tensor ``key`` before the cast, where a lazy state maps it without reading it and no move to
        another device comes between (see ``SafetensorsCheckpoint.view``); else None."""
        view = getattr(self.state, "view", None)
        return view(key) if view is not None and _stays_on_cpu(self.device) else None

    def read_into(self, key: str, out: Tensor) -> bool:
        """As ``out.copy_(self[key])`` straight from a lazy state that can (``read_into``) when no cast to another
        dtype than ``out``'s, nor a move, comes between; returns whether it read (False: nothing read)."""
        read_into = getattr(self.state, "read_into", None)
        if read_into is None or self.dtype not in (None, out.dtype) or not _stays_on_cpu(self.device):
            return False
        return read_into(key, out)

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
) -> LazyCheckpoint:
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


def shapes_of(state: Mapping[str, Tensor], name: str = "state") -> Mapping[str, Tensor]:
    """``state`` with nothing read: a :class:`LazyCheckpoint`'s ``meta()``, or a dict (in memory) itself.

    Any other mapping is a TypeError naming ``name``: its tensors might be read from disk to learn their shapes.
    """
    if isinstance(state, LazyCheckpoint):
        return state.meta()
    if isinstance(state, dict):
        return state
    raise TypeError(
        f"{name} is a {type(state).__name__}, neither a dict of tensors nor a lazy checkpoint with meta() "
        "(mergemodules.sources.LazyCheckpoint): give it a meta() returning meta tensors, or pass dict(...)"
    )


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
        _replace(tmp, out, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _replace(new: Path, out: Path, force: bool) -> None:
    """Rename ``new`` to ``out``; an existing ``out`` (``force``) is first renamed to a temporary beside it, removed
    once ``new`` is in place (put back if that fails): the old output is never gone before the new one is there."""
    if not (force and (out.exists() or out.is_symlink())):
        os.replace(new, out)
        return
    old = temp_name(out)
    os.rename(out, old)
    try:
        os.replace(new, out)
    except BaseException:
        os.rename(old, out)
        raise
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old)
    else:
        old.unlink()


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


_MOVED = ("write_safetensors", "write_safetensors_shards", "plan_shards", "parse_size", "DEFAULT_MAX_SHARD_SIZE",
          "SAFETENSORS_DTYPES", "MAX_HEADER_BYTES", "INDEX_NAME", "SIZE_UNITS")


def __getattr__(name: str) -> Any:
    """The writer's names, moved to :mod:`mergemodules.safetensors_files` (deprecated here for one release)."""
    if name not in _MOVED:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    warnings.warn(f"mergemodules.sources.{name} moved to mergemodules.safetensors_files.{name}; "
                  "the old name goes in the next release", DeprecationWarning, stacklevel=2)
    return getattr(safetensors_files, name)
