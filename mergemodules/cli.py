"""The ``mergemodules`` command: merge, adapt, inspect and fuse from YAML recipes (docs/recipes.md)."""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Mapping, NamedTuple, Sequence

import torch
import yaml
from safetensors import SafetensorError
from torch import nn

from .decompose import resolve_rank
from .files import check_writable
from .export import save_fused
from .merge_state import load_merge_state, save_merge_state
from .methods import Method, get_method
from .recipe import AUTOCAST, DTYPES, AdaptSpec, Recipe, RecipeError, load_recipe
from .safetensors_files import DEFAULT_MAX_SHARD_SIZE, parse_size
from .sources import (
    MODEL_KINDS, build_model, cast_tensors_, compute_dtype_of, load_callable, output_dtypes, shapes_of, write_hf_folder,
)
from .streaming import save_fused_streaming
from .surgery import merge
from .targets import Entry, method_layout, plan

__all__ = ["main", "build_parser", "memory_plan"]

logger = logging.getLogger("mergemodules.cli")

EPILOG = """\
examples:
  mergemodules merge examples/recipe.yaml -o merged.safetensors
  mergemodules merge recipe.yaml --check          validate the recipe and show the plan, merge nothing
  mergemodules inspect recipe.yaml                which tensors are merged as matrices, ranks, memory
  mergemodules inspect --model timm:vit_base_patch16_224 --method cart --tasks 8
  mergemodules adapt recipe.yaml -o adapted.safetensors --steps 500
  mergemodules fuse merge_state.safetensors --recipe recipe.yaml -o fused.safetensors

The recipe format is documented in docs/recipes.md (full example: examples/recipe.yaml).

Recipes that name callables (model.callable, adapt.data, adapt.eval: 'file.py:function' or
'module:function') are code: merge, adapt and fuse import and run them, as 'python file.py' would.
'merge --check' and 'inspect' do not, unless given --trust-code. Check a downloaded recipe first.

Outputs are never an input (same file, a link to it, or inside an input folder); an existing output
(file or folder) is replaced only with --force. Exit status: 0 ok, 1 a checkpoint, merge state or
data callable that cannot be used, 2 a bad command line or recipe, 3 the system refused (permission,
disk full, a folder where a file belongs), 130 interrupted.
"""
FORCE_HELP = "replace an existing output (file or folder); inputs are never overwritten"
TRUST_HELP = "import and run the recipe's model.callable (recipes naming callables are code)"


