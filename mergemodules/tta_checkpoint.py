"""Checkpoints of test-time adaptation: what an exact resume needs, saved by rank 0 and checked on load.

A checkpoint holds λ and ℓ, the optimiser, every task's data position, every process's random state,
the history, the call's seed, lr and tasks, the world (processes and how they share a step) and a
fingerprint of the merge, so that resuming on another merge, call or world is an error saying which.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from .distributed import World
from .files import atomic_write
from .layers import BaseMerged
from .streams import Stream

__all__ = ["Checkpoint", "FORMAT"]

logger = logging.getLogger(__name__)

FORMAT = "mergemodules.tta/2"
_FORMAT_1 = "mergemodules.tta/1"  # one process; read for resume


def _digest(tensor: Tensor, samples: int = 16) -> str:
    """A short hash of a tensor's shape, dtype and ``samples`` evenly spaced values (exact, device-independent)."""
    flat = tensor.detach().reshape(-1)
    last, count = max(flat.numel() - 1, 0), min(samples, flat.numel())  # float64: exact positions past 2^24 entries
    index = torch.linspace(0, last, count, dtype=torch.float64).round().long()
    values = flat[index.to(flat.device)].double().cpu().tolist()
    return hashlib.sha256(repr((tuple(tensor.shape), str(tensor.dtype), values)).encode()).hexdigest()[:16]


def _current_name(key: str) -> str:
    """A learnable's name in checkpoints written before ``weight_merge``/``bias_merge`` became ``merged_weight``/``merged_bias``."""
    return key.replace(".weight_merge.", ".merged_weight.").replace(".bias_merge.", ".merged_bias.")


def fingerprint(merged: nn.Module) -> dict[str, Any]:
    """What identifies a merge, cheaply: the method's settings, the number of tasks and a digest of every stored
    tensor of the merged tensors (B, factors or Δ) from its shape, dtype and a few sampled values.
    """
    method = getattr(merged, "method", None)
    fields = [] if method is None else [f for f in dataclasses.fields(method) if f.name != "transform"]
    return {
        "method": {f.name: json.dumps(getattr(method, f.name), default=repr) for f in fields},
        # an option added after a checkpoint was written counts as its default there (e.g. lambda_range: None)
        "method_defaults": {f.name: json.dumps(f.default, default=repr) for f in fields
                            if f.default is not dataclasses.MISSING},
        "num_tasks": getattr(merged, "num_tasks", None),
        "tensors": {
            f"{name}.{key}": _digest(tensor)
            for name, module in merged.named_modules() if isinstance(module, BaseMerged)
            for key, tensor in module.named_buffers(recurse=False)
        },
    }


def _fingerprint_difference(saved: Mapping[str, Any], current: Mapping[str, Any]) -> str | None:
    """Which part of two merge fingerprints differs first, in words; None if they agree."""
    for option in sorted(set(saved["method"]) | set(current["method"])):
        old, new = saved["method"].get(option), current["method"].get(option)
        if option not in saved["method"] and new == current.get("method_defaults", {}).get(option):
            continue
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


def rng_state(cuda: list[int]) -> dict[str, Any]:
    """This process's torch random state (CPU, and the model's GPU if any)."""
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(cuda[0]) if cuda else None}


