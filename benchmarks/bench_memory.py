"""Memory: what a merged model stores, and the peak RSS of building, of a TTA step and of fusing.

Each (method, depth) runs in a fresh subprocess; ``plain`` is the unmerged model's forward+backward
(its activations are what every TTA step needs too). Inside it, the peak RSS is reset (Linux
``/proc/self/clear_refs``) before each stage, so every stage reports its own peak; "extra" is that
peak minus the RSS before the stage (the fine-tuned state dicts, built before the build stage and
freed after it, are in the build stage's starting RSS). Every quantity is linear in the number of
blocks, so two depths give the full tower: q(L) = q(a) + (L − a)·(q(b) − q(a))/(b − a). The depths are 1 and 2:
with no block, a static merge (CART) has no merge coefficient on the forward's path (the merged matrices
are the blocks' Linear weights), so there would be no TTA step to measure.

    nice python benchmarks/bench_memory.py                 # T = 8, depths 1 and 2, extrapolated to 12
"""
from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys

import torch

from common import (ARCHS, GIB, MIB, entropy_loss, finetuned_zoo, heads, images, machine, markdown_table,
                    peak_rss_bytes, reset_peak_rss, rss_bytes, setup_threads, vision_tower)

METHODS = {
    "plain": "plain model (no merge)", "cart": "CART γ=0.08 (static)",
    "adarank_ta": "TA+AdaRank (full rank)", "adarank_cart": "CART+AdaRank (full rank)",
}


def storage(merged) -> dict[str, int]:
    """Bytes of the merged model's buffers by kind (each storage counted once)."""
    seen, out = set(), {"base": 0, "factors": 0, "deltas": 0}
    for name, buf in merged.named_buffers():
        if buf is None or buf.data_ptr() in seen:
            continue
        seen.add(buf.data_ptr())
        kind = name.rsplit(".", 1)[-1]
        key = "factors" if kind in ("U", "S", "V") else "deltas" if kind == "deltas" else "base"
        out[key] += buf.numel() * buf.element_size()
    out["parameters"] = sum(p.numel() * p.element_size() for p in merged.parameters())
    return out


def child(method: str, arch: str, layers: int, tasks: int, per_task: int) -> dict:
    """Measure one method at one depth (run in a fresh process)."""
    from mergemodules import merge

    setup_threads(1)  # the factorisation's LAPACK calls; memory does not depend on threads
    pretrained = vision_tower(arch, layers)
    zoo = finetuned_zoo(pretrained, tasks)
    dense_vectors = sum(v.numel() * 4 for k, v in pretrained.named_parameters() if v.dim() == 2) * tasks
    result = {"dense_task_vectors": dense_vectors}
    reset_peak_rss()
    start = rss_bytes()
    merged = pretrained.train() if method == "plain" else merge(pretrained, zoo, method).train()
    result["build_peak"], result["build_extra"] = peak_rss_bytes(), peak_rss_bytes() - start
    del zoo
    gc.collect()
    result.update(storage(merged) if method != "plain" else {"base": 0, "factors": 0, "deltas": 0, "parameters": 0})
    setup_threads(2)
    task_heads = heads(tasks, pretrained.output_dim)
    x = torch.cat(images(tasks, per_task, pretrained.image_size[0]))
    reset_peak_rss()
    start = rss_bytes()
    entropy_loss(merged(x), task_heads, per_task).backward()
    result["step_peak"], result["step_extra"] = peak_rss_bytes(), peak_rss_bytes() - start
    del x
    merged.zero_grad(set_to_none=True)
    gc.collect()
    reset_peak_rss()
    start = rss_bytes()
    fused = merged.fuse() if method != "plain" else None
    result["fuse_peak"], result["fuse_extra"] = peak_rss_bytes(), peak_rss_bytes() - start
    del fused
    return result


def extrapolate(low: dict, high: dict, low_layers: int, high_layers: int, layers: int) -> dict:
    """Linear in the number of blocks through the two measured depths."""
    return {k: low[k] + (layers - low_layers) * (high[k] - low[k]) / (high_layers - low_layers) for k in high}


def main() -> None:
    """Run every (method, depth) in a subprocess and print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="ViT-B-32", choices=list(ARCHS))
    parser.add_argument("--depths", default="1,2", help="two block counts to measure")
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--per-task", type=int, default=16)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--child", nargs=2, metavar=("METHOD", "LAYERS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.arch, int(args.child[1]), args.tasks, args.per_task)))
        return

    low_layers, high_layers = (int(d) for d in args.depths.split(","))
    full_layers = ARCHS[args.arch]["vision_cfg"]["layers"]
    runs = {}
    for method in args.methods.split(","):
        for layers in (low_layers, high_layers):
            cmd = [sys.executable, __file__, "--arch", args.arch, "--tasks", str(args.tasks), "--per-task",
                   str(args.per_task), "--child", method, str(layers)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            runs[method, layers] = json.loads(out.strip().splitlines()[-1])
    print(f"# Memory, {args.arch}, T={args.tasks}, TTA step on {args.tasks}×{args.per_task} images; {machine()}")
    print(f"measured at {low_layers} and {high_layers} blocks, extrapolated linearly to {full_layers} blocks\n")
    rows = []
    for method in args.methods.split(","):
        full = extrapolate(runs[method, low_layers], runs[method, high_layers], low_layers, high_layers, full_layers)
        term = full["factors"] + full["deltas"]
        if method == "plain":
            rows.append([METHODS[method]] + ["–"] * 6 + [f"{full['build_peak'] / GIB:.2f} (model + fine-tuned)",
                                                         f"{full['step_peak'] / GIB:.2f} (+{full['step_extra'] / GIB:.2f})", "–"])
            continue
        rows.append([
            METHODS.get(method, method), f"{full['base'] / GIB:.3f}", f"{full['factors'] / GIB:.3f}", f"{full['deltas'] / GIB:.3f}",
            f"{full['parameters'] / MIB:.2f}", f"{(term + full['parameters']) / max(full['factors'], 1):.3f}",
            f"{full['dense_task_vectors'] / GIB:.2f}",
            f"{full['build_peak'] / GIB:.2f} (+{full['build_extra'] / GIB:.2f})",
            f"{full['step_peak'] / GIB:.2f} (+{full['step_extra'] / GIB:.2f})",
            f"{full['fuse_peak'] / GIB:.2f} (+{full['fuse_extra'] / GIB:.2f})",
        ])
    print(markdown_table(
        ["method", "base B GiB", "U/σ/V GiB", "dense terms GiB", "λ, ℓ MiB", "(terms+λ+ℓ) / U·σ·V",
         "dense τ of T matrices GiB", "build peak RSS GiB (+stage)", "TTA step peak (+stage)", "fuse peak (+stage)"], rows))


if __name__ == "__main__":
    main()
