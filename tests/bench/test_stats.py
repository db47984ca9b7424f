"""The benchmark's statistics against closed forms and hand-computed cases."""
from __future__ import annotations

import math

import numpy as np
import pytest

from benchmarks.accuracy import stats as S


def test_wilson_matches_the_closed_form():
    # 0 of 10: the interval is [0, z²/(n + z²)]
    lo, hi = S.wilson(0, 10)
    assert lo == 0.0 and hi == pytest.approx(S.Z95 ** 2 / (10 + S.Z95 ** 2))
    # 81 of 263 (a textbook example): [0.2553, 0.3662]
    lo, hi = S.wilson(81, 263)
    assert (lo, hi) == pytest.approx((0.2553, 0.3662), abs=1e-4)
    # symmetric around 1/2, and the interval shrinks as 1/sqrt(n)
    lo, hi = S.wilson(500, 1000)
    assert lo + hi == pytest.approx(1.0) and hi - lo == pytest.approx(2 * 1.96 * math.sqrt(0.25 / 1000), rel=2e-3)
    for bad in ((3, 2), (-1, 5), (0, 0)):
        with pytest.raises(ValueError, match="wilson"):
            S.wilson(*bad)


def test_mean_ci_is_the_mean_of_binomials():
    a = np.array([1] * 80 + [0] * 20, dtype=bool)  # 0.8 of 100
    b = np.array([1] * 150 + [0] * 50, dtype=bool)  # 0.75 of 200
    mean, lo, hi = S.mean_ci({"a": a, "b": b})
    se = math.sqrt(0.8 * 0.2 / 100 + 0.75 * 0.25 / 200) / 2
    assert mean == pytest.approx(0.775) and hi - mean == pytest.approx(S.Z95 * se) and mean - lo == pytest.approx(S.Z95 * se)
    with pytest.raises(ValueError, match=r"correct\['a'\]"):
        S.mean_ci({"a": np.zeros((0,), bool)})


def test_paired_difference_uses_the_same_examples():
    a = np.array([1, 1, 0, 0, 1, 0, 1, 0] * 25, dtype=bool)
    # identical vectors: difference 0 with a zero-width interval (pairing removes the binomial noise)
    assert S.paired_difference({"t": a}, {"t": a}) == (0.0, 0.0, 0.0)
    assert S.compare({"t": a}, {"t": a}) == "≈"
    b = a.copy()
    b[np.flatnonzero(~a)[:40]] = True  # b fixes 40 of a's 100 errors, breaks nothing
    d, lo, hi = S.paired_difference({"t": a}, {"t": b})
    diff = b.astype(float) - a.astype(float)
    assert d == pytest.approx(0.2) and hi - d == pytest.approx(S.Z95 * math.sqrt(diff.var() / 200))
    assert S.compare({"t": a}, {"t": b}) == "<" and S.compare({"t": b}, {"t": a}) == ">"
    with pytest.raises(ValueError, match="different tasks"):
        S.paired_difference({"t": a}, {"u": a})
    with pytest.raises(ValueError, match="'t' has 200 vs 10 examples"):
        S.paired_difference({"t": a}, {"t": a[:10]})


def test_ordering_verdicts():
    rng = np.random.default_rng(0)
    base = rng.random(2000) < 0.5
    better = base | (rng.random(2000) < 0.5)  # clearly better, paired
    same = base.copy()
    rows = {"A": {"t": base}, "B": {"t": better}, "C": {"t": same}}
    assert "holds (every step significant)" in S.ordering(("A", "B"), rows)
    assert "does NOT hold" in S.ordering(("B", "A"), rows)
    line = S.ordering(("A", "C", "B"), rows)
    assert "point estimates only" in line and "A ≈ C (+0.0 [+0.0, +0.0])" in line
    assert "not run: D" in S.ordering(("A", "B", "D"), rows)
    assert "not enough rows" in S.ordering(("A", "D"), rows)


