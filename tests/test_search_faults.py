"""Faults around the search's files: study names, read-only folders, full disks, export of a
foreign study, and the order in which a resumed study runs its queued trials (issue 11).

A full disk is simulated in-process (an ``OSError(ENOSPC)`` where a file is written; an SQLite
"database or disk is full" where Optuna records a trial), and for real on a small tmpfs when this
process may mount one (root on Linux); read-only folders on a read-only tmpfs, and with a path
through a regular file (``ENOTDIR``), which works everywhere, root included.
"""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from wasearch.cli import run_main
from wasearch.search import RunOptions, load_space, run_search
from wasearch.search.base import ensure_base, load_space_data
from wasearch.search.storage import study_dir_of
from wasearch.search.testing import space_with_base, study_at, tiny_space, write_space

REPO = Path(__file__).resolve().parents[1]
ENOSPC = "No space left on device"

optuna.logging.set_verbosity(optuna.logging.ERROR)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """The tiny space's base, trained once for the module (a few seconds)."""
    import torch

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("base") / "results" / "tiny"
    space = load_space(write_space(root.parent.parent / "tiny.yaml", tiny_space()))
    ensure_base(space, root, data=lambda: load_space_data(space), device="cpu", progress=False)
    for name in ("last.pt",):  # only best.pt and done.json are needed: a smaller copy
        (root / "base" / name).unlink(missing_ok=True)
    return root


def _search(argv: list[str]) -> int:
    spec = importlib.util.spec_from_file_location("search_script", REPO / "search.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return run_main(module.main, argv)


def _one_error_line(capsys) -> str:
    """stderr holds exactly one line, ``error: ...`` (no traceback); return it."""
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def _temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if ".tmp" in p.name]


# ---------------------------------------------------------------------------------------------
# 3. --study-name obeys the rule of the space's name


@pytest.mark.parametrize("bad", ["../../x", "a/b", ".hidden", "", "x/../../y"])
def test_study_name_flag_is_refused_like_the_space_name(tmp_path, bad):
    from wasearch.search.space import parse_space, study_name_problem

    space = load_space(write_space(tmp_path / "ok.yaml", tiny_space(name="ok")))
    with pytest.raises(Exception) as info:
        study_dir_of(space, results=tmp_path / "results", study_name=bad)
    assert str(info.value).startswith("--study-name: ")
    # the same rule as the space's own name:
    problem = study_name_problem(bad)
    assert problem is not None and problem in str(info.value)
    with pytest.raises(Exception, match="name"):
        parse_space(tiny_space(name=bad), source="s.yaml")


def test_study_name_the_space_accepts_is_accepted(tmp_path):
    space = load_space(write_space(tmp_path / "ok.yaml", tiny_space(name="ok")))
    folder = study_dir_of(space, results=tmp_path / "r", study_name="v2.run-1_a")
    assert folder == tmp_path / "r" / "v2.run-1_a"


def test_run_with_a_bad_study_name_is_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch):
    import wasearch.search.run as study

    def no_base(*args, **kwargs):
        raise AssertionError("the search must stop before training anything")

    monkeypatch.setattr(study, "ensure_base", no_base)
    monkeypatch.chdir(tmp_path)
    results = tmp_path / "a" / "b" / "results"
    path = write_space(tmp_path / "tiny.yaml", tiny_space())
    argv = ["run", str(path), "--results", str(results), "--no-progress", "--threads", "1"]
    assert _search([*argv, "--study-name", "../../x"]) == 2
    assert "--study-name" in _one_error_line(capsys)
    assert not (tmp_path / "a" / "x").exists() and not results.exists()
    assert _search([*argv, "--study-name", "a/b"]) == 2
    assert "--study-name" in _one_error_line(capsys)
    assert not results.exists()


# ---------------------------------------------------------------------------------------------
# One atomic write: a failure leaves no temporary file and the old content


