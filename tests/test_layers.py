import pytest
import torch
import torch.nn.functional as F

from wasearch.layers import Conv2d, Linear, WinogradConv2d


@pytest.mark.parametrize("tile", [2, 4, 6])
def test_static_float_layer_equals_conv2d(tile):
    torch.manual_seed(tile)
    layer = WinogradConv2d(6, 5, tile=tile, mode="static", bias=True)
    x = torch.randn(3, 6, 10, 9)
    expected = F.conv2d(x, layer.weight, layer.bias, padding=1)
    torch.testing.assert_close(layer(x), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", ["static", "flex"])
@pytest.mark.parametrize("bits", [None, 8])
@pytest.mark.parametrize("tile", [2, 4, 6])
def test_gradients_reach_weights_and_only_flex_transforms(mode, bits, tile):
    torch.manual_seed(0)
    layer = WinogradConv2d(4, 3, tile=tile, mode=mode, bits=bits)
    y = layer(torch.randn(2, 4, 12, 12))
    assert torch.isfinite(y).all()
    y.square().mean().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    params = dict(layer.named_parameters())
    if mode == "flex":
        for name in ("A_t", "G", "B_t"):
            assert params[name].grad is not None and torch.isfinite(params[name].grad).all()
            assert params[name].grad.abs().sum() > 0
    else:
        assert set(params) == {"weight"}
        assert not any(t.requires_grad for t in (layer.A_t, layer.G, layer.B_t))


def test_static_transforms_unchanged_and_flex_transforms_learn():
    torch.manual_seed(0)
    static = WinogradConv2d(4, 4, tile=4, mode="static", bits=8)
    flex = WinogradConv2d(4, 4, tile=4, mode="flex", bits=8)
    before = [t.clone() for t in (static.A_t, static.G, static.B_t)]
    flex_before = [t.detach().clone() for t in (flex.A_t, flex.G, flex.B_t)]
    opt = torch.optim.Adam(list(static.parameters()) + list(flex.parameters()), lr=1e-2)
    for _ in range(3):
        x = torch.randn(2, 4, 8, 8)
        loss = static(x).square().mean() + flex(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    for b, t in zip(before, (static.A_t, static.G, static.B_t), strict=True):
        assert torch.equal(b, t)
    assert any(
        not torch.equal(b, t.detach())
        for b, t in zip(flex_before, (flex.A_t, flex.G, flex.B_t), strict=True)
    )


def test_quantized_layer_is_close_to_float_at_16_bits_and_lies_on_grid():
    torch.manual_seed(0)
    layer = WinogradConv2d(8, 8, tile=2, mode="static", bits=16)
    x = torch.randn(2, 8, 8, 8)
    ref = F.conv2d(x, layer.weight, padding=1)
    y = layer(x)
    assert ((y - ref).norm() / ref.norm()) < 1e-3
    scale = layer.q_output.max_val.abs().max() / (2**15 - 1)
    levels = y.detach() / scale
    torch.testing.assert_close(levels, levels.round(), rtol=0, atol=1e-2)


def test_weight_shape_matches_direct_conv_state_dict():
    direct = Conv2d(4, 6, 3, 1, 1, bits=8)
    wa = WinogradConv2d(4, 6, tile=4, mode="flex", bits=8)
    assert direct.weight.shape == wa.weight.shape == (6, 4, 3, 3)


def test_tap_granularity_keeps_a_range_per_position():
    layer = WinogradConv2d(3, 3, tile=4, mode="static", bits=8, granularity="tap")
    layer(torch.randn(1, 3, 8, 8))
    assert layer.q_input_wd.min_val.shape == (36,)
    assert layer.q_product.max_val.shape == (36,)


@pytest.mark.parametrize("bits", [None, 4, 8])
def test_quantized_direct_conv_and_linear(bits):
    torch.manual_seed(0)
    conv = Conv2d(3, 4, 3, stride=2, padding=1, bits=bits)
    x = torch.randn(2, 3, 9, 9, requires_grad=True)
    y = conv(x)
    assert y.shape == (2, 4, 5, 5)
    ref = F.conv2d(x, conv.weight, stride=2, padding=1)
    err = ((y - ref).norm() / ref.norm()).item()
    assert err == 0 if bits is None else 0 < err < (0.3 if bits == 4 else 0.05)
    y.sum().backward()
    assert conv.weight.grad is not None and x.grad is not None
    lin = Linear(5, 3, bits=bits)
    out = lin(torch.randn(4, 5))
    out.sum().backward()
    assert lin.weight.grad is not None and out.shape == (4, 3)


def test_bad_arguments():
    with pytest.raises(ValueError, match="mode"):
        WinogradConv2d(1, 1, mode="dynamic")
    with pytest.raises(ValueError, match="tile"):
        WinogradConv2d(1, 1, tile=0)
    with pytest.raises(ValueError, match="bits"):
        WinogradConv2d(1, 1, bits=1)


@pytest.mark.parametrize("padding", [0, 1, 2, (0, 1), "same", "valid"])
@pytest.mark.parametrize("size", [(28, 30), (33, 5), (3, 4)])
def test_from_conv_matches_the_conv_at_any_padding_and_size(padding, size):
    # Any zero padding, and inputs that are no multiple of the tile or smaller than it: the
    # partial tiles are padded and cropped. In float64 the static transforms are rebuilt from
    # their exact rationals after .double(), so the error is rounding only.
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(5, 7, 3, padding=padding, bias=True).double()
    layer = WinogradConv2d.from_conv(conv, tile=6)
    assert layer.A_t.dtype == torch.float64 and torch.equal(layer.bias, conv.bias)
    x = torch.randn(2, 5, *size, dtype=torch.float64)
    with torch.no_grad():
        expected = conv(x)
        got = layer(x)
    assert got.shape == expected.shape
    assert float((got - expected).abs().max() / expected.abs().max()) < 1e-12


def test_from_conv_refuses_what_winograd_cannot_compute():
    with pytest.raises(ValueError, match="needs a 3x3 kernel, stride 1"):
        WinogradConv2d.from_conv(torch.nn.Conv2d(4, 4, 3, stride=2), tile=4)
    quantized = Conv2d.from_conv(torch.nn.Conv2d(4, 6, 1, stride=2, groups=2), bits=8)
    assert quantized.stride == (2, 2) and quantized.groups == 2 and quantized.bits == 8
