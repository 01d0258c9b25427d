"""Deployment: a trained network converted so that every layer runs its algorithm for real.

A Winograd-aware network trains with the Winograd pipeline simulated in its forward pass (the
weight transform recomputed every step, fake quantizers between the stages). For inference the
same choices run as real kernels, which is what the latency models time and price:

* **direct**: ``torch.nn.functional.conv2d`` with the BatchNorm folded into weight and bias;
* **Winograd F(m x m, 3 x 3)** (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks",
  CVPR 2016, equation (8)): the filters are transformed once at conversion, ``U = G g G^T`` (BN
  folded in first); each call gathers the input tiles, applies the input transform ``B^T d B``,
  multiplies in the Winograd domain as one batched GEMM over the ``(m + 2)^2`` tile positions with
  the channels as the GEMM's inner dimension, applies the output transform ``A^T M A`` and writes
  the tiles back. Static and flex layers deploy alike (their transforms are only numbers here).

The kernels themselves (their memory layout, the 8-bit scheme and its limits on this CPU) are
:mod:`wasearch.deploy_kernels`; this module builds the network from them: BatchNorm folded into
each convolution, activation ranges taken from the training quantizers (or a calibration batch),
and bit-widths without a kernel here run in float32 and are listed in
``DeployResNet.substituted``. The kernel names stay importable from here.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import statistics
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .deploy_kernels import (
    CHUNK_TILES,
    DirectConv,
    Head,
    WinogradConv,
    has_int_kernel,
    int8_available,
    winograd_deploy_conv2d,
    winograd_input_tiles,
)
from .discovery import call_name, pre_name
from .layers import WinogradConv2d
from .models import ResNetWA

__all__ = [
    "CHUNK_TILES",
    "DeployBlock",
    "DeployNet",
    "DeployResNet",
    "DirectConv",
    "Head",
    "WinogradConv",
    "has_int_kernel",
    "int8_available",
    "pick_fastest_forms",
    "to_deploy",
    "winograd_deploy_conv2d",
    "winograd_input_tiles",
]


Tick = Callable[[str], None]


def _no_tick(_name: str) -> None:
    return None


def _prefixed(tick: Tick, prefix: str, name: str) -> None:
    tick(f"{prefix}.{name}")


class DeployBlock(nn.Module):
    """A BasicBlock at inference: [max-pool], conv1, ReLU, conv2, shortcut, add, ReLU."""

    def __init__(
        self, conv1: nn.Module, conv2: nn.Module, shortcut: nn.Module | None, *, pool: bool
    ) -> None:
        super().__init__()
        self.pool = nn.MaxPool2d(2) if pool else None
        self.conv1 = conv1
        self.conv2 = conv2
        self.shortcut = shortcut

    def forward(self, x: torch.Tensor, tick: Tick | None = None) -> torch.Tensor:
        t = tick or _no_tick
        if self.pool is not None:
            x = self.pool(x)
            t("pool")
        out = self.conv1(x)
        t("conv1")
        out = torch.relu_(out)
        t("relu")
        out = self.conv2(out)
        t("conv2")
        sc = x
        if self.shortcut is not None:
            sc = self.shortcut(x)
            t("shortcut")
        out = torch.relu_(out.add_(sc))
        t("add_relu")
        return out


class DeployResNet(nn.Module):
    """The inference form of a ``ResNetWA``; runs in channels-last memory format.

    ``kernels`` maps every convolution (searchable ones by their name, ``stem``, and
    ``<block>.shortcut``) to the kernel it runs (``"fp32"``, ``"int8"``); ``substituted`` lists
    those whose bit-width has no kernel here and run float32 instead.
    """

    def __init__(
        self,
        stem: DirectConv,
        blocks: dict[str, DeployBlock],
        head: Head,
        *,
        kernels: dict[str, str],
        substituted: list[str],
    ) -> None:
        super().__init__()
        self.stem = stem
        self.blocks = nn.ModuleDict({k.replace(".", "_"): b for k, b in blocks.items()})
        self.block_names = list(blocks)
        self.head = head
        self.kernels = dict(kernels)
        self.substituted = list(substituted)

    def named_blocks(self) -> Iterator[tuple[str, DeployBlock]]:
        for name in self.block_names:
            yield name, self.blocks[name.replace(".", "_")]

    def forward(self, x: torch.Tensor, tick: Tick | None = None) -> torch.Tensor:
        """``tick(name)``, when given, is called after each operation with its name as
        ``latency.network_ops`` names it (``stem``, ``layer1.0.conv1``, ``layer1.0.relu``, ...,
        ``head``): the hook that times operations in place (``latency.measure``)."""
        x = torch.relu_(self.stem(x.contiguous(memory_format=torch.channels_last)))
        if tick is not None:
            tick("stem")
        for name, block in self.named_blocks():
            x = block(x, None if tick is None else functools.partial(_prefixed, tick, name))
        x = self.head(x)
        if tick is not None:
            tick("head")
        return x


# -- conversion ----------------------------------------------------------------------------------
def _fold_bn(
    weight: torch.Tensor, bias: torch.Tensor | None, bn: nn.BatchNorm2d
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold an eval-mode BatchNorm into the preceding convolution's weight and bias."""
    inv = torch.rsqrt(bn.running_var.detach().float() + bn.eps)
    gamma = bn.weight.detach().float() if bn.weight is not None else torch.ones_like(inv)
    beta = bn.bias.detach().float() if bn.bias is not None else torch.zeros_like(inv)
    scale = gamma * inv
    w = weight.detach().float() * scale.view(-1, *([1] * (weight.dim() - 1)))
    b0 = bias.detach().float() if bias is not None else torch.zeros_like(scale)
    return w, beta + (b0 - bn.running_mean.detach().float()) * scale


