"""adapt's one forward over all tasks' joined batches, per-task backward and autocast: the per-task steps."""
from __future__ import annotations

import dataclasses
from collections import namedtuple

import pytest
import torch
from torch import Tensor, nn

import mergemodules as mm
from mergemodules.batches import Joined, concatenate, mixes_examples, outputs_match, split_output
from mergemodules.layers import MergedWeight
from tta_setup import one_thread  # noqa: F401  (autouse fixture)
from tta_setup import (NUM_TASKS, Encoder, grad_forwards, heads, inputs, learnables, models, tasks, token_models,
                       token_tasks)


def _assert_close(a: dict[str, Tensor], b: dict[str, Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def _adapt(merged: nn.Module, task_set: dict, **kwargs) -> tuple[dict[str, Tensor], list, int]:
    """Learnables, history and the number of forwards with a graph after 5 steps."""
    calls = grad_forwards(merged)
    history = mm.adapt(merged, task_set, steps=5, lr=0.02, **kwargs)
    return learnables(merged), history, len(calls)


@pytest.mark.parametrize("method", ["adarank_cart", "adamerging_taskwise"])
def test_joined_forward_gives_the_per_task_trajectory(method):
    joined, history, calls = _adapt(mm.merge(*models(), method), tasks())
    alone, history_alone, calls_alone = _adapt(mm.merge(*models(), method), tasks(), concat=False)
    assert (calls, calls_alone) == (5, 5 * NUM_TASKS)
    _assert_close(joined, alone)
    for h, g in zip(history, history_alone):
        assert h["entropy"] == pytest.approx(g["entropy"], rel=1e-5)


def test_token_inputs_of_different_lengths_are_padded_and_cut_back():
    joined, history, calls = _adapt(mm.merge(*token_models(), "adarank_cart"), token_tasks())
    alone, history_alone, _ = _adapt(mm.merge(*token_models(), "adarank_cart"), token_tasks(), concat=False)
    assert calls == 5  # one padded forward per step; each head sees its own length (it averages over it)
    _assert_close(joined, alone)
    assert history[-1]["loss"] == pytest.approx(history_alone[-1]["loss"], rel=1e-5)


def test_a_model_whose_output_depends_on_the_padding_runs_one_forward_per_task():
    joined, _, calls = _adapt(mm.merge(*token_models(pools=True), "adarank_cart"), token_tasks(pools=True))
    alone, _, _ = _adapt(mm.merge(*token_models(pools=True), "adarank_cart"), token_tasks(pools=True), concat=False)
    assert calls == 5 * NUM_TASKS  # the padded forward was checked once, found different, not used
    _assert_close(joined, alone)


class _Normed(nn.Module):
    """The test encoder followed by BatchNorm (mixes the examples of a batch in training mode)."""

    def __init__(self, encoder: Encoder) -> None:
        super().__init__()
        self.encoder, self.norm = encoder, nn.BatchNorm1d(16)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.encoder(x))


def _normed_models() -> tuple[nn.Module, list[nn.Module]]:
    pretrained, finetuned = models()
    return _Normed(pretrained), [_Normed(f) for f in finetuned]


def test_batch_norm_in_training_mode_runs_one_forward_per_task():
    merged = mm.merge(*_normed_models(), "adamerging_taskwise").train()
    assert mixes_examples(merged) is not None
    _, _, calls = _adapt(merged, tasks())
    assert calls == 5 * NUM_TASKS
    merged = mm.merge(*_normed_models(), "adamerging_taskwise").eval()  # running statistics: no mixing
    assert mixes_examples(merged) is None
    _, _, calls = _adapt(merged, tasks())
    assert calls == 5


class _WithAux(nn.Module):
    """Returns (features, a scalar): an output that cannot be split by task."""

    def __init__(self, encoder: Encoder) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.encoder(x)
        return h, h.pow(2).mean()


def test_an_output_that_cannot_be_split_runs_one_forward_per_task():
    pretrained, finetuned = models()
    merged = mm.merge(_WithAux(pretrained), [_WithAux(f) for f in finetuned], "adamerging_taskwise")
    task_set = {name: mm.Task(t.data, lambda out, h=t.head: h(out[0])) for name, t in tasks().items()}
    _, _, calls = _adapt(merged, task_set)
    assert calls == 5 * NUM_TASKS


def test_per_task_backward_gives_the_same_step_and_evaluates_each_weight_once(monkeypatch):
    reference, history, _ = _adapt(mm.merge(*models(), "adarank_cart"), tasks())
    merged = mm.merge(*models(), "adarank_cart")
    computed: list[int] = []
    original = MergedWeight.compute
    monkeypatch.setattr(MergedWeight, "compute", lambda self: computed.append(1) or original(self))
    actual, history_per_task, calls = _adapt(merged, tasks(), per_task_backward=True)
    assert calls == 5 * NUM_TASKS
    assert len(computed) == 5 * len(merged.merged_weights())  # once per weight and step, not once per task
    _assert_close(actual, reference)
    assert history_per_task[-1]["loss"] == pytest.approx(history[-1]["loss"], rel=1e-5)


def test_autocast_bfloat16_runs_the_forward_in_bfloat16_with_float32_entropy():
    seen: list[torch.dtype] = []
    task_set = tasks()
    for t in task_set.values():
        t.head = lambda f, h=t.head: seen.append(f.dtype) or h(f)
    merged = mm.merge(*models(), "adarank_cart")
    history = mm.adapt(merged, task_set, steps=4, lr=0.02, autocast=torch.bfloat16)
    assert set(seen) == {torch.bfloat16}
    assert all(v.dtype == torch.float32 for v in learnables(merged).values())
    full = mm.adapt(mm.merge(*models(), "adarank_cart"), tasks(), steps=1, lr=0.02)
    first, first_full = history[0]["entropy"], full[0]["entropy"]
    assert first != first_full and first == pytest.approx(first_full, abs=2e-2)  # bf16 rounding only
    assert history[-1]["loss"] < history[0]["loss"]


def test_a_custom_loop_under_autocast_gets_gradients_in_float32():
    merged = mm.merge(*models(), "adarank_cart")
    head = heads()["task0"]
    with torch.autocast("cpu", dtype=torch.bfloat16), mm.weight_cache():
        loss = mm.entropy(head(merged(torch.randn(8, 4, 12))))
    loss.backward()  # the merged weights are computed outside autocast: their backward sees float32
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in merged.parameters())


