"""Convert a checkpoint that needs full unpickling into one that loads safely.

    python -m wasearch.convert OLD.pt NEW.pt

wasearch reads every checkpoint with ``torch.load(weights_only=True)``: tensors, dicts, lists,
strings and numbers only, so a crafted ``.pt`` cannot run code. A checkpoint written by an older
wasearch (or by a tool that pickled Python objects into it: an ``Arch``, a ``TrainConfig``, a
``Path``, NumPy scalars, a whole module) is refused with a line pointing here.

This command is the ONE place in wasearch that unpickles a file fully, and full unpickling runs
whatever code the file carries. Use it only on a file you trust (one you or your colleagues
wrote); never on a file from elsewhere. It reads ``OLD.pt``, turns its objects into plain data
(``to_dict()`` of the Arch and config, paths as strings, NumPy scalars as numbers, a module as
its state dict), writes ``NEW.pt`` (never over an existing file) and checks that ``NEW.pt``
reloads with ``weights_only=True``. ``OLD.pt`` is left as it is.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .arch import Arch
from .checkpoint import (
    CHECKPOINT_FORMAT,
    CheckpointError,
    plain_data,
    read_checkpoint,
    save_checkpoint,
)
from .cli import UserError
from .fileio import first_line

__all__ = ["build_parser", "convert_checkpoint", "main"]


def convert_checkpoint(old: str | os.PathLike, new: str | os.PathLike) -> dict[str, Any]:
    """Fully unpickle the TRUSTED checkpoint ``old`` and write it as plain data to ``new``.

    Returns the converted payload. Raises FileNotFoundError, FileExistsError (``new`` exists),
    :class:`~wasearch.checkpoint.CheckpointError` (not a wasearch checkpoint, or it cannot be read)
    and TypeError (an object that has no plain form; nothing is written then).
    """
    old, new = Path(old), Path(new)
    if not old.is_file():
        raise FileNotFoundError(f"{old} does not exist")
    if new.exists():
        raise FileExistsError(f"{new} exists; name a new file (the converter never overwrites)")
    try:
        # The one full unpickling of the package: only for a file the user names and trusts.
        payload = torch.load(old, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - torn or foreign: one line
        raise CheckpointError(f"{old} cannot be read: {first_line(err)}") from None
    if not isinstance(payload, dict) or "arch" not in payload or "model" not in payload:
        raise CheckpointError(
            f"{old} is not a wasearch checkpoint (no 'arch' and 'model' entries); nothing written"
        )
    plain = plain_data(payload, "checkpoint", convert=True)
    try:
        Arch.from_dict(plain["arch"], str(old))
    except ValueError as err:
        raise CheckpointError(f"{old}: its architecture is not valid: {err}") from None
    model = plain["model"]
    if not isinstance(model, dict) or not all(isinstance(v, torch.Tensor) for v in model.values()):
        raise CheckpointError(f"{old}: its 'model' entry is not a state dict of tensors")
    plain.setdefault("format", CHECKPOINT_FORMAT)
    save_checkpoint(plain, new)
    try:
        read_checkpoint(new)
    except CheckpointError:
        new.unlink(missing_ok=True)
        raise
    return plain


def build_parser(prog: str = "python -m wasearch.convert") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description=(
            "Convert a checkpoint that needs full unpickling (an older wasearch wrote it) into "
            "one that loads with torch.load(weights_only=True). Full unpickling runs any code "
            "the file carries: use this ONLY on a file you trust."
        ),
    )
    p.add_argument("old", metavar="OLD.pt", help="the trusted checkpoint to convert (unchanged)")
    p.add_argument("new", metavar="NEW.pt", help="where to write the result (must not exist)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        convert_checkpoint(args.old, args.new)
    except (FileNotFoundError, FileExistsError, CheckpointError) as err:
        raise UserError(str(err)) from None
    except TypeError as err:
        raise UserError(f"{args.old} cannot be converted: {err}") from None
    print(f"wrote {args.new} (loads with weights_only=True); {args.old} is unchanged")
    return 0


if __name__ == "__main__":
    import sys

    from .cli import run_main

    sys.exit(run_main(main))
