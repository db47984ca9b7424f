"""Bad files, in-process: crafted safetensors headers, hostile recipes, and how outputs are written.

Every problem must be a ValueError (RecipeError) naming the file and the key, raised before any work.
"""
from __future__ import annotations

import json
import os
import struct
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import save_file

import mergemodules as mm
from mergemodules.export import save_fused
from mergemodules.files import atomic_write, new_temp, remove_stale_temps
from mergemodules.recipe import CheckpointError, RecipeError, load_recipe, parse_recipe
from mergemodules.safetensors_files import read_safetensors_header, read_safetensors_layout, read_stored_tensor
from mergemodules.sources import SafetensorsCheckpoint, open_checkpoint, write_hf_folder
from recipe_setup import callable_recipe, line_of, timm_recipe, write_recipe, write_timm_checkpoints

W = {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}  # one valid entry: 2·3 float32 = 24 bytes


def crafted(path: Path, header: Any, data: bytes = bytes(24), raw: bytes | None = None) -> Path:
    """A safetensors file with the given header (JSON-encoded unless ``raw``) and data section."""
    encoded = raw if raw is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)
    return path


# ------------------------------------------------------------------------------- safetensors headers


@pytest.mark.parametrize("header, data, message", [
    ("just a string", bytes(24), "its header is a JSON str, not an object"),
    ([W], bytes(24), "its header is a JSON list, not an object"),
    ({"w": {**W, "dtype": "F33"}}, bytes(24), "tensor 'w': unknown dtype 'F33'"),
    ({"w": {**W, "shape": [-2, 3]}}, bytes(24), "tensor 'w': shape [-2, 3] is not a list of non-negative integers"),
    ({"w": {**W, "shape": [2.0, 3]}}, bytes(24), "tensor 'w': shape [2.0, 3] is not a list"),
    ({"w": {**W, "shape": [True, 3]}}, bytes(24), "tensor 'w': shape [True, 3] is not a list"),
    ({"w": {**W, "shape": "2x3"}}, bytes(24), "tensor 'w': shape '2x3'"),
    ({"w": {"dtype": "F32", "shape": [2, 3]}}, bytes(24), "tensor 'w': expected {'dtype', 'shape', 'data_offsets'}"),
    ({"w": [1, 2]}, bytes(24), "tensor 'w': expected"),
    ({"w": {**W, "data_offsets": [0, 20]}}, bytes(20), "tensor 'w': data_offsets [0, 20] span 20 bytes"),
    ({"w": {**W, "data_offsets": [0]}}, bytes(24), "tensor 'w': data_offsets [0] is not a pair"),
    ({"w": {**W, "data_offsets": [-24, 0]}}, bytes(24), "tensor 'w': data_offsets [-24, 0]"),
    ({"w": W, "v": W}, bytes(24), "tensor 'v' at data_offsets [0, 24] overlaps tensor 'w'"),
    ({"w": {**W, "data_offsets": [8, 32]}}, bytes(32), "tensor 'w' at data_offsets [8, 32] leaves a gap at byte 0"),
    ({"w": W}, bytes(12), "the header describes 24 bytes of tensor data, the file holds 12 (truncated"),
    ({"w": W}, bytes(40), "the header describes 24 bytes of tensor data, the file holds 40"),
    ({"w": W, "__metadata__": {"format": 3}}, bytes(24), "'__metadata__' must map names to strings"),
])
def test_crafted_headers_are_value_errors_naming_file_and_key(tmp_path: Path, header: Any, data: bytes,
                                                              message: str) -> None:
    path = crafted(tmp_path / "crafted.safetensors", header, data)
    with pytest.raises(ValueError) as info:
        read_safetensors_header(path)
    assert str(path) in str(info.value) and message in str(info.value)


