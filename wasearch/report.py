"""Reports of a search: a self-contained HTML page and CSV tables from an Optuna study.

``write_report(results/<study>)`` reads the study that ``docs/study_format.md`` describes and
writes, next to it, ``report.html`` (works offline: plotly's JavaScript is embedded once),
``trials.csv`` (one row per trial) and ``pareto.csv`` (the front). ``write_comparison`` overlays
the fronts of several studies in one page. Every file is written atomically (temporary file, then
``os.replace``), so a page that a running search refreshes after each trial is never half written.

The page shows the accuracy-latency front (all completed trials, the front as a line, the
reference architectures labelled, infeasible trials as open red circles, failed trials as grey
crosses along the bottom edge at their latency since they have no accuracy), the same against
params / bit-operations when the trials carry them, the front as a table with the command that
trains each architecture, a grid of the front's per-layer choices, the per-layer latency of a
front architecture against all-normal, the candidate probabilities of a differentiable search
and the study's settings. See docs/report.md.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import functools
import html
import logging
import math
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .cli import UserError
from .fileio import atomic_write_text, refused_writes_as_user_errors

if TYPE_CHECKING:
    import optuna
    import pandas as pd

    from .arch import LayerChoice

__all__ = ["register", "trials_frame", "write_comparison", "write_report"]

_log = logging.getLogger(__name__)

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
_STUDY_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b")
_STATES = ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING")
_PLOT_CONFIG = {"responsive": True, "displaylogo": False}


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------
def write_report(
    study_dir: str | os.PathLike,
    *,
    storage: str | None = None,
    study_name: str | None = None,
    out: str | os.PathLike | None = None,
    study: optuna.Study | None = None,
) -> Path:
    """Write ``report.html``, ``trials.csv`` and ``pareto.csv`` for one study; return the page.

    ``storage`` defaults to the URL in ``<study_dir>/storage.txt`` (the search writes it when it
    used another storage), else ``sqlite:///<study_dir>/study.db``; ``study_name`` to the
    folder's name (or the storage's only study). ``out`` puts the page elsewhere (the CSVs stay in
    ``study_dir``). A caller that holds the study already (the search, after each trial) passes
    it as ``study`` and nothing is reopened. Raises :class:`UserError` for a missing folder,
    storage or study, and for a file it cannot write (a read-only folder, a full disk: one line
    naming the file; :func:`wasearch.fileio.refused_write`).
    """
    study_dir = Path(study_dir)
    if study is None:
        study, label = _open_study(study_dir, storage, study_name)
    elif storage is not None:
        label = _redact(storage)
    elif (study_dir / "storage.txt").is_file() or (study_dir / "study.db").is_file():
        label = _redact(_default_url(study_dir))
    else:
        label = "(given study)"
    data = _collect(study, study_dir, label)
    page = Path(out) if out is not None else study_dir / "report.html"
    with refused_writes_as_user_errors():
        study_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(study_dir / "trials.csv", data.trials.to_csv(index=False))
        atomic_write_text(study_dir / "pareto.csv", _pareto_frame(data).to_csv(index=False))
        page.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(page, _study_page(data))
    return page


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
    if not study_dirs:
        raise UserError("report: give at least one study folder")
    studies = []
    for d in study_dirs:
        study, label = _open_study(Path(d), storage, None)
        studies.append(_collect(study, Path(d), label))
    page = Path(out)
    with refused_writes_as_user_errors(flag="--out"):
        page.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(page, _comparison_page(studies))
    return page


def trials_frame(study: optuna.Study) -> pd.DataFrame:
    """One row per trial, the columns of ``trials.csv`` (see docs/report.md)."""
    return _collect(study, Path(study.study_name), "(given study)").trials


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
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
    p.set_defaults(func=_cmd_report)


def _cmd_report(args: argparse.Namespace) -> int:
    dirs = [Path(d) for d in args.study_dirs]
    if len(dirs) == 1:
        page = write_report(
            dirs[0], storage=args.storage, study_name=args.study_name, out=args.out
        )
        print(f"wrote {page}, {dirs[0] / 'trials.csv'}, {dirs[0] / 'pareto.csv'}")
        return 0
    if args.study_name is not None:
        raise UserError(
            "--study-name picks one study; with several folders each study is named by its folder"
        )
    out = Path(args.out) if args.out else Path("results") / "compare.html"
    page = write_comparison(dirs, out=out, storage=args.storage)
    print(f"wrote {page}")
    return 0


# ---------------------------------------------------------------------------------------------
# Reading a study
# ---------------------------------------------------------------------------------------------
def _redact(url: str) -> str:
    """The storage URL without its password."""
    from .search.study import redact

    return redact(url)


def _default_url(study_dir: Path) -> str:
    """The URL of ``<study_dir>/storage.txt``, else ``sqlite:///<study_dir>/study.db``."""
    from .search.study import storage_url

    return storage_url(None, study_dir)


