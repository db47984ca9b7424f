"""Convolution kernels merged as matrices in a timm ConvNet (test_resnet, random init): the Conv2d kind end to end."""
import copy
import fnmatch

import pytest
import torch
from helpers import assert_close_to_scale, perturbed
from torch import nn

import mergemodules as mm
from mergemodules.decompose import resolve_rank
from mergemodules.layers import MergedConv2d
from mergemodules.layouts import Layout
from mergemodules.streaming import merge_to_state_dict
from mergemodules.targets import plan

CONVS = {"*": "out_in_kernel"}  # every parameter of 3 or more dimensions, here the 15 Conv2d kernels


def resnet(dtype=torch.float32):
    import timm

    torch.manual_seed(0)
    return timm.create_model("test_resnet", pretrained=False, num_classes=5).to(dtype).eval()


def zoo(tasks=3, dtype=torch.float32):
    base = resnet(dtype)
    return base, [perturbed(base, seed=s) for s in range(1, tasks + 1)]


def conv_names(model):
    return [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def inputs(dtype=torch.float32):
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5)).to(dtype)


def test_conv_kernels_are_dense_by_default_and_matrices_when_named():
    model = resnet()
    default = {e.name: e.layout for e in plan(model)}
    named = {e.name: e for e in plan(model, matrices=CONVS)}
    assert len(conv_names(model)) == 15 and all(default[n] is None for n in conv_names(model))
    assert all(named[n].layout is Layout.OUT_IN_KERNEL and named[n].matrix_rule == "pattern" for n in conv_names(model))
    assert default["fc.weight"] == named["fc.weight"].layout == "out_in"
    assert named["bn1.weight"].layout is None and named["layer1.0.conv1.weight"].is_matrix


def test_task_arithmetic_with_conv_matrices_equals_the_reference_merge():
    base, tuned = zoo()
    merged = mm.merge(base, tuned, "task_arithmetic", matrices=CONVS).eval()
    assert sum(isinstance(m, MergedConv2d) for m in merged.modules()) == 15
    reference = copy.deepcopy(base)
    tuned_states = [t.state_dict() for t in tuned]
    reference.load_state_dict({k: v + 0.3 * sum(s[k] - v for s in tuned_states) if v.is_floating_point() else v
                               for k, v in base.state_dict().items()})
    x = inputs()
    with torch.no_grad():
        expected = reference(x)
        assert_close_to_scale(merged(x), expected)
        assert_close_to_scale(mm.merge(base, tuned, "task_arithmetic").eval()(x), expected)  # dense kernels: same


def test_cart_low_rank_fuses_exactly_with_the_original_keys():
    base, tuned = zoo()
    merged = mm.merge(base, tuned, "cart", rank=0.25, matrices=CONVS).eval()
    weights = merged.merged_weights()
    conv = weights["layer3.0.conv2.weight"]  # (48, 48, 3, 3): rank int(0.25 · min(48, 432)) = 12
    assert conv.layout is Layout.OUT_IN_KERNEL and conv.rank == 12 and conv.U.shape == (3, 48, 12)
    (coef,) = merged.parameters()  # CART's one global λ
    with torch.no_grad():
        coef.fill_(0.8)
    x = inputs()
    with torch.no_grad():
        expected, fused = merged(x), merged.fuse().eval()
        assert_close_to_scale(fused(x), expected)
    assert list(fused.state_dict()) == list(base.state_dict())
    assert [type(m) for m in fused.modules()] == [type(m) for m in base.modules()]
    # the kernel is θ_avg + 0.8 Σ_t (top-12 SVD of the centered (48, 432) task matrix), computed here
    name = "layer3.0.conv2.weight"
    values = torch.stack([dict(t.named_parameters())[name].detach().double().reshape(48, -1) for t in tuned])
    average = values.mean(0)
    kernel = average.clone()
    for value in values:
        u, s, vh = torch.linalg.svd(value - average, full_matrices=False)
        kernel += 0.8 * (u[:, :12] * s[:12]) @ vh[:12]
    torch.testing.assert_close(fused.get_parameter(name).double(), kernel.reshape(48, 48, 3, 3), rtol=0, atol=2e-6)