def _quantizer_amax(q: nn.Module | None, *, per_tap: bool = False) -> Any:
    """The largest magnitude a trained running quantizer has seen (per tap: a tensor), or None."""
    if q is None or not getattr(q, "is_initialized", False):  # False too for weight quantizers
        return None
    amax = torch.maximum(q.min_val.abs(), q.max_val.abs()).float()
    return amax.clone() if per_tap else float(amax.max())


def _run_bits(mod: nn.Module, int8: bool) -> tuple[int | None, int | None]:
    """(the precision a layer asks for, the integer precision it runs at here or None for
    fp32). A Winograd layer's is its Winograd domain's (``wd_bits``, else ``bits``): the
    product is the integer kernel; a domain wider than 8 bits has no integer kernel here (it
    would need an int16 product) and runs in fp32, which the measured latency prices."""
    bits = getattr(mod, "bits", None)
    if isinstance(mod, WinogradConv2d) and mod.wd_bits is not None:
        bits = mod.wd_bits
    return bits, (bits if int8 and has_int_kernel(bits) else None)


def _convert_conv(
    name: str,
    mod: nn.Module,
    bn: nn.BatchNorm2d,
    *,
    padding: int,
    int8: bool,
    kernels: dict[str, str],
    substituted: list[str],
    calib: dict[str, Any],
) -> nn.Module:
    bits, run_bits = _run_bits(mod, int8)
    if bits is not None and run_bits is None:
        substituted.append(name)
    kernels[name] = "fp32" if run_bits is None else f"int{run_bits}"
    w, b = _fold_bn(mod.weight, mod.bias, bn)
    if isinstance(mod, WinogradConv2d):
        A_t, G, B_t = mod.transforms()
        amax = _quantizer_amax(mod.q_input_wd, per_tap=True)
        kernel = WinogradConv(
            w,
            b,
            A_t,
            G,
            B_t,
            bits=run_bits,
            act_amax=amax if amax is not None else calib.get(name),
        )
        kernel.layer_name = name
        return kernel
    amax = _quantizer_amax(getattr(mod, "q_input", None))
    amax = amax if amax is not None else calib.get(name)
    return DirectConv(w, b, padding=padding, bits=run_bits, act_amax=amax)


