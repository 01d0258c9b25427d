"""Build the network a model reference names, and find its searchable convolutions by tracing.

One forward pass (batch 1, float32, eval mode, no gradient) at the input shape, with a hook on
every ``nn.Conv2d`` (and every ``WinogradConv2d`` of an already converted model), records each
convolution's module path, channels, kernel, stride, padding, dilation, groups and input
geometry, in the order the forward pass reaches them. A convolution is *searchable* when Winograd
F(m x m, 3 x 3) can compute it: 3x3, stride 1, dilation 1, groups 1, zero padding (any amount),
and it is not the first convolution of the forward pass (which reads the image and stays in
floating point, as the paper's stem does); every other one is listed once with the reason it is
not. A module called twice in one forward pass is listed once, at its first call, and is not
searchable (its choice would price two different inputs).

The same pass records every *operation* of the network in forward order (``Discovery.ops``),
which is what the latency models price: each call of a *unit* module (a module with no children,
or a convolution, linear or attention module whatever it holds), with its type, parameters and
tensor shapes, and the functions the containers call between them (a residual ``+=``, a
``flatten``, an attention's ``matmul``), grouped per gap between two unit calls. A unit called
twice is two operations (``relu``, ``relu#2``); a group of functions is named after the unit call
that follows it (``layer1.0.relu#2:pre``) or ``output`` at the end. ``wasearch.deploy`` ticks
the same names when it times a converted model in place.

The model is built from a :class:`~wasearch.netref.ModelRef`: a torchvision model by name
(``weights=None``: nothing is downloaded), a timm model (optional), or the user's own factory
``package.module:function`` imported from the working directory. A reference's ``checkpoint``
(a state_dict, or a dict holding one under ``state_dict`` or ``model``) is read with
``torch.load(weights_only=True)``: plain tensors only, nothing in it is imported or run.

Errors a user can cause (a reference that does not import or build, a factory that raises, an
input shape the model rejects, a checkpoint whose keys do not match) raise
:class:`~wasearch.netref.ModelRefError` with one line naming the key and the cause.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .geometry import ConvSpec
from .layers import WinogradConv2d
from .netref import ModelRef, ModelRefError

__all__ = [
    "FIRST_CONV",
    "OUTPUT_OP",
    "Discovery",
    "FoundConv",
    "TracedOp",
    "build_reference",
    "call_name",
    "discover",
    "format_table",
    "load_state",
    "pre_name",
    "trace_convs",
    "unit_modules",
]

#: Why the first convolution is never searchable: it reads the image, and stays in floating
#: point (the paper's stem does; quantizing the raw input costs the most accuracy).
FIRST_CONV = "first conv, reads the image (kept floating point)"
#: The name of the functions run after the last unit module (none in most networks).
OUTPUT_OP = "output"
#: Modules that are one operation whatever children they hold.
_ATOMIC = (nn.Conv2d, WinogradConv2d, nn.Linear, nn.MultiheadAttention)
#: Unit module categories by class (the first match wins); anything else is ``module``.
_CATEGORIES = (
    ((nn.Conv2d, WinogradConv2d), "conv"),
    ((nn.Linear,), "linear"),
    ((nn.MaxPool2d, nn.AvgPool2d), "pool"),
    ((nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d), "pool"),
    ((nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm), "norm"),
    (
        (
            nn.ReLU,
            nn.ReLU6,
            nn.LeakyReLU,
            nn.PReLU,
            nn.ELU,
            nn.SELU,
            nn.CELU,
            nn.GELU,
            nn.SiLU,
            nn.Mish,
            nn.Sigmoid,
            nn.Tanh,
            nn.Hardswish,
            nn.Hardsigmoid,
            nn.Hardtanh,
            nn.Softmax,
            nn.LogSoftmax,
            nn.Softplus,
        ),
        "act",
    ),  # fmt: skip
    ((nn.Identity, nn.Flatten, nn.Unflatten, nn.modules.dropout._DropoutNd), "free"),
)


@dataclass(frozen=True)
class TracedOp:
    """One operation of the forward pass: a unit module's call, or the functions between two.

    ``category`` is ``conv``, ``linear``, ``pool``, ``norm``, ``act``, ``free`` (identity,
    dropout, flatten), ``module`` (any other type) or ``functions``; ``kind`` the module's class
    name (``functions``: their names joined by ``+``); ``params`` the module's hyper-parameters
    (``k3x3 s2x2 p1x1 d1x1 g1`` for a convolution, ``k3x3 s2x2 p1x1`` for a pool, its output
    size for an adaptive pool), or for ``functions`` each call as ``name in1|in2->out``.
    Shapes include the batch dimension of the trace (1).
    """

    name: str
    module: str | None  # the module path; None for functions
    category: str
    kind: str
    params: str
    inputs: tuple[tuple[int, ...], ...]
    output: tuple[int, ...]


@dataclass(frozen=True)
class FoundConv:
    """One convolution met in the forward pass; ``reason`` is None when it is searchable."""

    name: str
    in_channels: int
    out_channels: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    height: int
    width: int
    reason: str | None

    @property
    def searchable(self) -> bool:
        return self.reason is None

    @property
    def spec(self) -> ConvSpec:
        return ConvSpec(self.name, self.in_channels, self.out_channels, self.height, self.width)


@dataclass(frozen=True)
class Discovery:
    """Every convolution of a model in forward order, the searchable ones and the rest."""

    convs: tuple[FoundConv, ...]
    input_shape: tuple[int, int, int]
    output_shape: tuple[int, ...]
    ops: tuple[TracedOp, ...] = ()

    @property
    def searchable(self) -> tuple[FoundConv, ...]:
        return tuple(c for c in self.convs if c.searchable)

    @property
    def other(self) -> tuple[FoundConv, ...]:
        return tuple(c for c in self.convs if not c.searchable)

    @property
    def specs(self) -> list[ConvSpec]:
        return [c.spec for c in self.searchable]


def _pair(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)  # type: ignore[return-value]


def _padding(module: nn.Module) -> tuple[int, int] | str:
    pad = getattr(module, "padding", (1, 1))
    if pad == "valid":
        return (0, 0)
    if pad == "same":  # odd kernels, stride 1: (k - 1) / 2 * dilation per side
        k, d = _pair(module.kernel_size), _pair(module.dilation)
        return ((k[0] - 1) // 2 * d[0], (k[1] - 1) // 2 * d[1])
    return _pair(pad)


def _reason(module: nn.Module) -> str | None:
    """Why Winograd F(m x m, 3 x 3) cannot compute this convolution (None: it can)."""
    if isinstance(module, WinogradConv2d):
        return None
    kernel, stride = _pair(module.kernel_size), _pair(module.stride)
    reasons = []
    if kernel != (3, 3):
        reasons.append(f"{kernel[0]}x{kernel[1]} kernel")
    if stride != (1, 1):
        reasons.append(f"stride {stride[0] if stride[0] == stride[1] else stride}")
    if _pair(module.dilation) != (1, 1):
        reasons.append(f"dilation {_pair(module.dilation)}")
    if module.groups != 1:
        depthwise = module.groups == module.in_channels
        reasons.append("depthwise" if depthwise else f"groups {module.groups}")
    if getattr(module, "padding_mode", "zeros") != "zeros":
        reasons.append(f"padding_mode {module.padding_mode}")
    return ", ".join(reasons) or None


def call_name(path: str, call: int) -> str:
    """The operation name of a unit module's ``call``-th call in one forward pass (from 1)."""
    return path if call == 1 else f"{path}#{call}"


