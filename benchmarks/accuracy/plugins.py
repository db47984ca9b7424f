"""Your own tasks, vision backbones and suites, from a Python file given to ``--tasks-from`` (no file edited).

The file is imported by path; at import it calls :func:`register_task` for each task (a loader that
returns :class:`data.TaskData`: data, labels and class names split into train/val/test),
:func:`register_backbone` for a vision backbone of its own (used by ``VisionModelSpec(kind)``) and
:func:`register_suite` for a suite that uses them: a :class:`zoo.SuiteConfig` (its tasks, sizes, the
backbone through ``text_model``/``vision_model`` and the head rule through ``FinetuneHP.head_init``:
``"zeroshot"`` text heads from the class names/descriptions or ``"probe"`` a linear probe on frozen
pretrained features) and a :class:`table.RunConfig`. Then::

    python -m benchmarks.accuracy --tasks-from my_tasks.py --suite my_suite

See ``benchmarks/accuracy/README.md`` ("Your own tasks") for a complete file.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import sys
from typing import Callable, Sequence

from torch import nn

from . import data as bdata
from . import models

#: suite name → get(full: bool) -> (SuiteConfig, RunConfig), filled by :func:`register_suite`
SUITES: dict[str, Callable[[bool], tuple]] = {}

KINDS = ("text", "vision")


def load(path: str) -> None:
    """Import the Python file at ``path`` (it registers its tasks and suites)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--tasks-from: no such file {path!r}")
    name = f"benchmarks_accuracy_user_{abs(hash(os.path.abspath(path)))}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"--tasks-from: {path!r} is not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception:
        del sys.modules[name]
        raise


def register_task(name: str, loader: Callable[[bdata.Sizes, int], bdata.TaskData], *, kind: str) -> None:
    """Make task ``name`` loadable by the zoo: ``loader(sizes, seed)`` returns its :class:`data.TaskData`."""
    if not isinstance(name, str) or not name or name in bdata.ALL_TASKS:
        raise ValueError(f"register_task: name {name!r} is empty or already a task")
    if kind not in KINDS:
        raise ValueError(f"register_task({name!r}): kind must be one of {KINDS}, got {kind!r}")
    if not callable(loader):
        raise TypeError(f"register_task({name!r}): loader must be callable (sizes, seed) -> TaskData")

    def checked(sizes: bdata.Sizes, seed: int) -> bdata.TaskData:
        td = loader(sizes, seed)
        if not isinstance(td, bdata.TaskData) or td.name != name or td.kind != kind:
            raise ValueError(f"task {name!r}: the loader must return TaskData named {name!r} of kind {kind!r}, "
                             f"got {type(td).__name__} {getattr(td, 'name', '')!r} {getattr(td, 'kind', '')!r}")
        return td

    bdata.ALL_TASKS[name] = checked


def task_from_items(name: str, kind: str, source: str, items: Sequence[tuple[object, int]], classes: list[str],
                    sizes: bdata.Sizes, seed: int) -> bdata.TaskData:
    """A task from (input, label index) pairs: the benchmark's seeded, class-balanced train/val/tta/test split."""
    return bdata._from_items(name, kind, source, list(items), classes, sizes, seed)


def register_backbone(kind: str, build: Callable[[models.VisionModelSpec, int], nn.Module]) -> None:
    """Make ``VisionModelSpec(kind)`` build your vision backbone: ``build(spec, seed)`` returns a module that maps
    images (B, 3, S, S) in [0, 1] to features (B, d) and has an int attribute ``feature_dim`` = d.

    The zoo records the file that defines ``build`` as the pretrained source, with its sha256: editing that file
    rebuilds the zoo (as a changed DINOv2 or MiniLM file does)."""
    if not isinstance(kind, str) or not kind or kind in ("dinov2", "tiny") or kind in models.VISION_BACKBONES:
        raise ValueError(f"register_backbone: kind {kind!r} is empty, built in or already registered")
    if not callable(build):
        raise TypeError(f"register_backbone({kind!r}): build must be callable (spec, seed) -> nn.Module")

    def checked(spec: models.VisionModelSpec, seed: int) -> nn.Module:
        module = build(spec, seed)
        if not isinstance(module, nn.Module) or not isinstance(getattr(module, "feature_dim", None), int):
            raise ValueError(f"backbone {kind!r}: build must return an nn.Module with an int feature_dim, "
                             f"got {type(module).__name__}")
        return module

    models.VISION_BACKBONES[kind] = checked
    models.BACKBONE_FILES[kind] = os.path.abspath(inspect.getsourcefile(build) or "")


def register_suite(name: str, get: Callable[[bool], tuple]) -> None:
    """Make ``--suite name`` run ``get(full)`` → (SuiteConfig, RunConfig)."""
    if not isinstance(name, str) or not name or name == "all" or name in SUITES:
        raise ValueError(f"register_suite: name {name!r} is empty, 'all' or already registered")
    if not callable(get):
        raise TypeError(f"register_suite({name!r}): get must be callable (full) -> (SuiteConfig, RunConfig)")
    SUITES[name] = get
