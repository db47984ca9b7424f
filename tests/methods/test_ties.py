"""TIES's streaming threshold search equals the all-in-memory top-k, exactly."""
from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mergemodules.methods.ties import Ties


def reference_thresholds(tensors: list[torch.Tensor], density: float) -> tuple[float, ...]:
    """Each task's ⌈density·N⌉-th largest |τ| over all tensors, from one concatenated copy (the obvious way)."""
    out = []
    for t in range(tensors[0].shape[0]):
        flat = torch.cat([tv[t].abs().flatten().double() for tv in tensors])
        keep = max(1, int(round(density * flat.numel())))
        out.append(float(torch.topk(flat, keep).values.min()))
    return tuple(out)


@st.composite
def task_vector_sets(draw):
    tasks = draw(st.integers(1, 4))
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    tensors = []
    for _ in range(draw(st.integers(1, 4))):
        shape = draw(st.sampled_from([(7,), (5, 3), (16, 9), (2, 2, 3)]))
        tv = torch.randn(tasks, *shape, generator=gen) * 10.0 ** draw(st.integers(-6, 2))
        if draw(st.booleans()):  # repeated values and exact zeros, as in sparse or quantised fine-tuning
            tv = torch.round(tv * 4 / tv.abs().max()) / 4
        tensors.append(tv.to(dtype))
    return tensors


@settings(max_examples=60, deadline=None)
@given(task_vector_sets(), st.sampled_from([1e-3, 0.1, 0.2, 0.5, 0.9, 1.0]))
def test_streaming_thresholds_equal_the_global_top_k(tensors: list[torch.Tensor], density: float) -> None:
    source = lambda: ((f"p{i}", tv, tv.dim() == 3) for i, tv in enumerate(tensors))  # noqa: E731
    assert Ties(density=density).fit(source).thresholds == reference_thresholds(tensors, density)


def test_fit_reads_the_task_vectors_twice_and_keeps_none() -> None:
    calls = []

    def source():
        calls.append(1)
        return iter([("w", torch.arange(12.0).reshape(2, 6) - 5, True)])

    fitted = Ties(density=0.5).fit(source)
    assert len(calls) == 2
    assert fitted.thresholds == (3.0, 4.0)  # |τ_0| = 5,4,3,2,1,0 → 3rd largest 3; |τ_1| = 1..6 → 4


def test_vectors_in_chunks_equal_the_whole_tensor_at_once(monkeypatch):
    from mergemodules.methods import ties

    task_vectors = torch.randn(3, 37, 11)
    fitted = ties.Ties(density=0.3, thresholds=(0.2, 0.9, 1.4))
    whole = fitted.vectors("w", task_vectors, True)
    monkeypatch.setattr(ties, "_CHUNK", 50)
    assert torch.equal(fitted.vectors("w", task_vectors, True), whole)
