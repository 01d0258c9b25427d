"""The study's report page: one self-contained HTML file (plotly's JavaScript embedded once, its
own CSS, nothing fetched), and the :class:`Page` that the comparison page is assembled with too.

Sections: the header, accuracy against latency, the front table with the command that trains
each architecture, the grid of the front's per-layer choices, latency by layer, accuracy against
size, the candidate probabilities of a differentiable search, and the study's settings. Every
string from the study is escaped (:func:`~wasearch.report.formatting.esc`).
"""

from __future__ import annotations

import datetime as _dt
from collections import Counter
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .figures import (
    axis_title,
    breakdown_figure,
    probability_figures,
    scatter_figure,
    size_axes,
)
from .formatting import (
    SYNTHETIC,
    SYNTHETIC_WHY,
    axes_text,
    esc,
    fmt_acc_se,
    fmt_count,
    fmt_metric,
    fmt_ms,
    fmt_speedup,
    isnum,
    state_counts,
    tag,
)
from .reading import StudyData, front_command

if TYPE_CHECKING:
    from ..arch import LayerChoice

# Colours of the per-layer choices: grey for direct convolution, blues for static Winograd
# transforms, oranges for learned (flex) ones, darker for larger tiles.
_KIND_COLOURS = {
    "normal": "#d9d9d9",
    "F2-static": "#c6dbef",
    "F4-static": "#6baed6",
    "F6-static": "#08519c",
    "F2-flex": "#fdd0a2",
    "F4-flex": "#fd8d3c",
    "F6-flex": "#a63603",
}
_OTHER_TILE_COLOURS = {"static": "#9ecae1", "flex": "#fdae6b"}
_DARK_KINDS = {"F6-static", "F6-flex"}
_PLOT_CONFIG = {"responsive": True, "displaylogo": False}

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#222;margin:0;
 background:#fafafa}
