"""MergedConv2d: a convolution whose (out, in·kh·kw) kernel matrix is merged, with a low-rank forward."""
import pytest
import torch
from torch import nn

from mergemodules.layers import MergedConv2d, MergedLinear, MergedTensor, MergedWeight
from mergemodules.layouts import Layout

T, K = 3, 2
SETTINGS = [
    dict(stride=2, padding=1),
    dict(padding=2, dilation=2),
    dict(padding="same"),
    dict(padding=1, padding_mode="reflect"),
    dict(padding=1, padding_mode="circular", bias=False),
    dict(kernel_size=(3, 1), stride=(2, 1), padding=(1, 0)),
]


def conv2d(**settings):
    torch.manual_seed(0)
    return nn.Conv2d(**{"in_channels": 4, "out_channels": 6, "kernel_size": 3, **settings}).double()


def merged(conv, masks=False):
    """``conv`` merged with T random rank-K task terms (and dense bias terms), float64."""
    gen = torch.Generator().manual_seed(1)
    out, inp = Layout.OUT_IN_KERNEL.matrix_shape(conv.weight.shape)
    U, V = torch.randn(T, out, K, generator=gen), torch.randn(T, inp, K, generator=gen)
    S = torch.rand(T, K, generator=gen) + 0.5
    coef = nn.Parameter(torch.tensor([0.3, 0.7, -0.2], dtype=torch.float64))
    logits = nn.Parameter(torch.tensor([[1.0, -1.0], [2.0, 0.5], [-0.3, 3.0]])) if masks else None
    weight = MergedWeight(conv.weight.detach(), U=U.double(), S=S.double(), V=V.double(), coef=coef,
                          mask_logits=logits, layout="out_in_kernel")
    bias = None if conv.bias is None else MergedTensor(conv.bias.detach(), torch.randn(T, out, generator=gen).double(), coef)
    return MergedConv2d(weight, bias, original=conv)


def expected_conv(conv, layer):
    """A plain copy of ``conv`` holding B + Σ_t λ_t U_t diag(m_t σ_t) V_tᵀ, computed here from the factors."""
    w = layer.merged_weight
    scales = w.coef.detach()[:, None] * w.S
    if w.mask_logits is not None:
        scales = scales * (w.mask_logits.detach() >= 0)
    matrix = w.base + torch.einsum("tok,tk,tik->oi", w.U, scales, w.V)
    reference = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                          conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode).double()
    with torch.no_grad():
        reference.weight.copy_(matrix.reshape(conv.weight.shape))
        if conv.bias is not None:
            reference.bias.copy_(layer.merged_bias.base + w.coef.detach() @ layer.merged_bias.deltas)
    return reference


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
@pytest.mark.parametrize("path", ["low_rank", "materialize"])
def test_both_paths_equal_the_plain_convolution_with_the_merged_kernel(settings, path):
    conv = conv2d(**settings)
    layer = merged(conv, masks=True)
    layer.merged_weight.path = path
    x = torch.randn(2, 4, 9, 8, dtype=torch.float64)
    expected = expected_conv(conv, layer)(x)
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-11)
    torch.testing.assert_close(layer.fuse()(x), expected, rtol=0, atol=1e-11)
    torch.testing.assert_close(layer(x[0]), expected[0], rtol=0, atol=1e-11)  # unbatched input


@pytest.mark.parametrize("settings", SETTINGS[:2], ids=["stride", "dilation"])
def test_low_rank_path_has_the_gradients_of_the_materialised_path(settings):
    conv = conv2d(**settings)
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64)
    grads = []
    for path in ("low_rank", "materialize"):
        layer = merged(conv, masks=True)
        layer.merged_weight.path = path
        (layer(x) ** 2).sum().backward()
        grads.append([layer.merged_weight.coef.grad, layer.merged_weight.mask_logits.grad])
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-10, atol=0)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-10, atol=1e-12)
    assert grads[0][1].abs().min() > 0  # the straight-through estimator reaches every component


