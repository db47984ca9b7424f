"""Build the merged tensor of every parameter from the pretrained and fine-tuned values.

:func:`prepare` is the set-up that ``merge()`` and ``fuse_streaming()`` share (the method, the plan,
the checks of every source, from shapes alone). Building works one tensor at a time: only that
tensor's values of all tasks are in memory together, so fine-tuned sources may be lazy checkpoints
(safetensors files), each tensor read when it is built.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .buffers import Workspace
from .decompose import compute_dtype, resolve_rank
from .layers import MergedTensor, MergedWeight, BaseMerged, check_finite
from .layouts import Layout
from .methods import Method, Transform, get_method
from .methods.ties import ChunkedTrim, Ties
from .safetensors_files import release_mapped_pages
from .sources import shapes_of
from .targets import Entry, Patterns, is_selected, method_layout, plan

__all__ = [
    "Preparation", "prepare", "fit_transform", "iter_merged_tensors", "check_sources",
    "as_source", "persistent_buffers", "merge_buffers", "propagates_non_finite", "uses_pretrained", "check_inputs",
    "Workspace",
]

Source = Mapping[str, Tensor]


def as_source(item: object, index: int, pretrained: nn.Module) -> Source:
    """A fine-tuned model or state dict as a name → tensor mapping, checking its architecture."""
    if isinstance(item, nn.Module):
        if type(item) is not type(pretrained):
            raise TypeError(
                f"finetuned[{index}] is a {type(item).__name__} but pretrained is a "
                f"{type(pretrained).__name__}: all models must share one architecture"
            )
        return item.state_dict()
    if isinstance(item, Mapping):
        return item
    raise TypeError(f"finetuned[{index}] must be an nn.Module or a state dict, got {type(item).__name__}")


def _lookup(source: Source, entry: Entry, label: str) -> Tensor | None:
    """The tensor of ``entry`` in ``source`` under any of its names; tied names present twice must agree."""
    found = [(name, source[name]) for name in entry.names if name in source]
    if not found:
        return None
    first, tensor = found[0]
    for other, value in found[1:]:
        if tensor.is_meta or value.is_meta:
            continue
        if value.shape != tensor.shape:
            difference = f"shapes {tuple(tensor.shape)} and {tuple(value.shape)}"
        elif not torch.equal(value, tensor):
            difference = f"max |difference| {float((tensor.double() - value.double()).abs().max()):.3g}"
        else:
            continue
        raise ValueError(
            f"{label}: the tied keys {first!r} and {other!r} hold different values ({difference}); the model "
            "shares one tensor between them: keep only the key whose value you mean"
        )
    return tensor


def check_sources(
    entries: Sequence[Entry], sources: Sequence[Source], model_keys: set[str], labels: Sequence[str] | None = None
) -> None:
    """Fail before any work on missing or extra keys, wrong shapes or non-float tensors.

    ``labels`` name the sources in the messages (default ``finetuned[i]``); sources may hold meta tensors.
    """
    merged = [e for e in entries if e.merged]
    for i, source in enumerate(sources):
        label = labels[i] if labels is not None else f"finetuned[{i}]"
        missing = [e.name for e in merged if _lookup(source, e, label) is None]
        if missing:
            raise KeyError(f"{label} is missing {len(missing)} key(s) of the pretrained model: {missing[:5]}")
        extra = sorted(set(source) - model_keys)
        if extra:
            raise KeyError(f"{label} has {len(extra)} key(s) the pretrained model lacks: {extra[:5]}")
        for entry in merged:
            tensor = _lookup(source, entry, label)
            if tuple(tensor.shape) != entry.shape:
                raise ValueError(
                    f"{label}[{entry.name!r}] has shape {tuple(tensor.shape)}, "
                    f"the pretrained model has {entry.shape}"
                )
            if not tensor.dtype.is_floating_point:
                raise TypeError(f"{label}[{entry.name!r}] has dtype {tensor.dtype}; merging needs floating point")


@dataclass(frozen=True)
class Preparation:
    """What a merge starts from: the method with its options, the fine-tuned sources and the plan, all checked."""

    method: Method
    sources: list[Source]
    entries: list[Entry]
    targets: Patterns = None
    exclude: Patterns = None

    def selected(self, name: str) -> bool:
        """Whether the tensor or buffer ``name`` is merged (``targets`` and ``exclude``)."""
        return is_selected(name, self.targets, self.exclude)


def prepare(
    pretrained: nn.Module, finetuned: Sequence[nn.Module | Mapping[str, Tensor]], method: str | Method = "task_arithmetic",
    *, targets: Patterns = None, exclude: Patterns = None, matrices: Mapping[str, str] | None = None, **options: Any,
) -> Preparation:
    """The set-up of ``merge()`` and ``fuse_streaming()`` (same arguments): the method, the plan, and the checks of
    every fine-tuned source against the plan, reading no tensor (a lazy checkpoint's header alone: its ``meta()``)."""
    method = get_method(method, **options)
    if not isinstance(finetuned, Sequence) or isinstance(finetuned, (str, bytes)) or len(finetuned) == 0:
        raise ValueError("finetuned: need a non-empty list of fine-tuned models or state dicts")
    sources = [as_source(item, i, pretrained) for i, item in enumerate(finetuned)]
    entries = plan(pretrained, targets, exclude, matrices)
    shapes = [shapes_of(source, f"finetuned[{i}]") for i, source in enumerate(sources)]
    check_sources(entries, shapes, set(pretrained.state_dict()))
    return Preparation(method, sources, entries, targets, exclude)


def persistent_buffers(model: nn.Module) -> dict[str, Tensor]:
    """Name → tensor of every buffer in ``model``'s state dict (BatchNorm statistics, ...), not merged tensors' own."""
    found = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, BaseMerged):
            continue
        for name, buffer in module._buffers.items():
            if buffer is not None and name not in module._non_persistent_buffers_set:
                found[f"{module_name}.{name}" if module_name else name] = buffer
    return found