main{max-width:1280px;margin:0 auto;padding:12px 24px 48px}
h1{font-size:22px;margin:14px 0 2px}h2{font-size:17px;margin:28px 0 6px;border-bottom:1px solid
 #ddd;padding-bottom:3px}
.sub{color:#555;margin:0 0 8px}.note{color:#555;font-size:13px;margin:2px 0 6px}
nav a{margin-right:14px;color:#1f5fa8;text-decoration:none}
.card{background:#fff;border:1px solid #e3e3e3;border-radius:6px;padding:8px;margin:6px 0}
.empty{font-size:16px;background:#fff7e0;border:1px solid #f0d48a;padding:14px;border-radius:6px}
table{border-collapse:collapse;font-size:13px}
td,th{padding:3px 8px;border-bottom:1px solid #eee;text-align:left;vertical-align:top}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
code{font-size:12px;background:#f3f3f3;padding:1px 4px;border-radius:3px;white-space:nowrap}
.scroll{overflow-x:auto}
table.grid td{width:44px;min-width:44px;text-align:center;padding:3px 2px;border:1px solid #fff;
 font-size:12px}
table.grid td.layer,table.grid th.layer{text-align:left;white-space:nowrap;position:sticky;left:0;
 background:#fff;padding-right:8px}
table.grid th{font-size:11px;text-align:center;padding:2px;font-weight:normal;line-height:1.2}
.legend span{display:inline-block;margin:2px 10px 2px 0}
.sw{display:inline-block;width:14px;height:14px;border:1px solid #bbb;vertical-align:-2px;
 margin-right:4px}
dl.settings{display:grid;grid-template-columns:220px 1fr;gap:2px 12px;margin:0}
dl.settings dt{color:#555}dl.settings dd{margin:0}
pre{background:#f6f6f6;padding:8px;overflow:auto;max-height:360px;font-size:12px}
p.pick{font-size:15px;background:#eef8ee;border:1px solid #9fd39f;padding:8px 12px;
 border-radius:6px;margin:6px 0}
tr.pick td{background:#eef8ee}
"""

# Before any figure: records uncaught errors on the status element (the browser also logs them).
_STATUS_JS = """
window.addEventListener('error', function (e) {
  var s = document.getElementById('report-status');
  s.setAttribute('data-js-errors', (+(s.getAttribute('data-js-errors') || 0) + 1).toString());
});
"""

# After a figure rendered: count its trial points (data and drawn SVG markers) on the status.
_COUNT_JS = """
var gd = document.getElementById('{plot_id}');
var s = document.getElementById('report-status');
function add(key, n) { s.setAttribute(key, (+(s.getAttribute(key) || 0) + n).toString()); }
add('data-plots-rendered', 1);
if (gd.getAttribute('data-count') === '1') {
  var n = 0, f = 0;
  gd.data.forEach(function (t) {
    if (t.meta === 'trial') { n += t.x.length; } else if (t.meta === 'failed') { f += t.x.length; }
  });
  add('data-trial-points', n);
  add('data-failed-points', f);
  add('data-svg-points', gd.querySelectorAll('.scatterlayer path.point').length);
}
"""


class Page:
    """Assembles one HTML page; figures share the one embedded plotly bundle."""

    def __init__(self, title: str) -> None:
        self.title = title
        self.parts: list[str] = []
        self.n_figures = 0

    def add(self, text: str) -> None:
        self.parts.append(text)

    def figure(self, fig: dict[str, Any], *, count: bool = False) -> None:
        import plotly.io as pio

        div_id = f"fig{self.n_figures}"
        self.n_figures += 1
        body = pio.to_html(
            fig,
            config=_PLOT_CONFIG,
            include_plotlyjs=False,
            full_html=False,
            validate=False,
            div_id=div_id,
            post_script=_COUNT_JS,
            default_height=f"{fig['layout'].get('height', 450)}px",
        )
        if count:  # mark the div so that the counting script counts its points
            body = body.replace(f'id="{div_id}"', f'id="{div_id}" data-count="1"', 1)
        self.add(f'<div class="card">{body}</div>')

    def render(self) -> str:
        scripts = ""
        if self.n_figures:
            import plotly.offline

            scripts = f'<script type="text/javascript">{plotly.offline.get_plotlyjs()}</script>'
        return (
            '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{esc(self.title)}</title>\n<style>{_CSS}</style>\n"
            f"<script>{_STATUS_JS}</script>\n{scripts}\n</head>\n<body>\n"
            f'<div id="report-status" hidden data-plots-expected="{self.n_figures}"></div>\n'
            "<main>\n" + "\n".join(self.parts) + "\n</main>\n</body>\n</html>\n"
        )


def now() -> str:
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


def _kind(choice: LayerChoice) -> str:
    return "normal" if choice.conv == "normal" else f"F{choice.tile}-{choice.conv}"


def _kind_colour(choice: LayerChoice) -> str:
    kind = _kind(choice)
    return _KIND_COLOURS.get(kind) or _OTHER_TILE_COLOURS.get(choice.conv, "#ffffff")


def _bits_text(choice: LayerChoice) -> str:
    bits = "fp" if choice.bits is None else str(choice.bits)
    return bits + ("t" if choice.granularity == "tap" else "")


def _headline(data: StudyData) -> str:
    """The header line: counts, the front, the best speed-up, the latency device.

    A study on synthetic data starts with ``SYNTHETIC data``. The front's size is the study's
    front (pareto.csv); when that front is over more than accuracy and latency, the header names
    its axes, since the accuracy-latency plot's legend then counts a 2-D front of its own.
    """
    comp = data.complete()
    rows = data.trials.set_index("number")
    headline = f"{len(comp)} completed of {len(data.trials)} trials"
    if data.synthetic:
        headline = f"{SYNTHETIC} ({SYNTHETIC_WHY}) · {headline}"
    if data.front:
        headline += f" · {len(data.front)} on the Pareto front"
        if [c for c, _ in data.front_axes] != [data.acc, "latency_ms"]:
            headline += f" over {axes_text(data.front_axes)}"
        n_refs = int(rows.loc[data.front, "reference"].notna().sum())
        if n_refs:
            headline += f" ({n_refs} of them reference architecture{'s' * (n_refs > 1)})"
        best = rows.loc[data.front, "speedup"].dropna()
        if len(best):
            headline += f" · up to {best.max():.2f}x faster than all-normal"
    device = data.attrs.get("latency_device")
    if device:
        headline += f" · latency on {device}"
    return headline


def _said(data: StudyData, n: int) -> str:
    """``trial 7 (static-F4: 66.72% ± 0.67, 3.27 ms, 1.53x)``: a trial as the pick line says it."""
    r = data.trials.set_index("number").loc[n]
    what = tag(r)
    figures = [fmt_acc_se(r[data.acc], r[data.se])]
    if isnum(r["latency_ms"]):
        figures.append(fmt_ms(r["latency_ms"]))
    if isnum(r["speedup"]):
        figures.append(f"{fmt_speedup(r['speedup'])} faster than all-normal")
    elif data.pick is not None and data.pick.cost in ("params", "bitops"):
        figures.append(f"{fmt_count(r[data.pick.cost])} {data.pick.cost}")
    return f"trial {n} ({(what + ': ') if what else ''}{', '.join(figures)})"


def pick_text(data: StudyData) -> str | None:
    """The decision a user came for, one paragraph of plain text (escaped by the caller): the
    cheapest trial within the tolerance of the best accuracy, and of all-normal.

    Without a latency or size objective there is nothing to be cheaper in: the text names the
    most accurate trial and how many the noise cannot tell from it. A study without standard
    errors (from before wasearch recorded ``val_images``) says so: only equal accuracies are
    then the same.
    """
    pick = data.pick
    if pick is None:
        return None
    tol = f"{pick.tolerance:g} standard error{'s' * (pick.tolerance != 1)}"
    k = len(pick.within)
    others = f"{k} trial{'s' * (k != 1)}"
    if pick.cost is None:
        text = (
            f"Pick: {_said(data, pick.number)}, the most accurate; {others} within {tol} of "
            "it (no latency or size objective to choose the cheapest among them)."
        )
    else:
        what = "fastest" if pick.cost == "latency_ms" else f"smallest in {pick.cost}"
        text = f"Pick: {_said(data, pick.number)}, the {what} of {others} within {tol} of the "
        text += "best accuracy" + (
            "." if pick.best == pick.number else f", {_said(data, pick.best)}."
        )
        if pick.reference is not None and pick.reference_pick is not None:
            ref = pick.reference_pick
            said = "the pick" if ref == pick.number else _said(data, ref)
            text += f" The fastest as good as all-normal (within {tol}): {said}."
    if not data.se_known:
        text += (
            " No trial records its number of validation images (a study from an older "
            "wasearch): the accuracies carry no standard error, and only equal ones count as "
            "the same."
        )
    return text


def study_page(data: StudyData) -> str:
    """The report page of one study, as text."""
    page = Page(f"wasearch report: {data.name}")
    comp = data.complete()
    rows = data.trials.set_index("number")
    page.add(f"<h1>{esc(data.name)}</h1>")
    page.add(f'<p class="sub">{esc(_headline(data))} · generated {now()} (reload to update)</p>')
    pick = pick_text(data)
    if pick:
        page.add(f'<p class="pick" id="pick">{esc(pick)}</p>')

    if comp.empty:
        page.add(
            '<p class="empty" id="no-complete">No completed trial yet '
            f"({esc(state_counts(data.trials['state']))}): nothing to plot. The page fills in "
            "as trials complete.</p>"
        )
        _settings_section(page, data)
        return page.render()

    sections = [("front", "Front"), ("table", "Front table"), ("choices", "Per-layer choices")]
    breakdown = breakdown_figure(data)
    if breakdown:
        sections.append(("breakdown", "Latency by layer"))
    cost_cols, flat_cols = size_axes(data)
    if cost_cols:
        sections.append(("cost", "Size"))
    probs = probability_figures(data)
    if probs:
        sections.append(("probabilities", "Probabilities"))
    sections.append(("settings", "Settings"))
    page.add("<nav>" + "".join(f'<a href="#{a}">{t}</a>' for a, t in sections) + "</nav>")

    n_failed = int((data.trials["state"] == "FAIL").sum())
    page.add('<h2 id="front">Accuracy against latency</h2>')
    n_diff = int((comp["source"] == "differentiable").sum())
    page.add(
        '<p class="note">Every completed trial; the line joins the Pareto front, diamonds are '
        "the reference architectures, open red circles are infeasible trials"
        + (
            ", orange stars are the differentiable search's results, labelled with their "
            "latency weight &lambda;"
            if n_diff
            else ""
        )
        + (
            f", grey crosses along the bottom edge are the {n_failed} failed trials at their "
            "latency (where known; a failed trial has no accuracy)"
            if n_failed
            else ""
        )
        + ". Error bars: one standard error of each accuracy (binomial, from the number of "
        "validation images); the shaded band is the front plus and minus one standard error. "
        f"Outlined in orange: front points within {data.tolerance:g} standard error(s) of a "
        "faster front point (the noise cannot tell them apart: take the faster); in green: "
        "the pick. Hover a point for its per-layer choices.</p>"
    )
    page.figure(scatter_figure(data, "latency_ms", with_failed=True), count=True)

    _front_table(page, data)
    _choice_grid(page, data)
    if breakdown:
        page.add('<h2 id="breakdown">Latency by layer</h2>')
        page.add(
            '<p class="note">A front architecture (pick another in the menu) against '
            'all-normal, per searchable convolution; "rest of network" is the remainder of '
            "the end-to-end latency (stem, shortcuts, classifier).</p>"
        )
        if not data.reference_layers:
            page.add('<p class="note">No all-normal per-layer latency in this study.</p>')
        page.figure(breakdown)
    if cost_cols:
        page.add('<h2 id="cost">Accuracy against size</h2>')
        if flat_cols:
            flat = " and ".join(axis_title(c) for c in flat_cols)
            page.add(
                f'<p class="note">Not plotted: {flat}, the same (within 1%) for every trial.</p>'
            )
        for col in cost_cols:
            page.figure(scatter_figure(data, col, with_failed=False))
    if probs:
        number, figs = probs
        what = tag(rows.loc[number]) if number in rows.index else None
        page.add('<h2 id="probabilities">Candidate probabilities (differentiable search)</h2>')
        page.add(
            f'<p class="note">Trial {number}{esc(f" ({what})" if what else "")}: per layer, the '
            "probability of each candidate, at the last epoch and over the epochs (pick a layer "
            "in the menu).</p>"
        )
        for fig in figs:
            page.figure(fig)
    _settings_section(page, data)
    return page.render()


def _front_table(page: Page, data: StudyData) -> None:
    rows = data.trials.set_index("number")
    page.add('<h2 id="table">Pareto front</h2>')
    axes = axes_text(data.front_axes)
    scalar = (
        " (the study is scalarized: its one objective, the score, is a column)"
        if data.scalarized
        else ""
    )
    page.add(
        f'<p class="note">Non-dominated completed, feasible trials over {esc(axes)}{scalar}, '
        'fastest first; accuracy ± one standard error; "within noise of" names a faster '
        f"front trial within {data.tolerance:g} standard error(s) of the difference. "
        "Each command runs as written from the folder this report was made "
        "in: <code>search.py export</code> writes the trial's architecture file, then "
        "<code>train.py</code> trains it fully on the study's data.</p>"
    )
    extra = [c for c in data.objectives if c not in (data.acc, "latency_ms", "params")]
    head = (
        "<tr><th class=num>trial</th><th class=num>accuracy ± SE</th>"
        "<th>within noise of</th><th class=num>latency</th>"
        "<th class=num>speed-up</th><th class=num>params</th>"
        + "".join(f"<th class=num>{esc(c)}</th>" for c in extra)
        + "<th>choices</th><th>train it</th></tr>"
    )
    body = []
    for n in data.front:
        r = rows.loc[n]
        what = tag(r)
        ref = f" <small>{esc(what)}</small>" if what else ""
        summary = r["arch_summary"] if isinstance(r["arch_summary"], str) else ""
        if not summary and n in data.archs:
            summary = ", ".join(
                f"{k} x{v}" for k, v in Counter(c.label for _, c in data.archs[n]).items()
            )
        body.append(
            f"<tr{' class=pick' if r['pick'] in (True,) else ''}><td class=num>{n}{ref}</td>"
            f"<td class=num>{fmt_acc_se(r[data.acc], r[data.se])}</td>"
            f"<td>{_noise_cell(r)}</td>"
            f"<td class=num>{fmt_ms(r['latency_ms'])}</td>"
            f"<td class=num>{fmt_speedup(r['speedup'])}</td>"
            f"<td class=num>{fmt_count(r['params'])}</td>"
            + "".join(f"<td class=num>{fmt_metric(c, r[c])}</td>" for c in extra)
            + f"<td>{esc(summary)}</td><td><code>{esc(front_command(data, n))}</code></td></tr>"
        )
    page.add(
        f'<div class="card scroll"><table id="front-table">{head}{"".join(body)}</table></div>'
    )


def _noise_cell(r: Any) -> str:
    """The front table's "within noise of" cell: the faster front trial the noise cannot tell
    this one from, and "pick" on the pick."""
    parts = []
    if r["pick"] in (True,):  # a numpy bool as well
        parts.append("<b>pick</b>")
    if isnum(r["within_noise_of"]):
        parts.append(f"trial {int(r['within_noise_of'])} (faster)")
    return ", ".join(parts)


def _choice_grid(page: Page, data: StudyData) -> None:
    rows = data.trials.set_index("number")
    cols = [n for n in data.front if n in data.archs]
    page.add('<h2 id="choices">Per-layer choices of the front</h2>')
    if not cols:
        page.add('<p class="note">The front\'s trials carry no architecture.</p>')
        return
    page.add(
        '<p class="note">Layers (rows) by front trial (columns, fastest first; header: accuracy '
        "and latency). Colour: the algorithm; text: the bit-width (fp: floating point, t: "
        "per-tap ranges).</p>"
    )
    legend = "".join(
        f'<span><i class="sw" style="background:{c}"></i>{esc(k)}</span>'
        for k, c in _KIND_COLOURS.items()
    )

    def header(n: int) -> str:
        what = tag(rows.loc[n].to_dict())
        ref = f"<br><i>{esc(what)}</i>" if what else ""
        acc = fmt_acc_se(rows.loc[n, data.acc], rows.loc[n, data.se])
        ms = fmt_ms(rows.loc[n, "latency_ms"])
        return f"<th><b>{n}</b>{ref}<br>{acc}<br>{ms}</th>"

    head = "<tr><th class=layer>layer</th>" + "".join(header(n) for n in cols)
    body = []
    archs = {n: dict(data.archs[n]) for n in cols}
    for layer in data.layers:
        cells = []
        for n in cols:
            c = archs[n].get(layer)
            if c is None:
                cells.append("<td></td>")
                continue
            fg = "#fff" if _kind(c) in _DARK_KINDS else "#222"
            cells.append(
                f'<td style="background:{_kind_colour(c)};color:{fg}" title="{esc(c.label)}">'
                f"{esc(_bits_text(c))}</td>"
            )
        body.append(f"<tr><td class=layer>{esc(layer)}</td>{''.join(cells)}</tr>")
    page.add(
        f'<div class="card"><div class="legend">{legend}</div><div class="scroll">'
        f'<table class="grid" id="choice-grid">{head}</tr>{"".join(body)}</table></div></div>'
    )


def _scalarization_text(value: Any) -> str | None:
    if isinstance(value, Mapping) and isnum(value.get("latency_weight")):
        w = value["latency_weight"]
        return f"score = val_acc - {w:g} x latency_ms / all-normal latency_ms"
    return None


def _settings_section(page: Page, data: StudyData) -> None:
    a = data.attrs
    model = a.get("latency_model")
    if isinstance(model, Mapping):
        model = ", ".join(f"{k}: {v}" for k, v in model.items())
    t = data.trials
    starts = t["datetime_start"].dropna()
    ends = t["datetime_complete"].dropna()
    n_infeasible = int((t["feasible"] == False).sum())  # noqa: E712
    train = t["train_seconds"].dropna()
    sources = Counter(t["source"].dropna())
    trials = state_counts(t["state"]) + (f"; {n_infeasible} infeasible" if n_infeasible else "")
    items = [
        ("study", data.name),
        ("storage", data.storage),
        ("objectives", axes_text(zip(data.objectives, data.maximize, strict=True))),
        ("Pareto front over", axes_text(data.front_axes) if data.scalarized else None),
        ("scalarization", _scalarization_text(a.get("scalarization"))),
        ("space file", a.get("space_path")),
        ("dataset", data.dataset),
        ("latency model", model),
        ("latency device", a.get("latency_device")),
        (
            "all-normal latency",
            fmt_ms(data.reference_latency) if data.reference_latency else None,
        ),
        ("sampler", a.get("sampler")),
        (
            "tolerance",
            f"{data.tolerance:g} standard error(s) of the difference of two accuracies "
            "(report.tolerance, --tolerance)",
        ),
        ("trials", trials),
        ("sources", ", ".join(f"{k} {v}" for k, v in sources.items()) if sources else None),
        (
            "training time",
            f"{train.sum() / 3600:.2f} h in {len(train)} trials" if len(train) else None,
        ),
        ("created", a.get("created")),
        ("first trial started", starts.min() if len(starts) else None),
        ("last trial finished", ends.max() if len(ends) else None),
    ]
    page.add('<h2 id="settings">Settings</h2>')
    dl = "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in items if v not in (None, ""))
    page.add(f'<div class="card"><dl class="settings">{dl}</dl></div>')
    space = a.get("space")
    if isinstance(space, Mapping):
        import yaml

        text = yaml.safe_dump(dict(space), sort_keys=False, default_flow_style=None)
        page.add(f"<details><summary>search space</summary><pre>{esc(text)}</pre></details>")