@torch.no_grad()
def _calibrate(model: nn.Module, x: torch.Tensor) -> dict[str, Any]:
    """Input ranges of every quantized conv (Winograd: of B^T d B) on one batch."""
    ranges: dict[str, Any] = {}
    hooks = []

    def hook(name: str, mod: nn.Module):
        def fn(_mod, args):
            inp = args[0]
            if isinstance(mod, WinogradConv2d):
                a = mod.tile + 2
                tiles = winograd_input_tiles(inp, mod.tile)  # partial tiles padded
                _, _, B_t = mod.transforms()
                v = B_t @ tiles.reshape(a, -1)
                v = torch.matmul(B_t, v.view(a, a, -1))
                ranges[name] = v.abs().reshape(a * a, -1).amax(dim=1)
            else:
                ranges[name] = float(inp.abs().max())

        return fn

    for name, mod in model.named_modules():
        if getattr(mod, "bits", None) is not None and hasattr(mod, "weight"):
            hooks.append(mod.register_forward_pre_hook(hook(name, mod)))
    was_training = model.training
    model.eval()
    try:
        model(x)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return ranges


def to_deploy(
    model: nn.Module,
    *,
    int8: bool = True,
    calibration: torch.Tensor | None = None,
    fastest_forms_on: torch.Tensor | None = None,
) -> DeployResNet:
    """Convert a trained ``ResNetWA`` into its inference form (see the module doc).

    Args:
        model: a network from ``wasearch.models.build``; its BatchNorm running statistics are
            folded (eval-mode semantics), its mode is left unchanged.
        int8: run 8-bit layers on the integer kernels where this machine has them; False runs
            every layer in float32 (a float twin, e.g. to compare algorithms alone).
        calibration: a batch of inputs that fixes the activation ranges of quantized layers whose
            training quantizers never saw data; without it such ranges are measured per call.

        fastest_forms_on: a batch shaped as the deployed model will run (batch size, image
            size): each Winograd kernel is timed on its input there in every form
            (:func:`pick_fastest_forms`) and keeps the fastest; the choices are the result's
            ``forms``. Without it, every kernel keeps the default form (separable transforms
            from F4 up, in groups of images).

    Layers whose bit-width has no kernel here (4, 16, ...) run float32; they are listed in the
    result's ``substituted`` and reported once with ``warnings.warn``.

    Any other model built from an ``Arch`` (``models.convert``) gives a :class:`DeployNet`: a
    copy whose searchable convolutions run the same kernels; its other modules run as trained,
    BatchNorm not folded.
    """
    if isinstance(model, ResNetWA):
        with torch.no_grad():
            deployed: nn.Module = _to_deploy(model, int8=int8, calibration=calibration)
    else:
        arch = getattr(model, "arch", None)
        if arch is None or getattr(arch, "is_paper", True):
            raise TypeError(
                "to_deploy expects a network from wasearch.models.build, got "
                f"{type(model).__name__}"
            )
        with torch.no_grad():
            deployed = _to_deploy_any(model, int8=int8, calibration=calibration)
    deployed.forms = {name: mod.form for name, mod in _winograd_kernels(deployed).items()}
    if fastest_forms_on is not None:
        deployed.forms = pick_fastest_forms(deployed, fastest_forms_on)
    return deployed


def _winograd_kernels(deployed: nn.Module) -> dict[str, WinogradConv]:
    """The Winograd kernels of a deployed network by layer name (the ``Arch``'s, as
    ``kernels`` names them), or by module path where a kernel carries none."""
    return {
        getattr(mod, "layer_name", path): mod
        for path, mod in deployed.named_modules()
        if isinstance(mod, WinogradConv)
    }


def _time_kernel(module: nn.Module, x: torch.Tensor, repeats: int = 15) -> float:
    """Median seconds of one call of ``module`` on ``x`` (two untimed calls first)."""
    with torch.inference_mode():
        for _ in range(2):
            module(x)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            module(x)
            if x.is_cuda:
                torch.cuda.synchronize(x.device)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def pick_fastest_forms(
    deployed: nn.Module,
    x: torch.Tensor,
    *,
    timer: Callable[[nn.Module, torch.Tensor], float] = _time_kernel,
) -> dict[str, tuple[str, int | None]]:
    """Time every Winograd kernel of ``deployed`` in each of its forms
    (:data:`WinogradConv.FORMS`: fused, Kronecker or separable transforms, the batch in groups
    or whole) on the input it receives when ``deployed`` runs ``x``, and keep the fastest, in
    place. Every form computes the same convolution (equal up to float rounding), so the
    network's outputs do not change. Returns ``{module path: (transform, chunk_tiles)}``.
    ``timer(module, input)`` returns seconds (default: the median of 15 calls)."""
    kernels = _winograd_kernels(deployed)
    inputs: dict[str, torch.Tensor] = {}
    hooks = []
    for name, mod in kernels.items():

        def keep(_mod, args, name=name):
            inputs[name] = args[0]

        hooks.append(mod.register_forward_pre_hook(keep))
    try:
        with torch.inference_mode():
            deployed(x)
    finally:
        for h in hooks:
            h.remove()
    chosen: dict[str, tuple[str, int | None]] = {}
    for name, inp in inputs.items():
        mod = kernels[name]
        times = {}
        for form in WinogradConv.FORMS:
            mod.set_form(*form)
            times[form] = timer(mod, inp)
        best = min(times, key=times.__getitem__)
        mod.set_form(*best)
        chosen[name] = best
    return chosen


