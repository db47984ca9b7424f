"""Large tensors of entrywise merges, merged chunk by chunk from memory-mapped inputs: the values of ``merge``."""
from __future__ import annotations

import mmap
import struct
import sys
from pathlib import Path

import pytest
import torch
from helpers import perturbed
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import save_file
from torch import nn

import mergemodules as mm
from mergemodules import build, streaming
from mergemodules.build import CHUNK, chunk_bounds
from mergemodules.safetensors_files import map_stored_tensor, read_safetensors_layout, release_mapped_pages
from mergemodules.sources import SafetensorsCheckpoint
from mergemodules.streaming import merge_to_state_dict


class Big(nn.Module):
    """Tensors of two and more chunks (a Linear weight, a convolution kernel) beside small ones."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(1031, 700)  # 721 700 entries: chunks [0, CHUNK), [CHUNK, 721 700)
        self.conv = nn.Conv2d(64, 128, 9)  # 663 552 entries, merged as an (out, in·k·k) matrix
        self.small = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.small(x)


def zoo(tmp_path: Path, dtype: torch.dtype, tasks: int = 3) -> tuple[nn.Module, SafetensorsCheckpoint,
                                                                    list[SafetensorsCheckpoint]]:
    torch.manual_seed(0)
    base = Big()
    states = [base.state_dict()] + [perturbed(base, seed=i + 1, scale=0.1).state_dict() for i in range(tasks)]
    paths = [tmp_path / f"m{i}.safetensors" for i in range(len(states))]
    for state, path in zip(states, paths):
        save_file({k: v.to(dtype) for k, v in state.items()}, path)
    return base, SafetensorsCheckpoint(paths[0]), [SafetensorsCheckpoint(p) for p in paths[1:]]


@given(st.integers(1, 5 * CHUNK))
def test_chunks_tile_the_tensor_and_the_last_one_takes_the_remainder(n):
    bounds = chunk_bounds(n)
    assert bounds[0][0] == 0 and all(stop == start for (_, stop), (start, _) in zip(bounds, bounds[1:])) and bounds[-1][1] == n
    assert all(stop - start == CHUNK for start, stop in bounds[:-1])
    assert n < CHUNK or bounds[-1][1] - bounds[-1][0] >= CHUNK


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method, options", [("weight_averaging", {}), ("task_arithmetic", {"scaling": 0.3}),
                                             ("adamerging", {"coefficients": "layer"}),
                                             ("ties", {"density": 0.2, "scope": "tensor"}),
                                             ("ties", {"density": 1.0, "scope": "tensor"})])
def test_chunked_merge_is_bit_identical_to_merge(tmp_path, monkeypatch, dtype, method, options):
    base, weights, tasks = zoo(tmp_path, dtype)
    chunked = []
    original = streaming.merge_in_chunks
    monkeypatch.setattr(streaming, "merge_in_chunks", lambda entry, *a, **k: chunked.append(entry.name) or
                        original(entry, *a, **k))
    streamed = merge_to_state_dict(base, tasks, method, weights=weights, **options)
    large = ["conv.weight", "linear.weight"]  # not the others, except under weight averaging: an average at any size
    assert sorted(chunked) == (sorted(base.state_dict()) if method == "weight_averaging" else large)
    model = base.to(dtype)
    model.load_state_dict(dict(weights.items()))
    expected = mm.merge(model.float(), [{k: v.float() for k, v in t.items()} for t in tasks], method, **options).fuse()
    for key, value in expected.state_dict().items():
        assert torch.equal(streamed[key], value.to(dtype)), key


@pytest.mark.parametrize("method, options", [("weight_averaging", {}), ("task_arithmetic", {"scaling": 0.3}),
                                             ("ties", {"density": 0.2, "scope": "tensor"})])
def test_a_chunked_merge_in_float32_of_float64_inputs_is_the_whole_tensor_merge(tmp_path, monkeypatch, method,
                                                                               options):
    """The inputs are rounded to ``dtype`` first, as for a tensor merged whole."""
    base, weights, tasks = zoo(tmp_path, torch.float64)
    chunked = merge_to_state_dict(base, tasks, method, weights=weights, dtype=torch.float32, **options)
    monkeypatch.setattr(streaming, "can_merge_in_chunks", lambda entry, method: False)
    whole = merge_to_state_dict(base, tasks, method, weights=weights, dtype=torch.float32, **options)
    assert all(torch.equal(chunked[key], value) for key, value in whole.items())


@pytest.mark.parametrize("method, options", [("weight_averaging", {}), ("task_arithmetic", {"scaling": 0.3}),
                                             ("ties", {"density": 0.2, "scope": "tensor"})])
def test_a_chunked_merge_in_bfloat16_sums_the_rounded_inputs_in_float32_and_rounds_once(tmp_path, method, options):
    """float32 checkpoints merged with ``dtype=bfloat16``: the float32 merge of the inputs rounded to bfloat16,
    rounded to bfloat16 (a tensor merged whole computes in bfloat16 instead)."""
    base, weights, tasks = zoo(tmp_path, torch.float32)
    chunked = merge_to_state_dict(base, tasks, method, weights=weights, dtype=torch.bfloat16, **options)
    rounded = [{k: v.bfloat16().float() for k, v in state.items()} for state in (weights, *tasks)]
    expected = merge_to_state_dict(base, rounded[1:], method, weights=rounded[0], dtype=torch.float32, **options)
    for key in ("conv.weight", "linear.weight"):
        assert torch.equal(chunked[key], expected[key].bfloat16().float()), key


@given(st.integers(1, 20), st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64]),
       st.sampled_from([torch.float32, torch.bfloat16, torch.float64]), st.integers(0, 2 ** 31))
def test_the_average_is_summed_in_order_and_rounded_to_the_merge_dtype(tasks, dtype, out_dtype, seed):
    """Summed as mergekit's linear merge sums (torch's mean(dim=0) reorders more than 16 rows and the last columns)."""
    generator = torch.Generator().manual_seed(seed)
    values = [(torch.randn(1003, generator=generator) * 10.0 ** torch.randint(-3, 4, (1003,), generator=generator))
              .to(dtype) for _ in range(tasks)]
    total = torch.zeros(1003, dtype=build.compute_dtype(dtype))
    for value in values:
        total = total + value
    expected = (total / tasks).to(dtype).to(out_dtype)
    out = torch.empty(1003, dtype=out_dtype)
    build._average_into(out, values, dtype, None)
    assert torch.equal(out, expected)
    stacked = torch.stack([v.to(total.dtype) for v in values])
    assert torch.equal(build.average(stacked).to(dtype).to(out_dtype), expected)


def test_float64_inputs_averaged_in_float32_are_rounded_before_they_are_summed():
    """Each input is first rounded to the merge dtype, as in the whole-tensor merge of models cast to it."""
    generator = torch.Generator().manual_seed(0)
    pretrained, *tasks = [torch.randn(700, 1031, generator=generator, dtype=torch.float64) for _ in range(4)]
    entry = build.Entry("w", (), (700, 1031), build.Layout.OUT_IN, True)
    averaged = build.merge_in_chunks(entry, pretrained, tasks, mm.get_method("weight_averaging"), torch.float32,
                                     torch.float64)
    assert torch.equal(averaged, build.average([t.float() for t in tasks]).double())


def test_a_non_finite_input_of_a_chunked_tensor_is_named(tmp_path):
    base, weights, tasks = zoo(tmp_path, torch.float32)
    state = dict(tasks[2].items())
    state["linear.weight"] = state["linear.weight"].clone()
    state["linear.weight"][699, 1030] = float("inf")  # in the last chunk
    save_file(state, tmp_path / "bad.safetensors")
    tasks[2] = SafetensorsCheckpoint(tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match=r"finetuned\[2\]\['linear\.weight'\] contains NaN or Inf"):
        merge_to_state_dict(base, tasks, "task_arithmetic", weights=weights)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_average_based_chunked_merge_does_not_read_the_pretrained_values(tmp_path, dtype):
    """Weight averaging and CART's base is the average of the tasks: a NaN pretrained tensor changes nothing."""
    base, weights, tasks = zoo(tmp_path, dtype)
    entry = build.Entry("linear.weight", (), (700, 1031), build.Layout.OUT_IN, True)
    inputs = [t.view("linear.weight") for t in tasks]
    method = mm.get_method("weight_averaging")
    clean = build.merge_in_chunks(entry, weights.view("linear.weight"), inputs, method, torch.float32, dtype)
    poisoned = torch.full((700, 1031), float("nan"), dtype=dtype)
    assert torch.equal(build.merge_in_chunks(entry, poisoned, inputs, method, torch.float32, dtype), clean)
    arithmetic = build.merge_in_chunks(entry, poisoned, inputs, mm.get_method("task_arithmetic"), torch.float32, dtype)
    assert arithmetic.isnan().all()  # task arithmetic adds to the pretrained values


