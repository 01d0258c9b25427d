"""The parts of any network that are not searchable convolutions, priced generically.

A traced model (``wasearch.discovery``) lists every unit module call and every group of
functions called between them, with their shapes. Each becomes one operation whose
:class:`~wasearch.latency.ops.OpKey` (``generic_fields``; the functions here take any object
with its ``op``, ``batch`` and ``detail``) carries its category as ``op`` and, in ``detail``, all
a price needs (the module's class and parameters, the input and output shapes), so that a key
prices itself with no model at hand:

==============  ==================================================================================
op              work counted (fp32; ``n`` the output's elements, per image at the trace's batch 1)
==============  ==================================================================================
``conv``        a direct convolution of any shape: ``K Ho Wo (C / groups) kh kw`` multiply-adds
``linear``      ``n x in_features`` multiply-adds
``pool``        max/avg pools: ``n kh kw`` element-wise ops; adaptive pools: the input's elements
``norm``        BatchNorm: 2 ops per element; LayerNorm, GroupNorm and the like: 5
``act``         1 op per element (ReLU family), 4 for the transcendental ones (GELU, SiLU, ...)
``free``        identity, dropout, flatten: nothing
``functions``   the functions between two modules, each by name: element-wise (``add``, ``mul``,
                ``relu``, ...), reductions (``mean``, ``softmax``, ...), GEMMs (``matmul``,
                ``linear``, ``conv2d``, ``scaled_dot_product_attention``), copies (``cat``,
                ``pad``, ...), views (free)
``module``      a module of any other type: its output's elements times a conservative
                :data:`UNKNOWN_OPS_PER_ELEMENT` (also an unknown function); listed as *guessed*
==============  ==================================================================================

Bytes moved: every input and the output once (4 bytes an element), plus the weights of
convolutions and linear layers. A non-searchable convolution of a converted model that is
quantized (every one but the first, at the arch's default bit-width) carries ``bits``: its GEMM
counts at that precision.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import Any

__all__ = [
    "GENERIC_OPS",
    "UNKNOWN_OPS_PER_ELEMENT",
    "generic_counts",
    "generic_fields",
    "is_guessed",
]

#: The ``op`` of a generic operation (see the module doc).
GENERIC_OPS = ("conv", "linear", "pool", "norm", "act", "free", "functions", "module")
#: Element-wise operations charged per output element of a module or function of unknown type:
#: more than any activation or norm here, so an unknown part is not priced as free.
UNKNOWN_OPS_PER_ELEMENT = 8

_TRANSCENDENTAL = {"GELU", "SiLU", "Mish", "Sigmoid", "Tanh", "ELU", "SELU", "CELU", "Softplus"}
_SOFTMAX = {"Softmax", "LogSoftmax"}
_FREE_FNS = {
    "view",
    "reshape",
    "flatten",
    "unflatten",
    "permute",
    "transpose",
    "t",
    "squeeze",
    "unsqueeze",
    "expand",
    "expand_as",
    "__getitem__",
    "narrow",
    "select",
    "detach",
    "__get__",
    "contiguous",
    "view_as",
    "dropout",
    "identity",
    "type_as",
    "float",
}
_EW_FNS = {
    "add",
    "sub",
    "rsub",
    "mul",
    "div",
    "truediv",
    "relu",
    "relu6",
    "hardtanh",
    "leaky_relu",
    "clamp",
    "clip",
    "neg",
    "abs",
    "maximum",
    "minimum",
    "where",
    "masked_fill",
    "threshold",
    "hardswish",
    "hardsigmoid",
}
_EW_HEAVY_FNS = {"gelu", "silu", "sigmoid", "tanh", "exp", "sqrt", "rsqrt", "pow", "elu", "mish"}
_REDUCE_FNS = {
    "mean": 1,
    "sum": 1,
    "amax": 1,
    "amin": 1,
    "max": 1,
    "min": 1,
    "adaptive_avg_pool2d": 1,
    "adaptive_max_pool2d": 1,
    "avg_pool2d": 1,
    "max_pool2d": 1,
    "softmax": 4,
    "log_softmax": 4,
    "layer_norm": 5,
    "batch_norm": 2,
    "group_norm": 5,
    "norm": 2,
    "std": 3,
    "var": 3,
}
_COPY_FNS = {"cat", "stack", "pad", "clone", "to", "copy_", "repeat", "roll", "zeros", "ones"}
_COPY_FNS |= {"zeros_like", "ones_like", "empty", "full", "arange", "interpolate"}
_GEMM_FNS = {"matmul", "mm", "bmm", "linear", "addmm", "baddbmm", "conv2d", "conv1d"}
_GEMM_FNS |= {"scaled_dot_product_attention"}


# -- keys ----------------------------------------------------------------------------------------
def _shape(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split("x")) if text else ()


def _shape_text(shape: Iterable[int]) -> str:
    return "x".join(str(v) for v in shape)


def _chw(shape: tuple[int, ...]) -> tuple[int, int, int]:
    """A per-image (C, H, W) view of any shape whose first dimension is the batch."""
    dims = shape[1:] or (1,)
    c = dims[0]
    h = dims[1] if len(dims) > 1 else 1
    w = math.prod(dims[2:]) if len(dims) > 2 else 1
    return max(c, 1), max(h, 1), max(w, 1)


def generic_fields(
    category: str,
    kind: str,
    params: str,
    inputs: tuple[tuple[int, ...], ...],
    output: tuple[int, ...],
) -> dict[str, Any]:
    """The :class:`~wasearch.latency.ops.OpKey` fields of one traced operation
    (``wasearch.discovery.TracedOp``'s fields), at batch 1.

    ``in_channels``, ``height``, ``width``: the first input's (C, H, W) (trailing dimensions
    folded into W); ``out_channels``: the output's C; ``detail`` everything else."""
    if category not in GENERIC_OPS:
        raise ValueError(f"unknown category {category!r}")
    first = inputs[0] if inputs else output
    c, h, w = _chw(first)
    k = _chw(output)[0] if output else c
    if category == "functions":
        detail = params
    else:
        shapes = "|".join(_shape_text(s) for s in inputs)
        detail = f"{kind}[{params}] {shapes}->{_shape_text(output)}"
    return {
        "op": category,
        "in_channels": c,
        "out_channels": k,
        "height": h,
        "width": w,
        "detail": detail,
    }


