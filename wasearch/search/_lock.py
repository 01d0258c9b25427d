"""A lock file for work that several processes (or machines sharing a folder) must do once.

The lock is :class:`filelock.FileLock`, an OS-level ``flock``: the kernel releases it when the
holder exits or is killed (``SIGKILL`` included), so there is no staleness to judge, no pid to
check and no lock file to remove, and a waiter can never delete a fresh lock. The lock file
stays in place after release (waiters must share its inode).

Beside it, ``<name>.holder`` names the holder (``host:pid``) while the lock is held, only for the
message a waiter shows; the holder removes it before releasing. One left by a killed holder is
overwritten by the next one.

``flock`` between machines works only where the shared file system supports it: local disks do;
NFS is unreliable (NFSv4 and recent Linux clients map it to byte-range locks, older setups or
``nolock`` mounts do not lock across machines at all). Where ``flock`` is missing entirely,
filelock warns and falls back to a plain lock file that a crashed holder leaves behind.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

import filelock

__all__ = ["FileLock", "holder_dead", "pid_alive", "worker_id"]


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

    ``on_wait(holder)`` is called once when another process holds it (``holder`` is its
    ``host:pid``, or ``"?"`` when it has not written it yet).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        poll: float = 1.0,
        on_wait: Callable[[str], None] | None = None,
    ) -> None:
        self.path = Path(path)
        self.holder_path = self.path.with_name(f"{self.path.name}.holder")
        self.poll = poll
        self.on_wait = on_wait
        # Not thread-local and not a singleton: one object, one hold, released by whoever
        # exits the ``with``.
        self._lock = filelock.FileLock(self.path, thread_local=False, poll_interval=poll)

    def _holder(self) -> str:
        try:
            return self.holder_path.read_text().strip() or "?"
        except OSError:
            return "?"

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._lock.acquire(timeout=0)
        except filelock.Timeout:
            if self.on_wait is not None:
                self.on_wait(self._holder())
            self._lock.acquire()
        tmp = self.holder_path.with_name(f"{self.holder_path.name}.{os.getpid()}")
        tmp.write_text(worker_id())
        os.replace(tmp, self.holder_path)

    def release(self) -> None:
        try:  # while still held, so it cannot be the next holder's file
            self.holder_path.unlink()
        except FileNotFoundError:
            pass
        self._lock.release()

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
