"""What only a CUDA machine can check (marked ``gpu``; skipped without CUDA, and run by
``benchmarks/gpu_check.sh``): the Winograd-aware layer and its quantizers on the GPU compute
what they compute on the CPU, and a training step of a searched network runs there."""

from __future__ import annotations

import copy

import pytest
import torch

from wasearch.arch import Arch
from wasearch.layers import WinogradConv2d
from wasearch.models import build
from wasearch.quant import FakeQuantize

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("mode, tile", [("static", 4), ("flex", 6), ("flex", 2)])
def test_float_winograd_layer_same_on_gpu(mode, tile):
    torch.manual_seed(0)
    layer = WinogradConv2d(8, 16, tile=tile, mode=mode, bias=True).double()
    gpu = copy.deepcopy(layer).cuda()
    x = torch.randn(2, 8, 13, 11, dtype=torch.float64, requires_grad=True)
    xg = x.detach().cuda().requires_grad_(True)
    y, yg = layer(x), gpu(xg)
    y.sum().backward()
    yg.sum().backward()
    torch.testing.assert_close(yg.cpu(), y, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(xg.grad.cpu(), x.grad, rtol=1e-9, atol=1e-9)
    for (name, p), (_, pg) in zip(layer.named_parameters(), gpu.named_parameters(), strict=True):
        torch.testing.assert_close(pg.grad.cpu(), p.grad, rtol=1e-9, atol=1e-9, msg=name)


@pytest.mark.parametrize("gran", ["tensor", "tap"])
def test_fused_fake_quantize_matches_the_cpu_chain(gran):
    # CUDA takes torch's fused fake-quantize kernels, the CPU an equivalent in-place chain.
    torch.manual_seed(1)
    q = FakeQuantize(8, running=False, granularity=gran, channels=6)
    x = 3 * torch.randn(6, 40, 7)
    x_cpu = x.clone().requires_grad_(True)
    x_gpu = x.cuda().requires_grad_(True)
    y_cpu, y_gpu = q(x_cpu), copy.deepcopy(q).cuda()(x_gpu)
    w = torch.randn_like(x)
    (y_cpu * w).sum().backward()
    (y_gpu * w.cuda()).sum().backward()
    step = x.abs().max() / 127
    assert (y_gpu.cpu() - y_cpu).abs().max() <= step * 1.001  # a tie may round either way
    assert ((y_gpu.cpu() - y_cpu).abs() > 1e-6).float().mean() < 0.01
    torch.testing.assert_close(x_gpu.grad.cpu(), x_cpu.grad)


def test_training_step_of_a_mixed_network_on_gpu():
    torch.manual_seed(2)
    arch = Arch.uniform("flex", 4, 8, granularity="tap", width=0.25, num_classes=10)
    model = build(arch).cuda().train()
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    x = torch.randn(8, 3, 32, 32, device="cuda")
    y = torch.randint(0, 10, (8,), device="cuda")
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]  # five steps on one batch: the loss falls


@pytest.mark.parametrize("gran", ["tensor", "tap"])
def test_levels_on_gpu_rebuild_the_fused_kernels_values(gran):
    # The fused kernels return level * scale; the levels kept for the backward must rebuild
    # those values exactly, or a flex layer's transform gradients would drift on the GPU.
    torch.manual_seed(4)
    q = FakeQuantize(8, running=False, granularity=gran, channels=6).cuda()
    out = q(3 * torch.randn(6, 40, 7, device="cuda"), grid=True)
    assert out.codes.dtype == torch.int8
    assert torch.equal(out.codes.to(out.values.dtype) * out.scale, out.values)
