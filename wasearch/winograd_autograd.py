"""The Winograd-aware pipeline's autograd functions: the stages of :func:`winograd_conv2d
<wasearch.winograd.winograd_conv2d>` that keep what their backward needs as integer levels
(rebuilt bit for bit) or recompute it, and run on the fused CPU kernels where those are built
(``cpu_kernels``): the 2-D transforms (:class:`Transform2d`), the product's quantizer with the
output transform (:class:`QuantizedOutput`), the batched product on quantized operands
(:class:`GridBmm`), the two Winograd-domain quantizers with that product on their 8-bit levels
(:class:`QuantizedGridBmm`) and the input's tiles (:class:`GatherTiles`). Used by the pipeline
only; split from ``winograd.py`` to keep each module readable at once.
"""

from __future__ import annotations

import torch

from . import cpu_kernels
from .quant import FakeQuantize, qmax, rebuild, scale_rows

__all__ = [
    "GatherTiles",
    "GridBmm",
    "QuantizedGridBmm",
    "QuantizedOutput",
    "Transform2d",
    "fused_product_output",
    "fused_transforms",
    "quantized_grid_product",
    "transform_2d",
]


class Transform2d(torch.autograd.Function):
    """``mat @ X @ mat^T`` of every tile, as two 1-D products, saving only its inputs.

    The intermediate (``mat`` applied along the tiles' rows) is as large as the tiles; autograd
    would keep it for the gradient of a learned ``mat`` (flex). The backward recomputes it (one
    small product) instead, so a flex layer keeps no more than a static one. Tiles that lie on
    a quantization grid (``codes``, ``scale``: ``tiles == codes * scale``) are kept as their
    integer levels, a quarter of the memory at 8 bits, and rebuilt exactly for the backward.

    On the CPU in float32, where the fused kernels are built, both passes run as one kernel each
    (``cpu_kernels``: ``transform2d`` and its backward, which reads the levels directly): the
    same sums up to float rounding, in one pass over memory instead of the GEMMs' four to six,
    and a learned ``mat``'s gradient summed in a fixed order, the same for any thread count.
    There, ``untile`` (``(N, K, H, W, th, tw)``, for the output transform ``A^T``) makes the
    kernel write the layer's ``N x K x H x W`` output directly (and read its gradient so)
    instead of position-major tiles that a permuted copy would then untile; ``window``
    (``(N, C, H, W, th, tw)``, for the input transform ``B^T``) makes ``tiles`` the layer's
    input itself, its tiles read in place (the same values as :func:`_input_tiles`, so the same
    output bit for bit) and its gradient added back into ``N x C x H x W``: no tile tensor, nor
    its gradient, is ever written. The input's grid then keeps the input's levels (a quarter to
    a sixteenth of the tiles' count: F6 to F2) for the learned ``mat``'s gradient.
    """

    @staticmethod
    def forward(
        ctx,
        mat: torch.Tensor,
        tiles: torch.Tensor,
        codes: torch.Tensor | None = None,
        scale: torch.Tensor | None = None,
        untile: tuple[int, int, int, int, int, int] | None = None,
        window: tuple[int, int, int, int, int, int] | None = None,
    ) -> torch.Tensor:
        p, a = mat.shape
        ctx.dtype = tiles.dtype
        ctx.ext = ext = fused_transforms(mat, tiles)
        ctx.untile, ctx.window = list(untile or ()), list(window or ())
        if ext is not None:
            out = ext.transform2d(mat.contiguous(), tiles.contiguous(), ctx.untile, ctx.window)
            ctx.save_for_backward(*_transform_saves(ctx, mat, tiles, codes, scale))
            return out
        if untile or window:
            raise RuntimeError("untile and window need the fused CPU kernels")
        count = tiles.shape[1]
        rows = mat @ tiles.reshape(a, a * count)  # along the tile's rows: (p, a*count)
        # Along its columns: one small product per row, as bmm with ``mat`` expanded (no copy).
        # torch.matmul's broadcasting copies the operand transposed, and its backward.
        out = torch.bmm(mat.expand(p, p, a), rows.reshape(p, a, count))
        ctx.save_for_backward(*_transform_saves(ctx, mat, tiles, codes, scale))
        return out.reshape(p * p, count)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        mat, tiles, codes, scale = ctx.saved_tensors
        if ctx.ext is not None:
            need_mat, need_tiles = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
            none = grad.new_empty(0)  # the kernel's "not given"
            kept, kept_scale = none, none
            if need_mat:  # the tiles as kept: float values, or levels and their scale
                kept = (tiles if codes is None else codes).contiguous()
                if codes is not None:
                    kept_scale = scale.reshape(-1).to(torch.float32).contiguous()
            grad_tiles, grad_mat = ctx.ext.transform2d_backward(
                mat.contiguous(),
                kept,
                kept_scale,
                grad.contiguous(),
                need_tiles,
                need_mat,
                ctx.untile,
                ctx.window,
            )
            return grad_mat, grad_tiles, None, None, None, None
        p, a = mat.shape
        count = grad.shape[1]
        g = grad.reshape(p, p, count)
        # out[r, s] = sum_j mat[s, j] rows[r, j]  =>  d rows[r] = mat^T @ g[r]
        grad_rows = torch.bmm(mat.t().expand(p, a, p), g).reshape(p, a * count)
        grad_mat = grad_tiles = None
        if ctx.needs_input_grad[1]:
            # rows = mat @ X  =>  dX = mat^T @ d rows
            grad_tiles = (mat.t() @ grad_rows).reshape(a * a, count)
        if ctx.needs_input_grad[0]:
            if codes is not None:
                tiles = rebuild(codes, scale, ctx.dtype)
            x = tiles.reshape(a, a * count)
            rows = (mat @ x).reshape(p, a, count)  # recomputed, not saved
            # d mat from the column pass: sum_r g[r] @ rows[r]^T; from the row pass: d rows @ X^T
            grad_mat = torch.bmm(g, rows.transpose(1, 2)).sum(0) + grad_rows @ x.t()
        return grad_mat, grad_tiles, None, None, None, None


