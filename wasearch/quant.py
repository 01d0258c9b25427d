"""Symmetric fake quantization with a straight-through gradient.

The scheme of the Winograd-aware paper (Fernandez-Marques et al., MLSys 2020), itself the
symmetric case of Jacob et al., "Quantization and Training of Neural Networks for Efficient
Integer-Arithmetic-Only Inference" (CVPR 2018): a tensor is rounded to ``2^(b-1) - 1`` signed
levels on each side of zero, ``scale = max(|min|, |max|) / (2^(b-1) - 1)``, and the rounding passes
the gradient straight through inside the range (zero outside it).

Two kinds of range:

* **running** (activations: inputs, Winograd-domain inputs, the Hadamard product, outputs): the
  range is an exponential moving average of each training batch's min and max with momentum 0.01,
  initialized from the first batch; evaluation uses the stored range.
* **current** (weights and their Winograd-domain form, transforms): the range is the tensor's own
  min/max at every call, since the tensor is known exactly.

Granularity ``"tensor"`` keeps one range; ``"tap"`` keeps one per index along dimension 0, which
for a Winograd-domain tensor laid out as ``(alpha^2, ...)`` is one scale per tile position
(Andri et al., "Going further with Winograd convolutions: tap-wise quantization", 2022).

On CUDA the rounding is torch's fused kernels, ``torch.fake_quantize_per_tensor_affine`` and
``torch.fake_quantize_per_channel_affine`` (the latter along the tap axis). On the CPU it is an
equivalent vectorized chain (see ``_RoundSTE``), because the fused kernels measured ~15x slower
there.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from . import cpu_kernels
from .geometry import MAX_BITS, MIN_BITS

__all__ = [
    "MIN_BITS",
    "MAX_BITS",
    "FakeQuantize",
    "Quantized",
    "check_bits",
    "code_dtype",
    "fake_quantize",
    "fake_quantize_pow2",
    "grid_of",
    "grid_levels",
    "pow2_amax",
    "qmax",
    "quantize",
    "rebuild",
    "scale_rows",
]

_EPS = 1e-12


def check_bits(bits: int | None) -> int | None:
    """Validate a bit-width: ``None`` (floating point) or an integer in 2..16."""
    if bits is None:
        return None
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(
            f"bits={bits!r} is not supported; use an integer in {MIN_BITS}..{MAX_BITS} "
            "or None for floating point"
        )
    return bits


def qmax(bits: int) -> int:
    """Largest level of a symmetric signed ``bits``-bit grid: ``2^(bits-1) - 1``."""
    return (1 << (bits - 1)) - 1


def code_dtype(bits: int) -> torch.dtype:
    """The narrowest integer type that holds a ``bits``-bit symmetric grid's levels."""
    return torch.int8 if bits <= 8 else torch.int16


class Quantized(NamedTuple):
    """A fake-quantized tensor and its grid: ``values == codes * scale``, bit for bit.

    ``codes`` (the integer levels, :func:`code_dtype`) is None unless asked for. A tensor that
    autograd keeps for the backward pass can be kept as its codes, a quarter of the memory at 8
    bits, and rebuilt exactly (``codes.to(values.dtype) * scale`` is the forward's own last
    operation)."""

    values: torch.Tensor
    codes: torch.Tensor | None
    scale: torch.Tensor | None


