"""Reading a study into the report's tables: one row per trial (``trials.csv``), and the Pareto
front with the command that trains each of its architectures (``pareto.csv``).

Studies are opened through :mod:`wasearch.search.storage`, as the search opens them, but nothing is
ever created: a missing SQLite or journal file is a user error, not a new empty study.
"""

from __future__ import annotations

import datetime as _dt
import functools
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..cli import UserError
from ..fileio import first_line, shell_path
from ..stats import indistinguishable, picks, spread, trial_se
from .formatting import hover_text, number

if TYPE_CHECKING:
    import optuna
    import pandas as pd

    from ..arch import LayerChoice


def open_study(
    study_dir: Path, storage: str | None, study_name: str | None
) -> tuple[optuna.Study, str]:
    """Find and load the study of ``study_dir``; return it with its storage's label (the URL
    without its password). User errors raise a one-line :class:`UserError`.

    Opens storages the way the search does (:func:`wasearch.search.storage.open_storage`, so a
    bare ``postgresql://`` URL gets the installed driver), but never creates anything.
    """
    import optuna

    from ..search.storage import default_storage_url, open_storage, redact, sqlite_path

    origin = ""
    if storage is None:
        if not study_dir.is_dir():
            raise UserError(f"{study_dir}: no such study folder")
        url = _folder_url(study_dir)
        if (study_dir / "storage.txt").is_file() and url != default_storage_url(study_dir):
            origin = f" (named in {study_dir / 'storage.txt'})"
        elif not (study_dir / "study.db").is_file():
            raise UserError(
                f"{study_dir}: no study.db in this folder (name another with --storage)"
            )
    else:
        url = storage
    label = redact(url)
    if "://" not in url and not Path(url).expanduser().is_file():
        raise UserError(f"storage {label!r}{origin}: not a database URL and no such journal file")
    db = sqlite_path(url)
    if db is not None and not db.expanduser().is_file():
        raise UserError(f"storage {label}{origin}: no such SQLite file")
    try:
        store = open_storage(url, create=False, heartbeat_interval=None, grace_period=None)
        names = optuna.study.get_all_study_names(storage=store)
    except UserError as err:
        raise UserError(f"{err}{origin}") from None
    except Exception as err:  # noqa: BLE001 - whatever the driver raises, it is the user's URL
        raise UserError(f"cannot open storage {label}{origin}: {first_line(err)}") from None
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


def held_study_label(study_dir: Path, storage: str | None) -> str:
    """The storage label of a study the caller already holds: ``storage`` when given, else the
    folder's own storage when it has one, else ``(given study)``."""
    from ..search.storage import redact

    if storage is not None:
        return redact(storage)
    if (study_dir / "storage.txt").is_file() or (study_dir / "study.db").is_file():
        return redact(_folder_url(study_dir))
    return "(given study)"


def _folder_url(study_dir: Path) -> str:
    """The URL of ``<study_dir>/storage.txt``, else ``sqlite:///<study_dir>/study.db``."""
    from ..search.storage import storage_url

    return storage_url(None, study_dir)


def _name_list(names: Sequence[str]) -> str:
    if not names:
        return "no study"
    shown = ", ".join(repr(n) for n in names[:8])
    return shown + (f" and {len(names) - 8} more" if len(names) > 8 else "")


@functools.lru_cache(maxsize=8192)
def parse_arch(text: str) -> tuple[tuple[str, LayerChoice], ...] | None:
    """Per-layer choices of an ``Arch`` YAML text (cached: a refreshed report parses only the
    new trials); None when it cannot be read."""
    from ..arch import Arch, ArchError, LayerChoice
    from ..fileio import InputFileError, parse_yaml

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


def is_synthetic(attrs: Mapping[str, Any]) -> bool:
    """Whether a study trained on generated images: its ``synthetic`` attribute says so (the
    search records it), or its dataset (the ``dataset`` attribute, or the stored space's) is
    ``synthetic`` (a study from an older wasearch)."""
    if attrs.get("synthetic"):
        return True
    space = attrs.get("space")
    data = space.get("data") if isinstance(space, Mapping) else None
    stored = data.get("dataset") if isinstance(data, Mapping) else None
    return "synthetic" in (attrs.get("dataset"), stored)


