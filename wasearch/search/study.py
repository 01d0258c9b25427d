"""The search: an Optuna study over a :class:`~wasearch.search.space.SearchSpace`.

Every trial builds the sampled ``Arch``, initializes it from one shared pretrained base (conv
kernels have the same shape in every mode; new Winograd-domain quantizer ranges are warmed up)
and fine-tunes it for the space's few trial epochs: the adaptation shortcut. Validation accuracy
and the latency model's price are the objectives; the study records what
``docs/study_format.md`` lists.

Storage: SQLite under ``results/<study>/study.db`` by default, any RDB URL (PostgreSQL, MySQL)
with heartbeats so that a dead worker's trial is failed over and retried, or a journal file for
several processes on one machine. Faults: a diverging or raising trial is recorded FAIL with a
``fail_reason`` and the search goes on; Ctrl-C fails the running trial, queues it again and
stops, so that rerunning the command resumes with nothing lost (the retry runs after the trials
queued before it, in Optuna's order); a write the machine refuses (a full disk, a read-only
folder or database) does the same and stops with one :class:`~wasearch.cli.UserError` line
naming the file or the storage.
"""

from __future__ import annotations

import copy
import datetime as _dt
import hashlib
import json
import logging
import math
import multiprocessing
import os
import signal
import threading
import time
import traceback
import warnings
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from ..arch import Arch
from ..cli import UserError
from ..fileio import (
    RefusedWrite,
    atomic_write_text,
    refused_write,
    refused_writes_as_user_errors,
    user_message,
)
from ._lock import FileLock, holder_dead, worker_id
from .space import SearchSpace, load_space, parse_space, study_name_problem
from .storage import (
    RetryFailedOver,
    default_storage_url,
    driver_url,
    is_rdb,
    open_storage,
    redact,
    space_storage,
    storage_url,
)

if TYPE_CHECKING:
    import optuna

    from ..data import DataSplits

__all__ = [
    "RunOptions",
    "RunResult",
    "TrialEvent",
    "RetryFailedOver",
    "bitops",
    "driver_url",
    "ensure_base",
    "export_trials",
    "front_trials",
    "open_storage",
    "open_study",
    "pretrain",
    "run_search",
    "trial_config",
    "storage_url",
    "study_dir_of",
]

logger = logging.getLogger(__name__)

_POLL_S = 2.0  # how often an idle worker looks at the study again
_MAX_SKIPS = 50  # consecutive skipped proposals (duplicates, infeasible) before giving up
_MAX_FAILURES = 5  # consecutive failed trials before a worker stops
_REPORT_EVERY_S = 60.0  # at most one report refresh per worker this often (plus the last)
_SPACE_SECTIONS = ("seed", "model", "data", "base", "trial", "choices", "objectives", "latency")


@dataclass
class RunOptions:
    """Options of ``search.py run`` (command-line values override the space's)."""

    storage: str | None = None  # storage URL or journal file; default the space's, then SQLite
    workers: int = 1  # local worker processes
    trials: int | None = None  # completed trials wanted in the whole study
    timeout: float | None = None  # seconds for this invocation
    study_name: str | None = None  # default: the space's name
    device: str = "auto"
    results: str = "results"  # parent folder of study folders
    threads: int | None = None  # torch threads per worker (None: default_threads(workers))
    report: bool = True  # refresh results/<study>/report.html after trials


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


@dataclass
class RunResult:
    study_name: str
    study_dir: Path
    storage: str
    status: str  # finished | already-finished | timeout | stopped | interrupted
    done: int
    target: int
    failed: int
    front: list[int] = field(default_factory=list)
    message: str = ""


# ---------------------------------------------------------------------------------------------
# Paths and storages


def study_dir_of(
    space: SearchSpace, *, results: str | os.PathLike = "results", study_name: str | None = None
) -> Path:
    """``results/<study>``. A ``study_name`` (``--study-name``) obeys the rule of the space's
    ``name:`` (:func:`~wasearch.search.space.study_name_problem`), so the folder is always one
    level inside ``results``: no ``../x``, no ``a/b``."""
    if study_name is not None:
        problem = study_name_problem(study_name)
        if problem is not None:
            raise UserError(f"--study-name: {problem}")
    return Path(results) / (study_name or space.name)


# ---------------------------------------------------------------------------------------------
# Samplers and the study


class LatencyConstraint:
    """``constraints_func``: latency_ms - limit (<= 0 is feasible)."""

    def __init__(self, limit_ms: float) -> None:
        self.limit_ms = limit_ms

    def __call__(self, trial: optuna.trial.FrozenTrial) -> Sequence[float]:
        latency = trial.user_attrs.get("latency_ms")
        if latency is None or not math.isfinite(latency):
            return [1e9]
        return [float(latency) - self.limit_ms]


