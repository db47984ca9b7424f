"""Scaling with the number of tasks T and the block size (ViT-B-32 vs ViT-L-14): construction, memory, step time.

Every cost of a ViT tower is a fixed part (patch embedding, final projection) plus the same cost per
block, so one block is measured and the tower extrapolated: q(L) = q(0) + L·(q(1) − q(0)).

* construction: ``merge(..., "cart")`` (γ = 0.08, batched randomised SVD), the block's tensors and the
  others (``targets``/``exclude``) timed separately on a one-block tower;
* memory: exact byte counts from the shapes: base, CART's U/σ/V (γ = 0.08), CART+AdaRank's
  full-rank U/σ/V, and the T dense task vectors of the public code;
* step time: a TTA step of T×16 images is the plain model's forward+backward (measured per image on
  towers with 0 and 1 blocks) plus, per block, the merged weights' own work: materialising the 4
  CART+AdaRank weights (top 8% of full-rank factors switched on) and their backward (measured on
  weights with random factors of the right shapes: the cost depends on shapes only), and the same for
  the public AdaRank code's rebuild (task by task, every component, autograd).

    nice python benchmarks/bench_scaling.py                  # writes benchmarks/plots/step_time_vs_T.png
"""
from __future__ import annotations

import argparse
import os
import tempfile

import torch
from torch import nn

from common import (ARCHS, GIB, entropy_loss, finetuned_zoo, heads, images, machine, markdown_table, median_time,
                    setup_threads, vision_tower)
from mergemodules import merge
from mergemodules.decompose import resolve_rank
from mergemodules.layers import MergedWeight

GAMMA = 0.08


def block_matrices(width: int) -> list[tuple[int, int]]:
    """(out, in) of the 4 matrices of one block: in_proj, out_proj, c_fc, c_proj."""
    return [(3 * width, width), (width, width), (4 * width, width), (width, 4 * width)]


def tower_matrices(arch: str) -> list[tuple[int, int]]:
    """(out, in) of every matrix merged as a matrix in the whole tower (blocks and ``proj``)."""
    cfg = ARCHS[arch]
    width, layers = cfg["vision_cfg"]["width"], cfg["vision_cfg"]["layers"]
    return block_matrices(width) * layers + [(cfg["embed_dim"], width)]


def factor_bytes(shapes: list[tuple[int, int]], tasks: int, rank: float | None) -> int:
    """Bytes of stacked fp32 U (T, out, k), σ (T, k), V (T, in, k) over the matrices."""
    total = 0
    for out, inp in shapes:
        k = resolve_rank(rank, (out, inp))
        total += tasks * k * (out + inp + 1) * 4
    return total


def construction_seconds(arch: str, tasks: int, repeat: int) -> tuple[float, float]:
    """Seconds of ``merge(..., "cart")`` of the fixed part and of one block, measured separately."""
    tower = vision_tower(arch, 1)
    zoo = finetuned_zoo(tower, tasks)
    blocks = ["transformer.resblocks.*"]
    stem = median_time(lambda: merge(tower, zoo, "cart", exclude=blocks), repeat, warmup=0)
    block = median_time(lambda: merge(tower, zoo, "cart", targets=blocks), repeat, warmup=0)
    return stem, block


def plain_seconds_per_image(arch: str, layers: int, batch: int, repeat: int) -> float:
    """Forward+backward seconds per image of the plain tower with ``layers`` blocks."""
    tower = vision_tower(arch, layers).train()
    x = images(1, batch, tower.image_size[0])[0]
    head = heads(1, tower.output_dim)

    def step():
        tower.zero_grad(set_to_none=True)
        entropy_loss(tower(x), head, batch).backward()

    return median_time(step, repeat) / batch


def block_weights(width: int, tasks: int) -> list[tuple[MergedWeight, torch.Tensor]]:
    """One block's 4 CART+AdaRank weights (random full-rank factors, top 8% on) and a weight gradient each."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for rows, cols in block_matrices(width):
        k = min(rows, cols)
        logits = torch.full((tasks, k), -0.1)
        logits[:, :resolve_rank(GAMMA, (rows, cols))] = 0.1
        weight = MergedWeight(
            torch.randn(rows, cols, generator=gen), U=torch.randn(tasks, rows, k, generator=gen) / rows**0.5,
            S=torch.rand(tasks, k, generator=gen), V=torch.randn(tasks, cols, k, generator=gen) / cols**0.5,
            coef=nn.Parameter(torch.ones(tasks)), mask_logits=nn.Parameter(logits))
        out.append((weight, torch.randn(rows, cols, generator=gen)))
    return out


def merged_block_seconds(weights: list[tuple[MergedWeight, torch.Tensor]], repeat: int) -> float:
    """Materialise + backward of one block's merged weights, as mergemodules does it."""

    def run():
        for w, g in weights:
            w().backward(g)

    return median_time(run, repeat)


