"""``mergemodules adapt``'s step settings (recipe keys and flags) and the command under ``torchrun`` (gloo, CPU)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import mergemodules as mm
from mergemodules.cli import main
from recipe_setup import HERE, adapt_tasks, timm_recipe, write_recipe, write_timm_checkpoints
from test_cli import assert_same_state

SCRIPT = Path(sys.executable).with_name("mergemodules")
ENTRY = [str(SCRIPT)] if SCRIPT.is_file() else ["-m", "mergemodules.cli"]  # what torchrun runs: the same main()


def adapt_recipe(folder: Path, **adapt_keys) -> tuple[Path, torch.nn.Module, list[torch.nn.Module]]:
    base, finetuned = write_timm_checkpoints(folder, tasks=2)
    adapt = {"data": f"{HERE / 'recipe_setup.py'}:adapt_tasks", "kwargs": {"batches": 2}, "steps": 3, "lr": 0.01,
             **adapt_keys}
    recipe = timm_recipe(folder, tasks=2, method="adamerging_taskwise", options={}, adapt=adapt)
    return write_recipe(folder, recipe), base, finetuned


def in_python(base, finetuned, **settings) -> dict[str, torch.Tensor]:
    merged = mm.merge(base, finetuned, "adamerging_taskwise", exclude=["head"])
    mm.adapt(merged, adapt_tasks(batches=2), steps=3, lr=0.01, seed=0, **settings)
    return merged.fuse().state_dict()


@pytest.mark.parametrize("keys, flags, settings", [
    ({"per_task_backward": True}, [], {"per_task_backward": True}),
    ({}, ["--per-task-backward"], {"per_task_backward": True}),
    ({"autocast": "bf16"}, [], {"autocast": torch.bfloat16}),
    ({}, ["--autocast", "bf16"], {"autocast": torch.bfloat16}),
    ({"pad_id": 7}, [], {"pad_id": 7}),
    ({"autocast": "fp16"}, ["--autocast", "bf16"], {"autocast": torch.bfloat16}),  # the flag wins
])
def test_step_settings_reach_the_loop(tmp_path: Path, keys, flags, settings) -> None:
    recipe, base, finetuned = adapt_recipe(tmp_path, **keys)
    out = tmp_path / "adapted.safetensors"
    assert main(["-q", "adapt", str(recipe), "-o", str(out), *flags]) == 0
    assert_same_state(load_file(out), in_python(base, finetuned, **settings))


@pytest.mark.parametrize("key, value, expected", [
    ("parallel", "pipeline", "expected one of ['data', 'tasks']"),
    ("autocast", "int8", "expected one of"),
    ("per_task_backward", "yes", "expected true or false"),
    ("pad_id", 1.5, "expected an integer"),
])
def test_bad_step_settings_name_the_key(tmp_path: Path, capsys: pytest.CaptureFixture, key, value, expected) -> None:
    recipe, _, _ = adapt_recipe(tmp_path, **{key: value})
    assert main(["-q", "adapt", str(recipe), "-o", str(tmp_path / "out.safetensors")]) == 2
    err = capsys.readouterr().err
    assert f"adapt: {key}:" in err or f"adapt.{key}" in err, err
    assert expected in err
    assert not (tmp_path / "out.safetensors").exists()


def test_a_bad_parallel_flag_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    recipe, _, _ = adapt_recipe(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(["adapt", str(recipe), "--parallel", "pipeline"])
    assert exit_.value.code == 2 and "--parallel" in capsys.readouterr().err


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch without torch.distributed")
@pytest.mark.parametrize("parallel", ["data", "tasks"])
def test_adapt_under_torchrun_gives_the_one_process_result_and_rank0_writes(tmp_path: Path, parallel: str) -> None:
    recipe, base, finetuned = adapt_recipe(tmp_path, parallel=parallel, merge_state="state.safetensors")
    single = tmp_path / "single"
    single.mkdir()
    assert main(["-q", "adapt", str(recipe), "-o", str(single / "adapted.safetensors"),
                 "--merge-state", str(single / "state.safetensors")]) == 0
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                "--monitor-interval=0.1"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
    result = subprocess.run([*launcher, *ENTRY, "-v", "adapt", str(recipe), "-o", str(tmp_path / "adapted.safetensors")],
                            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    log = result.stdout + result.stderr
    assert f"2 processes, parallel={parallel!r}" in log
    assert log.count("wrote merge state") == 1 and log.count("adapted 3 steps") == 1  # rank 0 alone writes and logs
    two, one = load_file(tmp_path / "adapted.safetensors"), load_file(single / "adapted.safetensors")
    assert two.keys() == one.keys()
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-5, atol=1e-6)
    states = [load_file(tmp_path / "state.safetensors"), load_file(single / "state.safetensors")]
    for k in states[1]:
        torch.testing.assert_close(states[0][k], states[1][k], rtol=1e-5, atol=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp file left behind