@pytest.mark.parametrize("raw, message", [
    (b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),  # would be a RecursionError in json.loads
    (b'{"w": ' * 100_000 + b"1" + b"}" * 100_000, "not valid JSON"),
    (b"\xff\xfe{}", "not valid JSON"),
    (b"{not json}", "not valid JSON"),
])
def test_unparsable_headers_do_not_recurse(tmp_path: Path, raw: bytes, message: str) -> None:
    path = crafted(tmp_path / "deep.safetensors", None, b"", raw=raw)
    with pytest.raises(ValueError, match=message) as info:
        SafetensorsCheckpoint(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("content, message", [
    (b"", "too short for a safetensors header"),
    (b"\x01\x00", "too short"),
    (struct.pack("<Q", 10**12) + b"{}", "header length 1000000000000 does not fit a file of 10 bytes"),
    (struct.pack("<Q", 0), "header length 0"),
])
def test_impossible_header_lengths(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "short.safetensors"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        open_checkpoint(path)


def test_valid_files_still_read(tmp_path: Path) -> None:
    state = {"w": torch.randn(2, 3), "empty": torch.zeros(0, 4), "ids": torch.arange(5), "h": torch.ones(3).half()}
    save_file(state, tmp_path / "ok.safetensors", metadata={"format": "pt"})
    header = read_safetensors_header(tmp_path / "ok.safetensors")
    assert header == {k: (tuple(v.shape), v.dtype) for k, v in state.items()}
    ckpt = open_checkpoint(tmp_path / "ok.safetensors")
    assert all(torch.equal(ckpt[k], v) for k, v in state.items())


@pytest.mark.skipif(sys.byteorder != "little", reason="pretends to be big-endian on a little-endian machine")
def test_values_are_read_as_little_endian_on_any_machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The format is little-endian: on a big-endian machine each value's bytes are swapped after the read."""
    value = torch.tensor([1.5, -2.0, 3.25], dtype=torch.float32)
    save_file({"w": value, "b": torch.tensor([True, False])}, tmp_path / "x.safetensors")
    stored = read_safetensors_layout(tmp_path / "x.safetensors")
    assert torch.equal(read_stored_tensor(tmp_path / "x.safetensors", stored["w"]), value)
    monkeypatch.setattr(sys, "byteorder", "big")
    swapped = read_stored_tensor(tmp_path / "x.safetensors", stored["w"])
    assert swapped.view(torch.uint8).view(3, 4).tolist() == value.view(torch.uint8).view(3, 4).flip(1).tolist()
    assert read_stored_tensor(tmp_path / "x.safetensors", stored["b"]).tolist() == [True, False]  # one byte: as is


def test_a_file_truncated_after_its_header_was_read(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    save_file({"a": torch.randn(64), "b": torch.randn(64)}, path)
    ckpt = SafetensorsCheckpoint(path)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 100)
    with pytest.raises(ValueError, match=r"x.safetensors'?: cannot read tensor 'b'"):
        ckpt["b"]


@pytest.mark.parametrize("index, message", [
    ({"weight_map": {"w": "../outside.safetensors"}}, "shard '../outside.safetensors' is not a file name"),
    ({"weight_map": {"w": "/etc/passwd"}}, "shard '/etc/passwd' is not a file name"),
    ({"weight_map": {"w": "missing.safetensors"}}, "shard 'missing.safetensors' does not exist"),
    ({"weights": {}}, "is not a checkpoint index with a 'weight_map'"),
    ("not a mapping", "is not a checkpoint index"),
])
def test_hugging_face_index_is_checked(tmp_path: Path, index: Any, message: str) -> None:
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises((ValueError, FileNotFoundError), match=message) as info:
        open_checkpoint(tmp_path)
    assert "model.safetensors.index.json" in str(info.value)


# ------------------------------------------------------------------------------------------ recipes


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    write_timm_checkpoints(tmp_path, tasks=2)
    return tmp_path


def test_non_utf8_recipe_names_the_file(folder: Path) -> None:
    path = folder / "recipe.yaml"
    path.write_bytes(yaml.safe_dump(timm_recipe(folder, tasks=2)).encode() + b"# caf\xe9\n")
    with pytest.raises(RecipeError, match=r"recipe.yaml: not a UTF-8 text file"):
        parse_recipe(path)


def test_deeply_nested_recipe_is_a_recipe_error(folder: Path) -> None:
    path = write_recipe(folder, "model: " + "[" * 50_000 + "]" * 50_000 + "\n")
    with pytest.raises(RecipeError, match=r"recipe.yaml: invalid YAML: nested too deeply"):
        parse_recipe(path)
    path = write_recipe(folder, "model:\n" + "".join("  " * i + f"k{i}:\n" for i in range(1, 40)) + "  " * 40 + "x\n")
    with pytest.raises(RecipeError, match=r"recipe.yaml:\d+: model(\.k\d+)+: nested more than 32 levels"):
        parse_recipe(path)


def test_billion_laughs_fails_fast(folder: Path) -> None:
    lines = ["a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for prev, name in zip("abcdefghi", "bcdefghij"):
        lines.append(f"{name}: &{name} [{', '.join(['*' + prev] * 9)}]")  # 9^10 strings if expanded
    path = write_recipe(folder, "\n".join(lines) + "\n")
    start = time.perf_counter()
    with pytest.raises(RecipeError, match=r"recipe.yaml:2: b\[0\]: an alias \(\*name\) of a mapping or list"):
        parse_recipe(path)
    assert time.perf_counter() - start < 2


def test_merge_key_aliases_are_refused_and_scalar_aliases_work(folder: Path) -> None:
    recipe = yaml.safe_dump(timm_recipe(folder, tasks=2), sort_keys=False)
    path = write_recipe(folder, recipe.replace("scaling: 0.4", "scaling: &s 0.4\n  rank: *s"))
    assert parse_recipe(path).method.rank == 0.4
    path = write_recipe(folder, "defaults: &d {scaling: 0.4}\n" + recipe.replace("options:", "options:\n  <<: *d"))
    with pytest.raises(RecipeError, match=r"an alias \(\*name\) of a mapping"):
        parse_recipe(path)


@pytest.mark.parametrize("options, key, message", [
    ({"rank": 0}, "rank", "0: expected a positive integer or a fraction in (0, 1]"),
    ({"rank": 2.5}, "rank", "2.5: expected a positive integer or a fraction in (0, 1]"),
    ({"rank": -3}, "rank", "-3: expected a positive integer"),
    ({"rank": "0.1"}, "rank", "expected int | float | None, got '0.1' (YAML reads a number"),
    ({"rank": True}, "rank", "expected int | float | None, got True"),
    ({"scaling": float("nan")}, "scaling", "nan is not a finite number"),
    ({"scaling": float("inf")}, "scaling", "inf is not a finite number"),
    ({"temperature": float("-inf")}, "temperature", "-inf is not a finite number"),
    ({"scaling": "1e-3"}, "scaling", "got '1e-3' (YAML reads a number without a '.'"),
    ({"masks": "yes please"}, "masks", "expected bool"),
    ({"temperature": -1.0}, "temperature", "temperature=-1.0 must be positive"),
])
def test_option_values_are_checked_with_file_line_key(folder: Path, options: dict, key: str, message: str) -> None:
    path = write_recipe(folder, timm_recipe(folder, tasks=2, method="cart", options=options))
    with pytest.raises(RecipeError) as info:
        parse_recipe(path)
    assert f"recipe.yaml:{line_of(path, key + ':')}: options.{key}: " in str(info.value)
    assert message in str(info.value)


def test_ranks_must_fit_every_matrix(folder: Path) -> None:
    path = write_recipe(folder, timm_recipe(folder, tasks=2, method="cart", options={"rank": 500}))
    with pytest.raises(RecipeError, match=rf"recipe.yaml:{line_of(path, 'rank:')}: options.rank: rank=500 exceeds "
                                          r"min\(out, in\)=192"):
        load_recipe(path)
    path = write_recipe(folder, timm_recipe(folder, tasks=2, method="adarank_cart",
                                            options={"rank": 8, "mask_rank": 16}))
    with pytest.raises(RecipeError, match=r"options.mask_rank: mask_rank keeps 16 components .* only rank=8"):
        load_recipe(path)


@pytest.mark.parametrize("adapt, key, message", [
    ({"data": "x.py:f", "steps": 0}, "steps", "expected a positive integer, got 0"),
    ({"data": "x.py:f", "lr": -0.1}, "lr", "expected a positive learning rate"),
    ({"data": "x.py:f", "lr": float("nan")}, "lr", "nan is not a finite number"),
    ({"data": "x.py:f", "checkpoint_every": -5}, "checkpoint_every", "expected a positive integer"),
])
def test_adapt_numbers_are_checked(folder: Path, adapt: dict, key: str, message: str) -> None:
    path = write_recipe(folder, timm_recipe(folder, tasks=2, method="adamerging_taskwise", options={}, adapt=adapt))
    with pytest.raises(RecipeError, match=rf"recipe.yaml:{line_of(path, key + ':')}: adapt.{key}: .*{message}"):
        parse_recipe(path)


def test_non_scalar_keys_are_refused(folder: Path) -> None:
    path = write_recipe(folder, "? [a, b]\n: 1\n")
    with pytest.raises(RecipeError, match=r"recipe.yaml:1: \(top level\): keys must be plain names"):
        parse_recipe(path)


def test_checkpoint_problems_are_checkpoint_errors(folder: Path) -> None:
    data = (folder / "task1.safetensors").read_bytes()
    (folder / "task1.safetensors").write_bytes(data[: len(data) // 2])
    path = write_recipe(folder, timm_recipe(folder, tasks=2))
    with pytest.raises(CheckpointError, match=rf"recipe.yaml:{line_of(path, 'task1')}: tasks\[1\]: .*task1.safetensors"
                                              r".*truncated"):
        load_recipe(path)


def test_callables_are_not_run_without_trust(folder: Path) -> None:
    marker = folder / "imported"
    path = callable_recipe(folder, marker)
    parsed, model, entries = load_recipe(path, run_code=False)
    assert model is None and entries is None and not marker.exists()
    (folder / "task0.safetensors").write_bytes(b"garbage!" * 3)  # the rest is still checked
    with pytest.raises(CheckpointError, match=r"tasks\[0\]: .*task0.safetensors"):
        load_recipe(path, run_code=False)
    assert not marker.exists()


# ------------------------------------------------------------------------------------ files written


@pytest.fixture()
def umask_027() -> Any:
    old = os.umask(0o027)
    yield 0o027
    os.umask(old)


def test_outputs_follow_the_umask(tmp_path: Path, umask_027: int) -> None:
    model = torch.nn.Linear(2, 2)
    save_fused(model, tmp_path / "fused.safetensors")
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    mode = os.stat(tmp_path / "fused.safetensors").st_mode & 0o777
    assert mode == os.stat(tmp_path / "plain.pt").st_mode & 0o777 == 0o640
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    write_hf_folder(tmp_path / "out", tmp_path / "hf", lambda folder: save_fused(model, folder / "model.safetensors"))
    assert os.stat(tmp_path / "out").st_mode & 0o777 == 0o750
    assert {os.stat(p).st_mode & 0o777 for p in (tmp_path / "out").iterdir()} == {0o640}


def stale(path: Path, pid: int, age_s: float, token: str = "0badc0de") -> Path:
    tmp = path.parent / f".{path.name}.{pid}.{token}.tmp"
    tmp.write_bytes(b"half a file")
    os.utime(tmp, (time.time() - age_s, time.time() - age_s))
    return tmp


def dead_pid() -> int:
    pid = 2**22 - 1  # above the default pid_max of most systems
    while pid > 1:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            pass
        pid -= 1
    pytest.skip("no unused pid found")


def test_stale_temporaries_of_the_same_output_are_removed(tmp_path: Path) -> None:
    out = tmp_path / "merged.safetensors"
    gone = stale(out, dead_pid(), age_s=3600)
    kept = [
        stale(out, dead_pid(), age_s=1, token="00000001"),  # too recent: maybe still being written
        stale(out, os.getpid(), age_s=3600, token="00000002"),  # its writer is running
        stale(tmp_path / "other.safetensors", dead_pid(), age_s=3600),  # another output's
        tmp_path / f".merged.safetensors.{dead_pid()}.tmp",  # not our pattern
        tmp_path / f".merged.safetensors.{dead_pid()}.0badc0de.tmp.keep",
    ]
    for path in kept[3:]:
        path.write_bytes(b"x")
        os.utime(path, (time.time() - 3600, time.time() - 3600))
    save_fused(torch.nn.Linear(2, 2), out)
    assert not gone.exists() and all(path.exists() for path in kept)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".merged")) == sorted(
        p.name for p in kept if p.name.startswith(".merged"))


def test_stale_temporary_folders_of_an_hf_output_are_removed(tmp_path: Path) -> None:
    out = tmp_path / "merged"
    gone = tmp_path / f".merged.{dead_pid()}.0badc0de.tmp"
    gone.mkdir()
    (gone / "model.safetensors").write_bytes(b"half")
    os.utime(gone, (time.time() - 3600, time.time() - 3600))
    assert remove_stale_temps(out) == [gone] and not gone.exists()


def test_a_failed_write_leaves_the_previous_file_and_no_temporary(tmp_path: Path) -> None:
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"previous")

    def fail(tmp: str) -> None:
        Path(tmp).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        atomic_write(out, fail)
    assert out.read_bytes() == b"previous" and [p.name for p in tmp_path.iterdir()] == ["out.safetensors"]


def test_new_temp_is_hidden_beside_the_output(tmp_path: Path) -> None:
    tmp = new_temp(tmp_path / "x.safetensors")
    assert tmp.parent == tmp_path and tmp.name.startswith(f".x.safetensors.{os.getpid()}.") and tmp.is_file()
    assert remove_stale_temps(tmp_path / "x.safetensors", min_age_s=0) == []  # our own pid: kept
    assert atomic_write(tmp_path / "x.safetensors", lambda t: Path(t).write_bytes(b"1")).read_bytes() == b"1"


# ------------------------------------------------------------------- --force on a Hugging Face folder output


def hf_output(tmp_path: Path) -> tuple[Path, Path, dict[str, bytes]]:
    """A model folder, an existing output folder made from it, and that output's files (name → bytes)."""
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    out = write_hf_folder(tmp_path / "out", tmp_path / "hf",
                          lambda folder: save_fused(torch.nn.Linear(2, 2), folder / "model.safetensors"))
    return tmp_path / "hf", out, {p.name: p.read_bytes() for p in out.iterdir()}


def test_a_failed_forced_write_leaves_the_old_output_folder_intact(tmp_path: Path) -> None:
    model, out, before = hf_output(tmp_path)

    def fail(folder: Path) -> None:
        save_fused(torch.nn.Linear(3, 3), folder / "model.safetensors")
        raise ValueError("the merge failed")

    with pytest.raises(ValueError, match="the merge failed"):
        write_hf_folder(out, model, fail, force=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "out"]  # no temporary left


def test_a_forced_write_puts_the_old_output_back_when_the_new_cannot_be_renamed(tmp_path: Path,
                                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    model, out, before = hf_output(tmp_path)

    def refuse(src: Any, dst: Any) -> None:
        raise PermissionError(13, "Permission denied", str(dst))

    monkeypatch.setattr(mm.sources.os, "replace", refuse)
    with pytest.raises(PermissionError):
        write_hf_folder(out, model, lambda folder: save_fused(torch.nn.Linear(3, 3), folder / "model.safetensors"),
                        force=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "out"]


def test_a_forced_write_replaces_the_old_output_and_leaves_no_temporary(tmp_path: Path) -> None:
    model, out, before = hf_output(tmp_path)
    write_hf_folder(out, model, lambda folder: save_fused(torch.nn.Linear(3, 3), folder / "model.safetensors"),
                    force=True)
    assert open_checkpoint(out)["weight"].shape == (3, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "out"]
