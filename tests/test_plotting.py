"""Figures: AdaRank's mask plot and AWD's cosine heatmaps, the ``plot`` extra's error, the deprecated paths."""
from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

import mergemodules as mm
from mergemodules import plotting
from mergemodules.methods import Transform
from mergemodules.methods.awd import FittedAWD
from tta_setup import one_thread  # noqa: F401  (autouse fixture)
from tta_setup import models

PNG = b"\x89PNG\r\n\x1a\n"
YELLOW, BLUE = np.array([0xF2, 0xD1, 0x3A]) / 255, np.array([0x2A, 0x62, 0xB8]) / 255


@pytest.fixture(scope="module")
def setting():
    return models()


def _image(path) -> np.ndarray:
    import matplotlib.image

    return matplotlib.image.imread(path)[..., :3]


def _near(image: np.ndarray, colour: np.ndarray) -> float:
    """The fraction of pixels within 0.05 of ``colour`` in every channel."""
    return float((np.abs(image - colour).max(-1) < 0.05).mean())


def _fitted(before: list[list[float]], after: list[list[float]]) -> FittedAWD:
    """A fitted AWD state holding only the given cosine matrices (the data behind the heatmap)."""
    return FittedAWD(deltas={}, inner=Transform(), loss_history=(1.0, 0.5), delta_norm=0.25,
                     cosine_before=torch.tensor(before, dtype=torch.float64),
                     cosine_after=torch.tensor(after, dtype=torch.float64))


# ------------------------------------------------------------------------------------- masks


def test_mask_plot_shows_kept_in_blue_and_pruned_in_yellow(setting, tmp_path):
    all_on = mm.plot_masks(mm.merge(*setting, "adarank_ta"), tmp_path / "ta.png")
    mostly_off = mm.plot_masks(mm.merge(*setting, "adarank_cart"), tmp_path / "cart.png", task_names=["x", "y", "z"])
    assert all_on == tmp_path / "ta.png" and mm.plot_masks is plotting.plot_masks
    for path in (all_on, mostly_off):
        assert path.read_bytes()[:8] == PNG
    ta, cart = _image(all_on), _image(mostly_off)
    assert _near(ta, BLUE) > 0.2 and _near(ta, YELLOW) == 0.0
    assert _near(cart, YELLOW) > 0.2 and _near(cart, YELLOW) > 3 * _near(cart, BLUE)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cart.png", "ta.png"]  # no temporary files left


def test_mask_plot_of_chosen_layers_and_fraction(setting, tmp_path):
    merged = mm.merge(*setting, "adarank_cart")
    one = mm.plot_masks(merged, tmp_path / "one.png", layers=["fc1.weight"], fraction=0.5)
    full = mm.plot_masks(merged, tmp_path / "all.png")
    assert _image(one).shape[0] < _image(full).shape[0]
    with pytest.raises(KeyError, match="nope"):
        mm.plot_masks(merged, tmp_path / "x.png", layers=["nope"])
    for fraction in (0.0, 1.5, True):
        with pytest.raises(ValueError, match="fraction"):
            mm.plot_masks(merged, tmp_path / "x.png", fraction=fraction)
    with pytest.raises(ValueError, match="task_names: 1 names for 3 tasks"):
        mm.plot_masks(merged, tmp_path / "x.png", task_names=["a"])
    assert not (tmp_path / "x.png").exists()


def test_mask_plot_of_saved_hard_masks_is_the_plot_of_the_model(setting, tmp_path):
    merged = mm.merge(*setting, "adarank_cart")
    from_model = mm.plot_masks(merged, tmp_path / "model.png", fraction=0.5)
    from_masks = mm.plot_masks(mm.hard_masks(merged), tmp_path / "masks.png", fraction=0.5)
    assert np.array_equal(_image(from_model), _image(from_masks))


# ------------------------------------------------------------------------------ AWD heatmaps