def set_rng_state(state: Mapping[str, Any], cuda: list[int]) -> None:
    """Put back what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    if cuda and state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], device=cuda[0])


class Checkpoint:
    """One adaptation run's checkpoint file: :meth:`save` (rank 0 writes) and :meth:`resume` (exact)."""

    def __init__(
        self, path: str | os.PathLike[str], merged: nn.Module, *, seed: int, lr: float, names: list[str], world: World
    ) -> None:
        self.path, self.seed, self.lr, self.names, self.world = Path(path), seed, lr, names, world
        self.fingerprint = world.from_rank0(lambda: self._check_folder(merged))

    def _check_folder(self, merged: nn.Module) -> dict[str, Any]:
        if not self.path.parent.is_dir():
            raise FileNotFoundError(f"checkpoint: folder {str(self.path.parent)!r} does not exist")
        return fingerprint(merged)

    def resume(
        self, params: Mapping[str, Tensor], optimizer: torch.optim.Optimizer, streams: Mapping[str, Stream],
        cuda: list[int], steps: int,
    ) -> tuple[list[dict[str, Any]], int]:
        """Put back λ, ℓ, the optimiser, this process's data positions and random state; return (history, step).

        Rank 0 reads and checks the file against this call and gives it to every process.
        """
        state = self.world.from_rank0(lambda: self._read(params, steps))
        with torch.no_grad():
            for key, value in state["params"].items():
                params[key].copy_(value)
        optimizer.load_state_dict(state["optimizer"])
        for name, stream in streams.items():
            stream.restore(state["streams"][name])
        set_rng_state(state["rng"][self.world.rank], cuda)
        if self.world.rank == 0:
            logger.info("resumed adaptation from %s at step %d", self.path, state["step"])
        return state["history"], state["step"]

    def _read(self, params: Mapping[str, Tensor], steps: int) -> dict[str, Any]:
        path = self.path
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint: no file {str(path)!r} to resume from")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ValueError(f"checkpoint: cannot read {str(path)!r}: {exc}") from exc
        if not isinstance(state, dict) or state.get("format") not in (FORMAT, _FORMAT_1):
            raise ValueError(f"checkpoint: {str(path)!r} is not a mergemodules adaptation checkpoint")
        if state["format"] == _FORMAT_1:
            state.update(rng=[state["rng"]], world=World().describe())
        for key, value in (("seed", self.seed), ("lr", self.lr), ("tasks", self.names)):
            if state[key] != value:
                raise ValueError(
                    f"checkpoint: {str(path)!r} was written with {key}={state[key]!r}, this call has {key}={value!r}"
                )
        if state["world"] != self.world.describe():
            raise ValueError(
                f"checkpoint: {str(path)!r} was written by {state['world']['size']} process(es) "
                f"(parallel={state['world']['parallel']!r}); this run has {self.world.size} "
                f"(parallel={self.world.parallel!r}): resume with the same number of processes and parallel mode"
            )
        if "fingerprint" not in state:
            warnings.warn(f"checkpoint: {str(path)!r} predates merge fingerprints: cannot check that it belongs to "
                          "this merge", stacklevel=4)
        else:
            saved_tensors = state["fingerprint"]["tensors"]
            state["fingerprint"]["tensors"] = {_current_name(k): v for k, v in saved_tensors.items()}
            difference = _fingerprint_difference(state["fingerprint"], self.fingerprint)
            if difference is not None:
                raise ValueError(f"checkpoint: {str(path)!r} was written for another merge: {difference}")
        state["params"] = {_current_name(k): v for k, v in state["params"].items()}
        saved = {k: tuple(v.shape) for k, v in state["params"].items()}
        if saved != {k: tuple(v.shape) for k, v in params.items()}:
            raise ValueError(f"checkpoint: {str(path)!r} holds the learnables of another merged model")
        if state["step"] > steps:
            raise ValueError(f"steps={steps} but the checkpoint {str(path)!r} is already at step {state['step']}")
        return state

    def save(
        self, step: int, history: list[dict[str, Any]], params: Mapping[str, Tensor],
        optimizer: torch.optim.Optimizer, streams: Mapping[str, Stream], cuda: list[int],
    ) -> None:
        """Write the state after ``step`` (every process takes part; rank 0 writes the file)."""
        positions: dict[str, dict[str, int]] = {}
        for part in self.world.gather({name: s.state() for name, s in streams.items()}):
            positions.update(part)
        rngs = self.world.gather(rng_state(cuda))
        if self.world.rank != 0:
            return
        state = {
            "format": FORMAT, "step": step, "seed": self.seed, "lr": self.lr, "tasks": self.names,
            "world": self.world.describe(), "fingerprint": self.fingerprint, "history": history,
            "params": {k: v.detach().cpu().clone() for k, v in params.items()},
            "optimizer": optimizer.state_dict(), "streams": {name: positions[name] for name in self.names},
            "rng": rngs,
        }
        atomic_write(self.path, lambda tmp: torch.save(state, tmp))
        logger.debug("saved adaptation checkpoint %s at step %d", self.path, step)