def make_sampler(space: SearchSpace, *, seed: int | None) -> optuna.samplers.BaseSampler:
    import optuna

    st = space.strategy
    limit = space.constraints["latency_ms"]
    constraints = LatencyConstraint(limit) if limit is not None else None
    name = st["name"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if name == "nsga2":
            return optuna.samplers.NSGAIISampler(
                population_size=st["population_size"], seed=seed, constraints_func=constraints
            )
        if name == "tpe":
            return optuna.samplers.TPESampler(
                n_startup_trials=st["n_startup_trials"], seed=seed, constraints_func=constraints
            )
        if name == "gp":
            return optuna.samplers.GPSampler(
                n_startup_trials=st["n_startup_trials"], seed=seed, constraints_func=constraints
            )
        return optuna.samplers.RandomSampler(seed=seed)


def make_pruner(space: SearchSpace) -> optuna.pruners.BasePruner:
    import optuna

    if space.multi_objective or space.strategy["pruner"] == "none":
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(
        n_startup_trials=max(1, space.strategy["n_startup_trials"]), n_warmup_steps=0
    )


def _sampler_seed(space: SearchSpace, url: str, index: int) -> int:
    """Reproducible on one machine; distinct for each process sharing a remote database."""
    if is_rdb(url) and not url.startswith("sqlite"):
        return (space.seed * 1_000_003 + zlib.crc32(worker_id().encode())) % 2**31
    return space.seed + index


def open_study(
    space: SearchSpace,
    storage: optuna.storages.BaseStorage,
    *,
    study_name: str,
    sampler_seed: int | None,
    latency_model: Any = None,
    reference_latency_ms: float | None = None,
) -> tuple[optuna.Study, bool]:
    """Create the study (attributes, references queued) or load it and check it matches."""
    import optuna

    sampler = make_sampler(space, seed=sampler_seed)
    pruner = make_pruner(space)
    try:
        study = optuna.create_study(
            storage=storage,
            study_name=study_name,
            directions=space.directions,
            sampler=sampler,
            pruner=pruner,
        )
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(
            study_name=study_name, storage=storage, sampler=sampler, pruner=pruner
        )
        _check_same_space(study, space)
        return study, False
    # optuna-dashboard and Study.trials_dataframe() show these instead of "Objective 0/1".
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(list(space.study_objectives))
    attrs = {
        "objectives": list(space.study_objectives),
        "space_path": space.path,
        "space": space.raw,
        "dataset": space.data["dataset"],
        "synthetic": space.data["dataset"] == "synthetic",
        "latency_model": space.latency or None,
        "latency_device": latency_model.describe() if latency_model is not None else None,
        "sampler": space.strategy["name"],
        "created": _dt.datetime.now().isoformat(timespec="seconds"),
        "reference_latency_ms": reference_latency_ms,
        "constraints": {k: v for k, v in space.constraints.items() if v is not None},
        "scalarization": space.strategy["scalarize"],
        "space_units": {u.name: list(u.layers) for u in space.units},
    }
    for key, value in attrs.items():
        study.set_user_attr(key, value)
    for name, params in space.references():
        study.enqueue_trial(params, user_attrs={"reference": name})
    return study, True


def _check_same_space(study: optuna.Study, space: SearchSpace) -> None:
    have = [d.name.lower() for d in study.directions]
    if have != space.directions:
        raise UserError(
            f"{space.path}: study {study.study_name!r} optimizes {have} but the space asks for "
            f"{space.directions}; give it another name (name: or --study-name)"
        )
    stored = None
    for _ in range(20):  # a study created a moment ago by another worker gets its attrs soon
        stored = study.user_attrs.get("space")
        if stored is not None:
            break
        time.sleep(0.5)
    if stored is None:
        return
    try:
        before = parse_space(stored, source="the stored space")
    except UserError:
        return  # e.g. a latency table that moved: nothing to compare against
    for key in _SPACE_SECTIONS:
        old = getattr(before, key)
        new = getattr(space, key)
        if old != new:
            raise UserError(
                f"{space.path}: {key}: differs from the space study {study.study_name!r} was "
                f"created with ({_short(old)} before, {_short(new)} now); rerun with the old "
                "space, or start a new study (another name: or --study-name)"
            )
    if [(u.name, u.labels) for u in before.units] != [(u.name, u.labels) for u in space.units]:
        raise UserError(
            f"{space.path}: choices: the searched units or options differ from the study's; "
            "start a new study (another name: or --study-name)"
        )


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


# ---------------------------------------------------------------------------------------------
# Trial bookkeeping


def _is_done(trial: optuna.trial.FrozenTrial) -> bool:
    """Counts toward the budget: completed, or stopped by the pruner (not skipped)."""
    from optuna.trial import TrialState

    if trial.state == TrialState.COMPLETE:
        return True
    return trial.state == TrialState.PRUNED and "pruned_epoch" in trial.user_attrs


@dataclass
class _Tally:
    done: int = 0
    running: int = 0
    waiting: int = 0
    failed: int = 0


def _tally(trials: Sequence[optuna.trial.FrozenTrial]) -> _Tally:
    from optuna.trial import TrialState

    t = _Tally()
    for tr in trials:
        if _is_done(tr):
            t.done += 1
        elif tr.state == TrialState.RUNNING:
            t.running += 1
        elif tr.state == TrialState.WAITING:
            t.waiting += 1
        elif tr.state == TrialState.FAIL:
            t.failed += 1
    return t


_FRONT_KEYS = {"accuracy": "val_acc", "latency_ms": "latency_ms", "params": "params",
               "bitops": "bitops"}  # fmt: skip


def _front_axes(objectives: Sequence[str]) -> list[tuple[str, bool]]:
    """(user attribute, maximize) of the axes the Pareto front is taken over."""
    names = ["accuracy", "latency_ms"] if list(objectives) == ["score"] else list(objectives)
    return [(_FRONT_KEYS[n], n == "accuracy") for n in names if n in _FRONT_KEYS]


def front_trials(
    trials: Sequence[optuna.trial.FrozenTrial],
    objectives: Sequence[str],
    *,
    feasible_only: bool = True,
) -> list[optuna.trial.FrozenTrial]:
    """Completed trials on the Pareto front of the objectives (over accuracy and latency when
    the study is scalarized). With ``feasible_only``, only trials that meet the constraints
    compete, as long as there is one."""
    from optuna.trial import TrialState

    axes = _front_axes(objectives)
    pool = [
        t
        for t in trials
        if t.state == TrialState.COMPLETE
        and all(isinstance(t.user_attrs.get(k), int | float) for k, _ in axes)
    ]
    if feasible_only and any(t.user_attrs.get("feasible") is False for t in pool):
        feasible = [t for t in pool if t.user_attrs.get("feasible") is not False]
        pool = feasible or pool

    def vec(t: optuna.trial.FrozenTrial) -> list[float]:
        return [float(t.user_attrs[k]) * (-1 if mx else 1) for k, mx in axes]  # minimize all

    vecs = [vec(t) for t in pool]
    front = []
    for i, t in enumerate(pool):
        dominated = any(
            all(a <= b for a, b in zip(vecs[j], vecs[i], strict=True)) and vecs[j] != vecs[i]
            for j in range(len(pool))
            if j != i
        )
        # Among identical points keep the earliest trial only.
        first_equal = all(vecs[j] != vecs[i] for j in range(i))
        if not dominated and first_equal:
            front.append(t)
    return front


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


def _first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0]


def _set(study: optuna.Study, trial_id: int, key: str, value: Any) -> None:
    try:
        study._storage.set_trial_user_attr(trial_id, key, value)
    except Exception:  # noqa: BLE001 - finished meanwhile: nothing to record any more
        pass


def _fail_over(study: optuna.Study, space: SearchSpace, *, idle: str | None = None) -> int:
    """Fail the running trials of dead workers and queue them again; return how many.

    A worker on this host whose process is gone is found at once; a worker elsewhere through
    the storage's heartbeat (RDB storages) once its grace period has passed. ``idle`` names
    the calling worker when it runs no trial: a trial still RUNNING under its name is one whose
    end it could not record (the disk was full) and is failed over too.
    """
    import optuna
    from optuna.storages._heartbeat import BaseHeartbeat, is_heartbeat_enabled
    from optuna.trial import TrialState

    storage = study._storage
    retry = RetryFailedOver(max_retry=space.storage["max_retry"])
    count = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        holder = t.user_attrs.get("worker")
        if not holder or not (holder_dead(holder) or holder == idle):
            continue
        reason = (
            "its end could not be recorded (a write the machine refused)"
            if holder == idle
            else f"worker {holder} died during the trial"
        )
        _set(study, t._trial_id, "fail_reason", reason)
        try:
            changed = storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
        if changed:
            count += 1
            logger.warning("trial %d: %s; failed over", t.number, reason)
            retry(study, copy.deepcopy(storage.get_trial(t._trial_id)))
    if isinstance(storage, BaseHeartbeat) and is_heartbeat_enabled(storage):
        stale = storage._get_stale_trial_ids(study._study_id)
        for trial_id in stale:
            _set(
                study,
                trial_id,
                "fail_reason",
                f"no heartbeat for {space.storage['grace_period']} s: its worker died or lost "
                "the database",
            )
        if stale:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(study)
            count += len(stale)
    return count