def pre_name(op_name: str) -> str:
    """The name of the functions run just before the unit call ``op_name``."""
    return f"{op_name}:pre"


def unit_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules each call of which is one operation: leaves, and convolution, linear and
    attention modules whatever children they hold; never a descendant of another unit."""
    units: list[tuple[str, nn.Module]] = []
    taken: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(t + ".") for t in taken):
            continue
        if isinstance(module, _ATOMIC) or next(module.children(), None) is None:
            units.append((name, module))
            taken.append(name)
    return units


def _category(module: nn.Module) -> str:
    for classes, category in _CATEGORIES:
        if isinstance(module, classes):
            return category
    return "module"


def _module_params(module: nn.Module, category: str) -> str:
    if category == "conv":
        k, s = _pair(module.kernel_size), _pair(getattr(module, "stride", 1))
        p, d = _padding(module), _pair(getattr(module, "dilation", 1))
        g = getattr(module, "groups", 1)
        return f"k{k[0]}x{k[1]} s{s[0]}x{s[1]} p{p[0]}x{p[1]} d{d[0]}x{d[1]} g{g}"
    if category == "pool" and hasattr(module, "kernel_size"):
        k = _pair(module.kernel_size)
        s = _pair(module.stride if module.stride is not None else module.kernel_size)
        p = _pair(module.padding)
        return f"k{k[0]}x{k[1]} s{s[0]}x{s[1]} p{p[0]}x{p[1]}"
    if category == "pool":
        size = module.output_size
        return "o" + "x".join(str(v) for v in (size if isinstance(size, tuple) else (size,)))
    return ""


def _shape_text(shapes) -> str:
    return "|".join("x".join(map(str, s)) for s in shapes)


def _tensor_shapes(values) -> tuple[tuple[int, ...], ...]:
    out = []
    for v in values:
        if isinstance(v, torch.Tensor):
            out.append(tuple(v.shape))
        elif isinstance(v, list | tuple):
            out.extend(_tensor_shapes(v))
    return tuple(out)


class _OpRecorder(TorchFunctionMode):
    """Records unit module calls (through hooks) and the functions called outside them."""

    def __init__(self, units: list[tuple[str, nn.Module]]) -> None:
        super().__init__()
        self.ops: list[TracedOp] = []
        self.pending: list[tuple[str, tuple[tuple[int, ...], ...], tuple[int, ...]]] = []
        self.depth = 0
        self.calls: dict[str, int] = {}
        self.hooks = []
        for path, module in units:
            category = _category(module)
            params = _module_params(module, category)
            self.hooks.append(module.register_forward_pre_hook(self._pre(path)))
            self.hooks.append(
                module.register_forward_hook(self._post(path, module, category, params))
            )

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.depth == 0 and isinstance(out, torch.Tensor):
            name = getattr(func, "__name__", None) or type(func).__name__
            self.pending.append(
                (
                    name,
                    _tensor_shapes(args) + _tensor_shapes((kwargs or {}).values()),
                    tuple(out.shape),
                )
            )
        return out

    def flush(self, before: str) -> None:
        if not self.pending:
            return
        calls = self.pending
        self.pending = []
        params = "; ".join(f"{n} {_shape_text(i)}->{_shape_text([o])}" for n, i, o in calls)
        self.ops.append(
            TracedOp(
                pre_name(before) if before != OUTPUT_OP else OUTPUT_OP,
                None,
                "functions",
                "+".join(dict.fromkeys(n for n, _, _ in calls)),
                params,
                calls[0][1],
                calls[-1][2],
            )
        )

    def _pre(self, path: str):
        def fn(_module, args):
            n = self.calls.get(path, 0) + 1
            self.calls[path] = n
            if self.depth == 0:
                self.flush(call_name(path, n))
            self.depth += 1

        return fn

    def _post(self, path: str, module: nn.Module, category: str, params: str):
        def fn(_module, args, out):
            self.depth -= 1
            if self.depth:
                return
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else ()
            self.ops.append(
                TracedOp(
                    call_name(path, self.calls[path]),
                    path,
                    category,
                    type(module).__name__,
                    params,
                    _tensor_shapes(args),
                    shape,
                )
            )

        return fn

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()


@torch.no_grad()
def trace_convs(model: nn.Module, input_shape: tuple[int, int, int], *, where: str = "model"):
    """The :class:`Discovery` of ``model`` at ``input_shape`` (channels, height, width): its
    convolutions and every operation (:class:`TracedOp`) in forward order.

    Runs one forward pass at batch 1 in eval mode (the model's mode is restored after).
    """
    found: dict[str, FoundConv] = {}
    calls: dict[str, int] = {}
    hooks = []

    def hook(name: str, module: nn.Module):
        def fn(_module, args):
            calls[name] = calls.get(name, 0) + 1
            if name in found:
                return
            x = args[0]
            found[name] = FoundConv(
                name=name,
                in_channels=module.in_channels,
                out_channels=module.out_channels,
                kernel=_pair(module.kernel_size),
                stride=_pair(getattr(module, "stride", 1)),
                padding=_padding(module),
                dilation=_pair(getattr(module, "dilation", 1)),
                groups=getattr(module, "groups", 1),
                height=int(x.shape[-2]),
                width=int(x.shape[-1]),
                reason=_reason(module),
            )

        return fn

    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d | WinogradConv2d):
            hooks.append(module.register_forward_pre_hook(hook(name, module)))
    recorder = _OpRecorder(unit_modules(model))
    was_training = model.training
    model.eval()
    try:
        x = torch.zeros(1, *input_shape)
        with recorder:
            out = model(x)
        recorder.flush(OUTPUT_OP)
    except Exception as err:  # the user's model: any exception is a rejection of this input
        shape = "x".join(map(str, input_shape))
        raise ModelRefError(
            f"{where}: the model rejects a 1x{shape} input (input_size / channels): "
            f"{type(err).__name__}: {_first_line(err)}"
        ) from None
    finally:
        model.train(was_training)
        recorder.remove()
        for h in hooks:
            h.remove()
    convs = []
    for i, c in enumerate(found.values()):
        if c.reason is None and i == 0:
            c = FoundConv(**{**c.__dict__, "reason": FIRST_CONV})
        elif c.reason is None and calls[c.name] > 1:
            c = FoundConv(**{**c.__dict__, "reason": f"called {calls[c.name]} times per forward"})
        convs.append(c)
    out_shape = tuple(out.shape) if isinstance(out, torch.Tensor) else ()
    return Discovery(tuple(convs), tuple(input_shape), out_shape, tuple(recorder.ops))


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else repr(err)


def _import_callable(ref: ModelRef, where: str):
    if ref.kind == "torchvision":
        try:
            from torchvision import models as tv_models
        except ImportError as err:
            raise ModelRefError(f"{where}: torchvision is not installed ({err})") from None
        names = tv_models.list_models()
        if ref.name not in names:
            raise ModelRefError(
                f"{where}: torchvision has no model {ref.name!r} (e.g. resnet18, vgg11_bn, "
                "mobilenet_v2)"
            )

        def tv_build(**kwargs):
            return tv_models.get_model(ref.name, weights=None, **kwargs)

        return tv_build, True
    if ref.kind == "timm":
        try:
            import timm
        except ImportError:
            raise ModelRefError(
                f"{where}: {ref.text} needs timm, an optional extra: pip install timm"
            ) from None

        def timm_build(**kwargs):
            return timm.create_model(ref.name, pretrained=False, **kwargs)

        return timm_build, True
    module_name, func_name = ref.name.split(":", 1)
    cwd = os.getcwd()
    if cwd not in sys.path:  # the user's own package, in the working directory
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except Exception as err:
        raise ModelRefError(
            f"{where}: cannot import {module_name!r} (from the working directory {cwd}): "
            f"{type(err).__name__}: {_first_line(err)}"
        ) from None
    func = getattr(module, func_name, None)
    if not callable(func):
        raise ModelRefError(f"{where}: {module_name} has no function {func_name!r}")
    try:
        params = inspect.signature(func).parameters.values()
        takes_classes = any(
            p.name == "num_classes" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params
        )
    except (TypeError, ValueError):
        takes_classes = False
    return func, takes_classes


def build_reference(ref: ModelRef, *, num_classes: int, where: str = "model") -> nn.Module:
    """The plain (unconverted) model ``ref`` names, its checkpoint loaded when it has one."""
    if ref.is_paper:
        raise ValueError("the paper's network is built by wasearch.models.build")
    func, takes_classes = _import_callable(ref, f"{where}.name")
    kwargs = ref.kwargs_dict
    if takes_classes and "num_classes" not in kwargs:
        kwargs["num_classes"] = num_classes
    try:
        model = func(**kwargs)
    except Exception as err:
        raise ModelRefError(
            f"{where}.name: {ref.text}(**{kwargs}) raised {type(err).__name__}: {_first_line(err)}"
        ) from None
    if not isinstance(model, nn.Module):
        raise ModelRefError(
            f"{where}.name: {ref.text} returned {type(model).__name__}, not a module"
        )
    if ref.checkpoint is not None:
        load_state(model, ref.checkpoint, where=f"{where}.checkpoint")
    return model


def load_state(model: nn.Module, path: str | os.PathLike, *, where: str) -> None:
    """Load a state_dict file into ``model``; every mismatch is named in one line."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelRefError(f"{where}: {path} does not exist")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ModelRefError(
            f"{where}: {path} is not a plain state_dict file ({type(err).__name__}: "
            f"{_first_line(err)})"
        ) from None
    if isinstance(data, dict):
        for key in ("state_dict", "model"):
            if isinstance(data.get(key), dict):
                data = data[key]
                break
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise ModelRefError(f"{where}: {path} holds no state_dict (a mapping of tensors)")
    own = model.state_dict()
    missing = [k for k in own if k not in data]
    unexpected = [k for k in data if k not in own]
    wrong = [k for k in own if k in data and tuple(data[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape", wrong)):
            if keys:
                more = f" (+{len(keys) - 3} more)" if len(keys) > 3 else ""
                parts.append(f"{label}: {', '.join(keys[:3])}{more}")
        raise ModelRefError(f"{where}: {path} does not match the model; {'; '.join(parts)}")
    model.load_state_dict(data)


@functools.lru_cache(maxsize=16)
def discover(
    ref: ModelRef, *, num_classes: int, input_size: int, in_channels: int = 3
) -> Discovery:
    """Build ``ref``'s model and trace it (cached: a reference is traced once per process).

    Also checks that the output is ``(1, num_classes)`` and that there is something to search.
    """
    torch_state = torch.random.get_rng_state()
    try:  # building initializes weights: leave the caller's random stream as it was
        model = build_reference(ref, num_classes=num_classes)
    finally:
        torch.random.set_rng_state(torch_state)
    found = trace_convs(model, (in_channels, input_size, input_size))
    if found.output_shape != (1, num_classes):
        raise ModelRefError(
            f"model: {ref.text} outputs shape {found.output_shape} for one image; expected "
            f"(1, {num_classes}) logits (num_classes)"
        )
    if not found.searchable:
        kinds = sorted({c.reason for c in found.other if c.reason})
        raise ModelRefError(
            f"model: {ref.text} has no searchable convolution (3x3, stride 1, dilation 1, "
            f"groups 1); its {len(found.convs)} conv(s): {'; '.join(kinds) or 'none'}"
        )
    return found


def format_table(found: Discovery) -> str:
    """The table ``search.py inspect`` prints: every convolution, searchable or why not."""
    rows = [("layer", "in", "out", "kernel", "stride", "pad", "input", "searchable")]
    for c in found.convs:
        rows.append(
            (
                c.name,
                str(c.in_channels),
                str(c.out_channels),
                f"{c.kernel[0]}x{c.kernel[1]}",
                str(c.stride[0]) if c.stride[0] == c.stride[1] else f"{c.stride}",
                str(c.padding[0]) if c.padding[0] == c.padding[1] else f"{c.padding}",
                f"{c.height}x{c.width}",
                "yes" if c.searchable else f"no: {c.reason}",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    n = len(found.searchable)
    lines.append(f"{n} searchable of {len(found.convs)} convolutions")
    return "\n".join(lines)
