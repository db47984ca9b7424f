"""Time of one TTA step (forward + backward over all tasks) of CART+AdaRank vs the plain model and the references.

Variants, timed interleaved on the same batches (T tasks × ``--per-task`` images):

* ``plain``: forward + backward of the unmerged model (every weight gets its gradient), on the
  concatenated batch and task by task;
* ``mergemodules``: ``merge(..., "adarank_cart")`` (full-rank factors stored, top 8% switched on),
  all tasks' batches concatenated in one call; every merged weight is materialised once per step
  (W = B + U·diag(λ·m·σ)·Vᵀ over the switched-on components, one GEMM) and the straight-through
  gradient of every mask logit comes from the one weight gradient;
* ``mergemodules, per task``: one forward per task inside one ``weight_cache`` block (``tta.adapt`` before
  issue 15, and its fallback where the batches cannot be joined);
* ``mm.adapt step``: one step of ``tta.adapt``'s own loop (its internal step: batches drawn from the
  tasks' streams and joined, one forward, split to the heads, entropy, gradient, checks, Adam) on a copy of
  the merged model; ``per_task_backward=True``: one task's forward and backward at a time;
* ``mergemodules, rank=R``: CART+AdaRank storing only R·min(out, in) components per task;
* ``reference AdaRank``: the technique of the public AdaRank code: every step, every tensor is rebuilt
  densely, task by task (U_t·diag(m_t·σ_t)·V_tᵀ from full-rank factors), summed with λ into a state
  dict and the model run through ``torch.func.functional_call``;
* ``reference AdaMerging``: the public AdaMerging code's technique: dense task vectors kept in memory,
  W = B + Σ_t λ_t·τ_t rebuilt every step, ``functional_call`` (λ only, no masks: context).

A few blocks are measured and the whole tower extrapolated: the plain tower without blocks (patch
embedding, final projection, heads) is timed too, and each variant's time per block,
(t − t_stem)/L, is scaled to the full depth: t_full = t_stem + L_full·(t − t_stem)/L (conservative for
the merged variants: their small projection overhead is counted as per-block).

    nice python benchmarks/bench_tta_step.py
    nice python benchmarks/bench_tta_step.py --no-references --ranks ""   # plain, merged and adapt's step only
    python benchmarks/bench_tta_step.py --device cuda --layers 12 --repeat 10   # on a GPU, the whole tower
"""
from __future__ import annotations

import argparse
import copy

import torch
from torch import Tensor, nn
from torch.func import functional_call

from common import (ARCHS, entropy_loss, finetuned_zoo, heads, images, interleaved_times, machine, markdown_table,
                    setup_threads, vision_tower)
from mergemodules import MergedModel, Task, merge, straight_through_mask, weight_cache
from mergemodules.distributed import World
from mergemodules.layers import MergedTensor, MergedWeight
from mergemodules.tta import _Adaptation


class ReferenceAdaRank(nn.Module):
    """The public AdaRank code's step: rebuild every tensor densely from per-task full-rank factors."""

    def __init__(self, model: nn.Module, merged: MergedModel) -> None:
        super().__init__()
        self.model = model
        self.tensors = merged.merged_tensors()  # shares the factors: no copy
        self.coefs = nn.ParameterDict()
        self.logits = nn.ParameterDict()
        for i, (name, m) in enumerate(self.tensors.items()):
            if m.coef is not None:
                self.coefs[str(i)] = nn.Parameter(m.coef.detach().clone())
            if isinstance(m, MergedWeight) and m.mask_logits is not None:
                self.logits[str(i)] = nn.Parameter(m.mask_logits.detach().clone())

    def state(self) -> dict[str, Tensor]:
        """Every merged tensor rebuilt densely, task by task."""
        params = {}
        for i, (name, m) in enumerate(self.tensors.items()):
            value = m.base
            if isinstance(m, MergedWeight) and m.S is not None:
                masks = straight_through_mask(self.logits[str(i)], m.temperature)
                for t in range(m.num_tasks):
                    value = value + self.coefs[str(i)][t] * ((m.U[t] * (masks[t] * m.S[t])) @ m.V[t].t())
                value = value if m.layout == "out_in" else value.t()
            elif m.deltas is not None:
                for t in range(m.num_tasks):
                    value = value + self.coefs[str(i)][t] * m.deltas[t]
            params[name] = value
        return params

    def forward(self, x: Tensor) -> Tensor:
        """The model through ``functional_call`` with the rebuilt tensors."""
        return functional_call(self.model, self.state(), (x,))


class ReferenceAdaMerging(nn.Module):
    """The public AdaMerging code's step: dense task vectors, W = B + Σ_t λ_t·τ_t every step, layer-wise λ."""

    def __init__(self, model: nn.Module, merged: MergedModel) -> None:
        super().__init__()
        self.model = model
        self.bases, self.vectors = {}, {}
        self.coefs = nn.ParameterDict()
        with torch.no_grad():
            for i, (name, m) in enumerate(merged.merged_tensors().items()):
                self.bases[name] = m.base if not isinstance(m, MergedWeight) or m.layout == "out_in" else m.base.t()
                if m.num_tasks:
                    deltas = m.deltas if isinstance(m, MergedTensor) or m.S is None else \
                        torch.einsum("tok,tk,tik->toi", m.U, m.S, m.V)
                    if isinstance(m, MergedWeight) and m.layout == "in_out":
                        deltas = deltas.transpose(1, 2)
                    self.vectors[name] = deltas.contiguous()
                    self.coefs[name.replace(".", "/")] = nn.Parameter(torch.full((m.num_tasks,), 0.3))

    def forward(self, x: Tensor) -> Tensor:
        """The model through ``functional_call`` with W = B + Σ_t λ_t τ_t."""
        params = {}
        for name, base in self.bases.items():
            if name in self.vectors:
                params[name] = base + torch.tensordot(self.coefs[name.replace(".", "/")], self.vectors[name], dims=1)
            else:
                params[name] = base
        return functional_call(self.model, params, (x,))