# ---------------------------------------------------------------------------------------------
# The base


#: ``trial.lr: auto`` is this multiple of the base's last learning rate. Fine-tuning at the
#: rate where the base's schedule ended keeps its accuracy (a 10x larger rate undid 1.2-4
#: points of it and left trials ranking architectures no better than chance; Kendall tau 0.1
#: against 3-epoch training, 0.79 with this rule, on real CIFAR-10: docs/search.md).
AUTO_TRIAL_LR_FACTOR = 5.0


def trial_lr(space: SearchSpace) -> float:
    """The trial's learning rate: ``trial.lr``, or for ``auto`` 5x the base's last one."""
    from ..engine import last_lr

    lr = space.trial["lr"]
    if lr == "auto":
        return AUTO_TRIAL_LR_FACTOR * last_lr(_base_config(space))
    return float(lr)


def _section_config(space: SearchSpace, section: dict, **extra: Any) -> Any:
    """A ``TrainConfig`` from the space's ``base`` or ``trial`` section."""
    from ..engine import TrainConfig

    return TrainConfig(
        epochs=section["epochs"],
        batch_size=space.data["batch_size"],
        lr=section["lr"],
        transform_lr=section["transform_lr"],
        seed=space.seed,
        max_batches_per_epoch=section["max_batches"],
        **extra,
    )


def _base_config(space: SearchSpace) -> Any:
    return _section_config(space, space.base)


def trial_config(space: SearchSpace) -> Any:
    """The training config of one trial: the space's ``trial`` budget."""
    section = {**space.trial, "lr": trial_lr(space)}
    return _section_config(space, section, warmup_batches=space.trial["warmup_batches"])


def load_space_data(space: SearchSpace) -> DataSplits:
    """The dataset a space names (errors as :class:`UserError`/``DataError``)."""
    from ..data import load_dataset

    d = space.data
    try:
        data = load_dataset(
            d["dataset"],
            data_dir=d["data_dir"],
            download=d["download"],
            val_fraction=d["val_fraction"],
            limit_train=d["limit_train"],
            limit_test=d["limit_test"],
            seed=space.seed,
        )
    except ValueError as err:
        raise UserError(f"{space.path}: data: {err}") from None
    if data.image_size != (space.input_size, space.input_size):
        raise UserError(
            f"{space.path}: model.input_size: {space.input_size} but {data.name} images are "
            f"{data.image_size[0]}x{data.image_size[1]}"
        )
    if data.num_classes != space.num_classes:
        raise UserError(
            f"{space.path}: model.num_classes: {space.num_classes} but {data.name} has "
            f"{data.num_classes} classes"
        )
    return data


def ensure_base(
    space: SearchSpace,
    study_dir: Path,
    *,
    data: DataSplits | Callable[[], DataSplits],
    device: str = "auto",
    progress: bool = True,
) -> Path:
    """Train the shared base once (``results/<study>/base/best.pt``) and return its path.

    Several processes may call this at once: a lock file lets one train while the others wait.
    An interrupted base training resumes from its ``last.pt``. ``data`` may be a callable, so
    that waiting for a finished base costs no data loading.

    Base checkpoints may come from another machine (a copied or shared ``results/``), so they
    are read safely: a ``best.pt`` or ``last.pt`` that cannot be (it needs full unpickling, is
    torn, or is not a checkpoint) stops with a :class:`UserError` naming it, and nothing is
    deleted. A ``last.pt`` of another architecture or recipe is moved aside to
    ``base.discarded-<time>/`` (never deleted) and the base is trained again.
    """
    from ..engine import DivergenceError, atomic_write_text, fit
    from ..models import build

    base_dir = study_dir / "base"
    done = base_dir / "done.json"
    if done.is_file():
        return _checked_base(base_dir / "best.pt")

    def waiting(holder: str) -> None:
        logger.info("waiting for %s, which is training the base of %s", holder, study_dir)

    with FileLock(study_dir / "base.lock", on_wait=waiting):
        if done.is_file():
            return _checked_base(base_dir / "best.pt")
        splits = data() if callable(data) else data
        arch = space.base_arch(num_classes=splits.num_classes)
        config = _base_config(space)
        resume = (base_dir / "last.pt").is_file() and _base_resumable(base_dir, arch, config)
        logger.info(
            "%s the base (%s, %d epochs) in %s",
            "resuming" if resume else "training",
            arch.summary(),
            config.epochs,
            base_dir,
        )
        try:
            result = fit(
                build(arch),
                splits,
                config,
                out_dir=base_dir,
                device=device,
                resume=resume,
                progress=progress,
                log=logger.info,
                extra={"study": study_dir.name, "role": "search base"},
            )
        except DivergenceError as err:
            raise UserError(
                f"{space.path}: base: training diverged ({err}); lower base.lr"
            ) from None
        info = {
            "arch": arch.summary(),
            "best_val_acc": result.best_val_acc,
            "best_epoch": result.best_epoch,
            "epochs": config.epochs,
            "seconds": result.seconds,
            "sha256": _sha256(base_dir / "best.pt"),
        }
        atomic_write_text(done, json.dumps(info, indent=1))
        logger.info(
            "base ready: val acc %.4f (epoch %d), %.0f s",
            result.best_val_acc,
            result.best_epoch,
            result.seconds,
        )
    return base_dir / "best.pt"


def _checked_base(best: Path) -> Path:
    """``best`` when it reads as a checkpoint (safely: nothing in it runs); else a UserError."""
    from ..engine import CheckpointError, read_checkpoint

    try:
        read_checkpoint(best)
    except (FileNotFoundError, CheckpointError) as err:
        raise UserError(
            f"{err}; the base is marked done ({best.parent / 'done.json'}), so replace the file "
            f"or move {best.parent} away to train the base again"
        ) from None
    return best


def _base_resumable(base_dir: Path, arch: Arch, config: Any) -> bool:
    """Whether ``base_dir/last.pt`` continues this base; one of another architecture or recipe
    is moved aside (kept, never deleted) and False returned."""
    from ..engine import CheckpointError, read_checkpoint

    last = base_dir / "last.pt"
    try:
        payload = read_checkpoint(last)
    except CheckpointError as err:
        raise UserError(f"{err}; or move {base_dir} away to train the base again") from None
    try:
        same_arch = Arch.from_dict(payload["arch"], str(last)) == arch
    except ValueError:
        same_arch = False
    if (
        same_arch
        and payload.get("config") == config.to_dict()
        and payload.get("epoch", 0) <= config.epochs  # == epochs: done but for done.json
    ):
        return True
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    aside, n = base_dir.with_name(f"base.discarded-{stamp}"), 1
    while aside.exists():
        n += 1
        aside = base_dir.with_name(f"base.discarded-{stamp}-{n}")
    os.replace(base_dir, aside)
    logger.warning(
        "%s was trained with another architecture or recipe than the space's base; moved it "
        "to %s (delete that when you no longer need it) and training the base again",
        last,
        aside,
    )
    return False


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# One worker


