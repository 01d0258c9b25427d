"""glibc's malloc set to keep freed memory for reuse, as the command-line scripts run it.

A training step allocates and frees the same large tensors every step. With glibc's defaults
a block of 32 MiB or more (and, below that, any block over a threshold that grows with what was
freed) is mapped from the kernel on every allocation and unmapped on free, and free memory at
the top of the heap is handed back above 128 KiB: the next step's tensors are then faulted in
again, 4 KiB at a time, each page zeroed by the kernel. Measured on the CPU machine of
2026-12-01 (AMD EPYC, 1 thread): filling a fresh 32 MiB tensor took 22.6 ms against about 5
for one already mapped, and a Winograd-aware F2 training step at batch 64, whose
Winograd-domain tensors are 32 MiB, spent a third of its time so.

:func:`keep_freed_memory` sets glibc's ``M_MMAP_MAX`` to 0 (every block from the heap, so freed
blocks are reused) and ``M_TRIM_THRESHOLD`` to 1 GiB (free memory at the top of the heap kept
for reuse until it exceeds that). The process's peak memory is then what the heap held at its
largest: up to a fifth more for the largest configurations measured, and less for others
(README, "Speed and memory"). ``run_main`` (every script: ``train.py``, ``search.py``,
``adapt.py``) calls it first; a library user calls it where they want it.

Left alone: anything but glibc (``mallopt`` missing), an allocator preloaded in its place
(``LD_PRELOAD`` naming jemalloc, tcmalloc or mimalloc), glibc's own ``MALLOC_*_`` variables
set in the environment (the user's choice stands), and ``WASEARCH_MALLOC=glibc`` (glibc's
defaults, the opt-out).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading

__all__ = ["ENV", "TRIM_THRESHOLD", "keep_freed_memory", "state"]

#: The environment variable that opts out: ``WASEARCH_MALLOC=glibc`` keeps glibc's defaults.
ENV = "WASEARCH_MALLOC"
#: Free memory kept at the top of the heap before glibc returns it (mallopt takes an int).
TRIM_THRESHOLD = 1 << 30

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_GLIBC_VARIABLES = (
    "MALLOC_MMAP_MAX_",
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_TOP_PAD_",
    "GLIBC_TUNABLES",
)
_OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")
_lock = threading.Lock()
_state: dict[str, str] = {}


def _why_not(environ) -> str | None:
    """Why the process's allocator is left as it is, or None."""
    if environ.get(ENV, "").strip().lower() == "glibc":
        return f"{ENV}=glibc"
    for name in _GLIBC_VARIABLES:
        if name in environ:
            return f"{name} is set"
    preload = environ.get("LD_PRELOAD", "")
    for other in _OTHER_ALLOCATORS:
        if other in preload:
            return f"{other} is preloaded"
    return None


def _libc():
    """The C library if it is glibc (it has ``mallopt`` and ``gnu_get_libc_version``)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    if not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):
        return None
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    return libc


def keep_freed_memory(environ=None) -> str:
    """Set glibc to serve every block from its heap and keep freed memory (see the module);
    once per process. Returns what the process's allocator is now, in words: ``"glibc: heap,
    freed memory kept"``, or ``"as it was: <why>"``."""
    with _lock:
        if "allocator" in _state:
            return _state["allocator"]
        why = _why_not(os.environ if environ is None else environ)
        libc = None if why else _libc()
        if why is None and libc is None:
            why = "not glibc"
        if why is None:
            ok = libc.mallopt(_M_MMAP_MAX, 0) == 1
            ok = libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 and ok
            if not ok:
                why = "mallopt refused"
        _state["allocator"] = f"as it was: {why}" if why else "glibc: heap, freed memory kept"
        return _state["allocator"]


def state() -> str:
    """What :func:`keep_freed_memory` did in this process, or ``"as it was: not asked"``."""
    return _state.get("allocator", "as it was: not asked")
