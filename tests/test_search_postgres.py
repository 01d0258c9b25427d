"""Workers sharing one PostgreSQL study: exact trial counts; a SIGKILLed worker's trial retried.

Needs the server named by ``WASEARCH_TEST_POSTGRES``
(CI: ``postgresql://postgres@127.0.0.1:5432/test``).
Skipped when the variable is unset; FAILS when it is set and the server does not answer.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from wasearch.search.base import ensure_base, load_space_data
from wasearch.search.space import load_space
from wasearch.search.storage import driver_url
from wasearch.search.testing import copy_base, tiny_space, write_space

pytestmark = pytest.mark.postgres

REPO = Path(__file__).resolve().parents[1]
SEARCH = REPO / "search.py"
ENV = "WASEARCH_TEST_POSTGRES"


@pytest.fixture(scope="module")
def pg_url() -> str:
    url = os.environ.get(ENV)
    if not url:
        pytest.skip(f"{ENV} is not set")
    import sqlalchemy

    try:
        engine = sqlalchemy.create_engine(driver_url(url), connect_args={"connect_timeout": 10})
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("select 1"))
        engine.dispose()
    except Exception as err:  # noqa: BLE001 - any driver error means no server
        pytest.fail(f"{ENV}={url} is set but the server does not answer: {err}")
    return driver_url(url)


@pytest.fixture()
def study_name(pg_url):
    name = f"wasearch-test-{uuid.uuid4().hex[:12]}"
    yield name
    try:
        optuna.delete_study(study_name=name, storage=pg_url)
    except KeyError:
        pass


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    import torch

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("pgbase") / "results" / "tiny"
    space = load_space(write_space(root.parent.parent / "tiny.yaml", tiny_space()))
    ensure_base(space, root, data=lambda: load_space_data(space), device="cpu", progress=False)
    return root


def _start(tmp_path, space, url, name, *extra):
    return subprocess.Popen(
        [sys.executable, str(SEARCH), "run", str(space), "--storage", url, "--study-name", name,
         "--threads", "1", "--no-progress", "--no-report", *extra],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def _finish(proc, timeout=240):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out
    return out


def _check_exact(study, target):
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    numbers = [t.number for t in study.trials]
    assert len(complete) == target, [(t.number, t.state.name) for t in study.trials]
    assert len(numbers) == len(set(numbers)) == numbers[-1] + 1
    archs = [tuple(sorted(t.params.items())) for t in complete]
    assert len(archs) == len(set(archs)), "an architecture was trained twice"


def test_two_workers_finish_one_study_exactly(tmp_path, pg_url, study_name, base_dir):
    space = write_space(tmp_path / "pg.yaml", tiny_space(name="pg", budget={"trials": 5}))
    copy_base(base_dir, tmp_path / "results" / study_name)
    out = _finish(_start(tmp_path, space, pg_url, study_name, "--workers", "2"))
    assert "[w0]" in out and "[w1]" in out, out
    study = optuna.load_study(study_name=study_name, storage=pg_url)
    _check_exact(study, 5)
    workers = {t.user_attrs["worker"] for t in study.trials if t.state == TrialState.COMPLETE}
    assert len(workers) == 2, workers


def test_sigkilled_worker_trial_is_retried(tmp_path, pg_url, study_name, base_dir):
    space = write_space(
        tmp_path / "pg.yaml",
        tiny_space(name="pg", budget={"trials": 4}, trial={"max_batches": 4}),
    )
    copy_base(base_dir, tmp_path / "results" / study_name)
    victim = _start(tmp_path, space, pg_url, study_name)
    other = _start(tmp_path, space, pg_url, study_name)
    storage = optuna.storages.RDBStorage(pg_url)
    needle = f":{victim.pid}"
    end = time.monotonic() + 180
    killed = None
    while killed is None and time.monotonic() < end:
        try:
            trials = optuna.load_study(study_name=study_name, storage=storage).get_trials()
        except KeyError:
            trials = []
        for t in trials:
            if t.state == TrialState.RUNNING and t.user_attrs.get("worker", "").endswith(needle):
                if "arch" in t.user_attrs:  # training has started
                    killed = t.number
        if victim.poll() is not None:
            pytest.fail(f"the victim exited first:\n{victim.stdout.read()}")
        time.sleep(0.1)
    assert killed is not None, "the victim never ran a trial"
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait(timeout=30)
    _finish(other)

    study = optuna.load_study(study_name=study_name, storage=pg_url)
    dead = study.trials[killed]
    assert dead.state == TrialState.FAIL
    reason = dead.user_attrs.get("fail_reason", "")
    assert "died" in reason or "heartbeat" in reason, reason
    retries = [t for t in study.trials if t.user_attrs.get("retry_of") == killed]
    assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE
    assert retries[0].params == dead.params
    _check_exact(study, 4)