def _ignore_sigint() -> None:
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)


class _Skip(Exception):
    """A proposal not worth training (a duplicate, an infeasible candidate, over budget)."""


class _Worker:
    """Runs trials of one study in this process."""

    def __init__(
        self,
        space: SearchSpace,
        study: optuna.Study,
        study_dir: Path,
        *,
        storage: str,
        target: int,
        data: DataSplits,
        base: Path,
        latency_model: Any,
        reference_latency_ms: float | None,
        device: str,
        index: int,
        on_event: Callable[[TrialEvent], None] | None,
        report: bool,
    ) -> None:
        self.space = space
        self.study = study
        self.study_dir = study_dir
        self.storage = storage
        self.target = target
        self.data = data
        self.base = base
        self.latency_model = latency_model
        self.reference_latency_ms = reference_latency_ms
        self.device = device
        self.index = index
        self.on_event = on_event
        self.report = report
        self.current: int | None = None  # number of the running trial
        self._last: tuple[int, int] | None = None  # (number, storage id) of the last trial
        self.refused: RefusedWrite | None = None  # the machine refused a write: stop
        self._started = 0.0
        self._last_report = 0.0

    # -- the objective --------------------------------------------------------------------------
    def objective(self, trial: optuna.Trial) -> float | list[float]:
        import optuna

        self.current = trial.number
        self._last = (trial.number, trial._trial_id)
        self._started = time.perf_counter()
        trial.set_user_attr("worker", worker_id())
        trial.set_user_attr("source", "optuna")
        try:
            return self._evaluate(trial)
        except _Skip as skip:
            trial.set_user_attr("skipped", str(skip))
            raise optuna.TrialPruned(str(skip)) from None
        except optuna.TrialPruned:
            raise
        except KeyboardInterrupt:
            _ignore_sigint()  # let the bookkeeping finish
            trial.set_user_attr("fail_reason", "interrupted (Ctrl-C); queued again for the rerun")
            raise
        except Exception as err:
            from ..engine import DivergenceError

            refused = refused_write(err)
            if refused is not None:
                # A full disk or a read-only folder is not the architecture's fault: free what
                # the trial wrote; once Optuna has recorded the failure, run() queues the trial
                # again and stops with one line.
                self.refused = refused
                self._drop_checkpoints(trial.number)
                reason = str(refused) if refused.path else f"storage: {refused}"
            elif isinstance(err, DivergenceError):
                reason = f"diverged: {_first_line(err)}"
            else:
                reason = f"{type(err).__name__}: {_first_line(err)}"
            # The reason first: writing the traceback may fail as well (the disk may be full).
            _set(self.study, trial._trial_id, "fail_reason", reason[:500])
            if refused is None and not isinstance(err, DivergenceError):
                self._write_traceback(trial.number)
            raise

    def _write_traceback(self, number: int) -> None:
        """``trials/<n>/error.txt``: the traceback of the exception being handled."""
        path = self.study_dir / "trials" / str(number) / "error.txt"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, traceback.format_exc())
        except OSError as err:
            logger.warning("trial %d: could not write %s: %s", number, path, err)

    def _drop_checkpoints(self, number: int) -> None:
        folder = self.study_dir / "trials" / str(number)
        for name in ("last.pt", "best.pt"):
            try:
                (folder / name).unlink(missing_ok=True)
            except OSError:
                pass

    def _evaluate(self, trial: optuna.Trial) -> float | list[float]:
        import optuna

        from ..engine import count_params, fit
        from ..models import build

        space = self.space
        self._check_budget(trial)
        params = {u.name: trial.suggest_categorical(u.name, u.labels) for u in space.units}
        enqueued = "reference" in trial.user_attrs or "retry_of" in trial.user_attrs
        if not enqueued:
            self._check_duplicate(trial, params)
        arch = space.arch(params, num_classes=self.data.num_classes)
        trial.set_user_attr("arch", arch.to_yaml())
        trial.set_user_attr("arch_summary", arch.summary())
        model = build(arch)
        n_params = count_params(model)
        trial.set_user_attr("params", n_params)
        trial.set_user_attr("bitops", bitops(arch))
        latency_ms = None
        if self.latency_model is not None:
            report = self.latency_model.price(arch)
            latency_ms = report.total * 1e3
            trial.set_user_attr("latency_ms", latency_ms)
            trial.set_user_attr("layer_latency_ms", {k: v * 1e3 for k, v in report.layers.items()})
            trial.set_user_attr("latency_estimated", bool(report.any_estimated))
        limit = space.constraints["latency_ms"]
        feasible = latency_ms is None or limit is None or latency_ms <= limit
        trial.set_user_attr("feasible", feasible)
        if not feasible and space.constraints["prune_infeasible"] and not enqueued:
            raise _Skip(f"infeasible: latency {latency_ms:.3f} ms > {limit:g} ms")

        config = trial_config(space)
        pruning = not space.multi_objective and space.strategy["pruner"] != "none"
        history: list[dict[str, float]] = []

        def on_epoch(row: dict[str, float]) -> None:
            history.append(dict(row))
            if not pruning:
                return
            trial.report(self._score(row["val_acc"], latency_ms), step=int(row["epoch"]))
            if trial.should_prune():
                trial.set_user_attr("pruned_epoch", int(row["epoch"]))
                trial.set_user_attr("val_acc", row["val_acc"])
                trial.set_user_attr("history", history)
                raise optuna.TrialPruned(f"pruned after epoch {row['epoch']}")

        trial_dir = self.study_dir / "trials" / str(trial.number)
        result = fit(
            model,
            self.data,
            config,
            out_dir=trial_dir,
            device=self.device,
            init_from=self.base,
            progress=False,
            log=logger.debug,
            extra={"study": self.study.study_name, "trial": trial.number},
            on_epoch=on_epoch,
        )
        val_acc = float(result.best_val_acc)
        trial.set_user_attr("val_acc", val_acc)
        trial.set_user_attr("train_seconds", result.seconds)
        trial.set_user_attr("history", history)
        values = {"accuracy": val_acc, "latency_ms": latency_ms, "params": n_params,
                  "bitops": trial.user_attrs.get("bitops")}  # fmt: skip
        if space.scalarized:
            return self._score(val_acc, latency_ms)
        out = [float(values[o]) for o in space.objectives]
        return out[0] if len(out) == 1 else out

    def _score(self, val_acc: float, latency_ms: float | None) -> float:
        scal = self.space.strategy["scalarize"]
        if scal is None or latency_ms is None or not self.reference_latency_ms:
            return val_acc
        return val_acc - scal["latency_weight"] * latency_ms / self.reference_latency_ms

    def _check_budget(self, trial: optuna.Trial) -> None:
        """Two workers that ask at the same moment must not both run the last trial."""
        from optuna.trial import TrialState

        ahead = 0
        for t in self.study.get_trials(deepcopy=False):
            if t.number >= trial.number:
                continue
            if _is_done(t) or (t.state == TrialState.RUNNING and "skipped" not in t.user_attrs):
                ahead += 1
        if ahead >= self.target:
            raise _Skip("the budget is reached by trials already running")

    def _check_duplicate(self, trial: optuna.Trial, params: Mapping[str, str]) -> None:
        from optuna.trial import TrialState

        for t in self.study.get_trials(deepcopy=False):
            if t.number == trial.number or t.params != params or "skipped" in t.user_attrs:
                continue
            if t.state == TrialState.COMPLETE or (
                t.state == TrialState.RUNNING and t.number < trial.number
            ):
                raise _Skip(f"duplicate of trial {t.number}")

    # -- after each trial ------------------------------------------------------------------------
    def after_trial(self, study: optuna.Study, frozen: optuna.trial.FrozenTrial) -> None:
        try:
            self._after_trial(frozen)
        except Exception:  # noqa: BLE001 - bookkeeping must not stop the search
            logger.warning("after trial %d:", frozen.number, exc_info=True)

    def _after_trial(self, frozen: optuna.trial.FrozenTrial) -> None:
        from optuna.trial import TrialState

        self.current = None
        trials = self.study.get_trials(deepcopy=False)
        objectives = self.study.user_attrs.get("objectives") or list(self.space.study_objectives)
        front = front_trials(trials, objectives)
        keep = {t.number for t in front} | {
            t.number for t in front_trials(trials, objectives, feasible_only=False)
        }
        self._prune_checkpoints(trials, keep)
        state = frozen.state.name
        attrs = frozen.user_attrs
        if frozen.state == TrialState.PRUNED and "skipped" in attrs:
            state = "SKIPPED"
        reason = attrs.get("fail_reason") or attrs.get("skipped")
        if frozen.state == TrialState.PRUNED and "pruned_epoch" in attrs:
            reason = f"pruned after epoch {attrs['pruned_epoch']}"
        event = TrialEvent(
            number=frozen.number,
            state=state,
            summary=attrs.get("arch_summary", ""),
            val_acc=attrs.get("val_acc"),
            latency_ms=attrs.get("latency_ms"),
            feasible=attrs.get("feasible"),
            reference=attrs.get("reference"),
            front=len(front),
            done=_tally(trials).done,
            target=self.target,
            seconds=time.perf_counter() - self._started,
            reason=reason,
            worker=self.index,
            on_front=frozen.number in {t.number for t in front},
        )
        if self.on_event is not None and state != "SKIPPED":
            self.on_event(event)
        elif state == "SKIPPED":
            logger.debug("trial %d skipped: %s", frozen.number, reason)
        if state != "SKIPPED":
            self._write_report(force=False)

    def _prune_checkpoints(
        self, trials: Sequence[optuna.trial.FrozenTrial], keep: set[int]
    ) -> None:
        from optuna.trial import TrialState

        for t in trials:
            if t.state in (TrialState.RUNNING, TrialState.WAITING):
                continue
            folder = self.study_dir / "trials" / str(t.number)
            names = ["last.pt"] if t.number in keep else ["last.pt", "best.pt"]
            for name in names:
                try:
                    (folder / name).unlink()
                except FileNotFoundError:
                    pass

    def _write_report(self, *, force: bool) -> None:
        if not self.report:
            return
        now = time.monotonic()
        if not force and now - self._last_report < _REPORT_EVERY_S:
            return
        self._last_report = now
        write_report_quietly(self.study_dir, self.storage, self.study)

    # -- the loop ------------------------------------------------------------------------------
    def run(self, *, deadline: float | None) -> str:
        """Run trials until the study holds ``target`` done trials; return why it stopped."""
        from optuna.trial import TrialState

        skips = failures = 0
        announced_wait = False
        self.refused = None
        while True:
            _fail_over(self.study, self.space, idle=worker_id())
            tally = _tally(self.study.get_trials(deepcopy=False))
            if tally.done >= self.target:
                self._write_report(force=True)
                return "finished"
            if deadline is not None and time.monotonic() >= deadline:
                self._write_report(force=True)
                return "timeout"
            if tally.done + tally.running >= self.target and tally.waiting == 0:
                if not announced_wait:
                    logger.info(
                        "waiting for the %d running trial(s) of other workers", tally.running
                    )
                    announced_wait = True
                time.sleep(_POLL_S)
                continue
            announced_wait = False
            self._last = None
            try:
                self.study.optimize(
                    self.objective,
                    n_trials=1,
                    catch=(Exception,),
                    callbacks=[self.after_trial],
                    gc_after_trial=True,
                )
            except KeyboardInterrupt:
                self._interrupted()
                raise
            except Exception as err:
                # Optuna could not record the trial (the database's disk is full or read-only;
                # it then raises "Should not reach"): say what was refused, in one line.
                refused = refused_write(err)
                if refused is None:
                    raise
                self.refused = self.refused or refused
            if self.refused is not None:
                self._stop_refused(self.refused)
            last = self.study.get_trials(deepcopy=False)
            mine = [t for t in last if t.user_attrs.get("worker") == worker_id()]
            if not mine:
                continue
            t = max(mine, key=lambda x: x.number)
            if t.state == TrialState.PRUNED and "skipped" in t.user_attrs:
                skips += 1
                if skips >= _MAX_SKIPS:
                    return "stopped: the sampler keeps proposing architectures already tried"
                continue
            skips = 0
            if t.state == TrialState.FAIL:
                failures += 1
                if failures >= _MAX_FAILURES:
                    return (
                        f"stopped: {failures} trials failed in a row (last: trial {t.number}, "
                        f"{t.user_attrs.get('fail_reason', '?')})"
                    )
            else:
                failures = 0

    def _stop_refused(self, refused: RefusedWrite) -> None:
        """After a refused write: make sure the trial is FAIL with the reason (Optuna could not
        record it when the database shares the full disk: try again now that the trial's files
        are gone), queue it again, and raise one :class:`UserError` line."""
        from optuna.trial import TrialState

        message = user_message(refused, storage=redact(self.storage), flag="--results")
        last, self._last, self.current = self._last, None, None
        if last is None:
            raise UserError(message)
        number, trial_id = last
        storage = self.study._storage
        reason = str(refused) if refused.path else f"storage: {refused}"
        try:
            frozen = storage.get_trial(trial_id)
            if frozen.state == TrialState.RUNNING:
                storage.set_trial_user_attr(trial_id, "fail_reason", reason[:500])
                storage.set_trial_state_values(trial_id, state=TrialState.FAIL)
                frozen = storage.get_trial(trial_id)
        except Exception:  # noqa: BLE001 - the database refuses as well
            raise UserError(
                f"{message} (trial {number} is left RUNNING: the next run fails it over)"
            ) from None
        if frozen.state != TrialState.FAIL:
            raise UserError(message)
        try:
            RetryFailedOver(max_retry=None)(self.study, copy.deepcopy(frozen))
        except Exception:  # noqa: BLE001
            raise UserError(f"{message} (trial {number} failed)") from None
        raise UserError(f"{message} (trial {number} failed and is queued again)")

    def _interrupted(self) -> None:
        """After Ctrl-C: the running trial was failed by Optuna; queue it again."""
        _ignore_sigint()
        number = self.current
        if number is None:
            return
        try:
            frozen = next(t for t in self.study.get_trials(deepcopy=False) if t.number == number)
            if frozen.state.name != "FAIL":
                return  # it had finished before the interrupt
            RetryFailedOver(max_retry=None)(self.study, copy.deepcopy(frozen))
            self._drop_checkpoints(number)
            if self.on_event is not None:
                self.on_event(
                    TrialEvent(
                        number=number,
                        state="FAIL",
                        summary=frozen.user_attrs.get("arch_summary", ""),
                        val_acc=None,
                        latency_ms=frozen.user_attrs.get("latency_ms"),
                        feasible=frozen.user_attrs.get("feasible"),
                        reference=frozen.user_attrs.get("reference"),
                        front=0,
                        done=_tally(self.study.get_trials(deepcopy=False)).done,
                        target=self.target,
                        seconds=time.perf_counter() - self._started,
                        reason="interrupted (Ctrl-C); queued again for the rerun",
                        worker=self.index,
                    )
                )
        except Exception:  # noqa: BLE001 - the database may be gone as well
            logger.warning("could not queue trial %d again", number, exc_info=True)