def _default_url_sqlite(study_dir: Path) -> str:
    """The default storage: the folder's SQLite file."""
    return f"sqlite:///{(study_dir / 'study.db').resolve()}"


def _first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0]


def _sqlite_path(url: str) -> Path | None:
    """The file of a ``sqlite:///`` URL (None for other URLs and in-memory databases)."""
    if not url.startswith("sqlite:///"):
        return None
    path = url[len("sqlite:///") :].split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


def _open_study(
    study_dir: Path, storage: str | None, study_name: str | None
) -> tuple[optuna.Study, str]:
    """Find and load the study of ``study_dir``; user errors as one-line :class:`UserError`.

    Opens storages the way the search does (:func:`wasearch.search.study.open_storage`, so a
    bare ``postgresql://`` URL gets the installed driver), but never creates anything: a missing
    SQLite or journal file is an error, not a new empty study.
    """
    import optuna

    from .search.study import open_storage

    origin = ""
    if storage is None:
        if not study_dir.is_dir():
            raise UserError(f"{study_dir}: no such study folder")
        url = _default_url(study_dir)
        if (study_dir / "storage.txt").is_file() and url != _default_url_sqlite(study_dir):
            origin = f" (named in {study_dir / 'storage.txt'})"
        elif not (study_dir / "study.db").is_file():
            raise UserError(
                f"{study_dir}: no study.db in this folder (name another with --storage)"
            )
    else:
        url = storage
    label = _redact(url)
    if "://" not in url and not Path(url).expanduser().is_file():
        raise UserError(f"storage {label!r}{origin}: not a database URL and no such journal file")
    db = _sqlite_path(url)
    if db is not None and not db.expanduser().is_file():
        raise UserError(f"storage {label}{origin}: no such SQLite file")
    try:
        store = open_storage(url, create=False, heartbeat_interval=None, grace_period=None)
        names = optuna.study.get_all_study_names(storage=store)
    except UserError as err:
        raise UserError(f"{err}{origin}") from None
    except Exception as err:  # noqa: BLE001 - whatever the driver raises, it is the user's URL
        raise UserError(f"cannot open storage {label}{origin}: {_first_line(err)}") from None
    default_name = study_dir.resolve().name
    if study_name is not None:
        if study_name not in names:
            raise UserError(
                f"unknown study {study_name!r} in {label}; it holds: {_name_list(names)}"
            )
    elif default_name in names:
        study_name = default_name
    elif len(names) == 1:
        study_name = names[0]
    elif not names:
        raise UserError(f"{label}{origin} holds no study")
    else:
        raise UserError(
            f"no study named {default_name!r} in {label}, which holds {_name_list(names)}; "
            "pick one with --study-name"
        )
    return optuna.load_study(study_name=study_name, storage=store), label


def _name_list(names: Sequence[str]) -> str:
    if not names:
        return "no study"
    shown = ", ".join(repr(n) for n in names[:8])
    return shown + (f" and {len(names) - 8} more" if len(names) > 8 else "")


@functools.lru_cache(maxsize=8192)
def _parse_arch(text: str) -> tuple[tuple[str, LayerChoice], ...] | None:
    """Per-layer choices of an ``Arch`` YAML text (cached: a refreshed report parses only the
    new trials); None when it cannot be read."""
    from .arch import Arch, ArchError, LayerChoice
    from .fileio import InputFileError, parse_yaml

    try:
        data = parse_yaml(text, source="arch")  # strict, and libyaml's speed when installed
    except InputFileError:
        return None
    try:
        return Arch.from_dict(data).layers
    except ArchError:
        pass
    # An architecture this version cannot validate (another backbone): show what it lists.
    try:
        layers = data.get("layers") or {}
        return tuple((str(n), LayerChoice.from_dict(c, str(n))) for n, c in layers.items())
    except (AttributeError, ArchError, TypeError):
        return None


def _kind(choice: LayerChoice) -> str:
    return "normal" if choice.conv == "normal" else f"F{choice.tile}-{choice.conv}"


def _kind_colour(choice: LayerChoice) -> str:
    kind = _kind(choice)
    return _KIND_COLOURS.get(kind) or _OTHER_TILE_COLOURS.get(choice.conv, "#ffffff")


def _bits_text(choice: LayerChoice) -> str:
    bits = "fp" if choice.bits is None else str(choice.bits)
    return bits + ("t" if choice.granularity == "tap" else "")


@dataclass
class _StudyData:
    """What the pages and tables need from one study."""

    name: str
    study_dir: Path
    storage: str
    objectives: list[str]
    maximize: list[bool]
    attrs: dict[str, Any]
    trials: pd.DataFrame  # the trials.csv frame
    layers: list[str]
    archs: dict[int, tuple[tuple[str, LayerChoice], ...]]
    layer_latency: dict[int, dict[str, float]]
    hover: dict[int, str]
    reference_latency: float | None
    reference_layers: dict[str, float] | None
    probabilities: tuple[int, Any] | None
    acc: str  # the accuracy column: the first objective, "accuracy" when scalarized
    front_axes: list[tuple[str, bool]]  # (column, maximize) the front is taken over
    front: list[int] = field(default_factory=list)  # numbers, by latency

    @property
    def scalarized(self) -> bool:
        """One objective, ``score`` (docs/study_format.md): fronts over accuracy and latency."""
        return self.objectives == ["score"]

    def complete(self) -> pd.DataFrame:
        return self.trials[self.trials["state"] == "COMPLETE"]


