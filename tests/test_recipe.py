"""Recipes: bad ones fail before any work with a message naming the file, the line and the key."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import yaml

import mergemodules.streaming
from mergemodules.cli import main
from mergemodules.recipe import RecipeError, load_recipe, parse_recipe
from recipe_setup import line_of, timm_recipe, write_recipe, write_timm_checkpoints


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    write_timm_checkpoints(tmp_path, tasks=2)
    return tmp_path


def fails_before_work(recipe: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> str:
    """Run ``mergemodules merge``; no tensor may be merged and no output written. Returns stderr."""

    def no_work(*args: object, **kwargs: object) -> None:
        raise AssertionError("merging started although the recipe is bad")

    monkeypatch.setattr(mergemodules.streaming, "iter_merged_tensors", no_work)
    assert main(["-q", "merge", str(recipe), "-o", str(recipe.parent / "out.safetensors")]) in (1, 2)
    assert not (recipe.parent / "out.safetensors").exists()
    assert not [p for p in os.listdir(recipe.parent) if p.endswith(".tmp")]
    return capsys.readouterr().err


def test_a_good_recipe_parses(folder: Path) -> None:
    recipe, model, entries = load_recipe(write_recipe(folder, timm_recipe(folder, tasks=2)))
    assert recipe.method.name == "task_arithmetic" and recipe.method.scaling == 0.4
    assert [t.path for t in recipe.tasks] == [folder / "task0.safetensors", folder / "task1.safetensors"]
    assert next(model.parameters()).device.type == "meta"  # checked on shapes only
    assert not [e for e in entries if e.name == "head.weight"][0].merged


def test_bad_yaml_names_line_and_column(folder: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    text = "model:\n  timm: vit_tiny_patch16_224\ntasks: [a.safetensors, b.safetensors\nmethod: ta\n"
    path = write_recipe(folder, text)
    err = fails_before_work(path, monkeypatch, capsys)
    assert "recipe.yaml:4:" in err and "invalid YAML" in err


def test_unknown_method(folder: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    path = write_recipe(folder, timm_recipe(folder, tasks=2, method="task_arithmatic"))
    err = fails_before_work(path, monkeypatch, capsys)
    assert f"recipe.yaml:{line_of(path, 'method:')}: method: unknown method 'task_arithmatic'" in err
    assert "task_arithmetic" in err  # lists the available ones


def test_unknown_option_names_it(folder: Path) -> None:
    path = write_recipe(folder, timm_recipe(folder, tasks=2, options={"rnk": 0.1}))
    with pytest.raises(RecipeError, match=rf"recipe.yaml:{line_of(path, 'options:')}: options: .*'rnk'"):
        parse_recipe(path)


def test_missing_file(folder: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    recipe = timm_recipe(folder, tasks=2)
    recipe["tasks"][1] = "nowhere.safetensors"
    path = write_recipe(folder, recipe)
    err = fails_before_work(path, monkeypatch, capsys)
    assert f"recipe.yaml:{line_of(path, 'nowhere')}: tasks[1]: file or folder" in err and "nowhere.safetensors" in err


def test_mismatched_shapes_from_headers(folder: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    import timm
    from safetensors.torch import save_file

    other = timm.create_model("vit_tiny_patch16_224", num_classes=5, img_size=32, patch_size=8, depth=1, mlp_ratio=2)
    save_file(other.state_dict(), folder / "task1.safetensors")
    path = write_recipe(folder, timm_recipe(folder, tasks=2))
    err = fails_before_work(path, monkeypatch, capsys)
    assert f"recipe.yaml:{line_of(path, 'task1')}: tasks[1]:" in err
    assert "task1.safetensors['blocks.0.mlp.fc1.weight'] has shape (384, 192)" in err and "(768, 192)" in err


def test_base_of_another_architecture(folder: Path) -> None:
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(2, 2)}, folder / "base.safetensors")
    path = write_recipe(folder, timm_recipe(folder, tasks=2))
    with pytest.raises(RecipeError, match=rf"recipe.yaml:{line_of(path, 'base:')}: base: .*base.safetensors.*missing"):
        load_recipe(path)


def test_unsafe_pickle_is_refused(folder: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    class Payload:
        def __reduce__(self):
            return (os.system, ("echo unsafe",))

    torch.save({"blocks.0.mlp.fc1.weight": Payload()}, folder / "evil.pt")
    recipe = timm_recipe(folder, tasks=2)
    recipe["tasks"][0] = "evil.pt"
    path = write_recipe(folder, recipe)
    err = fails_before_work(path, monkeypatch, capsys)
    assert f"recipe.yaml:{line_of(path, 'evil.pt')}: tasks[0]:" in err and "refusing to load" in err
    assert "weights_only" in err


def test_torch_file_without_key_names_the_fix(folder: Path) -> None:
    torch.save({"state_dict": {"w": torch.zeros(1)}, "epoch": 1}, folder / "wrapped.pt")
    recipe = timm_recipe(folder, tasks=2)
    recipe["tasks"][0] = "wrapped.pt"
    with pytest.raises(RecipeError, match=r"tasks\[0\]: .*wrapped.pt.*'key:'"):
        load_recipe(write_recipe(folder, recipe))


@pytest.mark.parametrize("change, key, message", [
    ({"methd": "ta"}, "methd", "unknown key (did you mean 'method'?)"),
    ({"dtype": "float8"}, "dtype", "unknown dtype 'float8'"),
    ({"base": None}, "base", "missing: the pretrained checkpoint"),
    ({"tasks": []}, "tasks", "expected a non-empty list"),
    ({"exclude": 3}, "exclude", "expected a regex string or a list"),
    ({"model": {"timm": "vit_nonexistent"}}, "model", "timm has no model called 'vit_nonexistent'"),
    ({"model": {"timm": "x", "hf": "y"}}, "model", "give exactly one of"),
    ({"targets": ["nothing_matches_this"]}, "targets", "matches no parameter"),
])
def test_bad_values_name_the_key(folder: Path, change: dict, key: str, message: str) -> None:
    recipe = timm_recipe(folder, tasks=2)
    recipe.update(change)
    path = write_recipe(folder, recipe)
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    text = str(info.value)
    assert f"recipe.yaml:{line_of(path, key + ':')}: {key}" in text and message in text


def test_duplicate_keys_are_errors(folder: Path) -> None:
    text = yaml.safe_dump(timm_recipe(folder, tasks=2), sort_keys=False) + "method: ties\n"
    path = write_recipe(folder, text)
    with pytest.raises(RecipeError, match=rf"recipe.yaml:{len(text.splitlines())}: method: duplicate key"):
        parse_recipe(path)


def test_nested_key_errors_point_at_the_nested_line(folder: Path) -> None:
    recipe = timm_recipe(folder, tasks=2)
    recipe["tasks"][1] = {"path": "task1.safetensors", "kee": "x"}
    path = write_recipe(folder, recipe)
    with pytest.raises(RecipeError, match=rf"recipe.yaml:{line_of(path, 'kee:')}: tasks\[1\].kee: unknown key"):
        parse_recipe(path)
