"""Test-time adaptation: the entropy objective and a multi-task adaptation loop.

AdaMerging, CART++ and AdaRank learn λ (and AdaRank's mask logits ℓ) by minimising
``Σ_tasks H(softmax(head_task(merged(x))))`` over small unlabeled batches of every task
(AdaRank Eq. 6, CART Algorithm 2). :func:`entropy` is that objective; :func:`adapt` is the
ready loop (Adam, one forward over all tasks' batches, progress, history, evaluation, checkpoint
and exact resume, several processes with ``torch.distributed``). A custom loop needs only
``merged.parameters()`` and :func:`entropy` (see ``examples/custom_tta_loop.py``).

Where the pieces live: the reproducible data streams in :mod:`mergemodules.streams`, batches and
their concatenation in :mod:`mergemodules.batches`, the processes in
:mod:`mergemodules.distributed`, the checkpoint in :mod:`mergemodules.tta_checkpoint`.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .batches import (Joined, call, concatenate, labelled, mixes_examples, outputs_match, split_output, to_device,
                      unlabeled_inputs)
from .distributed import World
from .layers import BaseMerged, weight_cache
from .methods import method_names
from .streams import Stream, derived_seed, isolated_rng, seeded_rng_state
from .tta_checkpoint import Checkpoint

__all__ = ["Task", "adapt", "entropy", "evaluate"]

logger = logging.getLogger(__name__)

BETAS = (0.9, 0.999)  # AdaMerging / AdaRank (appendix A)
AUTOCAST = (torch.bfloat16, torch.float16)


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


def _logits(
    name: str, head: Callable[[Any], Tensor], features: Callable[[], Any], inputs: Any,
    shapes: dict[str, tuple[int, int]] | None = None,
) -> Tensor:
    """``head(features())``, checked to be logits (batch, ..., classes) of the same rank and classes every call.

    A torch error in the model or head (an input of the wrong shape, say) becomes a ValueError naming the task.
    """
    try:
        logits = head(features())
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


def _check_numbers(steps: int, lr: float, eval_every: int | None, checkpoint_every: int | None, pad_id: int) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    for name, value in (("eval_every", eval_every), ("checkpoint_every", checkpoint_every)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
    if isinstance(pad_id, bool) or not isinstance(pad_id, int):
        raise ValueError(f"pad_id must be an integer token id, got {pad_id!r}")


def _check_options(
    tasks: Mapping[str, Task], eval_data: Mapping[str, Any] | None, eval_every: int | None,
    checkpoint: object, checkpoint_every: int | None, resume: bool, autocast: torch.dtype | None,
) -> None:
    if eval_every is not None and eval_data is None:
        raise ValueError("eval_every: give eval_data to evaluate on")
    if (checkpoint_every is not None or resume) and checkpoint is None:
        raise ValueError("checkpoint: give a file path to save to (or resume from)")
    if eval_data is not None:
        unknown = sorted(set(eval_data) - set(tasks))
        if unknown:
            raise KeyError(f"eval_data: no task called {unknown}; tasks: {sorted(tasks)}")
    if autocast is not None and autocast not in AUTOCAST:
        raise ValueError(f"autocast must be torch.bfloat16, torch.float16 or None, got {autocast!r}")


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
        inputs, labels = labelled(to_device(batch, device), name)
        logits = _logits(name, head, lambda: call(merged, inputs), inputs)
        correct += int((logits.argmax(-1) == labels).sum())
        total += labels.numel()
    if total == 0:
        raise ValueError(f"eval_data[{name!r}]: the data loader yielded no batch")
    return correct / total


def _device(merged: nn.Module) -> torch.device:
    for tensor in (*merged.parameters(), *merged.buffers()):
        return tensor.device
    return torch.device("cpu")


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Run the block with every module of ``model`` in eval mode (dropout off); the modes are restored after."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


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
    concat: bool = True,
    pad_id: int = 0,
    parallel: str | None = None,
    per_task_backward: bool = False,
    autocast: torch.dtype | None = None,
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
            is checked), this call (seed, lr) and this world (processes, ``parallel``); a mismatch is a
            ValueError saying which part differs.
        progress: show a tqdm bar with the current loss.
        concat: run one forward over all tasks' batches joined (split again for the heads) where that
            gives each task's own forward: checked once per run (and once more for padded inputs) on a
            step's batches, else one forward per task.
        pad_id: the ``input_ids`` value that pads token inputs of different lengths to a common one
            for ``concat`` (with ``attention_mask`` 0): your tokenizer's ``pad_token_id``.
        parallel: with ``torch.distributed`` initialised and several processes, ``"data"`` (default:
            each process takes a slice of every task's batch) or ``"tasks"`` (each a subset of tasks).
        per_task_backward: one task's activations alive at a time: backward after each task's forward,
            the merged weights still evaluated once per step (their gradients gathered, then passed to
            λ and ℓ once).
        autocast: ``torch.bfloat16`` or ``torch.float16`` to run the adaptation forward under
            ``torch.autocast`` (the merged weights and the entropy stay in float32).

    Raises:
        FloatingPointError: the loss or a gradient is NaN/Inf; the model keeps the last good λ and ℓ.
    """
    _check_tasks(tasks)
    _check_numbers(steps, lr, eval_every, checkpoint_every, pad_id)
    _check_options(tasks, eval_data, eval_every, checkpoint, checkpoint_every, resume, autocast)
    world = World.current(parallel)
    run = _Adaptation(merged, tasks, lr=lr, seed=seed, world=world, concat=concat, pad_id=pad_id,
                      per_task_backward=per_task_backward, autocast=autocast)
    saver = None if checkpoint is None else Checkpoint(checkpoint, merged, seed=seed, lr=lr, names=run.names,
                                                       world=world)
    with torch.random.fork_rng(devices=run.cuda):
        history: list[dict[str, Any]] = []
        start = 0
        if resume:
            history, start = saver.resume(run.params, run.optimizer, run.streams, run.cuda, steps)
        else:
            run.seed_rng()
            if eval_data is not None:
                history.append({"step": 0, "accuracy": run.evaluate(eval_data, 0)})
        run.log("adapting %d learnables on %d tasks, steps %d to %d (%s)", sum(p.numel() for p in run.trainable),
                len(tasks), start + 1, steps, run.describe())
        bar = tqdm(total=steps, initial=start, desc="adapt", unit="step", disable=not progress or world.rank != 0)
        with bar:
            for step in range(start + 1, steps + 1):
                record = run.step(step)
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}")
                if eval_data is not None and _due(step, steps, eval_every):
                    record["accuracy"] = run.evaluate(eval_data, step)
                    run.log("step %d: loss %.4f, accuracy %s", step, record["loss"], record["accuracy"])
                history.append(record)
                if saver is not None and _due(step, steps, checkpoint_every):
                    saver.save(step, history, run.params, run.optimizer, run.streams, run.cuda)
    return history