def _objective_names(study: optuna.Study) -> list[str]:
    n = len(study.directions)
    names = study.user_attrs.get("objectives") or study.metric_names or []
    names = [str(x) for x in names][:n]
    defaults = ["accuracy", "latency_ms"] + [f"objective_{i}" for i in range(2, n)]
    return names + defaults[len(names) : n]


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _iso(value: _dt.datetime | None) -> str | None:
    return value.isoformat(timespec="seconds") if value is not None else None


def _feasible(trial: optuna.trial.FrozenTrial) -> bool | None:
    flag = trial.user_attrs.get("feasible")
    if isinstance(flag, bool):
        return flag
    constraints = trial.constraints
    if constraints:
        return all(v <= 0.0 for v in constraints.values())
    return True if trial.state.name == "COMPLETE" else None


def _collect(study: optuna.Study, study_dir: Path, storage: str) -> _StudyData:
    import pandas as pd

    objectives = _objective_names(study)
    maximize = [d.name == "MAXIMIZE" for d in study.directions]
    attrs = dict(study.user_attrs)
    if objectives == ["score"]:  # scalarized: the front is over val_acc and latency_ms
        acc, front_axes = "accuracy", [("accuracy", True), ("latency_ms", False)]
    else:
        acc, front_axes = objectives[0], list(zip(objectives, maximize, strict=True))
    trials = study.get_trials(deepcopy=False)

    layers: list[str] = []
    seen: set[str] = set()
    archs: dict[int, tuple[tuple[str, LayerChoice], ...]] = {}
    layer_latency: dict[int, dict[str, float]] = {}
    probabilities: tuple[int, Any] | None = None
    rows = []
    for t in trials:
        ua = t.user_attrs
        arch = _parse_arch(ua["arch"]) if isinstance(ua.get("arch"), str) else None
        if arch is not None:
            archs[t.number] = arch
            for name, _ in arch:
                if name not in seen:
                    seen.add(name)
                    layers.append(name)
        lat = ua.get("layer_latency_ms")
        if isinstance(lat, Mapping):
            layer_latency[t.number] = {str(k): v for k, v in lat.items() if _number(v) is not None}
            for name in layer_latency[t.number]:
                if name not in seen:
                    seen.add(name)
                    layers.append(name)
        if ua.get("probabilities") is not None:
            probabilities = (t.number, ua["probabilities"])
        fail_reason = ua.get("fail_reason") or t.system_attrs.get("fail_reason")
        row: dict[str, Any] = {
            "number": t.number,
            "state": t.state.name,
            "source": ua.get("source"),
            "lambda": _number(ua.get("lambda")),
            "reference": ua.get("reference"),
            "feasible": _feasible(t),
        }
        for key in (*objectives, acc, "latency_ms", "params", "bitops"):
            if key not in row:
                row[key] = _number(ua.get(key))
        if row[acc] is None:
            row[acc] = _number(ua.get("val_acc"))
        if t.state.name == "COMPLETE" and t.values is not None:
            for key, value in zip(objectives, t.values, strict=False):
                row[key] = _number(value)
        row.update(
            arch_summary=ua.get("arch_summary"),
            latency_estimated=ua.get("latency_estimated"),
            train_seconds=_number(ua.get("train_seconds")),
            fail_reason=_first_line(Exception(fail_reason)) if fail_reason else None,
            datetime_start=_iso(t.datetime_start),
            datetime_complete=_iso(t.datetime_complete),
        )
        rows.append((row, arch, layer_latency.get(t.number, {})))

    # The all-normal baseline: the study's record, else the all-normal reference trial.
    ref_trials = [r for r, _, _ in rows if r["reference"] == "all-normal" and r["latency_ms"]]
    reference_latency = _number(attrs.get("reference_latency_ms"))
    if reference_latency is None and ref_trials:
        reference_latency = ref_trials[0]["latency_ms"]
    reference_layers = attrs.get("reference_layer_latency_ms")
    if not isinstance(reference_layers, Mapping):
        reference_layers = None
        for r in ref_trials:
            if layer_latency.get(r["number"]):
                reference_layers = layer_latency[r["number"]]
                break

    records = []
    for row, arch, lat in rows:
        choices = dict(arch) if arch else {}
        row["speedup"] = (
            reference_latency / row["latency_ms"]
            if reference_latency and row["latency_ms"]
            else None
        )
        for name in layers:
            row[f"choice:{name}"] = choices[name].label if name in choices else None
        for name in layers:
            row[f"latency_ms:{name}"] = _number(lat.get(name))
        records.append(row)

    base = ["number", "state", "source", "lambda", "reference", "feasible", "pareto"]
    metrics = list(dict.fromkeys([*objectives, acc, "latency_ms", "speedup", "params", "bitops"]))
    tail = [
        "arch_summary",
        "latency_estimated",
        "train_seconds",
        "fail_reason",
        "datetime_start",
        "datetime_complete",
    ]
    columns = (
        base
        + metrics
        + tail
        + [f"choice:{n}" for n in layers]
        + [f"latency_ms:{n}" for n in layers]
    )
    frame = pd.DataFrame.from_records(records, columns=columns)
    frame["feasible"] = frame["feasible"].astype(object)

    data = _StudyData(
        name=study.study_name,
        study_dir=study_dir,
        storage=storage,
        objectives=objectives,
        maximize=maximize,
        attrs=attrs,
        trials=frame,
        layers=layers,
        archs=archs,
        layer_latency=layer_latency,
        hover={},
        reference_latency=reference_latency,
        reference_layers=dict(reference_layers) if reference_layers else None,
        probabilities=probabilities,
        acc=acc,
        front_axes=front_axes,
    )
    axes = [c for c, _ in front_axes]
    candidates = frame[(frame["state"] == "COMPLETE") & (frame["feasible"] != False)]  # noqa: E712
    candidates = candidates.dropna(subset=axes)
    mask = _non_dominated(candidates[axes].to_numpy(float), [up for _, up in front_axes])
    on_front = set(candidates["number"][mask].tolist())
    frame["pareto"] = frame["number"].isin(on_front)
    order = frame[frame["pareto"]].sort_values(["latency_ms", "number"], na_position="last")
    data.front = order["number"].tolist()
    data.hover = {int(r["number"]): _hover(data, r) for r in frame.to_dict("records")}
    return data