def test_option_errors_are_named():
    merged = mm.merge(*models(), "adarank_cart")
    with pytest.raises(ValueError, match="autocast"):
        mm.adapt(merged, tasks(), steps=1, autocast=torch.float64)
    with pytest.raises(ValueError, match="pad_id"):
        mm.adapt(merged, tasks(), steps=1, pad_id="[PAD]")
    with pytest.raises(ValueError, match="parallel"):
        mm.adapt(merged, tasks(), steps=1, parallel="pipeline")
    with pytest.raises(RuntimeError, match="outermost"), mm.weight_cache():
        with mm.weight_cache({merged.merged_weights()["attn.out_proj.weight"]: torch.zeros(16, 16)}):
            pass


# ------------------------------------------------------------------------------------ joining


def test_concatenate_pads_token_inputs_with_the_pad_id_and_the_mask_with_zero():
    a = {"input_ids": torch.tensor([[5, 6]]), "attention_mask": torch.ones(1, 2, dtype=torch.long),
         "pixel_values": torch.ones(1, 3), "return_dict": True}
    b = {"input_ids": torch.tensor([[7, 8, 9], [1, 2, 3]]), "attention_mask": torch.ones(2, 3, dtype=torch.long),
         "pixel_values": torch.zeros(2, 3), "return_dict": True}
    joined = concatenate([a, b], pad_id=99)
    assert joined.sizes == [1, 2] and joined.lengths == [2, 3]
    assert joined.inputs["input_ids"].tolist() == [[5, 6, 99], [7, 8, 9], [1, 2, 3]]
    assert joined.inputs["attention_mask"].tolist() == [[1, 1, 0], [1, 1, 1], [1, 1, 1]]
    assert joined.inputs["pixel_values"].shape == (3, 3) and joined.inputs["return_dict"] is True
    assert concatenate([a, dict(b, return_dict=False)]) is None  # unequal non-tensor options
    assert concatenate([a, {k: v for k, v in b.items() if k != "pixel_values"}]) is None  # other keys
    assert concatenate([torch.ones(2, 3), torch.ones(2, 4)]) is None  # other trailing shapes
    assert concatenate([torch.ones(2, 3), torch.ones(2, 3, dtype=torch.float64)]) is None
    assert concatenate([torch.ones(2, 3), {"x": torch.ones(2, 3)}]) is None


