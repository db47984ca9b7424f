"""Bad inputs to the Python API: each error has its exact type and names the parameter, file, key or task.

Also the behaviours these checks protect: the merged model owns its tensors, buffers are merged and
stored, a resumed adaptation belongs to its merge, fused modules keep their mode, merged models pickle.
"""
from __future__ import annotations

import contextlib
import copy
import json
import pickle
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import torch
from helpers import perturbed
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import mergemodules as mm
from mergemodules.export import save_fused
from mergemodules.merge_state import FORMAT, load_merge_state, save_merge_state
from mergemodules.layers import MergedWeight
from mergemodules.streaming import merge_to_state_dict, save_fused_streaming
from tta_setup import one_thread  # noqa: F401  (autouse fixture)
from tta_setup import models, tasks

NAN, INF = float("nan"), float("inf")


@contextlib.contextmanager
def raises(kind: type[BaseException], *fragments: str) -> Iterator[None]:
    """Expect an error of exactly ``kind`` whose message contains every fragment."""
    with pytest.raises(kind) as info:
        yield
    assert type(info.value) is kind, f"expected {kind.__name__}, got {type(info.value).__name__}: {info.value}"
    for fragment in fragments:
        assert fragment in str(info.value), f"{fragment!r} not in {str(info.value)!r}"


