"""The trial record: what a study holds about one trial, built in one place.

The Optuna worker (:mod:`.worker`), the differentiable sweep (:mod:`.differentiable`), export
(:mod:`.export`) and the report all read and write trials through these functions, so that the
contract of ``docs/study_format.md`` has one home: the user attributes of a trial (the ``*_attrs``
builders), its objective values, the tally of trial states, bit-operations, the Pareto front and
the ``train.py`` commands printed for a trial.
"""

from __future__ import annotations

import math
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..cli import UserError
from ..fileio import shell_path
from ..stats import DEFAULT_TOLERANCE, binomial_se, picks, trial_se
from ._lock import worker_id
from .base import trial_lr
from .space import SearchSpace, parse_space

if TYPE_CHECKING:
    import optuna

    from ..arch import Arch

__all__ = [
    "FRONT_KEYS",
    "NoisePick",
    "Tally",
    "TrialEvent",
    "arch_attrs",
    "bitops",
    "cost_key",
    "differentiable_attrs",
    "fail_attrs",
    "fit_attrs",
    "front_axes",
    "front_trials",
    "is_done",
    "latency_attrs",
    "noise_attrs",
    "noise_pick",
    "objective_values",
    "pareto_front",
    "pruned_attrs",
    "reference_attrs",
    "report_tolerance",
    "retry_attrs",
    "score",
    "skipped_attrs",
    "start_attrs",
    "tally",
    "train_command",
    "train_commands",
    "trial_event",
]

#: The longest ``fail_reason`` kept (one line; the traceback goes to ``trials/<n>/error.txt``).
MAX_REASON = 500


# ---------------------------------------------------------------------------------------------
# Trial user attributes (docs/study_format.md, "Trial user attributes")


def start_attrs(source: str) -> dict[str, Any]:
    """Set when a trial starts: who runs it (``host:pid``) and which search made it."""
    return {"worker": worker_id(), "source": source}


def reference_attrs(name: str) -> dict[str, Any]:
    """A reference architecture queued when the study is created (``all-normal``, ...)."""
    return {"reference": name}


def arch_attrs(arch: Arch, *, params: int) -> dict[str, Any]:
    """The architecture and what it costs without a latency model."""
    return {
        "arch": arch.to_yaml(),
        "arch_summary": arch.summary(),
        "params": int(params),
        "bitops": bitops(arch),
    }


def latency_attrs(priced: Any, *, limit_ms: float | None) -> dict[str, Any]:
    """The latency model's price (a ``LatencyReport``, or None without a latency model) and
    whether it meets the space's latency constraint (no model or no limit: feasible)."""
    if priced is None:
        return {"feasible": True}
    latency_ms = priced.total * 1e3
    return {
        "latency_ms": latency_ms,
        "layer_latency_ms": {k: v * 1e3 for k, v in priced.layers.items()},
        "latency_estimated": bool(priced.any_estimated),
        "feasible": limit_ms is None or latency_ms <= limit_ms,
    }


def noise_attrs(val_acc: float, val_images: int | None) -> dict[str, Any]:
    """The noise of ``val_acc``: the number of validation images it was measured on and its
    binomial standard error (:func:`wasearch.stats.binomial_se`); nothing when ``val_images``
    is unknown."""
    se = binomial_se(val_acc, val_images)
    if se is None:
        return {}
    return {"val_images": int(val_images), "val_se": se}


def fit_attrs(
    val_acc: float,
    *,
    seconds: float,
    history: list[dict[str, float]],
    val_images: int | None = None,
) -> dict:
    """What the trial's fine-tuning measured: the best epoch's validation accuracy, and with
    ``val_images`` its standard error (:func:`noise_attrs`)."""
    return {
        "val_acc": float(val_acc),
        **noise_attrs(val_acc, val_images),
        "train_seconds": seconds,
        "history": history,
    }


def pruned_attrs(
    epoch: int, val_acc: float, history: list[dict[str, float]], *, val_images: int | None = None
) -> dict:
    """A trial the MedianPruner stopped (it counts as done)."""
    return {
        "pruned_epoch": int(epoch),
        "val_acc": float(val_acc),
        **noise_attrs(val_acc, val_images),
        "history": history,
    }