def write_report_quietly(study_dir: Path, storage: str, study: optuna.Study | None) -> None:
    """Refresh ``report.html``; a warning when it fails."""
    from ..report import write_report

    try:
        write_report(
            study_dir, storage=storage, study_name=study.study_name if study else None, study=study
        )
    except Exception as err:  # noqa: BLE001 - a report problem must not stop the search
        logger.warning("report not written: %s", _first_line(err))


# ---------------------------------------------------------------------------------------------
# Entry points


@dataclass
class _Prepared:
    space: SearchSpace
    study_dir: Path
    url: str
    latency_model: Any
    reference_latency_ms: float | None


def _prepare(space: SearchSpace, options: RunOptions) -> _Prepared:
    study_dir = study_dir_of(space, results=options.results, study_name=options.study_name)
    url = storage_url(space, study_dir, options.storage)
    latency_model, ref_ms = None, None
    if space.latency:
        latency_model, ref_ms = _latency(space)
    return _Prepared(space, study_dir, url, latency_model, ref_ms)


def _latency(space: SearchSpace) -> tuple[Any, float]:
    """The latency model and the all-normal architecture's latency (ms); errors name the key."""
    from ..latency import load_latency_model

    try:
        model = load_latency_model(dict(space.latency))
        ref = Arch.uniform(
            "normal",
            None,
            space.base["bits"],
            backbone=space.model["backbone"],
            width=space.model["width"],
            num_classes=space.num_classes,
            input_size=space.input_size,
        )
        ms = model.price(ref).total * 1e3
        for unit in space.units:  # price every option once: missing table rows show up now
            for option in unit.options:
                for layer in unit.layers:
                    spec = next(s for s in space.specs if s.name == layer)
                    model.layer_cost(spec, option)
    except UserError as err:
        msg = str(err)
        raise UserError(msg if msg.startswith(space.path) else f"{space.path}: {msg}") from None
    except (ValueError, KeyError, FileNotFoundError) as err:
        raise UserError(f"{space.path}: latency: {_first_line(err)}") from None
    return model, ms