def test_reused_outputs_share_one_buffer_and_hold_each_tensor_until_the_next(tmp_path):
    base, weights, tasks = zoo(tmp_path, torch.float32)
    fresh = merge_to_state_dict(base, tasks, "task_arithmetic", weights=weights)
    storages, taken = set(), {}
    for names, tensor in streaming.fuse_streaming(base, tasks, weights=weights, reuse_outputs=True):
        if names[0] in ("conv.weight", "linear.weight"):
            storages.add(tensor.untyped_storage().data_ptr())
        taken.update((name, tensor.clone()) for name in names)  # a writer is done with it here
    assert len(storages) == 1
    assert all(torch.equal(taken[key], value) for key, value in fresh.items())


def test_a_saved_merge_is_the_merge_with_its_outputs_reused(tmp_path):
    base, weights, tasks = zoo(tmp_path, torch.bfloat16)
    streaming.save_fused_streaming(tmp_path / "out.safetensors", base, tasks, "weight_averaging", weights=weights)
    saved = SafetensorsCheckpoint(tmp_path / "out.safetensors")
    fresh = merge_to_state_dict(base, tasks, "weight_averaging", weights=weights)
    assert sorted(saved) == sorted(fresh) and all(torch.equal(saved[key], fresh[key]) for key in fresh)