def _warn_buffers(names: Sequence[str], what: str) -> None:
    if names:
        more = f" and {len(names) - 5} more" if len(names) > 5 else ""
        warnings.warn(f"buffer(s) {list(names[:5])}{more}: {what}", stacklevel=4)


def merge_buffers(
    buffers: Mapping[str, Tensor], sources: Sequence[Source], selected: Callable[[str], bool]
) -> dict[str, Tensor]:
    """The merged value of every buffer (README, "Buffers"), warning about fine-tuned values that are discarded.

    A floating-point buffer that ``selected`` merges is the mean of the fine-tuned models' values
    (in float64, cast back: BatchNorm variances stay positive, and identical values stay exact);
    integer and bool buffers (``num_batches_tracked``) and unselected buffers keep the pretrained value.
    """
    merged, discarded, absent = {}, [], []
    for name, value in buffers.items():
        merged[name] = value
        if not selected(name):
            continue
        found = {i: source[name] for i, source in enumerate(sources) if name in source}
        for i, tensor in found.items():
            if tuple(tensor.shape) != tuple(value.shape):
                raise ValueError(f"finetuned[{i}][{name!r}] has shape {tuple(tensor.shape)}, "
                                 f"the pretrained model has {tuple(value.shape)}")
            check_finite(tensor, f"finetuned[{i}][{name!r}]")
        if len(found) < len(sources):
            absent.append(name)
        elif value.dtype.is_floating_point:
            stacked = torch.stack([t.to(value.device, torch.float64) for t in found.values()])
            merged[name] = stacked.mean(dim=0).to(value.dtype)
        elif any(not torch.equal(t.to(value.device, value.dtype), value) for t in found.values()):
            discarded.append(name)
    _warn_buffers(discarded, "the fine-tuned models' values differ from the pretrained model's and are discarded "
                             "(integer buffers keep the pretrained value)")
    _warn_buffers(absent, "missing from some fine-tuned state dict; the pretrained values are kept")
    return merged


def _read_value(source: Source, entry: Entry, label: str, out: Tensor, check: bool) -> None:
    """Copy the tensor of ``entry`` in ``source`` into ``out``, checked (``check``: also for NaN/Inf) before any cast.

    A lazy checkpoint with ``read_into`` reads a tensor stored in ``out``'s dtype straight into it (not tied
    names, whose values :func:`_lookup` compares).
    """
    where = f"{label}[{entry.name!r}]"
    present = [name for name in entry.names if name in source]
    read_into = getattr(source, "read_into", None)
    if read_into is not None and len(present) == 1 and read_into(present[0], out):
        check_finite(out, where, check)  # the stored values themselves
        return
    out.copy_(check_finite(_lookup(source, entry, label), where, check))


