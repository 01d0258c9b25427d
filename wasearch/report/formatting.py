"""How the report writes a trial's figures as text, and how it escapes what it shows.

Shared by the tables, the figures and both pages. The page has two readers of strings, hence two
escapes: :func:`esc` for HTML text and attributes, and :func:`plot_text` for the strings plotly
draws (trace names, hover text, text labels, tick labels, menu labels). Plotly reads those as a
small subset of HTML and decodes ``&amp;``, ``&lt;``, ``&gt;`` and numeric entities, but not
``&quot;``, so :func:`plot_text` leaves quotes as they are. Every string that comes from the study
(names, reasons, labels, settings) passes through one of them.
"""

from __future__ import annotations

import html
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

#: Said first wherever the report shows or writes results of a study on generated images.
SYNTHETIC = "SYNTHETIC data"
SYNTHETIC_WHY = "generated images: accuracies say nothing about a real dataset"

STATES = ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING")


def esc(x: Any) -> str:
    """``x`` as HTML text or an attribute value."""
    return html.escape(str(x))


def plot_text(x: Any) -> str:
    """``x`` as a string that plotly draws (it reads ``<b>``, ``<br>`` and entities in them)."""
    return html.escape(str(x), quote=False)


def number(value: Any) -> float | None:
    """A finite float, or None for anything else (missing, a bool, NaN, text): what the tables
    and texts count as a figure."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def isnum(x: Any) -> bool:
    return number(x) is not None


def fmt_acc(x: Any) -> str:
    return f"{100 * x:.2f}%" if isnum(x) else "-"


def fmt_acc_se(x: Any, se: Any) -> str:
    """``66.72% ± 0.67``: an accuracy and its standard error in points (the bare accuracy when
    the error is unknown: a study from before wasearch recorded it)."""
    from ..stats import fmt_acc_se as _fmt

    return _fmt(number(x), number(se)) if isnum(x) else "-"


def fmt_ms(x: Any) -> str:
    return f"{x:.3g} ms" if isnum(x) and x < 100 else (f"{x:.0f} ms" if isnum(x) else "-")


def fmt_count(x: Any) -> str:
    if not isnum(x):
        return "-"
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g}{unit}"
    return f"{x:.0f}"


def fmt_speedup(x: Any) -> str:
    return f"{x:.2f}x" if isnum(x) else "-"


def fmt_metric(col: str, x: Any) -> str:
    if col == "score":
        return f"{x:.4f}" if isnum(x) else "-"
    return fmt_count(x)


def lambda_text(row: Mapping[str, Any]) -> str | None:
    """``λ=0.5`` for a differentiable-search trial that records its lambda."""
    if row["source"] != "differentiable" or not isnum(row["lambda"]):
        return None
    return f"λ={row['lambda']:g}"


def tag(row: Mapping[str, Any]) -> str | None:
    """What a trial is beside its number: a reference's name, or ``λ=0.5 (differentiable)``."""
    if isinstance(row["reference"], str):
        return row["reference"]
    if row["source"] == "differentiable":
        lam = lambda_text(row)
        return f"{lam} (differentiable)" if lam else "differentiable"
    return None


def axes_text(axes: Iterable[tuple[str, bool]]) -> str:
    return ", ".join(f"{name} ({'max' if up else 'min'})" for name, up in axes)


def state_counts(states: Iterable[str]) -> str:
    """``12 complete, 1 fail``: trial counts by state, in the order a reader expects."""
    counts = Counter(states)
    parts = [f"{counts[s]} {s.lower()}" for s in STATES if counts.get(s)]
    parts += [f"{v} {k.lower()}" for k, v in counts.items() if k not in STATES]
    return ", ".join(parts) or "no trials"


def hover_text(
    row: Mapping[str, Any], *, acc: str, scalarized: bool, arch: Sequence[tuple[str, Any]] | None
) -> str:
    """Hover text of one trial (plotly's HTML subset): its figures, then its per-layer choices
    by stage. ``acc`` names the accuracy column; ``arch`` is the trial's (layer, choice) pairs."""
    n = int(row["number"])
    what = tag(row)
    if isinstance(row["reference"], str):
        lines = [f"<b>trial {n}</b> ({plot_text(what)})"]
    else:  # λ=0.5 (differentiable)
        lines = [f"<b>trial {n}</b>" + (f" · {plot_text(what)}" if what else "")]
    if row["state"] == "FAIL":
        reason = row["fail_reason"] if isinstance(row["fail_reason"], str) else "no reason given"
        lines.append(f"FAILED: {plot_text(reason[:120])}")
    figures = [fmt_acc_se(row[acc], row.get(f"{acc}_se")), fmt_ms(row["latency_ms"])]
    if scalarized and isnum(row["score"]):
        figures.append(f"score {fmt_metric('score', row['score'])}")
    if isnum(row["speedup"]):
        figures.append(fmt_speedup(row["speedup"]))
    if isnum(row["params"]):
        figures.append(f"{fmt_count(row['params'])} params")
    if isnum(row["bitops"]):
        figures.append(f"{fmt_count(row['bitops'])} bitops")
    lines.append(" · ".join(figures))
    if row["feasible"] is False:
        lines.append("<i>infeasible</i>")
    if row.get("pick") in (True,):  # a numpy bool as well
        lines.append("<b>the pick</b>: the fastest within the tolerance of the best accuracy")
    faster = number(row.get("within_noise_of"))
    if faster is not None:
        lines.append(f"<i>within noise of faster trial {faster:.0f}</i>")
    if arch:
        summary = Counter(c.label for _, c in arch)
        lines.append(plot_text(", ".join(f"{k} x{v}" for k, v in summary.items())))
        stages: dict[str, list[str]] = {}
        for name, c in arch:
            stages.setdefault(name.split(".")[0], []).append(c.label)
        lines += [plot_text(f"{stage}: {' '.join(labels)}") for stage, labels in stages.items()]
    elif isinstance(row["arch_summary"], str):
        lines.append(plot_text(row["arch_summary"]))
    return "<br>".join(lines)