@pytest.mark.parametrize("out", [torch.empty(700, 1031, dtype=torch.float64), torch.empty(1031, 700),
                                 torch.empty(1031, 700).t()])
def test_an_out_tensor_of_another_shape_dtype_or_layout_is_refused(tmp_path, out):
    base, weights, tasks = zoo(tmp_path, torch.float32, tasks=2)
    entry = build.Entry("linear.weight", (), (700, 1031), build.Layout.OUT_IN, True)
    with pytest.raises(ValueError, match=r"out must be a contiguous \(700, 1031\) torch.float32 tensor"):
        build.merge_in_chunks(entry, weights.view("linear.weight"), [t.view("linear.weight") for t in tasks],
                              mm.get_method("weight_averaging"), torch.float32, torch.float32, out=out)


def test_a_non_finite_input_of_a_chunked_ties_tensor_is_named_before_any_merge(tmp_path):
    base, weights, tasks = zoo(tmp_path, torch.bfloat16)
    state = dict(tasks[1].items())
    state["conv.weight"] = state["conv.weight"].clone()
    state["conv.weight"][127, 63, 8, 8] = float("nan")  # the last entry: in the last chunk
    save_file(state, tmp_path / "bad.safetensors")
    tasks[1] = SafetensorsCheckpoint(tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match=r"finetuned\[1\]\['conv\.weight'\] contains NaN or Inf"):
        merge_to_state_dict(base, tasks, "ties", weights=weights, scope="tensor")