def _save_study_files(space: SearchSpace, study_dir: Path, url: str) -> None:
    study_dir.mkdir(parents=True, exist_ok=True)
    if not (study_dir / "space.yaml").is_file():
        atomic_write_text(study_dir / "space.yaml", yaml.safe_dump(space.raw, sort_keys=False))
    default = default_storage_url(study_dir)
    if url != default and redact(url) == url and not (study_dir / "storage.txt").is_file():
        atomic_write_text(study_dir / "storage.txt", url + "\n")


def pretrain(space: SearchSpace, options: RunOptions, *, progress: bool = True) -> Path:
    """``search.py pretrain``: only train the shared base (once). A refused write (read-only
    ``--results``, full disk) is one :class:`UserError` line naming the file."""
    study_dir = study_dir_of(space, results=options.results, study_name=options.study_name)
    device = _device(options.device)
    _set_threads(options.threads)
    with refused_writes_as_user_errors(flag="--results"):
        study_dir.mkdir(parents=True, exist_ok=True)
        return ensure_base(
            space, study_dir, data=lambda: load_space_data(space), device=device, progress=progress
        )


def _device(requested: str) -> str:
    from ..engine import select_device

    try:
        return str(select_device(requested))
    except (ValueError, RuntimeError) as err:
        raise UserError(f"--device: {err}") from None


