"""One worker: runs trials of one study in this process, the Optuna objective included.

Every trial builds the sampled ``Arch``, initializes it from the shared base (conv kernels have
the same shape in every mode; new Winograd-domain quantizer ranges are warmed up) and fine-tunes
it for the space's few trial epochs: the adaptation shortcut. What it records goes through
:mod:`.record`. Faults: a diverging or raising trial is recorded FAIL with a ``fail_reason`` and
the search goes on; Ctrl-C fails the running trial, queues it again and stops; a write the
machine refuses (a full disk, a read-only folder or database) does the same and stops with one
:class:`~wasearch.cli.UserError` line naming the file or the storage.
"""

from __future__ import annotations

import logging
import math
import signal
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..cli import UserError
from ..fileio import RefusedWrite, atomic_write_text, first_line, refused_write, user_message
from . import record
from ._lock import worker_id
from .base import trial_config
from .failover import fail_over
from .record import TrialEvent
from .storage import RetryFailedOver, redact

if TYPE_CHECKING:
    import optuna

    from ..data import DataSplits
    from .space import SearchSpace

__all__ = ["REPORT_EVERY_S", "ReportWriter", "Worker", "ignore_sigint"]

logger = logging.getLogger(__name__)

_POLL_S = 2.0  # how often an idle worker looks at the study again
_MAX_SKIPS = 50  # consecutive skipped proposals (duplicates, infeasible) before giving up
_UNTRIED_EVERY = 3  # queue an untried architecture after this many duplicates in a row
_MAX_FAILURES = 5  # consecutive failed trials before a worker stops
REPORT_EVERY_S = 60.0  # at most one report refresh per worker this often (plus the last)

#: ``report(study_dir, storage_url, study)``: refreshes the study's report (the CLI passes the
#: report writer; the search itself does not import the report).
ReportWriter = Callable[[Path, str, Any], None]


