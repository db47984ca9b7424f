"""Sharded Hugging Face checkpoints (issue #14, LLM-sized merges): sharded input, sharded output, the files around.

A tiny random-init Llama in bfloat16 with a tokenizer, a chat template and a generation config is saved
as shards of 20 KB (the base and two perturbed copies); ``mergemodules merge`` writes the merge as
``model-0000k-of-0000n.safetensors`` shards plus ``model.safetensors.index.json`` and copies every
other file of the model folder.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import mergemodules as mm
import mergemodules.safetensors_files
from helpers import perturbed
from mergemodules.cli import main
from mergemodules.merge_state import save_merge_state
from mergemodules.safetensors_files import DEFAULT_MAX_SHARD_SIZE, parse_size, plan_shards, write_safetensors_shards
from recipe_setup import line_of, write_recipe

SHARD = 20_000  # bytes: the tiny Llama (45 KB in bf16) takes 3 shards, as save_pretrained(max_shard_size="20KB")
SHARD_NAME = "model-{:05d}-of-{:05d}.safetensors"


# ------------------------------------------------------------------------------------------ helpers


def tiny_llama() -> torch.nn.Module:
    """A random-init Llama decoder, 2 layers of width 32, in bfloat16."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config).to(torch.bfloat16)


def save_tokenizer(folder: Path) -> None:
    """A word-level tokenizer with a chat template (built offline), plus a special_tokens_map.json."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(["<unk>", "<s>", "</s>", "hello", "world", "merge", "models"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                                        eos_token="</s>")
    tokenizer.chat_template = "{% for m in messages %}<s> {{ m['content'] }} </s>{% endfor %}"
    tokenizer.save_pretrained(folder)
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(special))


def digest(folder: Path) -> dict[str, str]:
    """File name → sha256 of every file in ``folder``."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def merge(folder: Path, out: str, *flags: str, **keys: object) -> int:
    """``mergemodules merge`` of base + task0/1 (Task Arithmetic unless ``method=``) into ``folder/out``."""
    recipe = {"model": {"hf": "base"}, "tasks": ["task0", "task1"], "method": "task_arithmetic", **keys}
    path = write_recipe(folder, recipe, f"{out.replace('/', '-').strip('.') or 'here'}.yaml")
    return main(["-q", "merge", str(path), "-o", str(folder / out), *flags])