def test_seeds_ordering_uses_a_t_interval_over_the_per_seed_differences():
    means = {"A": [0.60, 0.62, 0.64], "B": [0.62, 0.65, 0.66], "C": [0.55, 0.70, float("nan")]}
    # A -> B: differences 0.02, 0.03, 0.02 (mean 0.02333, sd 0.005774); t(0.975, 2) = 4.3027
    half = 4.302653 * 0.005773503 / math.sqrt(3)
    line = S.seeds_ordering(("A", "B"), means)
    assert line.startswith("A < B: holds (every step significant): A < B ")
    assert f"(+2.3 [{100 * (0.023333 - half):+.1f}, {100 * (0.023333 + half):+.1f}], higher in 3/3 seeds)" in line
    # B -> C on the two seeds that ran both: -0.07 and +0.05, an interval around 0
    line = S.seeds_ordering(("A", "B", "C"), means)
    assert "not shown" in line and "≈ C (-1.0 [" in line and "higher in 1/2 seeds" in line
    assert "fewer than two seeds ran both" in S.seeds_ordering(("A", "C"), {"A": [0.5, 0.5], "C": [0.6, float("nan")]})
    assert "does NOT hold" in S.seeds_ordering(("B", "A"), means)
    assert "not run: D" in S.seeds_ordering(("A", "B", "D"), means)
    assert "not enough rows" in S.seeds_ordering(("A", "D"), {**means, "D": [float("nan")] * 3})


def test_spread_over_seeds():
    s = S.spread([0.70, 0.72, 0.74, float("nan")])
    assert s["n"] == 3 and s["mean"] == pytest.approx(0.72) and s["std"] == pytest.approx(0.02)
    assert (s["min"], s["max"]) == (0.70, 0.74)
    assert S.spread([0.5])["std"] == 0.0 and S.spread([])["n"] == 0


def test_plateau_step():
    decay = [(s, 1.0 + math.exp(-s / 20)) for s in range(0, 301, 25)]
    # the last 100 steps must give at most 5 % of the decrease so far: exp(-(s-100)/20) - exp(-s/20) ≤ 0.05 (1 - exp(-s/20))
    expected = next(s for s, _ in decay if s >= 100 and
                    math.exp(-(s - 100) / 20) - math.exp(-s / 20) <= 0.05 * (1 - math.exp(-s / 20)) + 1e-3 * 2)
    assert S.plateau_step(decay, 100, 0.05, 1e-3) == expected == 175
    linear = [(s, 2.0 - 0.001 * s) for s in range(0, 501, 25)]  # a slow straight line is no plateau
    assert S.plateau_step(linear, 100, 0.05, 1e-4) is None
    rising = [(0, 1.0), (50, 1.1), (100, 1.2)]  # entropy going up: nothing more to gain
    assert S.plateau_step(rising, 100, 0.05, 0.0) == 100
    with pytest.raises(ValueError, match="multiple"):
        S.plateau_step([(0, 1.0), (30, 0.9), (60, 0.8), (90, 0.7), (120, 0.6)], 100, 0.05, 0.0)
    with pytest.raises(ValueError, match="step 0"):
        S.plateau_step([(25, 1.0)], 100, 0.05, 0.0)


def test_plateau_allows_for_the_noise_of_window_means():
    noisy = [(0, 2.0), (50, 1.5), (100, 1.4), (150, 1.38), (200, 1.36)]
    # a drop of 0.1 over the last 100 steps is 20 % of the decrease so far: no plateau without noise...
    assert S.plateau_step(noisy[:3], 100, 0.05, 0.0) is None
    # ...but a plateau when each window mean has a standard error of 0.04 (95 % noise of the difference 0.109)
    assert S.plateau_step(noisy[:3], 100, 0.05, 0.0, se={50: 0.04, 100: 0.04}) is None  # step 100 vs step 0: se 0 at 0
    assert S.plateau_step(noisy, 50, 0.05, 0.0, se={s: 0.04 for s, _ in noisy if s}) == 100