class Net(nn.Module):
    """Linear → BatchNorm → Linear head: parameters, floating and integer buffers."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.bn = nn.BatchNorm1d(6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.bn(self.fc(x))))


class Tied(nn.Module):
    """An embedding tied to the output layer (GPT-2's wte / lm_head)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.out = nn.Linear(4, 10, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(self.embed(ids))


def net_zoo(tasks_: int = 2) -> tuple[Net, list[Net]]:
    """A pretrained Net and fine-tuned copies, each with BatchNorm statistics of its own data."""
    pretrained = Net().train()
    with torch.no_grad():
        pretrained(torch.randn(32, 4) - 1)
    pretrained.eval()
    tuned = []
    for t in range(tasks_):
        model = perturbed(pretrained, seed=t + 1, scale=0.1).train()
        with torch.no_grad():
            model(torch.randn(32, 4) + t)
        tuned.append(model.eval())
    return pretrained, tuned


def quiet_merge(*args: Any, **kwargs: Any) -> mm.MergedModel:
    """``mm.merge`` with the expected warning about discarded ``num_batches_tracked`` silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return mm.merge(*args, **kwargs)


# ------------------------------------------------------------------------ non-finite settings


@pytest.mark.parametrize("method, option, value", [
    ("task_arithmetic", "scaling", INF),
    ("task_arithmetic", "scaling", NAN),
    ("task_arithmetic", "scaling", -INF),
    ("adarank_ta", "temperature", NAN),
    ("adarank_ta", "temperature", INF),
    ("adarank_ta", "mask_init", NAN),
    ("adarank_ta", "mask_init", INF),
    ("cart", "rank", NAN),
    ("cart", "rank", INF),
    ("adarank_cart", "mask_rank", NAN),
    ("ties", "density", NAN),
    ("ties", "density", INF),
    ("awd_ta", "alpha", NAN),
    ("awd_ta", "lr", INF),
])
def test_non_finite_method_options_are_refused_naming_the_option(method, option, value):
    pretrained, tuned = net_zoo()
    with raises(ValueError, f"{option}={value!r}"):
        mm.merge(pretrained, tuned, method, **{option: value})


@pytest.mark.parametrize("lr", [NAN, INF])
def test_non_finite_learning_rate_is_refused(lr):
    merged = mm.merge(*models(), "adamerging_taskwise")
    with raises(ValueError, "lr", repr(lr)):
        mm.adapt(merged, tasks(), steps=1, lr=lr)


def test_a_method_built_by_hand_with_an_infinite_scaling_is_refused():
    with raises(ValueError, "scaling=inf"):
        mm.Method("mine", scaling=INF)


def test_a_merged_weight_with_a_nan_temperature_is_refused():
    S = torch.ones(1, 2)
    with raises(ValueError, "temperature", "nan"):
        MergedWeight(torch.zeros(3, 3), U=torch.zeros(1, 3, 2), S=S, V=torch.zeros(1, 3, 2),
                     coef=nn.Parameter(torch.tensor(1.0)), temperature=NAN)


# -------------------------------------------------------------------- non-finite fused tensors


def fp16_overflow() -> tuple[nn.Sequential, list[nn.Sequential]]:
    """A float16 layer whose merged weight (6e4 + 2 · 5e3) exceeds the float16 range (65504)."""
    pretrained = nn.Sequential(nn.Linear(4, 4)).half()
    with torch.no_grad():
        pretrained[0].weight.fill_(6.0e4)
    tuned = copy.deepcopy(pretrained)
    with torch.no_grad():
        tuned[0].weight.fill_(6.5e4)
    return pretrained, [tuned]


def test_fuse_refuses_a_float16_weight_that_overflowed():
    merged = mm.merge(*fp16_overflow(), "task_arithmetic", scaling=2.0)
    with raises(ValueError, "'0.weight'", "NaN or Inf"):
        merged.fuse()


def test_fusing_one_merged_linear_refuses_an_overflow():
    merged = mm.merge(*fp16_overflow(), "task_arithmetic", scaling=2.0)
    with raises(ValueError, "fused weight", "NaN or Inf"):
        merged.model[0].fuse()


def test_save_fused_refuses_an_overflow_and_writes_nothing(tmp_path):
    merged = mm.merge(*fp16_overflow(), "task_arithmetic", scaling=2.0)
    out = tmp_path / "fused.safetensors"
    with raises(ValueError, "'0.weight'"):
        save_fused(merged, out)
    assert list(tmp_path.iterdir()) == []


def test_save_fused_of_a_plain_model_refuses_a_non_finite_tensor_naming_file_and_key(tmp_path):
    plain = nn.Linear(3, 2)
    with torch.no_grad():
        plain.bias[1] = INF
    out = tmp_path / "plain.safetensors"
    with raises(ValueError, "plain.safetensors", "'bias'"):
        save_fused(plain, out)
    assert not out.exists()


def test_streaming_export_refuses_an_overflow_and_writes_nothing(tmp_path):
    pretrained, tuned = fp16_overflow()
    out = tmp_path / "stream.safetensors"
    with raises(ValueError, "'0.weight'", "NaN or Inf"):
        save_fused_streaming(out, pretrained, tuned, "task_arithmetic", scaling=2.0)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------- tensors read as inputs


def test_a_meta_tensor_in_a_finetuned_state_dict_is_named():
    pretrained, (tuned,) = net_zoo(1)
    state = dict(tuned.state_dict())
    state["fc.weight"] = torch.empty(6, 4, device="meta")
    with raises(ValueError, "finetuned[0]['fc.weight']", "meta tensor"):
        quiet_merge(pretrained, [state], "task_arithmetic")


def test_a_meta_tensor_in_the_pretrained_model_is_named_even_when_excluded():
    pretrained, tuned = net_zoo()
    pretrained.head = nn.Linear(6, 3, device="meta")
    with raises(ValueError, "pretrained['head.weight']", "meta tensor"):
        quiet_merge(pretrained, tuned, "task_arithmetic", exclude=["head"])


def test_tied_keys_with_different_values_are_an_error_naming_both_and_the_difference():
    torch.manual_seed(0)
    pretrained = Tied()
    state = {k: v.clone() for k, v in perturbed(pretrained, 1).state_dict().items()}
    state["out.weight"] = state["out.weight"] + 0.25
    with raises(ValueError, "finetuned[0]", "'embed.weight'", "'out.weight'", "max |difference| 0.25"):
        mm.merge(pretrained, [state], "task_arithmetic")


def test_tied_keys_with_different_shapes_are_an_error_naming_both():
    pretrained = Tied()
    state = dict(perturbed(pretrained, 1).state_dict())
    state["out.weight"] = torch.zeros(10, 5)
    with raises(ValueError, "'embed.weight'", "'out.weight'", "shapes (10, 4) and (10, 5)"):
        mm.merge(pretrained, [state], "task_arithmetic")


def test_a_buffer_of_the_wrong_shape_is_named():
    pretrained, (tuned,) = net_zoo(1)
    state = dict(tuned.state_dict())
    state["bn.running_mean"] = torch.zeros(7)
    with raises(ValueError, "finetuned[0]['bn.running_mean']", "(7,)"):
        mm.merge(pretrained, [state], "task_arithmetic")


def test_a_non_finite_buffer_is_named():
    pretrained, (tuned,) = net_zoo(1)
    state = {k: v.clone() for k, v in tuned.state_dict().items()}
    state["bn.running_var"][2] = NAN
    with raises(ValueError, "finetuned[0]['bn.running_var']", "NaN or Inf"):
        mm.merge(pretrained, [state], "task_arithmetic")


# --------------------------------------------------------------------------- tampered merge state


def _state_file(tmp_path: Path) -> Path:
    pretrained, tuned = net_zoo()
    path = tmp_path / "state.safetensors"
    save_merge_state(quiet_merge(pretrained, tuned, "adarank_cart"), path)
    return path


def _tamper(path: Path, edit: Callable[[Any, dict], Any], raw: str | None = None) -> Path:
    """Rewrite a merge state with ``edit(header, tensors)`` applied (its return value, if any, is the new header)."""
    with safe_open(str(path), framework="pt") as f:
        header = json.loads(f.metadata()[FORMAT])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    header = edit(header, tensors) or header
    out = path.with_name("tampered.safetensors")
    save_file(tensors, str(out), metadata={FORMAT: raw if raw is not None else json.dumps(header)})
    return out


def _set(*keys: str, value: Any) -> Callable[[Any, dict], None]:
    def edit(header: Any, tensors: dict) -> None:
        node = header
        for key in keys[:-1]:
            node = node[key]
        node[keys[-1]] = value
    return edit


def _drop_tensor(key: str) -> Callable[[Any, dict], None]:
    def edit(header: Any, tensors: dict) -> None:
        del tensors[key]
    return edit


@pytest.mark.parametrize("edit, fragments", [
    (lambda h, t: ["not", "an", "object"], ["mergemodules.merge_state", "JSON object"]),
    (_set("version", value=99), ["version 99"]),
    (_set("num_tasks", value="two"), ["'num_tasks'", "'two'"]),
    (_set("method", value="cart"), ["'method'"]),
    (_set("method", "colour", value="red"), ["'method'", "colour"]),
    (_set("method", "base", value="median"), ["'method'", "median"]),
    (_set("method", "scaling", value=NAN), ["'method'", "scaling=nan"]),
    (_set("tensors", value=[]), ["'tensors'"]),
    (_set("tensors", "fc.weight", "kind", value="sparse"), ["'tensors'['fc.weight']", "sparse"]),
    (_set("tensors", "fc.weight", "layout", value="sideways"), ["'tensors'['fc.weight']['layout']", "sideways"]),
    (_set("tensors", "fc.weight", "temperature", value="hot"), ["'tensors'['fc.weight']['temperature']", "hot"]),
    (_set("tensors", "fc.weight", "coef", value="coef99"), ["'tensors'['fc.weight']['coef']", "coef99::coef"]),
    (_drop_tensor("fc.weight::base"), ["'tensors'['fc.weight']", "fc.weight::base"]),
    (_set("buffers", value="bn.running_mean"), ["'buffers'"]),
    (_drop_tensor("bn.running_var::buffer"), ["'buffers'"]),
    (_set("transform", value="ties"), ["'transform'", "'ties'"]),
    (_set("transform", "method", value={"tensor": "nowhere"}), ["'transform'", "no tensor 'nowhere'"]),
    (_set("transform", "method", value={"sparse": 1}), ["'transform'", "{'sparse': 1}"]),
    (_set("transform", "method", value={"transform": {"class": "mergemodules.methods.ties:Ties",
                                                      "fields": {"density": 7}}}), ["'transform'", "density=7"]),
])
def test_tampered_merge_state_metadata_is_a_value_error_naming_file_and_key(tmp_path, edit, fragments):
    tampered = _tamper(_state_file(tmp_path), edit)
    with raises(ValueError, "tampered.safetensors", *fragments):
        load_merge_state(Net(), tampered)


def test_merge_state_metadata_that_is_not_json_is_named(tmp_path):
    tampered = _tamper(_state_file(tmp_path), lambda h, t: None, raw="{not json")
    with raises(ValueError, "tampered.safetensors", "mergemodules.merge_state", "not JSON"):
        load_merge_state(Net(), tampered)


def test_merge_state_with_a_nan_temperature_names_file_and_tensor(tmp_path):
    tampered = _tamper(_state_file(tmp_path), _set("tensors", "fc.weight", "temperature", value=NAN))
    with raises(ValueError, "tampered.safetensors", "'fc.weight'", "temperature"):
        load_merge_state(Net(), tampered)


def test_merge_state_with_inconsistent_factors_names_file_and_tensor(tmp_path):
    def shrink(header: Any, tensors: dict) -> None:
        tensors["fc.weight::U"] = tensors["fc.weight::U"][:, :3].contiguous()
    with raises(ValueError, "tampered.safetensors", "'fc.weight'", "factors"):
        load_merge_state(Net(), _tamper(_state_file(tmp_path), shrink))


def test_merge_state_buffer_of_the_wrong_shape_names_file_and_buffer(tmp_path):
    def grow(header: Any, tensors: dict) -> None:
        tensors["bn.running_mean::buffer"] = torch.zeros(9)
    with raises(ValueError, "tampered.safetensors", "'bn.running_mean'", "(9,)"):
        load_merge_state(Net(), _tamper(_state_file(tmp_path), grow))


class NetWithLayerNorm(Net):
    """Net with a LayerNorm (no buffers) in place of the BatchNorm: the same parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.LayerNorm(6)


def test_merge_state_for_a_model_with_other_buffers_is_a_key_error_naming_them(tmp_path):
    path = _state_file(tmp_path)
    with raises(KeyError, "state.safetensors", "bn.running_mean"):
        load_merge_state(NetWithLayerNorm(), path)


# ----------------------------------------------------------------------------------------- adapt


def test_an_input_of_the_wrong_shape_names_the_task():
    merged = mm.merge(*models(), "adamerging_taskwise")
    task_set = tasks()
    task_set["task1"] = mm.Task([torch.randn(8, 4, 5)], task_set["task1"].head)
    with raises(ValueError, "tasks['task1']", "(8, 4, 5)"):
        mm.adapt(merged, task_set, steps=1)


def test_resume_refuses_a_checkpoint_of_a_merge_of_other_models(tmp_path):
    ckpt = tmp_path / "adapt.pt"
    mm.adapt(mm.merge(*models(), "adamerging_taskwise"), tasks(), steps=2, checkpoint=ckpt)
    pretrained, tuned = models()
    other = [perturbed(m, seed=50) for m in tuned]
    with raises(ValueError, "adapt.pt", "another merge", "values of the stored tensors"):
        mm.adapt(mm.merge(pretrained, other, "adamerging_taskwise"), tasks(), steps=3, checkpoint=ckpt, resume=True)


def test_resume_refuses_a_checkpoint_of_a_merge_with_other_options(tmp_path):
    ckpt = tmp_path / "adapt.pt"
    mm.adapt(mm.merge(*models(), "adamerging_taskwise"), tasks(), steps=2, checkpoint=ckpt)
    changed = mm.merge(*models(), "adamerging_taskwise", scaling=0.5)
    with raises(ValueError, "adapt.pt", "another merge", "method option 'scaling'", "0.3", "0.5"):
        mm.adapt(changed, tasks(), steps=3, checkpoint=ckpt, resume=True)


def test_resume_refuses_a_checkpoint_of_a_merge_with_other_excluded_tensors(tmp_path):
    ckpt = tmp_path / "adapt.pt"
    mm.adapt(mm.merge(*models(), "adamerging_taskwise"), tasks(), steps=2, checkpoint=ckpt)
    changed = mm.merge(*models(), "adamerging_taskwise", exclude=["fc2"])
    with raises(ValueError, "adapt.pt", "another merge", "stored tensors"):
        mm.adapt(changed, tasks(), steps=3, checkpoint=ckpt, resume=True)


def test_resume_accepts_the_same_merge_rebuilt_or_reloaded_from_its_merge_state(tmp_path):
    ckpt, state = tmp_path / "adapt.pt", tmp_path / "merge.safetensors"
    first = mm.merge(*models(), "adamerging_taskwise")
    save_merge_state(first, state)
    mm.adapt(first, tasks(), steps=2, checkpoint=ckpt)
    rebuilt = mm.merge(*models(), "adamerging_taskwise")
    assert len(mm.adapt(rebuilt, tasks(), steps=3, checkpoint=ckpt, resume=True)) == 3
    reloaded = load_merge_state(models()[0], state)
    assert len(mm.adapt(reloaded, tasks(), steps=3, checkpoint=ckpt, resume=True)) == 3


# ---------------------------------------------------------------------------- owning the tensors


def _zero_state(merged: mm.MergedModel) -> dict[str, torch.Tensor]:
    return {k: torch.zeros_like(v) for k, v in merged.state_dict().items()}


@pytest.mark.parametrize("method", ["task_arithmetic", "cart"])
def test_load_state_dict_on_the_merged_model_leaves_the_pretrained_model_alone(method):
    pretrained, tuned = net_zoo()
    before = copy.deepcopy(pretrained.state_dict())
    merged = quiet_merge(pretrained, tuned, method, exclude=["head"])
    merged.load_state_dict(_zero_state(merged))
    assert all(torch.equal(before[k], v) for k, v in pretrained.state_dict().items())


def test_editing_the_pretrained_model_afterwards_leaves_the_merged_model_alone():
    pretrained, tuned = net_zoo()
    merged = quiet_merge(pretrained, tuned, "task_arithmetic", exclude=["head"]).eval()
    x = torch.randn(5, 4)
    expected = merged(x)
    with torch.no_grad():
        for p in pretrained.parameters():
            p.add_(1.0)
    assert torch.equal(merged(x), expected)


def test_zeroing_an_excluded_weight_of_the_merged_model_leaves_the_users_alone():
    pretrained, tuned = net_zoo()
    merged = quiet_merge(pretrained, tuned, "task_arithmetic", exclude=["head"])
    with torch.no_grad():
        merged.model.head.weight.zero_()
    assert merged.fuse().head.weight.abs().sum() == 0
    assert pretrained.head.weight.abs().sum() > 0


def test_copy_false_shares_storage_with_the_pretrained_model_as_documented():
    pretrained, tuned = net_zoo()
    merged = quiet_merge(pretrained, tuned, "task_arithmetic", exclude=["head"], copy=False)
    with torch.no_grad():
        merged.model.head.weight.zero_()
    assert pretrained.head.weight.abs().sum() == 0
    merged.load_state_dict(_zero_state(merged))
    assert pretrained.fc.weight.abs().sum() == 0
    with torch.no_grad():
        pretrained.fc.weight.fill_(2.0)
    assert torch.all(merged.model.fc.merged_weight.base == 2.0)


def test_copy_true_copies_only_tensors_shared_with_the_pretrained_model():
    pretrained, tuned = net_zoo()
    merged = quiet_merge(pretrained, tuned, "weight_averaging", exclude=["head"])
    own = {p.untyped_storage().data_ptr() for p in pretrained.parameters()}
    bases = [m.base for m in merged.merged_tensors().values()]
    assert not any(b.untyped_storage().data_ptr() in own for b in bases)
    storage = sum(b.untyped_storage().nbytes() for b in bases)
    assert storage == sum(b.numel() * b.element_size() for b in bases)  # one copy each, no spare


# -------------------------------------------------------------------------------------- buffers


def test_floating_buffers_are_the_mean_of_the_finetuned_models_and_integers_stay_pretrained():
    pretrained, tuned = net_zoo(3)
    with pytest.warns(UserWarning, match=r"bn\.num_batches_tracked.*discarded"):
        merged = mm.merge(pretrained, tuned, "task_arithmetic")
    fused = merged.fuse()
    for name in ("running_mean", "running_var"):
        mean = torch.stack([getattr(t.bn, name).double() for t in tuned]).mean(0).float()
        assert torch.equal(getattr(fused.bn, name), mean)
    assert torch.equal(fused.bn.num_batches_tracked, pretrained.bn.num_batches_tracked)


def test_buffers_of_excluded_modules_keep_the_pretrained_values_without_a_warning():
    pretrained, tuned = net_zoo()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fused = mm.merge(pretrained, tuned, "task_arithmetic", exclude=["bn"]).fuse()
    assert torch.equal(fused.bn.running_mean, pretrained.bn.running_mean)


def test_a_buffer_missing_from_a_finetuned_state_dict_keeps_the_pretrained_value_with_a_warning():
    pretrained, tuned = net_zoo()
    params_only = [dict(t.named_parameters()) for t in tuned]
    with pytest.warns(UserWarning, match=r"bn\.running_mean.*missing"):
        fused = mm.merge(pretrained, params_only, "task_arithmetic").fuse()
    assert torch.equal(fused.bn.running_var, pretrained.bn.running_var)


def test_buffers_round_trip_through_the_merge_state_into_a_fresh_model(tmp_path):
    pretrained, tuned = net_zoo()
    merged = quiet_merge(pretrained, tuned, "cart").eval()
    save_merge_state(merged, tmp_path / "state.safetensors")
    loaded = load_merge_state(Net(), tmp_path / "state.safetensors").eval()
    assert torch.equal(loaded.model.bn.running_mean, merged.model.bn.running_mean)
    assert torch.equal(loaded.model.bn.running_var, merged.model.bn.running_var)
    x = torch.randn(5, 4)
    assert torch.equal(loaded(x), merged(x))


def test_streaming_export_merges_buffers_as_merge_does():
    pretrained, tuned = net_zoo()
    expected = quiet_merge(pretrained, tuned, "ties").fuse().state_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        streamed = merge_to_state_dict(pretrained, tuned, "ties")
    assert torch.equal(streamed["bn.running_var"], expected["bn.running_var"])
    assert not torch.equal(streamed["bn.running_var"], pretrained.bn.running_var)
    assert torch.equal(streamed["bn.num_batches_tracked"], expected["bn.num_batches_tracked"])


def test_a_merge_state_without_buffers_loads_with_a_warning_naming_them(tmp_path):
    def version_1(header: Any, tensors: dict) -> None:
        header["version"] = 1
        for name in header.pop("buffers"):
            tensors.pop(f"{name}::buffer")
    old = _tamper(_state_file(tmp_path), version_1)
    with pytest.warns(UserWarning, match=r"predates stored buffers.*bn\.running_mean"):
        load_merge_state(Net(), old)


# -------------------------------------------------------------------------------- mode and pickle


def test_fuse_keeps_the_eval_mode_of_every_module():
    pretrained, tuned = net_zoo()
    merged = quiet_merge(pretrained.train(), tuned, "cart")
    merged.eval()
    assert not any(m.training for m in merged.fuse().modules())


def test_fuse_keeps_a_mixed_train_and_eval_mode_per_module():
    pretrained, tuned = net_zoo()
    merged = quiet_merge(pretrained.eval(), tuned, "task_arithmetic")
    merged.train()
    merged.model.bn.eval()
    fused = merged.fuse()
    assert fused.training and fused.fc.training and fused.head.training
    assert not fused.bn.training


def test_torch_save_of_a_merged_model_round_trips(tmp_path):
    merged = mm.merge(*models(), "adamerging_taskwise").eval()
    torch.save(merged, tmp_path / "merged.pt")
    loaded = torch.load(tmp_path / "merged.pt", weights_only=False)
    x = torch.randn(3, 4, 12)
    assert torch.equal(loaded(x), merged(x))
    assert [n for n, _ in loaded.named_parameters()] == [n for n, _ in merged.named_parameters()]
    coefs = {id(m.coef) for m in loaded.merged_tensors().values() if m.coef is not None}
    assert len(coefs) == 1  # the task-wise λ is still one Parameter shared by every tensor
    assert type(loaded.fuse().attn) is nn.MultiheadAttention
    assert [p.name for p in tmp_path.iterdir()] == ["merged.pt"]


def test_pickle_and_deepcopy_give_independent_working_models():
    merged = mm.merge(*models(), "cart").eval()
    x = torch.randn(3, 4, 12)
    for clone in (pickle.loads(pickle.dumps(merged)), copy.deepcopy(merged)):
        assert torch.equal(clone(x), merged(x))
        assert type(clone.model.attn) is not type(merged.model.attn)  # a class of its own
        with torch.no_grad():
            next(clone.parameters()).add_(1.0)
        assert not torch.equal(clone(x), merged(x))
