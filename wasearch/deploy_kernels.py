"""Deploy kernels: the real convolutions a deployed network runs, float32 and 8-bit.

:mod:`wasearch.deploy` converts a trained network into modules of this file; the latency models
(``wasearch.latency``) time them one by one. Direct convolutions are
``torch.nn.functional.conv2d``; Winograd F(m x m, 3 x 3) (Lavin & Gray, CVPR 2016, equation (8))
transforms the filters once, gathers input tiles, applies ``B^T d B``, multiplies in the Winograd
domain as one batched GEMM over the ``(m + 2)^2`` tile positions and applies ``A^T M A``.

Kernel layout (measured on a 2-core AVX2 machine; see ``benchmarks/kernels.py``): the network
runs in channels-last memory format, so a tile gather copies contiguous runs of channels and the
untiling writes them; each 2-D transform is two small GEMMs (one per axis) for F4 and larger,
where the Kronecker form ``kron(B^T, B^T)`` does 3-4x more multiply-adds, and the Kronecker form
for F2, where the two are equal and one GEMM is cheaper than two; large batches run in groups of
images of about ``CHUNK_TILES`` tiles so the intermediate tensors stay in cache.

**8-bit.** Where this machine has an integer kernel, 8-bit layers use it:
``torch.ops.onednn.qconv2d_pointwise`` (uint8 activations x int8 weights, int32 accumulation,
float32 output) for direct convolutions; for the Winograd-domain product, wasearch's own
``q8_product`` (one u8 x s8 GEMM per tile position on AVX-512 VNNI, the same integer sums and
weight scales; ``WinogradConv.int8_product`` says which runs) where the compiled kernels are the
AVX-512 build and the CPU has VNNI, else the oneDNN kernel as a grouped 1x1 convolution (one
group per tile position). ``torch._int_mm`` exists on the CPU but
is a reference loop about 40x slower than float32 ``matmul`` here, so it is not used. Without
VNNI (AVX2 only) the u8 x s8 instruction saturates when both operands use their full range, so
one side keeps 7 bits: non-negative activations (post-ReLU inputs) use levels 0..127, which is
exactly the 8-bit symmetric grid of such data, with 8-bit weights; signed activations (the
Winograd-domain input) keep 8 bits (zero point 128) and the weights 7. Weights are quantized per
output channel after BN folding, activations per tensor with the range the training quantizers
learned (or measured on a calibration batch), so an 8-bit deploy model approximates, and does not
bit-match, the fake-quantized training model (Jacob et al., CVPR 2018, describe the scheme).
Bit-widths with no integer kernel here (e.g. 4, 16) run in float32 and are reported in
``DeployResNet.substituted``; the latency models price them analytically and flag them.
Where the compiled CPU kernels are built and the Winograd-domain range is fixed (a deployed
model's, or a timed layer's), the 8-bit Winograd kernel quantizes its tiles inside the input
transform's pass (uint8 straight into the product's layout) and scales each
position's product inside the output transform's: three passes per group of images, where the
float Winograd-domain input was written, then read and rewritten five times by the quantizer's
torch chain, and the product rescaled in a pass of its own. With ``q8_product``, whose weights
of all positions fit in 3 MiB, one: each block of tiles is transformed, quantized, multiplied
and transformed back through buffers in cache (``winograd_q8_conv``), and the whole layer is
one call into the kernels.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_kernels
from .int8_kernels import (
    ActRange,
    has_int_kernel,
    int8_available,
    qconv,
    qprepack,
    quantize_act,
    quantize_weight,
)
from .winograd import tile_counts

__all__ = [
    "CHUNK_TILES",
    "DirectConv",
    "Head",
    "WinogradConv",
    "has_int_kernel",
    "int8_available",
    "winograd_deploy_conv2d",
    "winograd_input_tiles",
]

#: Tiles from which the separable (two-GEMM) transform is used; below, the Kronecker form.
_SEPARABLE_FROM_TILE = 4
#: Tiles per group of images the Winograd pipeline runs on (see ``winograd_deploy_conv2d``):
#: 256 tiles keep a group's Winograd-domain tensors near 2 MB for 64 channels, so they stay in
#: cache between the stages, while the per-position GEMMs stay large enough to be efficient
#: (2-core AVX2 machine, batch 32, F4, time relative to conv2d: 64 channels at 32x32 from 2.5x
#: with the whole batch at once to 1.1x; 64 at 16x16 from 1.4x to 0.9x).
CHUNK_TILES = 256


# -- modules -------------------------------------------------------------------------------------
class DirectConv(nn.Module):
    """Direct convolution (any kernel size, stride 1): float32, or 8-bit on oneDNN.

    ``weight``/``bias`` already carry the folded BatchNorm. ``bits=8`` needs
    :func:`int8_available`; ``act_amax`` fixes the input range (None: measured on every call).
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        *,
        padding: int,
        bits: int | None = None,
        act_amax: float | None = None,
        signed_input: bool = False,
    ) -> None:
        super().__init__()
        if bits not in (None, 8):
            raise ValueError(f"bits={bits!r}: DirectConv runs float32 (None) or 8-bit")
        self.in_channels = weight.shape[1]
        self.out_channels = weight.shape[0]
        self.kernel_size = weight.shape[2]
        self.padding = padding
        self.bits = bits
        self.signed_input = signed_input
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        if bits is None:
            self.register_buffer("weight", weight.detach().float().clone())
            return
        # 7 bits on one side keeps AVX2's u8 x s8 pair sums inside int16 (see the module doc).
        self.x_zp, self.x_top, self.x_levels = (128, 255, 127) if signed_input else (0, 127, 127)
        w_levels = 63 if signed_input else 127
        self.range = ActRange(act_amax)
        qw, scales = quantize_weight(weight.detach().float(), w_levels)
        self.register_buffer("w_scales", scales)
        self.register_buffer("qweight", qw)
        self._packed: dict[float, torch.Tensor] = {}

    def extra_repr(self) -> str:
        kind = "float32" if self.bits is None else "int8 (oneDNN)"
        return (
            f"{self.in_channels}, {self.out_channels}, kernel={self.kernel_size}, "
            f"padding={self.padding}, {kind}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bits is None:
            return F.conv2d(x, self.weight, self.bias, padding=self.padding)
        scale = self.range.scale(x, self.x_levels)
        packed = self._packed.get(scale)
        if packed is None:  # prepacking depends on the input scale; fixed ranges pack once
            packed = qprepack(self.qweight, self.w_scales, scale, self.x_zp, self.padding, 1)
            if self.range.amax is not None:
                self._packed = {scale: packed}
        qx = quantize_act(
            x.contiguous(memory_format=torch.channels_last), scale, self.x_zp, self.x_top
        )
        return qconv(qx, scale, self.x_zp, packed, self.w_scales, self.bias, self.padding, 1)


def _images_per_group(n: int, tiles_per_image: int, chunk_tiles: int | None) -> int:
    """Images per group of the Winograd pipeline: whole images holding at least ``chunk_tiles``
    tiles (all ``n`` when ``chunk_tiles`` is None or 0)."""
    return n if not chunk_tiles else min(n, max(1, -(-chunk_tiles // tiles_per_image)))


def _apply_2d(
    mat: torch.Tensor, kron: torch.Tensor | None, t: torch.Tensor, a: int, x: int
) -> torch.Tensor:
    """``mat t mat^T`` for every column of ``t`` laid out as (a, a, x): returns (r, r, x)."""
    r = mat.shape[0]
    if kron is not None:  # one GEMM with the (r^2, a^2) Kronecker matrix
        return (kron @ t.reshape(a * a, x)).view(r, r, x)
    t1 = (mat @ t.reshape(a, a * x)).view(r, a, x)  # first axis
    return torch.matmul(mat, t1)  # second axis: r GEMMs (r, a) @ (a, x) -> (r, r, x)


def winograd_deploy_conv2d(
    x: torch.Tensor,
    u_t: torch.Tensor,
    A_t: torch.Tensor,
    B_t: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    kron_a: torch.Tensor | None = None,
    kron_b: torch.Tensor | None = None,
    product: Any = None,
    chunk_tiles: int | None = CHUNK_TILES,
    fused: bool = False,
) -> torch.Tensor:
    """3x3, stride-1, padding-1 convolution as Winograd F(m x m, 3 x 3), weights pre-transformed.

    Args:
        x: (N, C, H, W); fastest in channels-last memory format.
        u_t: the filters in the Winograd domain, ``G g G^T`` laid out as (alpha^2, C, K).
        A_t, B_t: output (m, alpha) and input (alpha, alpha) transforms.
        bias: (K,) added to the output.
        kron_a, kron_b: ``kron(A_t, A_t)`` and ``kron(B_t, B_t)`` to apply a 2-D transform as one
            GEMM; when None the transform runs as two GEMMs, one per axis.
        product: replaces the float32 Winograd-domain GEMM: a callable
            ``(v (alpha^2, tiles, C)) -> (alpha^2, tiles, K)`` (the 8-bit kernel).
        chunk_tiles: run the pipeline on groups of whole images holding at least this many tiles,
            so that the Winograd-domain tensors of a group stay in cache between the stages
            (None: all images at once).
        fused: on the CPU in float32, where wasearch's compiled kernels are built
            (:mod:`wasearch.cpu_kernels`), gather and transform the tiles in one pass and
            transform, untile and add the bias in another (the 2-D transforms' sums in their
            own order: equal up to float rounding); else ignored.

    Returns (N, K, H, W), contiguous in channels-last memory format, also where H or W is not a
    multiple of m (a strided view there made the operations after the layer, a batch norm or
    the next convolution, up to 3x slower: they paid for the layer's crop).
    """
    n, c, h, w = x.shape
    m, a = A_t.shape
    a2 = a * a
    th, tw = tile_counts(h, w, m)
    per_image = th * tw
    step = _images_per_group(n, per_image, chunk_tiles)

    ext = None
    if fused and x.device.type == "cpu" and x.dtype == torch.float32:
        ext = cpu_kernels.kernels()
    if ext is not None and product is None:  # the whole layer in one call (no Python loop)
        xn = x.permute(0, 2, 3, 1).contiguous()  # a view of channels-last data: no copy
        out = ext.winograd_f32_conv(xn, B_t.contiguous(), A_t.contiguous(), u_t, bias, step)
        return out.permute(0, 3, 1, 2)
    if ext is not None:
        xn = x.permute(0, 2, 3, 1).contiguous()  # a view of channels-last data: no copy
        b_t, a_t = B_t.contiguous(), A_t.contiguous()
        no_bias = torch.empty(0, dtype=x.dtype)  # the kernel's "no bias"
        out = None
        for i in range(0, n, step):
            nb = min(step, n - i)
            v = ext.winograd_input(xn, b_t, m, th, tw, i, nb)
            mprod = product(v).contiguous()  # the 8-bit product without a fixed range
            if out is None:  # K is known once the product has run (the int8 one says it)
                k = mprod.shape[2]  # the output as cropped: the kernel skips what lies past it
                out = torch.empty((n, h, w, k), dtype=x.dtype, device=x.device)
            ext.winograd_output(mprod, a_t, no_bias if bias is None else bias, out, th, tw, i)
        return out.permute(0, 3, 1, 2)

    # Tiles: alpha x alpha windows, stride m, of the input padded by 1 (the conv's padding) and
    # bottom/right up to whole tiles; gathered from NHWC so each copy moves C contiguous values.
    xp = F.pad(x, (1, tw * m + 1 - w, 1, th * m + 1 - h)).permute(0, 2, 3, 1)  # (N, Hp, Wp, C)
    if not xp.is_contiguous():
        xp = xp.contiguous()
    s_n, s_h, s_w, s_c = xp.stride()
    out = None
    for i in range(0, n, step):
        nb = min(step, n - i)
        nt = nb * per_image
        tiles = xp.as_strided(
            (a, a, nb, th, tw, c),
            (s_h, s_w, s_n, m * s_h, m * s_w, s_c),
            xp.storage_offset() + i * s_n,
        ).contiguous()  # (a, a, nb, th, tw, C)
        v = _apply_2d(B_t, kron_b, tiles, a, nt * c).view(a2, nt, c)  # B^T d B
        # (a2, NT, K): the Hadamard product summed over C, one GEMM per tile position
        mprod = torch.bmm(v, u_t) if product is None else product(v)
        k = mprod.shape[2]
        y = _apply_2d(A_t, kron_a, mprod, a, nt * k)  # (m, m, NT*K): A^T M A
        if out is None:
            out = torch.empty((n, th, m, tw, m, k), dtype=y.dtype, device=y.device)
        yv = y.view(m, m, nb, th, tw, k).permute(2, 3, 0, 4, 1, 5)
        if bias is None:
            out[i : i + nb].copy_(yv)
        else:
            torch.add(yv, bias, out=out[i : i + nb])  # the untiling copy and the bias in one pass
    out = out.view(n, th * m, tw * m, out.shape[-1])
    if th * m != h or tw * m != w:  # cropped, then one contiguous NHWC tensor again
        out = out[:, :h, :w].contiguous()
    return out.permute(0, 3, 1, 2)


def winograd_input_tiles(x: torch.Tensor, m: int) -> torch.Tensor:
    """The input tiles of F(m x m, 3 x 3) as (alpha, alpha, N * C * tiles): alpha x alpha
    windows, stride m, of ``x`` (N, C, H, W) padded by 1 (the conv's padding) and bottom/right
    up to whole tiles, as :func:`winograd_deploy_conv2d` gathers them (any H, W: a layer smaller
    than the tile is one partial tile). For the 8-bit kernel's activation ranges."""
    n, _, h, w = x.shape
    a = m + 2
    th, tw = tile_counts(h, w, m)
    xp = F.pad(x, (1, tw * m + 1 - w, 1, th * m + 1 - h))
    cols = F.unfold(xp.contiguous(), a, stride=m)
    t = cols.shape[-1]
    return cols.view(n, -1, a, a, t).permute(2, 3, 0, 1, 4).reshape(a, a, -1)


class WinogradConv(nn.Module):
    """Winograd F(m x m, 3 x 3) deploy kernel: weights transformed once, at construction.

    Args:
        weight: (K, C, 3, 3) with the BatchNorm folded in; bias likewise.
        A_t, G, B_t: the transforms (static Cook-Toom or learned flex values).
        bits: None (float32) or 8 (the Winograd-domain product on oneDNN's int8 kernel).
        act_amax: the range of the Winograd-domain input ``B^T d B`` for 8-bit: a number, or one
            per tile position (alpha^2,); None: measured per call.
        transform: ``"auto"`` (``"fused"`` where wasearch's compiled CPU kernels are built,
            else two GEMMs per 2-D transform from F4 up and Kronecker below), ``"fused"``
            (tiles gathered and transformed in one pass, the output transformed and untiled in
            another: :func:`winograd_deploy_conv2d`'s ``fused``; on CUDA, or where the kernels
            are not built, it runs as ``"separable"``), ``"kron"`` or ``"separable"``.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        A_t: torch.Tensor,
        G: torch.Tensor,
        B_t: torch.Tensor,
        *,
        bits: int | None = None,
        act_amax: float | torch.Tensor | None = None,
        transform: str = "auto",
    ) -> None:
        super().__init__()
        if bits not in (None, 8):
            raise ValueError(f"bits={bits!r}: WinogradConv runs float32 (None) or 8-bit")
        if transform not in ("auto", "fused", "kron", "separable"):
            raise ValueError(
                f"transform={transform!r}; use 'auto', 'fused', 'kron' or 'separable'"
            )
        if transform == "auto" and cpu_kernels.kernels() is not None:
            transform = "fused"
        #: Whether the fused CPU kernels run the transforms (see ``transform``).
        self.fused = transform == "fused"
        k, c = weight.shape[:2]
        m, a = A_t.shape
        self.in_channels, self.out_channels, self.tile, self.bits = c, k, m, bits
        A_t, G, B_t = (t.detach().float() for t in (A_t, G, B_t))
        w = weight.detach().float()
        u = (torch.kron(G, G) @ w.reshape(k * c, 9).t()).reshape(a * a, k, c)  # U = G g G^T
        self.register_buffer("A_t", A_t.clone())
        self.register_buffer("B_t", B_t.clone())
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        kron = transform == "kron" or (transform == "auto" and m < _SEPARABLE_FROM_TILE)
        self.register_buffer("kron_a", torch.kron(A_t, A_t) if kron else None)
        self.register_buffer("kron_b", torch.kron(B_t, B_t) if kron else None)
        #: Tiles per group of images the pipeline runs on (None: the whole batch at once).
        self.chunk_tiles: int | None = CHUNK_TILES
        if bits is None:
            self.register_buffer("u_t", u.transpose(1, 2).contiguous())  # (a2, C, K)
            return
        # The Winograd-domain input is signed: 8 bits (zero point 128), weights 7 (module doc).
        # Its scales are per tile position (the positions' ranges differ by orders of magnitude),
        # which a per-tensor kernel takes by quantizing v_p / s_p and multiplying the product of
        # position p by s_p afterwards, in the copy that reorders it anyway.
        if act_amax is not None:
            act_amax = torch.as_tensor(act_amax, dtype=torch.float32).expand(a * a).clone()
        self.register_buffer("act_amax", act_amax)
        qu, scales = quantize_weight(u.reshape(a * a * k, c, 1, 1), 63)
        self.register_buffer("u_scales", scales)
        self.register_buffer("qu", qu)
        ext = cpu_kernels.kernels()
        #: The fused form's 8-bit Winograd-domain product: ``"vnni"``, wasearch's own kernel
        #: (the AVX-512 build on a CPU with VNNI: ``q8_product``), else ``"onednn"``, the grouped
        #: 1x1 convolution (the other forms always run that one). The same integer sums and
        #: weight scales; set it to compare the two.
        self.int8_product = "vnni" if ext is not None and ext.q8_product_supported() else "onednn"

    #: The forms :meth:`set_form` takes: 2-D transforms fused with the tiling (compiled CPU
    #: kernels), as one Kronecker GEMM or as two 1-D
    #: GEMMs, the batch in groups of about ``CHUNK_TILES`` tiles or whole. Every form computes
    #: the same convolution with the same transforms and products (equal up to float rounding).
    FORMS = (
        ("fused", CHUNK_TILES),
        ("fused", None),
        ("kron", CHUNK_TILES),
        ("separable", CHUNK_TILES),
        ("kron", None),
        ("separable", None),
    )

    @property
    def form(self) -> tuple[str, int | None]:
        """``(transform, chunk_tiles)``: how this kernel runs now (one of :data:`FORMS`)."""
        return (self._transform_name(), self.chunk_tiles)

    def _transform_name(self) -> str:
        if getattr(self, "fused", False):
            return "fused"
        return "kron" if self.kron_a is not None else "separable"

    def set_form(self, transform: str, chunk_tiles: int | None) -> None:
        """Run as ``transform`` (``"fused"``, ``"kron"`` or ``"separable"``) in groups of
        ``chunk_tiles`` tiles (None: the whole batch); see :data:`FORMS`."""
        if (transform, chunk_tiles) not in self.FORMS:
            raise ValueError(f"form ({transform!r}, {chunk_tiles!r}); use one of {self.FORMS}")
        kron = transform == "kron"
        self.kron_a = torch.kron(self.A_t, self.A_t) if kron else None
        self.kron_b = torch.kron(self.B_t, self.B_t) if kron else None
        self.chunk_tiles = chunk_tiles
        self.fused = transform == "fused"

    def extra_repr(self) -> str:
        product = getattr(self, "int8_product", "onednn")
        kind = "float32" if self.bits is None else f"int8 product ({product})"
        form = self._transform_name()
        return (
            f"{self.in_channels}, {self.out_channels}, F({self.tile}x{self.tile}, 3x3), "
            f"{kind}, {form} transforms"
        )

    def _int8_product(self, v: torch.Tensor) -> torch.Tensor:
        a2, nt, c = v.shape
        amax = self.act_amax
        if amax is None:  # no trained or calibrated range: this batch's, per position
            amax = v.detach().abs().reshape(a2, -1).amax(dim=1)
        scale = amax.clamp_min(1e-12) / 127  # (a2,)
        # Quantize straight into the (NT, a2, C) layout that the grouped 1x1 convolution reads as
        # channels-last (1, a2*C, NT, 1): one group per tile position.
        buf = torch.empty((nt, a2, c), dtype=v.dtype, device=v.device)
        torch.mul(v.permute(1, 0, 2), (1.0 / scale).view(1, a2, 1), out=buf)
        q = quantize_act(buf, 1.0, 128, 255, out=buf)
        q = q.as_strided((1, a2 * c, nt, 1), (nt * a2 * c, 1, a2 * c, a2 * c))
        mprod = qconv(q, 1.0, 128, self._onednn_weights(), self.u_scales, None, 0, a2)
        k = mprod.shape[1] // a2
        out = torch.empty((a2, nt, k), dtype=mprod.dtype, device=mprod.device)
        mv = mprod.as_strided((nt, a2, k), (a2 * k, k, 1)).permute(1, 0, 2)
        return torch.mul(mv, scale.view(a2, 1, 1), out=out)

    def _derived(self, attr: str, source: torch.Tensor, build: Callable[[], Any]) -> Any:
        """``build()``, kept in ``attr`` until ``source`` is replaced or changed in place (a
        range set after construction, as the latency models do; weights loaded)."""
        key = (id(source), source._version)
        cached = getattr(self, attr, None)
        if cached is None or cached[0] != key:
            cached = (key, build())
            setattr(self, attr, cached)
        return cached[1]

    def _position_scales(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, 1 / scale) per tile position for the fixed range ``act_amax``."""

        def build() -> tuple[torch.Tensor, torch.Tensor]:
            scale = (self.act_amax.float().clamp_min(1e-12) / 127).contiguous()
            return scale, 1.0 / scale

        return self._derived("_scales_for", self.act_amax, build)

    def _onednn_weights(self) -> torch.Tensor:
        """``qu`` prepacked for oneDNN's grouped 1x1 convolution (one group per tile position),
        built on first use: where the VNNI product runs it is never needed, and it would be a
        third copy of the layer's Winograd-domain weights."""
        a2 = (self.tile + 2) ** 2
        return self._derived(
            "_onednn_for", self.qu, lambda: qprepack(self.qu, self.u_scales, 1.0, 128, 0, a2)
        )

    def _vnni_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The int8 Winograd-domain filters as ``q8_product`` reads them: (packed (alpha^2,
        K16 / 16, C4 / 4, 16, 4), their sums over the input channels (alpha^2, K16) int32, the
        weight scales (alpha^2, K16)), K padded to K16 (a multiple of 16) and C to C4 (of 4)
        with zeros."""

        def build() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            a2, k, c = (self.tile + 2) ** 2, self.out_channels, self.in_channels
            c4, k16 = -(-c // 4) * 4, -(-k // 16) * 16
            w = self.qu.view(a2, k, c)
            padded = torch.zeros((a2, k16, c4), dtype=torch.int8)
            padded[:, :k, :c] = w
            packed = padded.view(a2, k16 // 16, 16, c4 // 4, 4).permute(0, 1, 3, 2, 4).contiguous()
            sums = torch.zeros((a2, k16), dtype=torch.int32)
            sums[:, :k] = w.sum(dim=2, dtype=torch.int32)
            scales = torch.zeros((a2, k16))
            scales[:, :k] = self.u_scales.view(a2, k)
            return packed, sums, scales

        return self._derived("_vnni_for", self.qu, build)

    def _forward_int8_fused(self, x: torch.Tensor, ext: Any) -> torch.Tensor:
        """The 8-bit kernel in three passes per group of images: tiles gathered, transformed and
        quantized to uint8 (one kernel: the float Winograd-domain input is never written), the
        int8 product, and the output transform that scales each position's product, untiles
        and adds the bias. Same values as the unfused form's up to float rounding (the
        quantized input bit for bit; the position scale applied in the transform's weights).
        With the VNNI product the whole layer is one call into the compiled kernels, and where
        its Winograd-domain weights fit in cache (``winograd_q8_conv``), the three passes run per
        block of a few dozen tiles, their intermediates never leaving the cache."""
        plan = self._make_plan(x, ext)  # the VNNI product: the layer in one call
        if plan is not None:
            return _run_plan(plan, x)
        n, c, h, w = x.shape
        m, a2, k = self.tile, (self.tile + 2) ** 2, self.out_channels
        th, tw = tile_counts(h, w, m)
        step = _images_per_group(n, th * tw, getattr(self, "chunk_tiles", CHUNK_TILES))
        scale, inv = self._position_scales()
        xn = x.permute(0, 2, 3, 1)  # a view of channels-last data: no copy
        bias = self.bias if self.bias is not None else torch.empty(0)
        out = torch.empty((n, h, w, k), dtype=x.dtype)
        for i in range(0, n, step):
            nb = min(step, n - i)
            q = ext.winograd_input_q8(xn, self.B_t, m, th, tw, i, nb, inv, 128, c, False)
            nt = q.shape[0]
            q = q.as_strided((1, a2 * c, nt, 1), (nt * a2 * c, 1, a2 * c, a2 * c))
            mprod = qconv(q, 1.0, 128, self._onednn_weights(), self.u_scales, None, 0, a2)
            if not mprod.is_contiguous(memory_format=torch.channels_last):
                mprod = mprod.contiguous(memory_format=torch.channels_last)
            mv = mprod.as_strided((a2, nt, k), (k, a2 * k, 1))  # its (NT, a2, K) memory
            ext.winograd_output(mv, self.A_t, bias, out, th, tw, i, scale)
        return out.permute(0, 3, 1, 2)

    def _plan_key(self, x: torch.Tensor, ext: Any) -> tuple[Any, ...]:
        """What a call plan depends on: the input's shape and kind, the form, and the identity
        and version of every buffer it reads (replaced, or changed in place: a range set after
        construction, weights loaded). The plan holds the buffers, so their ids stay theirs."""
        b, d = self._buffers, self.__dict__
        w = b["qu"] if self.bits is not None else b["u_t"]
        bufs = (b["A_t"], b["B_t"], w, b["bias"], b.get("act_amax"))
        form = (d.get("fused"), d.get("chunk_tiles"), d.get("int8_product"))
        versions = [(id(t), None if t is None else t._version) for t in bufs]
        return (x.shape, x.dtype, x.is_cpu, id(ext), form, versions)

    def _make_plan(self, x: torch.Tensor, ext: Any) -> tuple[Any, tuple[Any, ...]] | None:
        """The layer as one call into the compiled kernels, ``(kernel, arguments after the
        input)`` (None where this input runs another way): :meth:`forward` keeps it while
        :meth:`_plan_key` stays the same. At batch 1 a layer is some ten microseconds of
        kernel, and reading the module's buffers, the range's scales and the packed weights
        on every call (each through ``nn.Module.__getattr__``) cost half as much again (Zen 5,
        1 thread, an 8-bit 64 -> 64 layer at 8 x 8: 15.7 us per call before, 10.7 with the
        plan, 7.1 of them the kernel's call itself)."""
        fused = getattr(self, "fused", False)
        if ext is None or not x.is_cpu or x.dtype != torch.float32 or not fused:
            return None
        n, _, h, w = x.shape
        m, k = self.tile, self.out_channels
        th, tw = tile_counts(h, w, m)
        step = _images_per_group(n, th * tw, getattr(self, "chunk_tiles", CHUNK_TILES))
        if self.bits is None:
            fn, b_t, a_t = ext.winograd_f32_conv, self.B_t.contiguous(), self.A_t.contiguous()
            args: tuple[Any, ...] = (b_t, a_t, self.u_t, self.bias, step)
        elif self.act_amax is not None and getattr(self, "int8_product", "onednn") == "vnni":
            scale, inv = self._position_scales()
            packed, sums, w_scales = self._vnni_weights()
            fn = ext.winograd_q8_conv
            args = (self.B_t, self.A_t, inv, scale, packed, sums, w_scales, k, self.bias, step)
        else:
            return None
        return fn, args

    def __getstate__(self) -> dict[str, Any]:
        """The module's state without what it derives on use: its call plan (it holds the
        compiled kernels' functions, which do not pickle) and the ``_derived`` copies (oneDNN's
        prepacked weights are an opaque tensor, which neither pickles nor copies)."""
        state = super().__getstate__()
        for derived in ("_plan", "_scales_for", "_onednn_for", "_vnni_for"):
            state.pop(derived, None)
        return state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous(memory_format=torch.channels_last)
        # the compiled kernels serve the fused form on the CPU only (elsewhere, no build tried)
        fused = getattr(self, "fused", False)
        ext = cpu_kernels.kernels() if fused and x.is_cpu else None
        key = self._plan_key(x, ext)
        plan = self.__dict__.get("_plan")
        if plan is None or plan[0] != key:
            # the sources in the plan too: their ids in the key cannot be reused while it lives
            b = self._buffers
            sources = (b["A_t"], b["B_t"], b["bias"], b.get("act_amax"), b.get("qu"), b.get("u_t"))
            plan = (key, self._make_plan(x, ext), sources)
            self.__dict__["_plan"] = plan
        if plan[1] is not None:
            return _run_plan(plan[1], x)
        if (
            self.bits is not None
            and self.act_amax is not None
            and getattr(self, "fused", False)
            and x.device.type == "cpu"
            and x.dtype == torch.float32
        ):
            ext = cpu_kernels.kernels()
            if ext is not None:
                return self._forward_int8_fused(x, ext)
        return winograd_deploy_conv2d(
            x,
            self.u_t if self.bits is None else self.qu,
            self.A_t,
            self.B_t,
            bias=self.bias,
            kron_a=self.kron_a,
            kron_b=self.kron_b,
            product=None if self.bits is None else self._int8_product,
            chunk_tiles=getattr(self, "chunk_tiles", CHUNK_TILES),
            fused=getattr(self, "fused", False),
        )


def _run_plan(plan: tuple[Any, tuple[Any, ...]], x: torch.Tensor) -> torch.Tensor:
    """A :meth:`WinogradConv._make_plan` call on ``x`` (channels-last): NHWC in, NCHW view out."""
    fn, args = plan
    return fn(x.permute(0, 2, 3, 1), *args).permute(0, 3, 1, 2)


class Head(nn.Module):
    """Global average pooling and the float classifier."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.register_buffer("weight", weight.detach().float().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.mean(dim=(2, 3)), self.weight, self.bias)