def _non_dominated(values: Any, maximize: Sequence[bool]) -> Any:
    """Boolean mask of the rows of ``values`` (n, k) that no other row dominates."""
    import numpy as np

    v = np.asarray(values, dtype=float).reshape(len(values), len(maximize))
    v = np.where(np.asarray(maximize), -v, v)  # minimize everything
    keep = np.ones(len(v), dtype=bool)
    for i in range(len(v)):
        no_worse = (v <= v[i]).all(axis=1)
        better = (v < v[i]).any(axis=1)
        keep[i] = not (no_worse & better).any()
    return keep


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------
def _display_dir(study_dir: Path) -> str:
    """The study folder as a user would type it from here (relative when below the cwd)."""
    try:
        return study_dir.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return study_dir.resolve().as_posix()


def _train_command(data: _StudyData, number: int) -> str:
    """The command that trains front trial ``number`` fully, as written: it exports the
    architecture file first, then runs train.py with the study's data settings."""
    from .search.study import train_command

    where = _display_dir(data.study_dir)
    export = f"python search.py export {where} --trial {number}"
    if data.name != data.study_dir.resolve().name:
        export += f" --study-name {data.name}"
    if data.storage != _default_url(data.study_dir):
        export += f" --storage {_redact(data.storage)}"
    space = data.attrs.get("space")
    if not isinstance(space, Mapping):  # a study from an older wasearch: its dataset only
        space = {"data": {"dataset": data.attrs.get("dataset", "synthetic")}}
    path = data.study_dir / "pareto" / f"trial_{number}.yaml"
    return f"{export} && {train_command(space, path, data.name, number)}"


def _pareto_frame(data: _StudyData) -> pd.DataFrame:
    frame = data.trials.set_index("number", drop=False).loc[data.front].reset_index(drop=True)
    commands = [_train_command(data, n) for n in data.front]
    frame.insert(frame.columns.get_loc("arch_summary"), "command", commands)
    return frame


# ---------------------------------------------------------------------------------------------
# Formatting
# ---------------------------------------------------------------------------------------------
def _isnum(x: Any) -> bool:
    return _number(x) is not None


def _fmt_acc(x: Any) -> str:
    return f"{100 * x:.2f}%" if _isnum(x) else "-"


def _fmt_ms(x: Any) -> str:
    return f"{x:.3g} ms" if _isnum(x) and x < 100 else (f"{x:.0f} ms" if _isnum(x) else "-")


def _fmt_count(x: Any) -> str:
    if not _isnum(x):
        return "-"
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g}{unit}"
    return f"{x:.0f}"


def _fmt_speedup(x: Any) -> str:
    return f"{x:.2f}x" if _isnum(x) else "-"


def _lambda_text(row: Mapping[str, Any]) -> str | None:
    """``λ=0.5`` for a differentiable-search trial that records its lambda."""
    if row["source"] != "differentiable" or not _isnum(row["lambda"]):
        return None
    return f"λ={row['lambda']:g}"


def _tag(row: Mapping[str, Any]) -> str | None:
    """What a trial is beside its number: a reference's name, or ``λ=0.5 (differentiable)``."""
    if isinstance(row["reference"], str):
        return row["reference"]
    if row["source"] == "differentiable":
        lam = _lambda_text(row)
        return f"{lam} (differentiable)" if lam else "differentiable"
    return None


