"""Mask inspection: kept components per layer and task (the plot: tests/test_plotting.py)."""
from __future__ import annotations

import pytest
import torch

import mergemodules as mm
from tta_setup import one_thread  # noqa: F401  (autouse fixture)
from tta_setup import models

@pytest.fixture(scope="module")
def setting():
    return models()


def _set_logits(merged: mm.MergedModel) -> dict[str, torch.Tensor]:
    """Give every mask a known pattern: task t keeps components i with (i + t) % 3 != 0."""
    with torch.no_grad():
        for w in merged.merged_weights().values():
            T, k = w.mask_logits.shape
            keep = (torch.arange(k)[None, :] + torch.arange(T)[:, None]) % 3 != 0
            w.mask_logits.copy_(torch.where(keep, 0.05, -0.05))
    return {name: w.mask_logits.detach() > 0 for name, w in merged.merged_weights().items()}


def test_initial_masks_of_cart_adarank_keep_the_top_components(setting):
    merged = mm.merge(*setting, "adarank_cart")
    masks = mm.hard_masks(merged)
    assert masks.keys() == merged.merged_weights().keys()
    for name, m in masks.items():
        on = int(0.08 * m.shape[1])  # AdaRank's code: int(r · initial_rank_ratio), 0 for r < 13
        assert m.dtype == torch.bool and m.shape == (3, merged.merged_weights()[name].rank)
        assert m[:, :on].all() and not m[:, on:].any()


def test_summary_lists_kept_count_and_indices(setting):
    merged = mm.merge(*setting, "adarank_ta")
    expected = _set_logits(merged)
    rows = mm.mask_summary(merged, task_names=["a", "b", "c"])
    assert len(rows) == 3 * len(expected)
    for row in rows:
        t = "abc".index(row["task"])
        keep = expected[row["layer"]][t]
        assert row["rank"] == keep.numel()
        assert row["kept"] == int(keep.sum())
        assert row["indices"] == [i for i in range(keep.numel()) if (i + t) % 3 != 0]


def test_reported_masks_are_the_ones_the_forward_uses(setting):
    merged = mm.merge(*setting, "adarank_ta")
    _set_logits(merged)
    rows = {(r["layer"], r["task"]): r["indices"] for r in mm.mask_summary(merged)}
    for name, w in merged.merged_weights().items():
        expected = w.base.clone()
        for t in range(3):
            idx = rows[(name, f"task {t}")]
            expected += w.task_coef()[t].detach() * (w.U[t][:, idx] * w.S[t][idx]) @ w.V[t][:, idx].t()
        torch.testing.assert_close(w().detach(), expected, rtol=1e-5, atol=1e-6)


def test_errors_are_clear(setting, monkeypatch):
    masked = mm.Method("my_adarank", matrices="svd", masks=True)
    monkeypatch.setitem(mm.METHODS, "my_adarank", masked)  # the message asks the registry, not a list
    monkeypatch.setitem(mm.METHODS, "my_alias", masked)
    with pytest.raises(ValueError) as error:
        mm.mask_summary(mm.merge(*setting, "cart"))
    assert str(error.value) == ("merged has no mask logits: masks exist only for AdaRank methods "
                                "(adarank_ta, adarank_cart, adarank_cart_released, my_adarank)")
    merged = mm.merge(*setting, "adarank_ta")
    with pytest.raises(ValueError, match="task_names: 2 names for 3 tasks"):
        mm.mask_summary(merged, task_names=["a", "b"])
