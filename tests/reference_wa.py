"""The Winograd-aware forward pass as it was before the speed work of issue 14, kept verbatim in
its arithmetic so that tests can show the faster implementation computes the same outputs,
gradients and running ranges (tests/test_wa_numerics.py).

``reference_forward(layer, x)`` runs a :class:`wasearch.layers.WinogradConv2d`'s forward with
the old pieces: the Kronecker-matrix transforms, ``torch.aminmax`` ranges and a boolean clip
mask. It reads and updates the layer's own quantizer buffers, as the layer's forward does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_EPS = 1e-12


class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, top, may_clip):
        t = x / scale
        ctx.may_clip = may_clip
        if ctx.needs_input_grad[0] and may_clip:
            ctx.save_for_backward(t.abs() < top + 0.5)
        return t.round_().clamp_(-top, top).mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        if not ctx.may_clip:
            return grad, None, None, None
        (mask,) = ctx.saved_tensors
        return grad * mask, None, None, None


def _fake_quantize(x, amax, bits, axis=None, *, x_amax=None):
    top = (1 << (bits - 1)) - 1
    scale = (amax.detach().clamp_min(_EPS) / top).to(x.dtype)
    if axis is not None:
        shape = [1] * x.dim()
        shape[axis] = -1
        scale = scale.reshape(shape)
    may_clip = True
    if x_amax is not None:
        may_clip = bool((x_amax > amax.detach() * ((top + 0.5) / top)).any())
    return _RoundSTE.apply(x, scale, top, may_clip)


def _batch_range(q, x):
    if q.granularity == "tap":
        return torch.aminmax(x.detach().reshape(x.shape[0], -1), dim=1)
    return torch.aminmax(x.detach())


@torch.no_grad()
def _fold(q, lo, hi):
    if not bool(q.initialized):
        q.min_val.copy_(lo)
        q.max_val.copy_(hi)
        q.initialized.fill_(True)
        q._initialized_host = True
    else:
        q.min_val.lerp_(lo.to(q.min_val.dtype), q.momentum)
        q.max_val.lerp_(hi.to(q.max_val.dtype), q.momentum)


def quantize(q, x):
    """``FakeQuantize.forward`` as it was, on quantizer module ``q`` (its buffers updated)."""
    if q.bits is None:
        return x
    axis = 0 if q.granularity == "tap" else None
    if q.running and not q.training and bool(q.initialized):
        return _fake_quantize(x, torch.maximum(q.min_val.abs(), q.max_val.abs()), q.bits, axis)
    lo, hi = _batch_range(q, x)
    x_amax = torch.maximum(lo.abs(), hi.abs())
    if not q.running or not q.training:
        return _fake_quantize(x, x_amax, q.bits, axis, x_amax=x_amax)
    _fold(q, lo, hi)
    amax = torch.maximum(q.min_val.abs(), q.max_val.abs())
    return _fake_quantize(x, amax, q.bits, axis, x_amax=x_amax)


def winograd_conv2d(x, weight, A_t, G, B_t, *, bias=None, quant=None):
    n, c, h, w = x.shape
    k = weight.shape[0]
    m, a = A_t.shape
    q = quant or {}
    th, tw = -(-h // m), -(-w // m)
    t = th * tw
    a2 = a * a
    u = (torch.kron(G, G) @ weight.reshape(k * c, 9).t()).reshape(a2, k, c)
    if "weight_wd" in q:
        u = q["weight_wd"](u)
    if th * m == h and tw * m == w:
        cols = F.unfold(x, a, padding=1, stride=m)
    else:
        xp = F.pad(x, (1, tw * m + 1 - w, 1, th * m + 1 - h))
        cols = F.unfold(xp, a, stride=m)
    tiles = cols.view(n, c, a2, t).permute(2, 1, 0, 3).reshape(a2, c * n * t)
    v = (torch.kron(B_t, B_t) @ tiles).reshape(a2, c, n * t)
    if "input_wd" in q:
        v = q["input_wd"](v)
    mprod = torch.bmm(u, v)
    if "product" in q:
        mprod = q["product"](mprod)
    y = torch.kron(A_t, A_t) @ mprod.reshape(a2, k * n * t)
    y = y.reshape(m, m, k, n, th, tw).permute(3, 2, 4, 0, 5, 1).reshape(n, k, th * m, tw * m)
    if th * m != h or tw * m != w:
        y = y[:, :, :h, :w]
    if bias is not None:
        y = y + bias.view(1, -1, 1, 1)
    return y


def reference_forward(layer, x):
    """``WinogradConv2d.forward`` as it was, with the layer's parameters and quantizer state."""
    mats = (layer.A_t, layer.G, layer.B_t)
    if layer.bits is not None:
        mats = tuple(quantize(layer.q_transform, t) for t in mats)
    A_t, G, B_t = mats
    pad_extra = tuple(max(p - 1, 0) for p in layer.padding)
    if layer.bits is None:
        xin, quant, w = x, None, layer.weight
    else:
        xin = quantize(layer.q_input, x)
        w = quantize(layer.q_weight, layer.weight)
        quant = {
            "weight_wd": lambda u: quantize(layer.q_weight_wd, u),
            "input_wd": lambda v: quantize(layer.q_input_wd, v),
            "product": lambda p: quantize(layer.q_product, p),
        }
    ph, pw = pad_extra
    if ph or pw:
        xin = F.pad(xin, (pw, pw, ph, ph))
    y = winograd_conv2d(xin, w, A_t, G, B_t, bias=layer.bias, quant=quant)
    if layer.padding[0] == 0:
        y = y[..., 1:-1, :]
    if layer.padding[1] == 0:
        y = y[..., :, 1:-1]
    return y if layer.bits is None else quantize(layer.q_output, y)
