"""The shared set-up of merge() and fuse_streaming(): prepare() checks lazy checkpoints from their headers alone."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from helpers import perturbed
from safetensors.torch import save_file
from torch import Tensor, nn

import mergemodules as mm
from mergemodules.build import prepare
from mergemodules.sources import SafetensorsCheckpoint
from mergemodules.streaming import merge_to_state_dict


class CountingCheckpoint(SafetensorsCheckpoint):
    """A safetensors checkpoint that records every tensor read from it."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.reads: list[str] = []

    def __getitem__(self, key: str) -> Tensor:
        self.reads.append(key)
        return super().__getitem__(key)

    def read_into(self, key: str, out: Tensor) -> bool:
        done = super().read_into(key, out)
        if done:
            self.reads.append(key)
        return done


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, 4)).eval()


def checkpoints(tmp_path: Path, base: nn.Module, tasks: int = 2) -> list[CountingCheckpoint]:
    for i in range(tasks):
        state = perturbed(base, seed=i + 1, scale=0.1).state_dict()
        save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / f"t{i}.safetensors")
    return [CountingCheckpoint(tmp_path / f"t{i}.safetensors") for i in range(tasks)]


def test_prepare_reads_no_tensor(tmp_path: Path) -> None:
    base = net()
    lazy = checkpoints(tmp_path, base)
    setup = prepare(base, lazy, "ties", density=0.5, exclude=["2.bias"])
    assert [c.reads for c in lazy] == [[], []]
    assert setup.method.name == "ties" and setup.method.transform.density == 0.5
    assert setup.sources == lazy and [e.name for e in setup.entries] == [n for n, _ in base.named_parameters()]
    assert setup.selected("0.weight") and not setup.selected("2.bias")


def test_merge_reads_each_tensor_once(tmp_path: Path) -> None:
    """The checks read headers only: a task-arithmetic merge reads every tensor of every checkpoint exactly once."""
    base = net()
    lazy = checkpoints(tmp_path, base)
    merged = mm.merge(base, lazy, "task_arithmetic")
    for checkpoint in lazy:
        assert Counter(checkpoint.reads) == Counter(list(base.state_dict()))  # parameters and buffers, once each
    expected = mm.merge(base, [dict(SafetensorsCheckpoint(c.paths[0]).items()) for c in lazy], "task_arithmetic")
    fused, reference = merged.fuse().state_dict(), expected.fuse().state_dict()
    assert all(torch.equal(fused[k], reference[k]) for k in reference)


def test_merge_and_streaming_share_the_checks(tmp_path: Path) -> None:
    base = net()
    lazy = checkpoints(tmp_path, base, tasks=1)
    save_file({"0.weight": torch.zeros(8, 5)}, tmp_path / "wrong.safetensors")
    wrong = CountingCheckpoint(tmp_path / "wrong.safetensors")
    for run in (mm.merge, merge_to_state_dict):
        with pytest.raises(ValueError, match=r"finetuned\[1\]\['0.weight'\] has shape \(8, 5\), the pretrained"):
            run(base, [lazy[0], wrong], "task_arithmetic", exclude=["0.bias", "1.*", "2.*"])
        with pytest.raises(KeyError, match=r"finetuned\[1\] is missing 1 key\(s\).*'0.bias'"):
            run(base, [lazy[0], wrong], "task_arithmetic", exclude=["1.*", "2.*"])
        with pytest.raises(ValueError, match="finetuned: need a non-empty list"):
            run(base, [], "task_arithmetic")
        with pytest.raises(mm.UnknownMethodError, match="unknown method 'nope'"):
            run(base, lazy, "nope")
    assert lazy[0].reads == [] and wrong.reads == []


# ------------------------------------------- the streaming reads: straight into one reused stack, checks deferred


def lazy_zoo(tmp_path: Path, dtype: torch.dtype, tasks: int = 3) -> tuple[nn.Module, SafetensorsCheckpoint,
                                                                           list[SafetensorsCheckpoint]]:
    """A base model and ``tasks`` perturbed copies saved in ``dtype``: (model, base checkpoint, task checkpoints)."""
    base = net()
    states = [base.state_dict()] + [perturbed(base, seed=i + 1, scale=0.1).state_dict() for i in range(tasks)]
    paths = [tmp_path / f"m{i}.safetensors" for i in range(len(states))]
    for state, path in zip(states, paths):
        save_file({k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}, path)
    return base, SafetensorsCheckpoint(paths[0]), [SafetensorsCheckpoint(p) for p in paths[1:]]


