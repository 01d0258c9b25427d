"""The base lock (wasearch/search/_lock.py) between real processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from wasearch.search import _lock
from wasearch.search._lock import FileLock

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="flock and SIGKILL are Unix")

# Holds the lock until the file ``release`` appears; writes "<host:pid> <time>" to ``entered``
# once it holds it, and the holder it was told about to ``entered.waited`` if it had to wait.
# The module is loaded from its file alone: importing the package would import torch, slowly.
HOLD = """
import importlib.util, sys, time
from pathlib import Path
spec = importlib.util.spec_from_file_location("_lock", sys.argv[4])
_lock = importlib.util.module_from_spec(spec)
spec.loader.exec_module(_lock)
FileLock, worker_id = _lock.FileLock, _lock.worker_id
lock, entered, release = map(Path, sys.argv[1:4])
def waiting(holder):
    Path(f"{entered}.waited").write_text(holder)
with FileLock(lock, on_wait=waiting, poll=0.05):
    entered.write_text(f"{worker_id()} {time.time()}")
    while not release.exists():
        time.sleep(0.02)
    Path(f"{entered}.left").write_text(str(time.time()))
"""


def _hold(lock: Path, entered: Path, release: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", HOLD, str(lock), str(entered), str(release), _lock.__file__]
    )


def _wait_for(path: Path, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file() and (text := path.read_text()):
            return text
        time.sleep(0.02)
    raise AssertionError(f"{path} did not appear within {timeout} s")


def _stop(*procs: subprocess.Popen) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)


def test_two_processes_contend_one_waits_until_the_other_releases(tmp_path: Path) -> None:
    lock = tmp_path / "base.lock"
    a = _hold(lock, tmp_path / "a", tmp_path / "a.release")
    b = None
    try:
        holder = _wait_for(tmp_path / "a").split()[0]
        assert holder == f"{socket.gethostname()}:{a.pid}"
        b = _hold(lock, tmp_path / "b", tmp_path / "b.release")
        assert _wait_for(tmp_path / "b.waited") == holder  # told once who holds it
        time.sleep(0.5)
        assert not (tmp_path / "b").exists()  # still waiting
        (tmp_path / "a.release").touch()
        b_entered = float(_wait_for(tmp_path / "b").split()[1])
        assert b_entered >= float(_wait_for(tmp_path / "a.left"))
        (tmp_path / "b.release").touch()
        assert a.wait(timeout=30) == 0 and b.wait(timeout=30) == 0
    finally:
        _stop(a, *([b] if b else []))
    assert not (tmp_path / "base.lock.holder").exists()  # removed on release
    with FileLock(lock, on_wait=pytest.fail):  # free again, without waiting
        pass


def test_a_holder_killed_with_sigkill_does_not_block_the_next(tmp_path: Path) -> None:
    lock = tmp_path / "base.lock"
    a = _hold(lock, tmp_path / "a", tmp_path / "never")
    try:
        _wait_for(tmp_path / "a")
        os.kill(a.pid, signal.SIGKILL)
        a.wait(timeout=30)
        # The killed holder left its lock file and holder file behind; neither blocks.
        assert lock.exists()
        b = _hold(lock, tmp_path / "b", tmp_path / "b.release")
        (tmp_path / "b.release").touch()
        assert b.wait(timeout=30) == 0
        assert (tmp_path / "b").is_file()
    finally:
        _stop(a)


def test_a_lock_that_looks_stale_is_not_broken_while_it_is_held(tmp_path: Path) -> None:
    # The race of a staleness check: a waiter reads "held by a dead process" (or "not touched for
    # long"), a fresh holder takes the lock meanwhile, and the waiter then removes the fresh lock
    # and enters too. Here the lock is held by a live process while every file about it says it
    # is stale: a second process must still wait.
    lock = tmp_path / "base.lock"
    a = _hold(lock, tmp_path / "a", tmp_path / "a.release")
    b = None
    try:
        _wait_for(tmp_path / "a")
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait(timeout=30)
        stale = f"{socket.gethostname()}:{dead.pid}"
        for path in (lock, tmp_path / "base.lock.holder"):
            path.write_text(json.dumps({"holder": stale, "since": 0.0}))
            os.utime(path, (0.0, 0.0))
        b = _hold(lock, tmp_path / "b", tmp_path / "b.release")
        time.sleep(1.5)
        assert not (tmp_path / "b").exists(), "entered while another process held the lock"
        _wait_for(tmp_path / "b.waited")
        (tmp_path / "a.release").touch()
        _wait_for(tmp_path / "b")
        (tmp_path / "b.release").touch()
        assert a.wait(timeout=30) == 0 and b.wait(timeout=30) == 0
    finally:
        _stop(a, *([b] if b else []))
