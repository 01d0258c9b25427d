"""oneDNN's int8 convolution, as the deploy kernels use it: whether it runs here, weights
prepacked, activations and weights quantized.

``torch.ops.onednn.qconv2d_pointwise`` takes uint8 activations and int8 weights, accumulates in
int32 and writes float32; :mod:`wasearch.deploy_kernels` runs its direct convolutions on it, and
the Winograd-domain product where wasearch's own VNNI product does not run (see that module's
doc for the 7-bit choice without VNNI, the per-channel weight and per-tensor activation scales).
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F

__all__ = [
    "ActRange",
    "has_int_kernel",
    "int8_available",
    "qconv",
    "qprepack",
    "quantize_act",
    "quantize_weight",
]

logger = logging.getLogger(__name__)


# -- capability probes ---------------------------------------------------------------------------
@functools.cache
def int8_available() -> bool:
    """Whether oneDNN's int8 convolution runs, and computes exactly, on this CPU and build."""
    try:
        x = torch.randint(0, 128, (1, 4, 5, 5), dtype=torch.uint8)
        x = x.contiguous(memory_format=torch.channels_last)
        w = torch.randint(-127, 128, (3, 4, 3, 3), dtype=torch.int8)
        scales = torch.full((3,), 0.01)
        y = qconv(x, 0.02, 0, qprepack(w, scales, 0.02, 0, 1, 1), scales, None, 1, 1)
        ref = F.conv2d(x.float() * 0.02, w.float() * 0.01, padding=1)
        return bool(torch.allclose(y, ref, rtol=1e-4, atol=1e-4))
    except (RuntimeError, AttributeError, NotImplementedError) as err:
        logger.info("no int8 convolution kernel on this build: %s", err)
        return False


def has_int_kernel(bits: int | None, device: str | torch.device = "cpu") -> bool:
    """True when a layer of ``bits`` runs on a real kernel of its own precision here.

    Floating point always does; 8-bit does on the CPU when :func:`int8_available`; every other
    bit-width (and 8-bit on CUDA, where no int8 convolution is wired up) does not.
    """
    if bits is None:
        return True
    return bits == 8 and torch.device(device).type == "cpu" and int8_available()


# -- integer kernels (oneDNN) --------------------------------------------------------------------
def qprepack(
    w: torch.Tensor, scales: torch.Tensor, x_scale: float, x_zp: int, padding: int, groups: int
) -> torch.Tensor:
    return torch.ops.onednn.qconv_prepack(
        w, scales, float(x_scale), int(x_zp), [1, 1], [padding, padding], [1, 1], groups, None
    )


def qconv(
    qx: torch.Tensor,
    x_scale: float,
    x_zp: int,
    packed: torch.Tensor,
    w_scales: torch.Tensor,
    bias: torch.Tensor | None,
    padding: int,
    groups: int,
) -> torch.Tensor:
    zps = torch.zeros(w_scales.shape, dtype=torch.int64)
    return torch.ops.onednn.qconv2d_pointwise(
        qx,
        float(x_scale),
        int(x_zp),
        packed,
        w_scales,
        zps,
        bias,
        [1, 1],
        [padding, padding],
        [1, 1],
        groups,
        1.0,
        0,
        torch.float32,
        "none",
        [],
        "",
    )


def quantize_weight(w: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel quantization to ``[-levels, levels]``: (int8, scales)."""
    amax = w.detach().abs().reshape(w.shape[0], -1).amax(dim=1).clamp_min(1e-12)
    scales = (amax / levels).float()
    q = torch.round(w / scales.view(-1, *([1] * (w.dim() - 1)))).clamp_(-levels, levels)
    return q.to(torch.int8), scales


def quantize_act(
    x: torch.Tensor, scale: float, zero_point: int, top: int, *, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Round ``x / scale + zero_point`` into ``[0, top]`` as uint8 (``out``: a float buffer)."""
    t = torch.mul(x, 1.0 / scale, out=out) if out is not None else x * (1.0 / scale)
    t.round_()
    if zero_point:
        t.add_(zero_point)
    return t.clamp_(0, top).to(torch.uint8)


class ActRange:
    """An activation's quantization range: fixed (from training or calibration), else per call."""

    def __init__(self, amax: float | None) -> None:
        self.amax = None if amax is None else float(amax)

    def scale(self, x: torch.Tensor, levels: int) -> float:
        amax = self.amax if self.amax is not None else float(x.detach().abs().max())
        return max(amax, 1e-12) / levels
