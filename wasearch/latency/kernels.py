"""The kernels measured: one deploy operation (direct or Winograd convolution, pool, ReLU, head)
on random data, ready to be timed.

The kernels are those ``wasearch.deploy.to_deploy`` builds, so a table row times what a deployed
network runs; 8-bit activation ranges are fixed from the example input, as a calibrated model
has them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from .. import deploy
from ..winograd import transform_matrices
from .base import LatencyError
from .ops import SEARCHABLE_OP, OpKey

__all__ = ["kernel_for"]


def _example(shape: Sequence[int], device: torch.device, *, nonneg: bool = False) -> torch.Tensor:
    x = torch.randn(*shape, device=device)
    if nonneg:
        x = x.relu_()
    return x.contiguous(memory_format=torch.channels_last)


def kernel_for(key: OpKey, *, device: str | torch.device = "cpu") -> Callable[[], torch.Tensor]:
    """A zero-argument callable running the deploy kernel of ``key`` on random data.

    The kernels are those ``deploy.to_deploy`` builds (random weights; 8-bit activation ranges
    fixed from the example input, as a calibrated model has them). Raises ``LatencyError`` for a
    bit-width with no kernel here, and for a generic operation of a traced network (timed in
    place only: ``MeasuredModel.price`` times its network).
    """
    dev = torch.device(device)
    if key.generic:
        raise LatencyError(
            f"{key.describe()}: a traced network's operation is timed in place, in its network"
        )
    if not deploy.has_int_kernel(key.bits, dev):
        raise LatencyError(f"no {key.bits}-bit kernel on {dev.type}: {key.describe()}")
    b, c, k, h, w = key.batch, key.in_channels, key.out_channels, key.height, key.width
    bias = torch.randn(k, device=dev) * 0.1

    def weight(kh: int) -> torch.Tensor:
        return torch.randn(k, c, kh, kh, device=dev) / math.sqrt(c * kh * kh)

    with torch.no_grad():
        if key.op == SEARCHABLE_OP:
            x = _example((b, c, h, w), dev, nonneg=True)
            amax = float(x.abs().max()) if key.bits is not None else None
            if key.conv == "normal":
                mod = deploy.DirectConv(weight(3), bias, padding=1, bits=key.bits, act_amax=amax)
            else:
                A_t, G, B_t = (t.to(dev) for t in transform_matrices(key.tile))
                mod = deploy.WinogradConv(weight(3), bias, A_t, G, B_t, bits=key.bits)
                if key.bits is not None:  # fix the per-position range from this input
                    mod.act_amax = _winograd_input_amax(x, B_t, key.tile)
            mod = mod.to(dev)
            return lambda: mod(x)
        if key.op == "conv1x1":
            x = _example((b, c, h, w), dev, nonneg=True)
            amax = float(x.abs().max()) if key.bits is not None else None
            mod = deploy.DirectConv(weight(1), bias, padding=0, bits=key.bits, act_amax=amax).to(
                dev
            )
            return lambda: mod(x)
        if key.op == "stem":
            x = torch.randn(b, c, h, w, device=dev)  # the network's input: NCHW
            mod = deploy.DirectConv(weight(3), bias, padding=1).to(dev)
            return lambda: torch.relu_(mod(x.contiguous(memory_format=torch.channels_last)))
        if key.op == "maxpool":
            x = _example((b, c, h, w), dev)
            pool = torch.nn.MaxPool2d(2)
            return lambda: pool(x)
        if key.op == "relu":
            x = _example((b, c, h, w), dev)
            return lambda: torch.relu_(x)
        if key.op == "add_relu":
            x = _example((b, c, h, w), dev, nonneg=True)
            y = _example((b, c, h, w), dev, nonneg=True) * 1e-6  # keeps values bounded
            return lambda: torch.relu_(x.add_(y))
        if key.op == "head":
            x = _example((b, c, h, w), dev)
            head = deploy.Head(torch.randn(k, c, device=dev) / math.sqrt(c), bias).to(dev)
            return lambda: head(x)
    raise LatencyError(f"unknown op {key.op!r}")


def _winograd_input_amax(x: torch.Tensor, B_t: torch.Tensor, m: int) -> torch.Tensor:
    a = m + 2
    tiles = deploy.winograd_input_tiles(x, m)  # partial tiles padded, as the kernel runs them
    v = torch.matmul(B_t, (B_t @ tiles.reshape(a, -1)).view(a, a, -1))
    return v.abs().reshape(a * a, -1).amax(dim=1).cpu()
