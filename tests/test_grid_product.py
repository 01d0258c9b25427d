"""The Winograd-domain product on two 8-bit grids as exact integer sums (``q8_grid_bmm``, run by
:class:`wasearch.winograd_autograd.QuantizedGridBmm` where the CPU has AVX-512 VNNI): the exact
product of the levels, scaled once; its backward from the levels; a layer's training step the
same up to float rounding; and the deploy float32 product (``f32_bmm``)."""

from __future__ import annotations

import copy

import pytest
import torch

from wasearch import cpu_kernels
from wasearch.layers import WinogradConv2d
from wasearch.quant import FakeQuantize
from wasearch.winograd_autograd import GridBmm, QuantizedGridBmm, quantized_grid_product


def _kernels():
    ext = cpu_kernels.kernels()
    if ext is None or not ext.q8_product_supported():
        pytest.skip("the product on levels needs the AVX-512 build on a CPU with VNNI")
    return ext


def _record_fused(monkeypatch) -> list[bool]:
    """Patch ``winograd.quantized_grid_product`` to record, call by call, whether it ran."""
    from wasearch import winograd

    seen = []
    real = winograd.quantized_grid_product

    def recorded(*args):
        out = real(*args)
        seen.append(out is not None)
        return out

    monkeypatch.setattr(winograd, "quantized_grid_product", recorded)
    return seen


class _GridBmmOnLevels(torch.autograd.Function):
    """A reference: :class:`GridBmm`'s interface, the product and both gradients on the levels
    (``q8_grid_bmm``, ``grid_bmm_backward``), the quantizers' masks left to their own backward:
    what :class:`QuantizedGridBmm` must equal bit for bit."""

    @staticmethod
    def forward(ctx, u, v, u_codes, u_scale, v_codes, v_scale):
        a2 = u.shape[0]
        ctx.rows = [s.reshape(-1).expand(a2).contiguous() for s in (u_scale, v_scale)]
        ctx.save_for_backward(u_codes, v_codes)
        return cpu_kernels.kernels().q8_grid_bmm(u_codes, v_codes, ctx.rows[0] * ctx.rows[1])

    @staticmethod
    def backward(ctx, grad):
        u_codes, v_codes = ctx.saved_tensors
        (su, sv), ext = ctx.rows, cpu_kernels.kernels()
        gu, gv = ext.grid_bmm_backward(grad.contiguous(), u_codes, su, v_codes, sv, True, True)
        return gu, gv, None, None, None, None


@pytest.mark.parametrize(
    "a2, k, c, nt",
    [(16, 5, 7, 19), (36, 32, 32, 70), (4, 3, 1, 1), (36, 20, 9, 50), (64, 17, 66, 33)],
)
def test_the_integer_product_is_exact(a2, k, c, nt):
    ext = _kernels()
    torch.manual_seed(a2 + k + c + nt)
    u = torch.randint(-127, 128, (a2, k, c), dtype=torch.int8)
    v = torch.randint(-127, 128, (a2, c, nt), dtype=torch.int8)
    u[0, 0, :] = -127  # the extremes: the unsigned offset of u and the column sums of v
    v[0, :, 0] = -127
    scale = torch.rand(a2) + 0.01
    got = ext.q8_grid_bmm(u, v, scale)
    exact = torch.bmm(u.long(), v.long())
    assert torch.equal(got, exact.float() * scale.view(-1, 1, 1))


