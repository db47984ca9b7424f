"""The adaptation checkpoint's merge fingerprint (mergemodules.tta_checkpoint)."""
from __future__ import annotations

import torch

from mergemodules.tta_checkpoint import _digest


def test_digest_of_a_tensor_past_float32_positions() -> None:
    """Over 2^24 entries float32 positions round past the end; the digest samples exact positions."""
    big = torch.zeros(2**24 + 3, dtype=torch.uint8)
    before = _digest(big)
    big[-1] = 1  # the last entry is always sampled
    assert _digest(big) != before


def test_digest_depends_on_shape_dtype_and_sampled_values() -> None:
    x = torch.arange(100.0)
    assert _digest(x) == _digest(x.clone())
    assert _digest(x) != _digest(x.view(10, 10))
    assert _digest(x) != _digest(x.double())
    y = x.clone()
    y[0] = -1
    assert _digest(x) != _digest(y)
    assert _digest(torch.empty(0)) == _digest(torch.empty(0))


def test_a_checkpoint_with_the_old_layer_names_resumes(tmp_path) -> None:
    """Checkpoints written before weight_merge/bias_merge became merged_weight/merged_bias still resume, exactly."""
    import mergemodules as mm
    from tta_setup import models, tasks

    uninterrupted = mm.merge(*models(), "adarank_ta")
    expected = mm.adapt(uninterrupted, tasks(), steps=4, lr=0.02, seed=1)
    merged = mm.merge(*models(), "adarank_ta")
    path = tmp_path / "adapt.pt"
    mm.adapt(merged, tasks(), steps=2, lr=0.02, seed=1, checkpoint=path)
    state = torch.load(path, weights_only=True)
    assert any(".merged_weight." in key for key in state["params"])

    def old_names(named: dict) -> dict:
        return {key.replace(".merged_weight.", ".weight_merge.").replace(".merged_bias.", ".bias_merge."): value
                for key, value in named.items()}

    state["params"] = old_names(state["params"])
    state["fingerprint"]["tensors"] = old_names(state["fingerprint"]["tensors"])  # its digests are named too
    assert any(".weight_merge." in key for key in state["fingerprint"]["tensors"])
    torch.save(state, path)
    resumed = mm.merge(*models(), "adarank_ta")
    history = mm.adapt(resumed, tasks(), steps=4, lr=0.02, seed=1, checkpoint=path, resume=True)
    assert history == expected
    assert all(torch.equal(a, b) for a, b in zip(resumed.parameters(), uninterrupted.parameters()))


def test_a_checkpoint_from_before_an_option_existed_resumes_where_the_option_is_at_its_default(tmp_path) -> None:
    """A checkpoint written before ``lambda_range`` existed resumes for a method without a clamp, not for one with."""
    import pytest

    import mergemodules as mm
    from tta_setup import models, tasks

    for method, resumes in (("adarank_ta", True), ("adamerging_layerwise", False)):
        path = tmp_path / f"{method}.pt"
        mm.adapt(mm.merge(*models(), method), tasks(), steps=2, lr=0.02, seed=1, checkpoint=path)
        state = torch.load(path, weights_only=True)
        del state["fingerprint"]["method"]["lambda_range"]
        torch.save(state, path)
        resumed = mm.merge(*models(), method)
        if resumes:
            assert len(mm.adapt(resumed, tasks(), steps=3, lr=0.02, seed=1, checkpoint=path, resume=True)) == 3
        else:
            with pytest.raises(ValueError, match="'lambda_range' differs"):
                mm.adapt(resumed, tasks(), steps=3, lr=0.02, seed=1, checkpoint=path, resume=True)
