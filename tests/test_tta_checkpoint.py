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
