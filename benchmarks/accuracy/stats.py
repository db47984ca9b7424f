"""The benchmark's statistics: confidence intervals, paired differences, the papers' ordering, seeds, plateaus.

Every interval is a 95 % interval (z = 1.96):

* per task: the **Wilson** score interval of k correct out of n test examples;
* the mean over tasks (the tables' ``mean``): a normal interval with the exact variance of a mean of
  independent binomial proportions, SE = sqrt(Σ_t p_t (1 − p_t) / n_t) / T;
* the difference of two methods' means: **paired** on the same test examples, SE =
  sqrt(Σ_t var(d_t) / n_t) / T with d_t the per-example difference of correctness on task t; a
  difference is called significant when its interval excludes 0;
* the difference of two methods over seeds (one zoo per seed): Student's t interval of the per-seed
  differences of their means, the zoo-to-zoo spread.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
import scipy.stats

Z95 = 1.959963984540054


def wilson(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval (low, high) of ``correct`` successes out of ``n``."""
    if n <= 0 or not 0 <= correct <= n:
        raise ValueError(f"wilson: need 0 <= correct <= n and n > 0, got correct={correct}, n={n}")
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def _checked(correct: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    if not correct:
        raise ValueError("correct: no task")
    out = {}
    for name, c in correct.items():
        c = np.asarray(c, dtype=np.float64)
        if c.ndim != 1 or len(c) == 0:
            raise ValueError(f"correct[{name!r}]: need a non-empty 1-D vector of per-example correctness")
        out[name] = c
    return out


def mean_ci(correct: Mapping[str, np.ndarray], z: float = Z95) -> tuple[float, float, float]:
    """Mean accuracy over tasks and its normal interval (mean, low, high) from per-example correctness."""
    c = _checked(correct)
    acc = [v.mean() for v in c.values()]
    var = sum(v.mean() * (1 - v.mean()) / len(v) for v in c.values())
    mean, se = float(np.mean(acc)), math.sqrt(var) / len(c)
    return mean, mean - z * se, mean + z * se


def paired_difference(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray],
                      z: float = Z95) -> tuple[float, float, float]:
    """Mean over tasks of acc(b) − acc(a), paired on the same examples: (difference, low, high)."""
    a, b = _checked(a), _checked(b)
    if set(a) != set(b):
        raise ValueError(f"paired_difference: different tasks {sorted(a)} vs {sorted(b)}")
    diffs, var = [], 0.0
    for name in a:
        if len(a[name]) != len(b[name]):
            raise ValueError(f"paired_difference: task {name!r} has {len(a[name])} vs {len(b[name])} examples")
        d = b[name] - a[name]
        diffs.append(d.mean())
        var += d.var() / len(d)
    mean, se = float(np.mean(diffs)), math.sqrt(var) / len(a)
    return mean, mean - z * se, mean + z * se


def compare(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> str:
    """``'<'`` (b better, interval above 0), ``'>'`` (a better, below 0) or ``'≈'`` (interval contains 0)."""
    _, lo, hi = paired_difference(a, b)
    return _sign(lo, hi)


def _sign(lo: float, hi: float) -> str:
    return "<" if lo > 0 else ">" if hi < 0 else "≈"


def ordering(chain: Sequence[str], correct: Mapping[str, Mapping[str, np.ndarray]]) -> str:
    """One line: does ``chain[0] < chain[1] < …`` hold on the test data, given the paired 95 % intervals?

    Rows absent from ``correct`` are left out of the chain (said in the line).
    """
    present = [r for r in chain if r in correct]
    if len(present) < 2:
        return _not_enough(chain, present)
    steps = [(y, *paired_difference(correct[x], correct[y])) for x, y in zip(present, present[1:])]
    return _chain_line(chain, present, steps)


def seeds_ordering(chain: Sequence[str], means: Mapping[str, Sequence[float]]) -> str:
    """One line: does ``chain[0] < chain[1] < …`` hold over seeds?

    ``means[label][i]`` is the row's mean accuracy on seed i (NaN where it did not run). Each step's difference
    is paired by seed; its 95 % interval is Student's t over the seeds, i.e. it measures the zoo-to-zoo spread
    (data split, fine-tuning and adaptation seed), not the test-set noise of one zoo.
    """
    present = [r for r in chain if r in means and any(m == m for m in means[r])]
    if len(present) < 2:
        return _not_enough(chain, present)
    steps, counts = [], []
    for x, y in zip(present, present[1:]):
        d = np.asarray([b - a for a, b in zip(means[x], means[y]) if a == a and b == b], dtype=np.float64)
        if len(d) < 2:
            return f"{' < '.join(present)}: fewer than two seeds ran both {x} and {y}"
        half = float(scipy.stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d)))
        steps.append((y, float(d.mean()), float(d.mean()) - half, float(d.mean()) + half))
        counts.append(f", higher in {int((d > 0).sum())}/{len(d)} seeds")
    return _chain_line(chain, present, steps, counts)


