"""Model sources, lazy checkpoints, the streaming writer, and layer-by-layer merging equal to merge().fuse()."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, Mapping

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

import mergemodules as mm
import mergemodules.sources
from helpers import hf_gpt2, perturbed
from mergemodules.export import fused_state_dict
from mergemodules.safetensors_files import write_safetensors
from mergemodules.sources import (
    LazyCheckpoint, SafetensorsCheckpoint, build_model, load_callable, open_checkpoint, shapes_of,
)
from mergemodules.streaming import fuse_streaming, merge_to_state_dict, save_fused_streaming

STATE = {
    "w": torch.randn(3, 4), "h": torch.randn(5).half(), "ids": torch.arange(4), "b": torch.randn(2, 2).bfloat16(),
}


def small_open_clip_vit() -> nn.Module:
    """open_clip's VisionTransformer (nn.MultiheadAttention in_proj_weight, [in, out] ``proj``), small."""
    from open_clip.transformer import VisionTransformer

    return VisionTransformer(image_size=16, patch_size=8, width=32, layers=2, heads=4, mlp_ratio=2.0, output_dim=8)


class CountingSource(Mapping[str, Tensor]):
    """A lazy mapping (shapes readable without values, like a safetensors checkpoint) recording the tensors read."""

    def __init__(self, state: Mapping[str, Tensor]) -> None:
        self.state, self.reads = state, []

    def __getitem__(self, key: str) -> Tensor:
        self.reads.append(key)
        return self.state[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.state)

    def __len__(self) -> int:
        return len(self.state)

    def __contains__(self, key: object) -> bool:
        return key in self.state

    def meta(self) -> dict[str, Tensor]:
        return {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in self.state.items()}


def test_safetensors_checkpoint_is_lazy_and_exact(tmp_path: Path) -> None:
    save_file(STATE, tmp_path / "x.safetensors")
    ckpt = SafetensorsCheckpoint(tmp_path / "x.safetensors")
    assert set(ckpt) == set(STATE) and len(ckpt) == 4 and "w" in ckpt and "nope" not in ckpt
    for key, value in STATE.items():
        assert torch.equal(ckpt[key], value) and ckpt[key].dtype == value.dtype
    meta = ckpt.meta()
    assert {k: (tuple(v.shape), v.dtype, v.device.type) for k, v in meta.items()} == {
        k: (tuple(v.shape), v.dtype, "meta") for k, v in STATE.items()
    }


@pytest.mark.parametrize("dtype", [None, torch.float32, torch.float64, torch.bfloat16])
def test_read_into_equals_a_lookup_copied_in(tmp_path: Path, dtype: torch.dtype | None) -> None:
    """``read_into`` gives ``out.copy_(ckpt[key])`` bit for bit, straight or through one cast; else it reads nothing."""
    save_file(STATE, tmp_path / "x.safetensors")
    ckpt = SafetensorsCheckpoint(tmp_path / "x.safetensors", dtype=dtype)
    for key in STATE:
        for out_dtype in (torch.float32, torch.bfloat16, torch.float16, torch.int64):
            value = ckpt[key]
            out = torch.full(value.shape, 7, dtype=out_dtype)
            if ckpt.read_into(key, out):
                assert value.dtype in (STATE[key].dtype, out_dtype)  # one cast at most: the lookup's or the copy's
                assert torch.equal(out, torch.empty_like(out).copy_(value)), (key, out_dtype)
            else:
                assert value.dtype not in (STATE[key].dtype, out_dtype) and bool((out == 7).all())
    out = torch.empty(2, 2, dtype=torch.float32)  # a cast reads into the thread's scratch buffer, reused
    ckpt.read_into("b", out)
    first = mergemodules.sources._SCRATCH.workspace.buffer.data_ptr()
    ckpt.read_into("b", out)
    assert mergemodules.sources._SCRATCH.workspace.buffer.data_ptr() == first


