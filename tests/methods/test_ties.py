"""TIES's streaming fit equals the all-in-memory reference rule, exactly (thresholds and majority sign)."""
from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mergemodules.methods.ties import Ties


def reference_fit(tensors: list[torch.Tensor], density: float) -> tuple[tuple[float, ...], float]:
    """From one concatenated copy (the obvious way): each task's threshold, the int(density·N) + 1-th largest |τ|
    (the kthvalue(N − int(density·N)) of the authors' code; all N at density 1), and the global majority sign."""
    T = tensors[0].shape[0]
    flat = torch.cat([tv.reshape(T, -1).double() for tv in tensors], dim=1)
    N = flat.shape[1]
    keep = N if density == 1.0 else int(density * N) + 1
    thresholds = tuple(float(flat[t].abs().kthvalue(N - keep + 1).values) for t in range(T))
    trimmed = torch.where(flat.abs() >= torch.tensor(thresholds, dtype=torch.float64)[:, None], flat, 0)
    majority = float(torch.sign(torch.sign(trimmed.sum(0)).sum()))
    return thresholds, majority


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
def test_streaming_fit_equals_the_reference_rule(tensors: list[torch.Tensor], density: float) -> None:
    source = lambda: ((f"p{i}", tv, tv.dim() == 3) for i, tv in enumerate(tensors))  # noqa: E731
    fitted = Ties(density=density).fit(source)
    # the half-precision inputs are decomposed in float32 by the builder; here they are compared as given
    thresholds, majority = reference_fit([tv.float() if tv.dtype in (torch.float16, torch.bfloat16) else tv
                                          for tv in tensors], density)
    assert fitted.thresholds == thresholds
    assert fitted.majority == majority


def test_fit_reads_the_task_vectors_three_times_and_keeps_none() -> None:
    calls = []

    def source():
        calls.append(1)
        return iter([("w", torch.arange(12.0).reshape(2, 6) - 5, True)])

    fitted = Ties(density=0.5).fit(source)
    assert len(calls) == 3
    # keep int(0.5·6) + 1 = 4 per task: |τ_0| = 5,4,3,2,1,0 → 2; |τ_1| = 1..6 → 3
    assert fitted.thresholds == (2.0, 3.0)
    # trimmed: τ_0 = [-5,-4,-3,-2,0,0], τ_1 = [0,0,3,4,5,6]: sums -5,-4,0,2,5,6 → signs sum to +1
    assert fitted.majority == 1.0


def test_tensor_scope_needs_no_fit() -> None:
    def source():
        raise AssertionError("scope='tensor' reads nothing before the build")

    ties = Ties(density=0.5, scope="tensor")
    assert ties.fit(source) is ties


def test_vectors_in_chunks_equal_the_whole_tensor_at_once(monkeypatch):
    from mergemodules.methods import ties

    task_vectors = torch.randn(3, 37, 11)
    for fitted in (ties.Ties(density=0.3, thresholds=(0.2, 0.9, 1.4), majority=-1.0), ties.Ties(0.3, scope="tensor")):
        whole = fitted.vectors("w", task_vectors, True)
        monkeypatch.setattr(ties, "_CHUNK", 50)
        assert torch.equal(fitted.vectors("w", task_vectors, True), whole)
        monkeypatch.setattr(ties, "_CHUNK", 2**18)