def default_threads(workers: int = 1) -> int:
    """Torch threads per worker: the cores not busy with other work (one-minute load average),
    shared among the workers, at least one. Intra-op threads that compete with other processes
    for the same cores wait on each other; on a busy 2-core machine one thread per process is
    several times faster than two."""
    cores = os.cpu_count() or 1
    try:
        busy = os.getloadavg()[0]
    except OSError:
        busy = 0.0
    free = max(1, cores - int(round(busy)))
    return max(1, free // max(1, workers))


def _set_threads(threads: int | None, workers: int = 1) -> int:
    import torch

    n = threads or default_threads(workers)
    torch.set_num_threads(n)
    return n


def run_search(
    space: SearchSpace,
    options: RunOptions,
    *,
    on_event: Callable[[TrialEvent], None] | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    progress: bool = True,
) -> RunResult:
    """``search.py run``: create or resume the study and run trials until the budget is met.

    ``on_event`` sees every finished trial (in worker processes too: it must then be a
    module-level function); ``on_progress(done, target)`` is called by the coordinating process.
    A write the machine refuses (a read-only ``--results``, a full disk, a read-only database)
    raises one :class:`UserError` line naming the file or the storage; a trial it cut short is
    recorded FAIL with its ``fail_reason`` and queued again for the rerun.
    """
    study_dir = study_dir_of(space, results=options.results, study_name=options.study_name)
    label = redact(storage_url(space, study_dir, options.storage))
    with refused_writes_as_user_errors(storage=label, flag="--results"):
        return _run_search(
            space, options, on_event=on_event, on_progress=on_progress, progress=progress
        )


def _run_search(
    space: SearchSpace,
    options: RunOptions,
    *,
    on_event: Callable[[TrialEvent], None] | None,
    on_progress: Callable[[int, int], None] | None,
    progress: bool,
) -> RunResult:
    if options.workers < 1:
        raise UserError(f"--workers {options.workers} must be >= 1")
    device = _device(options.device)
    prep = _prepare(space, options)
    study_dir, url = prep.study_dir, prep.url
    target = options.trials if options.trials is not None else space.budget["trials"]
    differentiable = space.strategy["name"] == "differentiable"
    if differentiable:
        if options.workers != 1:
            raise UserError("--workers: the differentiable strategy runs in one process")
        from .differentiable import DIFFERENTIABLE_DEFAULTS

        lambdas = space.strategy["lambdas"] or DIFFERENTIABLE_DEFAULTS["lambdas"]
        if options.trials is None:  # one point per lambda, then the reference architectures
            target = len(lambdas) + len(space.references())
    timeout = options.timeout if options.timeout is not None else space.budget["timeout"]
    deadline = time.monotonic() + timeout if timeout else None
    storage = space_storage(url, space)
    study_name = options.study_name or space.name
    for note in space.notes:
        logger.info("%s: %s", space.path, note)
    study, created = open_study(
        space,
        storage,
        study_name=study_name,
        sampler_seed=_sampler_seed(space, url, 0),
        latency_model=prep.latency_model,
        reference_latency_ms=prep.reference_latency_ms,
    )
    _save_study_files(space, study_dir, url)
    trials = study.get_trials(deepcopy=False)
    tally = _tally(trials)
    if created:
        logger.info(
            "created study %s in %s (%d reference architectures queued)",
            study_name,
            redact(url),
            tally.waiting,
        )
    else:
        logger.info(
            "resuming study %s: %d/%d trials done, %d failed, %d queued",
            study_name,
            tally.done,
            target,
            tally.failed,
            tally.waiting,
        )
    if tally.done >= target:
        front = [t.number for t in front_trials(trials, study.user_attrs.get("objectives", []))]
        return RunResult(
            study_name,
            study_dir,
            url,
            "already-finished",
            tally.done,
            target,
            tally.failed,
            front,
            f"study {study_name} is finished: {tally.done}/{target} trials done; pass "
            f"--trials N (N > {tally.done}) to continue it",
        )
    data_cache: list[DataSplits] = []

    def data() -> DataSplits:
        if not data_cache:
            data_cache.append(load_space_data(space))
        return data_cache[0]

    n = _set_threads(options.threads)
    if options.workers == 1 or not (study_dir / "base" / "done.json").is_file():
        logger.info(
            "%d torch thread(s)%s",
            n,
            "" if options.threads else " (from the idle cores; --threads to change)",
        )
    base = ensure_base(space, study_dir, data=data, device=device, progress=progress)
    sha = _sha256(base)
    known = study.user_attrs.get("base_sha256")
    if known is None:
        study.set_user_attr("base_sha256", sha)
    elif known != sha:
        logger.warning(
            "this machine's base %s differs from the one the study started with; share "
            "results/%s/base/ between machines (or run pretrain on one and copy it)",
            base,
            study_name,
        )

    if differentiable:
        from .differentiable import run_sweep

        run_sweep(
            space,
            study,
            study_dir,
            data=data(),
            base=base,
            latency_model=prep.latency_model,
            device=device,
            on_event=on_event,
            report=(lambda: write_report_quietly(study_dir, url, study))
            if options.report
            else None,
        )
    if options.workers == 1:
        worker = _Worker(
            space,
            study,
            study_dir,
            storage=url,
            target=target,
            data=data(),
            base=base,
            latency_model=prep.latency_model,
            reference_latency_ms=prep.reference_latency_ms,
            device=device,
            index=0,
            on_event=on_event,
            report=options.report,
        )
        if on_progress is not None:
            on_progress(tally.done, target)
        handler = signal.getsignal(signal.SIGINT)
        try:
            status = worker.run(deadline=deadline)
        except KeyboardInterrupt:
            status = "interrupted"
        finally:
            if threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGINT, handler)  # the worker ignores a second Ctrl-C
    else:
        status = _run_pool(
            space, options, study, url, target, deadline, on_event, on_progress, study_name
        )
    trials = study.get_trials(deepcopy=False)
    tally = _tally(trials)
    front = [t.number for t in front_trials(trials, study.user_attrs.get("objectives", []))]
    message = status
    if status == "finished":
        message = f"study {study_name} finished: {tally.done}/{target} trials done"
    elif status == "timeout":
        message = f"time limit reached: {tally.done}/{target} trials done; rerun to continue"
    elif status == "interrupted":
        message = (
            f"interrupted: {tally.done}/{target} trials done; rerun the same command to resume"
        )
    return RunResult(
        study_name,
        study_dir,
        url,
        status.split(":")[0],
        tally.done,
        target,
        tally.failed,
        front,
        message,
    )


def _run_pool(
    space: SearchSpace,
    options: RunOptions,
    study: optuna.Study,
    url: str,
    target: int,
    deadline: float | None,
    on_event: Callable[[TrialEvent], None] | None,
    on_progress: Callable[[int, int], None] | None,
    study_name: str,
) -> str:
    """Start ``options.workers`` processes and follow the study until they end."""
    ctx = multiprocessing.get_context("spawn")
    remaining = None if deadline is None else max(1.0, deadline - time.monotonic())
    procs = []
    for i in range(options.workers):
        opts = copy.copy(options)
        opts.timeout = remaining
        p = ctx.Process(
            target=_worker_main,
            args=(space.path, opts, i, target, on_event, study_name),
            name=f"wasearch-worker-{i}",
        )
        p.start()
        procs.append(p)
    status = "finished"
    try:
        while any(p.is_alive() for p in procs):
            if on_progress is not None:
                on_progress(_tally(study.get_trials(deepcopy=False)).done, target)
            for p in procs:
                p.join(timeout=_POLL_S / len(procs))
        if on_progress is not None:
            on_progress(_tally(study.get_trials(deepcopy=False)).done, target)
    except KeyboardInterrupt:
        status = "interrupted"
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        for p in procs:
            if p.is_alive() and p.pid is not None:
                os.kill(p.pid, signal.SIGINT)
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.terminate()
    codes = [p.exitcode for p in procs]
    if status != "interrupted":
        if any(c == 130 for c in codes):
            status = "interrupted"
        elif any(c not in (0, 130) for c in codes):
            _fail_over(study, space)  # trials of workers that were killed
            bad = [f"worker {i}: exit {c}" for i, c in enumerate(codes) if c not in (0, 130)]
            logger.warning("%s", "; ".join(bad))
            if _tally(study.get_trials(deepcopy=False)).done < target:
                status = "stopped: " + "; ".join(bad)
        elif deadline is not None and time.monotonic() >= deadline:
            status = "timeout"
    write_report_quietly(
        study_dir_of(space, results=options.results, study_name=study_name), url, study
    )
    return status


