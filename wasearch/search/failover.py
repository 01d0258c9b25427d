"""Failing over the trials of workers that died: FAIL them with a reason and queue them again.

Optuna already does most of it for RDB storages with a heartbeat: ``fail_stale_trials`` (run by
``Study.optimize`` before each trial, and called here too, since an idle worker runs no trial)
fails the trials whose heartbeat is older than the grace period and calls the storage's
``heartbeat_stale_trial_callback``, :class:`~wasearch.search.storage.RetryFailedOver`, which
queues them again without the stale worker's attributes. What Optuna lacks, this module adds:

- the ``fail_reason`` user attribute of a failed-over trial (docs/study_format.md), written
  before the trial is failed, since a finished trial takes no attribute;
- trials of dead workers on this host, found at once from their ``worker`` attribute (no
  heartbeat needed: SQLite and journal files have none), and a trial RUNNING under the calling
  worker's own name while it runs none (its end could not be recorded: the disk was full).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING

from ._lock import holder_dead
from .record import fail_attrs
from .storage import RetryFailedOver

if TYPE_CHECKING:
    import optuna

    from .space import SearchSpace

__all__ = ["fail_over"]

logger = logging.getLogger(__name__)


def fail_over(study: optuna.Study, space: SearchSpace, *, idle: str | None = None) -> int:
    """Fail the running trials of dead workers, queue them again, and return how many.

    A worker on this host whose process is gone is found at once; a worker elsewhere through
    the storage's heartbeat (RDB storages) once its grace period has passed. ``idle`` names
    the calling worker when it runs no trial: a trial still RUNNING under its name is one whose
    end it could not record and is failed over too.
    """
    import optuna
    from optuna.trial import TrialState

    def reason(trial: optuna.trial.FrozenTrial, stale: bool) -> tuple[str, bool] | None:
        holder = trial.user_attrs.get("worker")
        if holder and holder == idle:
            return "its end could not be recorded (a write the machine refused)", True
        if holder and holder_dead(holder):
            return f"worker {holder} died during the trial", True
        if stale:
            grace = space.storage["grace_period"]
            return f"no heartbeat for {grace} s: its worker died or lost the database", False
        return None

    noted = _note_fail_reasons(study, reason)
    retry = RetryFailedOver(max_retry=space.storage["max_retry"])
    count = 0
    for trial in noted["local"]:
        try:
            failed = study.tell(trial.number, state=TrialState.FAIL)
        except (optuna.exceptions.UpdateFinishedTrialError, ValueError):
            continue  # another process finished or failed it first
        count += 1
        reason_text = failed.user_attrs.get("fail_reason")
        logger.warning("trial %d: %s; failed over", trial.number, reason_text)
        retry(study, failed)
    if noted["stale"]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)  # fails them and calls RetryFailedOver
        count += len(noted["stale"])
    return count


def _note_fail_reasons(
    study: optuna.Study,
    reason: Callable[[optuna.trial.FrozenTrial, bool], tuple[str, bool] | None],
) -> dict[str, list[optuna.trial.FrozenTrial]]:
    """Write the ``fail_reason`` that ``reason(trial, stale)`` gives each RUNNING trial it
    names (``stale``: its heartbeat is older than the grace period) and return those trials,
    split into ``local`` ones (``reason`` said True: the caller fails them) and ``stale`` ones
    (Optuna's ``fail_stale_trials`` fails them).

    The one place that uses Optuna's private names, because Optuna has no public way to do
    either: set a user attribute on a trial this process did not ask for (``Study._storage``,
    ``FrozenTrial._trial_id``), and list the trials whose heartbeat is stale without failing
    them (``BaseHeartbeat._get_stale_trial_ids``, ``Study._study_id``; ``fail_stale_trials``
    fails them at once, and a failed trial takes no attribute). Written against Optuna 5.0.
    """
    from optuna.trial import TrialState

    storage = study._storage
    stale_ids: set[int] = set()
    if getattr(storage, "get_heartbeat_interval", lambda: None)() is not None:
        stale_ids = set(storage._get_stale_trial_ids(study._study_id))
    out: dict[str, list[optuna.trial.FrozenTrial]] = {"stale": [], "local": []}
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        named = reason(trial, trial._trial_id in stale_ids)
        if named is None:
            continue
        text, local = named
        try:
            for key, value in fail_attrs(text).items():
                storage.set_trial_user_attr(trial._trial_id, key, value)
        except Exception:  # noqa: BLE001 - finished meanwhile: nothing to fail over
            continue
        out["local" if local else "stale"].append(trial)
    return out
