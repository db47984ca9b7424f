"""Half-precision checkpoints (issue #16): merged in float32, rounded once to the written dtype, declared in config.json.

Every static method merges a tiny random-init Llama saved in bf16 or fp16 (4 tasks) through the command
line; the folder is loaded back with ``from_pretrained`` and compared entry by entry:

* exactly: the written weights are the float32 merge (``merge(...)`` of the models cast to float32,
  ``fuse()``) rounded once to the half dtype;
* against float64: the entries that are not the correctly rounded value (nearest, ties to even)
  of a float64 reference. Weight averaging, Task Arithmetic and TIES: the whole merge run in
  float64. TSV-M, task-vector SVD and CART: the float32 merge's own B, factors and λ multiplied
  out in float64 (the same factors: a float64 SVD would be another approximation). A float32
  result rounded once can only differ where the exact value lies within float32 error of a
  rounding midpoint — a tie of the rounding rule: exactly (Task Arithmetic's θ₀ + 0.3·Σ τ of
  half-precision values is often exactly a midpoint; float32's 0.3 is not 3/10) or to within
  2⁻²⁰ of the sum of the absolute values of the terms (|B| + Σ |λ·u·σ·v|). Wrongly rounded
  entries that are not ties must be 0.

``python tests/test_half_precision.py`` prints the fractions (run it with ``PYTHONPATH`` pointing at
another checkout to measure that one).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor

import mergemodules as mm
from helpers import perturbed
from mergemodules.cli import main
from recipe_setup import save_pretrained_with_tasks

STATIC = ("weight_averaging", "task_arithmetic", "ties", "tsv", "task_vector_svd", "cart")
IN_FLOAT64 = ("weight_averaging", "task_arithmetic", "ties")  # the others: same factors, evaluated in float64
HALF = {"bfloat16": torch.bfloat16, "float16": torch.float16}
TASKS = 4
TIE = 2.0**-20  # a tie: within TIE × (sum of the absolute values of the terms) of a rounding midpoint


# ------------------------------------------------------------------------------------------ helpers


def llama_folders(folder: Path, dtype: torch.dtype) -> tuple[Path, list[Path]]:
    """save_pretrained folders of a tiny random-init Llama in ``dtype`` and of TASKS perturbed copies."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return save_pretrained_with_tasks(folder, LlamaForCausalLM(config).to(dtype), TASKS)


def correctly_rounded(exact: Tensor, dtype: torch.dtype) -> Tensor:
    """The ``dtype`` value nearest to the float64 ``exact``, ties to even: one rounding.

    ``exact.to(dtype)`` is not that: torch converts float64 → float32 → half, and the second
    rounding can go the wrong way. It is at most one step off, so the nearest of it and its two
    neighbours (adjacent bit patterns) is the answer.
    """
    bits = exact.to(dtype).view(torch.int16)
    candidates = torch.stack([bits - 1, bits, bits + 1])
    distance = (candidates.view(dtype).double() - exact).abs().nan_to_num(nan=float("inf"))
    nearest = distance == distance.min(dim=0).values
    odd = (candidates & 1).to(torch.int8)
    choice = torch.where(nearest, odd, 2).argmin(dim=0, keepdim=True)  # nearest, even mantissa on a tie
    return candidates.gather(0, choice)[0].view(dtype)


def wrongly_rounded(
    written: dict[str, Tensor], exact: dict[str, Tensor], scale: dict[str, Tensor]
) -> tuple[int, int, int]:
    """(entries of ``written`` not ``exact`` correctly rounded to their dtype, of those the ties, entries compared).

    A wrongly rounded entry is a tie when ``exact`` lies within TIE × ``scale`` of the midpoint between
    the written value and the correct one.
    """
    wrong = ties = total = 0
    for key, value in written.items():
        value, expected = value.double(), correctly_rounded(exact[key].double(), value.dtype).double()
        bad = value != expected
        midpoint = (value[bad] + expected[bad]) / 2
        wrong += int(bad.sum())
        ties += int(((exact[key][bad] - midpoint).abs() <= TIE * scale[key][bad]).sum())
        total += value.numel()
    return wrong, ties, total