def _task_values(
    entry: Entry, sources: Sequence[Source], like: Tensor, dtype: torch.dtype, check: bool,
    workspace: Workspace | None = None,
) -> Tensor:
    """The tensor of every source stacked (T, *shape) in ``dtype``, read one source at a time (lazy sources),
    in ``workspace`` when given, else in fresh memory.

    ``check``: each must be finite (else the values are checked only for a non-finite output: :func:`check_inputs`).
    """
    shape = (len(sources), *like.shape)
    if workspace is None:
        values = torch.empty(shape, dtype=dtype, device=like.device)
    else:
        values = workspace.empty(shape, dtype, like.device)
    for i, source in enumerate(sources):
        _read_value(source, entry, f"finetuned[{i}]", values[i], check)
    return values


def propagates_non_finite(method: Method) -> bool:
    """Whether every input a merged tensor is computed from shows in it as NaN/Inf when it holds one.

    True for sums and means with non-zero coefficients (an identity transform, no SVD): a merge by
    ``method`` may then check its inputs only when an output is not finite (:func:`check_inputs`).
    """
    return type(method.transform) is Transform and method.matrices != "svd" and method.scaling != 0


def uses_pretrained(entry: Entry, method: Method) -> bool:
    """Whether the merge of ``entry`` uses its pretrained values: not for a merged tensor of a method whose base is
    the average of the fine-tuned values (weight averaging, CART). Unused values are not checked for NaN/Inf, and a
    tensor merged in chunks does not read them (:func:`merge_in_chunks`)."""
    return not entry.merged or method.base == "pretrained"


def check_inputs(entry: Entry, pretrained: Tensor, sources: Sequence[Source], method: Method) -> None:
    """Raise the error the checks while building give for the first input of ``entry`` holding NaN or Inf."""
    if uses_pretrained(entry, method):
        check_finite(pretrained, f"pretrained[{entry.name!r}]")
    if entry.merged:
        for i, source in enumerate(sources):
            label = f"finetuned[{i}]"
            check_finite(_lookup(source, entry, label), f"{label}[{entry.name!r}]")


def _base_and_task_vectors(
    entry: Entry, pretrained: Tensor, sources: Sequence[Source], method: Method, vectors: bool = True,
    check: bool = True, workspace: Workspace | None = None, dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor | None]:
    """B and the task vectors θ_t − B of one tensor in ``dtype`` (default: float32, float64 for float64 models), B in
    its parameter layout.

    With ``vectors=False`` (a tensor without task term, e.g. under weight averaging) only B is computed.
    ``check=False``: the inputs the result is computed from are not checked for NaN/Inf (:func:`check_inputs`).
    Where B is the average, ``pretrained`` gives only the shape and device: its values are not read.
    The task vectors lie in ``workspace`` when given.
    """
    check_finite(pretrained, f"pretrained[{entry.name!r}]", check and uses_pretrained(entry, method))
    dtype = compute_dtype(pretrained.dtype) if dtype is None else dtype
    if not vectors and method.base == "pretrained":
        return pretrained.to(dtype), None  # the fine-tuned values are not used: not read
    values = _task_values(entry, sources, pretrained, dtype, check, workspace)
    base = pretrained.to(dtype) if method.base == "pretrained" else average(values)
    if not vectors:
        return base, None
    return base, values.sub_(base)  # in place: the stack is a fresh copy, and one T-fold copy is enough


class _CoefFactory:
    """Hands out λ Parameters: one shared (global, task-wise) or a new one per tensor (layer-wise)."""

    def __init__(self, method: Method) -> None:
        self.method = method
        self.shared: nn.Parameter | None = None

    def __call__(self, terms: int, like: Tensor) -> nn.Parameter:
        """λ for a tensor with ``terms`` task terms, in the compute dtype of ``like`` (float32 or float64)."""
        options = dict(device=like.device, dtype=compute_dtype(like.dtype))
        scope, scaling = self.method.coefficients, float(self.method.scaling)
        if scope == "layer":
            return nn.Parameter(torch.full((terms,), scaling, **options))
        if self.shared is None:
            init = torch.tensor(scaling, **options) if scope == "global" else torch.full((terms,), scaling, **options)
            self.shared = nn.Parameter(init)
        if scope == "task" and self.shared.shape != (terms,):
            raise ValueError(f"task-wise λ has {self.shared.numel()} entries but a tensor has {terms} task terms")
        return self.shared