def _to_deploy(model: nn.Module, *, int8: bool, calibration: torch.Tensor | None) -> DeployResNet:
    calib = _calibrate(model, calibration) if calibration is not None else {}
    kernels: dict[str, str] = {}
    substituted: list[str] = []
    opts = {"int8": int8, "kernels": kernels, "substituted": substituted, "calib": calib}

    w, b = _fold_bn(model.conv1.weight, model.conv1.bias, model.bn1)
    stem = DirectConv(w, b, padding=1)
    kernels["stem"] = "fp32"
    blocks: dict[str, DeployBlock] = {}
    for stage in ("layer1", "layer2", "layer3", "layer4"):
        for i, blk in enumerate(getattr(model, stage)):
            prefix = f"{stage}.{i}"
            conv1 = _convert_conv(f"{prefix}.conv1", blk.conv1, blk.bn1, padding=1, **opts)
            conv2 = _convert_conv(f"{prefix}.conv2", blk.conv2, blk.bn2, padding=1, **opts)
            shortcut = None
            if isinstance(blk.shortcut, nn.Sequential):
                shortcut = _convert_conv(
                    f"{prefix}.shortcut", blk.shortcut[0], blk.shortcut[1], padding=0, **opts
                )
            blocks[prefix] = DeployBlock(
                conv1, conv2, shortcut, pool=isinstance(blk.pool, nn.MaxPool2d)
            )
    head = Head(model.fc.weight, model.fc.bias)
    if substituted and int8:
        warnings.warn(
            f"no integer kernel on this machine for the bit-widths of {len(substituted)} "
            f"layer(s) ({', '.join(substituted[:4])}{', ...' if len(substituted) > 4 else ''}); "
            "they run float32 here and latency models price them as estimated",
            stacklevel=3,
        )
    return DeployResNet(stem, blocks, head, kernels=kernels, substituted=substituted)


# -- any other network ---------------------------------------------------------------------------
class DeployNet(nn.Module):
    """The inference form of any network ``models.convert`` built: a copy whose searchable
    convolutions run the deploy kernels (Winograd or direct, float32 or 8-bit; ``kernels`` by
    module path) and whose other modules run as trained, BatchNorm included (not folded).

    It runs in channels-last memory format, as ``DeployResNet`` does and the Winograd kernels
    write: every operation sees one layout whatever algorithm its neighbours run, so that its
    time does not depend on them (a direct convolution after a Winograd one would otherwise run
    on channels-last data, after a direct one on NCHW data)."""

    def __init__(self, net: nn.Module, *, kernels: dict[str, str], substituted: list[str]):
        super().__init__()
        self.net = net
        self.kernels = dict(kernels)
        self.substituted = list(substituted)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(x)

    @contextlib.contextmanager
    def ticking(self, modules: Iterable[str], tick: Tick) -> Iterator[None]:
        """While inside, each forward pass calls ``tick(name)`` after each call of the unit
        modules at the paths ``modules``, named as ``discovery`` names the traced operations
        (``relu``, ``relu#2``), and ``tick(pre_name(name))`` just before each: the functions
        between two modules end there. ``tick(OUTPUT_OP)`` is the caller's, after the pass.

        Each unit module's ``forward`` is wrapped on entry (an instance attribute over the
        class's method) and restored on exit, so a pass outside runs as plain as before. Not
        forward hooks: a module with hooks takes ``nn.Module``'s slow call path, and a pre and
        a post hook cost 3.5 us per call here against 1 us for the wrapper, a cost the in-place
        clock then has to estimate and take off (``NetworkTimer.op_overhead``)."""
        calls: dict[str, int] = {}
        hook = self.register_forward_pre_hook(lambda _m, _a: calls.clear())  # once per pass
        wrapped: list[tuple[nn.Module, Any]] = []

        def wrap(path: str, forward: Callable[..., Any]) -> Callable[..., Any]:
            first, first_pre = call_name(path, 1), pre_name(call_name(path, 1))

            def timed_forward(*args: Any, **kwargs: Any) -> Any:
                n = calls.get(path, 0) + 1
                calls[path] = n
                tick(first_pre if n == 1 else pre_name(call_name(path, n)))
                out = forward(*args, **kwargs)
                tick(first if n == 1 else call_name(path, n))
                return out

            return timed_forward

        try:
            for path in dict.fromkeys(modules):
                mod = self.net.get_submodule(path)
                wrapped.append((mod, mod.__dict__.get("forward", _NO_FORWARD)))
                mod.forward = wrap(path, mod.forward)
            yield
        finally:
            hook.remove()
            for mod, own in reversed(wrapped):
                if own is _NO_FORWARD:
                    del mod.forward
                else:
                    mod.forward = own