def _not_enough(chain: Sequence[str], present: Sequence[str]) -> str:
    return f"{' < '.join(chain)}: not enough rows run ({', '.join(present) or 'none'})"


def _chain_line(chain: Sequence[str], present: Sequence[str], steps: Sequence[tuple[str, float, float, float]],
                notes: Sequence[str] = ()) -> str:
    """The verdict on a chain from its steps (next row, difference, low, high), each step's numbers after it."""
    signs = [_sign(lo, hi) for _, _, lo, hi in steps]
    if all(s == "<" for s in signs):
        verdict = "holds (every step significant)"
    elif ">" in signs:
        verdict = "does NOT hold (a step is significantly reversed)"
    elif all(d >= 0 for _, d, _, _ in steps):
        verdict = "holds in the point estimates only (some steps within the interval)"
    else:
        verdict = "not shown (some steps reversed within the interval)"
    notes = list(notes) or [""] * len(steps)
    parts = "".join(f" {sign} {y} ({100 * d:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]{note})"
                    for sign, (y, d, lo, hi), note in zip(signs, steps, notes))
    absent = [r for r in chain if r not in present]
    line = f"{' < '.join(present)}: {verdict}: {present[0]}{parts}"
    return line + (f"; not run: {', '.join(absent)}" if absent else "")


def spread(values: Sequence[float]) -> dict[str, float]:
    """Mean, sample standard deviation, min and max of one number over seeds."""
    v = np.asarray([x for x in values if x == x], dtype=np.float64)  # NaN (a row that did not run) left out
    if len(v) == 0:
        return {"mean": float("nan"), "std": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0}
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
            "min": float(v.min()), "max": float(v.max()), "n": int(len(v))}


def plateau_step(curve: Sequence[tuple[int, float]], window: int, rel: float, tol: float,
                 se: Mapping[int, float] | None = None) -> int | None:
    """First tracked step s ≥ window at which the entropy has plateaued, or None.

    Plateau at s: E(s − window) − E(s) ≤ rel · max(E(0) − E(s), 0) + tol · E(0) + z · sqrt(se(s − window)² + se(s)²),
    i.e. the last ``window`` steps gave at most a fraction ``rel`` of the decrease obtained so far, beyond a
    floor ``tol`` of the initial entropy and the 95 % noise of the difference (``se``: step → standard error
    of that point, 0 where absent). ``curve`` is [(step, entropy)] from step 0, tracked every k steps with
    ``window`` a multiple of k.
    """
    if window <= 0 or rel < 0 or tol < 0:
        raise ValueError(f"plateau_step: need window > 0, rel >= 0, tol >= 0; got {window}, {rel}, {tol}")
    if not curve or curve[0][0] != 0:
        raise ValueError("plateau_step: the curve must start at step 0")
    at, se = dict(curve), dict(se or {})
    e0 = curve[0][1]
    for step, e in curve:
        if step < window:
            continue
        if step - window not in at:
            raise ValueError(f"plateau_step: no tracked value at step {step - window} (window {window} is not "
                             "a multiple of the tracking interval)")
        noise = Z95 * math.hypot(se.get(step - window, 0.0), se.get(step, 0.0))
        if at[step - window] - e <= rel * max(e0 - e, 0.0) + tol * e0 + noise:
            return step
    return None
