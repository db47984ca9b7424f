"""The entropy objective and the multi-task adaptation loop: history, evaluation, checkpoint/resume, errors."""
from __future__ import annotations

import math
import runpy
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader

import mergemodules as mm
from mergemodules.streams import Stream
from tta_setup import one_thread  # noqa: F401  (autouse fixture)
from tta_setup import (D_IN, Interrupt, InterruptingHead, NoisyInputs, eval_data, heads, inputs, learnables, models,
                       tasks)

# ------------------------------------------------------------------------------------------ entropy


def _reference_entropy(logits: torch.Tensor) -> float:
    p = torch.softmax(logits.double(), -1)
    return float(-(p * torch.log(p.clamp_min(1e-300))).sum(-1).mean())


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 6), classes=st.integers(2, 9), scale=st.floats(0.01, 100.0), seed=st.integers(0, 1000))
def test_entropy_matches_float64_reference(rows, classes, scale, seed):
    logits = scale * torch.randn(rows, classes, generator=torch.Generator().manual_seed(seed))
    value = mm.entropy(logits)
    assert value.dtype == torch.float32 and value.dim() == 0
    assert 0.0 <= float(value) <= math.log(classes) + 1e-5
    assert float(value) == pytest.approx(_reference_entropy(logits), abs=1e-5)


def test_entropy_known_values():
    assert float(mm.entropy(torch.zeros(3, 8))) == pytest.approx(math.log(8), abs=1e-6)
    assert float(mm.entropy(torch.tensor([[0.0, 0.0], [0.0, 1000.0]]))) == pytest.approx(math.log(2) / 2, abs=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_entropy_is_stable_in_half_precision(dtype):
    logits = torch.tensor([[6e4 if dtype == torch.float16 else 1e30, 0.0, -3.0], [20.0, 19.0, -50.0]]).to(dtype)
    logits.requires_grad_(True)
    value = mm.entropy(logits)
    value.backward()
    assert value.dtype == torch.float32
    assert float(value.detach()) == pytest.approx(_reference_entropy(logits.detach()), abs=1e-5)
    assert torch.isfinite(logits.grad.float()).all()


def test_entropy_with_minus_infinity_logits_is_finite_with_finite_gradient():
    logits = torch.tensor([[0.0, 0.0, -math.inf], [1.0, -math.inf, -math.inf]], requires_grad=True)
    value = mm.entropy(logits)
    value.backward()
    assert float(value.detach()) == pytest.approx(math.log(2) / 2, abs=1e-6)
    assert torch.isfinite(logits.grad).all()


def test_entropy_rejects_integer_logits():
    with pytest.raises(TypeError, match="logits"):
        mm.entropy(torch.ones(2, 3, dtype=torch.long))


# ------------------------------------------------------------------------------------------- data


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 9), batch=st.integers(1, 4), cut=st.integers(0, 10), seed=st.integers(0, 3),
       own_generator=st.booleans())
