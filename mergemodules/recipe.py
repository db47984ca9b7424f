"""YAML merge recipes (docs/recipes.md): parsed and validated before any heavy work.

Every error names the recipe file, the line and the key (``recipe.yaml:7: tasks[1]: ...``).
:func:`load_recipe` checks the YAML, the keys and their types, the method and its options, that
every file exists, and builds the architecture on the meta device to check every checkpoint's
keys and shapes from its header (safetensors) or a memory-mapped ``weights_only`` load (PyTorch
files, which refuses unsafe pickles) — all without reading or merging any weights.
"""
from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
import yaml
from torch import Tensor, nn

from .build import check_sources
from .decompose import resolve_rank
from .methods import Method, get_method
from .safetensors_files import parse_size
from .sources import MODEL_KINDS, build_model, open_checkpoint, shapes_of
from .streaming import check_weights
from .targets import Entry, method_layout, plan

__all__ = ["Recipe", "ModelSpec", "CheckpointSpec", "AdaptSpec", "RecipeError", "CheckpointError", "load_recipe", "parse_recipe", "DTYPES"]

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
    "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float64": torch.float64,
}
KEYS = ("model", "base", "tasks", "method", "options", "targets", "exclude", "matrices", "dtype", "out_dtype",
        "device", "output", "max_shard_size", "adapt")
MODEL_KEYS = (*MODEL_KINDS, "kwargs", "submodule")
CHECKPOINT_KEYS = ("path", "key")
ADAPT_KEYS = ("data", "kwargs", "eval", "steps", "lr", "seed", "eval_every", "checkpoint", "checkpoint_every",
              "merge_state", "parallel", "per_task_backward", "autocast", "pad_id")
AUTOCAST = {name: dtype for name, dtype in DTYPES.items() if dtype in (torch.bfloat16, torch.float16)}  # adapt.autocast

KeyPath = tuple[Any, ...]
OPTION_TYPES = {"int": int, "float": (int, float), "bool": bool, "str": str, "None": type(None)}


class RecipeError(ValueError):
    """A recipe that cannot be used; the message names the file, line and key."""

    exit_code = 2  # mergemodules exit status (docs/recipes.md)


class CheckpointError(RecipeError):
    """A checkpoint the recipe names is unreadable or does not fit the architecture (file, line and key)."""

    exit_code = 1


@dataclass(frozen=True)
class ModelSpec:
    """The architecture: ``kind`` (timm, open_clip, hf, callable), its name and constructor kwargs."""

    kind: str
    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    submodule: str | None = None

    def build(self, base_dir: Path, meta: bool = False) -> nn.Module:
        """Build it (random init, or the folder's weights for ``hf``); ``meta`` for shapes only."""
        return build_model(self.kind, self.name, self.kwargs, submodule=self.submodule, meta=meta, base_dir=base_dir)


@dataclass(frozen=True)
class CheckpointSpec:
    """A checkpoint file or Hugging Face folder; ``key`` selects the state dict inside a PyTorch file."""

    path: Path
    key: str | None = None

    def open(self, dtype: torch.dtype | None = None, device: str = "cpu") -> Mapping[str, Tensor]:
        """The lazy name → tensor mapping of the checkpoint."""
        return open_checkpoint(self.path, key=self.key, dtype=dtype, device=device)


@dataclass(frozen=True)
class AdaptSpec:
    """Test-time adaptation settings (``mergemodules adapt``)."""

    data: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    eval: str | None = None
    steps: int = 100
    lr: float = 1e-3
    seed: int = 0
    eval_every: int | None = None
    checkpoint: Path | None = None
    checkpoint_every: int | None = None
    merge_state: Path | None = None
    parallel: str | None = None  # under torchrun: "data" (slices of every task's batch) or "tasks"
    per_task_backward: bool = False  # one task's activations alive at a time
    autocast: torch.dtype | None = None  # bf16/fp16 adaptation forward, entropy in float32
    pad_id: int = 0  # pads token batches of different lengths when the tasks' batches are joined


