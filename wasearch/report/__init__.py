"""Reports of a search: a self-contained HTML page and CSV tables from an Optuna study.

``write_report(results/<study>)`` reads the study that ``docs/study_format.md`` describes and
writes, next to it, ``report.html`` (works offline: plotly's JavaScript is embedded once),
``trials.csv`` (one row per trial) and ``pareto.csv`` (the front). ``write_comparison`` overlays
the fronts of several studies in one page. Every file is written atomically (temporary file, then
``os.replace``), so a page that a running search refreshes after each trial is never half written.

The page shows the accuracy-latency front (all completed trials, the front as a line, the
reference architectures labelled, infeasible trials as open red circles, failed trials as grey
crosses along the bottom edge at their latency since they have no accuracy), the same against
params / bit-operations where they vary across the trials, the front as a table with the command
that trains each architecture, a grid of the front's per-layer choices, the per-layer latency of a
front architecture against all-normal, the candidate probabilities of a differentiable search
and the study's settings. Results on synthetic data say so, in every file. See docs/report.md.

The modules follow the data flow: :mod:`.reading` (a study into the trials and front tables),
:mod:`.formatting` (figures as text, escaping), :mod:`.figures` (plotly figures), :mod:`.page`
(the study's HTML page), :mod:`.compare` (the comparison page), :mod:`.write` (the entry points
that write the files) and :mod:`.cli` (the ``report`` sub-command). Importing the package imports
none of pandas, numpy, plotly or optuna.
"""

from __future__ import annotations

from .cli import register
from .write import trials_frame, write_comparison, write_report

__all__ = ["register", "trials_frame", "write_comparison", "write_report"]
