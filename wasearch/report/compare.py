"""The comparison page: the fronts of several studies overlaid, and a table of their figures.

Accuracy against latency (each study's own target) and against speed-up over each study's own
all-normal architecture, so that studies for different devices line up. Studies on synthetic
data are named in the header (``SYNTHETIC data in ...``) and in the table's dataset column.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..fileio import display_path
from .figures import acc_view, axis_title, hidden_note
from .formatting import (
    SYNTHETIC,
    SYNTHETIC_WHY,
    esc,
    fmt_acc_se,
    fmt_ms,
    fmt_speedup,
    lambda_text,
    plot_text,
    state_counts,
)
from .page import Page, now
from .reading import StudyData

if TYPE_CHECKING:
    import pandas as pd

_STUDY_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b")


def _labels(studies: Sequence[StudyData]) -> list[str]:
    """The studies' names, with their folders when two share a name."""
    names = [s.name for s in studies]
    if len(set(names)) == len(names):
        return names
    return [f"{s.name} ({display_path(s.study_dir)})" for s in studies]


def _comparison_figure(
    studies: Sequence[StudyData], labels: Sequence[str], x: str
) -> dict[str, Any]:
    traces = []
    accs: list[float] = []
    front_accs: list[float] = []
    for i, (s, label) in enumerate(zip(studies, labels, strict=True)):
        colour = _STUDY_COLOURS[i % len(_STUDY_COLOURS)]
        shown = s.complete().dropna(subset=[s.acc, x])
        accs += shown[s.acc].tolist()
        front = shown[shown["number"].isin(s.front)].sort_values(x)
        rest = shown[~shown["number"].isin(s.front)]
        front_accs += front[s.acc].tolist()

        def symbols(rows: pd.DataFrame) -> list[str]:
            out = []
            for r in rows.to_dict("records"):
                if isinstance(r["reference"], str):
                    out.append("diamond")
                else:
                    base = "star" if r["source"] == "differentiable" else "circle"
                    out.append(f"{base}-open" if r["feasible"] is False else base)
            return out

        shown_label = plot_text(label)
        for rows, mode, name, opacity in (
            (rest, "markers", f"{shown_label}: other trials ({len(rest)})", 0.45),
            (front, "lines+markers", f"{shown_label}: front ({len(front)})", 1.0),
        ):
            # Differentiable-search results are stars labelled with their lambda.
            text = [lambda_text(r) or "" for r in rows.to_dict("records")]
            if any(text):
                mode += "+text"
            traces.append(
                {
                    "type": "scatter",
                    "mode": mode,
                    "name": name,
                    "legendgroup": shown_label,
                    "x": rows[x].tolist(),
                    "y": (100 * rows[s.acc]).tolist(),
                    "hovertext": [f"{shown_label}<br>{s.hover[int(n)]}" for n in rows["number"]],
                    "hoverinfo": "text",
                    "opacity": opacity,
                    "marker": {"size": 9, "color": colour, "symbol": symbols(rows)},
                    "line": {"color": colour, "width": 2},
                    "text": text,
                    "textposition": "middle right",
                    "textfont": {"color": colour},
                    "cliponaxis": False,
                    "meta": "trial",
                }
            )
    y_range, hidden = acc_view(accs, front_accs)
    return {
        "data": traces,
        "layout": {
            "height": 540,
            "margin": {"l": 70, "r": 20, "t": 30, "b": 60},
            "xaxis": {"title": {"text": axis_title(x)}},
            "yaxis": {"title": {"text": "validation accuracy (%)"}, "range": y_range},
            "annotations": hidden_note(hidden, y_range),
            "legend": {"orientation": "h", "y": -0.15},
            "hoverlabel": {"align": "left"},
        },
    }