class _RoundSTE(torch.autograd.Function):
    """Symmetric rounding to ``[-top, top] * scale`` with a straight-through gradient.

    The same arithmetic and gradient as ``torch.fake_quantize_per_tensor_affine`` (round half to
    even, zero point 0, gradient masked where ``round(x / scale)`` falls outside the grid), written
    as vectorized in-place ops: on the CPU, torch 2.14's fused fake-quantize kernel measured about
    15x slower than these (17 ms against 1.2 ms per op on a 2.4M-element tensor, one thread), and
    it sat on the hot path of every Winograd-aware layer.

    The backward keeps a 1-byte mask, built as float 0/1 in place and stored as ``int8``: torch's
    CPU comparisons that return ``bool``, and products of a float tensor with a ``bool`` one,
    measured 3-7x slower than the float and ``int8`` forms (AVX-512, torch 2.14), for the same
    values.
    """

    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        scale: torch.Tensor,
        top: int,
        may_clip: bool,
        codes: torch.dtype | None = None,
    ):
        ctx.may_clip = may_clip
        want_mask = ctx.needs_input_grad[0] and may_clip
        rows = _fused_scale(x, scale)  # applicability first: CUDA never builds the CPU kernels
        ext = cpu_kernels.kernels() if rows is not None else None
        if ext is not None:  # one pass, the same values (csrc/fake_quant.cpp)
            nbytes = 0 if codes is None else codes.itemsize
            y, mask, levels = ext.quantize(x, rows, top, True, want_mask, nbytes)
            if want_mask:
                ctx.save_for_backward(mask)
            if codes is None:
                return y
            ctx.mark_non_differentiable(levels)
            return y, levels
        t = x / scale
        if want_mask:
            # round(t) lies in [-top, top] iff |t| < top + 1/2 (top is odd, so the tie at
            # top + 1/2 rounds to the even top + 1, outside).
            ctx.save_for_backward(t.abs().lt_(top + 0.5).to(torch.int8))
        t.round_().clamp_(-top, top)
        if codes is None:
            return t.mul_(scale)
        levels = t.to(codes)  # the levels, before the one multiply that makes the values
        ctx.mark_non_differentiable(levels)
        return t.mul_(scale), levels

    @staticmethod
    def backward(ctx, grad: torch.Tensor, *_codes_grad):
        if not ctx.may_clip:  # nothing was clipped: the gradient passes everywhere
            return grad, None, None, None, None
        (mask,) = ctx.saved_tensors
        ext = cpu_kernels.kernels()
        # The kernel pairs elements in memory order: the mask must be laid out row-major, as
        # the fused forward makes it (the torch chain's mask keeps a strided input's layout).
        fused = grad.device.type == "cpu" and grad.dtype == torch.float32
        if ext is not None and fused and mask.is_contiguous():
            return ext.masked_grad(grad.contiguous(), mask), None, None, None, None
        return mask.to(grad.dtype).mul_(grad), None, None, None, None


def scale_rows(shape: torch.Size, scale: torch.Tensor) -> torch.Tensor | None:
    """``scale`` as the fused kernels take it for a tensor of ``shape``: one value, or one per
    index of dimension 0; None for any other layout."""
    if scale.dtype != torch.float32:
        return None
    if scale.numel() == 1:
        return scale.reshape(1)
    if len(shape) and scale.dim() == len(shape) and scale.shape[0] == shape[0] == scale.numel():
        return scale.reshape(-1).contiguous()
    return None


