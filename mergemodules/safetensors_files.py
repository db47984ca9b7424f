"""The safetensors format: a header reader that checks everything, and a writer that streams tensor by tensor.

``read_safetensors_header`` gives every tensor's shape and dtype without reading any value
(``read_safetensors_layout`` also its byte range, which ``read_stored_tensor`` reads);
``write_safetensors`` / ``write_safetensors_shards`` write the header first (from a declared layout)
and then each tensor at its offset as it arrives, so a writer never holds more than one tensor.
Every output is atomic (:func:`mergemodules.files.atomic_write`). Below everything but ``files``.
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import mmap
import math
import os
import re
import struct
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping, NamedTuple

import torch
from torch import Tensor

from .files import atomic_write

__all__ = [
    "SAFETENSORS_DTYPES", "StoredTensor", "read_safetensors_header", "read_safetensors_layout", "read_stored_tensor",
    "write_safetensors", "write_safetensors_shards", "plan_shards",
    "parse_size", "DEFAULT_MAX_SHARD_SIZE", "INDEX_NAME",
]

Layout = Mapping[str, tuple[tuple[int, ...], torch.dtype]]  # name → (shape, dtype), in file order

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    **{name: getattr(torch, attr) for name, attr in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"))
       if hasattr(torch, attr)},
}
_DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
MAX_HEADER_BYTES = 100_000_000  # the limit of the safetensors library itself


# -------------------------------------------------------------------------------------- reading


class StoredTensor(NamedTuple):
    """Where a safetensors file stores one tensor: its shape, dtype and byte range in the file."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    start: int  # absolute byte positions in the file
    stop: int


def read_safetensors_header(path: str | os.PathLike) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name → (shape, dtype) of every tensor in a safetensors file, from its header alone, fully validated.

    The header must be a JSON object of entries ``{"dtype", "shape", "data_offsets"}`` with a known
    dtype, a shape of non-negative ints and offsets that match shape × item size and tile the data
    section exactly (so a truncated or padded file is refused). Any problem is a ValueError naming
    the file (and the tensor).
    """
    return {key: (stored.shape, stored.dtype) for key, stored in read_safetensors_layout(path).items()}


def read_safetensors_layout(path: str | os.PathLike) -> dict[str, StoredTensor]:
    """Name → where the file stores each tensor (:class:`StoredTensor`), validated as by
    :func:`read_safetensors_header`."""
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
    start = 8 + length
    return {key: StoredTensor(shape, dtype, start + begin, start + end)
            for key, (shape, dtype, (begin, end)) in tensors.items()}


def map_stored_tensor(path: str | os.PathLike, stored: StoredTensor) -> Tensor | None:
    """The tensor ``stored`` in the file ``path`` without reading it: a CPU tensor over a private memory map of
    its byte range (pages are read when touched; the map is released with the tensor; writes stay private).

    None where the stored bytes cannot serve as they are: a big-endian host, an offset not aligned to the item
    size, or an empty tensor. A file now too short for ``stored`` is a ValueError.
    """
    size = stored.dtype.itemsize
    if sys.byteorder == "big" or stored.start % size or stored.stop == stored.start:
        return None
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size < stored.stop:
            raise ValueError(f"the file ends before the tensor's end at byte {stored.stop} (changed since its header "
                             "was read?)")
        begin = stored.start - stored.start % mmap.ALLOCATIONGRANULARITY
        mapped = mmap.mmap(f.fileno(), stored.stop - begin, offset=begin, access=mmap.ACCESS_COPY)
    raw = torch.frombuffer(mapped, dtype=torch.uint8, offset=stored.start - begin, count=stored.stop - stored.start)
    return raw.view(stored.dtype).view(stored.shape)


_LIBC = ctypes.CDLL(None, use_errno=True) if hasattr(mmap, "MADV_DONTNEED") and sys.platform == "linux" else None


def release_mapped_pages(tensor: Tensor) -> None:
    """Drop the memory pages that lie wholly inside ``tensor``, a contiguous slice of a tensor from
    :func:`map_stored_tensor` that was only read, from this process (``madvise(MADV_DONTNEED)``; Linux, else nothing).

    The page cache keeps them and a later read faults them in again with the file's values, so a caller that reads
    a map once in pieces keeps a piece resident, not the tensor. Only for such maps: on other memory it discards
    the values.
    """
    if _LIBC is None:
        return
    start = tensor.data_ptr()
    first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
    last = (start + tensor.numel() * tensor.element_size()) // mmap.PAGESIZE * mmap.PAGESIZE
    if last > first and _LIBC.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), mmap.MADV_DONTNEED):
        raise OSError(ctypes.get_errno(), "madvise(MADV_DONTNEED) failed on a mapped tensor")


def read_stored_tensor(path: str | os.PathLike, stored: StoredTensor, out: Tensor | None = None) -> Tensor:
    """The tensor ``stored`` in the file ``path``, read with plain reads (no memory map) into ``out`` (a contiguous
    CPU tensor of its shape and dtype) or a fresh tensor.

    A file now too short for ``stored`` (changed since its header was read) is a ValueError.
    """
    tensor = torch.empty(stored.shape, dtype=stored.dtype) if out is None else out
    if tensor.shape != stored.shape or tensor.dtype != stored.dtype or not tensor.is_contiguous() or tensor.is_cuda:
        raise ValueError(f"out: {tuple(tensor.shape)} {tensor.dtype} on {tensor.device} is not a contiguous CPU "
                         f"tensor of the stored {stored.shape} {stored.dtype}")
    buffer = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
    with open(path, "rb", buffering=0) as f:
        f.seek(stored.start)
        done = 0
        while done < len(buffer):  # one read() returns at most about 2 GiB on Linux
            count = f.readinto(buffer[done:])
            if not count:
                raise ValueError(f"the file ends at byte {stored.start + done}, before the tensor's end at byte "
                                 f"{stored.stop} (changed since its header was read?)")
            done += count
    if sys.byteorder == "big" and tensor.element_size() > 1:  # the format stores little-endian values
        raw = tensor.reshape(-1).view(torch.uint8).view(-1, tensor.element_size())
        raw.copy_(raw.flip(1))
    return tensor


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
    nbytes = _nbytes(shape, dtype)
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



# -------------------------------------------------------------------------------------- writing

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


def plan_shards(layout: Layout, max_shard_size: int) -> list[list[str]]:
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

    def __init__(self, path: Path, file: Any, layout: Layout, metadata: Mapping[str, str] | None) -> None:
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
    layout: Layout,
    tensors: Iterable[tuple[str, Tensor]],
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write a safetensors file tensor by tensor, as ``tensors`` yields them (any order).

    ``layout`` (name → shape, dtype) fixes the header up front, so no more than one tensor is held
    here at a time. Every name must arrive exactly once with its declared shape and dtype; the file
    is written atomically and left absent on any error.
    """
    def write(tmp: str) -> None:
        # "r+b", not "wb": the temporary is new and empty, and ext4 flushes a file truncated by "wb" when it is
        # closed (auto_da_alloc: 27-34 ms for 84 MB here), which a file written in place and renamed escapes
        with open(tmp, "r+b") as f:
            writer = _SafetensorsWriter(Path(path), f, layout, metadata)
            for name, tensor in tensors:
                writer.write(name, tensor)
            writer.check_complete()

    return atomic_write(path, write)


def write_safetensors_shards(
    folder: str | os.PathLike,
    layout: Layout,
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