def stacked(tasks: list[SafetensorsCheckpoint], key: str) -> Tensor:
    """The reference: every task's tensor in float32, stacked (T, *shape)."""
    return torch.stack([task[key].float() for task in tasks])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_streamed_average_and_task_sum_are_bit_identical_to_a_stacked_reference(tmp_path: Path,
                                                                                 dtype: torch.dtype) -> None:
    base, weights, tasks = lazy_zoo(tmp_path, dtype)
    average = merge_to_state_dict(base, tasks, "weight_averaging", weights=weights)
    arithmetic = merge_to_state_dict(base, tasks, "task_arithmetic", weights=weights, scaling=0.3)
    coef = torch.full((len(tasks),), 0.3)
    for entry in prepare(base, tasks).entries:
        values, pretrained = stacked(tasks, entry.name), weights[entry.name].float()
        assert torch.equal(average[entry.name], values.mean(dim=0).to(dtype)), entry.name
        expected = pretrained + torch.tensordot(coef, values - pretrained, dims=1)
        assert torch.equal(arithmetic[entry.name], expected.to(dtype)), entry.name


@pytest.mark.parametrize("method", ["weight_averaging", "task_arithmetic", "ties"])
def test_streamed_merge_is_bit_identical_to_merge_of_state_dicts(tmp_path: Path, method: str) -> None:
    """Read straight into a reused stack, checked only when an output is not finite: the values of ``merge``."""
    base, weights, tasks = lazy_zoo(tmp_path, torch.bfloat16)
    plain = [dict(task.items()) for task in tasks]
    model = base.to(torch.bfloat16)
    model.load_state_dict(dict(weights.items()))
    expected = mm.merge(model.float(), [{k: v.float() for k, v in s.items()} for s in plain], method).fuse()
    streamed = merge_to_state_dict(base, tasks, method, weights=weights)
    for key, value in expected.state_dict().items():
        assert torch.equal(streamed[key], value.to(streamed[key].dtype)), key


@pytest.mark.parametrize("method", ["weight_averaging", "task_arithmetic", "ties"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_input_is_named_when_checks_are_deferred(tmp_path: Path, method: str, bad: float) -> None:
    base, weights, tasks = lazy_zoo(tmp_path, torch.float32)
    state = dict(tasks[1].items())
    state["2.weight"] = state["2.weight"].clone()
    state["2.weight"][1, 3] = bad
    save_file(state, tmp_path / "bad.safetensors")
    tasks[1] = SafetensorsCheckpoint(tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match=r"finetuned\[1\]\['2\.weight'\] contains NaN or Inf"):
        merge_to_state_dict(base, tasks, method, weights=weights)


@pytest.mark.parametrize("method", ["weight_averaging", "cart"])
def test_a_non_finite_input_of_an_average_is_named(tmp_path: Path, method: str) -> None:
    """An averaged tensor (every tensor under WA, the biases under CART) is summed unchecked; a NaN names its input."""
    base, weights, tasks = lazy_zoo(tmp_path, torch.float32)
    state = dict(tasks[1].items())
    state["0.bias"] = state["0.bias"].clone()
    state["0.bias"][2] = float("nan")
    save_file(state, tmp_path / "bad.safetensors")
    tasks[1] = SafetensorsCheckpoint(tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match=r"finetuned\[1\]\['0\.bias'\] contains NaN or Inf"):
        merge_to_state_dict(base, tasks, method, weights=weights)


def test_a_non_finite_pretrained_tensor_is_named_where_the_merge_uses_it_and_not_read_where_it_does_not(
    tmp_path: Path,
) -> None:
    """The average of the tasks (weight averaging, CART) does not use the pretrained values of a merged tensor."""
    base, clean, tasks = lazy_zoo(tmp_path, torch.float32)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    state["0.bias"][0] = float("nan")
    save_file(state, tmp_path / "bad.safetensors")
    weights = SafetensorsCheckpoint(tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match=r"pretrained\['0\.bias'\] contains NaN or Inf"):
        merge_to_state_dict(base, tasks, "task_arithmetic", weights=weights)
    for method in ("weight_averaging", "cart"):
        merged = merge_to_state_dict(base, tasks, method, weights=weights)
        expected = merge_to_state_dict(base, tasks, method, weights=clean)
        assert all(torch.equal(merged[key], value) for key, value in expected.items()), method


def test_an_overflowing_output_of_finite_inputs_names_the_output(tmp_path: Path) -> None:
    base, weights, tasks = lazy_zoo(tmp_path, torch.float32)
    with pytest.raises(ValueError, match=r"the fused tensor '0\.weight' contains NaN or Inf"):
        merge_to_state_dict(base, tasks, "task_arithmetic", weights=weights, scaling=1e6, out_dtype=torch.float16)
