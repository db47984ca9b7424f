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
