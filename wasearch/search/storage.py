"""Where a study lives: its folder ``results/<study>``, storage URLs and opening an Optuna
storage (RDB with heartbeats, or a journal file), with the retry of failed-over trials that the
storage's heartbeat calls.

Nothing here trains or samples; the worker and the report both open studies through it.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..cli import UserError
from ..fileio import first_line, refused_write, user_message
from .record import retry_attrs

if TYPE_CHECKING:
    import optuna

    from .space import SearchSpace

logger = logging.getLogger(__name__)

__all__ = [
    "RetryFailedOver",
    "default_storage_url",
    "driver_url",
    "is_rdb",
    "open_storage",
    "redact",
    "space_storage",
    "sqlite_path",
    "storage_url",
    "study_dir_of",
]


def study_dir_of(
    space: SearchSpace, *, results: str | os.PathLike = "results", study_name: str | None = None
) -> Path:
    """``results/<study>``. A ``study_name`` (``--study-name``) obeys the rule of the space's
    ``name:`` (:func:`~wasearch.search.space.study_name_problem`), so the folder is always one
    level inside ``results``: no ``../x``, no ``a/b``."""
    from .space import study_name_problem

    if study_name is not None:
        problem = study_name_problem(study_name)
        if problem is not None:
            raise UserError(f"--study-name: {problem}")
    return Path(results) / (study_name or space.name)


def redact(url: str) -> str:
    """A storage URL without its password."""
    return re.sub(r"(//[^:/@]+):[^@/]*@", r"\1:***@", url)


def storage_url(space: SearchSpace | None, study_dir: Path, override: str | None = None) -> str:
    """``--storage``, else the space's ``storage.url``, else the URL a previous run recorded in
    ``results/<study>/storage.txt``, else ``sqlite:///results/<study>/study.db``."""
    if override:
        return override
    if space is not None and space.storage["url"]:
        return space.storage["url"]
    saved = study_dir / "storage.txt"
    if saved.is_file():
        text = saved.read_text().strip()
        if text:
            return text
    return default_storage_url(study_dir)


def default_storage_url(study_dir: Path) -> str:
    """``sqlite:///<study_dir>/study.db``, absolute: where a study lives when nothing else says."""
    return f"sqlite:///{(Path(study_dir) / 'study.db').resolve()}"


def sqlite_path(url: str) -> Path | None:
    """The file of a ``sqlite:///`` URL (None for other URLs and in-memory databases)."""
    if not url.startswith("sqlite:///"):
        return None
    path = url[len("sqlite:///") :].split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


def driver_url(url: str) -> str:
    """``postgresql://`` with the driver that is installed: SQLAlchemy 2.1 picks psycopg 3 for a
    bare ``postgresql://`` URL, while this project's test extra installs psycopg2."""
    import importlib.util

    if url.startswith("postgresql://") or url.startswith("postgres://"):
        rest = url.split("://", 1)[1]
        if importlib.util.find_spec("psycopg") is None and importlib.util.find_spec("psycopg2"):
            return "postgresql+psycopg2://" + rest
        return "postgresql://" + rest
    return url


def is_rdb(url: str) -> bool:
    return "://" in url


def open_storage(
    url: str,
    *,
    heartbeat_interval: int | None = 30,
    grace_period: int | None = 90,
    max_retry: int = 2,
    create: bool = True,
) -> optuna.storages.BaseStorage:
    """An Optuna storage for a URL (RDB, with heartbeats) or a journal file path.

    Raises :class:`UserError` when the database does not answer or the driver is missing.
    """
    import optuna

    if not is_rdb(url):
        path = Path(url).expanduser()
        if not path.is_file() and not create:
            raise UserError(f"storage {url}: no such journal file")
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_file():
            _drop_torn_record(path)
        return optuna.storages.JournalStorage(_journal_backend(path))
    given, url = url, driver_url(url)
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
        engine_kwargs: dict[str, Any] = {"connect_args": {"timeout": 60}}
    else:
        engine_kwargs = {"pool_pre_ping": True}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(
                url,
                engine_kwargs=engine_kwargs,
                heartbeat_interval=heartbeat_interval,
                grace_period=grace_period,
                heartbeat_stale_trial_callback=RetryFailedOver(max_retry=max_retry),
            )
    except ImportError as err:
        raise UserError(
            f"storage {redact(given)}: the database driver is missing ({first_line(err)}); "
            "for PostgreSQL: pip install psycopg2-binary"
        ) from None
    except Exception as err:  # noqa: BLE001 - whatever the driver raises, it is the user's URL
        refused = refused_write(err)  # a full disk, a read-only folder or database
        if refused is not None:
            raise UserError(user_message(refused, storage=redact(given))) from None
        raise UserError(f"cannot open storage {redact(given)}: {first_line(err)}") from None