# -- counts --------------------------------------------------------------------------------------
_MODULE_RE = re.compile(r"^(?P<kind>[^\[]*)\[(?P<params>[^\]]*)\] (?P<ins>[^ ]*)->(?P<out>[^ ]*)$")
_CALL_RE = re.compile(r"^(?P<name>\S+) (?P<ins>\S*)->(?P<out>\S*)$")


def _numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape) if shape else 0


def _pairs(params: str) -> dict[str, tuple[int, ...]]:
    out = {}
    for part in params.split():
        out[part[0]] = tuple(int(v) for v in part[1:].split("x"))
    return out


def _parse_module(detail: str) -> tuple[str, str, list[tuple[int, ...]], tuple[int, ...]]:
    m = _MODULE_RE.match(detail)
    if m is None:
        raise ValueError(f"malformed detail {detail!r}")
    ins = [_shape(s) for s in m["ins"].split("|")] if m["ins"] else []
    return m["kind"], m["params"], ins, _shape(m["out"])


def _parse_calls(detail: str) -> list[tuple[str, list[tuple[int, ...]], tuple[int, ...]]]:
    calls = []
    for part in detail.split("; "):
        m = _CALL_RE.match(part.strip())
        if m is None:
            raise ValueError(f"malformed call {part!r}")
        ins = [_shape(s) for s in m["ins"].split("|")] if m["ins"] else []
        calls.append((m["name"], ins, _shape(m["out"])))
    return calls


def _fn_base(name: str) -> str:
    base = name.strip("_")
    if base.startswith(("i", "r")) and base[1:] in ("add", "sub", "mul", "truediv", "div"):
        base = base[1:]
    return base.rstrip("_") or name


