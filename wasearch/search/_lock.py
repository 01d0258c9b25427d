"""A lock file for work that several processes (or machines sharing a folder) must do once.

``os.open(O_CREAT | O_EXCL)`` creates the file atomically, so exactly one process holds it. The
holder writes its host and pid into it and touches it every few seconds from a thread; a
waiter removes a lock whose holder is a dead process on this host, or whose file has not been
touched for ``stale_after`` seconds (a holder on another machine that died).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

__all__ = ["FileLock", "pid_alive", "worker_id"]

logger = logging.getLogger(__name__)


def worker_id() -> str:
    """``host:pid`` of this process."""
    return f"{socket.gethostname()}:{os.getpid()}"


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host (zombies count as dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped by its parent) is dead for our purposes
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def holder_dead(holder: str) -> bool:
    """Whether a ``host:pid`` names a process on this host that no longer runs."""
    host, _, pid = holder.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    return int(pid) != os.getpid() and not pid_alive(int(pid))


class FileLock:
    """``with FileLock(path): ...`` waits until this process holds ``path``.

    ``on_wait(holder)`` is called once when another process holds it.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        stale_after: float = 300.0,
        touch_every: float = 10.0,
        poll: float = 1.0,
        on_wait: Callable[[str], None] | None = None,
    ) -> None:
        self.path = Path(path)
        self.stale_after = stale_after
        self.touch_every = touch_every
        self.poll = poll
        self.on_wait = on_wait
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _try(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as fh:
            json.dump({"holder": worker_id(), "since": time.time()}, fh)
        return True

    def _holder(self) -> tuple[str, float] | None:
        try:
            text = self.path.read_text()
            mtime = self.path.stat().st_mtime
        except FileNotFoundError:
            return None
        try:
            return str(json.loads(text)["holder"]), mtime
        except (ValueError, KeyError, TypeError):
            return "?", mtime  # being written right now, or torn: judged by its age

    def _break_stale(self) -> bool:
        found = self._holder()
        if found is None:
            return True
        holder, mtime = found
        if holder_dead(holder) or time.time() - mtime > self.stale_after:
            # Rename first, so two waiters cannot both remove a fresh lock.
            grave = self.path.with_name(f"{self.path.name}.stale.{os.getpid()}")
            try:
                os.replace(self.path, grave)
                grave.unlink()
            except FileNotFoundError:
                pass
            logger.warning("removed the stale lock %s of %s", self.path, holder)
            return True
        return False

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        told = False
        while not self._try():
            if self._break_stale():
                continue
            if not told and self.on_wait is not None:
                found = self._holder()
                self.on_wait(found[0] if found else "?")
                told = True
            time.sleep(self.poll)
        self._stop.clear()
        self._thread = threading.Thread(target=self._touch, daemon=True)
        self._thread.start()

    def _touch(self) -> None:
        while not self._stop.wait(self.touch_every):
            try:
                os.utime(self.path)
            except FileNotFoundError:
                return

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        found = self._holder()
        if found is not None and found[0] == worker_id():
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass

    def __enter__(self) -> FileLock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()