#: The name of the latency constraint as Optuna stores it (``FrozenTrial.constraints``).
LATENCY_CONSTRAINT = "latency_ms"


def latency_constraint(latency_ms: float | None, limit_ms: float) -> float:
    """The constraint value Optuna's samplers see: ``latency - limit`` (<= 0 is feasible); an
    unpriced trial is far outside (1e9)."""
    if latency_ms is None or not math.isfinite(latency_ms):
        return 1e9
    return float(latency_ms) - float(limit_ms)


def untried_attrs(after: int) -> dict[str, Any]:
    """An untried architecture queued because the sampler proposed ``after`` duplicates in a
    row (a model-based sampler on a small space learns nothing from a duplicate: it has no
    value)."""
    return {"untried_after_duplicates": int(after)}


def skipped_attrs(reason: str) -> dict[str, Any]:
    """A proposal not trained (a duplicate, infeasible, over budget): PRUNED, not done."""
    return {"skipped": reason}


def fail_attrs(reason: str) -> dict[str, Any]:
    """Why a trial failed, one line."""
    return {"fail_reason": reason[:MAX_REASON]}


def retry_attrs(failed: optuna.trial.FrozenTrial) -> dict[str, Any]:
    """A queued retry of ``failed``: its number and reference name, nothing of its worker."""
    attrs: dict[str, Any] = {"retry_of": failed.number}
    if "reference" in failed.user_attrs:
        attrs["reference"] = failed.user_attrs["reference"]
    return attrs


def differentiable_attrs(
    *, lam: float, supernet_seconds: float, probabilities: list[dict], checkpoint: Path
) -> dict[str, Any]:
    """What a point of the differentiable sweep adds to an ordinary trial."""
    return {
        "lambda": float(lam),
        "supernet_seconds": supernet_seconds,
        "probabilities": probabilities,
        "checkpoint": str(checkpoint),
    }


# ---------------------------------------------------------------------------------------------
# Objective values


def score(
    space: SearchSpace, val_acc: float, latency_ms: float | None, reference_ms: float | None
) -> float:
    """The scalarized value ``val_acc - w * latency_ms / reference_ms`` (``strategy.scalarize``);
    plain accuracy when the space does not scalarize or a latency is unknown."""
    scal = space.strategy["scalarize"]
    if scal is None or latency_ms is None or not reference_ms:
        return float(val_acc)
    return float(val_acc) - scal["latency_weight"] * latency_ms / reference_ms


def objective_values(
    space: SearchSpace, attrs: Mapping[str, Any], *, reference_ms: float | None
) -> list[float]:
    """The study's values of a finished trial from its user attributes, in the space's
    ``objectives`` order (one ``score`` when scalarized)."""
    if space.scalarized:
        return [score(space, attrs["val_acc"], attrs.get("latency_ms"), reference_ms)]
    return [float(attrs[FRONT_KEYS[o]]) for o in space.objectives]


# ---------------------------------------------------------------------------------------------
# Counting trials


def is_done(trial: optuna.trial.FrozenTrial) -> bool:
    """Counts toward the budget: completed, or stopped by the pruner (not skipped)."""
    from optuna.trial import TrialState

    if trial.state == TrialState.COMPLETE:
        return True
    return trial.state == TrialState.PRUNED and "pruned_epoch" in trial.user_attrs


@dataclass
class Tally:
    done: int = 0
    running: int = 0
    waiting: int = 0
    failed: int = 0


def tally(trials: Sequence[optuna.trial.FrozenTrial]) -> Tally:
    """How many trials are done (:func:`is_done`), running, queued and failed."""
    from optuna.trial import TrialState

    t = Tally()
    for tr in trials:
        if is_done(tr):
            t.done += 1
        elif tr.state == TrialState.RUNNING:
            t.running += 1
        elif tr.state == TrialState.WAITING:
            t.waiting += 1
        elif tr.state == TrialState.FAIL:
            t.failed += 1
    return t