@pytest.mark.parametrize("per_position", [False, True])
def test_the_product_runs_on_the_levels_with_its_backward(per_position):
    ext = _kernels()
    torch.manual_seed(1)
    a2, k, c, nt = 36, 12, 10, 40
    su = torch.rand(a2, 1, 1) / 50 + 1e-3 if per_position else torch.tensor(0.013)
    sv = torch.rand(a2, 1, 1) / 50 + 1e-3 if per_position else torch.tensor(0.021)
    uc = torch.randint(-127, 128, (a2, k, c), dtype=torch.int8)
    vc = torch.randint(-127, 128, (a2, c, nt), dtype=torch.int8)
    runs = []
    for off in (True, False):
        u = (uc.float() * su).requires_grad_(True)  # on their grids: their levels are uc, vc
        v = (vc.float() * sv).requires_grad_(True)
        if off:
            out = GridBmm.apply(u, v, uc, su, vc, sv)  # bmm of the float values
        else:
            out = QuantizedGridBmm.apply(u, v, su, sv, 127, 127, False, False, ext)
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
        out.backward(g)
        runs.append((out.detach(), u.grad, v.grad))
    (y_bmm, gu0, gv0), (y_lv, gu1, gv1) = runs
    exact = torch.bmm(uc.long(), vc.long()).float() * (su * sv).reshape(-1, 1, 1)
    assert torch.equal(y_lv, exact)  # the levels' exact sums, scaled once
    assert not torch.equal(y_lv, y_bmm)  # bmm of the float values rounds otherwise
    torch.testing.assert_close(y_lv, y_bmm, rtol=1e-5, atol=1e-6)
    # the backward from the levels: bmm's products, summed in another order
    g64 = torch.randn(y_bmm.shape, generator=torch.Generator().manual_seed(2)).double()
    u64, v64 = uc.double() * su.double(), vc.double() * sv.double()
    exact_u, exact_v = g64.bmm(v64.transpose(1, 2)), u64.transpose(1, 2).bmm(g64)
    for got, ref, ex in ((gu1, gu0, exact_u), (gv1, gv0, exact_v)):
        assert not torch.equal(got, ref)
        err, ref_err = (got.double() - ex).abs().max(), (ref.double() - ex).abs().max()
        assert err <= 4 * ref_err + 1e-7 * ex.abs().max()


@pytest.mark.parametrize(
    "a2, k, c, nt",
    [(16, 5, 7, 19), (36, 32, 32, 300), (4, 3, 1, 1), (36, 20, 9, 50), (16, 9, 17, 33)],
)
def test_the_backward_from_the_levels(a2, k, c, nt):
    """Both gradients, every tail of the 8 x 32 and 4 x 4 blocks, long and short sums."""
    ext = _kernels()
    torch.manual_seed(a2 * k + c + nt)
    uc = torch.randint(-127, 128, (a2, k, c), dtype=torch.int8)
    vc = torch.randint(-127, 128, (a2, c, nt), dtype=torch.int8)
    su, sv, g = torch.rand(a2) + 0.01, torch.rand(a2) + 0.01, torch.randn(a2, k, nt)
    gu, gv = ext.grid_bmm_backward(g, uc, su, vc, sv, True, True)
    u64 = uc.double() * su.double().view(-1, 1, 1)
    v64 = vc.double() * sv.double().view(-1, 1, 1)
    eu, ev = g.double().bmm(v64.transpose(1, 2)), u64.transpose(1, 2).bmm(g.double())
    torch.testing.assert_close(gu.double(), eu, rtol=1e-5, atol=1e-5 * float(eu.abs().max()))
    torch.testing.assert_close(gv.double(), ev, rtol=1e-5, atol=1e-5 * float(ev.abs().max()))
    only_u, none_v = ext.grid_bmm_backward(g, uc, su, vc, sv, True, False)
    assert torch.equal(only_u, gu) and none_v is None  # only what was asked
    mask = torch.randint(0, 2, gv.shape, dtype=torch.int8)
    _, masked = ext.grid_bmm_backward(g, uc, su, vc, sv, False, True, mask)
    assert torch.equal(masked, ext.masked_grad(gv, mask))  # masked as it is written


def test_not_used_without_8_bit_levels():
    _kernels()
    u = torch.randn(16, 4, 4, requires_grad=True)
    v = torch.randn(16, 4, 5, requires_grad=True)
    q8, q12 = FakeQuantize(8), FakeQuantize(12)
    assert quantized_grid_product(q8, FakeQuantize(8), u, v) is not None
    assert quantized_grid_product(q12, q8, u, v) is None  # 9 to 16 bits: bmm
    assert quantized_grid_product(None, q8, u, v) is None
    assert quantized_grid_product(q8, q8, u.double(), v.double()) is None
    assert quantized_grid_product(q8, q8, u.detach(), v) is None  # u's gradient not asked
    with cpu_kernels.disabled("grid_product"):
        assert quantized_grid_product(q8, q8, u, v) is None


