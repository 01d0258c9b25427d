"""The fast Winograd-aware layer computes what the implementation before the speed work did.

``tests/reference_wa.py`` keeps that implementation (Kronecker-matrix transforms, ``aminmax``
ranges, a boolean clip mask). In float64 the two must agree to rounding error on outputs, on every
gradient (input, weight, bias, the flex transforms) and on the running ranges, through training
steps where the running ranges clip and through evaluation; in float32 they differ only where a
value sits on a rounding boundary.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from reference_wa import reference_forward

from wasearch.layers import WinogradConv2d
from wasearch.quant import Quantized
from wasearch.winograd import winograd_conv2d
from wasearch.winograd_autograd import transform_2d


def _run(layer, forward, batches, train=True):
    layer.train(train)
    outs, grads = [], []
    for x in batches:
        x = x.clone().requires_grad_(True)
        layer.zero_grad(set_to_none=True)
        y = forward(layer, x)
        # A weighted sum: every output's gradient differs, so a wrong mask shows.
        (y * torch.linspace(-1, 2, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
        outs.append(y.detach())
        named = {"x": x.grad}
        for name, p in layer.named_parameters():
            named[name] = None if p.grad is None else p.grad.clone()
        grads.append(named)
    return outs, grads


def _new(layer, x):
    return layer(x)


CASES = [
    (mode, tile, bits, gran)
    for mode in ("static", "flex")
    for tile in (2, 4, 6)
    for bits in (None, 8, 4)
    for gran in ("tensor", "tap")
    if not (bits is None and gran == "tap")
]
SIZES = [((12, 12), 1), ((9, 7), 1), ((10, 11), (0, 2))]


def _pair(mode, tile, bits, gran, size, padding, dtype=torch.float64):
    torch.manual_seed(tile * 10 + (bits or 0))
    layer = WinogradConv2d(
        4, 5, tile=tile, mode=mode, bits=bits, granularity=gran, bias=True, padding=padding
    ).to(dtype)
    with torch.no_grad():
        layer.bias.normal_()
    # The second batch is 3x wider than the first: the running ranges (initialized by the first)
    # clip it, so the straight-through masks decide gradients.
    batches = [torch.randn(2, 4, *size, dtype=dtype), 3 * torch.randn(2, 4, *size, dtype=dtype)]
    return layer, copy.deepcopy(layer), batches


@pytest.mark.parametrize("mode, tile, bits, gran", [c for c in CASES if c[2] is None])
@pytest.mark.parametrize("size, padding", SIZES)
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_float_layers_same_outputs_and_gradients(
    mode, tile, bits, gran, size, padding, dtype, tol
):
    layer, ref, batches = _pair(mode, tile, bits, gran, size, padding, dtype)
    got_y, got_g = _run(layer, _new, batches)
    exp_y, exp_g = _run(ref, reference_forward, batches)
    for gy, ey, gg, eg in zip(got_y, exp_y, got_g, exp_g, strict=True):
        torch.testing.assert_close(gy, ey, rtol=tol, atol=tol * float(ey.abs().max()))
        assert gg.keys() == eg.keys()
        for name in gg:
            atol = tol * float(eg[name].abs().max())  # sums over a batch: relative to its size
            torch.testing.assert_close(gg[name], eg[name], rtol=tol, atol=atol, msg=name)


def _cosine(a, b):
    if a.norm() == 0 and b.norm() == 0:  # both stopped everywhere (every value clipped)
        return 1.0
    return float((a * b).sum() / (a.norm() * b.norm()).clamp_min(1e-300))


def _exact(layer, x):
    """The float convolution the layer approximates (its weights, bias and padding)."""
    return torch.nn.functional.conv2d(x, layer.weight, layer.bias, padding=layer.padding)


@pytest.mark.parametrize("mode, tile, bits, gran", [c for c in CASES if c[2] is not None])
@pytest.mark.parametrize("size, padding", SIZES)
def test_quantized_layers_agree_up_to_rounding_ties(mode, tile, bits, gran, size, padding):
    """Summed in another order, a value that sits exactly on a rounding tie of the integer grid
    (frequent: Winograd maps grids to grids) may round the other way, and where it sets a running
    range, the whole tensor's scale moves with it. So the quantized layers are compared by what
    they compute (their error against the exact convolution, and their gradients' direction),
    not bit for bit; the float pipeline and the quantizers are compared exactly above and below.
    """
    layer, ref, batches = _pair(mode, tile, bits, gran, size, padding)
    got_y, got_g = _run(layer, _new, batches)
    exp_y, exp_g = _run(ref, reference_forward, batches)
    for step, (x, gy, ey, gg, eg) in enumerate(
        zip(batches, got_y, exp_y, got_g, exp_g, strict=True)
    ):
        with torch.no_grad():
            exact = _exact(layer, x)
        err_new = float((gy - exact).norm() / exact.norm())
        err_ref = float((ey - exact).norm() / exact.norm())
        assert abs(err_new - err_ref) <= 0.25 * err_ref + 1e-6, f"output error, step {step}"
        for name in gg:
            floor = 0.95 if bits == 8 else 0.7
            assert _cosine(gg[name], eg[name]) > floor, f"grad {name}, step {step}"


def test_clipping_happened_so_the_masks_were_tested():
    # The comparison above is only a test of the masks if some values were clipped.
    torch.manual_seed(0)
    layer = WinogradConv2d(4, 5, tile=4, mode="flex", bits=8).double().train()
    layer(torch.randn(2, 4, 12, 12, dtype=torch.float64))
    seen = {}

    def hook(name):
        def record(_module, _inputs, output):
            # A flex layer in training asks its input quantizer for the grid too.
            seen[name] = output.values if isinstance(output, Quantized) else output

        return record

    x = 3 * torch.randn(2, 4, 12, 12, dtype=torch.float64)
    amax_before = torch.maximum(layer.q_input.min_val.abs(), layer.q_input.max_val.abs())
    assert x.abs().max() > 1.1 * amax_before  # the input quantizer must clip this batch
    handle = layer.q_input.register_forward_hook(hook("q_input"))
    layer(x)
    handle.remove()
    top_level = seen["q_input"].abs().max()
    assert (seen["q_input"].abs() == top_level).sum() > 1  # several values sit at the clip level


@pytest.mark.parametrize("p, a", [(6, 6), (4, 6), (2, 4), (8, 8)])
def test_separable_transform_equals_kronecker_product(p, a):
    torch.manual_seed(p)
    mat = torch.randn(p, a, dtype=torch.float64)
    tiles = torch.randn(a * a, 7, dtype=torch.float64)
    torch.testing.assert_close(
        transform_2d(mat, tiles), torch.kron(mat, mat) @ tiles, rtol=1e-12, atol=1e-12
    )


@pytest.mark.parametrize("mode, tile", [("static", 4), ("flex", 6)])
def test_float32_differs_only_at_rounding_boundaries(mode, tile):
    torch.manual_seed(1)
    layer = WinogradConv2d(8, 8, tile=tile, mode=mode, bits=8, granularity="tap")
    ref = copy.deepcopy(layer)
    batches = [torch.randn(4, 8, 16, 16), 2 * torch.randn(4, 8, 16, 16)]
    (_, gy), _ = _run(layer, _new, batches)
    (_, ey), _ = _run(ref, reference_forward, batches)
    step = ey.abs().max() / 127
    diff = (gy - ey).abs()
    assert (diff > 1e-3 * step).float().mean() < 0.01  # almost every value identical
    assert diff.max() <= 2 * step + 1e-6  # the rest: a flip to a neighbouring level


@pytest.mark.parametrize("running", [True, False])
@pytest.mark.parametrize("gran", ["tensor", "tap"])
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_quantizer_bit_for_bit(running, gran, bits, dtype):
    """The quantizer's outputs, gradients and running ranges are exactly today's: only the
    speed of computing the range and the mask changed."""
    from reference_wa import quantize as reference_quantize

    from wasearch.quant import FakeQuantize

    torch.manual_seed(bits)
    q = FakeQuantize(bits, running=running, granularity=gran, channels=6).to(dtype)
    ref = copy.deepcopy(q)
    for mode, scale in (("train", 1.0), ("train", 3.0), ("train", 0.5), ("eval", 2.0)):
        q.train(mode == "train")
        ref.train(mode == "train")
        x = (scale * torch.randn(6, 5, 7, dtype=dtype)).requires_grad_(True)
        x_ref = x.detach().clone().requires_grad_(True)
        y, y_ref = q(x), reference_quantize(ref, x_ref)
        weights = torch.randn_like(y)
        (y * weights).sum().backward()
        (y_ref * weights).sum().backward()
        assert torch.equal(y, y_ref), mode
        assert torch.equal(x.grad, x_ref.grad), mode
        for a, b in zip(q.buffers(), ref.buffers(), strict=True):
            assert torch.equal(a, b)
    if running:  # the 3x batch clipped: some gradient was stopped, so the mask was exercised
        assert bool(q.initialized)


@pytest.mark.parametrize("p, a", [(6, 6), (4, 6)])
def test_separable_transform_gradients(p, a):
    # Its backward recomputes the intermediate it did not save: check it against finite
    # differences, for the learned matrix (flex) and the tiles, and for the tiles alone (static).
    torch.manual_seed(0)
    mat = torch.randn(p, a, dtype=torch.float64, requires_grad=True)
    tiles = torch.randn(a * a, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(transform_2d, (mat, tiles))
    assert torch.autograd.gradcheck(transform_2d, (mat.detach(), tiles))


def test_static_quantized_transforms_are_kept_until_a_buffer_changes():
    layer = WinogradConv2d(4, 4, tile=4, mode="static", bits=8)

    def fresh(lay):
        return tuple(lay.q_transform(t) for t in (lay.A_t, lay.G, lay.B_t))

    first = layer.transforms()
    assert layer.transforms() is first  # reused, not quantized again
    for a, b in zip(first, fresh(layer), strict=True):
        assert torch.equal(a, b)
    with torch.no_grad():
        layer.B_t.mul_(2.0)  # a changed buffer (its version moves): quantized again
    again = layer.transforms()
    assert again is not first
    assert torch.equal(again[2], fresh(layer)[2])
    layer.double()  # another dtype: rebuilt transforms, quantized again
    assert all(t.dtype == torch.float64 for t in layer.transforms())
    other = WinogradConv2d(4, 4, tile=4, mode="static", bits=8)
    with torch.inference_mode():
        other.transforms()
    assert getattr(other, "_quantized_transforms", None) is None  # nothing kept from there
    x = torch.randn(1, 4, 8, 8, requires_grad=True)
    other(x).sum().backward()  # and training afterwards works
    flex = WinogradConv2d(4, 4, tile=4, mode="flex", bits=8)
    assert flex.transforms()[0] is not flex.transforms()[0]  # learned: quantized every call


def _weighted_backward(y):
    (y * torch.linspace(-1, 2, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()


@pytest.mark.parametrize("mode", ["static", "flex"])
@pytest.mark.parametrize(
    "gran, transforms, wd_bits", [("tensor", "tensor", None), ("tap", "tap", 10)]
)
@pytest.mark.parametrize("padding", [1, 0])
def test_tensors_kept_as_levels_give_the_same_outputs_and_gradients(
    mode, gran, transforms, wd_bits, padding
):
    """The layer keeps its quantized tensors for the backward as integer levels; the same
    pipeline with every stage quantizer behind a plain callable (which keeps floats) must give
    the same outputs and gradients bit for bit, through steps whose running ranges clip. (The
    product on the levels, which rounds otherwise than bmm, is off here: it has its own tests.)"""
    from wasearch import cpu_kernels

    torch.manual_seed(3)
    layer = WinogradConv2d(
        6,
        5,
        tile=4,
        mode=mode,
        bits=8,
        granularity=gran,
        transforms=transforms,
        wd_bits=wd_bits,
        bias=True,
        padding=padding,
    ).train()
    ref = copy.deepcopy(layer)
    for scale in (1.0, 3.0):
        x = scale * torch.randn(2, 6, 10, 9)
        x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        with cpu_kernels.disabled("grid_product"):
            y = layer(x1)
        _weighted_backward(y)
        A_t, G, B_t = ref.transforms()
        plain = {k: (lambda t, q=q: q(t)) for k, q in ref._stage_quantizers().items()}
        yr = winograd_conv2d(
            ref._pad_input(ref.q_input(x2)),
            ref.q_weight(ref.weight),
            A_t,
            G,
            B_t,
            bias=ref.bias,
            quant=plain,
        )
        yr = ref.q_output(ref._crop_output(yr))
        _weighted_backward(yr)
        assert torch.equal(y, yr)
        assert torch.equal(x1.grad, x2.grad)
        for (name, p), q in zip(layer.named_parameters(), ref.parameters(), strict=True):
            assert torch.equal(p.grad, q.grad), name
            p.grad = q.grad = None


@pytest.mark.parametrize("mode, kept", [("static", 1), ("flex", 3)])
def test_quantized_tensors_are_kept_as_int8_levels(mode, kept):
    """What autograd keeps of a WA layer: the Winograd-domain input (and, flex, the input tiles
    and the product) as int8 levels, no float tensor of their size. Where the fused transforms
    read the input's tiles in place, a flex layer keeps the input's own levels instead of its
    tiles' (2.25x as many at F4)."""
    from wasearch import cpu_kernels

    torch.manual_seed(0)
    layer = WinogradConv2d(8, 8, tile=4, mode=mode, bits=8).train()
    x = torch.randn(2, 8, 16, 16)
    big = 36 * 8 * 2 * 16  # a Winograd-domain tensor: alpha^2 x channels x tiles
    in_place = cpu_kernels.kernels("transforms") is not None
    for off in (False, True):
        saved: list[torch.Tensor] = []
        with cpu_kernels.disabled("transforms") if off else contextlib.nullcontext():
            with torch.autograd.graph.saved_tensors_hooks(
                lambda t, keep=saved.append: keep(t) or t, lambda t: t
            ):
                layer(x)
        int8 = [t.numel() for t in saved if t.dtype == torch.int8]
        levels = sorted(n for n in int8 if n >= x.numel())
        assert len(levels) == kept, levels
        # The Winograd-domain input and (flex) the product: Winograd-domain sized.
        assert all(n >= big for n in levels[-2 if mode == "flex" else -1 :]), levels
        if mode == "flex":  # the input's levels, or its tiles'
            assert levels[0] == (x.numel() if in_place and not off else big), levels
        float_sizes = [t.numel() for t in saved if t.dtype == torch.float32]
        assert not [n for n in float_sizes if n >= big], float_sizes


@pytest.mark.parametrize("mode", ["static", "flex"])
@pytest.mark.parametrize("gran", ["tensor", "tap"])
def test_winograd_domain_weights_are_kept_as_levels(mode, gran):
    """The Winograd-domain weights U (quantized by ``weight_wd``), which the input's gradient
    needs, are kept as int8 levels, not as floats (a quarter of the memory); so are, for a
    learned G (flex), the weights G's gradient needs."""
    torch.manual_seed(0)
    layer = WinogradConv2d(16, 24, tile=4, mode=mode, bits=8, granularity=gran).train()
    x = torch.randn(1, 16, 4, 4, requires_grad=True)
    u_numel = 36 * 24 * 16  # alpha^2 x K x C; no other tensor of the layer has as many
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(
        lambda t, keep=saved.append: keep(t) or t, lambda t: t
    ):
        y = layer(x)
    assert [t.dtype for t in saved if t.numel() == u_numel] == [torch.int8]
    if mode == "flex":  # the learned G's gradient needs the weights: their levels, not floats
        w_numel = 9 * 24 * 16
        assert [t.dtype for t in saved if t.numel() == w_numel] == [torch.int8]
    y.sum().backward()  # and the gradients through the rebuilt U (bit for bit: the test above)
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("bits, dtype", [(8, torch.int8), (4, torch.int8), (12, torch.int16)])
@pytest.mark.parametrize("axis", [None, 0])
def test_levels_rebuild_the_values_exactly(bits, dtype, axis):
    from wasearch.quant import fake_quantize, quantize

    torch.manual_seed(bits)
    x = torch.randn(6, 50) * torch.linspace(0.1, 4, 6).view(6, 1)
    amax = x.abs().amax(1) * 0.7 if axis == 0 else x.abs().max() * 0.7  # some values clip
    q = quantize(x, amax, bits, axis, codes=True)
    assert q.codes.dtype == dtype
    assert int(q.codes.abs().max()) == 2 ** (bits - 1) - 1
    assert torch.equal(q.codes.to(x.dtype) * q.scale, q.values)
    assert torch.equal(q.values, fake_quantize(x, amax, bits, axis))
