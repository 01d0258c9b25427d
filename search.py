#!/usr/bin/env python
"""wasearch search CLI: run / pretrain / export / report / measure / calibrate.

Thin: parses arguments and calls the library. See README.md and spaces/README.md.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from wasearch.cli import run_main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="search.py", description="Search Winograd-aware quantized networks."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # Each part of the library registers its own sub-commands.
    import importlib

    for module in ("wasearch.search.cli", "wasearch.report", "wasearch.latency.cli"):
        importlib.import_module(module).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(run_main(main))
