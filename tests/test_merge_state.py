"""The merge state (mergemodules.merge_state): rebuilding a merged model, its method and fitted transform."""
import dataclasses
import json
import warnings

import pytest
import torch
from helpers import hf_gpt2, perturbed, timm_vit
from safetensors import safe_open
from safetensors.torch import save_file
from test_export import merged_vit

import mergemodules as mm
from mergemodules.export import save_fused
from mergemodules.merge_state import FORMAT, load_merge_state, save_merge_state
from mergemodules.methods import with_awd


@pytest.mark.parametrize("method", ["adarank_cart", "adamerging_taskwise", "tsv", "weight_averaging"])
def test_merge_state_rebuilds_the_merged_model_without_checkpoints(tmp_path, method):
    _, merged = merged_vit(method)
    path = save_merge_state(merged, tmp_path / "state.safetensors")
    rebuilt = load_merge_state(timm_vit(), path).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), merged(x), rtol=0, atol=0)
    assert [n for n, _ in rebuilt.named_parameters()] == [n for n, _ in merged.named_parameters()]
    assert rebuilt.method.name == merged.method.name and rebuilt.num_tasks == 2
    if method == "adamerging_taskwise":  # one λ shared by all layers stays one Parameter
        assert len(list(rebuilt.parameters())) == 1
    # in aligned memory, not at the file's offsets: BLAS rounds unaligned data differently (bit-exactness above)
    assert all(t.data_ptr() % 64 == 0 for m in rebuilt.merged_tensors().values() for t in m.buffers())


def test_merge_state_keeps_the_lambda_range(tmp_path):
    _, merged = merged_vit("adamerging_layerwise")
    with torch.no_grad():
        for i, p in enumerate(merged.parameters()):
            p.fill_(-0.5 if i % 2 else 1.5)  # every λ beyond [0, 1]: the clamp decides the output
    rebuilt = load_merge_state(timm_vit(), save_merge_state(merged, tmp_path / "state.safetensors")).eval()
    assert {m.coef_range for m in rebuilt.merged_tensors().values() if m.coef is not None} == {(0.0, 1.0)}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), merged(x), rtol=0, atol=0)


def test_a_tampered_lambda_range_is_an_error_naming_the_file_and_tensor(tmp_path):
    _, merged = merged_vit("adamerging_layerwise")
    path = save_merge_state(merged, tmp_path / "state.safetensors")

    def edit(header, tensors):
        name = next(n for n, info in header["tensors"].items() if "coef_range" in info)
        header["tensors"][name]["coef_range"] = [1.0, float("nan")]
    _rewrite(path, edit)
    with pytest.raises(ValueError, match=r"state\.safetensors.*tensor .*coef_range=\[1\.0, nan\]"):
        load_merge_state(timm_vit(), path)


def test_merge_state_keeps_tied_and_in_out_weights(tmp_path):
    pretrained = hf_gpt2().eval()
    merged = mm.merge(pretrained, [perturbed(pretrained, 1), perturbed(pretrained, 2)], "cart")
    rebuilt = load_merge_state(hf_gpt2(), save_merge_state(merged, tmp_path / "s.safetensors")).eval()
    ids = torch.randint(0, 100, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(ids).logits, merged.eval()(ids).logits, rtol=0, atol=0)
    fused = rebuilt.fuse()
    assert fused.lm_head.weight is fused.transformer.wte.weight


def test_merge_state_errors_name_the_file(tmp_path):
    _, merged = merged_vit("task_arithmetic")
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_merge_state(timm_vit(), tmp_path / "missing.safetensors")
    plain = save_fused(merged, tmp_path / "plain.safetensors")
    with pytest.raises(ValueError, match="not a mergemodules merge state"):
        load_merge_state(timm_vit(), plain)
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(ValueError, match="junk.safetensors"):
        load_merge_state(timm_vit(), tmp_path / "junk.safetensors")
    with pytest.raises(TypeError, match="MergedModel"):
        save_merge_state(timm_vit(), tmp_path / "y.safetensors")


def test_merge_state_on_the_wrong_architecture_is_refused(tmp_path):
    _, merged = merged_vit("task_arithmetic")
    path = save_merge_state(merged, tmp_path / "state.safetensors")
    with pytest.raises(KeyError, match="does not match the model"):
        load_merge_state(hf_gpt2(), path)


# ------------------------------------------------------------------------- the method's fitted transform


def same(a, b) -> bool:
    """Equal values: transforms by class and fields (the identity Transform has no fields), tensors exactly."""
    if isinstance(a, mm.Transform) or dataclasses.is_dataclass(a):
        fields = [f.name for f in dataclasses.fields(a)] if dataclasses.is_dataclass(a) else []
        return type(a) is type(b) and all(same(getattr(a, f), getattr(b, f)) for f in fields)
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def tiny_zoo(tasks=3):
    torch.manual_seed(0)
    pretrained = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    return pretrained, [perturbed(pretrained, s, scale=0.1) for s in range(1, tasks + 1)]


def fresh_tiny():
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))


AWD_FAST = {"steps": 5, "lr": 1e-3}
TRANSFORM_METHODS = {
    "ties": lambda: mm.get_method("ties", density=0.3),
    "tsv": lambda: mm.get_method("tsv"),
    "awd_ties": lambda: with_awd("ties", **AWD_FAST),
    "awd_ta": lambda: mm.get_method("awd_ta", **AWD_FAST),
}


