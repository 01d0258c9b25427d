"""The study page's figures, as plain plotly dicts (rendered by ``plotly.io.to_html`` without
validation, which is what keeps a report of thousands of trials fast).

Accuracy against latency (or size), the per-layer latency of a front architecture against
all-normal, and the candidate probabilities of a differentiable search. Every string from the
study is passed through :func:`~wasearch.report.formatting.plot_text`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .formatting import fmt_acc, fmt_ms, isnum, lambda_text, plot_text
from .reading import StudyData, front_numbers

if TYPE_CHECKING:
    import pandas as pd

_log = logging.getLogger(__name__)

#: Smallest relative spread ((max - min) / largest magnitude) of a size column worth a plot.
MIN_SIZE_SPREAD = 0.01


def axis_title(col: str) -> str:
    return {
        "latency_ms": "latency (ms)",
        "params": "parameters",
        "bitops": "bit-operations",
        "speedup": "speed-up against all-normal (x)",
    }.get(col, col)


def acc_view(
    values: Iterable[float], front: Iterable[float], *, window: float = 10.0
) -> tuple[list[float], int]:
    """The accuracy range (%) to show first, and how many trials fall below it.

    The view reaches ``window`` points below the front's lowest trial, so that a few diverged
    trials (10 % accuracy) do not squash the front into a line; double-clicking the plot
    (plotly's autoscale) shows them.
    """
    vals = [100 * v for v in values]
    if not vals:
        return [0.0, 100.0], 0
    lo, hi = min(vals), max(vals)
    front_vals = [100 * v for v in front]
    if front_vals:
        lo = max(lo, min(front_vals) - window)
    pad = max(0.5, 0.08 * (hi - lo))
    hidden = sum(v < lo - pad for v in vals)
    return [lo - pad, hi + pad], hidden


def hidden_note(hidden: int, y_range: Sequence[float]) -> list[dict[str, Any]]:
    if not hidden:
        return []
    text = (
        f"{hidden} trial{'s' if hidden > 1 else ''} below {y_range[0]:.1f}% not in view: "
        "double-click the plot to show all"
    )
    return [
        {
            "text": text,
            "xref": "paper",
            "yref": "paper",
            "x": 0,
            "y": 1.0,
            "xanchor": "left",
            "yanchor": "bottom",
            "showarrow": False,
            "font": {"size": 12, "color": "#b35806"},
        }
    ]


def size_axes(data: StudyData) -> tuple[list[str], list[str]]:
    """The size columns worth a plot of accuracy against them, and those left out.

    ``params`` and then ``bitops``, each plotted only when it varies meaningfully over the
    completed trials that have an accuracy: its relative spread, (max - min) / the largest
    magnitude, is over :data:`MIN_SIZE_SPREAD` (1 %). Winograd kernels have the size of direct
    ones, so in many spaces the parameter count is the same for every candidate (flex transforms
    add a few hundred): plotted, it is a vertical line that says nothing, and bit-operations,
    which do follow the choices, are the size to show. When neither varies the view is omitted.
    Returns (plotted, left out), the latter only of columns the trials record at all.
    """
    comp = data.complete().dropna(subset=[data.acc])
    shown, left_out = [], []
    for col in ("params", "bitops"):
        values = comp[col].dropna()
        if not len(values):
            continue
        top = max(abs(values.max()), abs(values.min()))
        spread = (values.max() - values.min()) / top if top else 0.0
        (shown if spread > MIN_SIZE_SPREAD else left_out).append(col)
    return shown, left_out


def scatter_figure(data: StudyData, x: str, *, with_failed: bool) -> dict[str, Any]:
    """Accuracy against ``x``: every completed trial once, the 2-D front as a line.

    The legend counts the points on the line ("Pareto front (N)"), and every other group how
    many of its points are on it, so that the counts add up: for a study over accuracy and
    latency this is the front of the page header and of pareto.csv, references included.
    """
    comp = data.complete().dropna(subset=[data.acc])
    shown = comp.dropna(subset=[x])
    front = front_numbers(shown, [data.acc, x], [True, False])
    is_ref = shown["reference"].notna()
    is_diff = (shown["source"] == "differentiable") & ~is_ref
    on_front = shown["number"].isin(front)
    infeasible = shown["feasible"] == False  # noqa: E712

    def trace(rows: pd.DataFrame, name: str, marker: dict[str, Any], **kw: Any) -> dict:
        # "references (5, 1 on the front)": the legend's front counts add up to the line's.
        k = int(rows["number"].isin(front).sum()) if name != "searched, on the front" else 0
        return {
            "type": "scatter",
            "mode": "markers",
            "name": f"{name} ({len(rows)}{f', {k} on the front' if k else ''})",
            "x": rows[x].tolist(),
            "y": (100 * rows[data.acc]).tolist(),
            "error_y": error_bars(rows[data.se]),
            "hovertext": [data.hover[int(n)] for n in rows["number"]],
            "hoverinfo": "text",
            "marker": noise_marks(rows, {"size": 9, **marker}),
            "meta": "trial",
            **kw,
        }

    line = shown[on_front].sort_values(x)
    refs = shown[is_ref]
    traces: list[dict[str, Any]] = [
        *front_band(line, x, data.acc, data.se),
        {
            "type": "scatter",
            "mode": "lines",
            # Every point on the front, references included: the count the page header gives.
            "name": f"Pareto front ({len(line)})",
            "x": line[x].tolist(),
            "y": (100 * line[data.acc]).tolist(),
            "line": {"color": "#1f77b4", "width": 2},
            "hoverinfo": "skip",
            "meta": "front-line",
        },
        trace(
            shown[~on_front & ~infeasible & ~is_ref & ~is_diff],
            "other trials",
            {"color": "#9ecae1", "line": {"color": "#4292c6", "width": 1}},
        ),
        trace(
            shown[on_front & ~is_ref & ~is_diff],
            "searched, on the front",
            {"color": "#1f77b4"},
        ),
        trace(
            shown[infeasible & ~is_ref & ~is_diff],
            "infeasible",
            {"symbol": "circle-open", "color": "#d62728", "line": {"width": 2}},
        ),
    ]
    diff = shown[is_diff]
    if len(diff):  # differentiable-search results: stars labelled with their lambda
        traces.append(
            trace(
                diff,
                "differentiable search",
                {
                    "symbol": ["star-open" if f is False else "star" for f in diff["feasible"]],
                    "color": ["#a63603" if n in front else "#fd8d3c" for n in diff["number"]],
                    "line": {"color": "#7f2704", "width": 1},
                    "size": 13,
                },
                mode="markers+text",
                text=[lambda_text(r) or "" for r in diff.to_dict("records")],
                textposition="middle right",
                textfont={"size": 12, "color": "#7f2704"},
                cliponaxis=False,
            )
        )
    traces.append(
        trace(
            refs,
            "references",
            {"symbol": "diamond", "color": "#252525", "size": 11},
            mode="markers+text",
            text=[plot_text(r) for r in refs["reference"]],
            textposition=[("top center", "bottom center")[i % 2] for i in range(len(refs))],
            textfont={"size": 12},
            cliponaxis=False,
        )
    )
    y_range, hidden = acc_view(comp[data.acc], line[data.acc])
    if with_failed:
        failed = data.trials[data.trials["state"] == "FAIL"].dropna(subset=[x])
        traces.append(
            {
                "type": "scatter",
                "mode": "markers",
                "name": f"failed ({len(failed)}, no accuracy)",
                "x": failed[x].tolist(),
                "y": [y_range[0] + 0.02 * (y_range[1] - y_range[0])] * len(failed),
                "hovertext": [data.hover[int(n)] for n in failed["number"]],
                "hoverinfo": "text",
                "marker": {"symbol": "x", "size": 9, "color": "#737373"},
                "cliponaxis": False,
                "meta": "failed",
            }
        )
    xaxis: dict[str, Any] = {"title": {"text": axis_title(x)}, "zeroline": False}
    if x in ("params", "bitops"):
        xaxis["type"] = "log"
    return {
        "data": traces,
        "layout": {
            "height": 520,
            "margin": {"l": 70, "r": 20, "t": 30, "b": 60},
            "xaxis": xaxis,
            "yaxis": {"title": {"text": "validation accuracy (%)"}, "range": y_range},
            "annotations": hidden_note(hidden, y_range) + pick_note(data, shown, x),
            "legend": {"orientation": "h", "y": -0.15},
            "hovermode": "closest",
            "hoverlabel": {"align": "left"},
        },
    }


#: The outline of a front point the noise cannot tell from a faster one, and of the pick.
NOISE_COLOUR, PICK_COLOUR = "#ff7f0e", "#2ca02c"


def error_bars(se: pd.Series) -> dict[str, Any]:
    """One standard error above and below each point, in accuracy points (0 where unknown)."""
    return {
        "type": "data",
        "array": [100 * v if isnum(v) else 0.0 for v in se],
        "visible": True,
        "thickness": 1,
        "width": 3,
        "color": "#7f7f7f",
    }


def noise_marks(rows: pd.DataFrame, marker: dict[str, Any]) -> dict[str, Any]:
    """``marker`` with the outline of each point: green for the pick, orange for a front point
    within noise of a faster one (its extra accuracy is not worth the time), else as given.
    Outlines rather than extra markers: every drawn marker is one trial (the page counts them)."""
    picks, noisy = rows["pick"].tolist(), rows["within_noise_of"].tolist()
    if not any(p in (True,) for p in picks) and not any(isnum(v) for v in noisy):
        return marker
    base = marker.get("line", {})
    colours, widths = [], []
    for p, v in zip(picks, noisy, strict=True):
        if p in (True,):
            colours.append(PICK_COLOUR)
            widths.append(4)
        elif isnum(v):
            colours.append(NOISE_COLOUR)
            widths.append(3)
        else:
            colours.append(base.get("color", marker.get("color", "#444")))
            widths.append(base.get("width", 0))
    return {**marker, "line": {**base, "color": colours, "width": widths}}


def front_band(line: pd.DataFrame, x: str, acc: str, se: str) -> list[dict[str, Any]]:
    """The band of the front: each front point's accuracy plus and minus one standard error,
    joined like the front line (a filled outline, no markers). Empty when no front point
    carries a standard error (a study from before wasearch recorded them)."""
    if line.empty or not line[se].notna().any():
        return []
    xs = line[x].tolist()
    mid = [100 * a for a in line[acc]]
    err = [100 * v if isnum(v) else 0.0 for v in line[se]]
    upper = [m + e for m, e in zip(mid, err, strict=True)]
    lower = [m - e for m, e in zip(mid, err, strict=True)]
    return [
        {
            "type": "scatter",
            "mode": "lines",
            "name": "front ± 1 standard error",
            "x": xs + xs[::-1],
            "y": upper + lower[::-1],
            "fill": "toself",
            "fillcolor": "rgba(31,119,180,0.15)",
            "line": {"width": 0},
            "hoverinfo": "skip",
            "meta": "front-band",
        }
    ]


def pick_note(data: StudyData, shown: pd.DataFrame, x: str) -> list[dict[str, Any]]:
    """An arrow to the pick (when it is in this plot), labelled ``pick: trial N``."""
    if data.pick is None:
        return []
    row = shown[shown["number"] == data.pick.number]
    if row.empty:
        return []
    r = row.iloc[0]
    return [
        {
            "x": r[x],
            "y": 100 * r[data.acc],
            "xref": "x",
            "yref": "y",
            "text": f"pick: trial {data.pick.number}",
            "showarrow": True,
            "arrowhead": 2,
            "arrowcolor": PICK_COLOUR,
            "ax": 0,
            "ay": 42,
            "font": {"size": 12, "color": "#1b7a1b"},
            "bgcolor": "rgba(255,255,255,0.8)",
        }
    ]


def breakdown_figure(data: StudyData) -> dict[str, Any] | None:
    """Per-layer latency of a front architecture (picked in a menu) against all-normal."""
    rows = data.trials.set_index("number")
    front = [n for n in data.front if data.layer_latency.get(n)]
    if not front:
        return None
    layers = [n for n in data.layers if any(n in data.layer_latency[t] for t in front)]
    rest_label = "rest of network"

    def bars(lat: Mapping[str, float], total: Any) -> tuple[list[str], list[float]]:
        xs, ys = list(layers), [lat.get(n) for n in layers]
        rest = total - sum(v for v in ys if v) if isnum(total) else None
        if rest is not None and rest > 1e-9:
            xs.append(rest_label)
            ys.append(rest)
        return xs, ys

    traces = []
    if data.reference_layers:
        xs, ys = bars(data.reference_layers, data.reference_latency)
        traces.append(
            {
                "type": "bar",
                "name": f"all-normal ({fmt_ms(data.reference_latency)})",
                "x": [plot_text(v) for v in xs],
                "y": ys,
                "marker": {"color": "#969696"},
                "hovertemplate": "%{x}: %{y:.4g} ms<extra>all-normal</extra>",
            }
        )
    # Default: the pick (the fastest trial within the tolerance of the best accuracy), else
    # the fastest front trial within one accuracy point of the best.
    acc = rows.loc[front, data.acc]
    near = [n for n in front if acc[n] >= acc.max() - 0.01]
    default = max(
        near, key=lambda n: rows.loc[n, "speedup"] if isnum(rows.loc[n, "speedup"]) else 0
    )
    if data.pick is not None and data.pick.number in front:
        default = data.pick.number
    for n in front:
        arch = dict(data.archs.get(n, ()))
        xs, ys = bars(data.layer_latency[n], rows.loc[n, "latency_ms"])
        labels = [arch[x].label if x in arch else "" for x in xs]
        traces.append(
            {
                "type": "bar",
                "name": f"trial {n} ({fmt_ms(rows.loc[n, 'latency_ms'])})",
                "x": [plot_text(v) for v in xs],
                "y": ys,
                "customdata": labels,
                "marker": {"color": "#fd8d3c"},
                "hovertemplate": f"%{{x}} %{{customdata}}: %{{y:.4g}} ms<extra>trial {n}</extra>",
                "visible": n == default,
            }
        )
    n_base = 1 if data.reference_layers else 0
    buttons = []
    for i, n in enumerate(front):
        visible = [True] * n_base + [j == i for j in range(len(front))]
        label = f"trial {n}: {fmt_acc(acc[n])}, {fmt_ms(rows.loc[n, 'latency_ms'])}"
        buttons.append({"label": label, "method": "restyle", "args": [{"visible": visible}]})
    layout: dict[str, Any] = {
        "height": 440,
        "barmode": "group",
        "margin": {"l": 70, "r": 20, "t": 50, "b": 110},
        "yaxis": {"title": {"text": "latency (ms)"}},
        "xaxis": {"tickangle": -45},
        "legend": {"orientation": "h", "y": 1.12, "x": 0.45},
    }
    if len(front) > 1:
        layout["updatemenus"] = [
            {
                "buttons": buttons,
                "active": front.index(default),
                "x": 0,
                "xanchor": "left",
                "y": 1.18,
                "yanchor": "top",
                "direction": "down",
            }
        ]
    return {"data": traces, "layout": layout}


def normalize_probabilities(raw: Any) -> list[dict[str, dict[str, float]]]:
    """Per-epoch ``{layer: {candidate: p}}`` from the shapes a differentiable search may store:
    a list per epoch of ``{layer: {candidate: p}}`` (preferred), ``{layer: [per-epoch
    {candidate: p}]}`` or ``{layer: {candidate: [per-epoch p]}}``."""
    epochs: list[dict[str, dict[str, float]]] = []
    if isinstance(raw, list):
        for item in raw:
            if isinstance(item, Mapping):
                item = item.get("probabilities", item)  # tolerate {"epoch": e, "probabilities"}
                epochs.append(
                    {
                        str(layer): {str(c): float(p) for c, p in cands.items()}
                        for layer, cands in item.items()
                        if isinstance(cands, Mapping)
                    }
                )
        return epochs
    if isinstance(raw, Mapping):
        for layer, per in raw.items():
            if isinstance(per, list):
                series = {i: d for i, d in enumerate(per) if isinstance(d, Mapping)}
            elif isinstance(per, Mapping):
                series = {}
                for cand, ps in per.items():
                    for i, p in enumerate(ps if isinstance(ps, list) else [ps]):
                        series.setdefault(i, {})[cand] = p
            else:
                continue
            for i, cands in series.items():
                while len(epochs) <= i:
                    epochs.append({})
                epochs[i][str(layer)] = {str(c): float(p) for c, p in cands.items()}
    return epochs


def probability_figures(data: StudyData) -> tuple[int, list[dict[str, Any]]] | None:
    """The latest differentiable-search trial's candidate probabilities: a heat map of the last
    epoch, and their course over the epochs (a menu picks the layer)."""
    if data.probabilities is None:
        return None
    number, raw = data.probabilities
    try:
        epochs = normalize_probabilities(raw)
    except (TypeError, ValueError, AttributeError):
        _log.warning("trial %d: cannot read its 'probabilities'", number)
        return None
    if not epochs or not epochs[-1]:
        return None
    layers = list(dict.fromkeys(layer for e in epochs for layer in e))
    cands = list(dict.fromkeys(c for e in epochs for layer in e.values() for c in layer))
    last = epochs[-1]
    z = [[last.get(layer, {}).get(c) for c in cands] for layer in layers]
    heat = {
        "data": [
            {
                "type": "heatmap",
                "x": [plot_text(c) for c in cands],
                "y": [plot_text(layer) for layer in layers],
                "z": z,
                "zmin": 0,
                "zmax": 1,
                "colorscale": "Blues",
                "reversescale": True,
                "text": [[f"{p:.2f}" if p is not None else "" for p in row] for row in z],
                "texttemplate": "%{text}",
                "hovertemplate": "%{y} %{x}: %{z:.3f}<extra></extra>",
            }
        ],
        "layout": {
            "height": max(320, 26 * len(layers) + 120),
            "margin": {"l": 130, "r": 20, "t": 40, "b": 80},
            "title": {"text": f"last epoch ({len(epochs) - 1})", "x": 0},
            "yaxis": {"autorange": "reversed"},
        },
    }
    traces, buttons = [], []
    for li, layer in enumerate(layers):
        for c in cands:
            traces.append(
                {
                    "type": "scatter",
                    "mode": "lines+markers",
                    "name": plot_text(c),
                    "x": list(range(len(epochs))),
                    "y": [e.get(layer, {}).get(c) for e in epochs],
                    "visible": li == 0,
                    "hovertemplate": (
                        f"{plot_text(layer)} {plot_text(c)}: %{{y:.3f}}<extra>epoch %{{x}}</extra>"
                    ),
                }
            )
        visible = [i // len(cands) == li for i in range(len(layers) * len(cands))]
        buttons.append(
            {"label": plot_text(layer), "method": "restyle", "args": [{"visible": visible}]}
        )
    lines = {
        "data": traces,
        "layout": {
            "height": 380,
            "margin": {"l": 60, "r": 20, "t": 50, "b": 50},
            "xaxis": {"title": {"text": "epoch"}, "dtick": 1},
            "yaxis": {"title": {"text": "probability"}, "range": [0, 1.02]},
            "updatemenus": [{"buttons": buttons, "x": 0, "xanchor": "left", "y": 1.2}],
        },
    }
    return number, [heat, lines]