def test_in_out_layouts_are_not_chunked():
    entry = build.Entry("w", (), (1024, 1024), build.Layout.IN_OUT, True)
    assert not build.can_merge_in_chunks(entry, mm.get_method("task_arithmetic"))
    assert build.can_merge_in_chunks(build.Entry("w", (), (1024, 1024), build.Layout.OUT_IN, True),
                                     mm.get_method("task_arithmetic"))
    assert not build.can_merge_in_chunks(build.Entry("w", (), (1024, 1024), build.Layout.OUT_IN, True),
                                         mm.get_method("ties"))  # not entrywise: a threshold over the model
    assert build.can_merge_in_chunks(build.Entry("w", (), (1024, 1024), build.Layout.OUT_IN, True),
                                     mm.get_method("ties", scope="tensor"))  # a threshold per tensor


def test_a_mapped_tensor_holds_the_stored_values_and_keeps_writes_private(tmp_path):
    values = torch.randn(300, 7)
    path = tmp_path / "x.safetensors"
    save_file({"a": values, "b": torch.zeros(0)}, path)
    layout = read_safetensors_layout(path)
    mapped = map_stored_tensor(path, layout["a"])
    assert torch.equal(mapped, values) and map_stored_tensor(path, layout["b"]) is None
    mapped[0, 0] = 99.0
    assert torch.equal(SafetensorsCheckpoint(path)["a"], values)  # the file is unchanged


def _resident_mib() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * mmap.PAGESIZE / 2**20


@pytest.mark.skipif(sys.platform != "linux", reason="madvise(MADV_DONTNEED) and /proc: Linux")
def test_released_pages_leave_the_process_and_read_back_the_stored_values(tmp_path):
    values = torch.randn(64, 2**18)  # 64 MiB
    path = tmp_path / "x.safetensors"
    save_file({"a": values}, path)
    mapped = map_stored_tensor(path, read_safetensors_layout(path)["a"])
    before = _resident_mib()
    assert float(mapped.sum()) == float(values.sum())  # every page touched: resident
    touched = _resident_mib()
    for rows in mapped.split(8):
        release_mapped_pages(rows)
    assert touched - before > 56 and touched - _resident_mib() > 56, (before, touched, _resident_mib())
    assert torch.equal(mapped, values)  # faulted in again from the page cache


def test_a_file_shortened_since_its_header_is_an_error_naming_it(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file({"a": torch.randn(1000)}, path)
    checkpoint = SafetensorsCheckpoint(path)
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 8)
    with pytest.raises(ValueError, match=r"x\.safetensors'.*cannot read tensor 'a'.*file ends before"):
        checkpoint.view("a")


def _unaligned_copy(src: Path, dst: Path) -> None:
    """The same tensors with a header one byte longer: every float32 offset in the file is then odd."""
    data = src.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = data[8:8 + length] + b" "
    dst.write_bytes(struct.pack("<Q", len(header)) + header + data[8 + length:])


def test_a_file_whose_offsets_cannot_be_mapped_is_read_and_merged_alike(tmp_path, monkeypatch):
    base, weights, tasks = zoo(tmp_path, torch.float32)
    expected = merge_to_state_dict(base, tasks, "task_arithmetic", weights=weights)
    _unaligned_copy(tmp_path / "m2.safetensors", tmp_path / "odd.safetensors")
    odd = SafetensorsCheckpoint(tmp_path / "odd.safetensors")
    assert odd.view("linear.weight") is None and torch.equal(odd["linear.weight"], tasks[1]["linear.weight"])
    chunked = []
    original = streaming.merge_in_chunks
    monkeypatch.setattr(streaming, "merge_in_chunks", lambda entry, *a, **k: chunked.append(entry.name) or
                        original(entry, *a, **k))
    streamed = merge_to_state_dict(base, [tasks[0], odd, tasks[2]], "task_arithmetic", weights=weights)
    assert chunked == []  # one input cannot be mapped: every tensor takes the plain reads
    assert all(torch.equal(streamed[k], v) for k, v in expected.items())