def test_every_checkpoint_format_is_a_lazy_checkpoint(tmp_path: Path) -> None:
    save_file(STATE, tmp_path / "x.safetensors")
    torch.save(STATE, tmp_path / "x.pt")
    hf_gpt2().save_pretrained(tmp_path / "bin", safe_serialization=False)
    for path in ("x.safetensors", "x.pt", "bin"):
        checkpoint = open_checkpoint(tmp_path / path)
        assert isinstance(checkpoint, LazyCheckpoint)
        assert {k: (v.shape, v.dtype) for k, v in shapes_of(checkpoint).items()} == {
            k: (checkpoint[k].shape, checkpoint[k].dtype) for k in checkpoint
        }
    readers = [cls for cls in vars(mergemodules.sources).values()
               if isinstance(cls, type) and issubclass(cls, Mapping) and cls.__module__ == "mergemodules.sources"]
    assert len(readers) >= 2 and all(callable(getattr(cls, "meta", None)) for cls in readers)
    assert isinstance(CountingSource(STATE), LazyCheckpoint) and not isinstance(dict(STATE), LazyCheckpoint)


class Unreadable(Mapping[str, Tensor]):
    """A lazy mapping without meta(): its shapes are known only by reading every tensor."""

    def __init__(self, state: Mapping[str, Tensor]) -> None:
        self.state, self.reads = state, 0

    def __getitem__(self, key: str) -> Tensor:
        self.reads += 1
        return self.state[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.state)

    def __len__(self) -> int:
        return len(self.state)


def test_a_mapping_without_meta_is_refused_not_read() -> None:
    assert shapes_of(STATE) is STATE
    base = small_open_clip_vit()
    tuned = Unreadable(perturbed(base, seed=1).state_dict())
    for run in (mm.merge, fuse_streaming):
        with pytest.raises(TypeError, match=r"finetuned\[1\] is a Unreadable, neither a dict.*nor a lazy checkpoint "
                                            r"with meta\(\).*LazyCheckpoint"):
            run(base, [perturbed(base, seed=2).state_dict(), tuned], "task_arithmetic")
    with pytest.raises(TypeError, match=r"weights is a Unreadable"):
        fuse_streaming(base, [perturbed(base, seed=2)], weights=Unreadable(base.state_dict()))
    assert tuned.reads == 0
    merged = mm.merge(base, [dict(tuned)], "task_arithmetic")  # the fix the message names
    assert merged.num_tasks == 1


@pytest.mark.parametrize("name", ["write_safetensors", "write_safetensors_shards", "plan_shards", "parse_size",
                                  "DEFAULT_MAX_SHARD_SIZE", "SAFETENSORS_DTYPES", "INDEX_NAME"])
def test_the_writer_names_moved_out_of_sources_with_a_deprecation_warning(name: str) -> None:
    import mergemodules.safetensors_files

    with pytest.warns(DeprecationWarning, match=rf"mergemodules\.sources\.{name} moved to "
                                                rf"mergemodules\.safetensors_files\.{name}"):
        value = getattr(mergemodules.sources, name)
    assert value is getattr(mergemodules.safetensors_files, name)
    with pytest.raises(AttributeError, match="has no attribute 'write_nothing'"):
        mergemodules.sources.write_nothing


def test_dtype_casts_floating_tensors_only(tmp_path: Path) -> None:
    save_file(STATE, tmp_path / "x.safetensors")
    torch.save(STATE, tmp_path / "x.pt")
    for path in ("x.safetensors", "x.pt"):
        ckpt = open_checkpoint(tmp_path / path, dtype=torch.float32)
        assert ckpt["h"].dtype == ckpt["b"].dtype == torch.float32 and ckpt["ids"].dtype == torch.int64
        assert torch.equal(ckpt["h"], STATE["h"].float())
        assert ckpt.meta()["b"].dtype == torch.float32 and ckpt.meta()["ids"].dtype == torch.int64


