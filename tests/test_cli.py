"""The ``mergemodules`` command: recipe → fused file round trips, bit-identical to the in-Python merge."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import mergemodules as mm
from helpers import perturbed
from mergemodules.cli import main, memory_plan
from mergemodules.merge_state import save_merge_state
from mergemodules.methods import with_awd
from recipe_setup import HERE, adapt_tasks, gpt2_folders, timm_model, timm_recipe, write_recipe, write_timm_checkpoints


def assert_same_state(actual: dict, expected: dict) -> None:
    assert sorted(actual) == sorted(expected)
    for key in expected:
        assert actual[key].dtype == expected[key].dtype, key
        assert torch.equal(actual[key], expected[key]), key


@pytest.mark.parametrize("method, options", [
    ("task_arithmetic", {"scaling": 0.4}),
    ("ties", {"density": 0.3}),
    ("cart", {"rank": 0.25}),
])
def test_merge_round_trip_is_bit_identical(tmp_path: Path, method: str, options: dict) -> None:
    base, finetuned = write_timm_checkpoints(tmp_path, tasks=3)
    recipe = write_recipe(tmp_path, timm_recipe(tmp_path, method=method, options=options))
    assert main(["-q", "merge", str(recipe), "-o", str(tmp_path / "out.safetensors")]) == 0

    fused = load_file(tmp_path / "out.safetensors")
    model = timm_model()
    model.load_state_dict(fused, strict=True)  # loads into the original architecture, original keys
    expected = mm.merge(base, finetuned, method, exclude=["head"], **options).fuse().state_dict()
    assert_same_state(model.state_dict(), expected)
    assert torch.equal(fused["head.weight"], base.state_dict()["head.weight"])  # excluded: pretrained value


def test_merge_from_torch_files_with_key_and_recipe_output(tmp_path: Path) -> None:
    base, finetuned = write_timm_checkpoints(tmp_path, tasks=2, suffix=".pt")
    recipe = write_recipe(tmp_path, timm_recipe(tmp_path, tasks=2, suffix=".pt"))
    assert main(["-q", "merge", str(recipe)]) == 0  # output from the recipe, relative to its folder
    expected = mm.merge(base, finetuned, "task_arithmetic", exclude=["head"], scaling=0.4).fuse().state_dict()
    assert_same_state(load_file(tmp_path / "merged.safetensors"), expected)


def test_merge_in_bfloat16(tmp_path: Path) -> None:
    base, finetuned = write_timm_checkpoints(tmp_path, tasks=2)
    recipe = write_recipe(tmp_path, timm_recipe(tmp_path, tasks=2, dtype="bfloat16", out_dtype="bfloat16"))
    assert main(["-q", "merge", str(recipe)]) == 0
    fused = load_file(tmp_path / "merged.safetensors")
    expected = mm.merge(base.to(torch.bfloat16), [m.to(torch.bfloat16) for m in finetuned], "task_arithmetic",
                        exclude=["head"], scaling=0.4).fuse().state_dict()
    assert fused["blocks.0.mlp.fc1.weight"].dtype == torch.bfloat16
    assert_same_state({k: fused[k] for k in expected}, expected)


def test_hugging_face_folder_round_trip(tmp_path: Path) -> None:
    from transformers import GPT2LMHeadModel

    base_dir, task_dirs = gpt2_folders(tmp_path)
    recipe = write_recipe(tmp_path, {
        "model": {"hf": "base"}, "tasks": ["task0", "task1"], "method": "tsv", "output": "merged",
    })
    assert main(["-q", "merge", str(recipe)]) == 0
    loaded = GPT2LMHeadModel.from_pretrained(tmp_path / "merged")
    assert loaded.lm_head.weight is loaded.transformer.wte.weight  # still tied
    base = GPT2LMHeadModel.from_pretrained(base_dir)
    finetuned = [GPT2LMHeadModel.from_pretrained(d) for d in task_dirs]
    assert_same_state(loaded.state_dict(), mm.merge(base, finetuned, "tsv").fuse().state_dict())
    assert (tmp_path / "merged" / "config.json").is_file()
    assert main(["-q", "merge", str(recipe)]) == 2  # an existing output folder is not replaced without --force
    assert main(["-q", "merge", str(recipe), "--force"]) == 0


def test_merge_refuses_an_adaptive_method(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_timm_checkpoints(tmp_path, tasks=2)
    recipe = write_recipe(tmp_path, timm_recipe(tmp_path, tasks=2, method="adarank_ta", options={}))
    assert main(["-q", "merge", str(recipe)]) == 2
    err = capsys.readouterr().err
    line = recipe.read_text().splitlines().index("method: adarank_ta") + 1
    assert f"recipe.yaml:{line}: method:" in err and "adarank_ta" in err and "mergemodules adapt" in err
    assert not (tmp_path / "merged.safetensors").exists()


def test_check_validates_without_writing(tmp_path: Path) -> None:
    write_timm_checkpoints(tmp_path, tasks=2)
    recipe = write_recipe(tmp_path, timm_recipe(tmp_path, tasks=2))
    assert main(["-q", "merge", str(recipe), "--check"]) == 0
    assert not (tmp_path / "merged.safetensors").exists()


def test_inspect_lists_matrices_ranks_and_memory(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_timm_checkpoints(tmp_path, tasks=2)
    recipe = write_recipe(tmp_path, timm_recipe(tmp_path, tasks=2, method="cart", options={"rank": 0.08}))
    assert main(["inspect", str(recipe)]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if "matrix, low-rank" in line]
    entries = mm.targets.plan(timm_model(), exclude=["head"])
    matrices = [e for e in entries if e.merged and e.is_matrix]
    assert [r[0] for r in rows] == [e.name for e in matrices]
    for row, entry in zip(rows, matrices):  # rank column: the rank the method keeps at 0.08 · min(out, in)
        assert int(row[-3]) == mm.resolve_rank(0.08, entry.shape) < min(entry.shape) // 10
    assert "T=2 tasks" in out and "MiB" in out


def _stored_bytes(merged: mm.MergedModel) -> int:
    """Bytes of every distinct storage the merged tensors hold: B, the dense terms and the factors."""
    storages = {}
    for module in merged.merged_tensors().values():
        for buffer in module.buffers(recurse=False):
            storages[buffer.untyped_storage().data_ptr()] = buffer.untyped_storage().nbytes()
    return sum(storages.values())


AWD_FAST = {"steps": 2, "lr": 1e-3}
REGISTERED = list(dict.fromkeys(method.name for method in mm.METHODS.values()))
WITH_AWD = ["ties", "tsv", "cart", "adarank_ta"]


def _planned_method(name: str) -> mm.Method:
    """A registered method (AWD ones with a short δ fit), or ``with_awd(inner)`` for ``awd+inner``."""
    if name.startswith("awd+"):
        return with_awd(name[4:], **AWD_FAST)
    method = mm.get_method(name)
    return mm.get_method(method, **AWD_FAST) if name.startswith("awd_") else method


@pytest.mark.parametrize("name", REGISTERED + [f"awd+{inner}" for inner in WITH_AWD])
def test_inspect_memory_is_what_merge_holds(name: str) -> None:
    method = _planned_method(name)
    base = timm_model()
    finetuned = [perturbed(base, seed=s) for s in (1, 2, 3)]
    merged = mm.merge(base, finetuned, method, exclude=["head"])
    rows = memory_plan(mm.targets.plan(base, exclude=["head"]), method, 3, 4)
    assert sum(r["bytes"] for r in rows) == _stored_bytes(merged)
    ranks = {r["name"]: r["rank"] for r in rows if r["merged"] == "matrix, low-rank"}
    assert ranks == {n: str(w.rank) for n, w in merged.merged_weights().items() if w.U is not None}


def test_inspect_memory_of_awd_ties_and_awd_tsv_at_vit_b_scale() -> None:
    """The plan asks the transform what it stores: AWD+TIES keeps one term, AWD+TSV-M ⌊768/8⌋ components."""
    with torch.device("meta"):
        entries = mm.targets.plan(torch.nn.Linear(768, 3072))  # shapes only
    row = {name: {r["name"]: r for r in memory_plan(entries, with_awd(name), 8, 4)}["weight"]
           for name in ("ties", "tsv", "task_arithmetic")}
    assert row["ties"]["bytes"] == (1 + 1) * 3072 * 768 * 4  # B and one disjoint-mean term, not 8
    assert row["task_arithmetic"]["bytes"] == (1 + 8) * 3072 * 768 * 4
    assert row["tsv"]["rank"] == "96" and row["tsv"]["bytes"] == (3072 * 768 + 8 * 96 * (3072 + 768 + 1)) * 4


@pytest.mark.parametrize("name", ["tsv", "awd+tsv"])
def test_inspect_memory_where_tsv_keeps_no_component(name: str) -> None:
    """TSV-M keeps int(k/T) components per task: none for a 2-output layer and 3 tasks, so B alone is stored."""
    base = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    finetuned = [perturbed(base, seed=s) for s in (1, 2, 3)]
    method = _planned_method(name)
    merged = mm.merge(base, finetuned, method)
    rows = {r["name"]: r for r in memory_plan(mm.targets.plan(base), method, 3, 4)}
    assert merged.merged_weights()["2.weight"].rank == 0 and rows["2.weight"]["rank"] == "0"
    assert sum(r["bytes"] for r in rows.values()) == _stored_bytes(merged)


def test_inspect_a_model_by_name(capsys: pytest.CaptureFixture) -> None:
    assert main(["inspect", "--model", "open_clip:ViT-B-32", "--method", "tsv", "--tasks", "8"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if "matrix, low-rank" in line}
    assert rows["visual.transformer.resblocks.0.attn.in_proj_weight"][1:2] == ["2304x768"]  # MHA in-projection
    assert rows["visual.proj"][1:2] == ["768x512"]  # [in, out] projection
    assert rows["visual.proj"][-3] == "64"  # TSV-M: ⌊min(out, in) / T⌋ components per task


def test_fuse_a_saved_merge_state(tmp_path: Path) -> None:
    base, finetuned = write_timm_checkpoints(tmp_path, tasks=2)
    recipe = write_recipe(tmp_path, timm_recipe(tmp_path, tasks=2))
    merged = mm.merge(base, finetuned, "cart", rank=0.5)
    save_merge_state(merged, tmp_path / "state.safetensors")
    out = tmp_path / "fused.safetensors"
    assert main(["-q", "fuse", str(tmp_path / "state.safetensors"), "--recipe", str(recipe), "-o", str(out)]) == 0
    assert_same_state(load_file(out), merged.fuse().state_dict())


def test_adapt_equals_the_in_python_loop(tmp_path: Path) -> None:
    base, finetuned = write_timm_checkpoints(tmp_path, tasks=2)
    adapt = {"data": f"{HERE / 'recipe_setup.py'}:adapt_tasks", "kwargs": {"batches": 2}, "steps": 3, "lr": 0.01,
             "merge_state": "state.safetensors"}
    recipe = write_recipe(tmp_path, timm_recipe(tmp_path, tasks=2, method="adamerging_taskwise", options={},
                                                adapt=adapt))
    assert main(["-q", "adapt", str(recipe), "-o", str(tmp_path / "adapted.safetensors")]) == 0

    merged = mm.merge(base, finetuned, "adamerging_taskwise", exclude=["head"])
    mm.adapt(merged, adapt_tasks(batches=2), steps=3, lr=0.01, seed=0)
    assert not torch.equal(merged.merged_tensors()["blocks.0.mlp.fc1.weight"].coef.detach(), torch.full((2,), 0.3))
    assert_same_state(load_file(tmp_path / "adapted.safetensors"), merged.fuse().state_dict())
    state = mm.load_merge_state(timm_model(), tmp_path / "state.safetensors")
    name = "blocks.0.mlp.fc1.weight"
    assert torch.equal(state.merged_tensors()[name].coef, merged.merged_tensors()[name].coef)


def test_help_is_useful(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("merge", "adapt", "inspect", "fuse", "docs/recipes.md"):
        assert command in out


def test_memory_plan_follows_the_method_matrix_set():
    """``inspect`` counts as matrices what the method decomposes: TSV-M's ``all_2d`` takes a free 2-D table."""
    from mergemodules.cli import memory_plan
    from mergemodules.targets import plan

    class WithTable(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(8, 16)
            self.table = torch.nn.Parameter(torch.zeros(10, 8))

    entries = plan(WithTable(), None, None, None)
    kinds = {m: {r["name"]: r["merged"] for r in memory_plan(entries, mm.get_method(m), 4, 4)}
             for m in ("tsv", "task_arithmetic")}
    assert kinds["tsv"]["table"] == "matrix, low-rank" and kinds["task_arithmetic"]["table"] == "dense"
    assert kinds["tsv"]["fc.weight"] == "matrix, low-rank"