def _fused_scale(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor | None:
    """The fused kernels' scale vector for ``x`` (contiguous float32 on the CPU), or None where
    they do not apply and the torch chain runs."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or not x.is_contiguous():
        return None
    return scale_rows(x.shape, scale)


def grid_levels(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """The integer levels (:func:`code_dtype`) of an ``x`` that lies on the grid of ``scale``
    within ``bits`` (``x == levels * scale``, as a quantizer of that scale made it)."""
    rows = _fused_scale(x, scale)
    ext = cpu_kernels.kernels() if rows is not None else None
    if ext is not None:
        nbytes = code_dtype(bits).itemsize
        return ext.quantize(x.detach(), rows, qmax(bits), False, False, nbytes)[2]
    return (x.detach() / scale).round_().to(code_dtype(bits))


def rebuild(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A fake-quantized tensor from its integer levels: the quantizer's own last operation
    (``level * scale``), so the same values bit for bit."""
    if dtype == torch.float32 and codes.device.type == "cpu" and codes.is_contiguous():
        rows = scale_rows(codes.shape, scale)
        ext = cpu_kernels.kernels() if rows is not None else None
        if ext is not None:
            return ext.rebuild(codes, rows)
    return codes.to(dtype).mul_(scale)


def fake_quantize(
    x: torch.Tensor,
    amax: torch.Tensor,
    bits: int,
    axis: int | None = None,
    *,
    x_amax: torch.Tensor | None = None,
):
    """Round ``x`` to the symmetric ``bits``-bit grid of range ``[-amax, amax]``.

    ``amax`` is a scalar tensor (per-tensor) or a vector along ``axis`` (per-channel / tap-wise).
    The gradient is straight-through inside the range and zero where ``x`` was clipped.
    ``x_amax``, when the caller already knows it, is ``x``'s own largest magnitude (same shape as
    ``amax``): where it lies inside the range nothing can clip and no mask is kept.
    """
    return quantize(x, amax, bits, axis, x_amax=x_amax).values


def quantize(
    x: torch.Tensor,
    amax: torch.Tensor,
    bits: int,
    axis: int | None = None,
    *,
    x_amax: torch.Tensor | None = None,
    codes: bool = False,
) -> Quantized:
    """:func:`fake_quantize` with its grid: the values, their integer levels when ``codes``
    (:func:`code_dtype` of ``bits``), and the scale, shaped to broadcast against ``x``."""
    top = qmax(bits)
    if x.is_cuda:
        scale = (amax.detach().clamp_min(_EPS) / top).to(x.dtype)
        # On CUDA torch's fused kernels are fast: use them.
        scale32 = scale.float()
        if axis is None:
            zero = torch.zeros((), dtype=torch.int32, device=x.device)
            y = torch.fake_quantize_per_tensor_affine(x, scale32.reshape(()), zero, -top, top)
        else:
            zero = torch.zeros(scale32.shape, dtype=torch.int32, device=x.device)
            y = torch.fake_quantize_per_channel_affine(x, scale32, zero, axis, -top, top)
            scale = scale.reshape(_axis_shape(x, axis))
        # The kernels return (level - 0) * scale: the level is the value over the scale,
        # to within a rounding of one ulp, which round() removes.
        levels = torch.round(y.detach() / scale).to(code_dtype(bits)) if codes else None
        return Quantized(y, levels, scale)
    scale, may_clip = grid_of(x, amax, bits, axis, x_amax=x_amax)
    if not codes:
        return Quantized(_RoundSTE.apply(x, scale, top, may_clip), None, scale)
    y, levels = _RoundSTE.apply(x, scale, top, may_clip, code_dtype(bits))
    return Quantized(y, levels, scale)


def _axis_shape(x: torch.Tensor, axis: int) -> list[int]:
    shape = [1] * x.dim()
    shape[axis] = -1
    return shape


def grid_of(
    x: torch.Tensor,
    amax: torch.Tensor,
    bits: int,
    axis: int | None = None,
    *,
    x_amax: torch.Tensor | None = None,
) -> tuple[torch.Tensor, bool]:
    """The grid :func:`quantize` rounds ``x`` to: ``(scale, may_clip)``, the scale shaped to
    broadcast against ``x`` and whether any value can fall outside the range (False only when
    ``x_amax``, ``x``'s own largest magnitude, says none does)."""
    top = qmax(bits)
    scale = (amax.detach().clamp_min(_EPS) / top).to(x.dtype)
    if axis is not None:
        scale = scale.reshape(_axis_shape(x, axis))
    may_clip = True
    if x_amax is not None:
        may_clip = bool((x_amax > amax.detach() * ((top + 0.5) / top)).any())
    return scale, may_clip


def pow2_amax(amax: torch.Tensor, bits: int) -> torch.Tensor:
    """The smallest range ``top * 2^k`` (integer k) that holds ``amax``: its scale
    ``2^k`` is a power of two, so a multiply by it is a shift in integer arithmetic."""
    top = qmax(bits)
    return top * torch.exp2(torch.ceil(torch.log2(amax.clamp_min(_EPS) / top)))


def fake_quantize_pow2(x: torch.Tensor, bits: int, axis: int) -> torch.Tensor:
    """Round ``x`` to a ``bits``-bit grid with one power-of-two scale per index along ``axis``
    (the smallest that holds that slice's largest magnitude, so nothing clips).

    A slice whose entries are all whole multiples of one power of two, at most ``2^(bits-1) -
    1`` of them, is represented exactly: every ``A^T`` column and ``B^T`` row of the Cook-Toom
    transforms of F2, F4 and F6 at 8 bits is (default points ``0, +-1, +-2, +-1/2``). The
    gradient passes straight through (nothing is clipped)."""
    dims = [d for d in range(x.dim()) if d != axis % x.dim()]
    x_amax = x.detach().abs().amax(dim=dims)
    return fake_quantize(x, pow2_amax(x_amax, bits), bits, axis, x_amax=x_amax)


class FakeQuantize(nn.Module):
    """Symmetric signed fake quantizer; identity when ``bits`` is None.

    Args:
        bits: 2..16, or None for floating point.
        running: keep an exponential moving average of the range (activations) instead of using
            each tensor's own range (weights).
        momentum: weight of the new batch in the moving average (the paper's 0.01).
        granularity: ``"tensor"`` or ``"tap"`` (one range per index of dimension 0).
        channels: the size of dimension 0 for ``"tap"`` (needed to size the running buffers).
    """

    def __init__(
        self,
        bits: int | None,
        *,
        running: bool = True,
        momentum: float = 0.01,
        granularity: str = "tensor",
        channels: int | None = None,
    ) -> None:
        super().__init__()
        self.bits = check_bits(bits)
        if granularity not in ("tensor", "tap"):
            raise ValueError(f"granularity={granularity!r}; use 'tensor' or 'tap'")
        if granularity == "tap" and not channels:
            raise ValueError("granularity='tap' needs channels= (the number of tile positions)")
        if not 0.0 < momentum <= 1.0:
            raise ValueError(f"momentum={momentum!r} must be in (0, 1]")
        self.running = running
        self.momentum = momentum
        self.granularity = granularity
        shape = (channels,) if granularity == "tap" else ()
        if running:
            self.register_buffer("min_val", torch.zeros(shape))
            self.register_buffer("max_val", torch.zeros(shape))
            self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        # A host-side copy of ``initialized``: reading the buffer itself is a device sync on
        # CUDA, and every quantizer asks at every call. The buffer stays the truth that
        # checkpoints carry; the copy is refreshed whenever a state dict is loaded.
        self._initialized_host: bool | None = False if running else None

    def extra_repr(self) -> str:
        kind = "running" if self.running else "current"
        return f"bits={self.bits}, {kind}, granularity={self.granularity}"

    @property
    def is_initialized(self) -> bool:
        """Whether the running range holds a value (without a device sync, after the first
        ask)."""
        if not self.running:
            return False
        if getattr(self, "_initialized_host", None) is None:
            self._initialized_host = bool(self.initialized)
        return self._initialized_host

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._initialized_host = None  # the buffer may have changed: read it again when asked

    def _batch_range(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.granularity == "tap":
            # amin and amax apart: torch.aminmax along a dimension measured ~25x slower on the
            # CPU (5.2 ms against 0.2 ms on a 36 x 65,536 tensor, one thread), same values.
            rows = x.detach().reshape(x.shape[0], -1)
            return rows.amin(1), rows.amax(1)
        return torch.aminmax(x.detach())

    def observe(self, x: torch.Tensor) -> None:
        """Fold a batch's range into the running range (first batch: take it as is)."""
        self._fold(*self._batch_range(x))

    @torch.no_grad()
    def _fold(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        if not self.is_initialized:
            self.min_val.copy_(lo)
            self.max_val.copy_(hi)
            self.initialized.fill_(True)
            self._initialized_host = True
        else:
            self.min_val.lerp_(lo.to(self.min_val.dtype), self.momentum)
            self.max_val.lerp_(hi.to(self.max_val.dtype), self.momentum)

    def reset_range(self) -> None:
        """Forget the running range; the next training batch initializes it again."""
        if self.running:
            self.initialized.fill_(False)
            self._initialized_host = False

    def forward(self, x: torch.Tensor, *, grid: bool = False) -> torch.Tensor | Quantized:
        """The fake-quantized ``x`` (folding a training batch into the running range). With
        ``grid=True``, a :class:`Quantized`: the values, their integer levels and the scale
        (levels and scale None when ``bits`` is None)."""
        if self.bits is None:
            return Quantized(x, None, None) if grid else x
        out = self._quantize(x, grid)
        return out if grid else out.values

    def _quantize(self, x: torch.Tensor, codes: bool) -> Quantized:
        amax, x_amax, axis = self._range(x)
        return quantize(x, amax, self.bits, axis, x_amax=x_amax, codes=codes)

    def grid(self, x: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """The grid this call would round ``x`` to, ``(scale, may_clip)`` as :func:`grid_of`
        gives it, folding a training batch into the running range as the call does: for a
        caller that applies the rounding itself (the fused output transform of
        :func:`~wasearch.winograd.winograd_conv2d`). ``bits`` must be set."""
        amax, x_amax, axis = self._range(x)
        return grid_of(x, amax, self.bits, axis, x_amax=x_amax)

    def _range(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, int | None]:
        """``(amax, x_amax, axis)`` for this call (see :func:`quantize`)."""
        axis = 0 if self.granularity == "tap" else None
        if self.running and not self.training and self.is_initialized:
            return torch.maximum(self.min_val.abs(), self.max_val.abs()), None, axis
        lo, hi = self._batch_range(x)
        x_amax = torch.maximum(lo.abs(), hi.abs())
        if not self.running or not self.training:
            # Weights (their own range), or evaluation before any training batch (this batch's
            # range, nothing kept).
            return x_amax, x_amax, axis
        self._fold(lo, hi)
        return torch.maximum(self.min_val.abs(), self.max_val.abs()), x_amax, axis
