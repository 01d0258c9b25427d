"""The report's entry points: read a study (or several) and write its files atomically.

Every file goes to a temporary file that is then renamed into place (:mod:`wasearch.fileio`), so
a page that a running search refreshes after each trial is never half written.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ..cli import UserError
from ..fileio import atomic_write_text, refused_writes_as_user_errors
from .compare import comparison_page
from .page import study_page
from .reading import StudyData, collect, held_study_label, open_study, pareto_frame

if TYPE_CHECKING:
    import optuna
    import pandas as pd


def write_report(
    study_dir: str | os.PathLike,
    *,
    storage: str | None = None,
    study_name: str | None = None,
    out: str | os.PathLike | None = None,
    study: optuna.Study | None = None,
    tolerance: float | None = None,
) -> Path:
    """Write ``report.html``, ``trials.csv`` and ``pareto.csv`` for one study; return the page.

    ``storage`` defaults to the URL in ``<study_dir>/storage.txt`` (the search writes it when it
    used another storage), else ``sqlite:///<study_dir>/study.db``; ``study_name`` to the
    folder's name (or the storage's only study). ``out`` puts the page elsewhere (the CSVs stay in
    ``study_dir``). A caller that holds the study already (the search, after each trial) passes
    it as ``study`` and nothing is reopened. Raises :class:`UserError` for a missing folder,
    storage or study, and for a file it cannot write (a read-only folder, a full disk: one line
    naming the file; :func:`wasearch.fileio.refused_write`). ``tolerance`` (standard errors)
    decides which accuracies count as the same; default: the study's space's
    ``report.tolerance``, else 1.0 (:mod:`wasearch.stats`).
    """
    return write_study_files(
        study_dir,
        storage=storage,
        study_name=study_name,
        out=out,
        study=study,
        tolerance=tolerance,
    )[0]


def write_study_files(
    study_dir: str | os.PathLike,
    *,
    storage: str | None = None,
    study_name: str | None = None,
    out: str | os.PathLike | None = None,
    study: optuna.Study | None = None,
    tolerance: float | None = None,
) -> tuple[Path, StudyData]:
    """:func:`write_report`, returning also what was read (the CLI says whether it is
    synthetic)."""
    study_dir = Path(study_dir)
    if study is None:
        study, label = open_study(study_dir, storage, study_name)
    else:
        label = held_study_label(study_dir, storage)
    data = collect(study, study_dir, label, tolerance=tolerance)
    page = Path(out) if out is not None else study_dir / "report.html"
    with refused_writes_as_user_errors():
        study_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(study_dir / "trials.csv", data.trials.to_csv(index=False))
        atomic_write_text(study_dir / "pareto.csv", pareto_frame(data).to_csv(index=False))
        page.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(page, study_page(data))
    return page, data


def write_comparison(
    study_dirs: Sequence[str | os.PathLike],
    *,
    out: str | os.PathLike,
    storage: str | None = None,
) -> Path:
    """Write one page overlaying the fronts of several studies; return its path.

    Each folder's storage defaults as in :func:`write_report`; ``storage`` names one storage for
    all of them (each study then found by its folder's name).
    """
    return write_comparison_files(study_dirs, out=out, storage=storage)[0]


def write_comparison_files(
    study_dirs: Sequence[str | os.PathLike],
    *,
    out: str | os.PathLike,
    storage: str | None = None,
    tolerance: float | None = None,
) -> tuple[Path, list[StudyData]]:
    """:func:`write_comparison`, returning also what was read."""
    if not study_dirs:
        raise UserError("report: give at least one study folder")
    studies = []
    for d in study_dirs:
        study, label = open_study(Path(d), storage, None)
        studies.append(collect(study, Path(d), label, tolerance=tolerance))
    page = Path(out)
    with refused_writes_as_user_errors(flag="--out"):
        page.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(page, comparison_page(studies))
    return page, studies


def trials_frame(study: optuna.Study) -> pd.DataFrame:
    """One row per trial, the columns of ``trials.csv`` (see docs/report.md)."""
    return collect(study, Path(study.study_name), "(given study)").trials