def _due(step: int, last: int, every: int | None) -> bool:
    """Whether something done every ``every`` steps and at the last step is due."""
    return step == last or (every is not None and step % every == 0)


class _Adaptation:
    """One adaptation run on this process: its tasks' streams, the optimiser, and :meth:`step`."""

    def __init__(
        self, merged: nn.Module, tasks: Mapping[str, Task], *, lr: float, seed: int, world: World, concat: bool,
        pad_id: int, per_task_backward: bool, autocast: torch.dtype | None,
    ) -> None:
        self.merged, self.seed, self.world = merged, seed, world
        self.names = list(tasks)
        self.heads = {name: task.head for name, task in tasks.items()}
        self.streams = {name: Stream(name, tasks[name].data, seed) for name in world.tasks(self.names)}
        self.params = dict(merged.named_parameters())
        self.trainable = [p for p in self.params.values() if p.requires_grad]
        if not self.trainable:
            adaptive = ", ".join(method_names(lambda method: method.is_adaptive))
            raise ValueError(f"merged has no trainable parameters: merge with an adaptive method ({adaptive})")
        self.optimizer = torch.optim.Adam(self.trainable, lr=lr, betas=BETAS)
        self.device = _device(merged)
        self.cuda = [self.device.index or 0] if self.device.type == "cuda" else []
        self.pad_id, self.per_task_backward, self.autocast = pad_id, per_task_backward, autocast
        self.tensors = [m for m in merged.modules() if isinstance(m, BaseMerged)]
        self.shapes: dict[str, tuple[int, int]] = {}
        mixing = mixes_examples(merged)
        self.concat = concat and not per_task_backward and mixing is None
        self.checked: dict[bool, bool] = {}  # padded? → whether one joined forward gives the tasks' own
        if mixing is not None and concat:
            self.log("one forward per task: module %r mixes the examples of a batch (batch statistics)", mixing)
        if mixing is not None and world.parallel == "data" and world.rank == 0:
            warnings.warn(f"parallel='data': module {mixing!r} uses batch statistics, so each process normalises "
                          "its own slice (as DistributedDataParallel without SyncBatchNorm)", stacklevel=3)
        world.broadcast(self.trainable)  # every process starts from rank 0's λ and ℓ

    def log(self, message: str, *args: Any) -> None:
        """Log on rank 0 only."""
        if self.world.rank == 0:
            logger.info(message, *args)

    def describe(self) -> str:
        """How a step runs, in words (for the log)."""
        how = "per-task backward" if self.per_task_backward else "joined forward" if self.concat else "per-task forward"
        if self.world.size > 1:
            how += f", {self.world.size} processes, parallel={self.world.parallel!r}"
        return how + (f", autocast {self.autocast}" if self.autocast else "")

    def seed_rng(self) -> None:
        """Seed the forward pass's randomness for a new run (each process its own)."""
        seed = self.world.seed(self.seed)
        torch.set_rng_state(torch.Generator().manual_seed(seed).get_state())
        if self.cuda:
            with torch.cuda.device(self.cuda[0]):
                torch.cuda.manual_seed(seed)

    def evaluate(self, eval_data: Mapping[str, Iterable[Any]], step: int) -> dict[str, float]:
        """:func:`evaluate` under its own random state (it never changes the adaptation), tasks split by process."""
        mine = {name: eval_data[name] for name in self.world.round_robin(list(eval_data))}
        with torch.random.fork_rng(devices=self.cuda), \
                isolated_rng(seeded_rng_state(derived_seed(self.seed, "eval", step))):
            accuracy = evaluate(self.merged, self.heads, mine)
        for part in self.world.gather(accuracy):
            accuracy.update(part)
        return {name: accuracy[name] for name in eval_data}

    # ----------------------------------------------------------------------------------------- step

    def step(self, step: int) -> dict[str, Any]:
        """One Adam step on Σ_tasks entropy; nothing is written to the model if anything is not finite."""
        inputs = self._inputs()
        with torch.autocast(self.device.type, dtype=self.autocast) if self.autocast else contextlib.nullcontext():
            if self.per_task_backward:
                grads, entropies = self._per_task_backward(inputs)
            else:
                grads, entropies = self._joint_backward(inputs, self._joined(inputs))
        grads, values = self._reduce(grads, entropies)
        bad = [name for name, value in values.items() if not math.isfinite(value)]
        if bad:
            raise FloatingPointError(f"adapt: the loss is not finite at step {step} (tasks {sorted(bad)}); "
                                     f"the model keeps λ and ℓ of step {step - 1}")
        finite = [torch.isfinite(g).all() for g in grads if g is not None]
        if finite and not bool(torch.stack(finite).all()):
            raise FloatingPointError(
                f"adapt: a gradient is not finite at step {step}; the model keeps λ and ℓ of step {step - 1}"
            )
        for p, g in zip(self.trainable, grads):
            p.grad = g
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"step": step, "loss": sum(values.values()), "entropy": values}

    def _inputs(self) -> dict[str, tuple[Any, float]]:
        """This process's share of the next batch of each of its tasks: name → (inputs, weight in the loss)."""
        shares = {}
        for name, stream in self.streams.items():
            share = self.world.share(unlabeled_inputs(stream.next()), name)
            if share is not None:
                shares[name] = (to_device(share[0], self.device), share[1])
        return shares

    def _joined(self, inputs: Mapping[str, tuple[Any, float]]) -> Joined | None:
        """The tasks' inputs as one batch, where one forward over it was found to give each task's own forward."""
        if not self.concat or len(inputs) < 2:
            return None
        parts = [x for x, _ in inputs.values()]
        joined = concatenate(parts, self.pad_id)
        if joined is None:
            return None
        padded = joined.lengths is not None
        if padded not in self.checked:
            self.checked[padded] = self._reproduces(parts, joined)
            joined_batches = "the padded, joined batches" if padded else "the joined batches"
            self.log("one forward over %s of all tasks" if self.checked[padded] else
                     "one forward per task: a forward over %s does not give the tasks' own", joined_batches)
        return joined if self.checked[padded] else None

    def _reproduces(self, parts: list[Any], joined: Joined) -> bool:
        """Whether one forward over ``joined`` gives every part's own forward (no gradient, dropout off, RNG kept)."""
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=self.cuda), _eval_mode(self.merged), weight_cache():
                together = split_output(call(self.merged, joined.inputs), joined)
                return together is not None and all(outputs_match(t, call(self.merged, x))
                                                    for t, x in zip(together, parts))
        except (RuntimeError, ValueError, TypeError):  # a model that cannot take the joined batch: one forward per task
            return False

    def _forward(self, inputs: Mapping[str, tuple[Any, float]], joined: Joined | None) -> dict[str, Tensor]:
        """Every task's logits: from one forward over ``joined`` if given, else one forward per task."""
        parts = None if joined is None else split_output(call(self.merged, joined.inputs), joined)
        if parts is None:
            return {name: _logits(name, self.heads[name], lambda x=x: call(self.merged, x), x, self.shapes)
                    for name, (x, _) in inputs.items()}
        return {name: _logits(name, self.heads[name], lambda p=p: p, x, self.shapes)
                for (name, (x, _)), p in zip(inputs.items(), parts)}

    def _joint_backward(
        self, inputs: Mapping[str, tuple[Any, float]], joined: Joined | None
    ) -> tuple[list[Tensor | None], dict[str, Tensor]]:
        """The gradient of Σ weight·entropy over every task's forward, all alive at once (one weight_cache block)."""
        with weight_cache():  # every merged weight is evaluated once for all tasks of the step
            logits = self._forward(inputs, joined)
            entropies = {name: weight * entropy(logits[name]) for name, (_, weight) in inputs.items()}
            if not entropies:
                return [None] * len(self.trainable), {}
            loss = torch.stack(list(entropies.values())).sum()
            _check_depends(loss)
            grads = torch.autograd.grad(loss, self.trainable, allow_unused=True)
        return list(grads), {name: h.detach() for name, h in entropies.items()}

    def _per_task_backward(
        self, inputs: Mapping[str, tuple[Any, float]]
    ) -> tuple[list[Tensor | None], dict[str, Tensor]]:
        """The same gradient with one task's activations alive at a time.

        Every merged tensor is evaluated once; the forwards read a detached leaf of it that gathers its
        gradient over the tasks' backward passes, and one final backward takes those gradients to λ and ℓ.
        """
        values = {m: m() for m in self.tensors}
        leaves = {m: v.detach().requires_grad_() if v.requires_grad else v for m, v in values.items()}
        learning = [leaf for m, leaf in leaves.items() if values[m].requires_grad]
        entropies = {}
        with weight_cache(leaves):
            for name, (x, weight) in inputs.items():
                h = weight * entropy(_logits(name, self.heads[name], lambda: call(self.merged, x), x, self.shapes))
                _check_depends(h)
                if learning:
                    torch.autograd.backward(h, inputs=learning)
                entropies[name] = h.detach()
        used = [(values[m], leaves[m].grad) for m in values if values[m].requires_grad and leaves[m].grad is not None]
        if not used:
            return [None] * len(self.trainable), entropies
        grads = torch.autograd.grad([v for v, _ in used], self.trainable, [g for _, g in used], allow_unused=True)
        return list(grads), entropies

    def _reduce(
        self, grads: list[Tensor | None], entropies: Mapping[str, Tensor]
    ) -> tuple[list[Tensor | None], dict[str, float]]:
        """The gradients and the tasks' entropies summed over the processes: as one process would find them."""
        if self.world.size == 1:
            return grads, {name: float(h) for name, h in entropies.items()}
        dtype, device = self.trainable[0].dtype, self.trainable[0].device
        pieces = [torch.zeros(p.numel(), dtype=dtype, device=device) if g is None else g.reshape(-1).to(dtype)
                  for p, g in zip(self.trainable, grads)]
        counts = [float(g is not None) for g in grads]  # a gradient no process has stays None (Adam skips it)
        found = [entropies[name].reshape(1).to(dtype) if name in entropies else torch.zeros(1, dtype=dtype,
                 device=device) for name in self.names]
        flat = torch.cat(pieces + found + [torch.tensor(counts, dtype=dtype, device=device)])
        self.world.all_reduce(flat)
        sizes = [p.numel() for p in self.trainable]
        summed = flat[: sum(sizes)].split(sizes)
        values = flat[sum(sizes): sum(sizes) + len(self.names)].tolist()
        present = flat[sum(sizes) + len(self.names):].tolist()
        grads = [g.view_as(p).to(p.dtype) if n > 0 else None for g, p, n in zip(summed, self.trainable, present)]
        return grads, dict(zip(self.names, values))


def _check_depends(loss: Tensor) -> None:
    if not loss.requires_grad:
        raise ValueError("adapt: the loss does not depend on merged.parameters() (does a head detach its input?)")
