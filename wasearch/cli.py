"""Shared plumbing of the command-line scripts: user errors end in one line and exit code 2."""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable, MutableMapping, Sequence

__all__ = [
    "SCRIPT_ENV",
    "UserError",
    "nonnegative_float",
    "positive_float",
    "positive_int",
    "run_main",
    "script_environment",
]

#: What ``train.py`` and ``search.py`` set in the environment before torch loads, unless the
#: user set it: ``THP_MEM_ALLOC_ENABLE=1`` makes torch place CPU tensors of 2 MiB and more on
#: transparent huge pages. A fresh large tensor is otherwise faulted in 4 KiB at a time: on
#: this project's machines a batched product into a new 32 MiB tensor took 32 ms against 15 ms
#: into an old one, and a training step allocates many (README, "Speed and memory"). Where
#: the kernel offers no huge pages, torch warns once and allocates as before.
SCRIPT_ENV = {"THP_MEM_ALLOC_ENABLE": "1"}


def script_environment(environ: MutableMapping[str, str] | None = None) -> None:
    """Set :data:`SCRIPT_ENV`'s defaults where the user has not (call before importing torch,
    which reads them once; child processes inherit them)."""
    env = os.environ if environ is None else environ
    for key, value in SCRIPT_ENV.items():
        env.setdefault(key, value)


class UserError(Exception):
    """A problem the user caused (a bad flag, file or value): one line, no traceback."""


def run_main(
    main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None
) -> int:
    """Call ``main(argv)``; print user errors as ``error: ...`` on stderr and return 2."""
    try:
        return main(argv)
    except UserError as err:  # ArchError, DataError, CheckpointError, InputFileError too
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 1")
    return value


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):  # float() reads "inf" and "nan"
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0 (``inf`` and ``nan`` are refused)."""
    value = _finite_float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be > 0")
    return value


def nonnegative_float(text: str) -> float:
    """argparse type: a finite number >= 0 (``inf`` and ``nan`` are refused)."""
    value = _finite_float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 0")
    return value
