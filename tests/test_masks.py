"""Mask inspection: kept components per layer and task, and the Figure-5 style plot."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import mergemodules as mm
from tta_setup import one_thread  # noqa: F401  (autouse fixture)
from tta_setup import models

YELLOW, BLUE = np.array([0xF2, 0xD1, 0x3A]) / 255, np.array([0x2A, 0x62, 0xB8]) / 255


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
            expected += w.lambdas()[t].detach() * (w.U[t][:, idx] * w.S[t][idx]) @ w.V[t][:, idx].t()
        torch.testing.assert_close(w().detach(), expected, rtol=1e-5, atol=1e-6)


def test_errors_are_clear(setting):
    with pytest.raises(ValueError, match="no mask logits"):
        mm.mask_summary(mm.merge(*setting, "cart"))
    merged = mm.merge(*setting, "adarank_ta")
    with pytest.raises(ValueError, match="task_names: 2 names for 3 tasks"):
        mm.mask_summary(merged, task_names=["a", "b"])


def _colour_fractions(path) -> tuple[float, float]:
    import matplotlib.image

    image = matplotlib.image.imread(path)[..., :3]
    near = lambda c: (np.abs(image - c).max(-1) < 0.05).mean()  # noqa: E731
    return near(BLUE), near(YELLOW)


def test_plot_shows_kept_in_blue_and_pruned_in_yellow(setting, tmp_path):
    all_on = mm.plot_masks(mm.merge(*setting, "adarank_ta"), tmp_path / "ta.png")
    mostly_off = mm.plot_masks(mm.merge(*setting, "adarank_cart"), tmp_path / "cart.png", task_names=["x", "y", "z"])
    assert all_on == tmp_path / "ta.png"
    for path in (all_on, mostly_off):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    blue_ta, yellow_ta = _colour_fractions(all_on)
    blue_cart, yellow_cart = _colour_fractions(mostly_off)
    assert blue_ta > 0.2 and yellow_ta == 0.0
    assert yellow_cart > 0.2 and yellow_cart > 3 * blue_cart
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cart.png", "ta.png"]  # no temporary files left


def test_plot_of_chosen_layers_and_fraction(setting, tmp_path):
    merged = mm.merge(*setting, "adarank_cart")
    one = mm.plot_masks(merged, tmp_path / "one.png", layers=["fc1.weight"], fraction=0.5)
    import matplotlib.image

    full = mm.plot_masks(merged, tmp_path / "all.png")
    assert matplotlib.image.imread(one).shape[0] < matplotlib.image.imread(full).shape[0]
    with pytest.raises(KeyError, match="nope"):
        mm.plot_masks(merged, tmp_path / "x.png", layers=["nope"])
    with pytest.raises(ValueError, match="fraction"):
        mm.plot_masks(merged, tmp_path / "x.png", fraction=0.0)
    assert not (tmp_path / "x.png").exists()
