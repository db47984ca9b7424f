"""Run by ``tests/test_tta_distributed.py`` under ``torchrun --nproc_per_node=2``: adaptations shared by 2 processes.

Every process saves what it ended with to ``OUT/rank{r}.pt``: per scenario the learnables and the history.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

import mergemodules as mm
import mergemodules.tta_checkpoint
from tta_setup import Interrupt, InterruptingHead, eval_data, learnables, models, tasks

# scenario → (method, adapt options); the same table gives the single-process references
SCENARIOS = {
    "adamerging, data": ("adamerging_taskwise", {"parallel": "data", "eval_every": 2}),
    "cart+adarank, data": ("adarank_cart", {"parallel": "data"}),
    "cart+adarank, tasks": ("adarank_cart", {"parallel": "tasks"}),
    "cart+adarank, data, per-task backward": ("adarank_cart", {"parallel": "data", "per_task_backward": True}),
}
if torch.cuda.is_available():  # gloo all-reduces CUDA tensors too (NCCL needs one GPU per process)
    SCENARIOS["cart+adarank, data, cuda"] = ("adarank_cart", {"parallel": "data", "device": "cuda"})
BATCH = 7  # 7 examples per task and step: rank 0 takes 3, rank 1 takes 4
STEPS = 5


def run(method: str, options: dict) -> tuple[dict[str, torch.Tensor], list]:
    """Adapt a fresh merge (on ``options["device"]``, default the CPU); return its learnables (CPU) and history."""
    options = dict(options)
    device = options.pop("device", "cpu")
    merged = mm.merge(*models(), method).to(device)
    if "eval_every" in options:
        options["eval_data"] = eval_data()
    task_set = tasks(batch_size=BATCH)
    for task in task_set.values():
        task.head.to(device)
    history = mm.adapt(merged, task_set, steps=STEPS, lr=0.02, **options)
    return {k: v.cpu() for k, v in learnables(merged).items()}, history


def interrupted_and_resumed(checkpoint: Path) -> tuple[dict[str, torch.Tensor], list]:
    """CART+AdaRank (dropout, shuffled noisy data), interrupted after step 4 of 7, resumed from step 4."""
    merged = mm.merge(*models(dropout=0.2), "adarank_cart").train()
    task_set = tasks(noisy=True)
    task_set["task1"].head = InterruptingHead(task_set["task1"].head, calls=5)
    try:
        mm.adapt(merged, task_set, steps=7, lr=0.02, seed=5, checkpoint=checkpoint, checkpoint_every=2)
    except Interrupt:
        pass
    resumed = mm.merge(*models(dropout=0.2), "adarank_cart").train()
    history = mm.adapt(resumed, tasks(noisy=True), steps=7, lr=0.02, seed=5, checkpoint=checkpoint, resume=True)
    return learnables(resumed), history


def uninterrupted() -> tuple[dict[str, torch.Tensor], list]:
    """The same run without the interruption."""
    merged = mm.merge(*models(dropout=0.2), "adarank_cart").train()
    history = mm.adapt(merged, tasks(noisy=True), steps=7, lr=0.02, seed=5)
    return learnables(merged), history


def main(out: Path) -> None:
    """Every scenario, then the resume; each process saves its results."""
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank = dist.get_rank()
    if rank != 0:  # only rank 0 may write a checkpoint
        mergemodules.tta_checkpoint.atomic_write = lambda *a, **k: sys.exit(f"rank {rank} wrote a checkpoint")
    results = {name: run(method, options) for name, (method, options) in SCENARIOS.items()}
    results["resumed"] = interrupted_and_resumed(out / "adapt.pt")
    results["uninterrupted"] = uninterrupted()
    torch.save(results, out / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
