"""Cook-Toom transforms for Winograd minimal filtering F(m, r), and the Winograd convolution.

Winograd's minimal filtering algorithm F(m, r) computes m outputs of an r-tap correlation with
m + r - 1 multiplications instead of m * r (Lavin & Gray, "Fast Algorithms for Convolutional Neural
Networks", CVPR 2016). In 2-D, F(m x m, r x r) is the nesting of the 1-D algorithm with itself,
equation (8) in Lavin & Gray:

    Y = A^T [ (G g G^T) * (B^T d B) ] A

for an (m + r - 1)^2 input tile ``d`` and an r x r filter ``g``; ``*`` is the element-wise
(Hadamard) product. Summed over input channels, the Hadamard product becomes one matrix product per
tile position, which is how :func:`winograd_conv2d` computes it.

The matrices come from the Toom-Cook construction: pick ``alpha - 1`` distinct finite
interpolation points plus the point at infinity (``alpha = m + r - 1``). Polynomial products are
evaluated at the points (``G`` evaluates the filter, ``A^T`` evaluates the output polynomial's
Vandermonde transpose) and recovered by Lagrange interpolation (``B^T``). The matrices are built in
exact rational arithmetic (:class:`fractions.Fraction`) and only then converted to float tensors,
so a float64 static Winograd convolution equals a direct one to rounding error. (The original
Winograd-aware code's F(6x6, 3x3) matrices used wrong diagonal scalings and computed no convolution
at all; building from points avoids that class of bug.)

Default points (r = 3): ``0, 1, -1`` for F2, ``0, 1, -1, 2, -2`` for F4, and for F6 ``0, 1, -1, 2,
-2, 1/2, -1/2``. For F6 we take the pair +-1/2 rather than +-3/2 (or +-3): the largest point
stays 2, so the largest entries of ``A^T`` (powers of the points, up to p^5) stay at 32 instead of
243 for +-3, and the spread between the largest and smallest transform entries, which is what
quantization has to cover, is the smallest of the usual choices (Barabasz et al., "Error Analysis
and Improving the Accuracy of Winograd Convolution for Deep Neural Networks", 2020, find
reciprocal pairs such as +-1/2 among the most accurate). Other m up to 8 take the next points of
the same sequence (``3, -3``), or any points the caller gives.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

import torch
import torch.nn.functional as F

from . import cpu_kernels
from .geometry import MAX_TILE
from .quant import FakeQuantize, code_dtype, grid_levels, qmax
from .winograd_autograd import (
    GatherTiles,
    GridBmm,
    QuantizedOutput,
    Transform2d,
    fused_product_output,
    fused_transforms,
    quantized_grid_product,
    transform_2d,
)

__all__ = [
    "DEFAULT_POINTS",
    "MAX_TILE",
    "CookToom",
    "cook_toom",
    "default_points",
    "transform_matrices",
    "winograd_conv2d",
    "tile_counts",
]

#: The finite interpolation points in the order defaults take them; the point at infinity is
#: always added. F(m, r) uses the first ``m + r - 2``.
DEFAULT_POINTS: tuple[Fraction, ...] = tuple(
    Fraction(p) for p in ("0", "1", "-1", "2", "-2", "1/2", "-1/2", "3", "-3")
)

Rational = Fraction | int | str


@dataclass(frozen=True)
class CookToom:
    """Exact matrices of F(m, r): ``A_t`` (m x a), ``G`` (a x r), ``B_t`` (a x a), a = alpha."""

    m: int
    r: int
    points: tuple[Fraction, ...]
    A_t: tuple[tuple[Fraction, ...], ...]
    G: tuple[tuple[Fraction, ...], ...]
    B_t: tuple[tuple[Fraction, ...], ...]

    @property
    def alpha(self) -> int:
        """Input tile size ``m + r - 1``."""
        return self.m + self.r - 1


def default_points(m: int, r: int = 3) -> tuple[Fraction, ...]:
    """The default finite points of F(m, r): the first ``m + r - 2`` of :data:`DEFAULT_POINTS`."""
    n = m + r - 2
    if n > len(DEFAULT_POINTS):
        raise ValueError(
            f"no default points for F({m}, {r}): it needs {n} finite points and the defaults "
            f"hold {len(DEFAULT_POINTS)}; pass points=..."
        )
    return DEFAULT_POINTS[:n]


def _poly_from_roots(roots: Sequence[Fraction]) -> list[Fraction]:
    """Coefficients, lowest degree first, of prod (x - root)."""
    coeffs = [Fraction(1)]
    for root in roots:
        shifted = [Fraction(0)] + coeffs  # x * p(x)
        for i, c in enumerate(coeffs):
            shifted[i] -= root * c
        coeffs = shifted
    return coeffs


def cook_toom(m: int, r: int = 3, points: Sequence[Rational] | None = None) -> CookToom:
    """Build the exact Cook-Toom matrices of F(m, r).

    Args:
        m: output tile size, 1..:data:`MAX_TILE`.
        r: filter size.
        points: ``m + r - 2`` distinct finite interpolation points (ints, Fractions or strings
            such as ``"1/2"``); the point at infinity is added. Defaults to :func:`default_points`.

    The construction: with finite points ``p_i`` and ``N(x) = prod_k (x - p_k)``, the 1-D
    correlation of ``d`` (length alpha) with ``g`` (length r) is the transpose of the linear
    convolution of ``g`` with an m-tap signal, which Toom-Cook computes by evaluating both factors
    at the points and interpolating. So ``A^T[j, i] = p_i^j``, ``G[i, k] = p_i^k / f_i`` with
    ``f_i = prod_{k != i} (p_i - p_k)``, and row i of ``B^T`` holds the coefficients of
    ``N(x) / (x - p_i)``; the point at infinity contributes the leading coefficients (a unit column
    of ``A^T``, a unit row of ``G`` and the coefficients of ``N(x)`` in ``B^T``). Rows of ``G`` and
    ``B^T`` are sign-normalized so that every ``f_i`` divides as a positive number.
    """
    if not isinstance(m, int) or not 1 <= m <= MAX_TILE:
        raise ValueError(f"output tile m={m!r} is not supported; use an integer in 1..{MAX_TILE}")
    if not isinstance(r, int) or r < 1:
        raise ValueError(f"filter size r={r!r} must be a positive integer")
    alpha = m + r - 1
    if points is None:
        pts = default_points(m, r)
    else:
        try:
            pts = tuple(Fraction(p) for p in points)
        except (TypeError, ValueError, ZeroDivisionError) as err:
            msg = f"interpolation points {list(points)!r} are not rationals: {err}"
            raise ValueError(msg) from None
        if len(pts) != alpha - 1:
            raise ValueError(
                f"F({m}, {r}) needs {alpha - 1} finite interpolation points (plus infinity), "
                f"got {len(pts)}: {[str(p) for p in pts]}"
            )
        if len(set(pts)) != len(pts):
            dup = sorted({str(p) for p in pts if pts.count(p) > 1})
            raise ValueError(f"interpolation points must be distinct; repeated: {dup}")

    n_fin = alpha - 1
    A_t = [[Fraction(0)] * alpha for _ in range(m)]
    G = [[Fraction(0)] * r for _ in range(alpha)]
    B_t = [[Fraction(0)] * alpha for _ in range(alpha)]
    for i, p in enumerate(pts):
        f_i = math.prod((p - q for k, q in enumerate(pts) if k != i), start=Fraction(1))
        sign = 1 if f_i > 0 else -1
        for j in range(m):
            A_t[j][i] = p**j
        for k in range(r):
            G[i][k] = p**k / abs(f_i)
        others = [q for k, q in enumerate(pts) if k != i]
        coeffs = _poly_from_roots(others)  # degree alpha - 2
        for t, c in enumerate(coeffs):
            B_t[i][t] = sign * c
    # The point at infinity: leading coefficients.
    A_t[m - 1][n_fin] = Fraction(1)
    G[n_fin][r - 1] = Fraction(1)
    for t, c in enumerate(_poly_from_roots(pts)):
        B_t[n_fin][t] = c
    return CookToom(
        m=m,
        r=r,
        points=pts,
        A_t=tuple(map(tuple, A_t)),
        G=tuple(map(tuple, G)),
        B_t=tuple(map(tuple, B_t)),
    )


@functools.lru_cache(maxsize=64)
def _cached(m: int, r: int, points: tuple[Fraction, ...] | None) -> CookToom:
    return cook_toom(m, r, points)


def transform_matrices(
    m: int,
    r: int = 3,
    points: Sequence[Rational] | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float tensors ``(A_t, G, B_t)`` of F(m, r), shapes (m, a), (a, r), (a, a)."""
    key = None if points is None else tuple(Fraction(p) for p in points)
    ct = _cached(m, r, key)

    def to_tensor(rows: tuple[tuple[Fraction, ...], ...]) -> torch.Tensor:
        # Fraction -> float rounds once, correctly; float64 then holds the exact value's nearest.
        return torch.tensor([[float(v) for v in row] for row in rows], dtype=torch.float64).to(
            device=device, dtype=dtype
        )

    return to_tensor(ct.A_t), to_tensor(ct.G), to_tensor(ct.B_t)


