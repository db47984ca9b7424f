"""Test-time adaptation: the entropy objective and a multi-task adaptation loop.

AdaMerging, CART++ and AdaRank learn λ (and AdaRank's mask logits ℓ) by minimising
``Σ_tasks H(softmax(head_task(merged(x))))`` over small unlabeled batches of every task
(AdaRank Eq. 6, CART Algorithm 2). :func:`entropy` is that objective; :func:`adapt` is the
ready loop (Adam, progress, history, evaluation, checkpoint and exact resume). A custom loop
needs only ``merged.parameters()`` and :func:`entropy` (see ``examples/custom_tta_loop.py``).

Reproducible data: each task's loader is read under its own random state, seeded from
``(seed, task name, pass over the data)`` at the start of every pass; the torch, ``random`` and
NumPy global generators and any ``torch.Generator`` attached to a ``DataLoader`` or its sampler
are seeded so. A resumed run re-creates the current pass and skips the batches already used,
so the loaders must give the same batches for the same random state (true of map-style and
deterministic iterable datasets; not of ``persistent_workers=True`` loaders with random
augmentations in the workers).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

try:
    import numpy as np
except ImportError:  # NumPy is optional; without it there is no NumPy generator to manage
    np = None

from .io import atomic_write
from .layers import _Merged, weight_cache

__all__ = ["Task", "adapt", "entropy", "evaluate"]

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "mergemodules.tta/1"
BETAS = (0.9, 0.999)  # AdaMerging / AdaRank (appendix A)


def entropy(logits: Tensor, dim: int = -1) -> Tensor:
    """Mean Shannon entropy of ``softmax(logits)`` along ``dim`` (AdaRank Eq. 6), a float32 scalar.

    Computed in float32 through ``log_softmax`` whatever the input dtype, so fp16/bf16 logits of
    any magnitude give a finite value; classes with logit ``-inf`` contribute exactly 0.
    """
    if not isinstance(logits, Tensor) or not logits.dtype.is_floating_point:
        raise TypeError(f"logits must be a floating-point tensor, got {type(logits).__name__} "
                        f"{getattr(logits, 'dtype', '')}".rstrip())
    log_p = torch.log_softmax(logits.float(), dim=dim)
    # p·log p with p = 0 is 0; clamping keeps 0 · (−inf) from becoming NaN
    return -(log_p.exp() * log_p.clamp_min(torch.finfo(torch.float32).min)).sum(dim).mean()


@dataclass
class Task:
    """One task to adapt on: its unlabeled batches and the head mapping the merged output to logits.

    ``data`` is re-iterable (a ``DataLoader``, a list of batches); a batch is an input tensor, a
    tuple/list whose first element is the input (labels are ignored), or a mapping of keyword
    arguments (a ``"labels"`` key is dropped). ``head`` returns logits (batch, ..., classes).
    """

    data: Iterable[Any]
    head: Callable[[Any], Tensor]


# ----------------------------------------------------------------------------------------- batches


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _call(model: Callable[..., Any], inputs: Any) -> Any:
    if isinstance(inputs, Mapping):
        return model(**inputs)
    return model(inputs)


def _unlabeled_inputs(batch: Any) -> Any:
    """The model input of an unlabeled batch (see :class:`Task`)."""
    if isinstance(batch, Mapping):
        return {k: v for k, v in batch.items() if k != "labels"}
    if isinstance(batch, (list, tuple)):
        if not batch:
            raise ValueError("a batch is an empty tuple/list")
        return batch[0]
    return batch


def _labelled(batch: Any, name: str) -> tuple[Any, Tensor]:
    """(inputs, labels) of a labelled batch: a pair ``(x, y)`` or a mapping with ``"labels"``."""
    if isinstance(batch, Mapping) and "labels" in batch:
        return {k: v for k, v in batch.items() if k != "labels"}, batch["labels"]
    if isinstance(batch, (list, tuple)) and len(batch) == 2:
        return batch[0], batch[1]
    raise ValueError(f"eval_data[{name!r}]: a labelled batch must be (inputs, labels) or a mapping with 'labels', "
                     f"got {type(batch).__name__}")


def _logits(
    head: Callable[[Any], Tensor],
    merged: nn.Module,
    inputs: Any,
    name: str,
    shapes: dict[str, tuple[int, int]] | None = None,
) -> Tensor:
    """``head(merged(inputs))``, checked to be logits (batch, ..., classes) of the same rank and classes every call.

    A torch error in the model or head (an input of the wrong shape, say) becomes a ValueError naming the task.
    """
    try:
        logits = head(_call(merged, inputs))
    except torch.OutOfMemoryError:
        raise
    except RuntimeError as err:
        shape = f"an input of shape {tuple(inputs.shape)}" if isinstance(inputs, Tensor) else "its batch"
        raise ValueError(f"tasks[{name!r}]: the merged model and head failed on {shape}: {err}") from err
    if not isinstance(logits, Tensor) or not logits.dtype.is_floating_point or logits.dim() < 2:
        desc = f"shape {tuple(logits.shape)} {logits.dtype}" if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"tasks[{name!r}].head must return floating-point logits (batch, ..., classes), got {desc}")
    if logits.shape[-1] < 2:
        raise ValueError(f"tasks[{name!r}].head returned logits with {logits.shape[-1]} class; "
                         "entropy needs at least 2")
    if shapes is not None:
        shape = shapes.setdefault(name, (logits.dim(), logits.shape[-1]))
        if shape != (logits.dim(), logits.shape[-1]):
            raise ValueError(f"tasks[{name!r}].head returned logits of shape {tuple(logits.shape)}, earlier "
                             f"{shape[0]}-D logits with {shape[1]} classes: one task must keep one logit shape")
    return logits


# -------------------------------------------------------------------------------------- randomness


def _derived_seed(*parts: object) -> int:
    """A 63-bit seed that depends on every part (stable across processes, unlike ``hash``)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _seeded_state(seed: int) -> dict[str, Any]:
    """Global-RNG states (torch CPU, ``random``, NumPy) as seeding each with ``seed`` would leave them."""
    state = {"torch": torch.Generator().manual_seed(seed).get_state(), "random": random.Random(seed).getstate()}
    if np is not None:
        state["numpy"] = np.random.RandomState(seed % 2**32).get_state()
    return state


