"""Fused CPU kernels of the fake quantizer and the Winograd-aware layer, compiled on first use.

The quantizer's torch chain (``quant._RoundSTE``) passes over a tensor three to eight times
(divide, abs, compare, convert, round, clamp, convert, multiply); the Winograd-aware layer
quantizes tensors 2-4x the size of its activations, so on a CPU whose memory is the bottleneck
those passes were most of a training step. ``csrc/fake_quant.cpp`` does each job in one pass and
computes the same values bit for bit (tests/test_cpu_kernels.py compares the two on ties, clips,
every bit-width and both granularities). The layer's input tiles are gathered and scattered
the same way, bit for bit. Its 2-D transforms (``transform2d``: ``mat X mat^T`` of every tile,
and the gradients) are the one exception: one pass instead of the GEMMs' four to six, the same
sums in another order, so equal up to float rounding (``disabled("transforms")`` turns them off
alone). Where they run, the input transform reads its tiles from the layer's input in place and
adds their gradient back into the input's, so that the gather and scatter kernels are not used.

It is built with torch's own extension builder (``torch.utils.cpp_extension.load``: a C++
compiler and ninja, a dependency of this package) the first time a CPU quantizer runs in a
process, about a minute once per machine, then loaded from torch's extension cache
(``~/.cache/torch_extensions``, or ``$TORCH_EXTENSIONS_DIR``). The flags follow the CPU
capability torch reports (AVX512 or AVX2), which is part of the build's name, so one cache can
serve machines of either kind. Where it cannot be built (no compiler, say) the torch chain runs,
after one warning that says why. ``WASEARCH_FUSED_KERNELS=0`` turns the kernels off;
:func:`disabled` does so for a block of code (tests and benchmarks compare the two).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import torch

__all__ = ["PARTS", "available", "disabled", "kernels"]

_SOURCE = Path(__file__).with_name("csrc") / "fake_quant.cpp"
_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma"],
    "AVX2": ["-mavx2", "-mfma"],
}
_lock = threading.Lock()
_state: dict[str, object] = {"module": None, "tried": False}
_off = threading.local()
log = logging.getLogger(__name__)


def _capability() -> str:
    cap = torch.backends.cpu.get_cpu_capability()
    return cap if cap in _FLAGS else "DEFAULT"


def _build() -> ModuleType:
    # Importing the builder logs a warning about CUDA_HOME on machines without CUDA, which
    # does not concern a CPU extension: keep it out of the user's terminal.
    ext_log = logging.getLogger("torch.utils.cpp_extension")
    level = ext_log.level
    ext_log.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        ext_log.setLevel(level)
    cap = _capability()
    name = f"wasearch_fake_quant_{cap.lower()}"
    flags = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", *_FLAGS.get(cap, [])]
    built = Path(cpp_extension._get_build_directory(name, verbose=False)) / f"{name}.so"
    if not built.exists():
        log.warning(
            "wasearch: compiling the fused CPU quantizer (%s, once per machine, about a minute)",
            cap,
        )
    return cpp_extension.load(name=name, sources=[str(_SOURCE)], extra_cflags=flags, verbose=False)


#: The kernels that can be switched off on their own (:func:`disabled`): ``"transforms"``, the
#: Winograd-aware layer's 2-D transforms, and ``"grid_product"``, its Winograd-domain product on
#: two 8-bit grids as exact integer sums; both change float rounding (the others compute the
#: torch chain's values bit for bit).
PARTS = ("transforms", "grid_product")


def kernels(part: str | None = None) -> ModuleType | None:
    """The compiled module, or None where the kernels are off or could not be built (then
    the caller runs the torch chain). ``part`` names a kernel of :data:`PARTS` that the
    caller is about to use, so that :func:`disabled` can switch it off alone. Built at most
    once per process."""
    if getattr(_off, "depth", 0) or os.environ.get("WASEARCH_FUSED_KERNELS", "1") == "0":
        return None
    if part is not None and part in getattr(_off, "parts", ()):
        return None
    if _state["tried"]:
        return _state["module"]  # type: ignore[return-value]
    with _lock:
        if not _state["tried"]:
            try:
                _state["module"] = _build()
            except Exception as err:  # any failure to build means: fall back
                reason = str(err).strip().splitlines()
                warnings.warn(
                    "wasearch: the fused CPU quantizer could not be built "
                    f"({type(err).__name__}: {reason[-1] if reason else 'no message'}); "
                    "using the slower torch operations (same values). Set "
                    "WASEARCH_FUSED_KERNELS=0 to skip the attempt.",
                    RuntimeWarning,
                    stacklevel=3,
                )
            _state["tried"] = True
    return _state["module"]  # type: ignore[return-value]


def available() -> bool:
    """Whether the fused kernels run here (building them if they were not yet)."""
    return kernels() is not None


@contextlib.contextmanager
def disabled(*parts: str) -> Iterator[None]:
    """Run the torch operations instead of the fused kernels inside this block (this thread):
    all of them, or only the ``parts`` named (of :data:`PARTS`)."""
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise ValueError(f"unknown kernel part(s) {sorted(unknown)}; known: {list(PARTS)}")
    if parts:
        before = getattr(_off, "parts", frozenset())
        _off.parts = before | frozenset(parts)
        try:
            yield
        finally:
            _off.parts = before
        return
    _off.depth = getattr(_off, "depth", 0) + 1
    try:
        yield
    finally:
        _off.depth -= 1
