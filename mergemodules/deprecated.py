"""Deprecated aliases of names that moved to a higher floor (removed in 0.2), installed here so no module imports up.

Each old home keeps working: ``mergemodules.masks.plot_masks``, ``mergemodules.methods.awd.with_awd`` and
``FittedAWD.plot_cosine`` warn with a DeprecationWarning naming the new home. The package imports this module
last, so the aliases exist whatever a user imports first (importing a submodule imports the package).
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any, Sequence

from . import masks, methods, plotting
from .methods import awd

__all__ = ["install"]

# old module → {moved name: (new module, the advice in the warning)}
MOVED: dict[ModuleType, dict[str, tuple[ModuleType, str]]] = {
    masks: {"plot_masks": (plotting, "use mergemodules.plot_masks (mergemodules.plotting.plot_masks)")},
    awd: {"with_awd": (methods, "import it from mergemodules.methods")},
}


def _module_getattr(module: ModuleType, moved: dict[str, tuple[ModuleType, str]]) -> Any:
    """A PEP 562 ``__getattr__`` for ``module`` that hands out its moved names with a DeprecationWarning."""

    def __getattr__(name: str) -> Any:
        if name not in moved:
            raise AttributeError(f"module {module.__name__!r} has no attribute {name!r}")
        home, advice = moved[name]
        warnings.warn(f"{module.__name__}.{name} is deprecated: {advice}", DeprecationWarning, stacklevel=2)
        return getattr(home, name)

    return __getattr__


def _plot_cosine(self: awd.FittedAWD, path: str | os.PathLike, task_names: Sequence[str] | None = None) -> Path:
    """Deprecated (removed in 0.2): use ``mergemodules.plotting.plot_awd_cosine(fitted, path, task_names)``."""
    warnings.warn("FittedAWD.plot_cosine is deprecated: use mergemodules.plotting.plot_awd_cosine",
                  DeprecationWarning, stacklevel=2)
    return plotting.plot_awd_cosine(self, path, task_names)


def install() -> None:
    """Give every old home its deprecated aliases (idempotent)."""
    for module, moved in MOVED.items():
        module.__getattr__ = _module_getattr(module, moved)  # type: ignore[method-assign]
    awd.FittedAWD.plot_cosine = _plot_cosine  # type: ignore[attr-defined]


install()