def _current_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "random": random.getstate()}
    if np is not None:
        state["numpy"] = np.random.get_state()
    return state


def _set_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["random"])
    if np is not None:
        np.random.set_state(state["numpy"])


@contextlib.contextmanager
def _global_rng(state: dict[str, Any]) -> Iterator[None]:
    """Run the block with the global generators in ``state``; afterwards ``state`` holds where they got."""
    saved = _current_state()
    _set_state(state)
    try:
        yield
    finally:
        state.update(_current_state())
        _set_state(saved)


def _loader_generators(data: object) -> list[torch.Generator]:
    """``torch.Generator``s a ``DataLoader`` shuffles or seeds its workers with."""
    found: list[torch.Generator] = []
    batch_sampler = getattr(data, "batch_sampler", None)
    for owner in (data, getattr(data, "sampler", None), getattr(batch_sampler, "sampler", None)):
        gen = getattr(owner, "generator", None)
        if isinstance(gen, torch.Generator) and all(gen is not g for g in found):
            found.append(gen)
    return found


class _Stream:
    """Endless, reproducible batches of one task: pass ``epoch`` is read under RNG seeded from (seed, name, epoch)."""

    def __init__(self, name: str, data: Iterable[Any], seed: int) -> None:
        self.name, self.data, self.seed = name, data, seed
        self.epoch, self.position = 0, 0  # the current pass and the batches used from it
        self._iterator: Iterator[Any] | None = None
        self._rng: dict[str, Any] = {}

    def state(self) -> dict[str, int]:
        """Where the stream is: enough to re-create it exactly."""
        return {"epoch": self.epoch, "position": self.position}

    def restore(self, state: Mapping[str, int]) -> None:
        """Continue at a saved position (the pass is re-created lazily and the used batches skipped)."""
        self.epoch, self.position, self._iterator = int(state["epoch"]), int(state["position"]), None

    def _start_pass(self, epoch: int) -> None:
        seed = _derived_seed(self.seed, self.name, epoch)
        self._rng = _seeded_state(seed)
        with _global_rng(self._rng):
            for i, gen in enumerate(_loader_generators(self.data)):
                gen.manual_seed(_derived_seed(seed, i))
            self._iterator = iter(self.data)
        self.epoch = epoch

    def _fetch(self) -> Any:
        with _global_rng(self._rng):
            return next(self._iterator)

    def next(self) -> Any:
        """The next batch; a new pass starts when the loader is exhausted."""
        if self._iterator is None:
            self._start_pass(self.epoch)
            for skipped in range(self.position):
                try:
                    self._fetch()
                except StopIteration:
                    raise ValueError(
                        f"tasks[{self.name!r}]: cannot resume, its data gave {skipped} batches in pass {self.epoch} "
                        f"but the checkpoint had used {self.position}"
                    ) from None
        try:
            batch = self._fetch()
        except StopIteration:
            if self.position == 0:
                raise ValueError(f"tasks[{self.name!r}]: the data loader yielded no batch") from None
            self._start_pass(self.epoch + 1)
            self.position = 0
            try:
                batch = self._fetch()
            except StopIteration:
                raise ValueError(
                    f"tasks[{self.name!r}]: the data loader yielded no batch in pass {self.epoch}"
                ) from None
        self.position += 1
        return batch