def _worker_main(
    space_path: str,
    options: RunOptions,
    index: int,
    target: int,
    on_event: Callable[[TrialEvent], None] | None,
    study_name: str,
) -> None:
    """A worker process of ``--workers N``."""
    import sys

    import optuna

    logging.basicConfig(level=logging.INFO, format=f"[w{index}] %(message)s")
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore", module="optuna")
    try:
        with refused_writes_as_user_errors(flag="--results"):
            _worker_body(space_path, options, index, target, on_event, study_name)
    except KeyboardInterrupt:
        sys.exit(130)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def _worker_body(
    space_path: str,
    options: RunOptions,
    index: int,
    target: int,
    on_event: Callable[[TrialEvent], None] | None,
    study_name: str,
) -> None:
    space = load_space(space_path)
    prep = _prepare(space, options)
    _set_threads(options.threads, options.workers)
    storage = space_storage(prep.url, space)
    study, _ = open_study(
        space,
        storage,
        study_name=study_name,
        sampler_seed=_sampler_seed(space, prep.url, index),
        latency_model=prep.latency_model,
        reference_latency_ms=prep.reference_latency_ms,
    )
    worker = _Worker(
        space,
        study,
        prep.study_dir,
        storage=prep.url,
        target=target,
        data=load_space_data(space),
        base=prep.study_dir / "base" / "best.pt",
        latency_model=prep.latency_model,
        reference_latency_ms=prep.reference_latency_ms,
        device=_device(options.device),
        index=index,
        on_event=on_event,
        report=options.report and index == 0,
    )
    deadline = time.monotonic() + options.timeout if options.timeout else None
    status = worker.run(deadline=deadline)
    if status.startswith("stopped"):
        logger.warning("%s", status)


# ---------------------------------------------------------------------------------------------
# Export


@dataclass(frozen=True)
class ExportedArch:
    number: int
    path: Path
    arch: Arch
    val_acc: float | None
    latency_ms: float | None
    checkpoint: Path | None
    commands: tuple[str, ...]


def load_study_for(
    study_dir: Path, *, storage: str | None = None, study_name: str | None = None
) -> tuple[optuna.Study, str]:
    """Open the study of a results folder (its SQLite file, its storage.txt, or ``storage``)."""
    import optuna

    if not study_dir.is_dir():
        raise UserError(f"{study_dir}: no such study folder")
    url = storage_url(None, study_dir, storage)
    if url.startswith("sqlite:///") and not Path(url[len("sqlite:///") :]).is_file():
        raise UserError(
            f"{study_dir}: no study.db in this folder (name its storage with --storage)"
        )
    store = open_storage(url, heartbeat_interval=None, grace_period=None, create=False)
    name = study_name or study_dir.resolve().name
    try:
        return optuna.load_study(study_name=name, storage=store), url
    except KeyError:
        names = optuna.study.get_all_study_names(storage=store)
        raise UserError(
            f"no study named {name!r} in {redact(url)} (it holds {', '.join(names) or 'none'}); "
            "pick one with --study-name"
        ) from None


def export_trials(
    study_dir: str | os.PathLike,
    *,
    trial: int | None = None,
    storage: str | None = None,
    study_name: str | None = None,
) -> list[ExportedArch]:
    """Write ``results/<study>/pareto/trial_<n>.yaml`` for one trial or (``trial=None``) the front.

    :class:`UserError` (one line) for a study without wasearch trials (one that plain Optuna
    made: no trial has an ``arch`` attribute) and for a folder it cannot write.
    """
    from optuna.trial import TrialState

    study_dir = Path(study_dir)
    study, url = load_study_for(study_dir, storage=storage, study_name=study_name)
    trials = study.get_trials(deepcopy=False)
    if not any("arch" in t.user_attrs for t in trials) and "space" not in study.user_attrs:
        raise UserError(
            f"study {study.study_name!r} in {redact(url)} has no wasearch trials (no trial has "
            "an 'arch' attribute): it was not made by search.py run; nothing to export"
        )
    if trial is not None:
        chosen = [t for t in trials if t.number == trial]
        if not chosen:
            raise UserError(f"--trial {trial}: the study has trials 0..{len(trials) - 1}")
        if "arch" not in chosen[0].user_attrs:
            raise UserError(f"--trial {trial}: it has no architecture ({chosen[0].state.name})")
        if chosen[0].state != TrialState.COMPLETE:
            logger.warning("trial %d is %s, not COMPLETE", trial, chosen[0].state.name)
    else:
        with_arch = [t for t in trials if "arch" in t.user_attrs]
        chosen = front_trials(with_arch, study.user_attrs.get("objectives") or [])
        if not chosen:
            raise UserError(f"{study_dir}: no completed trial yet; nothing to export")
    space = study.user_attrs.get("space") or {}
    out_dir = study_dir / "pareto"
    with refused_writes_as_user_errors():
        out_dir.mkdir(parents=True, exist_ok=True)
    exported = []
    for t in sorted(chosen, key=lambda x: x.number):
        arch = Arch.from_yaml(t.user_attrs["arch"], f"trial {t.number}")
        path = out_dir / f"trial_{t.number}.yaml"
        acc, lat = t.user_attrs.get("val_acc"), t.user_attrs.get("latency_ms")
        header = [
            f"# study {study.study_name}, trial {t.number} ({t.state.name})"
            + (f", reference {t.user_attrs['reference']}" if "reference" in t.user_attrs else ""),
            f"# {arch.summary()}",
            "# val acc "
            + (f"{acc:.4f}" if isinstance(acc, float) else "?")
            + " after the search's fine-tuning; latency "
            + (f"{lat:.3f} ms" if isinstance(lat, float) else "?"),
        ]
        with refused_writes_as_user_errors():
            atomic_write_text(path, "\n".join(header) + "\n" + arch.to_yaml())
        ckpt = study_dir / "trials" / str(t.number) / "best.pt"
        commands = _train_commands(space, path, study.study_name, t.number, ckpt)
        exported.append(
            ExportedArch(
                t.number, path, arch, acc, lat, ckpt if ckpt.is_file() else None, commands
            )
        )
    return exported


def train_command(space: Mapping[str, Any], path: Path, study: str, number: int) -> str:
    """The train.py command line that trains trial ``number``'s architecture file ``path``
    fully, on the study's data (``space`` is the study's ``space`` attribute)."""
    return _train_commands(space, path, study, number)[0]


def _train_commands(
    space: Mapping[str, Any], path: Path, study: str, number: int, ckpt: Path | None = None
) -> tuple[str, ...]:
    """train.py command lines: full training from scratch, and fine-tuning the search's
    checkpoint when it was kept."""
    data = {**(space.get("data") or {})}
    export = space.get("export") or {}
    epochs = export.get("epochs", 120)
    flags = [f"--arch {_display(path)}", f"--dataset {data.get('dataset', 'synthetic')}"]
    if data.get("data_dir"):
        flags.append(f"--data-dir {data['data_dir']}")
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
                f"--modelDir {_display(ckpt.parent)} --run-name {study}_trial_{number}_finetune"
            )
    return tuple(out)


def _display(path: Path) -> str:
    try:
        return path.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return path.resolve().as_posix()