@pytest.mark.parametrize("name", list(TRANSFORM_METHODS))
def test_a_reloaded_merge_keeps_its_method_and_fitted_transform(tmp_path, name):
    pretrained, tuned = tiny_zoo()
    merged = mm.merge(pretrained, tuned, TRANSFORM_METHODS[name]())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is lost, so nothing is warned about
        rebuilt = load_merge_state(fresh_tiny(), save_merge_state(merged, tmp_path / "state.safetensors"))
    assert rebuilt.method.name == merged.method.name
    assert same(rebuilt.method, merged.method) and same(rebuilt.transform, merged.transform)
    assert type(rebuilt.transform) is not mm.Transform  # the fitted transform, not the identity
    fused, expected = rebuilt.fuse().state_dict(), merged.fuse().state_dict()
    assert all(torch.equal(fused[k], expected[k]) for k in expected)
    task_vectors = torch.stack([t.state_dict()["0.weight"] - pretrained.state_dict()["0.weight"] for t in tuned])
    assert torch.equal(rebuilt.transform.vectors("0.weight", task_vectors, True),
                       merged.transform.vectors("0.weight", task_vectors, True))


def test_ties_thresholds_and_awd_diagnostics_come_back(tmp_path):
    pretrained, tuned = tiny_zoo()
    ties = mm.merge(pretrained, tuned, "ties", density=0.3)
    rebuilt = load_merge_state(fresh_tiny(), save_merge_state(ties, tmp_path / "ties.safetensors"))
    assert rebuilt.transform.thresholds == ties.transform.thresholds and len(ties.transform.thresholds) == 3
    assert rebuilt.transform.majority == ties.transform.majority and rebuilt.method.transform.density == 0.3
    awd = mm.merge(pretrained, tuned, with_awd("ties", **AWD_FAST))
    back = load_merge_state(fresh_tiny(), save_merge_state(awd, tmp_path / "awd.safetensors")).transform
    assert back.loss_history == awd.transform.loss_history
    assert back.mean_abs_cosine_after == awd.transform.mean_abs_cosine_after
    assert set(back.deltas) == {"0.weight", "2.weight"} and back.inner.thresholds == awd.transform.inner.thresholds


def _rewrite(path, edit):
    """Rewrite a merge state in place with ``edit(header, tensors)`` applied."""
    with safe_open(str(path), framework="pt") as f:
        header = json.loads(f.metadata()[FORMAT])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit(header, tensors)
    save_file(tensors, str(path), metadata={FORMAT: json.dumps(header)})
    return path


def _old_version(path, version):
    """Rewrite a merge state as a file of ``version`` < 3 would be: no transforms stored."""
    def edit(header, tensors):
        header["version"] = version
        del header["transform"]
        for key in [k for k in tensors if k.startswith("::transform::")]:
            del tensors[key]
    return _rewrite(path, edit)


def test_older_merge_states_load_and_warn_when_a_transform_is_lost(tmp_path):
    pretrained, tuned = tiny_zoo()
    ties = mm.merge(pretrained, tuned, "ties")
    old = _old_version(save_merge_state(ties, tmp_path / "ties.safetensors"), 2)
    with pytest.warns(UserWarning, match=r"ties.safetensors.*predates stored transforms \(version 2\).*'ties'"):
        rebuilt = load_merge_state(fresh_tiny(), old)
    assert rebuilt.method.name == "ties" and type(rebuilt.method.transform) is mm.Transform and rebuilt.transform is None
    fused, expected = rebuilt.fuse().state_dict(), ties.fuse().state_dict()
    assert all(torch.equal(fused[k], expected[k]) for k in expected)
    plain = _old_version(save_merge_state(mm.merge(pretrained, tuned, "cart"), tmp_path / "cart.safetensors"), 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # CART has no transform: nothing is lost
        assert load_merge_state(fresh_tiny(), plain).method.name == "cart"


@dataclasses.dataclass(frozen=True)
class Halve(mm.Transform):
    """A user transform: half of each task vector."""

    factor: float = 0.5

    def vectors(self, name, task_vectors, is_matrix):
        return task_vectors * self.factor


class Opaque(mm.Transform):
    """A user transform that is no dataclass: its state cannot be stored."""

    def vectors(self, name, task_vectors, is_matrix):
        return task_vectors * 0.5


def test_user_transforms_are_restored_when_their_class_is_loaded(tmp_path):
    pretrained, tuned = tiny_zoo()
    method = mm.Method("halved", transform=Halve(0.25))
    merged = mm.merge(pretrained, tuned, method)
    path = save_merge_state(merged, tmp_path / "state.safetensors")
    assert same(load_merge_state(fresh_tiny(), path).method, method)
    stored = f"{Halve.__module__}:{Halve.__qualname__}"

    def unloaded(header, tensors):  # as if the module defining the class were not imported
        for role in ("method", "fitted"):
            assert header["transform"][role]["transform"]["class"] == stored
            header["transform"][role]["transform"]["class"] = "user_transforms:Halve"

    with pytest.warns(UserWarning, match=r"transform of method 'halved' cannot be restored.*user_transforms:Halve"):
        rebuilt = load_merge_state(fresh_tiny(), _rewrite(path, unloaded))
    assert type(rebuilt.method.transform) is mm.Transform and rebuilt.transform is None


def test_a_transform_that_cannot_be_stored_is_warned_about_twice(tmp_path):
    pretrained, tuned = tiny_zoo()
    merged = mm.merge(pretrained, tuned, mm.Method("opaque", transform=Opaque()))
    lost = r"transform not stored \(method: .*Opaque is not a dataclass.*; fitted: .*reports the identity"
    with pytest.warns(UserWarning, match=lost):
        path = save_merge_state(merged, tmp_path / "state.safetensors")
    with pytest.warns(UserWarning, match=r"transform of method 'opaque' cannot be restored \(it was not stored\)"):
        rebuilt = load_merge_state(fresh_tiny(), path)
    fused, expected = rebuilt.fuse().state_dict(), merged.fuse().state_dict()
    assert all(torch.equal(fused[k], expected[k]) for k in expected)