class CommandError(Exception):
    """A problem with the command line or its files, reported as one line with exit status ``exit_code``."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


EXIT_DATA, EXIT_USAGE, EXIT_SYSTEM, EXIT_INTERRUPTED = 1, 2, 3, 130  # documented in docs/recipes.md


class _Output(NamedTuple):
    """A path a command writes: ``kind`` is "safetensors", "folder" or "file" (any suffix)."""

    label: str
    path: Path
    kind: str
    replace_ok: bool = False  # the command reads and updates it (adapt --resume's checkpoint)


# ------------------------------------------------------------------------------------------ helpers


def _progress() -> bool:
    return logging.getLogger("mergemodules").getEffectiveLevel() <= logging.INFO


def _output(recipe: Recipe | None, given: str | None) -> Path:
    out = Path(given) if given else (recipe.output if recipe is not None else None)
    if out is None:
        raise CommandError("no output: pass -o OUT or set 'output' in the recipe")
    return out


def _code_file(spec: str | None, folder: Path) -> Path | None:
    module = (spec or "").rpartition(":")[0]
    return folder / module if module.endswith(".py") else None


def _recipe_inputs(recipe: Recipe) -> dict[str, Path]:
    """Every file or folder a recipe reads, by the key that names it."""
    inputs = {"the recipe": recipe.path}
    if recipe.is_hf:
        inputs["model.hf"] = recipe.folder / recipe.model.name
    if recipe.base is not None:
        inputs["base"] = recipe.base.path
    inputs.update({f"tasks[{i}]": task.path for i, task in enumerate(recipe.tasks)})
    code = {"model.callable": recipe.model.name if recipe.model.kind == "callable" else None,
            "adapt.data": recipe.adapt.data if recipe.adapt else None,
            "adapt.eval": recipe.adapt.eval if recipe.adapt else None}
    for key, spec in code.items():
        path = _code_file(spec, recipe.folder)
        if path is not None:
            inputs[key] = path
    return inputs


def _within(path: str, folder: str) -> bool:
    return os.path.commonpath([path, folder]) == folder


def _overlap(out: Path, other: Path) -> str | None:
    """How writing ``out`` would hit ``other``: the same file (also through links), inside it, or holding it."""
    if out.exists() and other.exists() and os.path.samefile(out, other):
        return "is the same file as"
    real_out, real_other = os.path.realpath(out), os.path.realpath(other)
    if real_out == real_other:
        return "is the same path as"
    if other.is_dir() and _within(real_out, real_other):
        return "is inside"
    if out.is_dir() and _within(real_other, real_out):
        return "is a folder holding"
    return None


def _check_output(output: _Output, force: bool) -> None:
    label, out, kind = output.label, output.path, output.kind
    if kind == "safetensors" and out.suffix != ".safetensors":
        raise CommandError(f"{label} {str(out)!r}: expected a .safetensors file")
    if not out.parent.is_dir():
        raise CommandError(f"{label} {str(out)!r}: folder {str(out.parent)!r} does not exist")
    if out.exists() or out.is_symlink():
        if out.is_dir() != (kind == "folder"):
            raise CommandError(f"{label} {str(out)!r} exists and is a {'folder' if out.is_dir() else 'file'}, "
                               f"not a {'folder' if kind == 'folder' else 'file'}: remove it or choose another name")
        if not (force or output.replace_ok):
            raise CommandError(f"{label} {str(out)!r} exists; pass --force to replace it")
    try:
        check_writable(out)
    except OSError as err:
        raise CommandError(f"{label} {str(out)!r}: cannot write in {str(out.parent)!r}: {err.strerror}",
                           EXIT_SYSTEM) from None


def _check_outputs(outputs: Sequence[_Output], inputs: Mapping[str, Path], force: bool) -> None:
    """Before any work: no output is, holds or lies inside an input or another output; each is new (or
    ``--force``) and its folder writable."""
    for i, output in enumerate(outputs):
        others = {**inputs, **{o.label: o.path for o in outputs[:i]}}
        for label, path in others.items():
            relation = _overlap(output.path, path)
            if relation:
                advice = "refusing to overwrite an input" if label in inputs else "choose distinct outputs"
                raise CommandError(f"{output.label} {str(output.path)!r} {relation} {label} {str(path)!r}: {advice}")
        _check_output(output, force)


@contextlib.contextmanager
def _writing(path: Path) -> Iterator[None]:
    """Name ``path`` in an OSError raised while writing it (a full disk's error names no file)."""
    try:
        yield
    except OSError as err:
        if err.errno is not None and err.filename is None:
            raise type(err)(err.errno, err.strerror, str(path)) from err
        raise


def _real_model(recipe: Recipe, entries: Sequence[Entry]) -> nn.Module:
    """The pretrained model with its weights, in the recipe's compute dtype (default float32) and device."""
    model = recipe.model.build(recipe.folder)
    if recipe.base is not None:
        state = dict(recipe.base.open())
        for entry in entries:  # tied tensors may be stored under one of their names only
            present = next(n for n in entry.names if n in state)
            state.update({n: state[present] for n in entry.names})
        model.load_state_dict(state, strict=True)
    model = model.to(recipe.dtype or compute_dtype_of(model.state_dict()))
    return model.to(recipe.device)


def _with_dtypes(recipe: Recipe, args: argparse.Namespace) -> Recipe:
    """The recipe with the command line's --dtype / --out-dtype applied."""
    given = {name: DTYPES[getattr(args, name)] for name in ("dtype", "out_dtype") if getattr(args, name, None)}
    return dataclasses.replace(recipe, **given) if given else recipe


def _write_fused(
    recipe: Recipe | None, model_fused: nn.Module, out: Path, force: bool, out_dtype: torch.dtype | None = None
) -> None:
    """Write the fused model, each floating tensor cast to ``out_dtype`` or else to the base checkpoint's dtype."""
    stored = shapes_of(recipe.base_checkpoint().open()) if recipe is not None else model_fused.state_dict()
    cast_tensors_(model_fused, output_dtypes(stored, out_dtype))
    with _writing(out):
        if recipe is not None and recipe.is_hf:
            shard_size = recipe.max_shard_size or DEFAULT_MAX_SHARD_SIZE
            write_hf_folder(out, recipe.folder / recipe.model.name,
                            lambda folder: model_fused.save_pretrained(folder, max_shard_size=shard_size), force)
        else:
            save_fused(model_fused, out)
    logger.info("wrote %s", out)


# ------------------------------------------------------------------------------------------ commands


def cmd_merge(args: argparse.Namespace) -> None:
    """Static merge of a recipe, layer by layer from lazily read checkpoints, straight to a fused file."""
    recipe, model, entries = load_recipe(args.recipe, run_code=args.trust_code or not args.check)
    recipe = _with_dtypes(recipe, args)
    shard_size = _shard_size(recipe, args.max_shard_size)
    if recipe.method.is_adaptive:
        raise recipe.error(("method",), f"{recipe.method.name!r} learns its coefficients/masks by test-time "
                                        "adaptation: use 'mergemodules adapt' (or a static method)")
    if entries is None:
        logger.warning("%s: model.callable %r was not run (recipes naming callables are code; --trust-code runs "
                       "it): the tasks were checked against the base checkpoint only", recipe.path, recipe.model.name)
    else:
        _report_plan(recipe, entries)
    if args.check:
        if args.output or recipe.output:
            _check_merge_output(recipe, args)
        logger.info("recipe OK; nothing merged (--check)")
        return
    out = _check_merge_output(recipe, args)
    base = recipe.base_checkpoint().open(device=recipe.device)  # stored dtypes: cast to recipe.dtype when merged
    tasks = [task.open(device=recipe.device) for task in recipe.tasks]

    def write(path: Path, max_shard_size: int | None = None) -> None:
        save_fused_streaming(path, model, tasks, recipe.method, weights=base, progress=_progress(),
                             dtype=recipe.dtype, out_dtype=recipe.out_dtype, max_shard_size=max_shard_size,
                             **recipe.merge_options())

    with _writing(out):
        if recipe.is_hf:  # model.safetensors, or shards and their index past shard_size bytes
            write_hf_folder(out, recipe.folder / recipe.model.name, lambda folder: write(folder, shard_size),
                            args.force)
        else:
            write(out)
    logger.info("wrote %s", out)


def _shard_size(recipe: Recipe, given: str | None) -> int:
    """Bytes per weight file of a Hugging Face folder output: ``--max-shard-size``, else the recipe's, else 5GB."""
    if given is None:
        return recipe.max_shard_size or DEFAULT_MAX_SHARD_SIZE
    if not recipe.is_hf:
        raise CommandError(f"--max-shard-size: applies to Hugging Face folder outputs ('model: {{hf: ...}}'); "
                           f"{recipe.path} writes one .safetensors file")
    try:
        return parse_size(given)
    except ValueError as err:
        raise CommandError(f"--max-shard-size {err}") from None


def _check_merge_output(recipe: Recipe, args: argparse.Namespace) -> Path:
    out = _output(recipe, args.output)
    _check_outputs([_Output("output", out, "folder" if recipe.is_hf else "safetensors")], _recipe_inputs(recipe),
                   args.force)
    return out


def _tasks(recipe: Recipe, data: str | None) -> tuple[dict[str, Any], dict[str, Any] | None]:
    from .tta import Task

    spec = recipe.adapt
    where = data or (spec.data if spec else None)
    if where is None:
        raise recipe.error(("adapt",), "missing: 'adapt: {data: module:function}' (or pass --data)")
    built = load_callable(where, recipe.folder)(**(spec.kwargs if spec else {}))
    if not isinstance(built, Mapping) or not built:
        raise CommandError(f"--data {where}: must return a non-empty mapping {{task name: Task}}, "
                           f"got {type(built).__name__}", EXIT_DATA)
    tasks = {name: t if isinstance(t, Task) else Task(*t) for name, t in built.items()}
    eval_data = load_callable(spec.eval, recipe.folder)(**spec.kwargs) if spec and spec.eval else None
    return tasks, eval_data


def cmd_adapt(args: argparse.Namespace) -> None:
    """Merge with an adaptive method, adapt λ/ℓ by entropy minimisation, write the fused model (torchrun-aware)."""
    recipe, _, entries = load_recipe(args.recipe)
    recipe = _with_dtypes(recipe, args)
    spec = _adapt_spec(recipe, args)
    out = _output(recipe, args.output)
    merge_state, checkpoint = spec.merge_state, spec.checkpoint
    if args.resume and (checkpoint is None or not checkpoint.is_file()):
        raise CommandError(f"--resume: no adaptation checkpoint {str(checkpoint or '(adapt.checkpoint unset)')!r}")
    outputs = [_Output("output", out, "folder" if recipe.is_hf else "safetensors")]
    if merge_state is not None:
        outputs.append(_Output("--merge-state" if args.merge_state else "adapt.merge_state", merge_state,
                               "safetensors"))
    if checkpoint is not None:
        outputs.append(_Output("adapt.checkpoint", checkpoint, "file", replace_ok=args.resume))
    _check_outputs(outputs, _recipe_inputs(recipe), args.force)
    with _process_group(recipe.device) as (rank, device):
        local = dataclasses.replace(recipe, device=device)
        _adapt(local, entries, spec, args, out, rank)


def _adapt(recipe: Recipe, entries: Sequence[Entry], spec: AdaptSpec, args: argparse.Namespace, out: Path,
           rank: int) -> None:
    """Merge on this process's device, adapt, and (rank 0) write the outputs."""
    from .tta import adapt

    tasks, eval_data = _tasks(recipe, args.data)
    model = _real_model(recipe, entries)
    sources = [task.open(recipe.dtype, recipe.device) for task in recipe.tasks]
    merged = merge(model, sources, recipe.method, progress=_progress() and rank == 0, **recipe.merge_options())
    history = adapt(
        merged, tasks, steps=args.steps or spec.steps, lr=spec.lr, seed=spec.seed, eval_data=eval_data,
        eval_every=spec.eval_every, checkpoint=spec.checkpoint, checkpoint_every=spec.checkpoint_every,
        resume=args.resume, progress=_progress() and rank == 0, pad_id=spec.pad_id, parallel=spec.parallel,
        per_task_backward=spec.per_task_backward, autocast=spec.autocast,
    )
    if rank != 0:
        return  # rank 0 alone writes: every process holds the same λ and ℓ
    if history:
        logger.info("adapted %d steps; final loss %.4f", history[-1]["step"], history[-1]["loss"])
    _save_adapted(recipe, merged, out, spec.merge_state, args.force)


def _adapt_spec(recipe: Recipe, args: argparse.Namespace) -> AdaptSpec:
    """The recipe's ``adapt`` section with the command line's overrides (--merge-state and the step flags)."""
    spec = recipe.adapt or AdaptSpec(data="")
    flags = {"merge_state": Path(args.merge_state) if args.merge_state else None,
             "parallel": args.parallel, "pad_id": args.pad_id,
             "autocast": AUTOCAST[args.autocast] if args.autocast else None,
             "per_task_backward": True if args.per_task_backward else None}
    return dataclasses.replace(spec, **{k: v for k, v in flags.items() if v is not None})


@contextlib.contextmanager
def _process_group(device: str) -> Iterator[tuple[int, str]]:
    """Under torchrun (``WORLD_SIZE`` > 1), join the process group: yields (rank, this process's device).

    NCCL for CUDA (each process on ``cuda:LOCAL_RANK``), gloo otherwise. One process: (0, ``device``).
    """
    import torch.distributed as dist

    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1 or not dist.is_available() or dist.is_initialized():
        yield (dist.get_rank() if dist.is_available() and dist.is_initialized() else 0), device
        return
    if device.startswith("cuda") and ":" not in device:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    rank = dist.get_rank()
    if rank != 0:
        logging.getLogger("mergemodules").setLevel(logging.WARNING)  # logs and progress bars from rank 0
    try:
        yield rank, device
    finally:
        dist.destroy_process_group()


def _save_adapted(recipe: Recipe, merged: Any, out: Path, merge_state: Path | None, force: bool) -> None:
    """Write the merge state (if asked) and the fused model; if that fails, keep the adapted λ/ℓ and say where."""
    saved, writing = None, merge_state or out
    try:
        if merge_state is not None:
            with _writing(merge_state):
                save_merge_state(merged, merge_state)
            saved, writing = merge_state, out
            logger.info("wrote merge state %s", merge_state)
        _write_fused(recipe, merged.fuse(), out, force, recipe.out_dtype)
    except Exception as err:
        saved = saved or _save_fallback(merged)
        where = (f"the adapted merge state is in {str(saved)!r} (mergemodules fuse {saved} --recipe {recipe.path} "
                 "-o OUT writes the fused model)" if saved else "the adapted merge state could not be saved")
        raise CommandError(f"writing {str(writing)!r}: {_one_line(err)}; {where}",
                           EXIT_SYSTEM if isinstance(err, OSError) else EXIT_DATA) from err


def _save_fallback(merged: Any) -> Path | None:
    """Save the merge state to the temp folder (else the working folder); None if neither can be written."""
    name = f"mergemodules-adapted-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.safetensors"
    for folder in (tempfile.gettempdir(), os.getcwd()):
        try:
            return save_merge_state(merged, Path(folder) / name)
        except OSError as err:
            logger.warning("could not save the merge state in %s: %s", folder, err)
    return None


def _model_from_spec(spec: str, meta: bool) -> nn.Module:
    kind, sep, name = spec.partition(":")
    if not sep or kind not in MODEL_KINDS:
        raise CommandError(f"--model {spec!r}: expected KIND:NAME with KIND one of {list(MODEL_KINDS)}")
    return build_model(kind, name, meta=meta)


def cmd_fuse(args: argparse.Namespace) -> None:
    """Rebuild a merged model from a merge state and write its fused weights."""
    out, state = Path(args.output), Path(args.merge_state)
    if not state.is_file():
        raise CommandError(f"merge state {str(state)!r} does not exist or is not a file")
    inputs = {"the merge state": state}
    recipe, entries = None, None
    if args.recipe:
        recipe, _, entries = load_recipe(args.recipe)
        inputs.update(_recipe_inputs(recipe))
    elif args.model and args.model.startswith("hf:"):
        inputs["--model"] = Path(args.model[3:])
    elif not args.model:
        raise CommandError("fuse needs the architecture: --recipe RECIPE or --model KIND:NAME")
    _check_outputs([_Output("output", out, "folder" if recipe is not None and recipe.is_hf else "safetensors")],
                   inputs, args.force)
    model = _real_model(recipe, entries) if recipe is not None else _model_from_spec(args.model, meta=False)
    merged = load_merge_state(model, state)
    out_dtype = DTYPES[args.out_dtype] if args.out_dtype else recipe.out_dtype if recipe is not None else None
    _write_fused(recipe, merged.fuse(), out, args.force, out_dtype)


def _stored(method: Method, T: int, shape: tuple[int, ...]) -> tuple[int, int | None]:
    """(stored task terms, components kept per term; None for dense) of a matrix under ``method``, as its
    transform states them."""
    terms = method.transform.stored_terms(T)
    if method.matrices != "svd":
        return terms, None
    return terms, method.transform.stored_rank(resolve_rank(method.rank, shape[-2:]), T)


def memory_plan(entries: Sequence[Entry], method: Method, T: int, bytes_per: int) -> list[dict[str, Any]]:
    """Per tensor: how ``method`` merges it, the rank it keeps and the bytes the merged model holds."""
    rows = []
    for e in entries:
        numel = int(torch.Size(e.shape).numel())
        kind, rank, extra = "kept", "", 0
        layout = method_layout(e, method.matrix_set)  # the method's matrix set, not the rule's
        is_matrix = layout is not None
        if e.merged and is_matrix and method.matrices != "none":
            matrix = layout.matrix_shape(e.shape)
            terms, k = _stored(method, T, matrix)
            kind, rank = ("matrix, low-rank", str(k)) if k is not None else ("matrix, dense", "full")
            extra = terms * (numel if k is None else k * (sum(matrix) + 1))
        elif e.merged and is_matrix:
            kind = "matrix, base only"
        elif e.merged and method.dense:
            kind, extra = "dense", method.transform.stored_terms(T) * numel
        elif e.merged:
            kind = "base only"
        rows.append({"name": e.name, "shape": e.shape, "merged": kind, "rank": rank,
                     "bytes": (numel + extra) * bytes_per, "numel": numel})
    return rows


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def _print_plan(rows: list[dict[str, Any]], method: Method, T: int, bytes_per: int, show_all: bool) -> None:
    matrices = [r for r in rows if r["merged"].startswith("matrix")]
    total = sum(r["numel"] for r in rows)
    print(f"method {method.name}: base={method.base}, matrices={method.matrices}, rank={method.rank}, "
          f"coefficients={method.coefficients}, masks={method.masks}; T={T} tasks")
    shown = rows if show_all else matrices
    width = max([len(r["name"]) for r in shown] + [6])
    print(f"{'tensor':<{width}}  {'shape':<14} {'merged as':<18} {'rank':>6} {'memory':>12}")
    for r in shown:
        shape = "x".join(map(str, r["shape"]))
        print(f"{r['name']:<{width}}  {shape:<14} {r['merged']:<18} {r['rank']:>6} {_mib(r['bytes']):>12}")
    if not show_all:
        print(f"({len(rows) - len(matrices)} non-matrix tensors not shown; --all lists them)")
    matrix_numel = sum(r["numel"] for r in matrices)
    largest = max(r["numel"] for r in rows)
    print(f"{len(matrices)} of {len(rows)} tensors merged as matrices ({matrix_numel / max(total, 1):.0%} of "
          f"{total:,} weights)")
    print(f"plain (fused) model: {_mib(total * bytes_per)}")
    print(f"merged model held by merge() (B plus stored task terms): {_mib(sum(r['bytes'] for r in rows))}")
    print(f"streaming static export (mergemodules merge): about {_mib((T + 2) * largest * 4)} working memory "
          f"(T + 2 float32 copies of the largest tensor) plus its factors")


def cmd_inspect(args: argparse.Namespace) -> None:
    """Print which tensors are merged as matrices, their shapes, the kept ranks and the memory needed."""
    if args.recipe:
        recipe, _, entries = load_recipe(args.recipe, run_code=args.trust_code)
        if entries is None:
            raise CommandError(f"{recipe.path}: model.callable {recipe.model.name!r} is code and was not run; "
                               "inspect needs the model: pass --trust-code to run it (everything else checked)")
        method = _method(args.method or recipe.method, args.option)
        T = args.tasks or len(recipe.tasks)
        dtype = recipe.dtype or torch.float32
    elif args.model:
        model = _model_from_spec(args.model, meta=True)
        entries = plan(model)
        method = _method(args.method or "task_arithmetic", args.option)
        T = args.tasks or 8
        dtype = next(model.parameters()).dtype
    else:
        raise CommandError("inspect needs a RECIPE or --model KIND:NAME")
    bytes_per = torch.empty((), dtype=dtype).element_size()
    rows = memory_plan(entries, method, T, bytes_per)
    _print_plan(rows, method, T, bytes_per, args.all)


def _method(method: str | Method, pairs: Sequence[str] | None) -> Method:
    """``method`` with the ``--option KEY=VALUE`` pairs applied (values parsed as YAML scalars)."""
    options = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep:
            raise CommandError(f"--option {pair!r}: expected KEY=VALUE")
        options[key] = yaml.safe_load(value)
        if isinstance(options[key], float) and not math.isfinite(options[key]):
            raise CommandError(f"--option {pair!r}: not a finite number")
    try:
        return get_method(method, **options)
    except (KeyError, TypeError, ValueError) as err:
        raise CommandError(f"--method/--option: {_one_line(err)}") from None


def _report_plan(recipe: Recipe, entries: Sequence[Entry]) -> None:
    merged = [e for e in entries if e.merged]
    matrices = sum(method_layout(e, recipe.method.matrix_set) is not None for e in merged)
    logger.info("%s: %d tensors (%d merged, %d as matrices), %d tasks, method %s", recipe.path, len(entries),
                len(merged), matrices, len(recipe.tasks), recipe.method.name)


# ---------------------------------------------------------------------------------------------- main


def _verbosity(parser: argparse.ArgumentParser, default: Any) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-v", "--verbose", action="store_true", default=default, help="debug logging")
    group.add_argument("-q", "--quiet", action="store_true", default=default,
                       help="warnings and errors only, no progress bars")


def _dtype_flags(parser: argparse.ArgumentParser, compute: bool = True) -> None:
    if compute:
        parser.add_argument("--dtype", choices=sorted(DTYPES),
                            help="override the recipe's 'dtype': merge in it (default float32)")
    parser.add_argument("--out-dtype", choices=sorted(DTYPES),
                        help="override the recipe's 'out_dtype': write floating weights in it "
                             "(default: the base checkpoint's dtype of each tensor)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``mergemodules`` command."""
    parser = argparse.ArgumentParser(
        prog="mergemodules", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Merge fine-tuned checkpoints of one pretrained model (Task Arithmetic, TIES, TSV-M, CART, "
                    "AdaMerging, AdaRank, AWD) from a YAML recipe; adapt, inspect and fuse.",
    )
    _verbosity(parser, default=False)
    common = argparse.ArgumentParser(add_help=False)
    _verbosity(common, default=argparse.SUPPRESS)  # also accepted after the command, e.g. `merge -v`
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("merge", parents=[common], help="static merge of a recipe into a fused safetensors file (or HF folder)",
                       description="Merge the recipe's checkpoints with a static method, layer by layer from "
                                   "lazily read files, and write the fused weights under the base checkpoint's keys.")
    p.add_argument("recipe", help="YAML recipe (docs/recipes.md)")
    p.add_argument("-o", "--output",
                   help="output .safetensors file (HF models: a folder); default: the recipe's 'output'")
    p.add_argument("--check", action="store_true", help="validate the recipe and report the plan; merge nothing")
    p.add_argument("--trust-code", action="store_true", help=TRUST_HELP + " under --check")
    p.add_argument("--force", action="store_true", help=FORCE_HELP)
    p.add_argument("--max-shard-size", metavar="SIZE",
                   help="Hugging Face folder outputs: at most SIZE bytes of weights per file, e.g. 5GB, 500MB, 2GiB "
                        "or a number of bytes; larger outputs are written as model-0000k-of-0000n.safetensors shards "
                        "and model.safetensors.index.json (overrides the recipe's 'max_shard_size'; default 5GB)")
    _dtype_flags(p)
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("adapt", parents=[common], help="merge with an adaptive method and adapt λ/ℓ by entropy minimisation",
                       description="Test-time adaptation (AdaMerging, CART++, AdaRank): the recipe's 'adapt.data' "
                                   "callable returns {task name: Task(unlabeled data, head)}.")
    p.add_argument("recipe", help="YAML recipe with an 'adapt' section")
    p.add_argument("-o", "--output", help="fused output; default: the recipe's 'output'")
    p.add_argument("--data", help="override adapt.data: 'module:function' or 'file.py:function'")
    p.add_argument("--steps", type=_positive_int, help="override adapt.steps")
    p.add_argument("--resume", action="store_true", help="continue from adapt.checkpoint")
    p.add_argument("--merge-state", help="also save the adapted merge state (factors, λ, ℓ) here")
    p.add_argument("--parallel", choices=("data", "tasks"),
                   help="under torchrun: each process takes a slice of every task's batch (data, the default) or a "
                        "subset of the tasks (tasks); overrides adapt.parallel")
    p.add_argument("--per-task-backward", action="store_true",
                   help="backward after each task's forward: one task's activations alive at a time")
    p.add_argument("--autocast", choices=("bf16", "fp16"), help="adaptation forward in bf16/fp16 (entropy in float32)")
    p.add_argument("--pad-id", type=int, help="pad value of token batches of different lengths (default 0)")
    p.add_argument("--force", action="store_true", help=FORCE_HELP)
    _dtype_flags(p)
    p.set_defaults(func=cmd_adapt)

    p = sub.add_parser("inspect", parents=[common], help="show which tensors are merged as matrices, their ranks and memory",
                       description="Print the merge plan of a recipe's model (or of --model): tensors merged as "
                                   "matrices, shapes, ranks a method keeps, memory of the merged model.")
    p.add_argument("recipe", nargs="?", help="YAML recipe (or use --model)")
    p.add_argument("--model", help="KIND:NAME, e.g. timm:vit_base_patch16_224, open_clip:ViT-B-32, hf:path/to/folder")
    p.add_argument("--method", help="method to plan for (default: the recipe's, else task_arithmetic)")
    p.add_argument("--option", action="append", metavar="KEY=VALUE", help="method option, e.g. rank=0.08 (repeatable)")
    p.add_argument("--tasks", type=_positive_int, help="number of tasks T (default: the recipe's, else 8)")
    p.add_argument("--all", action="store_true", help="list every tensor, not only the matrices")
    p.add_argument("--trust-code", action="store_true", help=TRUST_HELP)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("fuse", parents=[common], help="write the fused weights of a saved merge state",
                       description="Rebuild a merged model from a merge state (save_merge_state) on the recipe's "
                                   "architecture and write its fused weights.")
    p.add_argument("merge_state", help="merge state file (.safetensors)")
    p.add_argument("-o", "--output", required=True, help="output .safetensors file (HF models: a folder)")
    p.add_argument("--recipe", help="recipe naming the architecture (and base weights for buffers)")
    p.add_argument("--model", help="KIND:NAME of the architecture instead of a recipe")
    p.add_argument("--force", action="store_true", help=FORCE_HELP)
    _dtype_flags(p, compute=False)
    p.set_defaults(func=cmd_fuse)
    return parser


@contextlib.contextmanager
def _cli_logging(verbose: bool, quiet: bool) -> Iterator[None]:
    """Log the package to stderr at the CLI's level while a command runs; restore the logger afterwards."""
    package = logging.getLogger("mergemodules")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    level = package.level
    package.setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)
    package.addHandler(handler)
    try:
        yield
    finally:
        package.removeHandler(handler)
        package.setLevel(level)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _one_line(err: BaseException) -> str:
    text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    return " ".join(line.strip() for line in text.splitlines() if line.strip()) or type(err).__name__


def _exit_code(err: BaseException) -> int | None:
    """The documented exit status of an error a user can cause; None for anything else (a bug: traceback)."""
    if isinstance(err, (RecipeError, CommandError)):
        return err.exit_code
    if isinstance(err, FileNotFoundError):
        return EXIT_USAGE
    if isinstance(err, (OSError, MemoryError)):
        return EXIT_SYSTEM
    if isinstance(err, (ValueError, KeyError, TypeError, RuntimeError, FloatingPointError, ImportError,
                        AttributeError, SafetensorError)):  # RuntimeError includes RecursionError
        return EXIT_DATA
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 unusable input files, 2 bad recipe or
    arguments, 3 the system refused, 130 interrupted), printing one line naming the file and key on error."""
    args = build_parser().parse_args(argv)
    with _cli_logging(args.verbose, args.quiet):
        try:
            args.func(args)
            return 0
        except KeyboardInterrupt:
            message, code = "interrupted", EXIT_INTERRUPTED
        except Exception as err:  # noqa: BLE001 - sorted by _exit_code; unknown errors keep their traceback
            code = _exit_code(err)
            if code is None or args.verbose and not isinstance(err, (RecipeError, CommandError)):
                raise
            message = _one_line(err)
    print(f"mergemodules {args.command}: error: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