# ---------------------------------------------------------------------------------------- checking


def _check_tasks(tasks: Mapping[str, Task]) -> None:
    if not isinstance(tasks, Mapping) or not tasks:
        raise ValueError("tasks: need a non-empty mapping of task name → Task(data, head)")
    for name, task in tasks.items():
        if not isinstance(task, Task):
            raise TypeError(f"tasks[{name!r}] must be a Task(data, head), got {type(task).__name__}")
        if task.head is None or not callable(task.head):
            raise ValueError(f"tasks[{name!r}] has no head: give the module that maps the merged output to logits")
        if task.data is None:
            raise ValueError(f"tasks[{name!r}] has no data: give an unlabeled data loader")
        if not isinstance(task.data, Iterable) or isinstance(task.data, Iterator):
            raise TypeError(f"tasks[{name!r}].data must be re-iterable (a DataLoader or a list of batches), "
                            f"got {type(task.data).__name__}")


def _check_numbers(steps: int, lr: float, eval_every: int | None, checkpoint_every: int | None) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    for name, value in (("eval_every", eval_every), ("checkpoint_every", checkpoint_every)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise ValueError(f"{name} must be a positive integer or None, got {value!r}")


# ------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(
    merged: nn.Module, heads: Mapping[str, Callable[[Any], Tensor]], data: Mapping[str, Iterable[Any]]
) -> dict[str, float]:
    """Top-1 accuracy of every task's head on its labelled batches ``(inputs, labels)``."""
    unknown = sorted(set(data) - set(heads))
    if unknown:
        raise KeyError(f"eval_data: no task (head) called {unknown}; tasks: {sorted(heads)}")
    device = _device(merged)
    accuracy = {}
    with weight_cache():  # the weights do not change during evaluation: compute each once
        for name, batches in data.items():
            accuracy[name] = _accuracy(merged, heads[name], batches, name, device)
    return accuracy


def _accuracy(
    merged: nn.Module, head: Callable[[Any], Tensor], batches: Iterable[Any], name: str, device: torch.device
) -> float:
    correct = total = 0
    for batch in batches:
        inputs, labels = _labelled(_to_device(batch, device), name)
        logits = _logits(head, merged, inputs, name)
        correct += int((logits.argmax(-1) == labels).sum())
        total += labels.numel()
    if total == 0:
        raise ValueError(f"eval_data[{name!r}]: the data loader yielded no batch")
    return correct / total


def _device(merged: nn.Module) -> torch.device:
    for tensor in (*merged.parameters(), *merged.buffers()):
        return tensor.device
    return torch.device("cpu")


# -------------------------------------------------------------------------------------- checkpoint


