"""``adapt`` under ``torchrun --nproc_per_node=2`` (gloo, CPU): the single-process result, an exact resume."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mergemodules as mm
from tta_distributed_worker import SCENARIOS, run, uninterrupted
from tta_setup import one_thread  # noqa: F401  (autouse fixture)
from tta_setup import models, tasks

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch without torch.distributed")


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, dict]:
    """The worker's results on ranks 0 and 1 (one torchrun for every test here) and its output folder."""
    out = tmp_path_factory.mktemp("torchrun")
    worker = Path(__file__).with_name("tta_distributed_worker.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "--monitor-interval=0.1", str(worker), str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
    result = subprocess.run(cmd, env=env, cwd=out, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, f"torchrun failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return out, torch.load(out / "rank0.pt", weights_only=False), torch.load(out / "rank1.pt", weights_only=False)


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_two_processes_give_the_single_process_result(two_processes, scenario):
    _, rank0, rank1 = two_processes
    expected, history = run(*SCENARIOS[scenario])
    actual, actual_history = rank0[scenario]
    assert actual.keys() == expected.keys()
    for k in expected:
        torch.testing.assert_close(actual[k], expected[k], rtol=1e-5, atol=1e-6)
        assert torch.equal(rank1[scenario][0][k], actual[k])  # every process holds the same learnables
    assert [h["step"] for h in actual_history] == [h["step"] for h in history]
    for got, want in zip(actual_history, history):
        assert got.get("accuracy") == want.get("accuracy")  # evaluation split by task over the processes
        if "entropy" in want:
            assert got["entropy"] == pytest.approx(want["entropy"], rel=1e-5)
    assert rank1[scenario][1] == actual_history


def test_two_process_resume_is_exact(two_processes):
    _, rank0, rank1 = two_processes
    for results in (rank0, rank1):
        resumed, history = results["resumed"]
        expected, expected_history = results["uninterrupted"]
        assert all(torch.equal(resumed[k], expected[k]) for k in expected)
        assert history == expected_history


def test_resuming_in_another_number_of_processes_is_an_error(two_processes):
    out, _, _ = two_processes
    saved = torch.load(out / "adapt.pt", weights_only=True)
    assert saved["world"] == {"size": 2, "parallel": "data"} and len(saved["rng"]) == 2
    merged = mm.merge(*models(dropout=0.2), "adarank_cart")
    with pytest.raises(ValueError, match=r"written by 2 process\(es\).*this run has 1"):
        mm.adapt(merged, tasks(noisy=True), steps=7, lr=0.02, seed=5, checkpoint=out / "adapt.pt", resume=True)


def test_a_one_process_checkpoint_of_the_first_format_resumes(tmp_path):
    path = tmp_path / "adapt.pt"
    expected, expected_history = uninterrupted()
    merged = mm.merge(*models(dropout=0.2), "adarank_cart").train()
    mm.adapt(merged, tasks(noisy=True), steps=3, lr=0.02, seed=5, checkpoint=path)
    state = torch.load(path, weights_only=True)
    state.update(format="mergemodules.tta/1", rng=state["rng"][0])
    del state["world"]
    torch.save(state, path)
    resumed = mm.merge(*models(dropout=0.2), "adarank_cart").train()
    history = mm.adapt(resumed, tasks(noisy=True), steps=7, lr=0.02, seed=5, checkpoint=path, resume=True)
    assert all(torch.equal(v, expected[k]) for k, v in resumed.named_parameters()) and history == expected_history