def folder_state(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every safetensors file in ``folder``."""
    state: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        state.update(load_file(path))
    return state


def assert_equal_states(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(actual) == sorted(expected)
    for key, value in expected.items():
        assert actual[key].dtype == value.dtype and torch.equal(actual[key], value), key


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """base/, task0/, task1/: the tiny Llama and two perturbed copies, each saved in 20 KB shards; base/ also
    holds the tokenizer and generation files."""
    folder = tmp_path_factory.mktemp("sharded")
    torch.manual_seed(0)
    base = tiny_llama()
    base.save_pretrained(folder / "base", max_shard_size=SHARD)
    save_tokenizer(folder / "base")
    for i in range(2):
        perturbed(base, seed=i + 1).save_pretrained(folder / f"task{i}", max_shard_size=SHARD)
    assert (folder / "base" / "model.safetensors.index.json").is_file()
    assert (folder / "base" / "generation_config.json").is_file()
    return folder


# -------------------------------------------------------------------------------------------- tests


def test_parse_size() -> None:
    assert parse_size("5GB") == 5 * 10**9 == DEFAULT_MAX_SHARD_SIZE
    assert parse_size("500MB") == 500 * 10**6
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("1.5gb") == 1_500_000_000
    assert parse_size(" 20 KB ") == parse_size("20000") == parse_size(20_000) == 20_000
    for bad in ("5XB", "GB", "-1GB", "0", 0, -5, 1.5, True, "1e9", ""):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_plan_shards_as_save_pretrained() -> None:
    f32 = torch.float32
    layout = {"a": ((10,), f32), "b": ((10,), f32), "big": ((100,), f32), "c": ((5,), f32), "d": ((5,), f32)}
    assert plan_shards(layout, 80) == [["a", "b"], ["big"], ["c", "d"]]  # 40 + 40 bytes; 400 bytes alone
    assert plan_shards(layout, 10**6) == [list(layout)]


@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_sharded_output_round_trip(zoo: Path, method: str) -> None:
    from transformers import LlamaForCausalLM

    assert merge(zoo, f"{method}-one", method=method) == 0  # default 5GB: one model.safetensors
    assert merge(zoo, f"{method}-sharded", "--max-shard-size", "20KB", method=method) == 0
    one, sharded = zoo / f"{method}-one", zoo / f"{method}-sharded"
    assert (one / "model.safetensors").is_file() and not (one / "model.safetensors.index.json").exists()
    assert not (sharded / "model.safetensors").exists()

    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert files == [SHARD_NAME.format(k, len(files)) for k in range(1, len(files) + 1)] and len(files) == 3
    assert sorted(p.name for p in sharded.glob("*.safetensors")) == files
    total = 0
    for name in files:
        with safe_open(str(sharded / name), framework="pt") as f:
            sizes = {key: f.get_slice(key).get_shape() for key in f.keys()}
            data = sum(f.get_tensor(key).numel() * 2 for key in f.keys())  # bf16
        assert all(index["weight_map"][key] == name for key in sizes)
        assert data <= SHARD or len(sizes) == 1
        header = int.from_bytes((sharded / name).read_bytes()[:8], "little")
        assert (sharded / name).stat().st_size == 8 + header + data
        total += data
    assert index["metadata"]["total_size"] == total
    assert sorted(index["weight_map"]) == sorted(load_file(one / "model.safetensors"))

    assert_equal_states(folder_state(sharded), load_file(one / "model.safetensors"))
    loaded = LlamaForCausalLM.from_pretrained(sharded)
    assert loaded.dtype == torch.bfloat16 and json.loads((sharded / "config.json").read_text())["dtype"] == "bfloat16"
    assert_equal_states(loaded.state_dict(), LlamaForCausalLM.from_pretrained(one).state_dict())
    assert not [p for p in zoo.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_sharded_input_equals_unsharded_input(zoo: Path, tmp_path: Path) -> None:
    from transformers import LlamaForCausalLM

    for name in ("base", "task0", "task1"):  # the same models in one file each
        LlamaForCausalLM.from_pretrained(zoo / name).save_pretrained(tmp_path / name)
        assert (tmp_path / name / "model.safetensors").is_file()
    (tmp_path / "base" / "generation_config.json").unlink()
    assert merge(tmp_path, "out", "--max-shard-size", str(SHARD)) == 0
    assert merge(zoo, "from-shards", "--max-shard-size", str(SHARD)) == 0
    assert_equal_states(folder_state(tmp_path / "out"), folder_state(zoo / "from-shards"))
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert index == json.loads((zoo / "from-shards" / "model.safetensors.index.json").read_text())


def test_config_tokenizer_and_generation_files_are_copied(zoo: Path) -> None:
    from transformers import AutoTokenizer, GenerationConfig

    assert merge(zoo, "files", "--max-shard-size", "20KB", dtype="float32", out_dtype="float32") == 0
    base, out = digest(zoo / "base"), digest(zoo / "files")
    kept = {name for name in base if not name.startswith("model") and name != "config.json"}
    assert {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
            "generation_config.json"} <= kept
    assert {name: out[name] for name in kept} == {name: base[name] for name in kept}  # byte for byte
    config = json.loads((zoo / "files" / "config.json").read_text())
    assert config.pop("dtype") == "float32"  # states the written dtype
    expected = json.loads((zoo / "base" / "config.json").read_text())
    expected.pop("dtype")
    assert config == expected

    tokenizer, reference = AutoTokenizer.from_pretrained(zoo / "files"), AutoTokenizer.from_pretrained(zoo / "base")
    assert tokenizer("hello merge models").input_ids == reference("hello merge models").input_ids == [3, 5, 6]
    chat = [{"role": "user", "content": "hello world"}]
    assert tokenizer.apply_chat_template(chat, tokenize=False) == "<s> hello world </s>"
    assert GenerationConfig.from_pretrained(zoo / "files").to_dict() == GenerationConfig.from_pretrained(
        zoo / "base").to_dict()


def test_max_shard_size_errors_name_the_flag_or_key(zoo: Path, capsys: pytest.CaptureFixture) -> None:
    for bad in ("5XB", "0", "-1GB", "lots"):
        assert merge(zoo, "bad", f"--max-shard-size={bad}") == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("mergemodules merge: error: --max-shard-size"), lines
        assert repr(bad) in lines[0]
    for bad in ("lots", 0, True, [5]):
        assert merge(zoo, "bad", max_shard_size=bad) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        line = line_of(zoo / "bad.yaml", "max_shard_size")
        assert len(lines) == 1 and f"bad.yaml:{line}: max_shard_size: " in lines[0], lines
    assert not (zoo / "bad").exists()


def test_max_shard_size_needs_a_folder_output(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from recipe_setup import timm_recipe, write_timm_checkpoints

    write_timm_checkpoints(tmp_path, tasks=2)
    recipe = write_recipe(tmp_path, timm_recipe(tmp_path, tasks=2))
    assert main(["-q", "merge", str(recipe), "--max-shard-size", "1MB"]) == 2
    assert "--max-shard-size: applies to Hugging Face folder outputs" in capsys.readouterr().err
    recipe = write_recipe(tmp_path, timm_recipe(tmp_path, tasks=2, max_shard_size="1MB"))
    assert main(["-q", "merge", str(recipe)]) == 2
    assert "max_shard_size: applies to Hugging Face folder outputs" in capsys.readouterr().err
    assert not (tmp_path / "merged.safetensors").exists()


def test_the_output_never_overwrites_a_sharded_input(zoo: Path, capsys: pytest.CaptureFixture) -> None:
    before = {name: digest(zoo / name) for name in ("base", "task0", "task1")}
    for out, relation in (("task0", "is the same file as tasks[0]"), ("base/merged", "is inside model.hf"),
                          (".", "is a folder holding")):
        assert merge(zoo, out, "--max-shard-size", "20KB", "--force") == 2
        assert relation in capsys.readouterr().err
    assert {name: digest(zoo / name) for name in before} == before


def test_a_failed_sharded_write_leaves_the_previous_output(zoo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert merge(zoo, "kept", "--max-shard-size", "20KB") == 0
    previous = digest(zoo / "kept")
    calls = []
    write = mergemodules.safetensors_files._SafetensorsWriter.write

    def failing(self, name: str, tensor: torch.Tensor) -> None:
        calls.append(name)
        if len(calls) % 5 == 0:  # a few tensors into the second shard, in each run
            raise OSError(28, "No space left on device")
        write(self, name, tensor)

    monkeypatch.setattr(mergemodules.safetensors_files._SafetensorsWriter, "write", failing)
    assert merge(zoo, "kept", "--max-shard-size", "20KB", "--force") == 3
    assert merge(zoo, "new", "--max-shard-size", "20KB") == 3
    assert digest(zoo / "kept") == previous and not (zoo / "new").exists()
    assert not [p for p in zoo.iterdir() if p.name.startswith(".")]  # no half-written folder left


def test_write_safetensors_shards_in_any_order(tmp_path: Path) -> None:
    state = {f"t{i}": torch.full((10 * (i + 1),), float(i)) for i in range(5)}
    layout = {k: (tuple(v.shape), v.dtype) for k, v in state.items()}
    files = write_safetensors_shards(tmp_path, layout, reversed(list(state.items())), max_shard_size=200)
    assert [p.name for p in files] == [SHARD_NAME.format(k, 4) for k in range(1, 5)] + [
        "model.safetensors.index.json"]
    assert_equal_states(folder_state(tmp_path), state)
    (tmp_path / "x").mkdir()
    with pytest.raises(KeyError, match="never written"):
        write_safetensors_shards(tmp_path / "x", layout, list(state.items())[:3], max_shard_size=200)
    assert os.listdir(tmp_path / "x") == []  # the shards of a failed write are removed


def test_fuse_writes_shards_from_the_recipe_key(zoo: Path, tmp_path: Path) -> None:
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(zoo / "base", dtype=torch.float32)
    tasks = [LlamaForCausalLM.from_pretrained(zoo / f"task{i}", dtype=torch.float32) for i in range(2)]
    merged = mm.merge(base, tasks, "task_arithmetic")
    save_merge_state(merged, tmp_path / "state.safetensors")
    recipe = write_recipe(tmp_path, {"model": {"hf": str(zoo / "base")}, "tasks": [str(zoo / "task0"),
                                     str(zoo / "task1")], "method": "task_arithmetic", "max_shard_size": "20KB"})
    assert main(["-q", "fuse", str(tmp_path / "state.safetensors"), "--recipe", str(recipe),
                 "-o", str(tmp_path / "fused")]) == 0
    assert (tmp_path / "fused" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "fused").glob("model-*-of-*.safetensors"))) >= 2
    expected = merged.fuse().to(torch.bfloat16).state_dict()
    assert_equal_states(LlamaForCausalLM.from_pretrained(tmp_path / "fused").state_dict(), expected)