def bitops(arch: Arch) -> int:
    """Bit-operations of the searchable convolutions: multiplications x weight bits x activation
    bits (32 for floating point). A Winograd layer multiplies ``(m + 2)^2`` values per tile and
    channel pair instead of ``9 m^2``."""
    from ..winograd import tile_counts

    total = 0
    for spec, (_, c) in zip(arch.specs(), arch.layers, strict=True):
        bits = c.bits if c.bits is not None else 32
        pairs = spec.in_channels * spec.out_channels
        if c.conv == "normal":
            mults = spec.height * spec.width * pairs * 9
        else:
            th, tw = tile_counts(spec.height, spec.width, c.tile)
            mults = th * tw * (c.tile + 2) ** 2 * pairs
        total += mults * bits * bits
    return total


# ---------------------------------------------------------------------------------------------
# The Pareto front

#: Objective name -> the trial user attribute that holds it.
FRONT_KEYS = {"accuracy": "val_acc", "latency_ms": "latency_ms", "params": "params",
              "bitops": "bitops"}  # fmt: skip


def front_axes(objectives: Sequence[str]) -> list[tuple[str, bool]]:
    """(user attribute, maximize) of the axes the Pareto front is taken over: the objectives,
    or accuracy and latency when the study is scalarized (``["score"]``)."""
    names = ["accuracy", "latency_ms"] if list(objectives) == ["score"] else list(objectives)
    return [(FRONT_KEYS[n], n == "accuracy") for n in names if n in FRONT_KEYS]


def pareto_front(
    values: Sequence[Sequence[float]],
    maximize: Sequence[bool],
    feasible: Sequence[bool] | None = None,
) -> list[int]:
    """Indices (ascending) of the rows of ``values`` on the Pareto front.

    ``values[i]`` is one point (one number per axis), ``maximize[j]`` says whether axis ``j`` is
    better larger. The rules, the same wherever wasearch draws or exports a front:

    - Only feasible rows compete (``feasible[i]`` truthy; all rows when ``feasible`` is None).
      When no row is feasible the front is empty: a constrained search shows no trade-off that
      breaks its constraints (Optuna's ``Study.best_trials`` does the same).
    - A row with a missing or non-finite value is never on the front.
    - Row ``a`` dominates row ``b`` when it is no worse on every axis and better on one.
    - Ties: of rows with identical values, only the first (lowest index) is on the front, so a
      front lists each trade-off once. Pass rows in trial-number order to keep the earliest trial.
    """
    sign = [-1.0 if mx else 1.0 for mx in maximize]  # minimize every axis
    points: list[tuple[tuple[float, ...], int]] = []
    for i, row in enumerate(values):
        if feasible is not None and not feasible[i]:
            continue
        try:
            vec = tuple(s * float(v) for s, v in zip(sign, row, strict=True))
        except (TypeError, ValueError):
            continue
        if all(math.isfinite(v) for v in vec):
            points.append((vec, i))
    # In lexicographic order a point can only be dominated by (or equal to) points before it,
    # and whatever dominates it is dominated by, or is, a point already on the front.
    points.sort()
    front: list[tuple[float, ...]] = []
    keep: list[int] = []
    for vec, i in points:
        if any(all(a <= b for a, b in zip(f, vec, strict=True)) for f in front):
            continue  # dominated, or equal to an earlier row
        front.append(vec)
        keep.append(i)
    return sorted(keep)


def front_trials(
    trials: Sequence[optuna.trial.FrozenTrial],
    objectives: Sequence[str],
    *,
    feasible_only: bool = True,
) -> list[optuna.trial.FrozenTrial]:
    """The completed trials on the Pareto front of ``objectives`` (the study's ``objectives``
    attribute), by :func:`pareto_front`'s rules over the trials' user attributes (accuracy and
    latency when scalarized). A trial is feasible unless its ``feasible`` attribute is False;
    ``feasible_only=False`` lets every trial compete. In trial-number order."""
    from optuna.trial import TrialState

    axes = front_axes(objectives)
    pool = sorted(
        (
            t
            for t in trials
            if t.state == TrialState.COMPLETE
            and all(isinstance(t.user_attrs.get(k), int | float) for k, _ in axes)
        ),
        key=lambda t: t.number,
    )
    chosen = pareto_front(
        [[t.user_attrs[k] for k, _ in axes] for t in pool],
        [mx for _, mx in axes],
        [t.user_attrs.get("feasible") is not False for t in pool] if feasible_only else None,
    )
    return [pool[i] for i in chosen]