def test_torch_files(tmp_path: Path) -> None:
    torch.save({"state_dict": STATE, "epoch": 2}, tmp_path / "wrapped.pt")
    torch.save(STATE, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)  # not memory-mappable
    assert torch.equal(open_checkpoint(tmp_path / "wrapped.pt", key="state_dict")["w"], STATE["w"])
    assert torch.equal(open_checkpoint(tmp_path / "legacy.pt")["w"], STATE["w"])
    with pytest.raises(ValueError, match="wrapped.pt.*does not hold a name → tensor state dict.*'key:'"):
        open_checkpoint(tmp_path / "wrapped.pt")
    with pytest.raises(KeyError, match="has no entry 'model'"):
        open_checkpoint(tmp_path / "wrapped.pt", key="model")


def test_unsafe_pickle_is_never_executed(tmp_path: Path) -> None:
    marker = tmp_path / "executed"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"w": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match=r"evil.pt.*refusing to load.*weights_only=True.*GLOBAL"):
        open_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()


def test_write_safetensors_in_any_order(tmp_path: Path) -> None:
    layout = {k: (tuple(v.shape), v.dtype) for k, v in STATE.items()}
    write_safetensors(tmp_path / "y.safetensors", layout, reversed(list(STATE.items())))
    loaded = load_file(tmp_path / "y.safetensors")
    assert all(torch.equal(loaded[k], v) and loaded[k].dtype == v.dtype for k, v in STATE.items())


@pytest.mark.parametrize("items, message", [
    (list(STATE.items())[:2], "2 tensor\\(s\\) never written"),
    ([("w", torch.zeros(4, 3))], "'w' is \\(4, 3\\)"),
    ([("w", STATE["w"]), ("w", STATE["w"])], "'w' written twice"),
    ([("z", STATE["w"])], "'z' is not in the declared layout"),
])
def test_write_safetensors_errors_leave_no_file(tmp_path: Path, items: list, message: str) -> None:
    layout = {k: (tuple(v.shape), v.dtype) for k, v in STATE.items()}
    with pytest.raises((KeyError, ValueError), match=message):
        write_safetensors(tmp_path / "y.safetensors", layout, items)
    assert os.listdir(tmp_path) == []


def test_hugging_face_folders_single_and_sharded(tmp_path: Path) -> None:
    model = hf_gpt2()
    model.save_pretrained(tmp_path / "one")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    state = model.state_dict()
    for folder in ("one", "sharded"):
        ckpt = open_checkpoint(tmp_path / folder)
        assert set(ckpt) == set(state) - {"lm_head.weight"}  # the tied copy is stored once
        assert all(torch.equal(ckpt[k], state[k]) for k in ckpt)
    built = build_model("hf", str(tmp_path / "one"))
    assert all(torch.equal(v, state[k]) for k, v in built.state_dict().items())
    assert next(build_model("hf", str(tmp_path / "one"), meta=True).parameters()).is_meta


def test_build_model_kinds(tmp_path: Path) -> None:
    vit = build_model("timm", "vit_tiny_patch16_224", {"depth": 1, "img_size": 32, "patch_size": 8}, meta=True)
    assert next(vit.parameters()).is_meta and len(vit.blocks) == 1
    visual = build_model("open_clip", "ViT-B-32", submodule="visual", meta=True)
    assert type(visual).__name__ == "VisionTransformer" and next(visual.parameters()).is_meta
    (tmp_path / "arch.py").write_text("import torch\ndef build(width=3):\n    return torch.nn.Linear(width, 2)\n")
    linear = build_model("callable", "arch.py:build", {"width": 5}, base_dir=tmp_path)
    assert linear.in_features == 5 and not next(linear.parameters()).is_meta
    assert load_callable("mergemodules.sources:build_model") is build_model
    with pytest.raises(ValueError, match="timm has no model called 'vit_nope'"):
        build_model("timm", "vit_nope")
    with pytest.raises(AttributeError, match="has no function 'missing'"):
        load_callable("mergemodules.sources:missing")
    with pytest.raises(AttributeError, match="has no submodule 'text'"):
        build_model("callable", "arch.py:build", base_dir=tmp_path, submodule="text")


