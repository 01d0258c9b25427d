#!/usr/bin/env python
"""Train one architecture: the classic Winograd-aware flags or ``--arch FILE.yaml``.

    python train.py --flex --F 4 --Q --bits 8 --mult 0.5 --epochs 120
    python train.py --arch results/<study>/pareto/<trial>.yaml --dataset cifar10
"""

import sys

from wasearch.cli import run_main
from wasearch.train_cli import build_parser, main

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    sys.exit(run_main(main))