def reference_block_seconds(weights: list[tuple[MergedWeight, torch.Tensor]], repeat: int) -> float:
    """The same weights rebuilt as the public AdaRank code does: task by task, every component multiplied."""

    def run():
        for w, g in weights:
            masks = w.masks()
            value = w.base
            for t in range(w.num_tasks):
                value = value + w.coef[t] * ((w.U[t] * (masks[t] * w.S[t])) @ w.V[t].t())
            value.backward(g)

    return median_time(run, repeat)


def plot(rows: list[dict], path: str) -> None:
    """Step time vs T, plain and merged, one line per architecture (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for arch, marker in (("ViT-B-32", "o"), ("ViT-L-14", "s")):
        sel = [r for r in rows if r["arch"] == arch]
        if not sel:
            continue
        Ts = [r["T"] for r in sel]
        ax.plot(Ts, [r["plain_step"] for r in sel], marker=marker, linestyle="--", label=f"{arch} plain fwd+bwd")
        ax.plot(Ts, [r["merged_step"] for r in sel], marker=marker, label=f"{arch} CART+AdaRank (mergemodules)")
        ax.plot(Ts, [r["reference_step"] for r in sel], marker=marker, linestyle=":", label=f"{arch} reference AdaRank")
    ax.set_xlabel("tasks T (16 images each)")
    ax.set_ylabel("seconds per TTA step (2 CPU threads)")
    ax.set_yscale("log")
    ax.set_xticks([2, 4, 8, 20])
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".png", dir=os.path.dirname(path))
    os.close(fd)
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)


def main() -> None:
    """Measure one block of each architecture for every T, extrapolate, print the table and plot."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", default="2,4,8,20")
    parser.add_argument("--archs", default="ViT-B-32,ViT-L-14")
    parser.add_argument("--per-task", type=int, default=16)
    parser.add_argument("--plain-batch", type=int, default=16, help="images per plain timing run")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--plot", default=os.path.join(os.path.dirname(__file__), "plots", "step_time_vs_T.png"))
    args = parser.parse_args()
    setup_threads(args.threads)
    task_counts = [int(t) for t in args.tasks.split(",")]
    rows = []
    for arch in args.archs.split(","):
        cfg = ARCHS[arch]
        layers, width = cfg["vision_cfg"]["layers"], cfg["vision_cfg"]["width"]
        stem_img = plain_seconds_per_image(arch, 0, args.plain_batch, args.repeat)
        block_img = plain_seconds_per_image(arch, 1, args.plain_batch, args.repeat) - stem_img
        shapes = tower_matrices(arch)
        dense_params = sum(out * inp for out, inp in shapes)
        base_bytes = sum(p.numel() * 4 for p in vision_tower(arch, 1).parameters()) + (layers - 1) * sum(
            p.numel() * 4 for p in vision_tower(arch, 1).transformer.resblocks[0].parameters())
        for T in task_counts:
            c_stem, c_block = construction_seconds(arch, T, args.repeat)
            images_per_step = T * args.per_task
            plain = images_per_step * (stem_img + layers * block_img)
            weights = block_weights(width, T)
            merged = plain + layers * merged_block_seconds(weights, args.repeat)
            reference = plain + layers * reference_block_seconds(weights, args.repeat)
            del weights
            rows.append({
                "arch": arch, "T": T, "construction": c_stem + layers * c_block,
                "base": base_bytes, "cart": factor_bytes(shapes, T, GAMMA), "full": factor_bytes(shapes, T, None),
                "dense": T * dense_params * 4, "plain_step": plain, "merged_step": merged, "reference_step": reference,
            })
            print(f"{arch} T={T}: done", flush=True)
    print(f"# Scaling (one block measured, extrapolated to the tower); {machine()}; TTA step = T × {args.per_task} images")
    print(markdown_table(
        ["arch", "T", "CART construction s", "base B GiB", "CART U/σ/V GiB", "CART+AdaRank full U/σ/V GiB",
         "dense τ GiB", "plain step s", "CART+AdaRank step s", "ratio", "reference AdaRank step s", "ratio"],
        [[r["arch"], r["T"], f"{r['construction']:.1f}", f"{r['base'] / GIB:.2f}", f"{r['cart'] / GIB:.2f}",
          f"{r['full'] / GIB:.2f}", f"{r['dense'] / GIB:.2f}", f"{r['plain_step']:.1f}", f"{r['merged_step']:.1f}",
          f"{r['merged_step'] / r['plain_step']:.2f}", f"{r['reference_step']:.1f}",
          f"{r['reference_step'] / r['plain_step']:.2f}"] for r in rows]))
    plot(rows, args.plot)
    print(f"\nplot: {args.plot}")


if __name__ == "__main__":
    main()
