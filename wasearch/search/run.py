"""``search.py run``: create or resume a study and run trials until the budget is met, in this
process or in a pool of worker processes, and fail over the trials of workers that die.

Storage: SQLite under ``results/<study>/study.db`` by default, any RDB URL (PostgreSQL, MySQL)
with heartbeats so that a dead worker's trial is failed over and retried, or a journal file for
several processes on one machine. Ctrl-C fails the running trial, queues it again and stops, so
that rerunning the command resumes with nothing lost (the retry runs after the trials queued
before it, in Optuna's order). The report is refreshed through ``RunOptions.on_report`` (the CLI
passes the report writer): the search itself never imports the report.
"""

from __future__ import annotations

import copy
import logging
import multiprocessing
import os
import signal
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..cli import UserError
from ..fileio import first_line, refused_writes_as_user_errors, sha256_file
from .base import ensure_base, load_space_data, resolve_device, set_threads
from .failover import fail_over
from .record import TrialEvent, front_trials, tally
from .space import SearchSpace, load_space
from .storage import redact, space_storage, storage_url, study_dir_of
from .study import open_study, prepare, sampler_seed, save_study_files
from .worker import ReportWriter, Worker

if TYPE_CHECKING:
    import optuna

    from ..data import DataSplits

__all__ = ["RunOptions", "RunResult", "pretrain", "run_search"]

logger = logging.getLogger(__name__)

_POLL_S = 2.0  # how often the coordinating process looks at the study


@dataclass
class RunOptions:
    """Options of ``search.py run`` (command-line values override the space's).

    ``on_report(study_dir, storage_url, study)`` refreshes the study's report; the worker calls
    it at most every minute after a trial and once at the end (with ``--workers N``, worker 0
    and the coordinating process do). It must be a module-level function with ``--workers`` > 1
    (it is sent to the worker processes). ``report=False`` (``--no-report``) turns it off.
    """

    storage: str | None = None  # storage URL or journal file; default the space's, then SQLite
    workers: int = 1  # local worker processes
    trials: int | None = None  # completed trials wanted in the whole study
    timeout: float | None = None  # seconds for this invocation
    study_name: str | None = None  # default: the space's name
    device: str = "auto"
    results: str = "results"  # parent folder of study folders
    threads: int | None = None  # torch threads per worker (None: default_threads(workers))
    report: bool = True  # refresh the report after trials (when on_report is given)
    on_report: ReportWriter | None = None  # the report writer (the CLI passes it)


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


def _report_writer(options: RunOptions) -> ReportWriter | None:
    return options.on_report if options.report else None


def _refresh(writer: ReportWriter, study_dir: Path, url: str, study: Any) -> None:
    """Refresh the report; a warning when it fails (a report problem must not stop the search)."""
    try:
        writer(study_dir, url, study)
    except Exception as err:  # noqa: BLE001
        logger.warning("report not written: %s", first_line(err))