def test_cart_at_full_rank_is_weight_averaging():
    base, tuned = zoo(dtype=torch.float64)
    cart = mm.merge(base, tuned, "cart", rank=1.0, matrices=CONVS).fuse().state_dict()
    average = mm.merge(base, tuned, "weight_averaging").fuse().state_dict()
    assert list(cart) == list(average)
    for name in conv_names(base):
        torch.testing.assert_close(cart[name], average[name], rtol=0, atol=1e-12)


def test_mask_and_lambda_gradients_through_conv_matrices():
    base, tuned = zoo(tasks=2, dtype=torch.float64)
    x = inputs(torch.float64)
    grads = {}
    for path in ("low_rank", "materialize"):
        merged = mm.merge(base, tuned, "adarank_cart", matrices=CONVS).eval()
        for weight in merged.merged_weights().values():
            weight.path = path
        merged(x).square().sum().backward()
        grads[path] = {n: p.grad.clone() for n, p in merged.named_parameters()}
    conv = merged.merged_weights()["layer1.0.conv1.weight"]
    assert conv.mask_logits is not None and conv.rank == 32  # full rank: min(32, 32·9)
    assert grads["low_rank"].keys() == grads["materialize"].keys()
    for name, grad in grads["low_rank"].items():
        torch.testing.assert_close(grad, grads["materialize"][name], rtol=1e-7, atol=1e-9)
    mask_grads = [g for n, g in grads["low_rank"].items() if n.endswith("mask_logits")]
    assert len(mask_grads) == 16 and all(g.abs().sum() > 0 for g in mask_grads)  # 15 kernels and fc


def test_finite_difference_of_a_conv_lambda():
    base, tuned = zoo(tasks=2, dtype=torch.float64)
    merged = mm.merge(base, tuned, "adamerging_layerwise", matrices=CONVS).eval()
    coef = merged.merged_weights()["layer2.0.conv1.weight"].coef
    x = inputs(torch.float64)
    merged(x).square().sum().backward()
    eps, numeric = 1e-6, []
    with torch.no_grad():
        for t in range(2):
            coef[t] += eps
            up = merged(x).square().sum()
            coef[t] -= 2 * eps
            numeric.append((up - merged(x).square().sum()) / (2 * eps))
            coef[t] += eps
    torch.testing.assert_close(coef.grad, torch.stack(numeric), rtol=1e-5, atol=1e-8)


def test_merge_state_and_streaming_keep_the_conv_layout(tmp_path):
    base, tuned = zoo(tasks=2)
    merged = mm.merge(base, tuned, "cart", rank=0.5, matrices=CONVS).eval()
    mm.save_merge_state(merged, tmp_path / "state.safetensors")
    loaded = mm.load_merge_state(resnet(), tmp_path / "state.safetensors").eval()
    assert sum(isinstance(m, MergedConv2d) for m in loaded.modules()) == 15
    x = inputs()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), merged(x), rtol=0, atol=0)
    streamed = merge_to_state_dict(base, tuned, "cart", rank=0.5, matrices=CONVS)
    fused = merged.fuse().state_dict()
    for name in conv_names(base):
        torch.testing.assert_close(streamed[name], fused[name], rtol=0, atol=1e-6)


def test_conv_subclass_with_its_own_forward_keeps_it():
    from timm.layers import Conv2dSame

    torch.manual_seed(0)
    base = nn.Sequential(Conv2dSame(3, 4, 3, stride=2), nn.Conv2d(4, 2, 1)).eval()
    tuned = [perturbed(base, seed=s) for s in (1, 2)]
    merged = mm.merge(base, tuned, "cart", rank=1.0, matrices=CONVS).eval()
    assert type(merged.model[0]).__mro__[1] is Conv2dSame and isinstance(merged.model[1], MergedConv2d)
    x = inputs()[:, :, :7, :9]  # odd sizes: Conv2dSame pads asymmetrically
    average = copy.deepcopy(base)
    average.load_state_dict({k: (tuned[0].state_dict()[k] + tuned[1].state_dict()[k]) / 2 for k in base.state_dict()})
    with torch.no_grad():
        assert_close_to_scale(merged(x), average(x))
        fused = merged.fuse()
    assert type(fused[0]) is Conv2dSame and type(fused[1]) is nn.Conv2d


