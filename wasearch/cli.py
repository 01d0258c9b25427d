"""Shared plumbing of the command-line scripts: user errors end in one line and exit code 2."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Sequence

from wasearch.allocator import keep_freed_memory

__all__ = ["UserError", "nonnegative_float", "positive_float", "positive_int", "run_main"]


class UserError(Exception):
    """A problem the user caused (a bad flag, file or value): one line, no traceback."""


def run_main(
    main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None
) -> int:
    """Call ``main(argv)``; print user errors as ``error: ...`` on stderr and return 2.

    First, glibc's malloc is set to keep freed memory for reuse (:mod:`wasearch.allocator`:
    a training step's large tensors are not faulted in again every step); the environment
    variable ``WASEARCH_MALLOC=glibc`` keeps glibc's defaults."""
    keep_freed_memory()
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