def _mask_logits(method: Method, S: Tensor, shape: tuple[int, int], name: str) -> nn.Parameter | None:
    if not method.masks:
        return None
    k = S.shape[1]
    on = k if method.mask_rank is None else resolve_rank(method.mask_rank, shape, name="mask_rank", minimum=0)
    if on > k:
        raise ValueError(f"mask_rank keeps {on} components of {name!r} but only rank={k} are stored")
    logits = torch.full(S.shape, -method.mask_init, dtype=torch.float32, device=S.device)
    logits[:, :on] = method.mask_init
    return nn.Parameter(logits)


def _has_task_term(entry: Entry, method: Method) -> bool:
    """Whether ``method`` gives ``entry`` a task term (else it is its base: the pretrained value or the mean)."""
    layout = method_layout(entry, method.matrix_set)
    return entry.merged and (method.matrices != "none" if layout is not None else method.dense)


def _build_one(
    entry: Entry, pretrained: Tensor, sources: Sequence[Source], method: Method, transform: Transform,
    coefficients: _CoefFactory, check: bool = True, workspace: Workspace | None = None,
) -> BaseMerged:
    dtype = pretrained.dtype
    layout = method_layout(entry, method.matrix_set)
    with_term = _has_task_term(entry, method)
    if not entry.merged:
        base, task_vectors = check_finite(pretrained.detach(), f"pretrained[{entry.name!r}]", check), None
    else:
        base, task_vectors = _base_and_task_vectors(entry, pretrained.detach(), sources, method, with_term, check,
                                                    workspace)
    if layout is None:
        if not with_term:
            return MergedTensor(base.to(dtype))
        deltas = transform.vectors(entry.name, task_vectors, False)
        return MergedTensor(base.to(dtype), deltas, coefficients(deltas.shape[0], base), method.lambda_range)
    if not with_term:
        return MergedWeight(base.to(dtype), layout=layout)
    terms = layout.to_matrix(transform.vectors(entry.name, task_vectors, True), batch=1)
    coef = coefficients(terms.shape[0], base)
    if method.matrices == "dense":
        return MergedWeight(base.to(dtype), deltas=terms, coef=coef, layout=layout, coef_range=method.lambda_range)
    shape = tuple(terms.shape[1:])
    U, S, V = transform.factorize(terms, resolve_rank(method.rank, shape), method.svd, method.svd_options)
    return MergedWeight(
        base.to(dtype), U=U, S=S, V=V, coef=coef, mask_logits=_mask_logits(method, S, shape, entry.name),
        temperature=method.temperature, layout=layout, coef_range=method.lambda_range,
    )


CHUNK = 1 << 18  # entries per chunk of :func:`merge_in_chunks`: T float32 chunks of 1 MiB stay in the L2 cache


def chunk_bounds(n: int) -> list[tuple[int, int]]:
    """[start, stop) of the chunks of ``n`` entries: ``CHUNK`` each, the remainder joined to the last chunk.

    So the last entries lie in a chunk that ends where the tensor ends and is at least ``CHUNK`` long: torch's
    reductions and BLAS treat them as in the whole tensor (a short trailing chunk would take other code paths).
    """
    starts = list(range(0, n, CHUNK))
    if len(starts) > 1 and n - starts[-1] < CHUNK:
        starts.pop()
    return list(zip(starts, [*starts[1:], n]))


def trims_per_tensor(method: Method) -> bool:
    """Whether ``method`` is TIES with mergekit's per-tensor trim, whose merge needs of a tensor only itself."""
    return isinstance(method.transform, Ties) and method.transform.scope == "tensor" and method.matrices != "svd"


def is_average(entry: Entry, method: Method) -> bool:
    """Whether the merged value of ``entry`` is the average of the tasks' values (:func:`average`), as under weight
    averaging."""
    return entry.merged and method.base == "average" and not _has_task_term(entry, method)