def _fmt_metric(col: str, x: Any) -> str:
    if col == "score":
        return f"{x:.4f}" if _isnum(x) else "-"
    return _fmt_count(x)


def _hover(data: _StudyData, row: Mapping[str, Any]) -> str:
    """Hover text of one trial: its figures, then its per-layer choices by stage."""
    n = int(row["number"])
    tag = _tag(row)
    if isinstance(row["reference"], str):
        lines = [f"<b>trial {n}</b> ({_esc(tag)})"]
    else:  # λ=0.5 (differentiable)
        lines = [f"<b>trial {n}</b>" + (f" · {_esc(tag)}" if tag else "")]
    if row["state"] == "FAIL":
        reason = row["fail_reason"] if isinstance(row["fail_reason"], str) else "no reason given"
        lines.append(f"FAILED: {_esc(reason[:120])}")
    figures = [_fmt_acc(row[data.acc]), _fmt_ms(row["latency_ms"])]
    if data.scalarized and _isnum(row["score"]):
        figures.append(f"score {_fmt_metric('score', row['score'])}")
    if _isnum(row["speedup"]):
        figures.append(_fmt_speedup(row["speedup"]))
    if _isnum(row["params"]):
        figures.append(f"{_fmt_count(row['params'])} params")
    if _isnum(row["bitops"]):
        figures.append(f"{_fmt_count(row['bitops'])} bitops")
    lines.append(" · ".join(figures))
    if row["feasible"] is False:
        lines.append("<i>infeasible</i>")
    arch = data.archs.get(n)
    if arch:
        summary = Counter(c.label for _, c in arch)
        lines.append(", ".join(f"{k} x{v}" for k, v in summary.items()))
        stages: dict[str, list[str]] = {}
        for name, c in arch:
            stages.setdefault(name.split(".")[0], []).append(c.label)
        lines += [f"{stage}: {' '.join(labels)}" for stage, labels in stages.items()]
    elif isinstance(row["arch_summary"], str):
        lines.append(_esc(row["arch_summary"]))
    return "<br>".join(lines)


def _esc(x: Any) -> str:
    return html.escape(str(x))


def _axes_text(axes: Iterable[tuple[str, bool]]) -> str:
    return ", ".join(f"{name} ({'max' if up else 'min'})" for name, up in axes)


# ---------------------------------------------------------------------------------------------
# Figures (plain dicts, rendered by plotly.io.to_html without validation: fast)
# ---------------------------------------------------------------------------------------------
def _axis_title(col: str) -> str:
    return {
        "latency_ms": "latency (ms)",
        "params": "parameters",
        "bitops": "bit-operations",
        "speedup": "speed-up against all-normal (x)",
    }.get(col, col)


def _acc_view(
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


def _hidden_note(hidden: int, y_range: Sequence[float]) -> list[dict[str, Any]]:
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


def _scatter_figure(data: _StudyData, x: str, *, with_failed: bool) -> dict[str, Any]:
    """Accuracy against ``x``: every completed trial once, the 2-D front as a line."""
    comp = data.complete().dropna(subset=[data.acc])
    shown = comp.dropna(subset=[x])
    feasible = shown[shown["feasible"] != False]  # noqa: E712
    mask = _non_dominated(feasible[[data.acc, x]].to_numpy(float), [True, False])
    front = set(feasible["number"][mask].tolist())
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
            "hovertext": [data.hover[int(n)] for n in rows["number"]],
            "hoverinfo": "text",
            "marker": {"size": 9, **marker},
            "meta": "trial",
            **kw,
        }

    line = shown[on_front].sort_values(x)
    refs = shown[is_ref]
    traces: list[dict[str, Any]] = [
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
                text=[_lambda_text(r) or "" for r in diff.to_dict("records")],
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
            text=refs["reference"].tolist(),
            textposition=[("top center", "bottom center")[i % 2] for i in range(len(refs))],
            textfont={"size": 12},
            cliponaxis=False,
        )
    )
    y_range, hidden = _acc_view(comp[data.acc], line[data.acc])
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
    xaxis: dict[str, Any] = {"title": {"text": _axis_title(x)}, "zeroline": False}
    if x in ("params", "bitops"):
        xaxis["type"] = "log"
    return {
        "data": traces,
        "layout": {
            "height": 520,
            "margin": {"l": 70, "r": 20, "t": 30, "b": 60},
            "xaxis": xaxis,
            "yaxis": {"title": {"text": "validation accuracy (%)"}, "range": y_range},
            "annotations": _hidden_note(hidden, y_range),
            "legend": {"orientation": "h", "y": -0.15},
            "hovermode": "closest",
            "hoverlabel": {"align": "left"},
        },
    }