def load_models(base_dir: Path, task_dirs: list[Path], dtype: torch.dtype) -> tuple[torch.nn.Module, list]:
    """The checkpoints loaded by transformers in ``dtype``."""
    from transformers import LlamaForCausalLM

    return (LlamaForCausalLM.from_pretrained(base_dir, dtype=dtype),
            [LlamaForCausalLM.from_pretrained(d, dtype=dtype) for d in task_dirs])


def references(method: str, base_dir: Path, task_dirs: list[Path]) -> tuple[dict[str, Tensor], ...]:
    """(the float32 merge, the float64 reference, |B| + Σ|terms|) of ``method``'s static merge; see the module docstring."""
    base, tasks = load_models(base_dir, task_dirs, torch.float32)
    merged = mm.merge(base, tasks, method)
    in_float32 = merged.fuse().state_dict()
    if method in IN_FLOAT64:
        merged = mm.merge(base.double(), [t.double() for t in tasks], method)
    else:
        merged = merged.double()  # the same B, factors and λ, multiplied out in float64
    exact = merged.fuse().state_dict()
    with torch.no_grad():
        for tensor in [*merged.buffers(), *merged.parameters()]:  # B, Δ or U/σ/V, λ
            tensor.abs_()
    return in_float32, exact, merged.fuse().state_dict()


def config_dtypes(folder: Path) -> dict[str, str]:
    """The dtype keys config.json declares (``torch_dtype``, and ``dtype`` as transformers ≥ 5 writes)."""
    config = json.loads((folder / "config.json").read_text())
    return {key: config[key] for key in ("torch_dtype", "dtype") if key in config}


def written_dtypes(folder: Path) -> set[torch.dtype]:
    """The dtypes of the tensors in the folder's model.safetensors."""
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        return {f.get_tensor(key).dtype for key in f.keys()}


def merge_with_cli(folder: Path, method: str, out: str, *flags: str, **keys: str) -> Path:
    """Run ``mergemodules merge`` on a recipe of the folder's Llama checkpoints; returns the output folder."""
    recipe = {"model": {"hf": "base"}, "tasks": [f"task{i}" for i in range(TASKS)], "method": method, **keys}
    path = folder / f"{out}.yaml"
    path.write_text(json.dumps(recipe))  # JSON is YAML
    assert main(["-q", "merge", str(path), "-o", str(folder / out), *flags]) == 0
    return folder / out


@pytest.fixture(scope="module", params=list(HALF))
def checkpoints(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.dtype]:
    """A folder holding base/ and task{i}/ of the tiny Llama in bf16 or fp16."""
    dtype = HALF[request.param]
    folder = tmp_path_factory.mktemp(request.param)
    llama_folders(folder, dtype)
    return folder, dtype


# -------------------------------------------------------------------------------------------- tests


def test_correctly_rounded_is_one_rounding() -> None:
    # Just above the midpoint between 1 and the next bf16 / fp16 value: torch's float64 → half conversion
    # rounds to float32 first, lands exactly on the midpoint and then rounds down to 1 (even).
    for dtype, step in ((torch.bfloat16, 2.0**-7), (torch.float16, 2.0**-10)):
        x = torch.tensor([1 + step / 2 + 2.0**-40, 1 + step / 2, 1 + 3 * step / 2, -(1 + step / 2 + 2.0**-40)],
                         dtype=torch.float64)
        assert x.to(dtype)[0].item() == 1.0  # the double rounding this helper avoids
        assert correctly_rounded(x, dtype).tolist() == [1 + step, 1.0, 1 + 2 * step, -(1 + step)]


@pytest.mark.parametrize("method", STATIC)
def test_half_precision_round_trip(checkpoints: tuple[Path, torch.dtype], method: str) -> None:
    from transformers import LlamaForCausalLM

    folder, dtype = checkpoints
    out = merge_with_cli(folder, method, f"merged_{method}")
    name = str(dtype).removeprefix("torch.")
    assert set(config_dtypes(out).values()) == {name}  # what the config declares ...
    assert written_dtypes(out) == {dtype}  # ... is what was written ...
    loaded = LlamaForCausalLM.from_pretrained(out)
    assert {p.dtype for p in loaded.parameters()} == {dtype}  # ... and what from_pretrained loads

    state = loaded.state_dict()
    in_float32, exact, scale = references(method, folder / "base", [folder / f"task{i}" for i in range(TASKS)])
    for key, value in state.items():
        assert torch.equal(value, in_float32[key].to(dtype)), f"{key}: not the float32 merge rounded once"
    wrong, ties, total = wrongly_rounded(state, exact, scale)
    assert wrong == ties, f"{wrong - ties} of {total} entries are wrongly rounded and no tie ({ties} ties)"