def tile_counts(height: int, width: int, m: int) -> tuple[int, int]:
    """Number of m x m output tiles covering an output of ``height x width``."""
    return -(-height // m), -(-width // m)


def _input_tiles(x: torch.Tensor, a: int, m: int, th: int, tw: int) -> torch.Tensor:
    """alpha x alpha windows with stride m over ``x`` padded by 1 (the conv's padding) and,
    bottom/right, up to whole tiles, laid out position-major: ``(a*a, C*N*T)``."""
    n, c, h, w = x.shape
    a2, t = a * a, th * tw
    ext = cpu_kernels.kernels() if x.device.type == "cpu" and x.dtype == torch.float32 else None
    if ext is not None:
        return GatherTiles.apply(ext, x, a, m, th, tw).reshape(a2, c * n * t)
    # im2col (F.unfold) is much faster than Tensor.unfold in the backward pass (col2im against
    # a generic unfold_backward).
    if th * m == h and tw * m == w:
        cols = F.unfold(x, a, padding=1, stride=m)
    else:
        xp = F.pad(x, (1, tw * m + 1 - w, 1, th * m + 1 - h))
        cols = F.unfold(xp, a, stride=m)
    # (N, C*a2, T) -> (a2, C*N*T): position-major, for the transform and the batched product.
    return cols.view(n, c, a2, t).permute(2, 1, 0, 3).reshape(a2, c * n * t)


def _levels_on(t: torch.Tensor, grid: tuple[torch.Tensor, int] | None, keep: bool):
    """``(levels, scale)`` of ``t``, which lies on ``grid`` ``(scale, bits)``, for a fused
    transform to keep: where ``keep`` and the grid has one scale; else ``(None, None)``."""
    if grid is None or not keep or grid[0].numel() != 1:
        return None, None
    scale, bits = grid
    return grid_levels(t, scale, bits), scale


def _quantize_stage(q, x: torch.Tensor, keep: bool):
    """A stage's quantizer applied to ``x``: ``(values, codes, scale)``, the codes only when
    ``keep`` and the quantizer can say its grid (a :class:`~wasearch.quant.FakeQuantize`); any
    other callable gives ``(q(x), None, None)``."""
    if keep and isinstance(q, FakeQuantize):
        return q(x, grid=True)
    return q(x), None, None


def _output_transform(A_t, mprod, q, grad: bool, untile) -> torch.Tensor:
    """The product's quantizer (where ``q`` has one), then ``A^T M A`` as ``N x K x H x W``."""
    n, k, h, w, th, tw = untile
    m, a = A_t.shape
    a2 = a * a
    m_codes = m_scale = None
    if "product" in q:
        mprod, m_codes, m_scale = _quantize_stage(q["product"], mprod, grad and A_t.requires_grad)
    if m_codes is not None:
        m_codes = m_codes.reshape(a2, -1)
        m_scale = m_scale.reshape(-1, 1) if m_scale.dim() else m_scale

    mprod = mprod.reshape(a2, -1)
    if fused_transforms(A_t, mprod) is not None:  # A^T M A, written as N x K x H x W
        y = Transform2d.apply(A_t, mprod, m_codes, m_scale, untile)
    else:
        y = transform_2d(A_t, mprod, m_codes, m_scale)  # A^T M A: (m2, KNT)
        y = y.reshape(m, m, k, n, th, tw).permute(3, 2, 4, 0, 5, 1).reshape(n, k, th * m, tw * m)
        if th * m != h or tw * m != w:
            y = y[:, :, :h, :w]
    return y


def _quantized_product(q, u, v, keep_u: bool, grad: bool) -> torch.Tensor:
    """The Winograd-domain quantizers (where ``q`` has them) and the product ``bmm(u, v)``,
    keeping the operands' levels for the backward (:class:`GridBmm`) where they have them: the
    weights' for the input's gradient, the input's for the weights'."""
    u_codes = u_scale = None
    if "weight_wd" in q:
        u, u_codes, u_scale = _quantize_stage(q["weight_wd"], u, keep_u)
    v_codes = v_scale = None
    if "input_wd" in q:
        v, v_codes, v_scale = _quantize_stage(q["input_wd"], v, grad and u.requires_grad)
    if v_codes is not None or u_codes is not None:
        return GridBmm.apply(u, v, u_codes, u_scale, v_codes, v_scale)
    return torch.bmm(u, v)


def winograd_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    A_t: torch.Tensor,
    G: torch.Tensor,
    B_t: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    quant: dict[str, torch.nn.Module] | None = None,
    x_grid: tuple[torch.Tensor, int] | None = None,
    w_grid: tuple[torch.Tensor, int] | None = None,
) -> torch.Tensor:
    """3x3, stride 1, padding 1 convolution computed as Winograd F(m x m, 3 x 3).

    Equivalent to ``F.conv2d(x, weight, bias, padding=1)`` when the transforms are exact and no
    quantizer is given. The output is computed in whole m x m tiles: the input is zero-padded to
    cover them and the result cropped back, so any H and W work.

    The 2-D transforms of the activations are applied separably, one 1-D transform per tile
    axis (``B^T d B`` as ``B^T`` along rows, then along columns, on tiles laid out
    position-major): a Kronecker matrix ``kron(B^T, B^T)`` acting on flattened tiles does
    alpha times more multiply-adds (alpha^2 against 2 alpha per value) and measured about twice
    as slow. The weights' transform, small, is one product with ``kron(G, G)``, or the fused
    CPU kernel of the activations' transforms where that runs (equal up to rounding). The
    Winograd-domain product is a batched matrix multiply over the alpha^2 tile positions,
    ``(a2, K, C) @ (a2, C, N*T)``, never a broadcast over output channels.

    ``quant`` optionally maps stage names to fake quantizers (callables on tensors):
    ``"weight_wd"`` (G g G^T), ``"input_wd"`` (B^T d B) and ``"product"`` (the Hadamard product
    summed over input channels). The tap-wise quantizers take the position as dimension 0.

    Memory: the tensors autograd keeps that lie on a quantization grid are kept as their
    integer levels (1 byte each at 8 bits, 2 up to 16) and rebuilt bit for bit in the
    backward: the Winograd-domain input, for the weights' gradient, when ``"input_wd"`` is a
    :class:`~wasearch.quant.FakeQuantize`; the Winograd-domain weights, for the input's
    gradient, when ``"weight_wd"`` is one; for learned transforms (flex), the input tiles when
    ``x_grid`` gives the input's grid (``(scale, bits)``: ``x`` is a whole multiple of
    ``scale`` everywhere, as the layer's input quantizer makes it), the weights when ``w_grid``
    gives theirs (one scale) and the product when ``"product"`` is one. The outputs and
    gradients are those of keeping the float tensors.
    Where the CPU kernels run and ``"product"`` is a :class:`~wasearch.quant.FakeQuantize`,
    the product is quantized to its levels only and the output transform reads them
    (:class:`QuantizedOutput`): its float values, a tensor as large as the Winograd-domain
    input, are never written; the same outputs and gradients bit for bit. Where ``"weight_wd"``
    and ``"input_wd"`` are both such quantizers of 8 bits or fewer and the CPU has AVX-512
    VNNI, they write their levels and masks only and the product runs on the levels
    (:class:`~wasearch.winograd_autograd.QuantizedGridBmm`): exact integer sums scaled once,
    which differ from ``torch.bmm`` of the float values by float rounding only.
    """
    n, c, h, w = x.shape
    k = weight.shape[0]
    m, a = A_t.shape
    if weight.shape[1:] != (c, 3, 3) or G.shape != (a, 3) or B_t.shape != (a, a):
        raise ValueError(
            f"shape mismatch: x {tuple(x.shape)}, weight {tuple(weight.shape)}, "
            f"A_t {tuple(A_t.shape)}, G {tuple(G.shape)}, B_t {tuple(B_t.shape)}"
        )
    q = quant or {}
    th, tw = tile_counts(h, w, m)
    t = th * tw
    a2 = a * a

    # Weights to the Winograd domain: U = G g G^T for every (k, c), (a2, K*C). With the fused
    # CPU kernels, as the activations' transforms (one pass); else as kron(G, G) @ vec(g), one
    # GEMM whose inner dimension is 9 (on the CPU, MKL ran it and its backward at 1-3 GFLOP/s:
    # 10 % of a flex F4 training step).
    grad = torch.is_grad_enabled()
    w_tiles = weight.reshape(k * c, 9).t()  # (9, K*C): position-major
    if fused_transforms(G, w_tiles) is not None:
        w_tiles = w_tiles.contiguous()
        # the weights' levels, for G's gradient
        w_codes, w_scale = _levels_on(w_tiles, w_grid, grad and G.requires_grad)
        u = transform_2d(G, w_tiles, w_codes, w_scale)
    else:
        u = torch.kron(G, G) @ w_tiles
    u = u.reshape(a2, k, c)
    keep_u = grad and (x.requires_grad or B_t.requires_grad)

    keep_grid = x_grid is not None and grad and B_t.requires_grad
    if fused_transforms(B_t, x) is not None:  # the tiles read in place from x
        x = x.contiguous()
        x_codes, x_scale = _levels_on(x, x_grid, keep_grid)  # the input's, for B^T's gradient
        v = Transform2d.apply(B_t, x, x_codes, x_scale, None, (n, c, h, w, th, tw))
    else:
        tiles = _input_tiles(x, a, m, th, tw)  # (a2, C*N*T)
        tile_codes = tile_scale = None
        if keep_grid:
            tile_scale, x_bits = x_grid
            tile_codes = grid_levels(tiles, tile_scale, x_bits)
        v = transform_2d(B_t, tiles, tile_codes, tile_scale)  # (a2, C*N*T): B^T d B
    v = v.reshape(a2, c, n * t)
    # (a2, K, N*T): summed over C. Both operands quantized to their levels only and multiplied
    # on them where the CPU kernels serve (QuantizedGridBmm), else quantized to values here.
    mprod = quantized_grid_product(q.get("weight_wd"), q.get("input_wd"), u, v)
    if mprod is None:
        mprod = _quantized_product(q, u, v, keep_u, grad)
    untile = (n, k, h, w, th, tw)
    fused_q = fused_product_output(q.get("product"), mprod, A_t)
    if fused_q is not None:  # quantized and transformed in one step: A^T M A, N x K x H x W
        scale, may_clip = fused_q.grid(mprod)
        bits = fused_q.bits
        y = QuantizedOutput.apply(
            A_t, mprod, scale, qmax(bits), may_clip, code_dtype(bits), untile
        )
    else:
        y = _output_transform(A_t, mprod, q, grad, untile)
    if bias is not None:
        y = y + bias.view(1, -1, 1, 1)
    return y