def ignore_sigint() -> None:
    """Ignore a second Ctrl-C while the bookkeeping of the first finishes."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)


class _Skip(Exception):
    """A proposal not worth training (a duplicate, an infeasible candidate, over budget)."""


class Worker:
    """Runs trials of one study in this process.

    ``report`` refreshes the report: called at most every :data:`REPORT_EVERY_S` after a trial
    and once when the worker ends; its failures are logged, never raised.
    """

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
        report: ReportWriter | None,
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
        self._last: optuna.Trial | None = None  # the last trial asked for
        self.refused: RefusedWrite | None = None  # the machine refused a write: stop
        self._started = 0.0
        self._last_report = 0.0

    # -- the objective --------------------------------------------------------------------------
    def objective(self, trial: optuna.Trial) -> float | list[float]:
        import optuna

        self.current = trial.number
        self._last = trial
        self._started = time.perf_counter()
        _set_attrs(trial, record.start_attrs("optuna"))
        try:
            return self._evaluate(trial)
        except _Skip as skip:
            _set_attrs(trial, record.skipped_attrs(str(skip)))
            raise optuna.TrialPruned(str(skip)) from None
        except optuna.TrialPruned:
            raise
        except KeyboardInterrupt:
            ignore_sigint()  # let the bookkeeping finish
            _set_attrs(trial, record.fail_attrs(_INTERRUPTED))
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
                reason = f"diverged: {first_line(err)}"
            else:
                reason = f"{type(err).__name__}: {first_line(err)}"
            # The reason first: writing the traceback may fail as well (the disk may be full).
            _set_attrs(trial, record.fail_attrs(reason), quiet=True)
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

        from ..engine import count_params, fit, selection_split
        from ..models import build

        space = self.space
        self._check_budget(trial)
        params = {u.name: trial.suggest_categorical(u.name, u.labels) for u in space.units}
        enqueued = "reference" in trial.user_attrs or "retry_of" in trial.user_attrs
        if not enqueued:
            self._check_duplicate(trial, params)
        arch = space.arch(params, num_classes=self.data.num_classes)
        model = build(arch)
        attrs = _set_attrs(trial, record.arch_attrs(arch, params=count_params(model)))
        priced = self.latency_model.price(arch) if self.latency_model is not None else None
        limit = space.constraints["latency_ms"]
        attrs.update(_set_attrs(trial, record.latency_attrs(priced, limit_ms=limit)))
        latency_ms = attrs.get("latency_ms")
        if limit is not None:
            value = record.latency_constraint(latency_ms, limit)
            trial.set_constraint(record.LATENCY_CONSTRAINT, value)
        if not attrs["feasible"] and space.constraints["prune_infeasible"] and not enqueued:
            raise _Skip(f"infeasible: latency {latency_ms:.3f} ms > {limit:g} ms")

        config = trial_config(space)
        pruning = not space.multi_objective and space.strategy["pruner"] != "none"
        history: list[dict[str, float]] = []

        def on_epoch(row: dict[str, float]) -> None:
            history.append(dict(row))
            if not pruning:
                return
            value = record.score(space, row["val_acc"], latency_ms, self.reference_latency_ms)
            trial.report(value, step=int(row["epoch"]))
            if trial.should_prune():
                n_val = len(selection_split(self.data))
                pruned = record.pruned_attrs(
                    int(row["epoch"]), row["val_acc"], history, val_images=n_val
                )
                _set_attrs(trial, pruned)
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
        fitted = record.fit_attrs(
            result.best_val_acc,
            seconds=result.seconds,
            history=history,
            val_images=result.val_images,
        )
        attrs.update(_set_attrs(trial, fitted))
        out = record.objective_values(space, attrs, reference_ms=self.reference_latency_ms)
        return out[0] if len(out) == 1 else out

    def _check_budget(self, trial: optuna.Trial) -> None:
        """Two workers that ask at the same moment must not both run the last trial."""
        from optuna.trial import TrialState

        ahead = 0
        for t in self.study.get_trials(deepcopy=False):
            if t.number >= trial.number:
                continue
            if record.is_done(t) or (
                t.state == TrialState.RUNNING and "skipped" not in t.user_attrs
            ):
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

    def _queue_untried(self, after: int) -> bool:
        """Queue one architecture no trial has run or is running, picked at random (seeded by
        the space's seed and the study's size, so a rerun picks the same); False when the space
        has none left.

        A duplicate is recorded without a value, so a model-based sampler (TPE, GP) learns
        nothing from it and, on a small space, may keep proposing the same few architectures.
        """
        import itertools
        import random

        from optuna.trial import TrialState

        trials = self.study.get_trials(deepcopy=False)
        live = (TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING, TrialState.PRUNED)
        tried = {
            tuple(t.params.get(u.name) for u in self.space.units)
            for t in trials
            if t.state in live and "skipped" not in t.user_attrs
        }
        labels = [u.labels for u in self.space.units]
        size = math.prod(len(x) for x in labels)
        rng = random.Random(f"{self.space.seed}:{len(trials)}")
        if size <= 100_000:
            left = [p for p in itertools.product(*labels) if p not in tried]
            pick = rng.choice(left) if left else None
        else:  # too many to list: random draws find an untried one almost surely
            draws = (tuple(rng.choice(x) for x in labels) for _ in range(1000))
            pick = next((p for p in draws if p not in tried), None)
        if pick is None:
            return False
        params = {u.name: label for u, label in zip(self.space.units, pick, strict=True)}
        self.study.enqueue_trial(params, user_attrs=record.untried_attrs(after))
        logger.info("the sampler repeated itself %d times: queued an untried architecture", after)
        return True

    # -- after each trial ------------------------------------------------------------------------
    def after_trial(self, study: optuna.Study, frozen: optuna.trial.FrozenTrial) -> None:
        try:
            self._after_trial(frozen)
        except Exception:  # noqa: BLE001 - bookkeeping must not stop the search
            logger.warning("after trial %d:", frozen.number, exc_info=True)

    def _after_trial(self, frozen: optuna.trial.FrozenTrial) -> None:
        self.current = None
        trials = self.study.get_trials(deepcopy=False)
        objectives = self.study.user_attrs.get("objectives") or list(self.space.study_objectives)
        front = record.front_trials(trials, objectives)
        keep = {t.number for t in front} | {
            t.number for t in record.front_trials(trials, objectives, feasible_only=False)
        }
        self._prune_checkpoints(trials, keep)
        event = record.trial_event(
            frozen,
            trials,
            front,
            target=self.target,
            seconds=time.perf_counter() - self._started,
            worker=self.index,
        )
        if event.state == "SKIPPED":
            logger.debug("trial %d skipped: %s", frozen.number, event.reason)
            return
        if self.on_event is not None:
            self.on_event(event)
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
        if self.report is None:
            return
        now = time.monotonic()
        if not force and now - self._last_report < REPORT_EVERY_S:
            return
        self._last_report = now
        try:
            self.report(self.study_dir, self.storage, self.study)
        except Exception as err:  # noqa: BLE001 - a report problem must not stop the search
            logger.warning("report not written: %s", first_line(err))

    # -- the loop ------------------------------------------------------------------------------
    def run(self, *, deadline: float | None) -> str:
        """Run trials until the study holds ``target`` done trials; return why it stopped."""
        from optuna.trial import TrialState

        skips = failures = 0
        announced_wait = False
        self.refused = None
        while True:
            fail_over(self.study, self.space, idle=worker_id())
            tally = record.tally(self.study.get_trials(deepcopy=False))
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
                duplicate = str(t.user_attrs["skipped"]).startswith("duplicate")
                if duplicate and skips % _UNTRIED_EVERY == 0 and not self._queue_untried(skips):
                    self._write_report(force=True)
                    return "finished: every architecture of the space has been trained once"
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
        trial, self._last, self.current = self._last, None, None
        if trial is None:
            raise UserError(message)
        number = trial.number
        reason = str(refused) if refused.path else f"storage: {refused}"
        try:
            frozen = _frozen(self.study, number)
            if frozen.state == TrialState.RUNNING:
                _set_attrs(trial, record.fail_attrs(reason))
                frozen = self.study.tell(trial, state=TrialState.FAIL)
        except Exception:  # noqa: BLE001 - the database refuses as well
            raise UserError(
                f"{message} (trial {number} is left RUNNING: the next run fails it over)"
            ) from None
        if frozen.state != TrialState.FAIL:
            raise UserError(message)
        try:
            RetryFailedOver(max_retry=None)(self.study, frozen)
        except Exception:  # noqa: BLE001
            raise UserError(f"{message} (trial {number} failed)") from None
        raise UserError(f"{message} (trial {number} failed and is queued again)")

    def _interrupted(self) -> None:
        """After Ctrl-C: the running trial was failed by Optuna; queue it again."""
        ignore_sigint()
        number = self.current
        if number is None:
            return
        try:
            frozen = _frozen(self.study, number)
            if frozen.state.name != "FAIL":
                return  # it had finished before the interrupt
            RetryFailedOver(max_retry=None)(self.study, frozen)
            self._drop_checkpoints(number)
            if self.on_event is not None:
                trials = self.study.get_trials(deepcopy=False)
                seconds = time.perf_counter() - self._started
                event = record.trial_event(
                    frozen, trials, [], target=self.target, seconds=seconds, worker=self.index
                )
                self.on_event(event)
        except Exception:  # noqa: BLE001 - the database may be gone as well
            logger.warning("could not queue trial %d again", number, exc_info=True)


_INTERRUPTED = "interrupted (Ctrl-C); queued again for the rerun"


def _set_attrs(
    trial: optuna.Trial, attrs: dict[str, Any], *, quiet: bool = False
) -> dict[str, Any]:
    """Record ``attrs`` on the running trial and return them. ``quiet``: a storage that refuses
    (the trial finished meanwhile, the database's disk is full) is not an error."""
    for key, value in attrs.items():
        try:
            trial.set_user_attr(key, value)
        except Exception:  # noqa: BLE001
            if not quiet:
                raise
    return attrs


def _frozen(study: optuna.Study, number: int) -> optuna.trial.FrozenTrial:
    """A deep copy of trial ``number`` as the storage holds it now."""
    import copy

    return copy.deepcopy(next(t for t in study.get_trials(deepcopy=False) if t.number == number))