# ---------------------------------------------------------------------------------------------
# The pick: the fastest architecture the noise cannot tell from the best


def report_tolerance(space: Mapping[str, Any] | None) -> float:
    """``report.tolerance`` of a stored space (the study's ``space`` attribute): how many
    standard errors of a difference two accuracies may be apart and still count as the same
    (:func:`wasearch.stats.indistinguishable`); :data:`~wasearch.stats.DEFAULT_TOLERANCE` (1.0)
    when the space does not set it (or is from an older wasearch)."""
    section = space.get("report") if isinstance(space, Mapping) else None
    value = section.get("tolerance") if isinstance(section, Mapping) else None
    if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
        return float(value)
    return DEFAULT_TOLERANCE


def cost_key(objectives: Sequence[str], *, has_latency: bool) -> str | None:
    """The cost a pick minimizes: latency when the trials are priced, else the study's first
    size objective (``params``, ``bitops``), else None (accuracy alone: the pick is the most
    accurate trial)."""
    if has_latency:
        return "latency_ms"
    return next((o for o in objectives if o in ("params", "bitops")), None)


@dataclass(frozen=True)
class NoisePick:
    """:func:`noise_pick`'s answer, as trials."""

    pick: optuna.trial.FrozenTrial
    best: optuna.trial.FrozenTrial
    within: int  # candidates indistinguishable from the best
    cost: str | None  # the attribute minimized (latency_ms, params, bitops) or None
    tolerance: float
    reference: optuna.trial.FrozenTrial | None = None  # the all-normal trial, when done
    reference_pick: optuna.trial.FrozenTrial | None = None  # the fastest as good as it


def noise_pick(
    trials: Sequence[optuna.trial.FrozenTrial],
    objectives: Sequence[str],
    *,
    tolerance: float = DEFAULT_TOLERANCE,
) -> NoisePick | None:
    """The fastest completed, feasible trial whose accuracy is indistinguishable (within
    ``tolerance`` standard errors, :func:`wasearch.stats.pick_fastest`) from the best one, and
    the fastest that is as good as the all-normal reference trial when the study ran it.
    None when no completed, feasible trial has an accuracy."""
    from optuna.trial import TrialState

    pool = sorted(
        (
            t
            for t in trials
            if t.state == TrialState.COMPLETE
            and t.user_attrs.get("feasible") is not False
            and isinstance(t.user_attrs.get("val_acc"), int | float)
            and math.isfinite(t.user_attrs["val_acc"])
        ),
        key=lambda t: t.number,
    )
    if not pool:
        return None
    has_latency = any(isinstance(t.user_attrs.get("latency_ms"), int | float) for t in pool)
    key = cost_key(objectives, has_latency=has_latency)
    acc = [float(t.user_attrs["val_acc"]) for t in pool]
    se = [trial_se(t.user_attrs) for t in pool]
    cost = [_cost(t.user_attrs, key) for t in pool]
    ref = next((i for i, t in enumerate(pool) if t.user_attrs.get("reference") == "all-normal"),
               None)  # fmt: skip
    chosen, by_ref = picks(acc, se, cost, tolerance=tolerance, reference=ref)
    assert chosen is not None  # every pool member has an accuracy
    ref_pick = pool[by_ref.index] if by_ref is not None else None
    return NoisePick(
        pick=pool[chosen.index],
        best=pool[chosen.best],
        within=len(chosen.within),
        cost=key,
        tolerance=tolerance,
        reference=pool[ref] if ref is not None else None,
        reference_pick=ref_pick,
    )


def _cost(attrs: Mapping[str, Any], key: str | None) -> float | None:
    value = attrs.get(key) if key else None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


# ---------------------------------------------------------------------------------------------
# What a worker says about a finished trial


@dataclass(frozen=True)
class TrialEvent:
    """What a worker says about a finished trial (the CLI prints it)."""

    number: int
    state: str  # COMPLETE | FAIL | PRUNED | SKIPPED
    summary: str  # Arch.summary() or ""
    val_acc: float | None
    latency_ms: float | None
    feasible: bool | None
    reference: str | None
    front: int  # trials on the current front
    done: int  # completed trials in the study
    target: int
    seconds: float
    reason: str | None = None
    worker: int = 0
    on_front: bool = False
    val_se: float | None = None  # the standard error of val_acc (None: unknown)


