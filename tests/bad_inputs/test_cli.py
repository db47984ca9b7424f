"""Bad inputs through the real ``mergemodules`` console script: exit status, one line naming the file/key, nothing lost.

Each case checks the documented exit status (docs/recipes.md: 1 unusable file, 2 bad command line or
recipe, 3 the system refused), that stderr is exactly one ``mergemodules CMD: error: ...`` line naming
the file or key, and that no input or earlier output changed (hashes of every file before and after).
The faults a subprocess cannot provoke (a full disk, a read refused, Ctrl-C) run through ``main``
in-process, the function the console script calls.
"""
from __future__ import annotations

import builtins
import errno
import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
from safetensors.torch import load_file

import mergemodules as mm
import mergemodules.cli
import mergemodules.safetensors_files
from mergemodules.cli import main
from mergemodules.files import check_writable
from mergemodules.merge_state import load_merge_state, save_merge_state
from recipe_setup import (
    HERE, callable_recipe, gpt2_folders, line_of, timm_model, timm_recipe, write_recipe, write_timm_checkpoints,
)

SCRIPT = Path(sys.executable).with_name("mergemodules")
COMMAND = [str(SCRIPT)] if SCRIPT.is_file() else [sys.executable, "-m", "mergemodules.cli"]  # the same main()
ENV = dict(os.environ, PYTHONWARNINGS="ignore", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")


def run_script(*args: Any, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run the console script quietly (-q: warnings and errors only)."""
    return subprocess.run([*COMMAND, "-q", *map(str, args)], cwd=cwd, env=env or ENV, capture_output=True,
                          text=True, timeout=300)


def digest(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (hidden ones too) → sha256 of its bytes (a link → its target)."""
    out = {}
    for path in sorted(folder.rglob("*")):
        key = str(path.relative_to(folder))
        if path.is_symlink():
            out[key] = "link to " + os.readlink(path)
        elif path.is_file():
            out[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def one_error_line(stderr: str, *names: str) -> str:
    """The single ``mergemodules CMD: error: ...`` line stderr must consist of; it must contain ``names``."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("mergemodules ") and ": error: " in lines[0], stderr
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


def refused(result: subprocess.CompletedProcess, code: int, *names: str) -> str:
    assert result.returncode == code, result.stderr
    return one_error_line(result.stderr, *names)


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    """base.safetensors, task0/1.safetensors and recipe.yaml (task arithmetic, output merged.safetensors)."""
    write_timm_checkpoints(tmp_path, tasks=2)
    write_recipe(tmp_path, timm_recipe(tmp_path, tasks=2))
    return tmp_path


@pytest.fixture()
def unwritable(tmp_path: Path) -> Iterator[Path]:
    """A folder where no file can be created (a read-only folder; /sys/kernel when running as root)."""
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    candidates = [locked, Path("/sys/kernel")]
    try:
        for candidate in candidates:
            try:
                check_writable(candidate / "probe")
            except OSError:
                yield candidate
                break
        else:
            pytest.skip("no unwritable folder available")
    finally:
        locked.chmod(0o755)


def write_tasks_module(folder: Path) -> None:
    """tasks.py: adapt.data callables; ``build`` marks that it ran, ``build_and_remove`` deletes a folder first."""
    (folder / "tasks.py").write_text(
        "import shutil, sys\n"
        f"sys.path.insert(0, {str(HERE)!r})\n"
        "from recipe_setup import adapt_tasks\n"
        "def build(marker, batches=1):\n"
        "    open(marker, 'w').close()\n"
        "    return adapt_tasks(batches=batches)\n"
        "def build_and_remove(remove, batches=1):\n"
        "    shutil.rmtree(remove)\n"
        "    return adapt_tasks(batches=batches)\n"
    )


def adapt_recipe(folder: Path, data: str, **kwargs: Any) -> Path:
    adapt = {"data": data, "kwargs": {"batches": 1, **kwargs}, "steps": 2, "lr": 0.05}
    return write_recipe(folder, timm_recipe(folder, tasks=2, method="adamerging_taskwise", options={}, adapt=adapt))


# ------------------------------------------------------------------------- outputs that are inputs


def test_merge_onto_the_base_is_refused(folder: Path) -> None:
    before = digest(folder)
    refused(run_script("merge", "recipe.yaml", "-o", "base.safetensors", cwd=folder), 2,
            "output 'base.safetensors' is the same file as base 'base.safetensors'", "refusing to overwrite an input")
    assert digest(folder) == before


def test_merge_onto_a_task_through_a_symlink_is_refused(folder: Path) -> None:
    (folder / "elsewhere").mkdir()
    (folder / "elsewhere" / "out.safetensors").symlink_to(folder / "task1.safetensors")
    before = digest(folder)
    refused(run_script("merge", "recipe.yaml", "-o", "elsewhere/out.safetensors", "--force", cwd=folder), 2,
            "is the same file as tasks[1]", "task1.safetensors")
    assert digest(folder) == before


def test_merge_onto_a_hard_link_of_a_task_is_refused(folder: Path) -> None:
    os.link(folder / "task0.safetensors", folder / "copy.safetensors")
    before = digest(folder)
    refused(run_script("merge", "recipe.yaml", "-o", "copy.safetensors", "--force", cwd=folder), 2,
            "output 'copy.safetensors' is the same file as tasks[0]")
    assert digest(folder) == before


def test_fuse_onto_its_own_merge_state_is_refused(folder: Path) -> None:
    base = timm_model()
    save_merge_state(mm.merge(base, [base, base], "task_arithmetic"), folder / "state.safetensors")
    before = digest(folder)
    refused(run_script("fuse", "state.safetensors", "--recipe", "recipe.yaml", "-o", "state.safetensors",
                         "--force", cwd=folder), 2, "output 'state.safetensors' is the same file as the merge state")
    assert digest(folder) == before


def test_outputs_inside_or_holding_an_input_folder_are_refused(tmp_path: Path, capsys) -> None:
    gpt2_folders(tmp_path)
    write_recipe(tmp_path, {"model": {"hf": "base"}, "tasks": ["task0", "task1"], "method": "task_arithmetic"})
    before = digest(tmp_path)
    refused(run_script("merge", "recipe.yaml", "-o", "base/merged", cwd=tmp_path), 2,
            "output 'base/merged' is inside model.hf", "refusing to overwrite an input")
    capsys.readouterr()  # transformers' progress bars from writing the folders
    assert main(["-q", "merge", str(tmp_path / "recipe.yaml"), "-o", str(tmp_path / "task1"), "--force"]) == 2
    one_error_line(capsys.readouterr().err, "task1' is the same file as tasks[1]")
    assert digest(tmp_path) == before


# --------------------------------------------------------------------------------- overwrite rule


def test_an_existing_output_file_needs_force(folder: Path) -> None:
    (folder / "merged.safetensors").write_bytes(b"an earlier result")
    before = digest(folder)
    refused(run_script("merge", "recipe.yaml", cwd=folder), 2,
            "merged.safetensors' exists; pass --force to replace it")
    assert digest(folder) == before
    assert main(["-q", "merge", str(folder / "recipe.yaml"), "--force"]) == 0
    assert set(load_file(folder / "merged.safetensors")) == set(timm_model().state_dict())
    assert {k: v for k, v in digest(folder).items() if k != "merged.safetensors"} == {
        k: v for k, v in before.items() if k != "merged.safetensors"}


# ---------------------------------------------------------------------- unwritable and lost outputs


def test_adapt_into_an_unwritable_folder_fails_before_any_work(folder: Path, unwritable: Path) -> None:
    write_tasks_module(folder)
    adapt_recipe(folder, "tasks.py:build", marker=str(folder / "data_was_built"))
    before = digest(folder)
    start = time.perf_counter()
    line = refused(run_script("adapt", "recipe.yaml", "-o", unwritable / "out.safetensors", cwd=folder), 3,
                   f"output '{unwritable / 'out.safetensors'}': cannot write in '{unwritable}'")
    assert "Permission denied" in line or "Read-only" in line
    assert digest(folder) == before  # the data callable never ran: nothing was merged or adapted
    assert time.perf_counter() - start < 60


def test_adapt_keeps_the_learnables_when_the_final_write_fails(folder: Path) -> None:
    write_tasks_module(folder)
    (folder / "out").mkdir()
    (folder / "fallback").mkdir()
    adapt_recipe(folder, "tasks.py:build_and_remove", remove=str(folder / "out"))  # the output folder vanishes
    inputs = {k: v for k, v in digest(folder).items() if not k.startswith("out")}
    result = run_script("adapt", "recipe.yaml", "-o", "out/adapted.safetensors", cwd=folder,
                          env=dict(ENV, TMPDIR=str(folder / "fallback")))
    line = refused(result, 3, "out/adapted.safetensors", "the adapted merge state is in")
    saved = list((folder / "fallback").glob("mergemodules-adapted-*.safetensors"))
    assert len(saved) == 1 and str(saved[0]) in line and "mergemodules fuse" in line
    state = load_merge_state(timm_model(), saved[0])  # λ moved away from its initial 0.3 by the adaptation
    assert not torch.equal(state.merged_tensors()["blocks.0.mlp.fc1.weight"].coef.detach(), torch.full((2,), 0.3))
    assert {k: v for k, v in digest(folder).items() if k in inputs} == inputs


# ------------------------------------------------------------------------------- hostile files


def test_truncated_task_fails_check(folder: Path) -> None:
    data = (folder / "task1.safetensors").read_bytes()
    (folder / "task1.safetensors").write_bytes(data[: len(data) * 3 // 4])
    before = digest(folder)
    refused(run_script("merge", "recipe.yaml", "--check", cwd=folder), 1,
            "recipe.yaml:", "tasks[1]", "task1.safetensors", "(truncated or padded file)")
    assert digest(folder) == before


def test_a_header_that_is_a_json_string_is_refused(folder: Path) -> None:
    header = b'"not an object"'
    (folder / "base.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    before = digest(folder)
    refused(run_script("merge", "recipe.yaml", "-o", "out.safetensors", cwd=folder), 1,
            "base: ", "base.safetensors", "its header is a JSON str, not an object")
    assert digest(folder) == before


def test_deeply_nested_recipe(folder: Path) -> None:
    write_recipe(folder, "model: " + "[" * 100_000 + "]" * 100_000 + "\n", name="deep.yaml")
    before = digest(folder)
    refused(run_script("merge", "deep.yaml", "--check", cwd=folder), 2, "deep.yaml", "nested too deeply")
    assert digest(folder) == before


def test_billion_laughs_recipe_fails_fast(folder: Path) -> None:
    lines = ["a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"{n}: &{n} [{', '.join(['*' + p] * 9)}]" for p, n in zip("abcdefghijk", "bcdefghijkl")]
    write_recipe(folder, "\n".join(lines) + "\n", name="laughs.yaml")  # 9^12 strings if expanded
    before = digest(folder)
    start = time.perf_counter()
    refused(run_script("merge", "laughs.yaml", "--check", cwd=folder), 2, "laughs.yaml:2: b[0]: an alias")
    assert time.perf_counter() - start < 30
    assert digest(folder) == before


def test_non_utf8_recipe(folder: Path) -> None:
    (folder / "latin1.yaml").write_bytes((folder / "recipe.yaml").read_bytes() + "# café\n".encode("latin-1"))
    before = digest(folder)
    refused(run_script("merge", "latin1.yaml", "--check", cwd=folder), 2, "latin1.yaml: not a UTF-8 text file")
    assert digest(folder) == before


def test_check_validates_option_values(folder: Path) -> None:
    line_no = line_of(write_recipe(folder, timm_recipe(folder, tasks=2, method="cart", options={"rank": 2.5})), "rank:")
    before = digest(folder)
    refused(run_script("merge", "recipe.yaml", "--check", cwd=folder), 2,
            f"recipe.yaml:{line_no}: options.rank: 2.5: expected a positive integer or a fraction in (0, 1]")
    assert digest(folder) == before


def test_callables_are_not_imported_by_check_or_inspect(folder: Path) -> None:
    marker = folder / "arch_was_imported"
    callable_recipe(folder, marker)
    before = digest(folder)
    result = run_script("merge", "recipe.yaml", "--check", cwd=folder)
    assert result.returncode == 0 and "model.callable 'arch.py:build' was not run" in result.stderr
    refused(run_script("inspect", "recipe.yaml", cwd=folder), 2, "model.callable 'arch.py:build' is code",
            "--trust-code")
    assert digest(folder) == before and not marker.exists()
    assert main(["-q", "inspect", str(folder / "recipe.yaml"), "--trust-code"]) == 0  # asked: the callable runs
    assert marker.exists()


# ------------------------------------------------- faults provoked in-process through main()


def run_main(capsys: pytest.CaptureFixture, *argv: Any) -> tuple[int, str]:
    code = main(["-q", *map(str, argv)])
    return code, capsys.readouterr().err


class FullDisk:
    """An open file whose writes fail as on a full disk (the OSError names no file)."""

    def __init__(self, path: Any, mode: str = "r", *args: Any, **kwargs: Any) -> None:
        self.file = builtins.open(path, mode, *args, **kwargs)
        self.writing = "w" in mode or "+" in mode

    def __enter__(self) -> FullDisk:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.file.close()

    def write(self, data: Any) -> int:
        if self.writing:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.file.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.file, name)


def test_full_disk_keeps_the_previous_output(folder: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    (folder / "merged.safetensors").write_bytes(b"an earlier result")
    before = digest(folder)
    monkeypatch.setattr(mergemodules.safetensors_files, "open", FullDisk, raising=False)
    code, err = run_main(capsys, "merge", folder / "recipe.yaml", "--force")
    assert code == 3
    one_error_line(err, "No space left on device", str(folder / "merged.safetensors"))
    assert digest(folder) == before  # the earlier output is intact and no temporary is left


def test_a_checkpoint_that_cannot_be_read(folder: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    def refuse(path: Any, *args: Any, **kwargs: Any) -> Any:
        if Path(path).name == "task1.safetensors":
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return builtins.open(path, *args, **kwargs)

    monkeypatch.setattr(mergemodules.safetensors_files, "open", refuse, raising=False)
    before = digest(folder)
    code, err = run_main(capsys, "merge", folder / "recipe.yaml", "--check")
    assert code == 3
    one_error_line(err, "Permission denied", str(folder / "task1.safetensors"))
    assert digest(folder) == before


def test_a_folder_where_a_file_belongs(folder: Path, capsys) -> None:
    (folder / "out.safetensors").mkdir()
    (folder / "state").mkdir()
    before = digest(folder)
    code, err = run_main(capsys, "merge", folder / "recipe.yaml", "-o", folder / "out.safetensors", "--force")
    assert code == 2
    one_error_line(err, "out.safetensors' exists and is a folder, not a file")
    code, err = run_main(capsys, "fuse", folder / "state", "--recipe", folder / "recipe.yaml", "-o",
                         folder / "fused.safetensors")
    assert code == 2
    one_error_line(err, "merge state", "state' does not exist or is not a file")
    assert digest(folder) == before


def test_an_os_error_during_the_merge(folder: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    def is_a_directory(path: Any, *args: Any, **kwargs: Any) -> None:
        raise IsADirectoryError(errno.EISDIR, "Is a directory", str(path))

    monkeypatch.setattr(mergemodules.cli, "save_fused_streaming", is_a_directory)
    before = digest(folder)
    code, err = run_main(capsys, "merge", folder / "recipe.yaml", "-o", folder / "out.safetensors")
    assert code == 3
    one_error_line(err, "Is a directory", "out.safetensors")
    assert digest(folder) == before


def test_a_truncated_merge_state(folder: Path, capsys) -> None:
    base = timm_model()
    save_merge_state(mm.merge(base, [base, base], "task_arithmetic"), folder / "state.safetensors")
    data = (folder / "state.safetensors").read_bytes()
    (folder / "state.safetensors").write_bytes(data[: len(data) // 2])
    before = digest(folder)
    code, err = run_main(capsys, "fuse", folder / "state.safetensors", "--recipe", folder / "recipe.yaml", "-o",
                         folder / "fused.safetensors")
    assert code == 1
    one_error_line(err, str(folder / "state.safetensors"))
    assert digest(folder) == before


def test_shape_mismatch_is_status_1_as_documented(folder: Path, capsys) -> None:
    import timm
    from safetensors.torch import save_file

    other = timm.create_model("vit_tiny_patch16_224", num_classes=5, img_size=32, patch_size=8, depth=1, mlp_ratio=2)
    save_file(other.state_dict(), folder / "task1.safetensors")
    before = digest(folder)
    code, err = run_main(capsys, "merge", folder / "recipe.yaml", "--check")
    assert code == 1
    one_error_line(err, "tasks[1]", "task1.safetensors['blocks.0.mlp.fc1.weight'] has shape (384, 192)")
    docs = (Path(__file__).parents[2] / "docs" / "recipes.md").read_text()
    assert "| 1 | a file the recipe or command names cannot be used | a checkpoint missing a key or of another shape" \
        in docs
    assert digest(folder) == before


def test_outputs_must_be_distinct(folder: Path, capsys) -> None:
    write_tasks_module(folder)
    adapt_recipe(folder, "tasks.py:build", marker=str(folder / "data_was_built"))
    before = digest(folder)
    code, err = run_main(capsys, "adapt", folder / "recipe.yaml", "-o", folder / "a.safetensors", "--merge-state",
                         folder / "a.safetensors")
    assert code == 2
    one_error_line(err, "--merge-state", "is the same path as output", "choose distinct outputs")
    assert digest(folder) == before


def test_an_existing_adaptation_checkpoint_needs_force_or_resume(folder: Path, capsys) -> None:
    write_tasks_module(folder)
    recipe = adapt_recipe(folder, "tasks.py:build", marker=str(folder / "data_was_built"))
    recipe.write_text(recipe.read_text() + "  checkpoint: run.pt\n")
    (folder / "run.pt").write_bytes(b"an earlier run")
    before = digest(folder)
    code, err = run_main(capsys, "adapt", recipe, "-o", folder / "a.safetensors")
    assert code == 2
    one_error_line(err, "adapt.checkpoint", "run.pt' exists; pass --force")
    (folder / "run.pt").unlink()
    code, err = run_main(capsys, "adapt", recipe, "-o", folder / "a.safetensors", "--resume")
    assert code == 2
    one_error_line(err, "--resume: no adaptation checkpoint", "run.pt")
    assert digest(folder) == {k: v for k, v in before.items() if k != "run.pt"}


def test_an_output_folder_holding_the_inputs(folder: Path, capsys) -> None:
    before = digest(folder)
    code, err = run_main(capsys, "merge", folder / "recipe.yaml", "-o", folder, "--force")
    assert code == 2
    one_error_line(err, "is a folder holding the recipe")
    assert digest(folder) == before


def test_non_finite_command_line_options(capsys) -> None:
    code, err = run_main(capsys, "inspect", "--model", "open_clip:ViT-B-32", "--method", "cart", "--option",
                         "rank=.nan")
    assert code == 2
    one_error_line(err, "--option 'rank=.nan': not a finite number")


def test_interrupted_leaves_nothing(folder: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    def interrupt(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(mergemodules.cli, "save_fused_streaming", interrupt)
    before = digest(folder)
    code, err = run_main(capsys, "merge", folder / "recipe.yaml")
    assert code == 130
    one_error_line(err, "interrupted")
    assert digest(folder) == before


def test_a_bug_keeps_its_traceback(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def bug(*args: Any, **kwargs: Any) -> None:
        raise ZeroDivisionError("a bug, not a user error")

    monkeypatch.setattr(mergemodules.cli, "save_fused_streaming", bug)
    with pytest.raises(ZeroDivisionError):
        main(["-q", "merge", str(folder / "recipe.yaml")])
