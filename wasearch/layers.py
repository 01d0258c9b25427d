"""Winograd-aware and quantized layers.

``WinogradConv2d`` is the Winograd-aware (WA) layer of Fernandez-Marques et al., "Searching for
Winograd-aware Quantized Networks" (MLSys 2020): a 3x3 convolution that runs the whole Winograd
pipeline of Lavin & Gray (2016), equation (8), in its forward pass, every stage fake-quantized, so
that training sees the error that deploying it as Winograd would make. With ``mode="flex"`` the
transforms ``A^T``, ``G`` and ``B^T`` are trainable parameters, initialized from the Cook-Toom
matrices; with ``mode="static"`` they are fixed buffers.

Winograd here is stride 1 only (a strided Winograd convolution computes, and throws away, most of
its outputs); the backbone therefore replaces stride-2 3x3 convolutions with 2x2 max-pooling
followed by a stride-1 convolution, as the paper's code does.

``Conv2d`` and ``Linear`` are their torch namesakes with input, weight and output fake-quantized.
All three keep ``.weight`` in torch's shape, so a checkpoint of a direct-convolution network loads
into any Winograd-aware one and back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .geometry import CONV_KINDS, GRANULARITIES, MAX_TILE, TRANSFORM_SCALES
from .quant import FakeQuantize, check_bits, fake_quantize, fake_quantize_pow2
from .winograd import transform_matrices, winograd_conv2d

__all__ = ["CONV_KINDS", "GRANULARITIES", "Conv2d", "Linear", "WinogradConv2d"]


class Conv2d(nn.Conv2d):
    """``torch.nn.Conv2d`` with fake-quantized input, weight and output (``bits=None``: float)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        *,
        bias: bool = False,
        bits: int | None = None,
        **kwargs,
    ) -> None:
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, bias=bias, **kwargs
        )
        self.bits = check_bits(bits)
        self.q_input = FakeQuantize(bits)
        self.q_weight = FakeQuantize(bits, running=False)
        self.q_output = FakeQuantize(bits)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, *, bits: int | None) -> Conv2d:
        """The fake-quantized twin of any ``nn.Conv2d``: same geometry, weight and bias."""
        layer = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            conv.padding,
            bias=conv.bias is not None,
            bits=bits,
            dilation=conv.dilation,
            groups=conv.groups,
            padding_mode=conv.padding_mode,
        )
        layer.to(device=conv.weight.device, dtype=conv.weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(conv.weight)
            if conv.bias is not None:
                layer.bias.copy_(conv.bias)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bits is None:
            return super().forward(x)
        w = self.q_weight(self.weight)
        y = self._conv_forward(self.q_input(x), w, self.bias)
        return self.q_output(y)


class Linear(nn.Linear):
    """``torch.nn.Linear`` with fake-quantized input, weight and output (``bits=None``: float)."""

    def __init__(
        self, in_features: int, out_features: int, *, bias: bool = True, bits: int | None = None
    ) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.bits = check_bits(bits)
        self.q_input = FakeQuantize(bits)
        self.q_weight = FakeQuantize(bits, running=False)
        self.q_output = FakeQuantize(bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bits is None:
            return super().forward(x)
        y = F.linear(self.q_input(x), self.q_weight(self.weight), self.bias)
        return self.q_output(y)


class WinogradConv2d(nn.Module):
    """3x3 stride-1 padding-1 convolution computed as Winograd F(m x m, 3 x 3), Winograd-aware.

    Args:
        in_channels, out_channels: as ``nn.Conv2d``.
        tile: output tile size m (2, 4, 6; any 1..8 works); the input tile is m + 2.
        mode: ``"static"`` (Cook-Toom transforms, fixed) or ``"flex"`` (transforms learned).
        bits: 2..16 to fake-quantize every stage, or None for floating point.
        bias: add a learned bias (after the output transform).
        granularity: ``"tensor"`` (one range per Winograd-domain quantizer, the paper's) or
            ``"tap"`` (one range per tile position, Andri et al. 2022).
        points: the finite interpolation points of the transforms (default: see ``winograd``).
        padding: zero padding per side, as ``nn.Conv2d`` (default 1, "same").
        transforms: how the transform matrices are quantized: ``"tensor"`` (one scale per
            matrix, the paper's) or ``"tap"`` (one power-of-two scale per tile position: per
            column of ``A^T``, per row of ``G`` and ``B^T``).
        wd_bits: the precision of the Winograd domain (the transformed weights and inputs and
            their Hadamard product), 2..16; None: ``bits``.

    ``transforms="tap"``: one scale per position is what a tap-wise integer kernel applies
    anyway (a per-position multiplier when it requantizes the Winograd-domain tensors), so the
    per-position scales of the transforms fold into it at no cost, and a power-of-two scale
    represents every entry of the default Cook-Toom matrices exactly at 8 bits: with one scale
    per matrix, F6's ``A^T`` (entries 1/32 .. 32) rounds its powers of 1/2 below 1/4 to zero.

    Quantized stages when ``bits`` is set: the input, the weights, the transforms (static: their
    exact values are fixed, so the quantized ones are too; flex: re-quantized every step), the
    weights in the Winograd domain ``G g G^T``, the input in the Winograd domain ``B^T d B``, the
    Hadamard product summed over input channels, and the output. Weight-like tensors use their
    own range; activation-like ones a running range (see ``quant``).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        tile: int = 4,
        mode: str = "static",
        bits: int | None = None,
        *,
        bias: bool = False,
        granularity: str = "tensor",
        points=None,
        padding: int | tuple[int, int] = 1,
        transforms: str = "tensor",
        wd_bits: int | None = None,
    ) -> None:
        super().__init__()
        pad = (padding, padding) if isinstance(padding, int) else tuple(padding)
        if len(pad) != 2 or not all(isinstance(p, int) and p >= 0 for p in pad):
            raise ValueError(f"padding={padding!r}; use an integer >= 0 or a pair of them")
        #: Zero padding per side (height, width); Winograd computes padding 1, other amounts pad
        #: the input further or crop the output.
        self.padding = pad
        if mode not in ("static", "flex"):
            raise ValueError(f"mode={mode!r}; use 'static' or 'flex'")
        if not isinstance(tile, int) or not 1 <= tile <= MAX_TILE:
            raise ValueError(f"tile={tile!r}; use an integer in 1..{MAX_TILE} (2, 4 or 6 usual)")
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity={granularity!r}; use one of {GRANULARITIES}")
        if transforms not in TRANSFORM_SCALES:
            raise ValueError(f"transforms={transforms!r}; use one of {TRANSFORM_SCALES}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.tile = tile
        self.mode = mode
        self.bits = check_bits(bits)
        try:
            self.wd_bits = check_bits(wd_bits)
        except ValueError as err:
            raise ValueError(f"wd_{err}") from None  # "wd_bits=20 is not supported; ..."
        if self.wd_bits is not None and self.bits is None:
            raise ValueError(f"wd_bits={wd_bits!r} needs bits (a quantized layer)")
        self.granularity = granularity
        self.transform_scales = transforms
        self.kernel_size = (3, 3)
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, 3, 3))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        # Same initialization as nn.Conv2d, so the two are interchangeable from scratch too.
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)

        self.points = None if points is None else tuple(points)
        A_t, G, B_t = transform_matrices(tile, 3, points)
        if mode == "flex":
            self.A_t = nn.Parameter(A_t)
            self.G = nn.Parameter(G)
            self.B_t = nn.Parameter(B_t)
        else:
            self.register_buffer("A_t", A_t)
            self.register_buffer("G", G)
            self.register_buffer("B_t", B_t)

        a2 = (tile + 2) ** 2
        tap = {"granularity": granularity, "channels": a2}
        self.q_input = FakeQuantize(bits)
        self.q_weight = FakeQuantize(bits, running=False)
        self.q_transform = FakeQuantize(bits, running=False)
        wd = self.wd_bits if self.wd_bits is not None else bits
        self.q_weight_wd = FakeQuantize(wd, running=False, **tap)
        self.q_input_wd = FakeQuantize(wd, **tap)
        self.q_product = FakeQuantize(wd, **tap)
        self.q_output = FakeQuantize(bits)

    @classmethod
    def from_conv(
        cls,
        conv: nn.Conv2d,
        *,
        tile: int,
        mode: str = "static",
        bits: int | None = None,
        granularity: str = "tensor",
        transforms: str = "tensor",
        wd_bits: int | None = None,
    ) -> WinogradConv2d:
        """The Winograd-aware twin of a 3x3, stride-1, dilation-1, groups-1 zero-padded
        ``conv``: its weight and bias copied (same device and dtype), its padding kept."""
        pad = conv.padding
        if pad == "same":
            pad = (1, 1)
        elif pad == "valid":
            pad = (0, 0)
        if (
            tuple(conv.kernel_size) != (3, 3)
            or tuple(conv.stride) != (1, 1)
            or tuple(conv.dilation) != (1, 1)
            or conv.groups != 1
            or conv.padding_mode != "zeros"
        ):
            raise ValueError(
                f"{conv}: Winograd F(m x m, 3 x 3) needs a 3x3 kernel, stride 1, dilation 1, "
                "groups 1 and zero padding"
            )
        layer = cls(
            conv.in_channels,
            conv.out_channels,
            tile=tile,
            mode=mode,
            bits=bits,
            bias=conv.bias is not None,
            granularity=granularity,
            padding=tuple(pad),
            transforms=transforms,
            wd_bits=wd_bits,
        )
        layer.to(device=conv.weight.device, dtype=conv.weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(conv.weight)
            if conv.bias is not None:
                layer.bias.copy_(conv.bias)
        return layer

    def extra_repr(self) -> str:
        pad = "" if self.padding == (1, 1) else f", padding={self.padding}"
        if self.transform_scales != "tensor":
            pad += f", transforms={self.transform_scales}"
        if self.wd_bits is not None:
            pad += f", wd_bits={self.wd_bits}"
        return (
            f"{self.in_channels}, {self.out_channels}, F({self.tile}x{self.tile}, 3x3), "
            f"mode={self.mode}, bits={self.bits}, granularity={self.granularity}{pad}"
        )

    def _apply(self, fn, recurse=True):
        # A static layer's transforms are exact rationals: after a dtype change (.double()) they
        # are rebuilt in the new precision rather than kept at float32's rounding.
        before = self.A_t.dtype
        out = super()._apply(fn, recurse)
        after = self.A_t.dtype
        if self.mode == "static" and after != before and after.is_floating_point:
            mats = transform_matrices(
                self.tile, 3, self.points, dtype=after, device=self.A_t.device
            )
            for name, mat in zip(("A_t", "G", "B_t"), mats, strict=True):
                setattr(self, name, mat)
        return out

    def _pad_input(self, x: torch.Tensor) -> torch.Tensor:
        """Padding beyond 1 as extra zeros (Winograd's own pass pads by 1)."""
        ph, pw = (max(p - 1, 0) for p in self.padding)
        return F.pad(x, (pw, pw, ph, ph)) if ph or pw else x

    def _crop_output(self, y: torch.Tensor) -> torch.Tensor:
        """Padding 0: the border Winograd's padding-1 pass computed in addition."""
        ph, pw = self.padding
        if ph == 0:
            y = y[..., 1:-1, :]
        if pw == 0:
            y = y[..., :, 1:-1]
        return y

    def transforms(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The transforms as used in the forward pass (fake-quantized when ``bits`` is set).

        A static layer's quantized transforms are a function of fixed buffers: they are kept
        and reused until a buffer changes (its storage, version, dtype or device), rather than
        quantized again at every call (three quantizer calls, ~36 small torch operations per
        pass, which weigh on small networks). Not kept under ``torch.inference_mode``, whose
        tensors autograd could not use later."""
        mats = (self.A_t, self.G, self.B_t)
        if self.bits is None or self.q_transform.bits is None:
            return mats
        if self.mode != "static":
            return self._quantize_transforms(mats)
        key = tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in mats)
        key += (self.transform_scales, self.q_transform.bits)
        cached = getattr(self, "_quantized_transforms", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        with torch.no_grad():
            quantized = self._quantize_transforms(mats)
        if not torch.is_inference_mode_enabled():
            self._quantized_transforms = (key, quantized)
        return quantized

    def _quantize_transforms(self, mats) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.transform_scales == "tensor":
            return tuple(self.q_transform(t) for t in mats)  # type: ignore[return-value]
        A_t, G, B_t = mats
        bits = self.q_transform.bits
        # One scale per tile position: the columns of A^T and the rows of B^T, powers of two
        # (shifts in the integer kernel); the rows of G, whose product with the weights is
        # computed once, offline, each scaled by its largest magnitude.
        g_amax = G.detach().abs().amax(dim=1)
        return (
            fake_quantize_pow2(A_t, bits, 1),
            fake_quantize(G, g_amax, bits, 0, x_amax=g_amax),
            fake_quantize_pow2(B_t, bits, 0),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Other zero paddings than 1 pad the padding-1 pipeline's input further or crop its
        # output; at padding 1 both are no-ops.
        A_t, G, B_t = self.transforms()
        if self.bits is None:
            y = winograd_conv2d(self._pad_input(x), self.weight, A_t, G, B_t, bias=self.bias)
            return self._crop_output(y)
        x, x_grid = self._quantize_keeping_grid(self.q_input, x)
        weight, w_grid = self._quantize_keeping_grid(self.q_weight, self.weight)
        y = winograd_conv2d(
            self._pad_input(x),  # zeros: still on the input's grid
            weight,
            A_t,
            G,
            B_t,
            bias=self.bias,
            quant=self._stage_quantizers(),
            x_grid=x_grid,
            w_grid=w_grid,
        )
        return self.q_output(self._crop_output(y))

    def _quantize_keeping_grid(
        self, q: FakeQuantize, t: torch.Tensor
    ) -> tuple[torch.Tensor, tuple | None]:
        """``q(t)`` and, where the learned transforms keep ``t`` for their gradient (flex,
        training: B^T the input's tiles, G the weights), its grid ``(scale, bits)``, so that
        they keep it as levels."""
        if self.mode != "flex" or not torch.is_grad_enabled():
            return q(t), None
        tq = q(t, grid=True)
        return tq.values, (tq.scale, self.bits)

    def _stage_quantizers(self) -> dict[str, FakeQuantize]:
        return {
            "weight_wd": self.q_weight_wd,
            "input_wd": self.q_input_wd,
            "product": self.q_product,
        }