@pytest.mark.parametrize("mode, tile, gran", [("flex", 4, "tensor"), ("static", 6, "tap")])
def test_a_training_step_differs_only_at_rounding_boundaries(mode, tile, gran, monkeypatch):
    _kernels()
    calls = _record_fused(monkeypatch)
    torch.manual_seed(4)
    layer = WinogradConv2d(16, 16, tile=tile, mode=mode, bits=8, granularity=gran).train()
    ref = copy.deepcopy(layer)
    outs = []
    for lay, off in ((ref, True), (layer, False)):
        x = torch.randn(4, 16, 12, 12, generator=torch.Generator().manual_seed(5))
        x.requires_grad_(True)
        if off:
            with cpu_kernels.disabled("grid_product"):
                y = lay(x)
        else:
            y = lay(x)
        y.square().sum().backward()
        outs.append((y.detach(), x.grad, lay.weight.grad))
    (y0, gx0, gw0), (y1, gx1, gw1) = outs
    assert calls == [False, True]  # off, then on the levels
    step = y0.abs().max() / 127
    diff = (y1 - y0).abs()
    assert (diff > 1e-3 * step).float().mean() < 0.02  # almost every value identical
    assert diff.max() <= 2 * step + 1e-6  # the rest: a flip to a neighbouring level
    for a, b in ((gx0, gx1), (gw0, gw1)):
        cos = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)
        assert cos > 0.99


@pytest.mark.parametrize("mode", ["static", "flex"])
@pytest.mark.parametrize("gran", ["tensor", "tap"])
def test_quantizing_to_levels_only_changes_nothing(mode, gran, monkeypatch):
    """QuantizedGridBmm (the quantizers write levels and masks only) against quantizing to
    values first and the same product on the levels (_GridBmmOnLevels): the same outputs,
    gradients and running ranges bit for bit, through a batch that the running ranges clip and
    in evaluation."""
    _kernels()
    from wasearch import winograd

    torch.manual_seed(6)
    layer = WinogradConv2d(12, 10, tile=4, mode=mode, bits=8, granularity=gran, bias=True)
    ref = copy.deepcopy(layer)
    seen = _record_fused(monkeypatch)
    fused = winograd.quantized_grid_product
    for scale, train in ((1.0, True), (3.0, True), (1.0, False)):
        x = scale * torch.randn(2, 12, 9, 10, generator=torch.Generator().manual_seed(7))
        results = []
        for lay, on_levels in ((layer, True), (ref, False)):
            patched = fused if on_levels else (lambda *args: None)
            monkeypatch.setattr(winograd, "quantized_grid_product", patched)
            monkeypatch.setattr(winograd, "GridBmm", GridBmm if on_levels else _GridBmmOnLevels)
            lay.train(train)
            xi = x.clone().requires_grad_(True)
            y = lay(xi)
            (y * torch.linspace(-1, 2, y.numel()).view_as(y)).sum().backward()
            grads = [xi.grad] + [p.grad.clone() for p in lay.parameters()]
            lay.zero_grad(set_to_none=True)
            results.append((y.detach(), grads, [b.clone() for b in lay.buffers()]))
        (y1, g1, b1), (y2, g2, b2) = results
        assert torch.equal(y1, y2)
        for a, b in zip(g1 + b1, g2 + b2, strict=True):
            assert torch.equal(a, b)
    assert seen and all(seen)  # the fused step ran in every pass


@pytest.mark.parametrize(
    "a2, tiles, c, k",
    [
        (36, 9, 5, 3),
        (36, 33, 70, 45),
        (16, 40, 300, 40),
        (4, 17, 512, 33),
        (16, 3, 64, 64),
        (36, 1, 300, 200),
        (36, 2, 9, 129),
        (4, 3, 1, 16),
        (36, 4, 70, 45),
        (4, 5, 512, 17),
        (16, 6, 33, 64),
        (16, 7, 33, 130),
    ],
)
def test_the_deploy_float_product(a2, tiles, c, k):
    """The deploy float32 Winograd-domain product (f32_bmm: 8 x 32 register blocks, input
    channels in panels of 256, every tail; under 8 tiles, every row count from 1 to 7 on
    blocks of 128 or 64 columns, the last one partial) is bmm's within float rounding of
    float64."""
    ext = cpu_kernels.kernels()
    if ext is None:
        pytest.skip("the compiled CPU kernels are not built here")
    g = torch.Generator().manual_seed(a2 + tiles + c + k)
    v, w = torch.randn(a2, tiles, c, generator=g), torch.randn(a2, c, k, generator=g)
    exact = torch.bmm(v.double(), w.double())
    got = ext.f32_bmm(v, w)
    assert got.shape == (a2, tiles, k)
    torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=1e-5 * c**0.5)
