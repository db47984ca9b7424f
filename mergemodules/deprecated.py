"""Deprecated aliases of names that moved to a higher floor (removed in 0.2), installed here so no module imports up.

Each old home keeps working: ``mergemodules.masks.plot_masks``, ``mergemodules.methods.awd.with_awd``,
``FittedAWD.plot_cosine`` and the renamed ``TaskVectorSource`` (now ``TaskVectorProvider``, in
``mergemodules.methods`` and ``mergemodules.methods.base``) warn with a DeprecationWarning naming the new home. The package imports this module
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

_RENAMED = "use TaskVectorProvider"
# old module → {old name: (new module, name there, the advice in the warning)}
MOVED: dict[ModuleType, dict[str, tuple[ModuleType, str, str]]] = {
    masks: {"plot_masks": (plotting, "plot_masks", "use mergemodules.plot_masks (mergemodules.plotting.plot_masks)")},
    awd: {"with_awd": (methods, "with_awd", "import it from mergemodules.methods")},
    methods: {"TaskVectorSource": (methods, "TaskVectorProvider", _RENAMED)},
    methods.base: {"TaskVectorSource": (methods.base, "TaskVectorProvider", _RENAMED)},
}


def _module_getattr(module: ModuleType, moved: dict[str, tuple[ModuleType, str, str]]) -> Any:
    """A PEP 562 ``__getattr__`` for ``module`` that hands out its moved names with a DeprecationWarning."""

    def __getattr__(name: str) -> Any:
        if name not in moved:
            raise AttributeError(f"module {module.__name__!r} has no attribute {name!r}")
        home, new_name, advice = moved[name]
        warnings.warn(f"{module.__name__}.{name} is deprecated: {advice}", DeprecationWarning, stacklevel=2)
        return getattr(home, new_name)

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