def test_awd_heatmap_colours_the_cosines_before_and_leaves_the_orthogonal_after_white(tmp_path):
    fitted = _fitted([[1.0, 0.8], [0.8, 1.0]], [[1.0, 0.0], [0.0, 1.0]])
    path = plotting.plot_awd_cosine(fitted, tmp_path / "cosine.png", task_names=["a", "b"])
    assert path == tmp_path / "cosine.png" and path.read_bytes()[:8] == PNG
    image = _image(path)
    left, right = image[:, : image.shape[1] // 2], image[:, image.shape[1] // 2:]
    dark_red = lambda half: float(((half[..., 0] > 0.3) & (half[..., 1] < 0.1) & (half[..., 2] < 0.2)).mean())  # noqa
    # cosines ≥ 0.8 (the colour scale's end) are dark red: all 4 cells before, only the 2 diagonal cells after
    assert dark_red(left) > 0.3 and dark_red(left) == pytest.approx(2 * dark_red(right), rel=0.1)
    assert [p.name for p in tmp_path.iterdir()] == ["cosine.png"]  # no temporary file left


def test_awd_heatmap_of_a_merge_and_bad_inputs(setting, tmp_path):
    fitted = mm.merge(*setting, "awd_ta", steps=3, lr=1e-3).transform
    assert plotting.plot_awd_cosine(fitted, tmp_path / "merge.png").read_bytes()[:8] == PNG
    with pytest.raises(FileNotFoundError, match="does not exist"):
        plotting.plot_awd_cosine(fitted, tmp_path / "missing" / "cosine.png")
    with pytest.raises(ValueError, match="task_names: 1 names for 3 tasks"):
        plotting.plot_awd_cosine(fitted, tmp_path / "x.png", task_names=["a"])
    with pytest.raises(TypeError, match="awd must be a FittedAWD"):
        plotting.plot_awd_cosine(mm.get_method("awd_ta").transform, tmp_path / "x.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merge.png"]


# ------------------------------------------------------------------------------- the plot extra


def test_without_matplotlib_drawing_names_the_plot_extra(setting, tmp_path, monkeypatch):
    for name in ["matplotlib", *(name for name in sys.modules if name.startswith("matplotlib."))]:
        monkeypatch.setitem(sys.modules, name, None)  # any import of matplotlib now fails
    merged = mm.merge(*setting, "adarank_ta")
    with pytest.raises(ImportError, match=r"plot_masks needs matplotlib: pip install 'mergemodules\[plot\]'"):
        mm.plot_masks(merged, tmp_path / "masks.png")
    with pytest.raises(ImportError, match=r"plot_awd_cosine needs matplotlib: pip install 'mergemodules\[plot\]'"):
        plotting.plot_awd_cosine(_fitted([[1.0, 0.5], [0.5, 1.0]], [[1.0, 0.1], [0.1, 1.0]]), tmp_path / "c.png")
    assert list(tmp_path.iterdir()) == []


def test_importing_the_package_does_not_import_matplotlib():
    code = "import sys, mergemodules, mergemodules.plotting; print('matplotlib' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


# ------------------------------------------------------------------------ deprecated paths (0.1)


def test_deprecated_masks_plot_masks_is_the_plotting_one():
    from mergemodules import masks

    with pytest.warns(DeprecationWarning, match="mergemodules.masks.plot_masks is deprecated"):
        assert masks.plot_masks is plotting.plot_masks
    with pytest.warns(DeprecationWarning):
        from mergemodules.masks import plot_masks  # noqa: F401  (the old import statement still works)
    with pytest.raises(AttributeError, match="has no attribute 'nothing'"):
        masks.nothing  # noqa: B018


def test_deprecated_fitted_awd_plot_cosine_writes_the_same_png(tmp_path):
    fitted = _fitted([[1.0, 0.6], [0.6, 1.0]], [[1.0, 0.1], [0.1, 1.0]])
    with pytest.warns(DeprecationWarning, match="plot_awd_cosine"):
        old = fitted.plot_cosine(tmp_path / "old.png", task_names=["a", "b"])
    new = plotting.plot_awd_cosine(fitted, tmp_path / "new.png", task_names=["a", "b"])
    assert np.array_equal(_image(old), _image(new))


def test_new_paths_do_not_warn(setting, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        mm.plot_masks(mm.merge(*setting, "adarank_ta"), tmp_path / "masks.png")