def _digest(tensor: Tensor, samples: int = 16) -> str:
    """A short hash of a tensor's shape, dtype and ``samples`` evenly spaced values (exact, device-independent)."""
    flat = tensor.detach().reshape(-1)
    index = torch.linspace(0, max(flat.numel() - 1, 0), min(samples, flat.numel())).round().long()
    values = flat[index.to(flat.device)].double().cpu().tolist()
    return hashlib.sha256(repr((tuple(tensor.shape), str(tensor.dtype), values)).encode()).hexdigest()[:16]


def _fingerprint(merged: nn.Module) -> dict[str, Any]:
    """What identifies a merge, cheaply: the method's settings, the number of tasks and a digest of every stored
    tensor of the merged tensors (B, factors or Δ) from its shape, dtype and a few sampled values.
    """
    method = getattr(merged, "method", None)
    fields = [] if method is None else [f.name for f in dataclasses.fields(method) if f.name != "transform"]
    return {
        "method": {name: json.dumps(getattr(method, name), default=repr) for name in fields},
        "num_tasks": getattr(merged, "num_tasks", None),
        "tensors": {
            f"{name}.{key}": _digest(tensor)
            for name, module in merged.named_modules() if isinstance(module, _Merged)
            for key, tensor in module.named_buffers(recurse=False)
        },
    }


def _fingerprint_difference(saved: Mapping[str, Any], current: Mapping[str, Any]) -> str | None:
    """Which part of two merge fingerprints differs first, in words; None if they agree."""
    for option in sorted(set(saved["method"]) | set(current["method"])):
        old, new = saved["method"].get(option), current["method"].get(option)
        if old != new:
            return f"the method option {option!r} differs: checkpoint {old}, this merge {new}"
    if saved["num_tasks"] != current["num_tasks"]:
        return f"the number of tasks differs: checkpoint {saved['num_tasks']}, this merge {current['num_tasks']}"
    names = sorted(set(saved["tensors"]) ^ set(current["tensors"]))
    if names:
        return f"the stored tensors differ: {names[:5]} are in only one of them"
    changed = [name for name, digest in current["tensors"].items() if saved["tensors"][name] != digest]
    if changed:
        return f"the values of the stored tensors {changed[:5]} differ (B or factors: other checkpoints?)"
    return None


def _load_checkpoint(
    path: Path, *, seed: int, lr: float, names: list[str], params: Mapping[str, Tensor], fingerprint: dict[str, Any]
) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint: no file {str(path)!r} to resume from")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"checkpoint: cannot read {str(path)!r}: {exc}") from exc
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"checkpoint: {str(path)!r} is not a mergemodules adaptation checkpoint")
    for key, value in (("seed", seed), ("lr", lr), ("tasks", names)):
        if state[key] != value:
            raise ValueError(
                f"checkpoint: {str(path)!r} was written with {key}={state[key]!r}, this call has {key}={value!r}"
            )
    if "fingerprint" not in state:
        warnings.warn(f"checkpoint: {str(path)!r} predates merge fingerprints: cannot check that it belongs to "
                      "this merge", stacklevel=3)
    else:
        difference = _fingerprint_difference(state["fingerprint"], fingerprint)
        if difference is not None:
            raise ValueError(f"checkpoint: {str(path)!r} was written for another merge: {difference}")
    saved = {k: tuple(v.shape) for k, v in state["params"].items()}
    if saved != {k: tuple(v.shape) for k, v in params.items()}:
        raise ValueError(f"checkpoint: {str(path)!r} holds the learnables of another merged model")
    return state


def _resumable_state(
    named: Mapping[str, Tensor], optimizer: torch.optim.Optimizer, streams: Mapping[str, _Stream], cuda: list[int]
) -> dict[str, Any]:
    """What an exact resume needs: λ and ℓ, the optimizer, the data positions and the random state."""
    return {
        "params": {k: v.detach().cpu().clone() for k, v in named.items()},
        "optimizer": optimizer.state_dict(),
        "streams": {name: s.state() for name, s in streams.items()},
        "rng": {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(cuda[0]) if cuda else None},
    }