def _breakdown_figure(data: _StudyData) -> dict[str, Any] | None:
    """Per-layer latency of a front architecture (picked in a menu) against all-normal."""
    rows = data.trials.set_index("number")
    front = [n for n in data.front if data.layer_latency.get(n)]
    if not front:
        return None
    layers = [n for n in data.layers if any(n in data.layer_latency[t] for t in front)]
    rest_label = "rest of network"

    def bars(lat: Mapping[str, float], total: Any) -> tuple[list[str], list[float]]:
        xs, ys = list(layers), [lat.get(n) for n in layers]
        rest = total - sum(v for v in ys if v) if _isnum(total) else None
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
                "name": f"all-normal ({_fmt_ms(data.reference_latency)})",
                "x": xs,
                "y": ys,
                "marker": {"color": "#969696"},
                "hovertemplate": "%{x}: %{y:.4g} ms<extra>all-normal</extra>",
            }
        )
    # Default: the fastest front trial within one accuracy point of the best.
    acc = rows.loc[front, data.acc]
    near = [n for n in front if acc[n] >= acc.max() - 0.01]
    default = max(
        near, key=lambda n: rows.loc[n, "speedup"] if _isnum(rows.loc[n, "speedup"]) else 0
    )
    for n in front:
        arch = dict(data.archs.get(n, ()))
        xs, ys = bars(data.layer_latency[n], rows.loc[n, "latency_ms"])
        labels = [arch[x].label if x in arch else "" for x in xs]
        traces.append(
            {
                "type": "bar",
                "name": f"trial {n} ({_fmt_ms(rows.loc[n, 'latency_ms'])})",
                "x": xs,
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
        label = f"trial {n}: {_fmt_acc(acc[n])}, {_fmt_ms(rows.loc[n, 'latency_ms'])}"
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


def _normalize_probabilities(raw: Any) -> list[dict[str, dict[str, float]]]:
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


def _probability_figures(data: _StudyData) -> tuple[int, list[dict[str, Any]]] | None:
    if data.probabilities is None:
        return None
    number, raw = data.probabilities
    try:
        epochs = _normalize_probabilities(raw)
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
                "x": cands,
                "y": layers,
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
                    "name": c,
                    "x": list(range(len(epochs))),
                    "y": [e.get(layer, {}).get(c) for e in epochs],
                    "visible": li == 0,
                    "hovertemplate": f"{layer} {c}: %{{y:.3f}}<extra>epoch %{{x}}</extra>",
                }
            )
        visible = [i // len(cands) == li for i in range(len(layers) * len(cands))]
        buttons.append({"label": layer, "method": "restyle", "args": [{"visible": visible}]})
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


# ---------------------------------------------------------------------------------------------
# HTML
# ---------------------------------------------------------------------------------------------
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


class _Page:
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
            f"<title>{_esc(self.title)}</title>\n<style>{_CSS}</style>\n"
            f"<script>{_STATUS_JS}</script>\n{scripts}\n</head>\n<body>\n"
            f'<div id="report-status" hidden data-plots-expected="{self.n_figures}"></div>\n'
            "<main>\n" + "\n".join(self.parts) + "\n</main>\n</body>\n</html>\n"
        )


def _now() -> str:
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


def _state_counts(data: _StudyData) -> str:
    counts = Counter(data.trials["state"])
    parts = [f"{counts[s]} {s.lower()}" for s in _STATES if counts.get(s)]
    parts += [f"{v} {k.lower()}" for k, v in counts.items() if k not in _STATES]
    return ", ".join(parts) or "no trials"


def _study_page(data: _StudyData) -> str:
    page = _Page(f"wasearch report: {data.name}")
    comp = data.complete()
    rows = data.trials.set_index("number")
    device = data.attrs.get("latency_device")
    headline = f"{len(comp)} completed of {len(data.trials)} trials"
    if data.attrs.get("synthetic"):
        headline = "SYNTHETIC data (generated images: accuracies say nothing about a real "
        headline += f"dataset) · {len(comp)} completed of {len(data.trials)} trials"
    if data.front:
        headline += f" · {len(data.front)} on the Pareto front"
        n_refs = int(rows.loc[data.front, "reference"].notna().sum())
        if n_refs:
            headline += f" ({n_refs} of them reference architecture{'s' * (n_refs > 1)})"
        best = rows.loc[data.front, "speedup"].dropna()
        if len(best):
            headline += f" · up to {best.max():.2f}x faster than all-normal"
    if device:
        headline += f" · latency on {device}"
    page.add(f"<h1>{_esc(data.name)}</h1>")
    page.add(f'<p class="sub">{_esc(headline)} · generated {_now()} (reload to update)</p>')

    if comp.empty:
        page.add(
            '<p class="empty" id="no-complete">No completed trial yet '
            f"({_esc(_state_counts(data))}): nothing to plot. The page fills in as trials "
            "complete.</p>"
        )
        _settings_section(page, data)
        return page.render()

    sections = [("front", "Front"), ("table", "Front table"), ("choices", "Per-layer choices")]
    breakdown = _breakdown_figure(data)
    if breakdown:
        sections.append(("breakdown", "Latency by layer"))
    cost_cols = [c for c in ("params", "bitops") if comp[c].notna().any()]
    if cost_cols:
        sections.append(("cost", "Size"))
    probs = _probability_figures(data)
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
        + ". Hover a point for its per-layer choices.</p>"
    )
    page.figure(_scatter_figure(data, "latency_ms", with_failed=True), count=True)

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
        for col in cost_cols:
            page.figure(_scatter_figure(data, col, with_failed=False))
    if probs:
        number, figs = probs
        tag = _tag(rows.loc[number]) if number in rows.index else None
        page.add('<h2 id="probabilities">Candidate probabilities (differentiable search)</h2>')
        page.add(
            f'<p class="note">Trial {number}{_esc(f" ({tag})" if tag else "")}: per layer, the '
            "probability of each candidate, at the last epoch and over the epochs (pick a layer "
            "in the menu).</p>"
        )
        for fig in figs:
            page.figure(fig)
    _settings_section(page, data)
    return page.render()