@dataclass
class StudyData:
    """What the pages and tables need from one study."""

    name: str
    study_dir: Path
    storage: str  # its label: the URL without its password
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
    tolerance: float = 1.0  # standard errors within which two accuracies are the same
    pick: NoisePick | None = None  # the fastest trial within the tolerance of the best

    @property
    def scalarized(self) -> bool:
        """One objective, ``score`` (docs/study_format.md): fronts over accuracy and latency."""
        return self.objectives == ["score"]

    @property
    def synthetic(self) -> bool:
        return is_synthetic(self.attrs)

    @property
    def dataset(self) -> str | None:
        """The dataset as shown: ``cifar10 (synthetic)`` for generated images of its shape."""
        name = self.attrs.get("dataset")
        if name is not None and self.synthetic and name != "synthetic":
            return f"{name} (synthetic)"
        return name

    def complete(self) -> pd.DataFrame:
        return self.trials[self.trials["state"] == "COMPLETE"]

    @property
    def se(self) -> str:
        """The column of the accuracy's standard error."""
        return f"{self.acc}_se"

    @property
    def se_known(self) -> bool:
        """Whether any completed trial carries a standard error (studies from before
        wasearch recorded ``val_images`` carry none)."""
        return bool(self.complete()[self.se].notna().any())


@dataclass(frozen=True)
class NoisePick:
    """The decision a user reads a report for (:func:`noise_pick`), as trial numbers."""

    number: int  # the pick: the cheapest trial within the tolerance of the best accuracy
    best: int  # the most accurate completed, feasible trial
    within: tuple[int, ...]  # every trial within the tolerance of the best
    cost: str | None  # the column minimized: latency_ms, params, bitops, or None
    tolerance: float
    reference: int | None = None  # the all-normal trial, when the study ran it
    reference_pick: int | None = None  # the cheapest trial within the tolerance of it


def _objective_names(study: optuna.Study) -> list[str]:
    n = len(study.directions)
    names = study.user_attrs.get("objectives") or study.metric_names or []
    names = [str(x) for x in names][:n]
    defaults = ["accuracy", "latency_ms"] + [f"objective_{i}" for i in range(2, n)]
    return names + defaults[len(names) : n]


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