#: ``ticking``'s mark of a module without a ``forward`` of its own (the class's method ran).
_NO_FORWARD = object()


class _Padded(nn.Module):
    """A padding-1 Winograd kernel run at another zero padding: the input padded further (p > 1)
    or the output's border cropped (p = 0), as ``WinogradConv2d`` does."""

    def __init__(self, kernel: nn.Module, padding: tuple[int, int]) -> None:
        super().__init__()
        self.kernel = kernel
        self.padding = padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ph, pw = (max(p - 1, 0) for p in self.padding)
        y = self.kernel(F.pad(x, (pw, pw, ph, ph)) if ph or pw else x)
        if self.padding[0] == 0:
            y = y[..., 1:-1, :]
        if self.padding[1] == 0:
            y = y[..., :, 1:-1]
        return y


def _to_deploy_any(model: nn.Module, *, int8: bool, calibration: torch.Tensor | None) -> DeployNet:
    calib = _calibrate(model, calibration) if calibration is not None else {}
    net = copy.deepcopy(model).eval()
    kernels: dict[str, str] = {}
    substituted: list[str] = []
    for name in model.arch.layer_names:
        mod = net.get_submodule(name)
        bits, run_bits = _run_bits(mod, int8)
        if bits is not None and run_bits is None:
            substituted.append(name)
        kernels[name] = "fp32" if run_bits is None else f"int{run_bits}"
        w = mod.weight.detach().float()
        b = None if mod.bias is None else mod.bias.detach().float()
        if isinstance(mod, WinogradConv2d):
            amax = _quantizer_amax(mod.q_input_wd, per_tap=True)
            kernel: nn.Module = WinogradConv(
                w,
                b,
                *mod.transforms(),
                bits=run_bits,
                act_amax=amax if amax is not None else calib.get(name),
            )
            kernel.layer_name = name
            if mod.padding != (1, 1):
                kernel = _Padded(kernel, mod.padding)
        else:
            amax = _quantizer_amax(getattr(mod, "q_input", None))
            # a searchable conv is 3x3, stride 1, dilation 1: "same" pads 1, "valid" 0
            pad = {"same": (1, 1), "valid": (0, 0)}.get(mod.padding, mod.padding)
            ph, pw = pad
            kernel = DirectConv(
                w,
                b,
                padding=ph,
                bits=run_bits,
                act_amax=amax if amax is not None else calib.get(name),
                signed_input=True,  # no ReLU is known to precede it in an arbitrary model
            )
            if ph != pw:  # DirectConv pads alike on both axes: the rest as extra zeros
                kernel = nn.Sequential(nn.ZeroPad2d((pw - ph, pw - ph, 0, 0)), kernel)
        parent, _, leaf = name.rpartition(".")
        setattr(net.get_submodule(parent) if parent else net, leaf, kernel)
    if substituted and int8:
        warnings.warn(
            f"no integer kernel on this machine for the bit-widths of {len(substituted)} "
            f"layer(s) ({', '.join(substituted[:4])}{', ...' if len(substituted) > 4 else ''}); "
            "they run float32 here",
            stacklevel=3,
        )
    return DeployNet(net, kernels=kernels, substituted=substituted)