def test_the_old_rounding_fails_the_check(checkpoints: tuple[Path, torch.dtype]) -> None:
    # The measure above catches what issue #16 reported: merged in half precision, each task's change rounded.
    folder, dtype = checkpoints
    base, tasks = load_models(folder / "base", [folder / f"task{i}" for i in range(TASKS)], dtype)
    in_half = mm.merge(base, tasks, "task_arithmetic").fuse().state_dict()
    _, exact, scale = references("task_arithmetic", folder / "base", [folder / f"task{i}" for i in range(TASKS)])
    wrong, ties, total = wrongly_rounded(in_half, exact, scale)
    assert wrong - ties > 0.1 * total


def test_compute_and_output_dtypes(checkpoints: tuple[Path, torch.dtype]) -> None:
    from transformers import LlamaForCausalLM

    folder, dtype = checkpoints
    # dtype: float32 alone still writes the checkpoints' dtype (the merge is the same: float32 is the default)
    same = merge_with_cli(folder, "task_arithmetic", "f32_compute", dtype="float32")
    assert written_dtypes(same) == {dtype} and set(config_dtypes(same).values()) == {str(dtype)[6:]}
    # out_dtype float32: float32 weights, and the config says so, so from_pretrained loads float32 (issue #16)
    wide = merge_with_cli(folder, "task_arithmetic", "f32_out", dtype="float32", out_dtype="float32")
    assert written_dtypes(wide) == {torch.float32} and set(config_dtypes(wide).values()) == {"float32"}
    loaded = LlamaForCausalLM.from_pretrained(wide)
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    in_float32, _, _ = references("task_arithmetic", folder / "base", [folder / f"task{i}" for i in range(TASKS)])
    assert all(torch.equal(v, in_float32[k]) for k, v in loaded.state_dict().items())
    assert all(torch.equal(load_file(same / "model.safetensors")[k], v.to(dtype))
               for k, v in load_file(wide / "model.safetensors").items())
    # the command line overrides the recipe
    other = torch.float16 if dtype == torch.bfloat16 else torch.bfloat16
    flagged = merge_with_cli(folder, "task_arithmetic", "flagged", "--out-dtype", str(other)[6:], out_dtype="float32")
    assert written_dtypes(flagged) == {other} and set(config_dtypes(flagged).values()) == {str(other)[6:]}


def test_fuse_command_writes_the_checkpoints_dtype(checkpoints: tuple[Path, torch.dtype], tmp_path: Path) -> None:
    # The in-memory path (`fuse`, as `adapt`): a float32 merge state of the half checkpoints, written back in their dtype
    from transformers import LlamaForCausalLM

    folder, dtype = checkpoints
    tasks = [folder / f"task{i}" for i in range(TASKS)]
    merged = mm.merge(*load_models(folder / "base", tasks, torch.float32), "cart")
    mm.save_merge_state(merged, tmp_path / "state.safetensors")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps({"model": {"hf": str(folder / "base")}, "tasks": [str(t) for t in tasks],
                                  "method": "cart"}))
    assert main(["-q", "fuse", str(tmp_path / "state.safetensors"), "--recipe", str(recipe),
                 "-o", str(tmp_path / "out")]) == 0
    assert written_dtypes(tmp_path / "out") == {dtype}
    assert set(config_dtypes(tmp_path / "out").values()) == {str(dtype)[6:]}
    loaded = LlamaForCausalLM.from_pretrained(tmp_path / "out")
    expected = merged.fuse().state_dict()
    assert all(v.dtype == dtype and torch.equal(v, expected[k].to(dtype)) for k, v in loaded.state_dict().items())