def _fn_counts(
    name: str, ins: list[tuple[int, ...]], out: tuple[int, ...]
) -> tuple[float, float, float, int, bool]:
    """(macs, element-wise ops, bytes, launches, guessed) of one function call."""
    base = _fn_base(name)
    n_out = _numel(out)
    moved = 4.0 * (sum(_numel(s) for s in ins) + n_out)
    if base in _FREE_FNS:
        return 0.0, 0.0, 0.0, 0, False
    if base in _EW_FNS:
        return 0.0, float(n_out), moved, 1, False
    if base in _EW_HEAVY_FNS:
        return 0.0, 4.0 * n_out, moved, 1, False
    if base in _REDUCE_FNS:
        n_in = _numel(ins[0]) if ins else n_out
        return 0.0, float(_REDUCE_FNS[base] * n_in), moved, 1, False
    if base in _COPY_FNS:
        return 0.0, 0.0, 2.0 * 4 * n_out, 1, False
    if base in _GEMM_FNS and ins:
        if base == "scaled_dot_product_attention" and len(ins) >= 2:
            q, k = ins[0], ins[1]
            macs = 2.0 * _numel(q[:-1]) * (k[-2] if len(k) > 1 else 1) * q[-1]
            return macs, 5.0 * _numel(q[:-1]) * (k[-2] if len(k) > 1 else 1), moved, 1, False
        if base in ("conv2d", "conv1d") and len(ins) >= 2:
            return float(n_out * _numel(ins[1][1:])), 0.0, moved, 1, False
        a = ins[1] if base in ("addmm", "baddbmm") and len(ins) >= 2 else ins[0]
        return float(n_out * (a[-1] if a else 1)), 0.0, moved, 1, False
    return 0.0, float(UNKNOWN_OPS_PER_ELEMENT * n_out), moved, 1, True


def generic_counts(key: Any) -> tuple[float, float, float, int]:
    """(GEMM multiply-adds, element-wise ops, bytes, launches) of a generic ``key`` at its
    batch (see the module doc); raises ``ValueError`` on a malformed ``detail``."""
    if key.detail is None:
        raise ValueError(f"{key.op}: a generic operation needs its detail")
    b = key.batch
    if key.op == "functions":
        macs = ew = moved = 0.0
        launches = 0
        for name, ins, out in _parse_calls(key.detail):
            m, e, by, la, _ = _fn_counts(name, ins, out)
            macs, ew, moved, launches = macs + m, ew + e, moved + by, launches + la
        return b * macs, b * ew, b * moved, launches
    kind, params, ins, out = _parse_module(key.detail)
    n_in, n_out = (_numel(ins[0]) if ins else 0), _numel(out)
    moved = 4.0 * (n_in + n_out)
    if key.op == "free":
        return 0.0, 0.0, 0.0, 0
    if key.op == "conv":
        p = _pairs(params)
        kh, kw = p.get("k", (1, 1))
        groups = p.get("g", (1,))[0]
        c_in = ins[0][1] if ins and len(ins[0]) > 1 else 1
        weights = n_out // max(_numel(out[2:]) or 1, 1) * (c_in // groups) * kh * kw
        macs = n_out * (c_in // groups) * kh * kw
        return b * float(macs), 0.0, b * moved + 4.0 * weights, 1
    if key.op == "linear":
        f_in = ins[0][-1] if ins and ins[0] else 1
        f_out = out[-1] if out else 1
        return b * float(n_out * f_in), 0.0, b * moved + 4.0 * f_in * f_out, 1
    if key.op == "pool":
        p = _pairs(params)
        if "k" in p:
            return 0.0, b * float(n_out * math.prod(p["k"])), b * moved, 1
        return 0.0, b * float(n_in), b * moved, 1
    if key.op == "norm":
        per = 2 if kind.startswith("BatchNorm") else 5
        return 0.0, b * float(per * n_out), b * moved, 1
    if key.op == "act":
        per = 4 if kind in _TRANSCENDENTAL | _SOFTMAX else 1
        return 0.0, b * float(per * n_out), b * moved, 1
    return 0.0, b * float(UNKNOWN_OPS_PER_ELEMENT * n_out), b * moved, 1


def is_guessed(key: Any) -> bool:
    """Whether ``key``'s analytical price is a per-element guess (a module or function of a
    type this module does not know)."""
    if key.op == "module":
        return True
    if key.op != "functions" or key.detail is None:
        return False
    return any(_fn_counts(n, i, o)[4] for n, i, o in _parse_calls(key.detail))