def collect(
    study: optuna.Study, study_dir: Path, storage: str, *, tolerance: float | None = None
) -> StudyData:
    """Read every trial of ``study`` into the trials.csv frame, find the Pareto front, mark
    the front's trials that the noise cannot tell from a faster one and pick the fastest trial
    within ``tolerance`` standard errors of the best (default: the stored space's
    ``report.tolerance``, else 1.0)."""
    import pandas as pd

    from ..search.record import report_tolerance

    objectives = _objective_names(study)
    maximize = [d.name == "MAXIMIZE" for d in study.directions]
    attrs = dict(study.user_attrs)
    if objectives == ["score"]:  # scalarized: the front is over val_acc and latency_ms
        acc, front_axes = "accuracy", [("accuracy", True), ("latency_ms", False)]
    else:
        acc, front_axes = objectives[0], list(zip(objectives, maximize, strict=True))
    synthetic = is_synthetic(attrs)
    trials = study.get_trials(deepcopy=False)

    layers: list[str] = []
    seen: set[str] = set()
    archs: dict[int, tuple[tuple[str, LayerChoice], ...]] = {}
    layer_latency: dict[int, dict[str, float]] = {}
    probabilities: tuple[int, Any] | None = None
    runs: dict[str, list[tuple[int, float | None]]] = {}  # architecture -> its completed trials
    rows = []
    for t in trials:
        ua = t.user_attrs
        arch = parse_arch(ua["arch"]) if isinstance(ua.get("arch"), str) else None
        if arch is not None:
            archs[t.number] = arch
            for name, _ in arch:
                if name not in seen:
                    seen.add(name)
                    layers.append(name)
        lat = ua.get("layer_latency_ms")
        if isinstance(lat, Mapping):
            layer_latency[t.number] = {str(k): v for k, v in lat.items() if number(v) is not None}
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
            "lambda": number(ua.get("lambda")),
            "reference": ua.get("reference"),
            "feasible": _feasible(t),
        }
        for key in (*objectives, acc, "latency_ms", "params", "bitops"):
            if key not in row:
                row[key] = number(ua.get(key))
        if row[acc] is None:
            row[acc] = number(ua.get("val_acc"))
        if t.state.name == "COMPLETE" and t.values is not None:
            for key, value in zip(objectives, t.values, strict=False):
                row[key] = number(value)
        row[f"{acc}_se"] = number(trial_se(ua))
        row["val_images"] = number(ua.get("val_images"))
        if isinstance(ua.get("arch"), str) and t.state.name == "COMPLETE":
            runs.setdefault(ua["arch"], []).append((t.number, row[acc]))
        row.update(
            arch_summary=ua.get("arch_summary"),
            latency_estimated=ua.get("latency_estimated"),
            train_seconds=number(ua.get("train_seconds")),
            fail_reason=first_line(Exception(fail_reason)) if fail_reason else None,
            datetime_start=_iso(t.datetime_start),
            datetime_complete=_iso(t.datetime_complete),
            synthetic=synthetic,
        )
        rows.append((row, arch, layer_latency.get(t.number, {})))

    # The all-normal baseline: the study's record, else the all-normal reference trial.
    ref_trials = [r for r, _, _ in rows if r["reference"] == "all-normal" and r["latency_ms"]]
    reference_latency = number(attrs.get("reference_latency_ms"))
    if reference_latency is None and ref_trials:
        reference_latency = ref_trials[0]["latency_ms"]
    reference_layers = attrs.get("reference_layer_latency_ms")
    if not isinstance(reference_layers, Mapping):
        reference_layers = None
        for r in ref_trials:
            if layer_latency.get(r["number"]):
                reference_layers = layer_latency[r["number"]]
                break

    repeated = {}  # trial -> (runs of its architecture, their spread)
    for same in runs.values():
        for n, _ in same:
            repeated[n] = (len(same), spread([a for _, a in same if a is not None]))
    records = []
    for row, arch, lat in rows:
        row["accuracy_runs"], row["accuracy_spread"] = repeated.get(row["number"], (None, None))
        choices = dict(arch) if arch else {}
        row["speedup"] = (
            reference_latency / row["latency_ms"]
            if reference_latency and row["latency_ms"]
            else None
        )
        for name in layers:
            row[f"choice:{name}"] = choices[name].label if name in choices else None
        for name in layers:
            row[f"latency_ms:{name}"] = number(lat.get(name))
        records.append(row)

    base = ["number", "state", "source", "lambda", "reference", "feasible", "pareto", "pick"]
    metrics = list(dict.fromkeys([*objectives, acc, "latency_ms", "speedup", "params", "bitops"]))
    noise = [f"{acc}_se", "val_images", "accuracy_runs", "accuracy_spread", "within_noise_of"]
    metrics[metrics.index(acc) + 1 : metrics.index(acc) + 1] = noise
    tail = [
        "arch_summary",
        "latency_estimated",
        "train_seconds",
        "fail_reason",
        "datetime_start",
        "datetime_complete",
        "synthetic",
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

    data = StudyData(
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
        tolerance=report_tolerance(attrs.get("space")) if tolerance is None else tolerance,
    )
    on_front = front_numbers(
        frame[frame["state"] == "COMPLETE"],
        [c for c, _ in front_axes],
        [up for _, up in front_axes],
    )
    frame["pareto"] = frame["number"].isin(on_front)
    order = frame[frame["pareto"]].sort_values(["latency_ms", "number"], na_position="last")
    data.front = order["number"].tolist()
    data.pick = noise_pick(data)
    frame["pick"] = frame["number"] == (data.pick.number if data.pick else -1)
    frame["within_noise_of"] = frame["number"].map(within_noise(data)).astype("Int64")
    data.hover = {
        int(r["number"]): hover_text(
            r, acc=acc, scalarized=data.scalarized, arch=archs.get(int(r["number"]))
        )
        for r in frame.to_dict("records")
    }
    return data


def _cost_column(data: StudyData) -> str | None:
    from ..search.record import cost_key

    has_latency = bool(data.complete()["latency_ms"].notna().any())
    return cost_key(data.objectives, has_latency=has_latency)


def noise_pick(data: StudyData) -> NoisePick | None:
    """The report's pick (:func:`wasearch.stats.pick_fastest`): of the completed, feasible
    trials with an accuracy, the cheapest (latency, else the study's size objective) whose
    accuracy is within ``data.tolerance`` standard errors of the best; and the cheapest within
    it of the all-normal reference trial, when the study ran one. None without a candidate."""
    comp = data.complete()
    pool = comp[(comp["feasible"] != False) & comp[data.acc].notna()].sort_values("number")  # noqa: E712
    if pool.empty:
        return None
    cost = _cost_column(data)
    acc = pool[data.acc].tolist()
    se = [number(v) for v in pool[data.se]]
    costs = [number(v) for v in pool[cost]] if cost else [None] * len(pool)
    numbers = [int(n) for n in pool["number"]]
    refs = [i for i, r in enumerate(pool["reference"]) if r == "all-normal"]
    ref = refs[0] if refs else None
    chosen, by_ref = picks(acc, se, costs, tolerance=data.tolerance, reference=ref)
    if chosen is None:
        return None
    ref_pick = numbers[by_ref.index] if by_ref is not None else None
    return NoisePick(
        number=numbers[chosen.index],
        best=numbers[chosen.best],
        within=tuple(numbers[i] for i in chosen.within),
        cost=cost,
        tolerance=data.tolerance,
        reference=numbers[ref] if ref is not None else None,
        reference_pick=ref_pick,
    )


def within_noise(data: StudyData) -> dict[int, int]:
    """Front trial -> the cheapest faster front trial whose accuracy the noise cannot tell from
    its own (within ``data.tolerance`` standard errors, :func:`wasearch.stats.indistinguishable`):
    its extra accuracy is not worth the time. Empty without a cost (latency or size) axis."""
    cost = _cost_column(data)
    if cost is None:
        return {}
    rows = data.trials.set_index("number")
    pts = [
        (n, number(rows.loc[n, cost]), rows.loc[n, data.acc], number(rows.loc[n, data.se]))
        for n in data.front
    ]
    pts = sorted((p for p in pts if p[1] is not None), key=lambda p: (p[1], p[0]))
    out = {}
    for n, c, a, s in pts:
        for m, c2, a2, s2 in pts:  # cheapest first
            if c2 >= c:
                break
            if indistinguishable(a, s, a2, s2, tolerance=data.tolerance):
                out[n] = m
                break
    return out


def front_numbers(rows: Any, axes: Sequence[str], maximize: Sequence[bool]) -> set[int]:
    """The trial numbers of ``rows`` (a trials table) on the Pareto front over ``axes``.

    The search's one front rule (:func:`wasearch.search.record.pareto_front`): only feasible
    rows, none with a missing value, the earliest trial of identical points; empty when no row
    is feasible. So pareto.csv, the page and ``search.py export --pareto`` list the same trials.
    """
    from ..search.record import pareto_front

    rows = rows.sort_values("number")
    feasible = (rows["feasible"] != False).to_numpy()  # noqa: E712 - NaN (no limit) is feasible
    idx = pareto_front(rows[list(axes)].to_numpy(float), list(maximize), feasible=feasible)
    return {int(n) for n in rows["number"].iloc[idx]}


def front_command(data: StudyData, number: int) -> str:
    """The command that trains front trial ``number`` fully, as written: it exports the
    architecture file first, then runs train.py with the study's data settings. Every value
    is quoted for a POSIX shell where it needs it (a folder or study name with a space)."""
    from ..search.record import train_command
    from ..search.storage import redact

    export = f"python search.py export {shell_path(data.study_dir)} --trial {number}"
    if data.name != data.study_dir.resolve().name:
        export += f" --study-name {shlex.quote(data.name)}"
    if data.storage != _folder_url(data.study_dir):
        export += f" --storage {shlex.quote(redact(data.storage))}"
    space = data.attrs.get("space")
    if not isinstance(space, Mapping):  # a study from an older wasearch: its dataset only
        space = {"data": {"dataset": data.attrs.get("dataset", "synthetic")}}
    path = data.study_dir / "pareto" / f"trial_{number}.yaml"
    return f"{export} && {train_command(space, path, data.name, number)}"


def pareto_frame(data: StudyData) -> pd.DataFrame:
    """The pareto.csv table: the front's rows, fastest first, with the command of each."""
    frame = data.trials.set_index("number", drop=False).loc[data.front].reset_index(drop=True)
    commands = [front_command(data, n) for n in data.front]
    frame.insert(frame.columns.get_loc("arch_summary"), "command", commands)
    return frame