Output = namedtuple("Output", "hidden pooled")


@dataclasses.dataclass
class _ModelOutput(dict):
    """Stands in for a Hugging Face ModelOutput: a dataclass that is a mapping."""

    last_hidden_state: Tensor | None = None
    attentions: Tensor | None = None

    def __post_init__(self) -> None:
        self.update({k: v for k, v in vars(self).items() if v is not None})


def test_split_output_cuts_every_tensor_by_task_and_back_to_its_length():
    joined = Joined(inputs=None, sizes=[1, 2], lengths=[2, 3])
    hidden = torch.arange(3 * 3 * 2.0).view(3, 3, 2)
    parts = split_output({"h": hidden, "n": None}, joined)
    assert [p["h"].shape for p in parts] == [(1, 2, 2), (2, 3, 2)] and parts[0]["n"] is None
    assert torch.equal(parts[0]["h"], hidden[:1, :2])
    parts = split_output(Output(hidden, hidden[:, 0]), joined)
    assert isinstance(parts[1], Output) and parts[1].pooled.shape == (2, 2)
    parts = split_output(_ModelOutput(last_hidden_state=hidden), joined)
    assert isinstance(parts[0], _ModelOutput) and parts[0]["last_hidden_state"].shape == (1, 2, 2)
    assert split_output((hidden, hidden.sum()), joined) is None  # a scalar has no batch
    assert split_output(hidden[:2], joined) is None


def test_outputs_match_within_float_tolerance_only():
    x = torch.randn(4, 3)
    assert outputs_match({"a": x, "b": 1}, {"a": x * (1 + 1e-6), "b": 1})
    assert not outputs_match(x, x + 1e-2)
    assert not outputs_match(x, x[:2])
    assert not outputs_match((x,), (x, x))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("options", [{}, {"per_task_backward": True}, {"autocast": torch.bfloat16}],
                         ids=["joined", "per-task backward", "bf16 autocast"])
def test_on_cuda_the_step_equals_the_cpu_step(options):
    def task_set(device: str) -> dict[str, mm.Task]:
        return {name: mm.Task(list(inputs(t).to(device).split(8)), head.to(device))
                for t, (name, head) in enumerate(heads().items())}

    expected = mm.merge(*models(), "adarank_cart")
    history = mm.adapt(expected, task_set("cpu"), steps=3, lr=0.02, **options)
    merged = mm.merge(*models(), "adarank_cart").cuda()
    calls = grad_forwards(merged)
    cuda_history = mm.adapt(merged, task_set("cuda"), steps=3, lr=0.02, **options)
    assert len(calls) == 3 * (NUM_TASKS if options.get("per_task_backward") else 1)
    assert all(p.device.type == "cuda" for p in merged.parameters())
    if "autocast" in options:  # bf16 GEMMs round differently on the two devices: compare the first forward only
        assert cuda_history[0]["entropy"] == pytest.approx(history[0]["entropy"], abs=3e-2)
        return
    for k, v in learnables(merged).items():
        torch.testing.assert_close(v.cpu(), learnables(expected)[k], rtol=1e-4, atol=1e-4)
    assert cuda_history[-1]["entropy"] == pytest.approx(history[-1]["entropy"], rel=1e-4)