@dataclass
class Recipe:
    """A validated recipe; paths are resolved against the recipe's folder."""

    path: Path
    model: ModelSpec
    base: CheckpointSpec | None
    tasks: list[CheckpointSpec]
    method: Method
    targets: str | list[str] | None = None
    exclude: str | list[str] | None = None
    matrices: dict[str, str] | None = None
    dtype: torch.dtype | None = None  # compute dtype (None: float32, float64 for float64 checkpoints)
    out_dtype: torch.dtype | None = None  # written dtype (None: the base checkpoint's, per tensor)
    device: str = "cpu"
    output: Path | None = None
    max_shard_size: int | None = None  # bytes per weight file of a Hugging Face folder output (None: the default)
    adapt: AdaptSpec | None = None
    lines: dict[KeyPath, int] = field(default_factory=dict, repr=False)

    @property
    def folder(self) -> Path:
        """The folder relative paths are resolved against."""
        return self.path.parent

    @property
    def is_hf(self) -> bool:
        """Whether the model is a Hugging Face folder (output is then a folder ``from_pretrained`` loads)."""
        return self.model.kind == "hf"

    def base_checkpoint(self) -> CheckpointSpec:
        """The pretrained weights: ``base``, or the Hugging Face model folder itself."""
        return self.base if self.base is not None else CheckpointSpec(self.folder / self.model.name)

    def error(self, key: KeyPath, message: str) -> RecipeError:
        """A RecipeError pointing at ``key``."""
        return RecipeError(_located(self.path, self.lines, key, message))

    def merge_options(self) -> dict[str, Any]:
        """Keyword arguments of ``merge``/``fuse_streaming`` besides the sources and the method."""
        return {"targets": self.targets, "exclude": self.exclude, "matrices": self.matrices}


def _dotted(key: KeyPath) -> str:
    out = ""
    for part in key:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _located(path: Path, lines: Mapping[KeyPath, int], key: KeyPath, message: str) -> str:
    for depth in range(len(key), -1, -1):
        if key[:depth] in lines:
            return f"{path}:{lines[key[:depth]]}: {_dotted(key)}: {message}"
    return f"{path}: {_dotted(key)}: {message}"


MAX_DEPTH = 32  # nesting of mappings and lists; a recipe needs 4


def _read_yaml(path: Path) -> tuple[Any, dict[KeyPath, int]]:
    """The document and the line of every key (1-based), via the node marks.

    Duplicate keys, non-scalar keys, nesting deeper than ``MAX_DEPTH`` and aliases (``*name``) of
    mappings or lists are errors: the node tree is checked before anything is constructed, so a
    "billion laughs" recipe fails at once instead of expanding.
    """
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise RecipeError(f"{path}: not a UTF-8 text file (byte {err.start}: {err.reason})") from None
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        lines = {} if node is None else _node_lines(path, node)
        data = None if node is None else loader.construct_document(node)
    except RecipeError:
        raise
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise RecipeError(f"{where}: invalid YAML: {err.problem or err.context}") from None
    except (yaml.YAMLError, ValueError, TypeError) as err:
        raise RecipeError(f"{path}: invalid YAML: {err}") from None
    except RecursionError:
        raise RecipeError(f"{path}: invalid YAML: nested too deeply (more than {MAX_DEPTH} levels)") from None
    finally:
        loader.dispose()
    return data, lines


def _node_lines(path: Path, root: yaml.Node) -> dict[KeyPath, int]:
    """The line of every key path of a composed YAML tree, checking it is a small plain tree (see _read_yaml)."""
    lines: dict[KeyPath, int] = {}
    seen: set[int] = set()
    stack: list[tuple[yaml.Node, KeyPath]] = [(root, ())]
    while stack:
        node, key = stack.pop()
        line = node.start_mark.line + 1
        lines.setdefault(key, line)
        if not isinstance(node, (yaml.MappingNode, yaml.SequenceNode)):
            continue
        if id(node) in seen:  # an alias: the node marks are the anchor's, the key's line is where it is used
            used = lines[key[:-1]] if key and isinstance(key[-1], int) else lines[key]
            raise RecipeError(f"{path}:{used}: {_dotted(key)}: an alias (*name) of a mapping or list is not "
                              "supported in recipes (aliases of single values are)")
        seen.add(id(node))
        if len(key) >= MAX_DEPTH:
            raise RecipeError(f"{path}:{line}: {_dotted(key)}: nested more than {MAX_DEPTH} levels deep")
        if isinstance(node, yaml.SequenceNode):
            stack.extend((item, key + (i,)) for i, item in reversed(list(enumerate(node.value))))
            continue
        names = set()
        for key_node, value in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise RecipeError(f"{path}:{key_node.start_mark.line + 1}: {_dotted(key)}: keys must be plain names")
            name = key_node.value
            if name in names:
                raise RecipeError(f"{path}:{key_node.start_mark.line + 1}: {_dotted(key + (name,))}: duplicate key")
            names.add(name)
            lines[key + (name,)] = key_node.start_mark.line + 1
        stack.extend((value, key + (key_node.value,)) for key_node, value in reversed(node.value))
    return lines