def can_merge_in_chunks(entry: Entry, method: Method) -> bool:
    """Whether :func:`merge_in_chunks` gives ``entry`` the values of its module: an average (:func:`is_average`,
    any size: summed in order, its chunks do not change it), or a merged tensor of at least two chunks, a method
    whose merge is entrywise (:func:`propagates_non_finite`) or TIES trimmed per tensor (:func:`trims_per_tensor`),
    and a layout whose matrix keeps the stored order (not ``in_out``, whose matrix is the transpose)."""
    if is_average(entry, method):
        return True
    layout = method_layout(entry, method.matrix_set)
    return (entry.merged and (propagates_non_finite(method) or trims_per_tensor(method))
            and layout is not Layout.IN_OUT and math.prod(entry.shape) >= 2 * CHUNK)


def merge_in_chunks(
    entry: Entry, pretrained: Tensor, tasks: Sequence[Tensor], method: Method, dtype: torch.dtype,
    out_dtype: torch.dtype, workspace: Workspace | None = None, out: Tensor | None = None, mapped: bool = False,
) -> Tensor:
    """The static merge of ``entry`` (see :func:`can_merge_in_chunks`) computed chunk by chunk of its entries.

    ``pretrained`` and ``tasks`` are the stored tensors (any dtype, e.g. mapped from their files without being
    read): each chunk of them is cast to ``dtype``, merged as the entry's module merges (the same builder, on the
    chunk) in the compute dtype, rounded to ``dtype`` and then to ``out_dtype``. The T chunks stay in the cache
    from reading to merging and no input is copied whole: about twice as fast as the whole stack for a large
    tensor, with the same values bit for bit (``tests/test_merge_in_chunks.py``) — except in a half ``dtype``,
    where the module of a tensor merged whole computes in that dtype and this sums in float32 before rounding
    (weight averaging: the same values, rounded once either way). The inputs of an entrywise merge or an average
    are not checked for NaN/Inf (:func:`check_inputs`); those of TIES are, on a first pass that finds each task's
    trim (:class:`~mergemodules.methods.ties.ChunkedTrim`, two passes before the merge).
    The result goes into ``out`` (a contiguous tensor of the entry's shape and ``out_dtype``) when given.
    ``mapped``: the inputs are maps from :func:`~mergemodules.safetensors_files.map_stored_tensor`, whose pages are
    released once their chunk is used (:func:`~mergemodules.safetensors_files.release_mapped_pages`): the
    resident memory holds a chunk of each input, not T + 1 whole tensors.
    """
    n = math.prod(entry.shape)
    flat_pretrained, flat_tasks = pretrained.reshape(n), [task.reshape(n) for task in tasks]
    with_term, coefficients = _has_task_term(entry, method), _CoefFactory(method)
    if out is None:
        out = torch.empty(entry.shape, dtype=out_dtype, device=pretrained.device)
    elif tuple(out.shape) != tuple(entry.shape) or out.dtype != out_dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {tuple(entry.shape)} {out_dtype} tensor, got "
                         f"{tuple(out.shape)} {out.dtype}")
    flat_out = out.view(n)

    def release(start: int, stop: int) -> None:
        if mapped:
            for flat in (flat_pretrained, *flat_tasks):
                release_mapped_pages(flat[start:stop])

    if is_average(entry, method):  # summed straight from the inputs, no stack
        for start, stop in chunk_bounds(n):
            _average_into(flat_out[start:stop], [_read_as(task[start:stop], dtype) for task in flat_tasks], dtype,
                          workspace)
            release(start, stop)
        return out

    def chunks(check: bool = False) -> Iterator[tuple[slice, Tensor, Tensor | None]]:
        """(entries, B, task vectors) of each chunk in turn; the task vectors lie in ``workspace``."""
        for start, stop in chunk_bounds(n):
            chunk = Entry(entry.name, entry.aliases, (stop - start,), None, True)
            sources = [{entry.name: _read_as(task[start:stop], dtype)} for task in flat_tasks]
            pretrained_chunk = flat_pretrained[start:stop]
            if uses_pretrained(entry, method):  # else not read: a cast would read it
                pretrained_chunk = _read_as(pretrained_chunk, dtype)
            yield slice(start, stop), *_base_and_task_vectors(chunk, pretrained_chunk, sources, method, with_term,
                                                              check, workspace, compute_dtype(dtype))
            release(start, stop)

    trim = None
    if trims_per_tensor(method):
        passes = iter([True, False])  # the inputs are checked on the first pass
        trim = ChunkedTrim(lambda: (vectors for _, _, vectors in chunks(next(passes))),
                           int(method.transform.density * n))
    for entries, base, vectors in chunks():
        if trim is not None:
            vectors = trim.vectors(vectors)
        coef = None if vectors is None else coefficients(len(vectors), base)
        flat_out[entries] = MergedTensor(base, vectors, coef)().to(dtype)  # accumulated in float32, rounded to dtype
    return out


