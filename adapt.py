#!/usr/bin/env python
"""Adapt a trained run to another architecture, as the original adapt.py did.

    python adapt.py --modelDir runs/<run> --flex --F 4 --epochs 20 --Q --bits 8

Same flags as train.py; ``--modelDir`` is required and ``--modelToLoad`` picks the checkpoint.
"""

import functools
import sys

from wasearch.cli import run_main
from wasearch.train_cli import main

if __name__ == "__main__":
    sys.exit(run_main(functools.partial(main, prog="adapt.py", adapt=True)))