class _Parser:
    """Turns the YAML document into a :class:`Recipe`, raising :class:`RecipeError` at the first problem."""

    def __init__(self, path: Path, lines: dict[KeyPath, int]) -> None:
        self.path, self.lines = path, lines

    def error(self, key: KeyPath, message: str) -> RecipeError:
        return RecipeError(_located(self.path, self.lines, key, message))

    def mapping(self, value: Any, key: KeyPath, allowed: tuple[str, ...]) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.error(key, f"expected a mapping with keys from {list(allowed)}, got {type(value).__name__}")
        for name in value:
            if name not in allowed:
                close = difflib.get_close_matches(str(name), allowed, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise self.error(key + (name,), f"unknown key{hint}; valid keys: {list(allowed)}")
        return value

    def typed(self, value: Any, key: KeyPath, types: type | tuple[type, ...], what: str) -> Any:
        types = types if isinstance(types, tuple) else (types,)
        if not isinstance(value, types) or isinstance(value, bool) and bool not in types:
            raise self.error(key, f"expected {what}, got {value!r}")
        return value

    def choice(self, value: Any, key: KeyPath, allowed: tuple[str, ...]) -> str:
        if value not in allowed:
            raise self.error(key, f"expected one of {list(allowed)}, got {value!r}")
        return value

    def file(self, value: Any, key: KeyPath, folder_ok: bool = False) -> Path:
        self.typed(value, key, str, "a path")
        path = self.path.parent / Path(os.path.expanduser(value))
        if not (path.is_file() or folder_ok and path.is_dir()):
            raise self.error(key, f"{'file or folder' if folder_ok else 'file'} {str(path)!r} does not exist")
        return path

    def model(self, value: Any) -> ModelSpec:
        spec = self.mapping(value, ("model",), MODEL_KEYS)
        kinds = [k for k in MODEL_KINDS if k in spec]
        if len(kinds) != 1:
            raise self.error(("model",), f"give exactly one of {list(MODEL_KINDS)}, got {kinds or 'none'}")
        kind = kinds[0]
        name = self.typed(spec[kind], ("model", kind), str, "a name")
        if kind == "hf":
            folder = self.file(name, ("model", kind), folder_ok=True)
            if not (folder / "config.json").is_file():
                raise self.error(("model", kind), f"{str(folder)!r} is not a Hugging Face folder (no config.json)")
        kwargs = self.typed(spec.get("kwargs") or {}, ("model", "kwargs"), dict, "a mapping of constructor arguments")
        submodule = spec.get("submodule")
        if submodule is not None:
            self.typed(submodule, ("model", "submodule"), str, "a submodule name such as 'visual'")
        return ModelSpec(kind, name, dict(kwargs), submodule)

    def checkpoint(self, value: Any, key: KeyPath) -> CheckpointSpec:
        if isinstance(value, dict):
            spec = self.mapping(value, key, CHECKPOINT_KEYS)
            if "path" not in spec:
                raise self.error(key, "a checkpoint mapping needs 'path'")
            path = self.file(spec["path"], key + ("path",), folder_ok=True)
            entry = spec.get("key")
            if entry is not None:
                self.typed(entry, key + ("key",), str, "the name of the entry holding the state dict")
            return CheckpointSpec(path, entry)
        return CheckpointSpec(self.file(value, key, folder_ok=True))

    def patterns(self, value: Any, key: KeyPath) -> str | list[str] | None:
        if value is None or isinstance(value, str):
            return value
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
        raise self.error(key, f"expected a regex string or a list of name patterns, got {value!r}")

    def method(self, doc: dict[str, Any]) -> Method:
        if "method" not in doc:
            raise self.error(("method",), "missing: name a method, e.g. 'task_arithmetic'")
        name = self.typed(doc["method"], ("method",), str, "a method name")
        options = self.typed(doc.get("options") or {}, ("options",), dict, "a mapping of method options")
        try:
            method = get_method(name)
        except KeyError as err:  # UnknownMethodError
            raise self.error(("method",), str(err.args[0])) from None
        for option, value in options.items():
            self.option(method, option, value)
        try:
            return get_method(method, **options)
        except (TypeError, ValueError) as err:
            key = next((k for k in options if str(err).startswith((f"{k}=", f"{k}:", f"{k} "))), None)
            raise self.error(("options",) if key is None else ("options", key), str(err)) from None

    def option(self, method: Method, name: str, value: Any) -> None:
        """Check an option's value against its declared type (and ``rank``'s domain) before it is applied."""
        key = ("options", name)
        fields = {f.name: f for f in dataclasses.fields(method)}
        fields.update({f.name: f for f in dataclasses.fields(method.transform)} if dataclasses.is_dataclass(
            method.transform) else {})
        declared = fields.get(name)
        types = [OPTION_TYPES.get(t.strip()) for t in str(declared.type).split("|")] if declared else [None]
        if None not in types and not any(isinstance(value, t) and (t is bool or not isinstance(value, bool))
                                         for t in types):
            hint = " (YAML reads a number without a '.' such as 1e-3 as text: write 1.0e-3)" if isinstance(
                value, str) and _is_number(value) else ""
            raise self.error(key, f"expected {declared.type}, got {value!r}{hint}")
        if name in ("rank", "mask_rank") and value is not None and (
            isinstance(value, float) and not 0.0 < value <= 1.0 or isinstance(value, int) and value <= 0
        ):
            raise self.error(key, f"{value!r}: expected a positive integer or a fraction in (0, 1]")

    def finite(self, value: Any, key: KeyPath) -> None:
        """Refuse NaN and ±inf anywhere in the recipe (``.nan``, ``.inf`` in YAML)."""
        if isinstance(value, float) and not math.isfinite(value):
            raise self.error(key, f"{value!r} is not a finite number")
        items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
        for name, item in items:
            self.finite(item, key + (name,))

    def shard_size(self, value: Any, model: ModelSpec) -> int:
        """``max_shard_size`` in bytes; only Hugging Face folder outputs are sharded."""
        if model.kind != "hf":
            raise self.error(("max_shard_size",), "applies to Hugging Face folder outputs ('model: {hf: ...}'); "
                                                  "this recipe writes one .safetensors file")
        try:
            return parse_size(value)
        except ValueError as err:
            raise self.error(("max_shard_size",), str(err)) from None

    def adapt(self, value: Any) -> AdaptSpec | None:
        if value is None:
            return None
        spec = self.mapping(value, ("adapt",), ADAPT_KEYS)
        if "data" not in spec:
            raise self.error(("adapt",), "missing 'data': a callable 'module:function' returning {task: Task}")
        kw: dict[str, Any] = {"data": self.typed(spec["data"], ("adapt", "data"), str, "'module:function'")}
        kw["kwargs"] = dict(self.typed(spec.get("kwargs") or {}, ("adapt", "kwargs"), dict, "a mapping"))
        if spec.get("eval") is not None:
            kw["eval"] = self.typed(spec["eval"], ("adapt", "eval"), str, "'module:function'")
        for name in ("steps", "seed", "eval_every", "checkpoint_every", "pad_id"):
            if spec.get(name) is not None:
                kw[name] = self.typed(spec[name], ("adapt", name), int, "an integer")
                if name not in ("seed", "pad_id") and kw[name] <= 0:
                    raise self.error(("adapt", name), f"expected a positive integer, got {kw[name]!r}")
        if spec.get("lr") is not None:
            kw["lr"] = float(self.typed(spec["lr"], ("adapt", "lr"), (int, float), "a number"))
            if kw["lr"] <= 0:
                raise self.error(("adapt", "lr"), f"expected a positive learning rate, got {spec['lr']!r}")
        for name in ("checkpoint", "merge_state"):
            if spec.get(name) is not None:
                kw[name] = self.path.parent / self.typed(spec[name], ("adapt", name), str, "a path")
        if spec.get("parallel") is not None:
            kw["parallel"] = self.choice(spec["parallel"], ("adapt", "parallel"), ("data", "tasks"))
        if spec.get("per_task_backward") is not None:
            kw["per_task_backward"] = self.typed(spec["per_task_backward"], ("adapt", "per_task_backward"), bool,
                                                 "true or false")
        if spec.get("autocast") is not None:
            kw["autocast"] = AUTOCAST[self.choice(spec["autocast"], ("adapt", "autocast"), tuple(AUTOCAST))]
        return AdaptSpec(**kw)

    def recipe(self, doc: Any) -> Recipe:
        doc = self.mapping(doc, (), KEYS)
        self.finite(doc, ())
        if "model" not in doc:
            raise self.error(("model",), "missing: the architecture, e.g. 'model: {timm: vit_base_patch16_224}'")
        model = self.model(doc["model"])
        base = None if doc.get("base") is None else self.checkpoint(doc["base"], ("base",))
        if base is None and model.kind != "hf":
            raise self.error(("base",), "missing: the pretrained checkpoint (only Hugging Face folders hold their own)")
        tasks = doc.get("tasks")
        if not isinstance(tasks, list) or not tasks:
            raise self.error(("tasks",), "expected a non-empty list of fine-tuned checkpoints")
        dtypes = {name: doc.get(name) for name in ("dtype", "out_dtype")}
        for name, value in dtypes.items():
            if value is not None and (not isinstance(value, str) or value not in DTYPES):
                raise self.error((name,), f"unknown dtype {value!r}; expected one of {sorted(DTYPES)}")
        device = str(doc.get("device") or "cpu")
        try:
            torch.device(device)
        except RuntimeError as err:
            raise self.error(("device",), str(err)) from None
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise self.error(("device",), f"{device!r} requested but CUDA is not available")
        matrices = doc.get("matrices")
        if matrices is not None:
            self.typed(matrices, ("matrices",), dict, "a mapping {glob: 'out_in' | 'in_out' | 'out_in_kernel'}")
        output = doc.get("output")
        max_shard_size = None if doc.get("max_shard_size") is None else self.shard_size(doc["max_shard_size"], model)
        return Recipe(
            path=self.path, model=model, base=base,
            tasks=[self.checkpoint(t, ("tasks", i)) for i, t in enumerate(tasks)],
            method=self.method(doc),
            targets=self.patterns(doc.get("targets"), ("targets",)),
            exclude=self.patterns(doc.get("exclude"), ("exclude",)),
            matrices=matrices, device=device,
            **{name: None if value is None else DTYPES[value] for name, value in dtypes.items()},
            output=None if output is None else self.path.parent / self.typed(output, ("output",), str, "a path"),
            max_shard_size=max_shard_size, adapt=self.adapt(doc.get("adapt")), lines=self.lines,
        )


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def parse_recipe(path: str | os.PathLike) -> Recipe:
    """Read and validate a recipe's YAML, keys, types, method, options and file paths (no model is built)."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe {str(path)!r} does not exist")
    data, lines = _read_yaml(path)
    if data is None:
        raise RecipeError(f"{path}: the recipe is empty")
    return _Parser(path, lines).recipe(data)


def check_recipe(recipe: Recipe, run_code: bool = True) -> tuple[nn.Module | None, list[Entry] | None]:
    """Build the architecture on the meta device and check every checkpoint's keys and shapes against it.

    Reads only safetensors headers (PyTorch files are memory-mapped with ``weights_only=True``).
    Returns the meta model and its merge plan. With ``run_code=False`` a ``model.callable`` is not
    imported: the tasks are checked against the base checkpoint instead, and (None, None) is returned.
    """
    if recipe.model.kind == "callable" and not run_code:
        _check_without_model(recipe)
        return None, None
    try:
        model = recipe.model.build(recipe.folder, meta=True)
    except (ValueError, TypeError, AttributeError, ImportError, FileNotFoundError, OSError) as err:
        raise recipe.error(("model",), f"cannot build the model: {err}") from None
    try:
        entries = plan(model, recipe.targets, recipe.exclude, recipe.matrices)
    except (ValueError, TypeError) as err:
        key = next((k for k in ("targets", "exclude", "matrices") if k in str(err).split(":")[0]), "targets")
        raise recipe.error((key,), str(err)) from None
    _check_ranks(recipe, entries)
    base = recipe.base_checkpoint()
    with _checkpoint_errors(recipe, _base_key(recipe), base.path):
        check_weights(entries, shapes_of(base.open(recipe.dtype)), model)
    for i, task in enumerate(recipe.tasks):
        with _checkpoint_errors(recipe, ("tasks", i)):
            shapes = shapes_of(task.open(recipe.dtype))
            check_sources(entries, [shapes], set(model.state_dict()), labels=[str(task.path)])
    return model, entries


def _base_key(recipe: Recipe) -> KeyPath:
    return ("base",) if recipe.base is not None else ("model", "hf")


@contextlib.contextmanager
def _checkpoint_errors(recipe: Recipe, key: KeyPath, path: Path | None = None) -> Iterator[None]:
    """Turn a checkpoint's problem into a CheckpointError at ``key`` (prefixed with ``path`` unless named)."""
    try:
        yield
    except (KeyError, ValueError, TypeError, FileNotFoundError) as err:
        message = _message(err)
        if path is not None and str(path) not in message:
            message = f"{path}: {message}"
        raise CheckpointError(_located(recipe.path, recipe.lines, key, message)) from None


def _check_ranks(recipe: Recipe, entries: list[Entry]) -> None:
    """``rank`` and ``mask_rank`` must fit every matrix the method decomposes (never clamped)."""
    method = recipe.method
    if method.matrices != "svd":
        return
    for entry in entries:
        layout = method_layout(entry, method.matrix_set)
        if not (entry.merged and layout is not None):
            continue
        shape = layout.matrix_shape(entry.shape)
        try:
            kept = resolve_rank(method.rank, shape, "rank")
        except (TypeError, ValueError) as err:
            raise recipe.error(("options", "rank"), f"{err} ({entry.name!r})") from None
        if method.masks and method.mask_rank is not None:
            try:
                on = resolve_rank(method.mask_rank, shape, "mask_rank")
            except (TypeError, ValueError) as err:
                raise recipe.error(("options", "mask_rank"), f"{err} ({entry.name!r})") from None
            if on > kept:
                raise recipe.error(("options", "mask_rank"), f"mask_rank keeps {on} components of "
                                                              f"{entry.name!r} but only rank={kept} are stored")


def _check_without_model(recipe: Recipe) -> None:
    """Without the architecture: every task must hold the base checkpoint's keys with its shapes."""
    base = recipe.base_checkpoint()
    with _checkpoint_errors(recipe, _base_key(recipe), base.path):
        reference = {k: tuple(v.shape) for k, v in shapes_of(base.open(recipe.dtype)).items()}
    for i, task in enumerate(recipe.tasks):
        with _checkpoint_errors(recipe, ("tasks", i)):
            shapes = {k: tuple(v.shape) for k, v in shapes_of(task.open(recipe.dtype)).items()}
            missing, extra = sorted(set(reference) - set(shapes)), sorted(set(shapes) - set(reference))
            if missing or extra:
                raise KeyError(f"{task.path} does not have the base's keys: missing {missing[:5]}, "
                               f"unexpected {extra[:5]}")
            for key, shape in reference.items():
                if shapes[key] != shape:
                    raise ValueError(f"{task.path}[{key!r}] has shape {shapes[key]}, the base has {shape}")


def _message(err: Exception) -> str:
    return str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)


def load_recipe(
    path: str | os.PathLike, run_code: bool = True
) -> tuple[Recipe, nn.Module | None, list[Entry] | None]:
    """Parse and fully check a recipe before any work: returns it, the meta-device model and the merge plan.

    ``run_code=False`` does not import a ``model.callable`` (see :func:`check_recipe`).
    """
    recipe = parse_recipe(path)
    model, entries = check_recipe(recipe, run_code)
    return recipe, model, entries