def _headline(studies: Sequence[StudyData], labels: Sequence[str]) -> str:
    """``2 studies``, after ``SYNTHETIC data (...)`` when they all are, or ``SYNTHETIC data in
    a, b (...)`` naming those that are."""
    headline = f"{len(studies)} studies"
    synthetic = [label for s, label in zip(studies, labels, strict=True) if s.synthetic]
    if synthetic:
        which = "" if len(synthetic) == len(studies) else " in " + ", ".join(synthetic)
        headline = f"{SYNTHETIC}{which} ({SYNTHETIC_WHY}) · {headline}"
    return headline


def comparison_page(studies: Sequence[StudyData]) -> str:
    """The page that overlays the fronts of ``studies``, as text."""
    labels = _labels(studies)
    page = Page("wasearch: " + " vs ".join(labels))
    page.add(f"<h1>{esc(' vs '.join(labels))}</h1>")
    page.add(f'<p class="sub">{esc(_headline(studies, labels))} · generated {now()}</p>')
    head = (
        "<tr><th>study</th><th>trials</th><th class=num>front</th><th class=num>best accuracy"
        "</th><th class=num>all-normal latency</th><th class=num>fastest front</th>"
        "<th class=num>best speed-up (&le; 1 point lost)</th>"
        "<th class=num>pick (fastest within the tolerance of the best)</th><th>dataset</th>"
        "<th>latency device</th><th>sampler</th></tr>"
    )
    body = []
    for s, label in zip(studies, labels, strict=True):
        comp = s.complete()
        front = s.trials.set_index("number").loc[s.front]
        best_acc = comp[s.acc].max() if len(comp) else None
        near = front[front[s.acc] >= best_acc - 0.01] if best_acc is not None else front
        speed = near["speedup"].dropna()
        best_se = comp.loc[comp[s.acc].idxmax(), s.se] if best_acc is not None else None
        pick = "-"
        if s.pick is not None:
            r = s.trials.set_index("number").loc[s.pick.number]
            pick = (
                f"trial {s.pick.number}: {fmt_acc_se(r[s.acc], r[s.se])}, "
                f"{fmt_speedup(r['speedup'])} (within {s.tolerance:g} SE)"
            )
        body.append(
            f"<tr><td>{esc(label)}</td><td>{esc(state_counts(s.trials['state']))}</td>"
            f"<td class=num>{len(s.front)}</td>"
            f"<td class=num>{fmt_acc_se(best_acc, best_se)}</td>"
            f"<td class=num>{fmt_ms(s.reference_latency)}</td>"
            f"<td class=num>{fmt_ms(front['latency_ms'].min() if len(front) else None)}</td>"
            f"<td class=num>{fmt_speedup(speed.max() if len(speed) else None)}</td>"
            f"<td class=num>{esc(pick)}</td>"
            f"<td>{esc(s.dataset or '-')}</td>"
            f"<td>{esc(s.attrs.get('latency_device') or '-')}</td>"
            f"<td>{esc(s.attrs.get('sampler') or '-')}</td></tr>"
        )
    page.add(f'<div class="card scroll"><table id="studies">{head}{"".join(body)}</table></div>')
    if not any(len(s.complete()) for s in studies):
        page.add('<p class="empty" id="no-complete">No study has a completed trial yet.</p>')
        return page.render()
    page.add('<h2 id="front">Accuracy against latency</h2>')
    page.add(
        '<p class="note">Each study\'s completed trials (faint) and Pareto front (line); '
        "diamonds are reference architectures, open circles infeasible trials, stars the "
        "differentiable search's results (labelled with their &lambda;). Latencies are "
        "each study's own target.</p>"
    )
    page.figure(_comparison_figure(studies, labels, "latency_ms"), count=True)
    if any(s.complete()["speedup"].notna().any() for s in studies):
        page.add('<h2 id="speedup">Accuracy against speed-up</h2>')
        page.add(
            '<p class="note">Speed-up against each study\'s own all-normal architecture, so '
            "studies for different targets line up.</p>"
        )
        page.figure(_comparison_figure(studies, labels, "speedup"))
    return page.render()