def _front_table(page: _Page, data: _StudyData) -> None:
    rows = data.trials.set_index("number")
    page.add('<h2 id="table">Pareto front</h2>')
    axes = _axes_text(data.front_axes)
    scalar = (
        " (the study is scalarized: its one objective, the score, is a column)"
        if data.scalarized
        else ""
    )
    page.add(
        f'<p class="note">Non-dominated completed, feasible trials over {_esc(axes)}{scalar}, '
        "fastest first. Each command runs as written from the folder this report was made "
        "in: <code>search.py export</code> writes the trial's architecture file, then "
        "<code>train.py</code> trains it fully on the study's data.</p>"
    )
    extra = [c for c in data.objectives if c not in (data.acc, "latency_ms", "params")]
    head = (
        "<tr><th class=num>trial</th><th class=num>accuracy</th><th class=num>latency</th>"
        "<th class=num>speed-up</th><th class=num>params</th>"
        + "".join(f"<th class=num>{_esc(c)}</th>" for c in extra)
        + "<th>choices</th><th>train it</th></tr>"
    )
    body = []
    for n in data.front:
        r = rows.loc[n]
        tag = _tag(r)
        ref = f" <small>{_esc(tag)}</small>" if tag else ""
        summary = r["arch_summary"] if isinstance(r["arch_summary"], str) else ""
        if not summary and n in data.archs:
            summary = ", ".join(
                f"{k} x{v}" for k, v in Counter(c.label for _, c in data.archs[n]).items()
            )
        body.append(
            f"<tr><td class=num>{n}{ref}</td><td class=num>{_fmt_acc(r[data.acc])}</td>"
            f"<td class=num>{_fmt_ms(r['latency_ms'])}</td>"
            f"<td class=num>{_fmt_speedup(r['speedup'])}</td>"
            f"<td class=num>{_fmt_count(r['params'])}</td>"
            + "".join(f"<td class=num>{_fmt_metric(c, r[c])}</td>" for c in extra)
            + f"<td>{_esc(summary)}</td><td><code>{_esc(_train_command(data, n))}</code></td></tr>"
        )
    page.add(
        f'<div class="card scroll"><table id="front-table">{head}{"".join(body)}</table></div>'
    )


def _choice_grid(page: _Page, data: _StudyData) -> None:
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
        f'<span><i class="sw" style="background:{c}"></i>{_esc(k)}</span>'
        for k, c in _KIND_COLOURS.items()
    )

    def header(n: int) -> str:
        tag = _tag(rows.loc[n].to_dict())
        ref = f"<br><i>{_esc(tag)}</i>" if tag else ""
        acc, ms = _fmt_acc(rows.loc[n, data.acc]), _fmt_ms(rows.loc[n, "latency_ms"])
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
                f'<td style="background:{_kind_colour(c)};color:{fg}" title="{_esc(c.label)}">'
                f"{_esc(_bits_text(c))}</td>"
            )
        body.append(f"<tr><td class=layer>{_esc(layer)}</td>{''.join(cells)}</tr>")
    page.add(
        f'<div class="card"><div class="legend">{legend}</div><div class="scroll">'
        f'<table class="grid" id="choice-grid">{head}</tr>{"".join(body)}</table></div></div>'
    )


def _scalarization_text(value: Any) -> str | None:
    if isinstance(value, Mapping) and _isnum(value.get("latency_weight")):
        w = value["latency_weight"]
        return f"score = val_acc - {w:g} x latency_ms / all-normal latency_ms"
    return None