def test_data_stream_resumed_anywhere_gives_the_same_batches(n, batch, cut, seed, own_generator):
    generator = torch.Generator().manual_seed(99) if own_generator else None
    loader = DataLoader(NoisyInputs(torch.arange(n, dtype=torch.float32)[:, None]), batch_size=batch,
                        shuffle=True, generator=generator)
    reference = Stream("t", loader, seed)
    expected = [reference.next() for _ in range(10)]
    interrupted = Stream("t", loader, seed)
    for _ in range(cut):
        interrupted.next()
    resumed = Stream("t", loader, seed)
    resumed.restore(interrupted.state())
    assert all(torch.equal(a, b) for a, b in zip(expected[cut:], (resumed.next() for _ in range(10 - cut))))
    # a pass covers the data once
    first_pass = torch.cat(expected[: -(-n // batch)]).round().flatten()  # ⌈n / batch⌉ ≤ 9 batches
    assert sorted(first_pass.tolist()) == list(range(n))


# -------------------------------------------------------------------------------------------- loop


def _merged(method: str = "adarank_ta", dropout: float = 0.0) -> mm.MergedModel:
    return mm.merge(*models(dropout), method)


def test_history_holds_loss_entropies_and_accuracies():
    merged, task_set = _merged(), tasks()
    history = mm.adapt(merged, task_set, steps=4, lr=0.01, eval_data=eval_data(), eval_every=2)
    assert [h["step"] for h in history] == [0, 1, 2, 3, 4]
    assert [("accuracy" in h) for h in history] == [True, False, True, False, True]
    assert set(history[0]) == {"step", "accuracy"}
    for h in history[1:]:
        assert set(h["entropy"]) == set(task_set)
        assert h["loss"] == pytest.approx(sum(h["entropy"].values()), rel=1e-6)
    assert all(0.0 <= a <= 1.0 for h in history if "accuracy" in h for a in h["accuracy"].values())


def test_evaluate_counts_correct_predictions():
    merged = _merged("task_arithmetic")
    data = eval_data()
    head = heads()["task0"]
    x, _ = data["task0"][0]
    with torch.no_grad():
        pred = head(merged(x)).argmax(-1)
    labels = pred.clone()
    labels[:3] = (labels[:3] + 1) % 4  # 3 of 12 wrong
    assert mm.evaluate(merged, heads(), {"task0": [(x, labels)]}) == {"task0": 0.75}


def test_first_step_loss_is_the_entropy_of_the_first_batches():
    merged, task_set = _merged(), tasks(batch_size=24)  # one batch per task = all its data
    with torch.no_grad():
        expected = {name: float(mm.entropy(t.head(merged(inputs(i))))) for i, (name, t) in enumerate(task_set.items())}
    history = mm.adapt(merged, task_set, steps=1)
    for name, value in expected.items():
        assert history[0]["entropy"][name] == pytest.approx(value, abs=1e-6)


def test_batches_may_be_pairs_or_keyword_mappings():
    class Keyword(nn.Module):
        def __init__(self, merged: nn.Module) -> None:
            super().__init__()
            self.merged = merged

        def forward(self, *, x: torch.Tensor) -> torch.Tensor:
            return self.merged(x)

    plain, task_set = _merged(), tasks(batch_size=24)
    reference = mm.adapt(plain, task_set, steps=1)[0]["entropy"]
    for i, (name, t) in enumerate(task_set.items()):
        t.data = [(inputs(i), torch.zeros(24, dtype=torch.long))]
    assert mm.adapt(_merged(), task_set, steps=1)[0]["entropy"] == pytest.approx(reference, abs=1e-6)
    for i, (name, t) in enumerate(task_set.items()):
        t.data = [{"x": inputs(i), "labels": torch.zeros(24, dtype=torch.long)}]
    assert mm.adapt(Keyword(_merged()), task_set, steps=1)[0]["entropy"] == pytest.approx(reference, abs=1e-6)


def test_adapts_a_bfloat16_model_with_float32_learnables():
    pretrained, finetuned = models()
    merged = mm.merge(pretrained.to(torch.bfloat16), [f.to(torch.bfloat16) for f in finetuned], "adarank_ta")
    start = learnables(merged)
    task_set = {name: mm.Task([x.to(torch.bfloat16) for x in t.data], t.head.to(torch.bfloat16))
                for name, t in tasks().items()}
    history = mm.adapt(merged, task_set, steps=4, lr=0.03)
    assert all(math.isfinite(h["loss"]) for h in history) and history[-1]["loss"] < history[0]["loss"]
    end = learnables(merged)
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in end.values())
    assert any(not torch.equal(start[k], end[k]) for k in end)


def test_only_merged_parameters_move_and_heads_get_no_gradient():
    merged, task_set = _merged(), tasks()
    for t in task_set.values():
        t.head.requires_grad_(True)
    head_state = {n: {k: v.clone() for k, v in t.head.state_dict().items()} for n, t in task_set.items()}
    mm.adapt(merged, task_set, steps=2, lr=0.01)
    for name, t in task_set.items():
        assert all(torch.equal(v, head_state[name][k]) for k, v in t.head.state_dict().items())
        assert all(p.grad is None for p in t.head.parameters())


def test_same_seed_same_result_and_caller_rng_untouched():
    a, b, task_set = _merged(), _merged(), tasks(noisy=True)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    mm.adapt(a, task_set, steps=5, lr=0.01, seed=3)
    assert torch.equal(torch.get_rng_state(), before)
    mm.adapt(b, tasks(noisy=True), steps=5, lr=0.01, seed=3)
    c = _merged()
    mm.adapt(c, tasks(noisy=True), steps=5, lr=0.01, seed=4)
    la, lb, lc = learnables(a), learnables(b), learnables(c)
    assert all(torch.equal(la[k], lb[k]) for k in la)
    assert any(not torch.equal(la[k], lc[k]) for k in la)


def test_evaluation_does_not_change_the_adaptation():
    a, b = _merged(), _merged()
    mm.adapt(a, tasks(noisy=True), steps=4, lr=0.01, eval_data=eval_data(), eval_every=1)
    mm.adapt(b, tasks(noisy=True), steps=4, lr=0.01)
    la, lb = learnables(a), learnables(b)
    assert all(torch.equal(la[k], lb[k]) for k in la)


@pytest.mark.parametrize("method, every", [("adarank_cart", 4), ("adamerging_taskwise", 3)])
def test_resume_after_interruption_is_bit_identical(tmp_path, method, every):
    # shuffled loaders of 3 batches, random augmentation, dropout in the forward; the checkpoint
    # (step 8 or 9) falls inside a pass over the data or exactly at its end
    steps = 11
    reference = _merged(method, dropout=0.2).train()
    full = mm.adapt(reference, tasks(noisy=True), steps=steps, lr=0.02, seed=5)

    ckpt = tmp_path / "adapt.pt"
    interrupted = _merged(method, dropout=0.2).train()
    task_set = tasks(noisy=True)
    task_set["task1"].head = InterruptingHead(task_set["task1"].head, calls=9)
    with pytest.raises(Interrupt):
        mm.adapt(interrupted, task_set, steps=steps, lr=0.02, seed=5, checkpoint=ckpt, checkpoint_every=every)
    saved = torch.load(ckpt, weights_only=True)
    assert saved["step"] == 9 // every * every  # steps 1-9 ran, step 10 was interrupted
    assert saved["streams"]["task0"] == {"epoch": (saved["step"] - 1) // 3, "position": (saved["step"] - 1) % 3 + 1}
    assert [p.name for p in tmp_path.iterdir()] == ["adapt.pt"]  # no temporary files left

    resumed = _merged(method, dropout=0.2).train()  # a fresh process: a new model at its initial state
    history = mm.adapt(resumed, tasks(noisy=True), steps=steps, lr=0.02, seed=5, checkpoint=ckpt, resume=True)
    expected, actual = learnables(reference), learnables(resumed)
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[k], actual[k]) for k in expected)
    assert history == full


def test_resume_can_extend_the_step_budget(tmp_path):
    reference = _merged()
    mm.adapt(reference, tasks(), steps=6, lr=0.02)
    first = _merged()
    mm.adapt(first, tasks(), steps=4, lr=0.02, checkpoint=tmp_path / "c.pt")
    second = _merged()
    history = mm.adapt(second, tasks(), steps=6, lr=0.02, checkpoint=tmp_path / "c.pt", resume=True)
    assert [h["step"] for h in history] == list(range(1, 7))
    expected, actual = learnables(reference), learnables(second)
    assert all(torch.equal(expected[k], actual[k]) for k in expected)


def test_resume_rejects_a_different_setting(tmp_path):
    ckpt = tmp_path / "c.pt"
    mm.adapt(_merged(), tasks(), steps=2, checkpoint=ckpt)
    with pytest.raises(ValueError, match="seed"):
        mm.adapt(_merged(), tasks(), steps=3, seed=1, checkpoint=ckpt, resume=True)
    with pytest.raises(ValueError, match="lr"):
        mm.adapt(_merged(), tasks(), steps=3, lr=0.5, checkpoint=ckpt, resume=True)
    with pytest.raises(ValueError, match="another merge.*method option .base."):
        mm.adapt(_merged("adarank_cart"), tasks(), steps=3, checkpoint=ckpt, resume=True)
    with pytest.raises(ValueError, match="already at step 2"):
        mm.adapt(_merged(), tasks(), steps=1, checkpoint=ckpt, resume=True)
    with pytest.raises(FileNotFoundError, match="folder"):
        mm.adapt(_merged(), tasks(), steps=3, checkpoint=tmp_path / "no" / "c.pt")
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        mm.adapt(_merged(), tasks(), steps=3, checkpoint=tmp_path / "missing.pt", resume=True)


class _NaNAt(nn.Module):
    """A head whose logits become NaN from the ``step``-th call on."""

    def __init__(self, head: nn.Module, step: int) -> None:
        super().__init__()
        self.head, self.step, self.calls = head, step, 0

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        out = self.head(features)
        return out * math.nan if self.calls >= self.step else out


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_state():
    good = _merged()
    mm.adapt(good, tasks(), steps=2, lr=0.02)
    merged, task_set = _merged(), tasks()
    task_set["task2"].head = _NaNAt(task_set["task2"].head, step=3)
    with pytest.raises(FloatingPointError, match=r"step 3 \(tasks \['task2'\]\)"):
        mm.adapt(merged, task_set, steps=5, lr=0.02)
    expected, actual = learnables(good), learnables(merged)
    assert all(torch.equal(expected[k], actual[k]) for k in expected)
    assert all(torch.isfinite(v).all() for v in actual.values())


def test_nan_gradient_stops_with_the_step_and_keeps_the_last_good_state():
    good = _merged()
    mm.adapt(good, tasks(), steps=1, lr=0.02)
    merged, task_set = _merged(), tasks()
    head, calls = task_set["task0"].head, []

    def poisoned(features: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        if len(calls) == 2:
            features.register_hook(lambda g: g * math.nan)
        return head(features)

    task_set["task0"].head = poisoned
    with pytest.raises(FloatingPointError, match="gradient is not finite at step 2"):
        mm.adapt(merged, task_set, steps=3, lr=0.02)
    expected, actual = learnables(good), learnables(merged)
    assert all(torch.equal(expected[k], actual[k]) for k in expected)


# ------------------------------------------------------------------------------------------ errors


def test_bad_numbers_are_named():
    merged, task_set = _merged(), tasks()
    for kwargs, match in [
        ({"steps": 0}, "steps"), ({"steps": -3}, "steps"), ({"steps": 2, "lr": 0.0}, "lr"),
        ({"steps": 2, "lr": -1e-3}, "lr"), ({"steps": 2, "lr": math.nan}, "lr"),
        ({"steps": 2, "eval_every": 0, "eval_data": {}}, "eval_every"),
        ({"steps": 2, "eval_every": 2}, "eval_data"), ({"steps": 2, "checkpoint_every": 1}, "checkpoint"),
    ]:
        with pytest.raises(ValueError, match=match):
            mm.adapt(merged, task_set, **kwargs)


def test_task_without_head_or_data_is_named():
    task_set = tasks()
    task_set["task1"] = mm.Task(task_set["task1"].data, None)
    with pytest.raises(ValueError, match=r"tasks\['task1'\] has no head"):
        mm.adapt(_merged(), task_set, steps=1)
    task_set = tasks()
    task_set["task2"] = mm.Task(None, task_set["task2"].head)
    with pytest.raises(ValueError, match=r"tasks\['task2'\] has no data"):
        mm.adapt(_merged(), task_set, steps=1)
    with pytest.raises(ValueError, match="tasks"):
        mm.adapt(_merged(), {}, steps=1)
    with pytest.raises(TypeError, match=r"tasks\['task0'\] must be a Task"):
        mm.adapt(_merged(), {"task0": (inputs(0), heads()["task0"])}, steps=1)


def test_one_shot_iterator_is_rejected():
    task_set = tasks()
    task_set["task0"].data = iter(task_set["task0"].data)
    with pytest.raises(TypeError, match=r"tasks\['task0'\].data must be re-iterable"):
        mm.adapt(_merged(), task_set, steps=1)


def test_empty_loader_is_named():
    task_set = tasks()
    task_set["task1"].data = DataLoader(torch.empty(0, 4, D_IN), batch_size=4)
    with pytest.raises(ValueError, match=r"tasks\['task1'\]: the data loader yielded no batch"):
        mm.adapt(_merged(), task_set, steps=1)


def test_heads_must_return_logits_of_one_shape():
    task_set = tasks()
    task_set["task0"].head = lambda f: f.sum(-1)  # 1-D
    with pytest.raises(ValueError, match=r"tasks\['task0'\].head must return .*logits"):
        mm.adapt(_merged(), task_set, steps=1)
    task_set = tasks()
    task_set["task0"].head = lambda f: (f,)
    with pytest.raises(ValueError, match=r"got tuple"):
        mm.adapt(_merged(), task_set, steps=1)
    calls = []

    def changing(features: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return features[:, : 4 + len(calls) % 2]

    task_set = tasks()
    task_set["task2"].head = changing
    with pytest.raises(ValueError, match=r"tasks\['task2'\].head returned logits of shape \(8, 4\).*5 classes"):
        mm.adapt(_merged(), task_set, steps=3)


def test_heads_that_cut_the_graph_are_named():
    task_set = {name: mm.Task(t.data, lambda f, h=t.head: h(f.detach())) for name, t in tasks().items()}
    with pytest.raises(ValueError, match="does not depend on merged.parameters"):
        mm.adapt(_merged(), task_set, steps=1)


def test_static_merge_has_nothing_to_adapt():
    with pytest.raises(ValueError, match="no trainable parameters"):
        mm.adapt(_merged("weight_averaging"), tasks(), steps=1)


def test_eval_data_for_an_unknown_task_is_named():
    with pytest.raises(KeyError, match="nope"):
        mm.adapt(_merged(), tasks(), steps=1, eval_data={"nope": []})


def test_custom_loop_example_runs_and_lowers_the_entropy(capsys):
    runpy.run_path(str(Path(__file__).parents[1] / "examples" / "custom_tta_loop.py"), run_name="__main__")
    out = capsys.readouterr().out
    losses = [float(line.split()[-1]) for line in out.splitlines() if line.startswith("step")]
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert "fused model reproduces the merged one: True" in out