def _read_as(chunk: Tensor, dtype: torch.dtype) -> Tensor:
    """A stored chunk as a merge in ``dtype`` takes it: as stored where its values convert to the compute dtype
    exactly (the merge converts them on the fly, into its stack or sum), else rounded to ``dtype`` first."""
    compute = compute_dtype(dtype)
    return chunk if dtype == compute == torch.promote_types(chunk.dtype, compute) else chunk.to(dtype)


def average(values: Tensor | Sequence[Tensor], out: Tensor | None = None) -> Tensor:
    """The mean of ``values`` (tensors, or a stack's rows) summed in order and divided by their number, into ``out``
    when given: the average of weight averaging and CART, mergekit's ``linear`` bit for bit at any number of tasks
    (torch's ``mean(dim=0)`` sums more than 16 rows, and a tensor's last columns, in another order)."""
    total = values[0].clone() if out is None else out.copy_(values[0])
    for value in values[1:]:
        total.add_(value)
    return total.div_(len(values))


def _average_into(out: Tensor, values: Sequence[Tensor], dtype: torch.dtype, workspace: Workspace | None) -> None:
    """``out`` = :func:`average` of ``values`` (in ``dtype``) as a merge in ``dtype`` gives it: in its compute dtype,
    rounded to ``dtype``; straight from the inputs, without the stack's copy of each."""
    compute = compute_dtype(dtype)
    if out.dtype == compute == dtype:
        average(values, out)
        return
    total = torch.empty(out.shape, dtype=compute) if workspace is None else workspace.empty(out.shape, compute)
    out.copy_(average(values, total).to(dtype))


def fit_transform(
    entries: Sequence[Entry], pretrained: Mapping[str, Tensor], sources: Sequence[Source], method: Method
) -> Transform:
    """The method's transform fitted on the task vectors (relative to the method's base) of every merged entry."""

    def task_vectors() -> Iterator[tuple[str, Tensor, bool]]:
        for entry in entries:
            if entry.merged:
                values = pretrained[entry.name].detach()
                is_matrix = method_layout(entry, method.matrix_set) is not None
                yield entry.name, _base_and_task_vectors(entry, values, sources, method)[1], is_matrix

    with torch.no_grad():
        return method.transform.fit(task_vectors)


def iter_merged_tensors(
    entries: Sequence[Entry],
    pretrained: Mapping[str, Tensor],
    sources: Sequence[Source],
    method: Method,
    progress: bool = False,
    transform: Transform | None = None,
    check: bool = True,
    workspace: Workspace | None = None,
    skip: Callable[[Entry], bool] | None = None,
) -> Iterator[tuple[Entry, BaseMerged | None]]:
    """Build the merged tensor module of each entry in turn, reading ``pretrained[entry.name]`` lazily.

    The method's transform is fitted first (one pass over all task vectors) unless an already fitted
    ``transform`` is given; then one entry at a time is built, so a caller that drops each module
    keeps one tensor's values in memory. ``check=False`` leaves the check of the inputs for NaN/Inf to the
    caller, which evaluates each module and calls :func:`check_inputs` when its value is not finite (only
    for a method that :func:`propagates_non_finite`). With a ``workspace``, each module may hold tensors in it
    that the next one overwrites: drop (or copy out of it) each module's values before taking the next.
    An entry for which ``skip(entry)`` is true comes as ``(entry, None)``, nothing read or built for it.
    """
    if transform is None:
        transform = fit_transform(entries, pretrained, sources, method)
    coefficients = _CoefFactory(method)
    for entry in tqdm(entries, desc=f"merge ({method.name})", disable=not progress, unit="tensor"):
        if skip is not None and skip(entry):  # the caller merges it (e.g. merge_in_chunks)
            yield entry, None
            continue
        with torch.no_grad():
            module = _build_one(entry, pretrained[entry.name], sources, method, transform, coefficients, check,
                                 workspace)
        yield entry, module
