"""Deprecated (kept for one release): ``mergemodules.io`` is now :mod:`mergemodules.export` (fused weights),
:mod:`mergemodules.merge_state` (the merge state) and :func:`mergemodules.files.atomic_write`; the public
functions are also at the top level (``mm.save_fused``, ``mm.save_merge_state``, ``mm.load_merge_state``).
"""
from __future__ import annotations

import warnings
from typing import Any

from . import export, files, merge_state

__all__ = ["atomic_write", "fused_state_dict", "save_fused", "save_merge_state", "load_merge_state", "FORMAT"]

_HOMES = {"atomic_write": files, "fused_state_dict": export, "save_fused": export, "save_merge_state": merge_state,
          "load_merge_state": merge_state, "FORMAT": merge_state}


def __getattr__(name: str) -> Any:
    """``mergemodules.io.NAME`` with a DeprecationWarning naming where NAME lives now."""
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    home = _HOMES[name].__name__
    warnings.warn(f"mergemodules.io.{name} is deprecated and goes in the next release: use {home}.{name}",
                  DeprecationWarning, stacklevel=2)
    return getattr(_HOMES[name], name)