def _restore(
    state: Mapping[str, Any], named: Mapping[str, Tensor], optimizer: torch.optim.Optimizer,
    streams: Mapping[str, _Stream], cuda: list[int],
) -> None:
    """Put back what :func:`_resumable_state` saved."""
    with torch.no_grad():
        for key, value in state["params"].items():
            named[key].copy_(value)
    optimizer.load_state_dict(state["optimizer"])
    for name, position in state["streams"].items():
        streams[name].restore(position)
    torch.set_rng_state(state["rng"]["torch"])
    if cuda and state["rng"]["cuda"] is not None:
        torch.cuda.set_rng_state(state["rng"]["cuda"], device=cuda[0])


# ------------------------------------------------------------------------------------------ adapt


def adapt(
    merged: nn.Module,
    tasks: Mapping[str, Task],
    *,
    steps: int,
    lr: float = 1e-3,
    seed: int = 0,
    eval_data: Mapping[str, Iterable[Any]] | None = None,
    eval_every: int | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    checkpoint_every: int | None = None,
    resume: bool = False,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Adapt λ and ℓ of ``merged`` by minimising the sum of the tasks' entropies (AdaMerging, AdaRank Eq. 6).

    Each step draws one batch from every task (batch size = the loader's), evaluates the merged
    weights once, and takes one Adam step (betas 0.9, 0.999) on the trainable ``merged.parameters()``;
    heads are not trained. Returns the history: one dict per step with ``step``, ``loss`` and
    per-task ``entropy``, plus ``accuracy`` (per task) where ``eval_data`` was evaluated: at step 0,
    every ``eval_every`` steps and at the last step.

    Args:
        merged: the merged model (its parameters are the learnables).
        tasks: task name → :class:`Task` (unlabeled data, head).
        steps: total number of steps (a resumed run continues up to it).
        lr: Adam learning rate (AdaRank: 1e-3 vision, 5e-5 language).
        seed: seeds the data order and any randomness of the forward pass; the caller's global
            random state is left as it was.
        eval_data: task name → labelled batches ``(inputs, labels)`` for accuracy.
        eval_every: evaluate every N steps (default: only at the start and the end).
        checkpoint: file to save λ, ℓ, the optimizer, the data positions and the random state to.
        checkpoint_every: save every N steps (default: only at the end).
        resume: continue from ``checkpoint``; the result is bit-identical to an uninterrupted run. The
            checkpoint must belong to this merge (method options, tasks, stored tensors: a fingerprint
            is checked) and this call (seed, lr); a mismatch is a ValueError saying which part differs.
        progress: show a tqdm bar with the current loss.

    Raises:
        FloatingPointError: the loss or a gradient is NaN/Inf; the model keeps the last good λ and ℓ.
    """
    _check_tasks(tasks)
    _check_numbers(steps, lr, eval_every, checkpoint_every)
    if eval_every is not None and eval_data is None:
        raise ValueError("eval_every: give eval_data to evaluate on")
    if (checkpoint_every is not None or resume) and checkpoint is None:
        raise ValueError("checkpoint: give a file path to save to (or resume from)")
    heads = {name: task.head for name, task in tasks.items()}
    if eval_data is not None:
        unknown = sorted(set(eval_data) - set(tasks))
        if unknown:
            raise KeyError(f"eval_data: no task called {unknown}; tasks: {sorted(tasks)}")
    named = dict(merged.named_parameters())
    trainable = [p for p in named.values() if p.requires_grad]
    if not trainable:
        raise ValueError("merged has no trainable parameters: merge with an adaptive method "
                         "(adamerging_taskwise, adamerging_layerwise, cart_pp, adarank_ta, adarank_cart)")
    path = None if checkpoint is None else Path(checkpoint)
    if path is not None and not path.parent.is_dir():
        raise FileNotFoundError(f"checkpoint: folder {str(path.parent)!r} does not exist")
    device = _device(merged)
    names = list(tasks)
    streams = {name: _Stream(name, task.data, seed) for name, task in tasks.items()}
    shapes: dict[str, tuple[int, int]] = {}
    optimizer = torch.optim.Adam(trainable, lr=lr, betas=BETAS)
    cuda = [device.index or 0] if device.type == "cuda" else []
    fingerprint = _fingerprint(merged) if path is not None else None

    with torch.random.fork_rng(devices=cuda):
        history: list[dict[str, Any]] = []
        start = 0
        if resume:
            state = _load_checkpoint(path, seed=seed, lr=lr, names=names, params=named, fingerprint=fingerprint)
            if state["step"] > steps:
                raise ValueError(f"steps={steps} but the checkpoint {str(path)!r} is already at step {state['step']}")
            _restore(state, named, optimizer, streams, cuda)
            history, start = state["history"], state["step"]
            logger.info("resumed adaptation from %s at step %d", path, start)
        else:
            torch.set_rng_state(torch.Generator().manual_seed(seed).get_state())
            if cuda:
                torch.cuda.manual_seed(seed)
            if eval_data is not None:
                history.append({"step": 0, "accuracy": _evaluate_isolated(merged, heads, eval_data, seed, 0)})

        def save(step: int) -> None:
            state = {"format": CHECKPOINT_FORMAT, "step": step, "seed": seed, "lr": lr, "tasks": names}
            state["fingerprint"] = fingerprint
            state["history"] = history
            state.update(_resumable_state(named, optimizer, streams, cuda))
            atomic_write(path, lambda tmp: torch.save(state, tmp))
            logger.debug("saved adaptation checkpoint %s at step %d", path, step)

        logger.info("adapting %d learnables on %d tasks, steps %d to %d",
                    sum(p.numel() for p in trainable), len(tasks), start + 1, steps)
        bar = tqdm(total=steps, initial=start, desc="adapt", unit="step", disable=not progress)
        with bar:
            for step in range(start + 1, steps + 1):
                record = _step(merged, tasks, streams, shapes, trainable, optimizer, device, step)
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}")
                if eval_data is not None and _due(step, steps, eval_every):
                    record["accuracy"] = _evaluate_isolated(merged, heads, eval_data, seed, step)
                    logger.info("step %d: loss %.4f, accuracy %s", step, record["loss"], record["accuracy"])
                history.append(record)
                if path is not None and _due(step, steps, checkpoint_every):
                    save(step)
    return history


def _step(
    merged: nn.Module,
    tasks: Mapping[str, Task],
    streams: Mapping[str, _Stream],
    shapes: dict[str, tuple[int, int]],
    params: list[nn.Parameter],
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    step: int,
) -> dict[str, Any]:
    """One Adam step on Σ_tasks entropy; nothing is written to the model if anything is not finite."""
    batches = {name: _to_device(stream.next(), device) for name, stream in streams.items()}
    entropies: dict[str, Tensor] = {}
    with weight_cache():  # every merged weight is evaluated once for all tasks of the step
        for name, task in tasks.items():
            entropies[name] = entropy(_logits(task.head, merged, _unlabeled_inputs(batches[name]), name, shapes))
        loss = torch.stack(list(entropies.values())).sum()
        values = {name: float(h.detach()) for name, h in entropies.items()}
        if not math.isfinite(float(loss.detach())):
            bad = sorted(name for name, v in values.items() if not math.isfinite(v))
            raise FloatingPointError(f"adapt: the loss is not finite at step {step} (tasks {bad}); "
                                     f"the model keeps λ and ℓ of step {step - 1}")
        if not loss.requires_grad:
            raise ValueError("adapt: the loss does not depend on merged.parameters() (does a head detach its input?)")
        grads = torch.autograd.grad(loss, params, allow_unused=True)
    finite = [torch.isfinite(g).all() for g in grads if g is not None]
    if finite and not bool(torch.stack(finite).all()):
        raise FloatingPointError(
            f"adapt: a gradient is not finite at step {step}; the model keeps λ and ℓ of step {step - 1}"
        )
    for p, g in zip(params, grads):
        p.grad = g
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"step": step, "loss": float(loss.detach()), "entropy": values}


def _due(step: int, last: int, every: int | None) -> bool:
    """Whether something done every ``every`` steps and at the last step is due."""
    return step == last or (every is not None and step % every == 0)


def _evaluate_isolated(
    merged: nn.Module, heads: Mapping[str, Any], data: Mapping[str, Iterable[Any]], seed: int, step: int
) -> dict[str, float]:
    """:func:`evaluate` under its own random state, so evaluating never changes the adaptation."""
    with _global_rng(_seeded_state(_derived_seed(seed, "eval", step))):
        return evaluate(merged, heads, data)