def _writers():
    """(name, write(path)) for every atomic writer of the package."""
    from wasearch.arch import Arch
    from wasearch.engine import atomic_write_text
    from wasearch.latency.analytical import load_profile
    from wasearch.latency.table import LatencyTable

    arch = Arch.uniform("normal", None, 8, width=0.125)
    return [
        ("engine.atomic_write_text", lambda p: atomic_write_text(p, "new\n")),
        ("Arch.save", lambda p: arch.save(p)),
        ("LatencyTable.write", lambda p: LatencyTable([]).write(p)),
        ("Profile.save", lambda p: load_profile("cortex-a73").save(p)),
    ]


@pytest.mark.parametrize("name", [n for n, _ in _writers()])
def test_atomic_writers_leave_no_temporary_on_a_full_disk(tmp_path, monkeypatch, name):
    write = dict(_writers())[name]
    target = tmp_path / "file"
    target.write_text("old\n")
    real_replace = os.replace

    def full(src, dst, *args, **kwargs):  # the data is written; the disk fills before rename
        if Path(dst) == target:
            raise OSError(errno.ENOSPC, ENOSPC, str(src))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(OSError) as info:
        write(target)
    assert info.value.errno == errno.ENOSPC
    assert info.value.filename == str(target)  # the file the caller knows, not the temporary
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_atomic_write_gives_the_mode_of_a_plain_file(tmp_path):
    from wasearch.fileio import atomic_write_bytes

    plain = tmp_path / "plain"
    plain.write_bytes(b"x")
    atomic_write_bytes(tmp_path / "atomic", b"x")
    assert (tmp_path / "atomic").stat().st_mode == plain.stat().st_mode
    assert (tmp_path / "atomic").read_bytes() == b"x"


def test_report_writes_leave_no_temporary(tmp_path, monkeypatch):
    from wasearch.report import write_report

    study_dir = tmp_path / "results" / "s"
    study_dir.mkdir(parents=True)
    study = optuna.create_study(
        study_name="s", storage=f"sqlite:///{study_dir / 'study.db'}", directions=["maximize"]
    )
    real_fsync = os.fsync

    def full(fd):
        raise OSError(errno.ENOSPC, ENOSPC)

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(Exception, match="free some space"):
        write_report(study_dir, study=study)
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert _temporaries(study_dir) == []


# ---------------------------------------------------------------------------------------------
# A full disk during a trial (in-process)