def test_inspect_counts_conv_ranks_on_the_kernel_matrix():
    from mergemodules.cli import memory_plan

    rows = {r["name"]: r for r in memory_plan(plan(resnet(), matrices=CONVS), mm.get_method("cart"), 3, 4)}
    row = rows["layer4.0.conv1.weight"]  # (96, 192, 3, 3): the (96, 1728) matrix
    k = resolve_rank(0.08, (96, 1728))
    assert row["merged"] == "matrix, low-rank" and row["rank"] == str(k) == "7"
    assert row["bytes"] == (96 * 192 * 9 + 3 * k * (96 + 1728 + 1)) * 4


@pytest.mark.parametrize("pattern", ["layer1.*", "*conv1.weight"])
def test_a_pattern_names_some_kernels(pattern):
    entries = {e.name: e for e in plan(resnet(), matrices={pattern: "out_in_kernel"})}
    chosen = sorted(n for n, e in entries.items() if e.layout is Layout.OUT_IN_KERNEL)
    assert chosen == sorted(n for n in conv_names(resnet()) if fnmatch.fnmatchcase(n, pattern))


@pytest.mark.parametrize("shape, message", [
    ("wide", r"merge-state metadata 'tensors'\['0.weight'\]\['shape'\]: expected a list of positive integers, got 'wide'"),
    ([4, 3, 3, 2], r"tensor '0.weight': a \(4, 3, 3, 2\) parameter in layout out_in_kernel needs an \(4, 18\) matrix"),
    (None, r"tensor '0.weight': shape: the out_in_kernel layout needs the parameter's shape"),
])
def test_merge_state_with_a_bad_kernel_shape_is_an_error(tmp_path, shape, message):
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    base = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten())
    path = tmp_path / "state.safetensors"
    mm.save_merge_state(mm.merge(base, [perturbed(base, seed=1)], "cart", matrices=CONVS), path)
    with safe_open(str(path), framework="pt") as f:
        header = json.loads(f.metadata()[mm.merge_state.FORMAT])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    assert header["tensors"]["0.weight"]["layout"] == "out_in_kernel" and header["tensors"]["0.weight"]["shape"] == [4, 3, 3, 3]
    header["tensors"]["0.weight"]["shape"] = shape
    if shape is None:
        del header["tensors"]["0.weight"]["shape"]
    save_file(tensors, str(path), metadata={mm.merge_state.FORMAT: json.dumps(header)})
    with pytest.raises(ValueError, match=message):
        mm.load_merge_state(base, path)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("path", ["low_rank", "materialize"])
def test_conv_matrices_on_a_gpu_equal_the_cpu(path):
    base, tuned = zoo(tasks=2)
    merged = mm.merge(base, tuned, "adarank_cart", matrices=CONVS).eval()
    for weight in merged.merged_weights().values():
        weight.path = path
    x = inputs()
    with torch.no_grad():
        expected = merged(x)
        merged.to("cuda")
        assert_close_to_scale(merged(x.cuda()).cpu(), expected)
        fused = merged.fuse()
    assert {p.device.type for p in fused.parameters()} == {"cuda"}
    with torch.no_grad():
        assert_close_to_scale(fused(x.cuda()).cpu(), expected)


@pytest.mark.parametrize("method", ["tsv", "ties", "awd_ta", "adarank_ta", "cart_pp"])
def test_every_method_fuses_conv_matrices_exactly(method):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, stride=2), nn.Flatten()).eval()
    tuned = [perturbed(base, seed=s) for s in (1, 2, 3)]
    merged = mm.merge(base, tuned, method, matrices=CONVS).eval()
    assert [type(m) for m in merged.model] == [MergedConv2d, nn.ReLU, MergedConv2d, nn.Flatten]
    assert all(w.layout is Layout.OUT_IN_KERNEL for w in merged.merged_weights().values())
    with torch.no_grad():
        for p in merged.parameters():
            p.add_(0.1)
        x = inputs()[:, :, :9, :9]
        assert_close_to_scale(merged.fuse()(x), merged(x))