def test_lambda_gradient_matches_finite_differences():
    conv = conv2d(stride=2, padding=1)
    layer = merged(conv)
    layer.merged_weight.path = "low_rank"
    x = torch.randn(1, 4, 6, 6, dtype=torch.float64)
    (layer(x) ** 2).sum().backward()
    coef, eps = layer.merged_weight.coef, 1e-6
    numeric = []
    with torch.no_grad():
        for t in range(T):
            coef[t] += eps
            up = (layer(x) ** 2).sum()
            coef[t] -= 2 * eps
            down = (layer(x) ** 2).sum()
            coef[t] += eps
            numeric.append((up - down) / (2 * eps))
    torch.testing.assert_close(coef.grad, torch.stack(numeric), rtol=1e-6, atol=1e-8)


def test_grouped_convolution_materialises_the_kernel():
    conv = conv2d(padding=1, groups=2)
    layer = merged(conv)
    assert layer.merged_weight.base.shape == (6, 2 * 3 * 3)  # (out, in/groups·kh·kw)
    layer.merged_weight.path = "low_rank"  # not possible across groups: the dense kernel is used
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(layer(x), expected_conv(conv, layer)(x), rtol=0, atol=1e-11)


def test_auto_path_materialises_only_for_many_output_pixels(monkeypatch):
    conv = conv2d(padding=1)  # out·in·9 / (out + in·9) = 216 / 42 ≈ 5.1 output pixels
    layer = merged(conv)
    computed = []
    compute = MergedWeight.compute
    monkeypatch.setattr(MergedWeight, "compute", lambda self: computed.append(1) or compute(self))
    layer(torch.randn(1, 4, 2, 2, dtype=torch.float64))
    assert computed == []
    layer(torch.randn(1, 4, 3, 3, dtype=torch.float64))
    assert computed == [1]


def test_fuse_returns_the_plain_layer_with_its_settings_and_keys():
    conv = conv2d(stride=2, padding=1, padding_mode="reflect")
    layer = merged(conv).eval()
    fused = layer.fuse()
    assert type(fused) is nn.Conv2d and not fused.training
    assert (fused.stride, fused.padding, fused.padding_mode) == ((2, 2), (1, 1), "reflect")
    assert list(fused.state_dict()) == list(conv.state_dict()) == ["weight", "bias"]
    torch.testing.assert_close(fused.weight, layer.weight, rtol=0, atol=0)
    assert layer.weight.shape == conv.weight.shape and layer.stride == (2, 2) and layer.in_channels == 4
    assert "tasks=3, svd rank=2" in repr(layer)


def test_bad_inputs_name_the_argument():
    conv = conv2d()
    weight = MergedWeight(conv.weight.detach(), layout="out_in_kernel")
    with pytest.raises(ValueError, match="weight: MergedConv2d needs a weight in layout out_in_kernel, got out_in"):
        MergedConv2d(MergedWeight(torch.randn(6, 36)), None, original=conv)
    with pytest.raises(TypeError, match="original: MergedConv2d replaces an Conv2d, got Linear"):
        MergedConv2d(weight, None, original=nn.Linear(36, 6))
    with pytest.raises(ValueError, match=r"weight: shape \(6, 4, 3, 3\) differs from the original layer's \(6, 4, 5, 5\)"):
        MergedConv2d(weight, None, original=nn.Conv2d(4, 6, 5))
    with pytest.raises(ValueError, match=r"bias: expected shape \(6,\), got \(5,\)"):
        MergedConv2d(weight, MergedTensor(torch.zeros(5)), original=conv)
    with pytest.raises(ValueError, match="weight: MergedLinear needs a weight in layout out_in, got out_in_kernel"):
        MergedLinear(weight)
    with pytest.raises(ValueError, match=r"base: a merged weight in layout out_in_kernel cannot have shape \(6, 36\)"):
        MergedWeight(torch.randn(6, 36), layout="out_in_kernel")