def _drop_torn_record(path: Path) -> int:
    """Cut a journal file back to its last complete record; return the bytes dropped.

    Optuna appends each record as one line. A write that failed half-way (a full disk, a killed
    process) leaves a last line without its newline; the next record appended would run on from
    it into one unreadable line, and the journal would fail to load (``JSONDecodeError``) or
    lose records. Readers skip an unfinished last line, so cutting it loses nothing. Done under
    Optuna's own journal lock, so that no other process is appending at that moment; a journal
    that cannot be written (read-only) is left as it is.
    """
    from optuna.storages.journal import JournalFileSymlinkLock

    if _complete_size(path) is None:
        return 0
    lock = JournalFileSymlinkLock(str(path))
    try:
        lock.acquire()
    except OSError:
        return 0  # a read-only folder: readers cope with the unfinished line
    try:
        keep = _complete_size(path)
        if keep is None:
            return 0
        with open(path, "r+b") as fh:
            dropped = fh.seek(0, os.SEEK_END) - keep
            fh.truncate(keep)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError:
        return 0
    finally:
        lock.release()
    logger.warning(
        "%s: dropped %d bytes of an unfinished record (a write that failed)", path, dropped
    )
    return dropped


def _complete_size(path: Path) -> int | None:
    """The size of ``path`` up to its last newline when bytes follow it, else None."""
    try:
        with open(path, "rb") as fh:
            end = fh.seek(0, os.SEEK_END)
            pos = end
            while pos > 0:
                step = min(pos, 1 << 16)
                fh.seek(pos - step)
                chunk = fh.read(step)
                i = chunk.rfind(b"\n")
                if i >= 0:
                    keep = pos - step + i + 1
                    return keep if keep < end else None
                pos -= step
            return 0 if end > 0 else None
    except OSError:
        return None


def _journal_backend(path: Path) -> Any:
    """Optuna's journal file backend, whose failed append leaves no unfinished record."""
    from optuna.storages.journal import JournalFileBackend

    class JournalFile(JournalFileBackend):
        def append_logs(self, logs: list[dict[str, Any]]) -> None:
            try:
                super().append_logs(logs)
            except OSError:
                _drop_torn_record(path)
                raise

    return JournalFile(str(path))


def space_storage(url: str, space: SearchSpace) -> optuna.storages.BaseStorage:
    s = space.storage
    return open_storage(
        url,
        heartbeat_interval=s["heartbeat_interval"],
        grace_period=s["grace_period"],
        max_retry=s["max_retry"],
    )


class RetryFailedOver:
    """Queue a failed-over trial again (same parameters) at most ``max_retry`` times.

    Used as the RDB storage's ``heartbeat_stale_trial_callback`` (Optuna 5's name for the
    deprecated ``failed_trial_callback``) and for trials of dead local workers and Ctrl-C. Only
    the parameters and the reference name are carried over (:func:`.record.retry_attrs`), so no
    stale worker id comes along.
    """

    def __init__(self, max_retry: int | None = 2) -> None:
        self.max_retry = max_retry

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        import optuna

        history = [*trial.system_attrs.get("retry_history", []), trial.number]
        if self.max_retry is not None and len(history) > self.max_retry:
            logger.warning(
                "trial %d failed over %d times; not retried again", trial.number, len(history)
            )
            return
        study.add_trial(
            optuna.trial.create_trial(
                state=optuna.trial.TrialState.WAITING,
                params=trial.params,
                distributions=trial.distributions,
                user_attrs=retry_attrs(trial),
                system_attrs={"failed_trial": history[0], "retry_history": history},
            )
        )
        logger.info("trial %d queued again (retry of trial %d)", trial.number, history[0])
