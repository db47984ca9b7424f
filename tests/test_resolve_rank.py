"""resolve_rank: fractions rounded down as the CART/AdaRank code does, integers, errors (never a silent clamp)."""
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mergemodules import resolve_rank

shapes = st.tuples(st.integers(1, 5000), st.integers(1, 5000))


@given(shape=shapes, fraction=st.floats(min_value=1e-6, max_value=1.0))
def test_fraction_is_int_of_the_product_at_least_one(shape, fraction):
    assert resolve_rank(fraction, shape) == max(1, int(fraction * min(shape)))
    assert resolve_rank(fraction, shape, minimum=0) == int(fraction * min(shape))


def test_floor_where_ceil_differs_on_a_6x4_matrix():
    # r = 4: γ = 0.6 → int(2.4) = 2 (⌈2.4⌉ would keep 3); γ = 0.1 → int(0.4) = 0, CART keeps at least 1
    assert resolve_rank(0.6, (6, 4)) == 2
    assert resolve_rank(0.1, (6, 4)) == 1
    assert resolve_rank(0.1, (6, 4), minimum=0) == 0  # AdaRank's initial mask count may be 0


@given(shape=shapes, data=st.data())
def test_integer_rank_is_kept_as_is(shape, data):
    k = data.draw(st.integers(1, min(shape)))
    assert resolve_rank(k, shape) == k


@given(shape=shapes)
def test_none_and_one_keep_everything(shape):
    assert resolve_rank(None, shape) == resolve_rank(1.0, shape) == min(shape)


def test_cart_default_on_vit_b32_shapes():
    assert resolve_rank(0.08, (2304, 768)) == 61  # int(61.44), as CART's released code
    assert resolve_rank(0.08, (768, 3072)) == 61


@pytest.mark.parametrize("rank", [0, -1, 0.0, -0.5, 1.0001, float("nan"), 769])
def test_out_of_range_is_an_error(rank):
    with pytest.raises(ValueError, match="rank="):
        resolve_rank(rank, (2304, 768))


@pytest.mark.parametrize("rank", ["0.1", True, [1]])
def test_wrong_type_is_an_error(rank):
    with pytest.raises(TypeError, match="rank must be"):
        resolve_rank(rank, (4, 4))
