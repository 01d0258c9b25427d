"""The ``report`` sub-command of ``search.py``: one study's page and tables, or a comparison."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..cli import UserError, nonnegative_float
from .formatting import SYNTHETIC, SYNTHETIC_WHY
from .page import pick_text
from .write import write_comparison_files, write_study_files


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``report`` sub-command to ``search.py``."""
    p = sub.add_parser(
        "report",
        help="write report.html, trials.csv and pareto.csv for a study, or compare studies",
        description=(
            "One study folder: write <dir>/report.html, <dir>/trials.csv and <dir>/pareto.csv. "
            "Several: write one page overlaying their Pareto fronts (--out)."
        ),
    )
    p.add_argument("study_dirs", nargs="+", metavar="STUDY_DIR", help="results/<study> folder(s)")
    p.add_argument(
        "--storage",
        metavar="URL",
        help="Optuna storage: a database URL or a journal file (default: the URL in "
        "<STUDY_DIR>/storage.txt, else sqlite:///<STUDY_DIR>/study.db); with several folders, "
        "one storage holding a study per folder name",
    )
    p.add_argument(
        "--study-name",
        metavar="NAME",
        help="study in the storage (default: the folder's name, or the storage's only study)",
    )
    p.add_argument(
        "--out",
        metavar="FILE.html",
        help="page to write (default: <STUDY_DIR>/report.html; results/compare.html for several)",
    )
    p.add_argument(
        "--tolerance",
        type=nonnegative_float,
        metavar="K",
        help="accuracies within K standard errors of their difference are the same: the pick "
        "is the fastest trial within K of the best (default: the space's report.tolerance, "
        "else 1.0)",
    )
    p.set_defaults(func=_cmd_report)


def _cmd_report(args: argparse.Namespace) -> int:
    """Write the files; the line that says so ends with ``SYNTHETIC data (...)`` when the
    results are on generated images."""
    dirs = [Path(d) for d in args.study_dirs]
    if len(dirs) == 1:
        page, data = write_study_files(
            dirs[0],
            storage=args.storage,
            study_name=args.study_name,
            out=args.out,
            tolerance=args.tolerance,
        )
        note = f" ({SYNTHETIC}: {SYNTHETIC_WHY})" if data.synthetic else ""
        print(f"wrote {page}, {dirs[0] / 'trials.csv'}, {dirs[0] / 'pareto.csv'}{note}")
        pick = pick_text(data)
        if pick:
            print(pick)
        return 0
    if args.study_name is not None:
        raise UserError(
            "--study-name picks one study; with several folders each study is named by its folder"
        )
    out = Path(args.out) if args.out else Path("results") / "compare.html"
    page, studies = write_comparison_files(
        dirs, out=out, storage=args.storage, tolerance=args.tolerance
    )
    synthetic = [s.name for s in studies if s.synthetic]
    note = ""
    if synthetic:
        which = "" if len(synthetic) == len(studies) else " in " + ", ".join(synthetic)
        note = f" ({SYNTHETIC}{which}: {SYNTHETIC_WHY})"
    print(f"wrote {page}{note}")
    return 0
