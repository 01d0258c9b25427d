"""wasearch.allocator: the scripts set glibc to keep freed memory for reuse, unless told not to.

The setting is process-wide, so its effect is checked in a fresh interpreter: after it, a large
tensor comes from glibc's heap instead of its own mapping (``mallinfo2``'s ``hblkhd``, the bytes
glibc holds in mapped blocks), and freeing it keeps the memory for the next one."""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys

import pytest

from wasearch import allocator, cli

GLIBC = allocator._libc() is not None

PROBE = r"""
import ctypes, json, sys
import torch
from wasearch.allocator import keep_freed_memory, state

class Info(ctypes.Structure):  # glibc's struct mallinfo2: ten size_t fields
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
said = keep_freed_memory() if sys.argv[1] == "set" else state()
before = libc.mallinfo2().hblkhd  # blocks mapped earlier (importing torch) stay mapped
big = torch.ones(64 * 2**20 // 4)  # 64 MiB: glibc maps it by default
mapped = libc.mallinfo2().hblkhd - before
del big
kept = libc.mallinfo2().arena  # the heap, after the free
print(json.dumps({"said": said, "mapped": mapped, "heap_after_free": kept}))
"""


def _probe(mode: str, **env: str) -> dict:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    environ.pop(allocator.ENV, None)
    environ.update(env)
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], env=environ, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(
    not GLIBC or not hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2"), reason="glibc 2.33+ only"
)
def test_large_tensors_come_from_the_heap_and_stay_there():
    as_is = _probe("leave")
    assert as_is["said"] == "as it was: not asked"
    assert as_is["mapped"] >= 64 * 2**20  # glibc's default: its own mapping, unmapped on free
    kept = _probe("set")
    assert kept["said"] == "glibc: heap, freed memory kept"
    assert kept["mapped"] < 2**20
    assert kept["heap_after_free"] >= 64 * 2**20  # freed, kept for the next tensor
    opted_out = _probe("set", WASEARCH_MALLOC="glibc")
    assert opted_out["said"] == "as it was: WASEARCH_MALLOC=glibc"
    assert opted_out["mapped"] >= 64 * 2**20


@pytest.mark.parametrize(
    "environ,why",
    [
        ({}, None),
        ({"WASEARCH_MALLOC": "glibc"}, "WASEARCH_MALLOC=glibc"),
        ({"WASEARCH_MALLOC": " GLIBC "}, "WASEARCH_MALLOC=glibc"),
        ({"WASEARCH_MALLOC": "keep"}, None),
        ({"MALLOC_MMAP_THRESHOLD_": "131072"}, "MALLOC_MMAP_THRESHOLD_ is set"),
        ({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"}, "GLIBC_TUNABLES is set"),
        ({"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}, "jemalloc is preloaded"),
        ({"LD_PRELOAD": "/usr/lib/libfoo.so"}, None),
    ],
)
def test_a_choice_in_the_environment_stands(environ, why):
    assert allocator._why_not(environ) == why


def test_every_script_sets_it_before_its_main(monkeypatch):
    calls = []
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: calls.append("malloc"))

    def main(argv):
        calls.append(("main", argv))
        return 0

    assert cli.run_main(main, ["x"]) == 0
    assert calls == ["malloc", ("main", ["x"])]
