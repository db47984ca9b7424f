"""Static methods against each other (the references from the papers' equations are in test_parity.py)."""
import pytest
import torch
from helpers import perturbed
from torch import nn

import mergemodules as mm

def small_zoo(tasks: int = 3, dtype=torch.float64):
    torch.manual_seed(0)
    pretrained = nn.Sequential(nn.Linear(12, 10), nn.LayerNorm(10), nn.Linear(10, 6)).to(dtype)
    finetuned = [perturbed(pretrained, seed=s, scale=0.1) for s in range(1, tasks + 1)]
    return pretrained, finetuned


def fused(pretrained, finetuned, method, **options):
    return {k: v.detach() for k, v in mm.merge(pretrained, finetuned, method, **options).fuse().state_dict().items()}


def states(pretrained, finetuned):
    return pretrained.state_dict(), [f.state_dict() for f in finetuned]


def assert_states_close(a, b, atol=1e-10):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


def test_weight_averaging_is_the_mean():
    pretrained, finetuned = small_zoo()
    _, tuned = states(pretrained, finetuned)
    expected = {k: sum(s[k] for s in tuned) / 3 for k in tuned[0]}
    assert_states_close(fused(pretrained, finetuned, "weight_averaging"), expected)


def test_task_arithmetic_is_pretrained_plus_scaled_sum():
    pretrained, finetuned = small_zoo()
    base, tuned = states(pretrained, finetuned)
    expected = {k: base[k] + 0.4 * sum(s[k] - base[k] for s in tuned) for k in base}
    assert_states_close(fused(pretrained, finetuned, "task_arithmetic", scaling=0.4), expected)


def test_task_arithmetic_with_one_over_t_equals_weight_averaging():
    pretrained, finetuned = small_zoo(tasks=4)
    assert_states_close(fused(pretrained, finetuned, "task_arithmetic", scaling=0.25), fused(pretrained, finetuned, "weight_averaging"))


def test_task_arithmetic_with_one_task_reproduces_it():
    pretrained, (tuned,) = small_zoo(tasks=1)
    assert_states_close(fused(pretrained, [tuned], "task_arithmetic", scaling=1.0), tuned.state_dict())


@pytest.mark.parametrize("scaling", [1.0, 0.37])
def test_cart_at_full_rank_equals_weight_averaging(scaling):
    # Σ_t (θ_t − θ_avg) = 0, so any λ gives θ_avg at full rank
    pretrained, finetuned = small_zoo()
    assert_states_close(fused(pretrained, finetuned, "cart", rank=None, scaling=scaling), fused(pretrained, finetuned, "weight_averaging"))


def test_cart_with_no_components_equals_weight_averaging():
    pretrained, finetuned = small_zoo()
    wa = fused(pretrained, finetuned, "weight_averaging")
    assert_states_close(fused(pretrained, finetuned, "cart", scaling=0.0), wa, atol=0)
    merged = mm.merge(pretrained, finetuned, "cart", rank=1)
    for name, weight in merged.merged_weights().items():  # rank 0 at the layer level: B alone
        assert torch.equal(mm.MergedWeight(weight.base)(), wa[name])


def test_task_vector_svd_at_full_rank_equals_task_arithmetic():
    pretrained, finetuned = small_zoo()
    assert_states_close(fused(pretrained, finetuned, "task_vector_svd", rank=None), fused(pretrained, finetuned, "task_arithmetic"))


def test_all_ones_masks_at_full_rank_equal_task_arithmetic():
    pretrained, finetuned = small_zoo()
    merged = mm.merge(pretrained, finetuned, "adarank_ta")
    assert all(bool((w.masks() == 1).all()) for w in merged.merged_weights().values())
    assert_states_close({k: v.detach() for k, v in merged.fuse().state_dict().items()}, fused(pretrained, finetuned, "task_arithmetic"))


def test_ties_rejects_bad_density():
    pretrained, finetuned = small_zoo()
    with pytest.raises(ValueError, match="density"):
        mm.merge(pretrained, finetuned, "ties", density=0.0)


def test_methods_are_declarative_settings():
    cart = mm.get_method("cart")
    assert (cart.base, cart.matrices, cart.dense, cart.rank, cart.scaling) == ("average", "svd", False, 0.08, 1.0)
    assert mm.get_method("cart", rank=0.2).rank == 0.2 and cart.rank == 0.08
    ties = mm.get_method("ties", density=0.1)
    assert ties.transform.density == 0.1
    with pytest.raises(ValueError, match="coefficients"):
        mm.Method("broken", coefficients="per-neuron")
    with pytest.raises(ValueError, match="masks"):
        mm.Method("broken", masks=True)