def test_full_disk_fails_the_trial_queues_it_and_ends_with_one_line(
    tmp_path, base_dir, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    path = space_with_base(tmp_path, base_dir, "full", budget={"trials": 2})
    real_replace = os.replace

    def full(src, dst, *args, **kwargs):
        if Path(dst).name == "last.pt":
            raise OSError(errno.ENOSPC, ENOSPC, str(src))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", full)
    argv = ["run", str(path), "--no-progress", "--no-report", "--threads", "1"]
    assert _search(argv) == 2
    line = _one_error_line(capsys)
    assert "trials/0/last.pt" in line and ENOSPC in line and "free some space" in line
    study = study_at(tmp_path, "full")
    first = study.trials[0]
    assert first.state == TrialState.FAIL
    assert ENOSPC in first.user_attrs["fail_reason"]
    assert "trials/0/last.pt" in first.user_attrs["fail_reason"]
    retry = [t for t in study.trials if t.user_attrs.get("retry_of") == 0]
    assert len(retry) == 1 and retry[0].state == TrialState.WAITING
    assert retry[0].params == first.params
    assert not any(t.state == TrialState.RUNNING for t in study.trials)
    assert _temporaries(tmp_path / "results") == []

    # Disk freed: the rerun completes the queue, the retried trial included.
    monkeypatch.setattr(os, "replace", real_replace)
    assert _search(argv) == 0
    study = study_at(tmp_path, "full")
    assert study.trials[retry[0].number].state == TrialState.COMPLETE
    assert study.trials[retry[0].number].params == first.params


def _database_full(*args, **kwargs):
    cause = sqlite3.OperationalError("database or disk is full")
    cause.sqlite_errorname = "SQLITE_FULL"
    try:
        raise cause
    except sqlite3.OperationalError as err:
        raise optuna.exceptions.StorageInternalError("commit failed") from err


def test_database_full_when_recording_the_trial_is_one_line(
    tmp_path, base_dir, monkeypatch, capsys
):
    """Optuna cannot record the failure and raises ``AssertionError: Should not reach.``: the
    run ends with one line saying the database is full; so does a rerun on a still-full disk."""
    from optuna.storages import RDBStorage

    monkeypatch.chdir(tmp_path)
    path = space_with_base(tmp_path, base_dir, "dbfull", budget={"trials": 2})
    real_replace, real_set_state = os.replace, RDBStorage.set_trial_state_values

    def full(src, dst, *args, **kwargs):
        if Path(dst).name == "last.pt":
            raise OSError(errno.ENOSPC, ENOSPC, str(src))
        return real_replace(src, dst, *args, **kwargs)

    def no_fail(self, trial_id, state, values=None):
        if state == TrialState.FAIL:
            _database_full()
        return real_set_state(self, trial_id, state, values)

    monkeypatch.setattr(os, "replace", full)
    monkeypatch.setattr(RDBStorage, "set_trial_state_values", no_fail)
    argv = ["run", str(path), "--no-progress", "--no-report", "--threads", "1"]
    assert _search(argv) == 2
    line = _one_error_line(capsys)
    assert "trials/0/last.pt" in line and "left RUNNING" in line
    assert _temporaries(tmp_path / "results") == []

    # The rerun on a disk still full: every write to the database fails.
    monkeypatch.setattr(RDBStorage, "set_trial_state_values", _database_full)
    monkeypatch.setattr(RDBStorage, "set_trial_user_attr", _database_full)
    monkeypatch.setattr(RDBStorage, "create_new_trial", _database_full)
    assert _search(argv) == 2
    line = _one_error_line(capsys)
    assert "database or disk is full" in line and "study.db" in line


@pytest.fixture()
def small_tmpfs(tmp_path):
    """A 10 MiB tmpfs (root on Linux only); unmounted afterwards."""
    if sys.platform != "linux" or os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root on Linux")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=10m", "tmpfs", str(mnt)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _fill(folder: Path, name: str, leave_kib: int) -> None:
    free = shutil.disk_usage(folder).free // 1024
    with open(folder / name, "wb") as fh:
        for _ in range(max(0, free - leave_kib)):
            try:
                fh.write(b"\0" * 1024)
                fh.flush()
            except OSError:
                break


@pytest.mark.slow
@pytest.mark.parametrize("storage", ["sqlite", "journal"])
def test_real_full_disk(small_tmpfs, base_dir, monkeypatch, capsys, storage):
    """The same on a real full file system: a trial's checkpoint does not fit, the rerun finds
    the disk still full, the run after freeing it finishes (a journal torn by the full disk is
    repaired, not left unreadable)."""
    root = small_tmpfs
    monkeypatch.chdir(root)
    path = space_with_base(root, base_dir, "tiny", budget={"trials": 2})
    argv = ["run", str(path), "--no-progress", "--no-report", "--threads", "1"]
    if storage == "journal":
        argv += ["--storage", "results/tiny/journal.log"]
    _fill(root, "filler", leave_kib=1000)  # the study fits; a 2 MB checkpoint does not
    assert _search(argv) == 2
    line = _one_error_line(capsys)
    assert "trials/0/last.pt" in line and ENOSPC in line
    assert _temporaries(root / "results") == []

    _fill(root, "filler2", leave_kib=0)
    assert _search(argv) == 2
    _one_error_line(capsys)
    assert _temporaries(root / "results") == []

    (root / "filler").unlink()
    (root / "filler2").unlink()
    assert _search(argv) == 0, capsys.readouterr()
    if storage == "sqlite":
        study = study_at(root, "tiny")
    else:
        journal = optuna.storages.journal.JournalFileBackend(
            str(root / "results" / "tiny" / "journal.log")
        )
        study = optuna.load_study(
            study_name="tiny", storage=optuna.storages.JournalStorage(journal)
        )
    states = [t.state for t in study.trials]
    assert states.count(TrialState.COMPLETE) == 2 and TrialState.RUNNING not in states
    assert ENOSPC in study.trials[0].user_attrs["fail_reason"]


# ---------------------------------------------------------------------------------------------
# A journal file torn by a failed append


def _journal_study(path: Path) -> optuna.Study:
    from wasearch.search.storage import open_storage

    storage = open_storage(str(path), heartbeat_interval=None, grace_period=None)
    return optuna.create_study(study_name="j", storage=storage, load_if_exists=True)


def test_a_torn_journal_record_is_dropped_when_opened(tmp_path):
    path = tmp_path / "journal.log"
    _journal_study(path).enqueue_trial({"x": 1})
    with open(path, "ab") as fh:  # what a full disk leaves: half a record, no newline
        fh.write(b'{"op_code":5,"worker_id":"w","trial_id":0,"user_att')
    study = _journal_study(path)
    study.enqueue_trial({"x": 2})
    assert path.read_bytes().endswith(b"\n")
    assert len(_journal_study(path).trials) == 2


def test_a_failed_journal_append_leaves_no_torn_record(tmp_path, monkeypatch):
    from optuna.storages.journal import JournalFileBackend

    path = tmp_path / "journal.log"
    study = _journal_study(path)
    real_append = JournalFileBackend.append_logs

    def half_then_full(self, logs):
        with open(path, "ab") as fh:
            fh.write(json.dumps(logs[0]).encode()[:20])
        raise OSError(errno.ENOSPC, ENOSPC, str(path))

    monkeypatch.setattr(JournalFileBackend, "append_logs", half_then_full)
    with pytest.raises(OSError):
        study.enqueue_trial({"x": 1})
    monkeypatch.setattr(JournalFileBackend, "append_logs", real_append)
    assert path.read_bytes().endswith(b"\n")
    study.enqueue_trial({"x": 2})
    trials = _journal_study(path).trials
    assert [t.system_attrs["fixed_params"] for t in trials] == [{"x": 2}]


# ---------------------------------------------------------------------------------------------
# Read-only folders


@pytest.fixture()
def read_only(small_tmpfs):
    """``fill(src_folder)`` copies a folder onto the tmpfs, then makes the tmpfs read-only."""

    def fill(src: Path | None = None) -> Path:
        if src is not None:
            shutil.copytree(src, small_tmpfs / src.name)
        done = subprocess.run(["mount", "-o", "remount,ro", str(small_tmpfs)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot remount read-only: {done.stderr.decode().strip()}")
        return small_tmpfs

    return fill


@pytest.fixture(scope="module")
def finished(base_dir, tmp_path_factory):
    """A finished tiny study (2 trials) in <root>/results/done."""
    import torch

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("finished")
    path = space_with_base(root, base_dir, "done", budget={"trials": 2})
    result = run_search(
        load_space(path),
        RunOptions(threads=1, report=False, results=str(root / "results")),
        progress=False,
    )
    assert result.status == "finished"
    return root


def test_read_only_study_folder(read_only, finished, monkeypatch, capsys):
    ro = read_only(finished / "results")
    monkeypatch.chdir(ro)
    study_dir = "results/done"
    assert _search(["report", study_dir]) == 2
    assert "results/done/trials.csv: Read-only file system" in _one_error_line(capsys)
    assert _search(["export", study_dir]) == 2
    assert "results/done/pareto: Read-only file system" in _one_error_line(capsys)
    space = str(finished / "done.yaml")
    assert _search(["run", space, "--results", "results", "--trials", "3", "--no-progress"]) == 2
    line = _one_error_line(capsys)
    assert "study.db" in line and "readonly database" in line
    assert _search(["run", space, "--results", "new", "--no-progress"]) == 2
    assert "new: Read-only file system" in _one_error_line(capsys)
    assert _search(["pretrain", space, "--results", "new", "--no-progress"]) == 2
    assert "--results" in _one_error_line(capsys)


def test_read_only_out_dir_of_train(read_only, tmp_path, monkeypatch, capsys):
    from wasearch.train_cli import main as train_main

    ro = read_only()
    monkeypatch.chdir(tmp_path)
    argv = ["--use_normal_conv", "--dataset", "synthetic", "--limit-train", "64",
            "--limit-test", "32", "--epochs", "1", "--mult", "0.125", "--no-progress",
            "--outDir", str(ro / "runs")]  # fmt: skip
    assert run_main(train_main, argv) == 2
    line = _one_error_line(capsys)
    assert "Read-only file system" in line and "--outDir" in line


def test_results_under_a_regular_file(tmp_path, finished, monkeypatch, capsys):
    """A path through a regular file (ENOTDIR) fails as a read-only one does, root or not."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("x")
    space = str(finished / "done.yaml")
    assert _search(["run", space, "--results", "afile/results", "--no-progress"]) == 2
    line = _one_error_line(capsys)
    assert "afile/results" in line and "Not a directory" in line and "--results" in line
    report = ["report", str(finished / "results" / "done"), "--out"]
    assert _search([*report, "afile/sub/r.html"]) == 2  # a path through a file
    assert "afile/sub: Not a directory" in _one_error_line(capsys)
    assert _search([*report, "afile/r.html"]) == 2  # a folder to make where a file is
    assert "afile: File exists" in _one_error_line(capsys)


# ---------------------------------------------------------------------------------------------
# export of a study that plain Optuna made


def test_export_of_a_plain_optuna_study(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "results" / "plain"
    folder.mkdir(parents=True)
    study = optuna.create_study(study_name="plain", storage=f"sqlite:///{folder / 'study.db'}")
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    for argv in (["export", "results/plain"], ["export", "results/plain", "--trial", "1"]):
        assert _search(argv) == 2
        line = _one_error_line(capsys)
        assert "'plain'" in line and "no wasearch trials" in line and "study.db" in line
    assert not (folder / "pareto").exists()


# ---------------------------------------------------------------------------------------------
# 5. The trial interrupted by Ctrl-C is retried on resume, in Optuna's queue order (docs/search.md)


def test_interrupted_trial_is_retried_in_queue_order(tmp_path, base_dir, monkeypatch):
    import wasearch.engine as engine

    monkeypatch.chdir(tmp_path)
    path = space_with_base(tmp_path, base_dir, "order", budget={"trials": 3})
    real_fit = engine.fit

    def ctrl_c_in_trial_0(*args, extra=None, **kwargs):
        if (extra or {}).get("trial") == 0:
            raise KeyboardInterrupt
        return real_fit(*args, extra=extra, **kwargs)

    monkeypatch.setattr(engine, "fit", ctrl_c_in_trial_0)
    options = RunOptions(threads=1, report=False)
    result = run_search(load_space(path), options, progress=False)
    assert result.status == "interrupted"
    study = study_at(tmp_path, "order")
    assert study.trials[0].state == TrialState.FAIL
    assert study.trials[1].state == TrialState.WAITING  # the static-F4 reference, queued first
    retry = [t for t in study.trials if t.user_attrs.get("retry_of") == 0]
    assert len(retry) == 1 and retry[0].number > 1

    monkeypatch.setattr(engine, "fit", real_fit)
    options.trials = 1  # one more completed trial: the reference queued before the retry
    result = run_search(load_space(path), options, progress=False)
    assert result.status == "finished"
    study = study_at(tmp_path, "order")
    assert study.trials[1].state == TrialState.COMPLETE
    assert study.trials[retry[0].number].state == TrialState.WAITING
    options.trials = 2  # and then the retry, with the interrupted trial's parameters
    result = run_search(load_space(path), options, progress=False)
    assert result.status == "finished"
    study = study_at(tmp_path, "order")
    assert study.trials[retry[0].number].state == TrialState.COMPLETE
    assert study.trials[retry[0].number].params == study.trials[0].params