def test_config_dtype_keys_follow_the_weights(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from mergemodules.sources import declare_dtype

    save_file({"a": torch.zeros(4, dtype=torch.float16), "b": torch.zeros(2), "ids": torch.arange(9)},
              tmp_path / "model.safetensors")
    for config, expected in (
        ({"torch_dtype": "bfloat16"}, {"torch_dtype": "float16"}),  # transformers 4 writes torch_dtype
        ({"dtype": "float32", "torch_dtype": "float32"}, {"dtype": "float16", "torch_dtype": "float16"}),
        ({}, {"torch_dtype": "float16"}),  # neither: torch_dtype, which every version reads
    ):
        (tmp_path / "config.json").write_text(json.dumps(config))
        assert declare_dtype(tmp_path) == torch.float16  # most floating entries (4 of 6)
        assert config_dtypes(tmp_path) == expected


def test_save_fused_dtype(tmp_path: Path) -> None:
    base = torch.nn.Linear(8, 8)
    tuned = [perturbed(base, seed=s) for s in (1, 2)]
    merged = mm.merge(base, tuned, "task_arithmetic")
    mm.save_fused(merged, tmp_path / "out.safetensors", dtype=torch.bfloat16)
    written = load_file(tmp_path / "out.safetensors")
    fused = merged.fuse().state_dict()
    assert all(written[k].dtype == torch.bfloat16 and torch.equal(written[k], fused[k].bfloat16()) for k in fused)
    with pytest.raises(TypeError, match="dtype must be a floating torch.dtype"):
        mm.save_fused(merged, tmp_path / "bad.safetensors", dtype="bf16")


def test_streaming_dtype_arguments_are_checked() -> None:
    base = torch.nn.Linear(4, 4)
    with pytest.raises(TypeError, match="out_dtype must be a floating torch.dtype"):
        mm.streaming.merge_to_state_dict(base, [perturbed(base, seed=1)], out_dtype=torch.int8)
    with pytest.raises(TypeError, match="dtype must be a floating torch.dtype"):
        mm.streaming.merge_to_state_dict(base, [perturbed(base, seed=1)], dtype="float32")


def test_console_script(tmp_path: Path) -> None:
    # The installed `mergemodules` script, run as a user would, with a dtype flag; the tests above call its main().
    llama_folders(tmp_path, torch.bfloat16)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps({"model": {"hf": "base"}, "tasks": [f"task{i}" for i in range(TASKS)],
                                  "method": "ties", "out_dtype": "float32"}))
    script = Path(sys.executable).parent / "mergemodules"
    subprocess.run([str(script), "-q", "merge", str(recipe), "-o", str(tmp_path / "out"), "--out-dtype", "fp16"],
                   check=True)
    assert written_dtypes(tmp_path / "out") == {torch.float16}
    assert set(config_dtypes(tmp_path / "out").values()) == {"float16"}
    in_float32, _, _ = references("ties", tmp_path / "base", [tmp_path / f"task{i}" for i in range(TASKS)])
    written = load_file(tmp_path / "out" / "model.safetensors")
    assert written.keys() == in_float32.keys()
    assert all(torch.equal(v, in_float32[k].half()) for k, v in written.items())


# ------------------------------------------------------------------------------------------ measure


def measure(folder: Path) -> None:
    """Print the fraction of wrongly rounded entries per method and half dtype for the installed mergemodules."""
    for name, dtype in HALF.items():
        llama_folders(folder / name, dtype)
        for method in STATIC:
            recipe = folder / name / f"{method}.yaml"
            recipe.write_text(json.dumps({"model": {"hf": "base"}, "tasks": [f"task{i}" for i in range(TASKS)],
                                          "method": method}))
            assert main(["-q", "merge", str(recipe), "-o", str(folder / name / method)]) == 0
            written = load_file(folder / name / method / "model.safetensors")
            tasks = [folder / name / f"task{i}" for i in range(TASKS)]
            _, exact, scale = references(method, folder / name / "base", tasks)
            wrong, ties, total = wrongly_rounded(written, exact, scale)
            config = config_dtypes(folder / name / method)
            print(f"{name:9} {method:17} wrongly rounded {wrong:5d} / {total} = {wrong / total:7.3%}, "
                  f"of which ties {ties:3d}, not ties {wrong - ties:5d} = {(wrong - ties) / total:7.3%};  "
                  f"written {sorted({str(t.dtype)[6:] for t in written.values()})}, "
                  f"config {config}")


if __name__ == "__main__":
    import tempfile

    import transformers

    transformers.logging.disable_progress_bar()
    print("mergemodules from", Path(mm.__file__).parent)
    with tempfile.TemporaryDirectory() as tmp:
        measure(Path(tmp))
