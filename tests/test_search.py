"""The search end to end on a tiny space: study contents, resume, faults, export -> train.py."""

from __future__ import annotations

import importlib.util
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from wasearch.arch import Arch
from wasearch.search import RunOptions, export_trials, load_space, run_search
from wasearch.search.base import ensure_base, load_space_data
from wasearch.search.cli import format_event
from wasearch.search.testing import space_with_base, study_at, tiny_space, write_space

REPO = Path(__file__).resolve().parents[1]
SEARCH = REPO / "search.py"
CONTRACT_KEYS = {
    "arch", "arch_summary", "latency_ms", "layer_latency_ms", "latency_estimated", "params",
    "bitops", "val_acc", "train_seconds", "feasible", "source", "history",
}  # fmt: skip


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """The tiny space's base, trained once for the module."""
    import torch

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("base") / "results" / "tiny"
    space = load_space(write_space(root.parent.parent / "tiny.yaml", tiny_space()))
    ensure_base(space, root, data=lambda: load_space_data(space), device="cpu", progress=False)
    return root


def _load_search_cli():
    spec = importlib.util.spec_from_file_location("search_script", SEARCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_search_end_to_end_then_export_and_train(tmp_path, base_dir, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    path = space_with_base(tmp_path, base_dir, "e2e")
    events = []
    options = RunOptions(threads=1, report=False)
    result = run_search(load_space(path), options, on_event=events.append, progress=False)
    assert result.status == "finished" and result.done == 4

    study = study_at(tmp_path, "e2e")
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 4 and len(study.trials) == 4
    assert [t.user_attrs.get("reference") for t in study.trials[:2]] == ["all-normal", "static-F4"]
    for t in complete:
        assert CONTRACT_KEYS <= set(t.user_attrs), t.user_attrs.keys()
        attrs = t.user_attrs
        assert 0.0 <= attrs["val_acc"] <= 1.0
        assert t.values == pytest.approx([attrs["val_acc"], attrs["latency_ms"]])
        assert len(attrs["layer_latency_ms"]) == 16 and attrs["latency_estimated"] is True
        assert Arch.from_yaml(attrs["arch"]).summary() == attrs["arch_summary"]
        assert attrs["feasible"] is True and attrs["source"] == "optuna"
    ua = study.user_attrs
    assert ua["objectives"] == ["accuracy", "latency_ms"] and ua["sampler"] == "nsga2"
    assert ua["dataset"] == "synthetic" and ua["synthetic"] is True
    assert ua["space"]["name"] == "e2e" and ua["latency_model"]["profile"] == "cortex-a73"
    assert ua["reference_latency_ms"] == pytest.approx(complete[0].user_attrs["latency_ms"])
    # checkpoints of the front only, and no last.pt
    front = set(result.front)
    assert front and front <= {t.number for t in complete}
    for t in complete:
        folder = tmp_path / "results" / "e2e" / "trials" / str(t.number)
        assert (folder / "best.pt").is_file() == (t.number in front)
        assert not (folder / "last.pt").exists()
    assert [e.done for e in events] == [1, 2, 3, 4]
    assert all("acc 0." in format_event(e) or "acc 1." in format_event(e) for e in events)

    again = run_search(load_space(path), options, progress=False)
    assert again.status == "already-finished" and "is finished" in again.message

    # export the front through the CLI, then train one exported file with train.py
    cli = _load_search_cli()
    assert cli.main(["export", "results/e2e", "--pareto"]) == 0
    out = capsys.readouterr().out
    assert "python train.py --arch results/e2e/pareto/trial_" in out
    exported = export_trials(tmp_path / "results" / "e2e", trial=min(front))
    assert exported[0].path == tmp_path / "results" / "e2e" / "pareto" / f"trial_{min(front)}.yaml"
    arch = Arch.load(exported[0].path)
    assert arch == Arch.from_yaml(study.trials[min(front)].user_attrs["arch"])

    from wasearch.train_cli import main as train_main

    rc = train_main(
        [
            "--arch", str(exported[0].path), "--dataset", "synthetic", "--epochs", "1",
            "--limit-train", "64", "--limit-test", "32", "--val-fraction", "0.012",
            "--batch_size", "32", "--use_cpu", "--no-progress", "--out-dir", "runs",
            "--run-name", "exported",
        ]
    )  # fmt: skip
    assert rc == 0
    final = json.loads((tmp_path / "runs" / "exported" / "final.json").read_text())
    assert final["arch"] == arch.summary()


def test_diverging_trial_is_recorded_failed_and_search_goes_on(tmp_path, base_dir, monkeypatch):
    import wasearch.engine as engine

    real_f, real_fit = engine.F, engine.fit
    current = {"trial": None}

    def fit(*args, extra=None, **kwargs):
        current["trial"] = (extra or {}).get("trial")
        return real_fit(*args, extra=extra, **kwargs)

    class NaNLoss:  # torch.nn.functional whose training loss is NaN during trial 1
        def __getattr__(self, name):
            return getattr(real_f, name)

        def cross_entropy(self, *args, **kwargs):
            loss = real_f.cross_entropy(*args, **kwargs)
            return loss * float("nan") if current["trial"] == 1 else loss

    monkeypatch.setattr(engine, "fit", fit)
    monkeypatch.setattr(engine, "F", NaNLoss())
    monkeypatch.chdir(tmp_path)
    path = space_with_base(tmp_path, base_dir, "nan", budget={"trials": 3})
    events = []
    result = run_search(
        load_space(path), RunOptions(threads=1, report=False), on_event=events.append,
        progress=False,
    )  # fmt: skip
    assert result.status == "finished" and result.done == 3 and result.failed == 1
    study = study_at(tmp_path, "nan")
    states = [t.state for t in study.trials]
    assert states.count(TrialState.COMPLETE) == 3 and states[1] == TrialState.FAIL
    reason = study.trials[1].user_attrs["fail_reason"]
    assert reason.startswith("diverged: loss became nan"), reason
    assert "arch" in study.trials[1].user_attrs  # recorded as far as known
    fail_events = [e for e in events if e.state == "FAIL"]
    assert len(fail_events) == 1 and "diverged" in format_event(fail_events[0])


def _wait(predicate, timeout: float, proc: subprocess.Popen | None = None):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            pytest.fail(f"the search exited early ({proc.returncode}):\n{out}")
        time.sleep(0.1)
    pytest.fail("timed out waiting")


@pytest.mark.slow
def test_ctrl_c_marks_the_trial_and_rerun_resumes(tmp_path, base_dir):
    path = space_with_base(
        tmp_path, base_dir, "resume", budget={"trials": 3}, trial={"max_batches": 4}
    )
    proc = subprocess.Popen(
        [sys.executable, str(SEARCH), "run", str(path), "--threads", "1", "--no-progress",
         "--no-report"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        # A shell's background job (`pytest &`) inherits SIGINT ignored, and so would the search:
        # give it the default disposition a user's terminal gives it.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    db = tmp_path / "results" / "resume" / "study.db"
    _wait((tmp_path / "results" / "resume" / "space.yaml").is_file, 120, proc)  # study created
    storage = optuna.storages.RDBStorage(f"sqlite:///{db}")

    def running_after_one_complete():
        try:
            trials = optuna.load_study(study_name="resume", storage=storage).get_trials()
        except KeyError:
            return None
        done = [t for t in trials if t.state == TrialState.COMPLETE]
        running = [t for t in trials if t.state == TrialState.RUNNING and "arch" in t.user_attrs]
        return running[0].number if done and running else None

    interrupted = _wait(running_after_one_complete, 120, proc)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out
    assert "rerun the same command to resume" in out

    study = optuna.load_study(study_name="resume", storage=storage)
    trial = study.trials[interrupted]
    assert trial.state == TrialState.FAIL
    assert trial.user_attrs["fail_reason"].startswith("interrupted (Ctrl-C)")
    retry = [t for t in study.trials if t.user_attrs.get("retry_of") == interrupted]
    assert len(retry) == 1 and retry[0].state == TrialState.WAITING
    before = {
        t.number: (t.values, t.datetime_complete, t.user_attrs["arch"])
        for t in study.trials
        if t.state == TrialState.COMPLETE
    }
    count_before = len(study.trials)

    result = run_search(
        load_space(path), RunOptions(threads=1, report=False, results=str(tmp_path / "results")),
        progress=False,
    )  # fmt: skip
    assert result.status == "finished" and result.done == 3
    study = optuna.load_study(study_name="resume", storage=storage)
    assert len(study.trials) > count_before
    for number, (values, completed, arch) in before.items():
        t = study.trials[number]
        assert (t.values, t.datetime_complete, t.user_attrs["arch"]) == (values, completed, arch)
    assert study.trials[retry[0].number].state == TrialState.COMPLETE
    assert study.trials[retry[0].number].params == trial.params

    # The same space and seed without the interruption. What Ctrl-C and the rerun legitimately
    # change: trial numbers (the interrupted trial stays FAIL and its retry is a new trial),
    # times and worker ids. The completed trials must be the same architectures, with the same
    # parameters, latencies and (deterministic CPU training from the same base) accuracies.
    (tmp_path / "straight").mkdir()
    straight = space_with_base(
        tmp_path / "straight", base_dir, "resume", budget={"trials": 3}, trial={"max_batches": 4}
    )
    options = RunOptions(threads=1, report=False, results=str(tmp_path / "straight" / "results"))
    assert run_search(load_space(straight), options, progress=False).done == 3
    plain = study_at(tmp_path / "straight", "resume")
    assert [t.state for t in plain.trials] == [TrialState.COMPLETE] * 3
    resumed = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(resumed) == 3
    by_arch = {t.user_attrs["arch"]: t for t in resumed}
    assert by_arch.keys() == {t.user_attrs["arch"] for t in plain.trials}
    for t in plain.trials:
        again = by_arch[t.user_attrs["arch"]]
        assert again.params == t.params
        assert again.user_attrs["latency_ms"] == t.user_attrs["latency_ms"]
        assert again.user_attrs["val_acc"] == pytest.approx(t.user_attrs["val_acc"], abs=1e-6)


def test_a_trial_line_shows_the_standard_error_when_the_trial_has_one():
    from wasearch.search.record import TrialEvent

    common = dict(number=3, state="COMPLETE", summary="normal/8 x16", latency_ms=1.5,
                  feasible=True, reference=None, front=1, done=1, target=4,
                  seconds=1.0)  # fmt: skip
    assert "acc 0.6672 ± 0.0067 " in format_event(
        TrialEvent(val_acc=0.6672, val_se=0.00666, **common)
    )
    old = format_event(TrialEvent(val_acc=0.6672, **common))  # a study from before val_images
    assert "acc 0.6672 " in old and "±" not in old


def test_space_data_is_fitted_to_the_models_input_size(tmp_path):
    # synthetic images are 32x32; a model at 40 px gets them resized, not an error
    space = load_space(write_space(tmp_path / "s.yaml", tiny_space(model={"input_size": 40})))
    data = load_space_data(space)
    assert data.image_size == (40, 40)
    assert data.train.images.shape[-2:] == data.val.images.shape[-2:] == (40, 40)


def test_default_threads_reads_the_load_once_per_process(monkeypatch):
    """The idle cores are judged at the first ask: the process's own later work (a base
    trained at one load average, then a study) must not halve its threads."""
    from wasearch.search import base

    loads = iter([0.0, 2.0, 2.0])
    monkeypatch.setattr(base, "_LOAD_AT_START", None)
    monkeypatch.setattr(base.os, "getloadavg", lambda: (next(loads), 0.0, 0.0))
    monkeypatch.setattr(base.os, "cpu_count", lambda: 2)
    assert base.default_threads() == 2
    assert base.default_threads() == 2  # the load now reads 2.0: not asked again
    assert base.default_threads(workers=2) == 1