def _transform_saves(ctx, mat, tiles, codes, scale) -> tuple:
    """What :class:`Transform2d`'s backward needs: the tiles (or their levels) only for a
    learned ``mat``'s gradient."""
    if not ctx.needs_input_grad[0]:
        return mat, None, None, None
    if codes is not None:
        return mat, None, codes, scale
    return mat, tiles, None, None


def fused_transforms(mat: torch.Tensor, tiles: torch.Tensor):
    """The compiled kernels where they serve this transform (float32 CPU tensors, a matrix of
    the Winograd layers' shapes), else None."""
    if mat.device.type != "cpu" or tiles.dtype != torch.float32 or mat.dtype != torch.float32:
        return None
    ext = cpu_kernels.kernels("transforms")
    if ext is None or not ext.transform2d_supports(*mat.shape):
        return None
    return ext


def transform_2d(
    mat: torch.Tensor,
    tiles: torch.Tensor,
    codes: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """``mat @ X @ mat^T`` of every tile ``X`` (a x a), tiles laid out as ``(a*a, count)``
    (row index ``i * a + j``); returns ``(p*p, count)`` for a ``(p, a)`` ``mat``. The same
    values as ``kron(mat, mat) @ tiles``, computed as two 1-D transforms. ``codes`` and
    ``scale`` (optional) are the tiles' grid (``tiles == codes * scale``): a learned ``mat``
    keeps them, rather than the tiles, for its gradient."""
    return Transform2d.apply(mat, tiles, codes, scale)


class QuantizedOutput(torch.autograd.Function):
    """The product's quantizer and the output transform ``A^T M A`` as one step: the product's
    integer levels and clip mask in one pass (no float values), then the output transform
    reading the levels (each value rebuilt as ``level * scale``, as the quantizer's values are
    made), writing the layer's ``N x K x H x W`` output. The same outputs and gradients, bit for
    bit, as quantizing to values and transforming them; the quantized product, as large as the
    Winograd-domain input, is never written (one pass over memory and one such tensor fewer).
    Keeps the mask (where the quantizer may clip) and, for a learned ``A^T``, the levels."""

    @staticmethod
    def forward(ctx, mat, mprod, scale, top, may_clip, dtype, untile):
        ext = cpu_kernels.kernels("transforms")
        rows = scale.reshape(-1).contiguous()
        need_mat = ctx.needs_input_grad[0]
        want_mask = ctx.needs_input_grad[1] and may_clip
        _, mask, levels = ext.quantize(mprod, rows, top, False, want_mask, dtype.itemsize)
        levels = levels.reshape(mprod.shape[0], -1)
        y = ext.transform2d(mat.contiguous(), levels, list(untile), [], rows)
        ctx.ext, ctx.untile, ctx.shape = ext, list(untile), mprod.shape
        ctx.save_for_backward(mat, levels if need_mat else None, rows, mask if want_mask else None)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        mat, levels, rows, mask = ctx.saved_tensors
        need_mat, need_m = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        none = grad.new_empty(0)
        grad_q, grad_mat = ctx.ext.transform2d_backward(
            mat.contiguous(),
            levels if need_mat else none,
            rows if need_mat else none,
            grad.contiguous(),
            need_m,
            need_mat,
            ctx.untile,
            [],
            mask if need_m else None,  # the clip mask, applied as the gradient is written
        )
        grad_m = grad_q.reshape(ctx.shape) if need_m else None
        return grad_mat, grad_m, None, None, None, None, None


def fused_product_output(q, mprod: torch.Tensor, A_t: torch.Tensor):
    """The product's quantizer ``q`` if the output transform can take its levels directly
    (:class:`QuantizedOutput`): a quantizer with bits, on float32 CPU tensors where the
    transform kernels run, one scale or one per tile position; else None."""
    if not isinstance(q, FakeQuantize) or q.bits is None or q.granularity not in ("tensor", "tap"):
        return None
    if fused_transforms(A_t, mprod) is None or not mprod.is_contiguous():
        return None
    return q


class GridBmm(torch.autograd.Function):
    """``torch.bmm(u, v)`` for a ``u`` or ``v`` on a quantization grid (``u == u_codes *
    u_scale``; ``v`` alike; None: not on one), keeping each operand the other's gradient needs
    as its integer levels where it has them: the same products as autograd's bmm backward, on
    the same values, in a quarter of the memory at 8 bits. (Where both operands' quantizers
    give 8-bit levels on the CPU, :class:`QuantizedGridBmm` runs the product on them instead.)"""

    @staticmethod
    def forward(ctx, u, v, u_codes, u_scale, v_codes, v_scale):
        ctx.dtype = v.dtype
        need_u, need_v = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        keep_v = need_u and v_codes is None  # v for u's gradient: as floats if no levels
        keep_u = need_v and u_codes is None
        ctx.save_for_backward(
            u if keep_u else None,
            u_codes if need_v else None,
            u_scale,
            v if keep_v else None,
            v_codes if need_u else None,
            v_scale,
        )
        return torch.bmm(u, v)

    @staticmethod
    def backward(ctx, grad):
        u, u_codes, u_scale, v, v_codes, v_scale = ctx.saved_tensors
        grad_u = grad_v = None
        if ctx.needs_input_grad[0]:
            v = v if v_codes is None else rebuild(v_codes, v_scale, ctx.dtype)
            grad_u = grad.bmm(v.transpose(1, 2))
        if ctx.needs_input_grad[1]:
            u = u if u_codes is None else rebuild(u_codes, u_scale, ctx.dtype)
            grad_v = u.transpose(1, 2).bmm(grad)
        return grad_u, grad_v, None, None, None, None


class QuantizedGridBmm(torch.autograd.Function):
    """The two Winograd-domain quantizers and the product as one step: ``u`` (``G g G^T``) and
    ``v`` (``B^T d B``) quantized to their integer levels and clip masks only, in one pass each
    (their float values, as large as the Winograd-domain input, are never written), the
    product summed exactly on the levels (``q8_grid_bmm``: integer sums, then one product with
    the two scales, where ``torch.bmm`` of the float values rounds after every addition; 3-6x
    faster on the CPU measured), its backward read from the levels (``grid_bmm_backward``:
    float32 sums in AVX-512 registers, no float operand rebuilt; 1.1-2.9x faster than
    ``torch.bmm``, which runs MKL's AVX2 code on AMD CPUs) and masked where the quantizers may
    clip. The quantizers' levels, masks and running ranges are theirs bit for bit; the product
    and gradients differ from quantizing to values and :class:`GridBmm` by float rounding only.
    The ``"grid_product"`` part of :func:`~wasearch.cpu_kernels.disabled` switches it off.
    """

    @staticmethod
    def forward(ctx, u, v, u_scale, v_scale, u_top, v_top, u_clip, v_clip, ext):
        a2 = u.shape[0]
        need_u, need_v = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        u_rows, v_rows = scale_rows(u.shape, u_scale), scale_rows(v.shape, v_scale)
        _, u_mask, u_codes = ext.quantize(u, u_rows, u_top, False, need_u and u_clip, 1)
        _, v_mask, v_codes = ext.quantize(v, v_rows, v_top, False, need_v and v_clip, 1)
        scale = (u_scale * v_scale).reshape(-1).expand(a2).contiguous()
        out = ext.q8_grid_bmm(u_codes, v_codes, scale)
        ctx.ext = ext
        if need_u or need_v:
            ctx.save_for_backward(
                u_codes,
                u_rows.expand(a2).contiguous(),
                u_mask if need_u and u_clip else None,
                v_codes,
                v_rows.expand(a2).contiguous(),
                v_mask if need_v and v_clip else None,
            )
        return out

    @staticmethod
    def backward(ctx, grad):
        u_codes, u_scale, u_mask, v_codes, v_scale, v_mask = ctx.saved_tensors
        need_u, need_v = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        # v's mask applied as grad_v is written (one pass fewer over the largest gradient)
        grad_u, grad_v = ctx.ext.grid_bmm_backward(
            grad.contiguous(), u_codes, u_scale, v_codes, v_scale, need_u, need_v, v_mask
        )
        if u_mask is not None:  # the weights' quantizer's straight-through gradient
            grad_u = ctx.ext.masked_grad(grad_u, u_mask)
        return grad_u, grad_v, None, None, None, None, None, None, None


def quantized_grid_product(q_u, q_v, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor | None:
    """``bmm(q_u(u), q_v(v))`` by :class:`QuantizedGridBmm` where it serves: both quantizers
    :class:`~wasearch.quant.FakeQuantize` of 8 bits or fewer, one scale or one per tile
    position, float32 CPU tensors, a CPU with AVX-512 VNNI, and (with autograd on) both
    operands needing their gradient; else None, and neither quantizer has run."""
    for q in (q_u, q_v):
        if not isinstance(q, FakeQuantize) or q.bits is None or q.bits > 8:
            return None
        if q.granularity not in ("tensor", "tap"):
            return None
    for t in (u, v):
        if t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous():
            return None
    if torch.is_grad_enabled() and not (u.requires_grad and v.requires_grad):
        return None
    ext = cpu_kernels.kernels("grid_product")
    if ext is None or not ext.q8_product_supported():
        return None
    u_scale, u_clip = q_u.grid(u)  # folds a training batch into the running range, as q_u(u)
    v_scale, v_clip = q_v.grid(v)
    return QuantizedGridBmm.apply(
        u, v, u_scale, v_scale, qmax(q_u.bits), qmax(q_v.bits), u_clip, v_clip, ext
    )


class GatherTiles(torch.autograd.Function):
    """The input tiles by the fused CPU kernel (one pass, position-major) and its gradient
    (tile values added back to their pixels in F.fold's order: the same sums)."""

    @staticmethod
    def forward(ctx, ext, x: torch.Tensor, a: int, m: int, th: int, tw: int) -> torch.Tensor:
        ctx.ext, ctx.geometry, ctx.shape = ext, (a, m, th, tw), x.shape
        return ext.gather_tiles(x.contiguous(), a, m, th, tw)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        n, c, h, w = ctx.shape
        grad_x = ctx.ext.scatter_tiles(grad.contiguous(), n, c, h, w, *ctx.geometry)
        return None, grad_x, None, None, None, None
