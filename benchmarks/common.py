"""Shared pieces of the performance benchmarks: a synthetic model zoo, timing, memory and tables.

The zoo is open_clip's vision tower (ViT-B-32 or ViT-L-14, optionally with fewer blocks), random
init, and T "fine-tuned" state dicts θ_t = θ₀ + τ_t whose matrix task vectors have a decaying
spectrum: τ = G₁·diag(s)·G₂ᵀ with Gaussian G₁ (out×r), G₂ (in×r), r = min(out, in) and
s_i ∝ (i+1)^(−power). Nothing is downloaded.
"""
from __future__ import annotations

import ctypes
import gc
import os
import statistics
import time
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "ARCHS", "vision_tower", "decaying_spectrum", "synthetic_task_vector", "finetuned_zoo", "heads", "images",
    "entropy_loss", "setup_threads", "median_time", "interleaved_times", "rss_bytes", "peak_rss_bytes",
    "reset_peak_rss", "markdown_table", "machine", "GIB", "MIB",
]

GIB = 2**30
MIB = 2**20

# open_clip's configs (``open_clip.get_model_config``), repeated so that building a tower needs no text tower.
ARCHS = {
    "ViT-B-32": {"embed_dim": 512, "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 32}},
    "ViT-L-14": {"embed_dim": 768, "vision_cfg": {"image_size": 224, "layers": 24, "width": 1024, "patch_size": 14}},
}


def setup_threads(threads: int = 2) -> None:
    """Pin torch to ``threads`` intra-op threads (the issue's targets are on 2 CPU threads)."""
    torch.set_num_threads(threads)


def vision_tower(arch: str = "ViT-B-32", layers: int | None = None, seed: int = 0) -> nn.Module:
    """open_clip's ``VisionTransformer`` of ``arch`` (random init), with ``layers`` blocks if given."""
    from open_clip.model import _build_vision_tower

    cfg = ARCHS[arch]
    vision_cfg = dict(cfg["vision_cfg"], **({} if layers is None else {"layers": layers}))
    torch.manual_seed(seed)
    return _build_vision_tower(cfg["embed_dim"], vision_cfg).eval()


def decaying_spectrum(n: int, power: float = 1.0) -> Tensor:
    """Singular values ``(i+1)^(−power)``, i = 0..n−1."""
    return torch.arange(1, n + 1, dtype=torch.float32).pow(-power)


def synthetic_task_vector(shape: Sequence[int], gen: torch.Generator, scale: float = 1e-2, power: float = 1.0) -> Tensor:
    """A task vector of ``shape``: decaying spectrum for 2-D tensors, small Gaussian noise otherwise."""
    if len(shape) != 2:
        return scale * torch.randn(*shape, generator=gen)
    out, inp = shape
    r = min(out, inp)
    left = torch.randn(out, r, generator=gen) / out**0.5
    right = torch.randn(inp, r, generator=gen) / inp**0.5
    spectrum = decaying_spectrum(r, power) * (scale * r**0.5)
    return (left * spectrum) @ right.t()


def finetuned_zoo(pretrained: nn.Module, num_tasks: int, seed: int = 0, power: float = 1.0) -> list[dict[str, Tensor]]:
    """``num_tasks`` state dicts θ₀ + τ_t with synthetic task vectors (all parameters)."""
    gen = torch.Generator().manual_seed(seed)
    params = {k: v.detach() for k, v in pretrained.named_parameters()}
    return [{k: v + synthetic_task_vector(v.shape, gen, power=power) for k, v in params.items()} for _ in range(num_tasks)]


def heads(num_tasks: int, dim: int, classes: int = 10, seed: int = 0) -> list[nn.Linear]:
    """One frozen random classification head per task (CLIP zero-shot heads in the papers)."""
    torch.manual_seed(seed)
    out = [nn.Linear(dim, classes) for _ in range(num_tasks)]
    for head in out:
        head.requires_grad_(False)
    return out


def images(num_tasks: int, per_task: int, size: int = 224, seed: int = 0) -> list[Tensor]:
    """Random unlabeled image batches, one (per_task, 3, size, size) tensor per task."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(per_task, 3, size, size, generator=gen) for _ in range(num_tasks)]


def entropy_loss(features: Tensor, task_heads: Sequence[nn.Module], per_task: int) -> Tensor:
    """Σ_tasks mean Shannon entropy of softmax(head_t(features of task t's rows)) (AdaRank Eq. 6)."""
    loss = features.new_zeros(())
    for t, head in enumerate(task_heads):
        log_p = torch.log_softmax(head(features[t * per_task:(t + 1) * per_task]), dim=-1)
        loss = loss - (log_p.exp() * log_p).sum(-1).mean()
    return loss


def median_time(fn: Callable[[], object], repeat: int, warmup: int = 1) -> float:
    """Median wall-clock seconds of ``fn()`` over ``repeat`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _synchronize() -> None:
    """Wait for queued GPU work, so a wall-clock time covers it (a no-op without CUDA)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def interleaved_times(fns: dict[str, Callable[[], object]], repeat: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds of each function, the runs interleaved (A B C A B C ...) so load drifts hit all alike.

    GPU work is synchronised before and after each run, so the times hold on CUDA too.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            gc.collect()
            _synchronize()
            start = time.perf_counter()
            fn()
            _synchronize()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} (Linux only)")


def rss_bytes() -> int:
    """Current resident set size of this process."""
    return _status_kib("VmRSS") * 1024


def peak_rss_bytes() -> int:
    """Peak resident set size since start or the last :func:`reset_peak_rss` (Linux ``VmHWM``)."""
    return _status_kib("VmHWM") * 1024


def reset_peak_rss() -> None:
    """Reset the peak RSS to the current RSS (Linux: write 5 to ``/proc/self/clear_refs``), after handing what
    was freed back to the system (glibc ``malloc_trim``): else a stage reuses an earlier stage's freed heap and
    its "+stage" peak depends on what ran before it."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-flavoured markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def machine() -> str:
    """A one-line description of the machine and thread count."""
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    where = f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
    if torch.cuda.is_available():
        where += f", GPU {torch.cuda.get_device_name()}"
    return where
