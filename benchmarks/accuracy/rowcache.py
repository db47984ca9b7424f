"""Row results cached beside the zoo, so a re-run with nothing changed reads them instead of merging again.

An entry is keyed by everything its numbers depend on: the sha256 of the checkpoints the rows use (the
pretrained encoder, this budget's tasks), the run configuration, the choices handed on from other rows
(CART+AdaRank starts from CART's λ), the device type (a GPU's numbers are not the CPU's), and the source of the
library and of this benchmark. Editing any ``.py`` file under ``mergemodules/`` or ``benchmarks/accuracy/``
invalidates every entry: the zoo's rebuild-on-change rule, applied to rows.

Layout, under ``<zoo>/rows/``: ``<name>-<key>.npz`` (per-example correctness, and the hard masks a plot needs)
is written first, ``<name>-<key>.json`` last, each atomically; an entry counts only when both exist. A row
in progress keeps its adaptation checkpoints in ``<name>-<key>.partial/`` (:func:`scratch`), so a run killed
mid-row resumes that row where its last checkpoint left it; storing the entry removes the folder.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import re
import shutil
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mergemodules.files import atomic_write

from .zoo import Zoo, atomic_write_json

logger = logging.getLogger(__name__)

_SOURCES = (Path(__file__).resolve().parents[2] / "mergemodules", Path(__file__).resolve().parent)
_MASK = "mask::"  # npz key prefix of a hard mask (layer name after it)


@functools.lru_cache(maxsize=1)
def code_digest() -> str:
    """sha256 of every ``.py`` file of the library and of this benchmark (paths and bytes, in sorted order)."""
    h = hashlib.sha256()
    for root in _SOURCES:
        for path in sorted(root.rglob("*.py")):
            h.update(str(path.relative_to(root.parent)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def key(zoo: Zoo, what: str, config: Any, inputs: Any = None) -> str:
    """The cache key of ``what`` (a row label, ``"cart rank sweep"`` or ``"diagnostics"``) on ``zoo`` under
    ``config``, given the ``inputs`` handed on from earlier rows."""
    # the zoo's own tasks, not the manifest's: it also lists the entries of other budgets sharing the zoo's folder
    # (the default's beside --full's), which must not change this key
    checkpoints = {"pretrained": zoo.manifest["pretrained"]["sha256"],
                   "tasks": {t.name: t.entry["sha256"] for t in zoo.tasks}}
    config = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else config
    if isinstance(config, dict):
        config = {k: v for k, v in config.items() if k != "rows"}  # which rows run does not change a row
    blob = json.dumps({"what": what, "checkpoints": checkpoints, "config": config, "inputs": inputs,
                       "code": code_digest(), "device": zoo.device.type}, sort_keys=True, default=repr)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _stem(zoo: Zoo, what: str, k: str) -> Path:
    slug = re.sub(r"[^a-z0-9]+", "_", what.lower()).strip("_")
    return Path(zoo.directory) / "rows" / f"{slug}-{k}"


def scratch(zoo: Zoo, what: str, k: str) -> Path:
    """The folder (created) where the row ``what`` under ``k`` keeps its checkpoints until :func:`save` stores it."""
    folder = _stem(zoo, what, k).with_suffix(".partial")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def save(zoo: Zoo, what: str, k: str, obj: dict[str, Any], arrays: dict[str, np.ndarray] | None = None,
         masks: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """Store ``obj`` with its arrays and boolean masks under ``k``; returns ``obj`` as stored (JSON: tuples become
    lists, numpy and torch scalars floats), i.e. as a later :func:`load` gives it."""
    stem = _stem(zoo, what, k)
    stem.parent.mkdir(parents=True, exist_ok=True)
    packed = {**(arrays or {}), **{_MASK + name: m.numpy() for name, m in (masks or {}).items()}}

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: given a name, numpy would append ".npz" to it
            np.savez_compressed(f, **packed)

    atomic_write(stem.with_suffix(".npz"), write)
    stored = json.loads(json.dumps(obj, default=float))
    atomic_write_json(stored, str(stem.with_suffix(".json")))
    shutil.rmtree(stem.with_suffix(".partial"), ignore_errors=True)
    return stored


def load(zoo: Zoo, what: str, k: str) -> tuple[dict[str, Any], dict[str, np.ndarray], dict[str, torch.Tensor]] | None:
    """(obj, arrays, masks) stored under ``k``, or None when absent or unreadable (logged)."""
    stem = _stem(zoo, what, k)
    if not (stem.with_suffix(".json").is_file() and stem.with_suffix(".npz").is_file()):
        return None
    try:
        obj = json.loads(stem.with_suffix(".json").read_text())
        with np.load(stem.with_suffix(".npz")) as npz:
            packed = {name: npz[name] for name in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        logger.warning("row cache: unreadable entry %s (%s); running it again", stem, e)
        return None
    arrays = {n: a for n, a in packed.items() if not n.startswith(_MASK)}
    masks = {n[len(_MASK):]: torch.from_numpy(a) for n, a in packed.items() if n.startswith(_MASK)}
    return obj, arrays, masks
