"""Inference of a fused model vs the original architecture (same class, same shapes): time and outputs.

A merge (CART by default) of T synthetic tasks is fused (hard masks, current λ) into a plain open_clip
tower; its inference time is compared, interleaved, with the original tower's, and its outputs
with the merged model's. The merged (unfused) model is timed too, for context.

    nice python benchmarks/bench_fused.py
"""
from __future__ import annotations

import argparse

import torch

from common import ARCHS, finetuned_zoo, images, interleaved_times, machine, markdown_table, setup_threads, vision_tower
from mergemodules import merge


def main() -> None:
    """Time original, fused and merged inference side by side and compare outputs."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="ViT-B-32", choices=list(ARCHS))
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--method", default="cart", help="any method: fusing gives the same plain architecture")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    setup_threads(1)  # building (not timed here)
    original = vision_tower(args.arch, args.layers)
    zoo = finetuned_zoo(original, args.tasks)
    merged = merge(original, zoo, args.method).eval()
    del zoo
    fused = merged.fuse().eval()
    setup_threads(args.threads)
    x = images(1, args.batch, original.image_size[0])[0]
    same_class = type(fused) is type(original) and fused.state_dict().keys() == original.state_dict().keys()
    with torch.inference_mode():
        diff = (fused(x) - merged(x)).abs().max().item()
        scale = merged(x).abs().max().item()

        def run(model):
            return lambda: model(x)

        times = interleaved_times({"original": run(original), "fused": run(fused), "merged (unfused)": run(merged)}, args.repeat)
    rows = [[name, f"{t * 1000:.1f}", f"{t / times['original']:.3f}"] for name, t in times.items()]
    print(f"# Fused inference, {args.method}, {args.arch} with {args.layers} blocks, T={args.tasks}, batch {args.batch}; "
          f"{machine()}; median of {args.repeat}")
    print(markdown_table(["model", "ms / batch", "ratio to original"], rows))
    print(f"\nfused vs merged outputs: max |diff| = {diff:.2e} (max |output| = {scale:.2f}); "
          f"same class and state-dict keys as the original: {same_class}")


if __name__ == "__main__":
    main()
