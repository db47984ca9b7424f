"""resolve_rank: fractions, integers and errors (never a silent clamp)."""
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mergemodules import resolve_rank

shapes = st.tuples(st.integers(1, 5000), st.integers(1, 5000))


@given(shape=shapes, fraction=st.floats(min_value=1e-6, max_value=1.0))
def test_fraction_is_rounded_up_and_within_range(shape, fraction):
    k = resolve_rank(fraction, shape)
    assert 1 <= k <= min(shape)
    assert k >= fraction * min(shape) - 1e-6 and k - 1 < fraction * min(shape) + 1e-6


@given(shape=shapes, data=st.data())
def test_integer_rank_is_kept_as_is(shape, data):
    k = data.draw(st.integers(1, min(shape)))
    assert resolve_rank(k, shape) == k


@given(shape=shapes)
def test_none_and_one_keep_everything(shape):
    assert resolve_rank(None, shape) == resolve_rank(1.0, shape) == min(shape)


def test_cart_default_on_vit_b32_shapes():
    assert resolve_rank(0.08, (2304, 768)) == math.ceil(0.08 * 768) == 62


@pytest.mark.parametrize("rank", [0, -1, 0.0, -0.5, 1.0001, float("nan"), 769])
def test_out_of_range_is_an_error(rank):
    with pytest.raises(ValueError, match="rank="):
        resolve_rank(rank, (2304, 768))


@pytest.mark.parametrize("rank", ["0.1", True, [1]])
def test_wrong_type_is_an_error(rank):
    with pytest.raises(TypeError, match="rank must be"):
        resolve_rank(rank, (4, 4))