def pretrain(space: SearchSpace, options: RunOptions, *, progress: bool = True) -> Path:
    """``search.py pretrain``: only train the shared base (once). A refused write (read-only
    ``--results``, full disk) is one :class:`UserError` line naming the file."""
    study_dir = study_dir_of(space, results=options.results, study_name=options.study_name)
    device = resolve_device(options.device)
    set_threads(options.threads)
    with refused_writes_as_user_errors(flag="--results"):
        study_dir.mkdir(parents=True, exist_ok=True)
        return ensure_base(
            space, study_dir, data=lambda: load_space_data(space), device=device, progress=progress
        )


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
    writer = _report_writer(options)
    device = resolve_device(options.device)
    prep = prepare(
        space, results=options.results, study_name=options.study_name, storage=options.storage
    )
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
        sampler_seed=sampler_seed(space, url, 0),
        latency_model=prep.latency_model,
        reference_latency_ms=prep.reference_latency_ms,
    )
    save_study_files(space, study_dir, url)
    trials = study.get_trials(deepcopy=False)
    counts = tally(trials)
    if created:
        logger.info(
            "created study %s in %s (%d reference architectures queued)",
            study_name,
            redact(url),
            counts.waiting,
        )
    else:
        logger.info(
            "resuming study %s: %d/%d trials done, %d failed, %d queued",
            study_name,
            counts.done,
            target,
            counts.failed,
            counts.waiting,
        )
    if counts.done >= target:
        front = [t.number for t in front_trials(trials, study.user_attrs.get("objectives", []))]
        return RunResult(
            study_name,
            study_dir,
            url,
            "already-finished",
            counts.done,
            target,
            counts.failed,
            front,
            f"study {study_name} is finished: {counts.done}/{target} trials done; pass "
            f"--trials N (N > {counts.done}) to continue it",
        )
    data_cache: list[DataSplits] = []

    def data() -> DataSplits:
        if not data_cache:
            data_cache.append(load_space_data(space))
        return data_cache[0]

    n = set_threads(options.threads)
    if options.workers == 1 or not (study_dir / "base" / "done.json").is_file():
        logger.info(
            "%d torch thread(s)%s",
            n,
            "" if options.threads else " (from the idle cores; --threads to change)",
        )
    base = ensure_base(space, study_dir, data=data, device=device, progress=progress)
    sha = sha256_file(base)
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
            report=(lambda: _refresh(writer, study_dir, url, study)) if writer else None,
        )
    if options.workers == 1:
        worker = Worker(
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
            report=writer,
        )
        if on_progress is not None:
            on_progress(counts.done, target)
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
    counts = tally(trials)
    front = [t.number for t in front_trials(trials, study.user_attrs.get("objectives", []))]
    message = status
    if status.startswith("finished"):
        message = f"study {study_name} finished: {counts.done}/{target} trials done"
        if counts.done < target:  # the worker's reason: the space has no untried architecture
            message += "; " + status.partition(": ")[2]
    elif status == "timeout":
        message = f"time limit reached: {counts.done}/{target} trials done; rerun to continue"
    elif status == "interrupted":
        message = (
            f"interrupted: {counts.done}/{target} trials done; rerun the same command to resume"
        )
    return RunResult(
        study_name,
        study_dir,
        url,
        status.split(":")[0],
        counts.done,
        target,
        counts.failed,
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
                on_progress(tally(study.get_trials(deepcopy=False)).done, target)
            for p in procs:
                p.join(timeout=_POLL_S / len(procs))
        if on_progress is not None:
            on_progress(tally(study.get_trials(deepcopy=False)).done, target)
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
            fail_over(study, space)  # trials of workers that were killed
            bad = [f"worker {i}: exit {c}" for i, c in enumerate(codes) if c not in (0, 130)]
            logger.warning("%s", "; ".join(bad))
            if tally(study.get_trials(deepcopy=False)).done < target:
                status = "stopped: " + "; ".join(bad)
        elif deadline is not None and time.monotonic() >= deadline:
            status = "timeout"
    writer = _report_writer(options)
    if writer is not None:
        study_dir = study_dir_of(space, results=options.results, study_name=study_name)
        _refresh(writer, study_dir, url, study)
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
    prep = prepare(
        space, results=options.results, study_name=options.study_name, storage=options.storage
    )
    set_threads(options.threads, options.workers)
    storage = space_storage(prep.url, space)
    study, _ = open_study(
        space,
        storage,
        study_name=study_name,
        sampler_seed=sampler_seed(space, prep.url, index),
        latency_model=prep.latency_model,
        reference_latency_ms=prep.reference_latency_ms,
    )
    worker = Worker(
        space,
        study,
        prep.study_dir,
        storage=prep.url,
        target=target,
        data=load_space_data(space),
        base=prep.study_dir / "base" / "best.pt",
        latency_model=prep.latency_model,
        reference_latency_ms=prep.reference_latency_ms,
        device=resolve_device(options.device),
        index=index,
        on_event=on_event,
        report=_report_writer(options) if index == 0 else None,
    )
    deadline = time.monotonic() + options.timeout if options.timeout else None
    status = worker.run(deadline=deadline)
    if status.startswith("stopped"):
        logger.warning("%s", status)
