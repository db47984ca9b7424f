"""TIES's per-tensor trim (mergekit's scope): exactly k entries per task, ties broken by order, as a stable sort."""
from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mergemodules.methods.ties import ChunkedTrim, _disjoint_mean, _top_entries


def stable_top(flat: torch.Tensor, k: int) -> torch.Tensor:
    """The reference: a stable sort by decreasing |·| keeps the first k (the earliest of equal magnitudes)."""
    kept = torch.zeros_like(flat, dtype=torch.bool)
    order = torch.sort(-flat.abs(), dim=1, stable=True).indices[:, :k]
    return kept.scatter_(1, order, True)


@settings(max_examples=60, deadline=None)
@given(T=st.integers(1, 4), n=st.integers(1, 40), fraction=st.floats(0.0, 1.0), seed=st.integers(0, 2**16),
       levels=st.integers(1, 5), threads=st.integers(1, 3))
def test_top_entries_is_a_stable_sort(T: int, n: int, fraction: float, seed: int, levels: int, threads: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    flat = torch.randint(-levels, levels + 1, (T, n), generator=gen).float()  # few values: many ties
    k = int(fraction * n)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)  # the tasks are trimmed a thread's worth at a time
    try:
        kept = _top_entries(flat, k)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(kept, stable_top(flat, k))
    assert kept.sum(dim=1).tolist() == [k] * T


@settings(max_examples=80, deadline=None)
@given(T=st.integers(1, 4), n=st.integers(1, 60), fraction=st.floats(0.0, 1.0), seed=st.integers(0, 2**16),
       levels=st.integers(1, 5), chunk=st.integers(1, 25), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_the_chunked_trim_keeps_what_the_whole_tensor_trim_keeps(T, n, fraction, seed, levels, chunk, dtype) -> None:
    gen = torch.Generator().manual_seed(seed)
    flat = (torch.randint(-levels, levels + 1, (T, n), generator=gen) * 0.37).to(dtype)  # many ties
    k = int(fraction * n)
    trim = ChunkedTrim(lambda: flat.split(chunk, dim=1), k)
    kept = torch.cat([trim.kept(piece) for piece in flat.split(chunk, dim=1)], dim=1)
    assert torch.equal(kept, _top_entries(flat, k))


@settings(max_examples=40, deadline=None)
@given(T=st.integers(1, 5), n=st.integers(1, 30), seed=st.integers(0, 2**16), zero_sign=st.sampled_from([-1.0, 0.0, 1.0]))
def test_disjoint_mean_matches_the_definition(T: int, n: int, seed: int, zero_sign: float) -> None:
    gen = torch.Generator().manual_seed(seed)
    tau = torch.randint(-3, 4, (T, n), generator=gen).double()
    kept = torch.rand(T, n, generator=gen) < 0.6
    got = _disjoint_mean(tau, kept, zero_sign)
    for j in range(n):
        values = [float(tau[t, j]) for t in range(T) if kept[t, j]]
        total = sum(values)
        sign = (total > 0) - (total < 0) or zero_sign
        agree = [v for v in values if (v > 0 if sign > 0 else v < 0)]
        assert float(got[j]) == (sum(agree) / len(agree) if agree else 0.0)
