"""What a new user meets first: the run log, the report's header and legend, and the printed
``train.py`` commands, on a tiny synthetic study run through ``search.py run``."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import optuna
import pandas as pd
import pytest

from wasearch.search.testing import tiny_space, write_space

REPO = Path(__file__).resolve().parents[1]


def _search_cli():
    spec = importlib.util.spec_from_file_location("search_script", REPO / "search.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A tiny synthetic study run by ``search.py run`` from its own folder, which holds
    ``search.py`` and ``train.py`` as a clone would; returns (folder, run output)."""
    import torch

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("front_door")
    for script in ("search.py", "train.py"):
        (root / script).symlink_to(REPO / script)
    write_space(root / "tiny.yaml", tiny_space())
    here = Path.cwd()
    os.chdir(root)
    try:
        import contextlib
        import io

        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            rc = _search_cli().main(["run", "tiny.yaml", "--threads", "1", "--no-progress"])
    finally:
        os.chdir(here)
    assert rc == 0, out.getvalue()
    return root, out.getvalue()


def test_run_log_labels_synthetic_and_explains_its_columns(study):
    _, out = study
    assert "SYNTHETIC" in out.split("[1/4]")[0]  # said before the first trial line
    assert "front N = trials on the Pareto front so far" in out
    assert "(on the front so far" in out  # the first trial is on the front when it ends
    assert "(on front)" not in out
    assert re.search(r"Pareto front: trials [\d, ]+ \(SYNTHETIC data", out)


def test_study_names_its_metrics(study):
    root, _ = study
    s = optuna.load_study(study_name="tiny", storage=f"sqlite:///{root}/results/tiny/study.db")
    assert s.metric_names == ["accuracy", "latency_ms"]


def _plot_traces(text: str) -> list[dict]:
    """The traces of the page's first figure (accuracy against latency)."""
    m = re.search(r'Plotly\.newPlot\(\s*"fig\d+",\s*', text)
    assert m, "no plot"
    return json.JSONDecoder().raw_decode(text, m.end())[0]


def test_report_header_says_synthetic_and_counts_agree_with_the_legend(study):
    root, _ = study
    text = (root / "results" / "tiny" / "report.html").read_text()
    header = re.search(r'<p class="sub">(.*?)</p>', text, re.S).group(1)
    assert header.startswith("SYNTHETIC data")
    n_front = int(re.search(r"(\d+) on the Pareto front", header).group(1))
    assert n_front == len(pd.read_csv(root / "results" / "tiny" / "pareto.csv"))
    names = [t["name"] for t in _plot_traces(text)]
    assert f"Pareto front ({n_front})" in names
    counted = 0
    for name in names:
        if m := re.fullmatch(r"searched, on the front \((\d+)\)", name):
            counted += int(m.group(1))
        elif m := re.search(r", (\d+) on the front\)$", name):
            counted += int(m.group(1))
    assert counted == n_front, names


def test_printed_train_command_runs_as_written(study):
    root, _ = study
    pareto = pd.read_csv(root / "results" / "tiny" / "pareto.csv")
    command = pareto["command"].iloc[0]
    assert "--dataset synthetic" in command
    html = (root / "results" / "tiny" / "report.html").read_text()
    assert command.replace("&&", "&amp;&amp;") in html  # the page's "train it" column
    # Only the epochs are changed (120 -> 1) to keep the test fast; "python" is this one.
    runnable = command.replace("--epochs 120 ", "--epochs 1 ")
    assert runnable != command
    parts = [shlex.split(p) for p in runnable.split(" && ")]
    for argv in parts:
        assert argv[0] == "python"
        r = subprocess.run(
            [sys.executable, *argv[1:]], cwd=root, capture_output=True, text=True, timeout=600
        )
        assert r.returncode == 0, (argv, r.stdout[-2000:], r.stderr[-2000:])
    run = shlex.split(runnable)
    name = run[run.index("--run-name") + 1]
    assert (root / "runs" / name / "final.json").is_file()
    # train.py's last line and final.json carry each accuracy's standard error and its images.
    final = json.loads((root / "runs" / name / "final.json").read_text())
    for acc, se, n in (("best_val_acc", "best_val_se", "val_images"),
                       ("test_acc", "test_se", "test_images")):  # fmt: skip
        assert final[n] > 0
        assert final[se] == pytest.approx((final[acc] * (1 - final[acc]) / final[n]) ** 0.5)
    last = r.stdout.strip().splitlines()[-1]
    assert re.search(r"best val acc [\d.]+ ± [\d.]+ \(\d+ images\).*test acc [\d.]+ ± ", last)


def test_run_log_and_files_show_the_noise_and_the_pick(study):
    root, out = study
    lines = [ln for ln in out.splitlines() if re.match(r"\[\d+/\d+\] trial", ln)]
    assert lines and all(re.search(r"acc \d\.\d{4} ± \d\.\d{4}", ln) for ln in lines), lines
    assert "± its standard error" in out  # the columns line says what it is
    pick = re.search(r"^Pick: trial (\d+) \(.*within 1 standard error\(s\) of the best", out, re.M)
    assert pick, out[-1500:]
    df = pd.read_csv(root / "results" / "tiny" / "trials.csv")
    done = df[df["state"] == "COMPLETE"]
    assert (done["val_images"] > 0).all()
    expected = (done["accuracy"] * (1 - done["accuracy"]) / done["val_images"]) ** 0.5
    assert done["accuracy_se"].to_numpy() == pytest.approx(expected.to_numpy())
    assert df.loc[df["pick"], "number"].tolist() == [int(pick.group(1))]


def test_fine_tune_command_gives_the_trials_learning_rate(tmp_path):
    """``trial.lr: auto`` (the default) is resolved: train.py takes no ``--lr auto``."""
    from wasearch.search import load_space
    from wasearch.search.base import trial_lr
    from wasearch.search.record import train_commands as _train_commands

    ckpt = tmp_path / "trials" / "3" / "best.pt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"")
    for raw in (tiny_space(trial={"lr": "auto"}), tiny_space(trial={})):  # {}: the defaults
        space = load_space(write_space(tmp_path / "s.yaml", raw))
        commands = _train_commands(raw, tmp_path / "t.yaml", "tiny", 3, ckpt)
        lr = shlex.split(commands[1])[shlex.split(commands[1]).index("--lr") + 1]
        assert float(lr) == pytest.approx(trial_lr(space)), commands[1]


def test_docs_stand_alone():
    """A clone has no ../shared folder: the user-facing docs link only files it holds."""
    files = [REPO / "README.md", *(REPO / "docs").glob("*.md"), *(REPO / "spaces").iterdir()]
    for path in files:
        text = path.read_text()
        assert "../shared" not in text, path
        for target in re.findall(r"\]\(([^)#:]+\.md)\)", text):
            assert (path.parent / target).is_file(), (path, target)
    readme = (REPO / "README.md").read_text()
    assert "--index-url https://download.pytorch.org/whl/cpu" in readme
    assert "--download" in readme and "does exactly these three steps" not in readme
