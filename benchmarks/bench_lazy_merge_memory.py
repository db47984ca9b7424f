"""Peak memory of merging T safetensors checkpoints layer by layer (``mergemodules merge``) against T.

Model: open_clip's ViT-B-32 vision tower (random init, ``--layers`` transformer blocks), T "fine-tuned"
checkpoints θ₀ + noise written as safetensors files (1 torch thread). Each case runs in a fresh subprocess
that imports everything first, resets the kernel's peak-RSS mark, then merges; "merge peak" is the high-water mark
above the RSS at that point (interpreter, torch, open_clip and mergemodules loaded):

* ``cli <method>``: ``mergemodules merge RECIPE -o OUT`` — lazy memory-mapped checkpoints, each tensor
  built, fused, written and dropped in turn (``streaming.save_fused_streaming``);
* ``in memory``: the obvious way — load the T state dicts, ``merge(...)``, ``io.save_fused`` — for comparison.

Usage: ``nice python benchmarks/bench_lazy_merge_memory.py [--tasks 2 4 8] [--layers 6] [--methods ...]``
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
MIB = 2**20


def _write_checkpoints(folder: Path, tasks: int, layers: int) -> int:
    """base.safetensors and task{i}.safetensors (one model in memory at a time); returns the model's bytes."""
    import torch
    from safetensors.torch import save_file

    sys.path.insert(0, str(HERE))
    from common import vision_tower

    model = vision_tower("ViT-B-32", layers=layers)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, folder / "base.safetensors")
    gen = torch.Generator().manual_seed(0)
    for t in range(tasks):
        save_file({k: v + 1e-3 * torch.randn(v.shape, generator=gen) for k, v in state.items()},
                  folder / f"task{t}.safetensors")
    return sum(v.numel() * v.element_size() for v in state.values())


def _recipe(folder: Path, tasks: int, layers: int, method: str) -> Path:
    import yaml

    recipe = {
        "model": {"callable": f"{HERE / 'common.py'}:vision_tower", "kwargs": {"arch": "ViT-B-32", "layers": layers}},
        "base": "base.safetensors",
        "tasks": [f"task{t}.safetensors" for t in range(tasks)],
        "method": method,
    }
    path = folder / f"recipe_{method}_{tasks}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def _child(case: str, folder: Path, tasks: int, layers: int, method: str) -> None:
    """Run one case in this (fresh) process and print its memory as JSON."""
    import open_clip.model  # noqa: F401  (imported before the measurement, as every other library)
    import torch
    from safetensors.torch import load_file

    sys.path.insert(0, str(HERE))
    from common import peak_rss_bytes, reset_peak_rss, rss_bytes, setup_threads, vision_tower

    import mergemodules as mm
    from mergemodules.cli import main
    from mergemodules.export import save_fused

    setup_threads(1)  # memory does not depend on it; spares the shared machine
    out = folder / f"out_{case}_{method}_{tasks}.safetensors"
    recipe = _recipe(folder, tasks, layers, method)
    torch.manual_seed(0)
    reset_peak_rss()
    start = rss_bytes()
    if case == "cli":
        if main(["-q", "merge", str(recipe), "-o", str(out)]) != 0:
            raise SystemExit("merge failed")
    else:
        model = vision_tower("ViT-B-32", layers=layers)
        model.load_state_dict(load_file(folder / "base.safetensors"))
        states = [load_file(folder / f"task{t}.safetensors") for t in range(tasks)]
        save_fused(mm.merge(model, states, method), out)
    print(json.dumps({"start": start, "peak": peak_rss_bytes()}))
    out.unlink()


def _run(case: str, folder: Path, tasks: int, layers: int, method: str) -> dict:
    command = [sys.executable, __file__, "--child", case, "--folder", str(folder), "--tasks", str(tasks),
               "--layers", str(layers), "--methods", method]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{case} {method} T={tasks} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    """Write the checkpoints once for the largest T, run every case in a subprocess, print a markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--methods", nargs="+", default=["task_arithmetic", "cart", "ties"])
    parser.add_argument("--no-in-memory", action="store_true", help="skip the in-memory comparison")
    parser.add_argument("--child", choices=["cli", "memory"], help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child, Path(args.folder), args.tasks[0], args.layers, args.methods[0])
        return

    sys.path.insert(0, str(HERE))
    from common import machine, markdown_table

    with tempfile.TemporaryDirectory(prefix="bench_lazy_merge_") as tmp:
        folder = Path(tmp)
        size = _write_checkpoints(folder, max(args.tasks), args.layers)
        cases = [("cli", m) for m in args.methods] + ([] if args.no_in_memory else [("memory", "task_arithmetic")])
        rows = []
        for case, method in cases:
            for T in args.tasks:
                mem = _run(case, folder, T, args.layers, method)
                extra = mem["peak"] - mem["start"]
                label = f"mergemodules merge ({method})" if case == "cli" else f"in memory ({method})"
                rows.append([label, T, f"{mem['start'] / MIB:.0f}", f"{mem['peak'] / MIB:.0f}", f"{extra / MIB:.0f}",
                             f"{extra / size:.2f}"])
                print(rows[-1], file=sys.stderr, flush=True)
    print(f"model: open_clip ViT-B-32 vision tower, {args.layers} blocks, {size / MIB:.0f} MiB float32; {machine()} "
          "(each case: 1 torch thread)")
    header = ["case", "T", "RSS before (MiB)", "peak RSS (MiB)", "merge peak (MiB)", "÷ model size"]
    print(markdown_table(header, rows))


if __name__ == "__main__":
    main()