def trial_event(
    frozen: optuna.trial.FrozenTrial,
    trials: Sequence[optuna.trial.FrozenTrial],
    front: Sequence[optuna.trial.FrozenTrial],
    *,
    target: int,
    seconds: float,
    worker: int = 0,
) -> TrialEvent:
    """The event of ``frozen`` read from its record: a skipped proposal is ``SKIPPED``, a
    point of the differentiable sweep is labelled with its lambda."""
    from optuna.trial import TrialState

    attrs = frozen.user_attrs
    state = frozen.state.name
    if frozen.state == TrialState.PRUNED and "skipped" in attrs:
        state = "SKIPPED"
    reason = attrs.get("fail_reason") or attrs.get("skipped")
    if frozen.state == TrialState.PRUNED and "pruned_epoch" in attrs:
        reason = f"pruned after epoch {attrs['pruned_epoch']}"
    summary = attrs.get("arch_summary", "")
    if attrs.get("source") == "differentiable" and "lambda" in attrs:
        summary = f"[lambda {attrs['lambda']:g}] {summary}"
    return TrialEvent(
        number=frozen.number,
        state=state,
        summary=summary,
        val_acc=attrs.get("val_acc"),
        latency_ms=attrs.get("latency_ms"),
        feasible=attrs.get("feasible"),
        reference=attrs.get("reference"),
        front=len(front),
        done=tally(trials).done,
        target=target,
        seconds=seconds,
        reason=reason,
        worker=worker,
        on_front=frozen.number in {t.number for t in front},
        val_se=trial_se(attrs),
    )


# ---------------------------------------------------------------------------------------------
# The train.py commands of a trial


def train_command(space: Mapping[str, Any], path: Path, study: str, number: int) -> str:
    """The train.py command line that trains trial ``number``'s architecture file ``path``
    fully, on the study's data (``space`` is the study's ``space`` attribute)."""
    return train_commands(space, path, study, number)[0]


def train_commands(
    space: Mapping[str, Any], path: Path, study: str, number: int, ckpt: Path | None = None
) -> tuple[str, ...]:
    """train.py command lines, to be run as written from the current folder: full training
    from scratch, and fine-tuning the search's checkpoint ``ckpt`` when it exists.

    Files the search wrote are shown as :func:`~wasearch.fileio.shell_path` gives them
    (relative when below the current folder, quoted for a POSIX shell); ``data.data_dir`` is
    quoted as the space wrote it (it may start with ``~``, which the shell expands).
    """
    data = {**(space.get("data") or {})}
    export = space.get("export") or {}
    epochs = export.get("epochs", 120)
    flags = [f"--arch {shell_path(path)}", f"--dataset {data.get('dataset', 'synthetic')}"]
    if data.get("data_dir"):
        flags.append(f"--data-dir {shlex.quote(str(data['data_dir']))}")
    if data.get("download"):
        flags.append("--download")
    if data.get("val_fraction") is not None:
        flags.append(f"--val-fraction {data['val_fraction']}")
    for key, flag in (("limit_train", "--limit-train"), ("limit_test", "--limit-test"),
                      ("batch_size", "--batch_size")):  # fmt: skip
        if data.get(key) is not None:
            flags.append(f"{flag} {data[key]}")
    if "seed" in space:
        flags.append(f"--seed {space['seed']}")
    base = " ".join(["python train.py", *flags])
    out = [f"{base} --epochs {epochs} --run-name {study}_trial_{number}"]
    if ckpt is not None and ckpt.is_file():
        try:  # the trial section with its defaults, and lr "auto" resolved as the trials had it
            parsed = parse_space(space, source="the stored space")
            epochs, lr = parsed.trial["epochs"], trial_lr(parsed)
        except UserError:  # a stored space this version no longer reads: its own numbers
            trial = space.get("trial") or {}
            epochs, lr = trial.get("epochs", 1), trial.get("lr")
        if isinstance(lr, (int, float)) and isinstance(epochs, int):
            out.append(
                f"{base} --epochs {max(1, epochs * 5)} --lr {lr:g} "
                f"--modelDir {shell_path(ckpt.parent)} --run-name {study}_trial_{number}_finetune"
            )
    return tuple(out)