def main() -> None:
    """Time the variants side by side and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="ViT-B-32", choices=["ViT-B-32", "ViT-L-14"])
    parser.add_argument("--layers", type=int, default=2, help="transformer blocks (12 in ViT-B-32)")
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--per-task", type=int, default=16, help="images per task")
    parser.add_argument("--ranks", default="0.32", help="comma-separated stored ranks of extra CART+AdaRank variants")
    parser.add_argument("--no-references", action="store_true", help="skip the functional_call references")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (times are synchronised)")
    args = parser.parse_args()
    device = torch.device(args.device)
    setup_threads(1)  # building is not timed here (LAPACK is faster on one thread on a shared machine)

    pretrained = vision_tower(args.arch, args.layers)
    zoo = finetuned_zoo(pretrained, args.tasks)
    task_heads = heads(args.tasks, pretrained.output_dim)
    batches = images(args.tasks, args.per_task, pretrained.image_size[0])
    plain = vision_tower(args.arch, args.layers)
    plain.load_state_dict(pretrained.state_dict())
    plain.train()
    stem = vision_tower(args.arch, 0).train()
    merged = merge(pretrained, zoo, "adarank_cart").train()
    extra = {float(r): merge(pretrained, zoo, "adarank_cart", rank=float(r)).train() for r in args.ranks.split(",") if r}
    del zoo
    for model in (plain, stem, merged, *extra.values(), *task_heads):
        model.to(device)
    batches = [b.to(device) for b in batches]
    x = torch.cat(batches)
    setup_threads(args.threads)

    def step(model: nn.Module) -> float:
        model.zero_grad(set_to_none=True)
        loss = entropy_loss(model(x), task_heads, args.per_task)
        loss.backward()
        return float(loss.detach())

    def per_task_step(model: nn.Module) -> float:
        model.zero_grad(set_to_none=True)
        with weight_cache():
            loss = sum(entropy_loss(model(b), [h], args.per_task) for b, h in zip(batches, task_heads))
        loss.backward()
        return float(loss.detach())

    variants = {
        "plain tower without blocks (stem)": lambda: step(stem),
        "plain forward+backward": lambda: step(plain),
        "plain, per task": lambda: per_task_step(plain),
        "mergemodules (concatenated batch)": lambda: step(merged),
        "mergemodules (per task, one weight_cache)": lambda: per_task_step(merged),
    }
    for label, per_task_backward in (("mm.adapt step", False), ("mm.adapt step, per_task_backward=True", True)):
        tasks = {f"task{t}": Task([b], h) for t, (b, h) in enumerate(zip(batches, task_heads))}
        run = _Adaptation(copy.deepcopy(merged), tasks, lr=1e-3, seed=0, world=World(), concat=True, pad_id=0,
                          per_task_backward=per_task_backward, autocast=None)
        run.seed_rng()
        variants[label] = lambda run=run: run.step(0)["loss"]
    variants.update({f"mergemodules, stored rank={r}": (lambda m=m: step(m)) for r, m in extra.items()})
    if not args.no_references:
        reference = ReferenceAdaRank(plain, merged).train()
        adamerging = ReferenceAdaMerging(plain, merged).train().to(device)
        with torch.no_grad():
            same = (merged(x) - reference(x)).abs().max().item()
        print(f"reference AdaRank output vs mergemodules: max |diff| = {same:.2e}")
        variants["reference AdaRank (dense rebuild + functional_call)"] = lambda: step(reference)
        variants["reference AdaMerging (dense τ + functional_call, λ only)"] = lambda: step(adamerging)

    times = interleaved_times(variants, repeat=args.repeat)
    t_stem = times.pop("plain tower without blocks (stem)")
    full_layers = ARCHS[args.arch]["vision_cfg"]["layers"]
    full = {name: t_stem + full_layers * (t - t_stem) / args.layers for name, t in times.items()}
    base, base_full = times["plain forward+backward"], full["plain forward+backward"]
    rows = [[name, f"{t:.2f}", f"{t / base:.2f}", f"{full[name]:.1f}", f"{full[name] / base_full:.2f}"] for name, t in times.items()]
    print(f"# TTA step, CART+AdaRank, {args.arch} with {args.layers} blocks (stem alone: {t_stem:.2f} s), "
          f"T={args.tasks} × {args.per_task} images; {machine()}; median of {args.repeat}")
    print(markdown_table(["variant", f"s / step ({args.layers} blocks)", "ratio to plain",
                          f"s / step ({full_layers} blocks, extrapolated)", "ratio to plain"], rows))
    joined = times["mergemodules (concatenated batch)"]
    print(f"mm.adapt step / concatenated batch: {times['mm.adapt step'] / joined:.3f} "
          f"(per_task_backward=True: {times['mm.adapt step, per_task_backward=True'] / joined:.3f})")


if __name__ == "__main__":
    main()