def _settings_section(page: _Page, data: _StudyData) -> None:
    a = data.attrs
    dataset = a.get("dataset")
    if dataset is not None and a.get("synthetic"):
        dataset = f"{dataset} (synthetic)"
    model = a.get("latency_model")
    if isinstance(model, Mapping):
        model = ", ".join(f"{k}: {v}" for k, v in model.items())
    t = data.trials
    starts = t["datetime_start"].dropna()
    ends = t["datetime_complete"].dropna()
    n_infeasible = int((t["feasible"] == False).sum())  # noqa: E712
    train = t["train_seconds"].dropna()
    sources = Counter(t["source"].dropna())
    items = [
        ("study", data.name),
        ("storage", data.storage),
        ("objectives", _axes_text(zip(data.objectives, data.maximize, strict=True))),
        ("Pareto front over", _axes_text(data.front_axes) if data.scalarized else None),
        ("scalarization", _scalarization_text(a.get("scalarization"))),
        ("space file", a.get("space_path")),
        ("dataset", dataset),
        ("latency model", model),
        ("latency device", a.get("latency_device")),
        (
            "all-normal latency",
            _fmt_ms(data.reference_latency) if data.reference_latency else None,
        ),
        ("sampler", a.get("sampler")),
        ("trials", _state_counts(data) + (f"; {n_infeasible} infeasible" if n_infeasible else "")),
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
    dl = "".join(f"<dt>{_esc(k)}</dt><dd>{_esc(v)}</dd>" for k, v in items if v not in (None, ""))
    page.add(f'<div class="card"><dl class="settings">{dl}</dl></div>')
    space = a.get("space")
    if isinstance(space, Mapping):
        import yaml

        text = yaml.safe_dump(dict(space), sort_keys=False, default_flow_style=None)
        page.add(f"<details><summary>search space</summary><pre>{_esc(text)}</pre></details>")


# ---------------------------------------------------------------------------------------------
# Comparison page
# ---------------------------------------------------------------------------------------------
def _labels(studies: Sequence[_StudyData]) -> list[str]:
    names = [s.name for s in studies]
    if len(set(names)) == len(names):
        return names
    return [f"{s.name} ({_display_dir(s.study_dir)})" for s in studies]


def _comparison_figure(
    studies: Sequence[_StudyData], labels: Sequence[str], x: str
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

        for rows, mode, name, opacity in (
            (rest, "markers", f"{label}: other trials ({len(rest)})", 0.45),
            (front, "lines+markers", f"{label}: front ({len(front)})", 1.0),
        ):
            # Differentiable-search results are stars labelled with their lambda.
            text = [_lambda_text(r) or "" for r in rows.to_dict("records")]
            if any(text):
                mode += "+text"
            traces.append(
                {
                    "type": "scatter",
                    "mode": mode,
                    "name": name,
                    "legendgroup": label,
                    "x": rows[x].tolist(),
                    "y": (100 * rows[s.acc]).tolist(),
                    "hovertext": [f"{_esc(label)}<br>{s.hover[int(n)]}" for n in rows["number"]],
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
    y_range, hidden = _acc_view(accs, front_accs)
    return {
        "data": traces,
        "layout": {
            "height": 540,
            "margin": {"l": 70, "r": 20, "t": 30, "b": 60},
            "xaxis": {"title": {"text": _axis_title(x)}},
            "yaxis": {"title": {"text": "validation accuracy (%)"}, "range": y_range},
            "annotations": _hidden_note(hidden, y_range),
            "legend": {"orientation": "h", "y": -0.15},
            "hoverlabel": {"align": "left"},
        },
    }


def _comparison_page(studies: Sequence[_StudyData]) -> str:
    labels = _labels(studies)
    page = _Page("wasearch: " + " vs ".join(labels))
    page.add(f"<h1>{_esc(' vs '.join(labels))}</h1>")
    page.add(f'<p class="sub">{len(studies)} studies · generated {_now()}</p>')
    head = (
        "<tr><th>study</th><th>trials</th><th class=num>front</th><th class=num>best accuracy"
        "</th><th class=num>all-normal latency</th><th class=num>fastest front</th>"
        "<th class=num>best speed-up (&le; 1 point lost)</th><th>dataset</th>"
        "<th>latency device</th><th>sampler</th></tr>"
    )
    body = []
    for s, label in zip(studies, labels, strict=True):
        comp = s.complete()
        front = s.trials.set_index("number").loc[s.front]
        best_acc = comp[s.acc].max() if len(comp) else None
        near = front[front[s.acc] >= best_acc - 0.01] if best_acc is not None else front
        speed = near["speedup"].dropna()
        body.append(
            f"<tr><td>{_esc(label)}</td><td>{_esc(_state_counts(s))}</td>"
            f"<td class=num>{len(s.front)}</td><td class=num>{_fmt_acc(best_acc)}</td>"
            f"<td class=num>{_fmt_ms(s.reference_latency)}</td>"
            f"<td class=num>{_fmt_ms(front['latency_ms'].min() if len(front) else None)}</td>"
            f"<td class=num>{_fmt_speedup(speed.max() if len(speed) else None)}</td>"
            f"<td>{_esc(s.attrs.get('dataset') or '-')}</td>"
            f"<td>{_esc(s.attrs.get('latency_device') or '-')}</td>"
            f"<td>{_esc(s.attrs.get('sampler') or '-')}</td></tr>"
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