MODELS = {"open_clip_vit": small_open_clip_vit, "gpt2": hf_gpt2}


@pytest.mark.parametrize("family, method, options", [
    ("open_clip_vit", "task_arithmetic", {"scaling": 0.3}), ("open_clip_vit", "ties", {}),
    ("open_clip_vit", "tsv", {}), ("open_clip_vit", "cart", {"rank": 0.25}), ("open_clip_vit", "weight_averaging", {}),
    ("gpt2", "task_arithmetic", {}), ("gpt2", "task_vector_svd", {"rank": 3}),
])
def test_layer_by_layer_merge_equals_in_memory_merge(tmp_path: Path, family: str, method: str, options: dict) -> None:
    base = MODELS[family]()
    finetuned = [perturbed(base, seed=s, rank=2) for s in range(1, 4)]
    for i, model in enumerate(finetuned):
        save_file({k: v.contiguous() for k, v in fused_state_dict(model).items()}, tmp_path / f"t{i}.safetensors")
    save_file(fused_state_dict(base), tmp_path / "base.safetensors")
    lazy = [SafetensorsCheckpoint(tmp_path / f"t{i}.safetensors") for i in range(3)]
    with torch.device("meta"):
        architecture = MODELS[family]()  # shapes only: the values come from the files
    weights = SafetensorsCheckpoint(tmp_path / "base.safetensors")
    streamed = merge_to_state_dict(architecture, lazy, method, weights=weights, **options)
    expected = mm.merge(base, finetuned, method, **options).fuse().state_dict()
    assert list(streamed) == list(expected)
    assert all(torch.equal(streamed[k], expected[k]) for k in expected)


def test_streaming_reads_one_tensor_at_a_time() -> None:
    base = small_open_clip_vit()
    sources = [CountingSource(perturbed(base, seed=s).state_dict()) for s in (1, 2)]
    stream = fuse_streaming(base, sources, "task_arithmetic")
    assert [s.reads for s in sources] == [[], []]  # validation reads shapes, not values
    names, first = next(stream)
    assert all(s.reads == [names[0]] for s in sources)  # only the first tensor of each task so far
    names, _ = next(stream)
    assert all(s.reads[-1] == names[0] and len(s.reads) == 2 for s in sources)


def test_save_fused_streaming_keeps_the_checkpoint_keys(tmp_path: Path) -> None:
    base = hf_gpt2()
    finetuned = [perturbed(base, seed=s) for s in (1, 2)]
    base.save_pretrained(tmp_path / "base")
    weights = open_checkpoint(tmp_path / "base")
    save_fused_streaming(tmp_path / "out.safetensors", base, finetuned, "cart", weights=weights)
    out = load_file(tmp_path / "out.safetensors")
    assert set(out) == set(weights)  # tied lm_head stored once, as in the checkpoint
    expected = mm.merge(base, finetuned, "cart").fuse().state_dict()
    assert all(torch.equal(out[k], expected[k]) for k in out)


def test_streaming_checks_the_pretrained_weights() -> None:
    base = small_open_clip_vit()
    weights = dict(base.state_dict())
    del weights["proj"]
    with pytest.raises(KeyError, match="the pretrained weights is missing 1 key.*'proj'"):
        fuse_streaming(base, [perturbed(base, seed=1)], weights=weights)
    weights = dict(base.state_dict(), proj=torch.zeros(3, 3))
    with pytest.raises(ValueError, match=r"the pretrained weights\['proj'\] has shape \(3, 3\)"):
        fuse_streaming(base, [perturbed(base, seed=1)], weights=weights)
