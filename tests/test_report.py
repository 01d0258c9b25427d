"""Reports: CSV tables agree with the study, the page renders in a real headless browser.

The studies are built here with optuna directly, as docs/study_format.md says a search stores
them (reference architectures, infeasible and failed trials, a differentiable-search trial).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shutil
import subprocess
import uuid
from pathlib import Path

import optuna
import pandas as pd
import pytest

from wasearch.arch import Arch, LayerChoice
from wasearch.cli import UserError, run_main
from wasearch.report import register, trials_frame, write_comparison, write_report
from wasearch.search.record import front_trials
from wasearch.search.storage import driver_url, redact

CHROMIUM = Path("/usr/bin/chromium")
WIDTH = 0.125  # a small backbone: the report never builds it, only lists its layers

# Relative cost of a layer per choice (normal = 1): stands in for a latency model.
_SPEED = {"normal": 1.0, "F2": 0.62, "F4": 0.45, "F6": 0.41}


def _layer_ms(arch: Arch) -> dict[str, float]:
    out = {}
    for i, (name, c) in enumerate(arch.layers):
        base = 0.3 + 0.05 * (i % 4)
        factor = _SPEED["normal" if c.conv == "normal" else f"F{c.tile}"]
        out[name] = round(base * factor * (0.9 if c.conv == "flex" else 1.0), 5)
    return out


def _attrs(arch: Arch, **extra: object) -> dict[str, object]:
    layer = _layer_ms(arch)
    latency = round(sum(layer.values()) + 0.8, 5)  # + the rest of the network
    return {
        "arch": arch.to_yaml(),
        "arch_summary": arch.summary(),
        "latency_ms": latency,
        "layer_latency_ms": layer,
        "latency_estimated": False,
        "params": 150_000 + 1000 * sum(c.conv == "flex" for _, c in arch.layers),
        "train_seconds": 12.5,
        "feasible": True,
        "source": "optuna",
        **extra,
    }


def _random_arch(rng: random.Random) -> Arch:
    f6 = Arch.uniform("flex", 6, 8, width=WIDTH)  # F6 falls back where it does not fit
    changes = {}
    for name, fitted in f6.layers:
        conv = rng.choice(["normal", "static", "flex"])
        tile = min(rng.choice([2, 4, 6]), fitted.tile)
        changes[name] = LayerChoice(conv, None if conv == "normal" else tile, 8)
    return Arch.uniform("normal", bits=8, width=WIDTH).with_layers(changes)


def make_study(
    root: Path,
    name: str = "demo",
    *,
    n_random: int = 14,
    seed: int = 0,
    empty: bool = False,
    storage: str | None = None,
) -> tuple[Path, optuna.Study]:
    """A study under ``root/<name>/study.db`` (or in ``storage``) as the search writes it."""
    study_dir = root / name
    study_dir.mkdir(parents=True, exist_ok=storage is not None)
    study = optuna.create_study(
        directions=["maximize", "minimize"],
        storage=storage or f"sqlite:///{study_dir / 'study.db'}",
        study_name=name,
    )
    normal = Arch.uniform("normal", bits=8, width=WIDTH)
    ref_attrs = _attrs(normal)
    for key, value in {
        "objectives": ["accuracy", "latency_ms"],
        "space_path": "spaces/demo.yaml",
        "space": {"name": name, "backbone": "resnet18", "width": WIDTH},
        "dataset": "cifar10",
        "synthetic": True,
        "latency_model": {"kind": "analytical", "profile": "cortex-a73"},
        "latency_device": "Cortex-A73 (analytical)",
        "sampler": "NSGAIISampler",
        "created": "2025-01-02T03:04:05+00:00",
        "reference_latency_ms": ref_attrs["latency_ms"],
    }.items():
        study.set_user_attr(key, value)
    if empty:
        arch = _random_arch(random.Random(seed))
        study.add_trial(
            optuna.trial.create_trial(
                state=optuna.trial.TrialState.FAIL,
                user_attrs=_attrs(arch, fail_reason="CUDA out of memory"),
            )
        )
        return study_dir, study

    rng = random.Random(seed)
    trials = [(normal, 0.93, {"reference": "all-normal"})]
    for conv in ("static", "flex"):
        for tile in (2, 4):
            arch = Arch.uniform(conv, tile, 8, width=WIDTH)
            acc = {2: 0.905, 4: 0.86}[tile] + (0.01 if conv == "flex" else 0.0)
            trials.append((arch, acc, {"reference": f"{conv}-F{tile}"}))
    for _ in range(n_random):
        arch = _random_arch(rng)
        winograd = sum(c.conv != "normal" for _, c in arch.layers)
        trials.append((arch, round(0.935 - 0.0015 * winograd - rng.random() * 0.01, 4), {}))
    for arch, acc, extra in trials:
        attrs = _attrs(arch, val_acc=acc, **extra)
        study.add_trial(
            optuna.trial.create_trial(values=[acc, attrs["latency_ms"]], user_attrs=attrs)
        )
    # An infeasible trial, two failed ones (one with a latency, one without) and a pruned one.
    arch = _random_arch(rng)
    attrs = _attrs(arch, val_acc=0.5, feasible=False)
    study.add_trial(optuna.trial.create_trial(values=[0.5, attrs["latency_ms"]], user_attrs=attrs))
    study.add_trial(
        optuna.trial.create_trial(
            state=optuna.trial.TrialState.FAIL,
            user_attrs=_attrs(_random_arch(rng), fail_reason="loss is NaN at epoch 2\ntrace..."),
        )
    )
    study.add_trial(
        optuna.trial.create_trial(
            state=optuna.trial.TrialState.FAIL, user_attrs={"fail_reason": "worker died"}
        )
    )
    study.add_trial(
        optuna.trial.create_trial(
            state=optuna.trial.TrialState.PRUNED, user_attrs=_attrs(_random_arch(rng))
        )
    )
    # A differentiable-search result with per-epoch per-layer candidate probabilities.
    arch = _random_arch(rng)
    attrs = _attrs(arch, val_acc=0.905, source="differentiable", probabilities=_probs(arch))
    study.add_trial(
        optuna.trial.create_trial(values=[0.905, attrs["latency_ms"]], user_attrs=attrs)
    )
    return study_dir, study


def _probs(arch: Arch, epochs: int = 4) -> list[dict[str, dict[str, float]]]:
    """Per-epoch ``{layer: {candidate: p}}``, as the differentiable search records them."""
    cands = ["normal/8", "F2-static/8", "F4-flex/8"]
    probs = []
    for epoch in range(epochs):
        per_layer = {}
        for i, (layer, _) in enumerate(arch.layers):
            w = [1.0, 1.0 + epoch * (i % 3), 1.0 + epoch * ((i + 1) % 2)]
            per_layer[layer] = {c: x / sum(w) for c, x in zip(cands, w, strict=True)}
        probs.append(per_layer)
    return probs


def _new_study(study_dir: Path, directions: list[str], **attrs: object) -> optuna.Study:
    study_dir.mkdir(parents=True)
    study = optuna.create_study(
        directions=directions,
        storage=f"sqlite:///{study_dir / 'study.db'}",
        study_name=study_dir.name,
    )
    for key, value in attrs.items():
        study.set_user_attr(key, value)
    return study


def make_scalarized_study(root: Path, name: str = "scalar", weight: float = 0.5):
    """A ``strategy.scalarize`` study: one value, ``score``; val_acc and latency as attributes."""
    normal = Arch.uniform("normal", bits=8, width=WIDTH)
    ref_ms = _attrs(normal)["latency_ms"]
    study = _new_study(
        root / name,
        ["maximize"],
        objectives=["score"],
        scalarization={"latency_weight": weight},
        reference_latency_ms=ref_ms,
        dataset="cifar10",
        sampler="TPESampler",
    )
    rng = random.Random(5)
    entries = [(normal, 0.93, {"reference": "all-normal"})]
    for _ in range(10):
        arch = _random_arch(rng)
        winograd = sum(c.conv != "normal" for _, c in arch.layers)
        entries.append((arch, round(0.935 - 0.0015 * winograd - rng.random() * 0.01, 4), {}))
    entries.append((_random_arch(rng), 0.6, {"feasible": False}))
    arch = _random_arch(rng)
    entries.append(
        (arch, 0.91, {"source": "differentiable", "lambda": 0.5, "probabilities": _probs(arch)})
    )
    for arch, acc, extra in entries:
        attrs = _attrs(arch, val_acc=acc, **extra)
        score = acc - weight * attrs["latency_ms"] / ref_ms
        study.add_trial(optuna.trial.create_trial(value=score, user_attrs=attrs))
    study.add_trial(
        optuna.trial.create_trial(
            state=optuna.trial.TrialState.FAIL,
            user_attrs=_attrs(_random_arch(rng), fail_reason="loss is NaN"),
        )
    )
    return root / name, study


LAMBDAS = (0.0, 0.5, 2.0)


def make_differentiable_study(root: Path, name: str = "dnas"):
    """A study that holds only differentiable-search results, one per lambda."""
    ref_ms = _attrs(Arch.uniform("normal", bits=8, width=WIDTH))["latency_ms"]
    study = _new_study(
        root / name,
        ["maximize", "minimize"],
        objectives=["accuracy", "latency_ms"],
        reference_latency_ms=ref_ms,
        dataset="cifar10",
        sampler="differentiable",
    )
    rng = random.Random(7)
    for i, lam in enumerate(LAMBDAS):
        arch = _random_arch(rng)
        acc = 0.93 - 0.01 * i
        extra = {"lambda": lam, "probabilities": _probs(arch, 3)}
        attrs = _attrs(arch, val_acc=acc, source="differentiable", **extra)
        study.add_trial(
            optuna.trial.create_trial(values=[acc, attrs["latency_ms"]], user_attrs=attrs)
        )
    return root / name, study


def _plot_data(page_text: str) -> list[list[dict]]:
    """The traces of every figure of a page, in order (decoded from the embedded JSON)."""
    decoder = json.JSONDecoder()
    return [
        decoder.raw_decode(page_text, m.end())[0]
        for m in re.finditer(r'Plotly\.newPlot\(\s*"fig\d+",\s*', page_text)
    ]


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, optuna.Study]]:
    """The studies every test reads, built once: a full one, two to compare, an empty one."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    results = tmp_path_factory.mktemp("results")
    return {
        "demo": make_study(results),
        "a": make_study(results, "a", n_random=5, seed=1),
        "b": make_study(results, "b", n_random=7, seed=2),
        "empty": make_study(results, "empty", empty=True),
    }


@pytest.fixture(scope="module")
def demo(tree: dict[str, tuple[Path, optuna.Study]]) -> tuple[Path, optuna.Study]:
    study_dir, study = tree["demo"]
    write_report(study_dir)
    return study_dir, study


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------
def _pareto_numbers(study: optuna.Study) -> set[int]:
    """The front by brute force over feasible completed trials."""
    done = [
        t
        for t in study.get_trials(states=[optuna.trial.TrialState.COMPLETE])
        if t.user_attrs.get("feasible", True)
    ]
    front = set()
    for t in done:
        dominated = any(
            o.values[0] >= t.values[0]
            and o.values[1] <= t.values[1]
            and (o.values[0] > t.values[0] or o.values[1] < t.values[1])
            for o in done
        )
        if not dominated:
            front.add(t.number)
    return front


def test_trials_csv_round_trips_and_agrees_with_study(demo):
    study_dir, study = demo
    df = pd.read_csv(study_dir / "trials.csv")
    trials = study.get_trials()
    assert df["number"].tolist() == [t.number for t in trials]
    assert df["state"].tolist() == [t.state.name for t in trials]
    ref_latency = study.user_attrs["reference_latency_ms"]
    for t in trials:
        row = df[df["number"] == t.number].iloc[0]
        if t.state.name == "COMPLETE":
            assert row["accuracy"] == pytest.approx(t.values[0])
            assert row["latency_ms"] == pytest.approx(t.values[1])
            assert row["speedup"] == pytest.approx(ref_latency / t.values[1])
        else:
            assert math.isnan(row["accuracy"])
        arch_text = t.user_attrs.get("arch")
        if arch_text:
            arch = Arch.from_yaml(arch_text)
            for layer, choice in arch.layers:
                assert row[f"choice:{layer}"] == choice.label
                assert row[f"latency_ms:{layer}"] == pytest.approx(
                    t.user_attrs["layer_latency_ms"][layer]
                )
            assert row["train_seconds"] == pytest.approx(12.5)
        assert (row["reference"] if isinstance(row["reference"], str) else None) == (
            t.user_attrs.get("reference")
        )
    fails = df[df["state"] == "FAIL"]
    assert fails["fail_reason"].tolist() == ["loss is NaN at epoch 2", "worker died"]
    assert df.loc[df["feasible"] == False, "number"].tolist() == [  # noqa: E712
        t.number for t in trials if t.user_attrs.get("feasible") is False
    ]
    assert set(df.loc[df["pareto"] == True, "number"]) == _pareto_numbers(study)  # noqa: E712
    # The in-memory frame is the same table.
    frame = trials_frame(study)
    assert list(frame.columns) == list(df.columns)


def test_pareto_csv(demo):
    study_dir, study = demo
    pareto = pd.read_csv(study_dir / "pareto.csv")
    assert set(pareto["number"]) == _pareto_numbers(study)
    assert pareto["latency_ms"].is_monotonic_increasing
    assert (pareto["state"] == "COMPLETE").all()
    for n, cmd in zip(pareto["number"], pareto["command"], strict=True):
        # Runs as written: export the file, then train it on the study's data.
        export, train = cmd.split(" && ")
        assert export.startswith("python search.py export ")
        assert export.endswith(f"demo --trial {n}")
        assert train.startswith("python train.py --arch ")
        assert f"demo/pareto/trial_{n}.yaml --dataset " in train
    # all-normal is the most accurate, so on the front, at speed-up 1.
    normal = pareto[pareto["reference"] == "all-normal"]
    assert normal["speedup"].tolist() == [pytest.approx(1.0)]


def test_page_contents(demo):
    study_dir, study = demo
    text = (study_dir / "report.html").read_text()
    assert text.count("Plotly.newPlot(") >= 4
    # plotly.js embedded exactly once, no script fetched.
    assert text.count("* plotly.js v") == 1
    assert not re.search(r"<script[^>]*\ssrc=", text)
    for needle in (
        'id="front-table"',
        'id="choice-grid"',
        "Latency by layer",
        "Candidate probabilities",
        "spaces/demo.yaml",
        "Cortex-A73 (analytical)",
        "NSGAIISampler",
        "cifar10 (synthetic)",
        "static-F4",
        "F4-flex/8",
    ):
        assert needle in text, needle
    assert not list(study_dir.glob(".*.tmp"))


def test_empty_study_page_says_so(tree):
    study_dir, _ = tree["empty"]
    page = write_report(study_dir)
    text = page.read_text()
    assert 'id="no-complete"' in text and "No completed trial yet" in text
    assert "1 fail" in text
    assert "Plotly.newPlot" not in text  # no figure, no 4 MB bundle
    df = pd.read_csv(study_dir / "trials.csv")
    assert df["state"].tolist() == ["FAIL"]
    assert pd.read_csv(study_dir / "pareto.csv").empty


def test_storage_with_one_other_named_study_and_out(tree, tmp_path):
    other = tmp_path / "renamed"
    other.mkdir()
    shutil.copy(tree["a"][0] / "study.db", other / "study.db")
    page = write_report(other, out=tmp_path / "pages" / "r.html")
    assert page == tmp_path / "pages" / "r.html" and page.is_file()
    assert (other / "trials.csv").is_file()


def test_comparison(tree, tmp_path):
    page = write_comparison([tree["a"][0], tree["b"][0]], out=tmp_path / "compare.html")
    text = page.read_text()
    assert "a vs b" in text and 'id="studies"' in text
    assert text.count("Plotly.newPlot(") == 2


def test_scalarized_study(tmp_path):
    study_dir, study = make_scalarized_study(tmp_path)
    text = write_report(study_dir).read_text(encoding="utf-8")
    trials = study.get_trials()
    df = pd.read_csv(study_dir / "trials.csv")
    assert list(df.columns[:16]) == [
        "number", "state", "source", "lambda", "reference", "feasible", "pareto", "pick",
        "score", "accuracy", "accuracy_se", "val_images", "accuracy_runs", "accuracy_spread",
        "within_noise_of", "latency_ms",
    ]  # fmt: skip
    for t in trials:
        row = df[df["number"] == t.number].iloc[0]
        if t.state.name == "COMPLETE":
            assert row["score"] == pytest.approx(t.value)
            assert row["accuracy"] == pytest.approx(t.user_attrs["val_acc"])
        else:
            assert math.isnan(row["score"]) and math.isnan(row["accuracy"])
        assert row["latency_ms"] == pytest.approx(t.user_attrs["latency_ms"])
    # The front is over val_acc (max) and latency (min), as the search and export take it.
    expected = {t.number for t in front_trials(trials, ["score"])}
    assert len(expected) > 2
    assert set(df.loc[df["pareto"] == True, "number"]) == expected  # noqa: E712
    pareto = pd.read_csv(study_dir / "pareto.csv")
    assert set(pareto["number"]) == expected and "score" in pareto.columns
    assert pareto["latency_ms"].is_monotonic_increasing
    # The page: accuracy on the plot's y axis, the score in the table, hover and settings.
    assert "<th class=num>score</th>" in text and "Pareto front over" in text
    assert "score = val_acc - 0.5 x latency_ms" in text
    front_plot = [t for t in _plot_data(text)[0] if t.get("meta") == "trial"]
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    assert sorted(x for t in front_plot for x in t["x"]) == sorted(
        t.user_attrs["latency_ms"] for t in complete
    )
    assert sorted(y for t in front_plot for y in t["y"]) == pytest.approx(
        sorted(100 * t.user_attrs["val_acc"] for t in complete)
    )
    hovers = [h for t in front_plot for h in t["hovertext"]]
    assert all(" · score " in h for h in hovers)


def test_differentiable_trials_are_labelled_with_lambda(tmp_path):
    study_dir, study = make_differentiable_study(tmp_path)
    text = write_report(study_dir).read_text(encoding="utf-8")
    df = pd.read_csv(study_dir / "trials.csv")
    assert df["lambda"].tolist() == list(LAMBDAS)
    assert (df["source"] == "differentiable").all()
    stars = [t for t in _plot_data(text)[0] if t["name"].startswith("differentiable search")]
    assert len(stars) == 1
    assert sorted(stars[0]["text"]) == ["λ=0", "λ=0.5", "λ=2"]
    assert sum("λ=0.5 (differentiable)" in h for h in stars[0]["hovertext"]) == 1
    assert "(differentiable)</small>" in text  # the front table
    assert "Trial 2 (λ=2 (differentiable))" in text  # the probabilities shown are the latest
    # The demo study's differentiable trial has no lambda: a star without a label.
    mixed_dir, _ = make_study(tmp_path, "mixed", n_random=3)
    demo_text = write_report(mixed_dir).read_text(encoding="utf-8")
    stars = [t for t in _plot_data(demo_text)[0] if t["name"].startswith("differentiable")]
    assert stars[0]["text"] == [""]
    assert "· differentiable<br>" in stars[0]["hovertext"][0]


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="search.py")
    register(parser.add_subparsers(dest="command", required=True))

    def main(args: list[str] | None) -> int:
        ns = parser.parse_args(args)
        return int(ns.func(ns) or 0)

    return run_main(main, argv)


def test_storage_txt_names_the_storage(tree, tmp_path, monkeypatch):
    """Without --storage, the URL the search recorded in storage.txt comes before study.db."""
    moved = tmp_path / "results" / "moved"
    moved.mkdir(parents=True)
    db = tree["a"][0] / "study.db"
    (moved / "storage.txt").write_text(f"sqlite:///{db}\n")
    monkeypatch.chdir(tmp_path)
    assert _cli(["report", "results/moved"]) == 0
    assert not (moved / "study.db").exists()
    assert len(pd.read_csv(moved / "trials.csv")) == len(tree["a"][1].get_trials())
    assert f"sqlite:///{db}" in (moved / "report.html").read_text()
    # A study the caller holds is labelled with that storage too.
    write_report(moved, study=tree["a"][1], out=tmp_path / "held.html")
    assert f"sqlite:///{db}" in (tmp_path / "held.html").read_text()


def test_cli_writes_report_and_comparison(tree, tmp_path, capsys, monkeypatch):
    study_dir = tmp_path / "results" / "cli"
    study_dir.mkdir(parents=True)
    shutil.copy(tree["a"][0] / "study.db", study_dir / "study.db")
    monkeypatch.chdir(tmp_path)
    assert _cli(["report", "results/cli"]) == 0
    assert (study_dir / "report.html").is_file() and (study_dir / "pareto.csv").is_file()
    assert (
        "python train.py --arch results/cli/pareto/trial_"
        in (study_dir / "pareto.csv").read_text()
    )
    assert _cli(["report", "results/cli", str(tree["b"][0])]) == 0
    assert (tmp_path / "results" / "compare.html").is_file()
    assert "compare.html" in capsys.readouterr().out


@pytest.fixture(scope="module")
def bad_inputs(tree, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bad")
    (root / "bare").mkdir()
    (root / "two").mkdir()
    shutil.copy(tree["a"][0] / "study.db", root / "two" / "study.db")
    optuna.create_study(storage=f"sqlite:///{root / 'two' / 'study.db'}", study_name="q")
    (root / "one").mkdir()
    shutil.copy(tree["a"][0] / "study.db", root / "one" / "study.db")
    (root / "pointer").mkdir()
    (root / "pointer" / "storage.txt").write_text("sqlite:///gone.db\n")
    return root


@pytest.mark.parametrize(
    "argv, message",
    [
        (["report", "nowhere"], "nowhere: no such study folder"),
        (["report", "bare"], "bare: no study.db"),
        (["report", "two", "--study-name", "zzz"], "unknown study 'zzz'"),
        (["report", "two"], "no study named 'two'"),
        (["report", "bare", "--storage", "nosuch.log"], "not a database URL"),
        (["report", "one", "one", "--study-name", "one"], "--study-name picks one study"),
        (["report", "bare", "--storage", "sqlite:///new.db"], "sqlite:///new.db: no such SQLite"),
        (["report", "pointer"], "gone.db (named in pointer/storage.txt): no such SQLite file"),
        (["report", "bare", "--storage", "nosuchdriver://x/y"], "cannot open storage"),
    ],
)
def test_cli_user_errors(bad_inputs, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(bad_inputs)
    assert _cli(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (bad_inputs / "bare" / "study.db").exists()  # a bad call creates nothing
    assert not list(bad_inputs.glob("*.db")) and not list(bad_inputs.glob("*/*.db.*"))
    assert not list(bad_inputs.glob("*/report.html"))


def test_library_raises_user_error(tmp_path):
    with pytest.raises(UserError, match="no such study folder"):
        write_report(tmp_path / "missing")


# ---------------------------------------------------------------------------------------------
# PostgreSQL (CI sets WASEARCH_TEST_POSTGRES=postgresql://postgres@127.0.0.1:5432/test)
# ---------------------------------------------------------------------------------------------
PG_ENV = "WASEARCH_TEST_POSTGRES"


@pytest.fixture()
def pg_study(tmp_path):
    """A study in the PostgreSQL server, under a unique name, deleted afterwards."""
    url = os.environ.get(PG_ENV)
    if not url:
        pytest.skip(f"{PG_ENV} is not set")
    name = f"wasearch-report-test-{uuid.uuid4().hex[:12]}"
    try:
        try:
            study_dir, study = make_study(
                tmp_path / "results", name, n_random=4, storage=driver_url(url)
            )
        except Exception as err:  # noqa: BLE001 - any driver error means no server
            pytest.fail(f"{PG_ENV}={url} is set but the study cannot be written: {err}")
        yield url, study_dir, study
    finally:
        try:
            optuna.delete_study(study_name=name, storage=driver_url(url))
        except KeyError:
            pass


@pytest.mark.postgres
def test_postgres_study(pg_study, tmp_path, monkeypatch):
    url, study_dir, study = pg_study
    monkeypatch.chdir(tmp_path)
    # The URL as a user types it (a bare postgresql://): the report picks the installed driver.
    assert _cli(["report", str(study_dir), "--storage", url]) == 0
    df = pd.read_csv(study_dir / "trials.csv")
    assert df["number"].tolist() == [t.number for t in study.get_trials()]
    assert set(pd.read_csv(study_dir / "pareto.csv")["number"]) == _pareto_numbers(study)
    # As the search leaves it: the URL in storage.txt, no --storage needed.
    (study_dir / "trials.csv").unlink()
    (study_dir / "storage.txt").write_text(url + "\n")
    assert _cli(["report", str(study_dir)]) == 0
    assert (study_dir / "trials.csv").is_file() and not (study_dir / "study.db").exists()
    assert redact(url) in (study_dir / "report.html").read_text()


# ---------------------------------------------------------------------------------------------
# A real headless browser
# ---------------------------------------------------------------------------------------------
_CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-extensions",
    "--no-first-run",
    "--mute-audio",
    "--hide-scrollbars",
    "--enable-logging=stderr",
    "--v=0",
    "--virtual-time-budget=8000",
]


def _browser() -> Path:
    if CHROMIUM.exists():
        return CHROMIUM
    if os.environ.get("CI"):
        pytest.fail(f"{CHROMIUM} is missing: run .ci/install_browser.sh")
    pytest.skip(f"{CHROMIUM} is missing (bash .ci/install_browser.sh installs it)")


def _chromium(page: Path, profile: Path, *extra: str) -> tuple[str, list[str]]:
    """Load ``page``; return stdout and the console messages chromium logged."""
    proc = subprocess.run(
        [str(_browser()), *_CHROMIUM_FLAGS, f"--user-data-dir={profile}", *extra, page.as_uri()],
        capture_output=True,
        encoding="utf-8",
        errors="replace",
        timeout=120,
    )
    console = [ln for ln in proc.stderr.splitlines() if ":CONSOLE" in ln or "Uncaught" in ln]
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout, console


def _status(dom: str) -> dict[str, str]:
    tag = re.search(r'<div id="report-status"[^>]*>', dom)
    assert tag, "no status element in the DOM"
    return dict(re.findall(r'data-([a-z-]+)="([^"]*)"', tag.group(0)))


def test_console_check_catches_a_broken_page(tmp_path):
    page = tmp_path / "broken.html"
    page.write_text(
        '<html><body><div id="report-status"></div>'
        "<script>document.body.dataset.x = 1; notAFunction();</script></body></html>"
    )
    _, console = _chromium(page, tmp_path / "profile", "--dump-dom")
    assert any("Uncaught ReferenceError" in line for line in console), console


def test_report_renders_in_headless_chromium(demo, tmp_path):
    study_dir, study = demo
    page = study_dir / "report.html"
    dom, console = _chromium(page, tmp_path / "profile", "--dump-dom")
    assert console == [], console
    status = _status(dom)
    assert "js-errors" not in status, status
    assert status["plots-rendered"] == status["plots-expected"], status
    assert int(status["plots-expected"]) >= 5
    complete = study.get_trials(states=[optuna.trial.TrialState.COMPLETE])
    failed_with_latency = [
        t
        for t in study.get_trials(states=[optuna.trial.TrialState.FAIL])
        if "latency_ms" in t.user_attrs
    ]
    assert int(status["trial-points"]) == len(complete)
    assert int(status["failed-points"]) == len(failed_with_latency)
    # The markers plotly drew: each completed trial once, plus the failed ones.
    assert int(status["svg-points"]) == len(complete) + len(failed_with_latency)
    assert 'class="main-svg"' in dom

    shot = tmp_path / "report.png"
    _chromium(page, tmp_path / "profile2", f"--screenshot={shot}", "--window-size=1400,2000")
    assert shot.is_file() and shot.stat().st_size > 50_000
    if os.environ.get("WASEARCH_KEEP_SCREENSHOT"):
        shutil.copy(shot, os.environ["WASEARCH_KEEP_SCREENSHOT"])


def test_comparison_renders_in_headless_chromium(tree, tmp_path):
    (a, sa), (b, sb) = tree["a"], tree["b"]
    page = write_comparison([a, b], out=tmp_path / "compare.html")
    dom, console = _chromium(page, tmp_path / "profile", "--dump-dom")
    assert console == [], console
    status = _status(dom)
    n = sum(len(s.get_trials(states=[optuna.trial.TrialState.COMPLETE])) for s in (sa, sb))
    assert status["plots-rendered"] == status["plots-expected"] == "2"
    assert int(status["trial-points"]) == n == int(status["svg-points"])


def test_comparison_of_optuna_and_differentiable_studies_renders(tree, tmp_path):
    (a, sa) = tree["a"]
    dnas_dir, dnas = make_differentiable_study(tmp_path)
    page = write_comparison([a, dnas_dir], out=tmp_path / "mixed.html")
    text = page.read_text(encoding="utf-8")
    assert "a vs dnas" in text
    front_plot = _plot_data(text)[0]
    labels = [x for t in front_plot for x in t.get("text", []) if x]
    assert sorted(labels) == ["λ=0", "λ=0.5", "λ=2"]
    hovers = [h for t in front_plot for h in t["hovertext"]]
    assert sum("λ=0.5 (differentiable)" in h for h in hovers) == 1
    dom, console = _chromium(page, tmp_path / "profile", "--dump-dom")
    assert console == [], console
    status = _status(dom)
    assert "js-errors" not in status, status
    n = sum(len(s.get_trials(states=[optuna.trial.TrialState.COMPLETE])) for s in (sa, dnas))
    assert status["plots-rendered"] == status["plots-expected"] == "2"
    assert int(status["trial-points"]) == n == int(status["svg-points"])
    assert "λ=0.5" in dom  # the labels drawn


# ---------------------------------------------------------------------------------------------
# What a new user reads first: synthetic data said everywhere, counts that agree, plots that
# say something, and no markup from the study interpreted as the page's own
# ---------------------------------------------------------------------------------------------
def _header(page_text: str) -> str:
    return re.search(r'<p class="sub">(.*?)</p>', page_text, re.S).group(1)


def _figures(page_text: str) -> list[tuple[list[dict], dict]]:
    """(traces, layout) of every figure of a page."""
    decoder, out = json.JSONDecoder(), []
    for m in re.finditer(r'Plotly\.newPlot\(\s*"fig\d+",\s*', page_text):
        data, end = decoder.raw_decode(page_text, m.end())
        layout, _ = decoder.raw_decode(
            page_text, re.compile(r"\s*,\s*").match(page_text, end).end()
        )
        out.append((data, layout))
    return out


def _strings(obj: object):
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)


def test_synthetic_results_say_so_in_every_file(tree, tmp_path, capsys, monkeypatch):
    study_dir, _ = tree["demo"]
    write_report(study_dir)
    assert _header((study_dir / "report.html").read_text()).startswith("SYNTHETIC data (")
    for name in ("trials.csv", "pareto.csv"):
        assert pd.read_csv(study_dir / name)["synthetic"].tolist() != []
        assert pd.read_csv(study_dir / name)["synthetic"].all()
    dnas_dir, _ = make_differentiable_study(tmp_path)  # cifar10, real
    text = write_report(dnas_dir).read_text(encoding="utf-8")
    assert "SYNTHETIC" not in text and not pd.read_csv(dnas_dir / "trials.csv")["synthetic"].any()
    # The comparison page: all synthetic, or which of them.
    both = write_comparison([tree["a"][0], tree["b"][0]], out=tmp_path / "ab.html").read_text()
    assert _header(both).startswith("SYNTHETIC data (generated images")
    assert both.count("<td>cifar10 (synthetic)</td>") == 2
    mixed = write_comparison([tree["a"][0], dnas_dir], out=tmp_path / "ad.html").read_text()
    assert _header(mixed).startswith("SYNTHETIC data in a (generated images")
    assert mixed.count("<td>cifar10 (synthetic)</td>") == 1 and "<td>cifar10</td>" in mixed
    # A study from before the flag: its dataset is "synthetic".
    old = _new_study(tmp_path / "old", ["maximize", "minimize"], dataset="synthetic")
    arch = Arch.uniform("normal", bits=8, width=WIDTH)
    attrs = _attrs(arch, val_acc=0.5)
    old.add_trial(optuna.trial.create_trial(values=[0.5, attrs["latency_ms"]], user_attrs=attrs))
    assert _header(write_report(tmp_path / "old").read_text()).startswith("SYNTHETIC data (")
    assert "<dd>synthetic</dd>" in (tmp_path / "old" / "report.html").read_text()
    # What the command prints.
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tree["a"][0], tmp_path / "results" / "a")
    assert _cli(["report", "results/a"]) == 0
    assert "(SYNTHETIC data: generated images" in capsys.readouterr().out
    assert _cli(["report", "results/a", str(dnas_dir)]) == 0
    assert "(SYNTHETIC data in a: generated images" in capsys.readouterr().out


def _legend_counts(page_text: str) -> tuple[int, int, int]:
    """(the line's count, the front points counted group by group, references on the front)."""
    names = [t["name"] for t in _plot_data(page_text)[0]]
    line = int(next(re.fullmatch(r"Pareto front \((\d+)\)", n) for n in names if "Pareto" in n)[1])
    counted = refs = 0
    for name in names:
        if m := re.fullmatch(r"searched, on the front \((\d+)\)", name):
            counted += int(m[1])
        elif m := re.search(r", (\d+) on the front\)$", name):
            counted += int(m[1])
            refs += int(m[1]) if name.startswith("references") else 0
    return line, counted, refs


def test_legend_counts_the_front_as_the_header_does(tree, tmp_path):
    scalar_dir, _ = make_scalarized_study(tmp_path)
    dnas_dir, _ = make_differentiable_study(tmp_path)
    for study_dir in (tree["demo"][0], tree["a"][0], scalar_dir, dnas_dir):
        text = write_report(study_dir).read_text(encoding="utf-8")
        header = _header(text)
        n_front = int(re.search(r"(\d+) on the Pareto front \(|(\d+) on the Pareto front", header)
                      .group(0).split()[0])  # fmt: skip
        m = re.search(r"\((\d+) of them reference", header)
        n_refs = int(m[1]) if m else 0
        assert n_front == len(pd.read_csv(study_dir / "pareto.csv"))
        assert _legend_counts(text) == (n_front, n_front, n_refs), study_dir.name
    assert _legend_counts((tree["demo"][0] / "report.html").read_text())[2] >= 1
    # A front over more than accuracy and latency: the header names its axes.
    study = _new_study(tmp_path / "three", ["maximize", "minimize", "minimize"],
                       objectives=["accuracy", "latency_ms", "params"])  # fmt: skip
    rng = random.Random(3)
    for _ in range(6):
        attrs = _attrs(_random_arch(rng), val_acc=round(rng.uniform(0.8, 0.9), 3))
        values = [attrs["val_acc"], attrs["latency_ms"], attrs["params"]]
        study.add_trial(optuna.trial.create_trial(values=values, user_attrs=attrs))
    header = _header(write_report(tmp_path / "three").read_text())
    assert "on the Pareto front over accuracy (max), latency_ms (min), params (min)" in header


def _sized_study(study_dir: Path, params: list[float], bitops: list[float]) -> None:
    study = _new_study(study_dir, ["maximize", "minimize"], dataset="cifar10")
    rng = random.Random(4)
    for p, b in zip(params, bitops, strict=True):
        attrs = _attrs(_random_arch(rng), val_acc=round(rng.uniform(0.8, 0.9), 3))
        attrs.update(params=p, bitops=b)
        study.add_trial(
            optuna.trial.create_trial(
                values=[attrs["val_acc"], attrs["latency_ms"]], user_attrs=attrs
            )
        )


def _x_titles(page_text: str) -> list[str | None]:
    return [lay.get("xaxis", {}).get("title", {}).get("text") for _, lay in _figures(page_text)]


def test_size_is_plotted_only_where_it_varies(tmp_path):
    """Parameters within 1% of each other: bit-operations are plotted; neither varying: no
    size view at all."""
    _sized_study(tmp_path / "flat", [150_000, 150_400, 151_000], [2e9, 3e9, 4e9])
    text = write_report(tmp_path / "flat").read_text()
    assert "Accuracy against size" in text and 'href="#cost"' in text
    titles = _x_titles(text)
    assert "bit-operations" in titles and "parameters" not in titles
    assert "Not plotted: parameters" in text
    _sized_study(tmp_path / "none", [150_000] * 3, [2e9, 2.001e9, 2.002e9])
    text = write_report(tmp_path / "none").read_text()
    assert "Accuracy against size" not in text and 'href="#cost"' not in text
    titles = _x_titles(text)
    assert "bit-operations" not in titles and "parameters" not in titles
    _sized_study(tmp_path / "both", [150_000, 160_000, 170_000], [2e9, 3e9, 4e9])
    titles = _x_titles(write_report(tmp_path / "both").read_text())
    assert "bit-operations" in titles and "parameters" in titles


def test_every_string_from_the_study_is_escaped(tmp_path):
    """Markup in any name, label, reason or setting is shown as text: never as HTML, never
    as plotly's rich text."""
    mark = "<u>x</u>"
    study_dir = tmp_path / f"st{mark.replace('/', '')}"
    study = _new_study(
        study_dir,
        ["maximize", "minimize"],
        dataset=f"cifar{mark}",
        sampler=f"S{mark}",
        latency_device=f"D{mark}",
        space_path=f"spaces/{mark}.yaml",
        latency_model={"kind": mark},
        created=mark,
        reference_latency_ms=5.0,
        reference_layer_latency_ms={f"{mark}.conv": 1.0},
    )
    layers = {f"{mark}{i}.conv": {"conv": "flex", "tile": 4, "bits": 8} for i in range(3)}
    import yaml

    arch_text = yaml.safe_dump({"backbone": "resnet18", "width": WIDTH, "layers": layers})
    probs = [{f"{mark}0.conv": {f"c{mark}": 0.5, "normal/8": 0.5}}] * 2
    for i, extra in enumerate(
        [{"reference": f"ref{mark}"}, {"source": "differentiable", "probabilities": probs}, {}]
    ):
        attrs = {
            "arch": arch_text,
            "arch_summary": f"sum{mark}",
            "latency_ms": 4.0 - i,
            "layer_latency_ms": {f"{mark}{j}.conv": 0.5 for j in range(3)},
            "params": 1000 * (i + 1),
            **extra,
        }
        study.add_trial(
            optuna.trial.create_trial(values=[0.9 - 0.1 * i, 4.0 - i], user_attrs=attrs)
        )
    study.add_trial(
        optuna.trial.create_trial(
            state=optuna.trial.TrialState.FAIL,
            user_attrs={"fail_reason": f"boom {mark}", "latency_ms": 2.0},
        )
    )
    for text in (
        write_report(study_dir).read_text(encoding="utf-8"),
        write_comparison([study_dir, study_dir], out=tmp_path / "c.html").read_text(),
    ):
        html_only = re.sub(r"<script\b.*?</script>", "", text, flags=re.S)
        assert "<u>" not in html_only and "&lt;u&gt;x&lt;/u&gt;" in html_only
        figures = _figures(text)
        assert figures
        shown = [s for fig in figures for s in _strings(list(fig))]
        assert not [s for s in shown if "<u>" in s]
        assert any("&lt;u&gt;x&lt;/u&gt;" in s for s in shown)


# ---------------------------------------------------------------------------------------------
# Results that show their noise
# ---------------------------------------------------------------------------------------------
VAL_IMAGES = 5000


def make_noisy_study(root: Path, name: str = "noisy", *, space: dict | None = None):
    """The issue's study: on 5,000 validation images, uniform static F4 (66.72 %, 3.27 ms) and
    a mixed architecture 0.1 point better (66.82 %, 3.95 ms) both on the front, all-normal at
    66.90 % (5.0 ms); each trial records its images and standard error as the search does."""
    from wasearch.search.record import noise_attrs

    normal = Arch.uniform("normal", bits=8, width=WIDTH)
    study = _new_study(
        root / name,
        ["maximize", "minimize"],
        objectives=["accuracy", "latency_ms"],
        reference_latency_ms=5.0,
        dataset="cifar10",
        space=space or {"name": name},
    )
    rng = random.Random(11)
    entries = [
        (normal, 0.6690, 5.0, {"reference": "all-normal"}),
        (Arch.uniform("static", 4, 8, width=WIDTH), 0.6672, 3.27, {"reference": "static-F4"}),
        (_random_arch(rng), 0.6682, 3.95, {}),
        (_random_arch(rng), 0.6100, 2.10, {}),  # fast and clearly worse
        (_random_arch(rng), 0.6500, 4.50, {}),  # dominated
        # static F4 again (a searched trial): two runs of one architecture, and their spread
        (Arch.uniform("static", 4, 8, width=WIDTH), 0.6660, 3.27, {}),
    ]
    for arch, acc, ms, extra in entries:
        attrs = _attrs(arch, val_acc=acc, **extra)
        attrs.update(latency_ms=ms, **noise_attrs(acc, VAL_IMAGES))
        study.add_trial(optuna.trial.create_trial(values=[acc, ms], user_attrs=attrs))
    return root / name, study


def test_points_the_noise_cannot_tell_apart_are_flagged_and_the_faster_is_picked(tmp_path):
    study_dir, _ = make_noisy_study(tmp_path)
    text = write_report(study_dir).read_text(encoding="utf-8")
    df = pd.read_csv(study_dir / "trials.csv").set_index("number")
    se = math.sqrt(0.6672 * (1 - 0.6672) / VAL_IMAGES)
    assert df.loc[1, "accuracy_se"] == pytest.approx(se)
    assert (df["val_images"] == VAL_IMAGES).all()
    # Static F4 (trial 1) is the pick; the mixed one (2) and all-normal (0) are within the
    # noise of it, and say so; the fast, worse trial 3 is on the front but apart.
    assert df.index[df["pick"]].tolist() == [1]
    assert df.loc[2, "within_noise_of"] == 1 and df.loc[0, "within_noise_of"] == 1
    assert math.isnan(df.loc[1, "within_noise_of"]) and math.isnan(df.loc[3, "within_noise_of"])
    assert set(df.index[df["pareto"]]) == {0, 1, 2, 3}
    pick = re.search(r'<p class="pick" id="pick">(.*?)</p>', text, re.S).group(1)
    assert pick.startswith("Pick: trial 1 (static-F4: 66.72% ± 0.67, 3.27 ms, 1.53x faster")
    assert "fastest of 4 trials within 1 standard error of the best accuracy" in pick
    assert df.loc[1, "accuracy_runs"] == df.loc[5, "accuracy_runs"] == 2
    assert df.loc[5, "accuracy_spread"] == pytest.approx(0.0012 / math.sqrt(2))
    assert df.loc[2, "accuracy_runs"] == 1 and math.isnan(df.loc[2, "accuracy_spread"])
    assert "as good as all-normal (within 1 standard error): the pick" in pick
    table = re.search(r'<table id="front-table">.*?</table>', text, re.S).group(0)
    assert "66.82% ± 0.67" in table and "trial 1 (faster)" in table
    # Error bars on the accuracy axis, the front's band, the pick marked on the plot.
    traces, layout = _figures(text)[0]
    trial_traces = [t for t in traces if t.get("meta") == "trial" and t["x"]]
    assert trial_traces and all(t["error_y"]["visible"] for t in trial_traces)
    bars = {round(v, 2) for t in trial_traces for v in t["error_y"]["array"]}
    assert bars <= {0.65, 0.66, 0.67, 0.69}, bars
    assert any(t.get("meta") == "front-band" and t["fill"] == "toself" for t in traces)
    assert [a["text"] for a in layout["annotations"]] == ["pick: trial 1"]


def test_tolerance_from_the_space_and_from_the_flag(tmp_path, monkeypatch, capsys):
    study_dir, _ = make_noisy_study(tmp_path, space={"name": "noisy", "report": {"tolerance": 0}})
    write_report(study_dir)
    # At tolerance 0 the most accurate trial (all-normal) is the pick.
    assert pd.read_csv(study_dir / "trials.csv").query("pick")["number"].tolist() == [0]
    monkeypatch.chdir(tmp_path)
    assert _cli(["report", "noisy", "--tolerance", "1"]) == 0
    out = capsys.readouterr().out
    assert "Pick: trial 1 (static-F4" in out
    assert pd.read_csv(study_dir / "trials.csv").query("pick")["number"].tolist() == [1]
    assert "<dt>tolerance</dt><dd>1 standard error" in (study_dir / "report.html").read_text()
    with pytest.raises(SystemExit) as stop:  # argparse: one line naming the flag, exit 2
        _cli(["report", "noisy", "--tolerance", "-1"])
    assert stop.value.code == 2 and "argument --tolerance: '-1' must be >= 0" in (
        capsys.readouterr().err
    )


def test_noise_columns_round_trip_through_pandas(tmp_path):
    study_dir, study = make_noisy_study(tmp_path)
    write_report(study_dir)
    frame = trials_frame(study)
    for name in ("trials.csv", "pareto.csv"):
        back = pd.read_csv(study_dir / name)
        assert [c for c in back.columns if c != "command"] == list(frame.columns)
        rows = frame.set_index("number").loc[back["number"]]
        for col in ("accuracy_se", "val_images", "within_noise_of", "accuracy_spread"):
            assert back[col].to_numpy(float) == pytest.approx(
                rows[col].to_numpy(float), nan_ok=True
            ), col
        assert back["pick"].tolist() == rows["pick"].tolist()


def test_an_older_study_without_image_counts_still_reports_and_says_so(tree):
    study_dir, _ = tree["a"]
    text = write_report(study_dir).read_text(encoding="utf-8")
    pick = re.search(r'<p class="pick" id="pick">(.*?)</p>', text, re.S).group(1)
    assert "accuracies carry no standard error" in pick
    df = pd.read_csv(study_dir / "trials.csv")
    assert df["accuracy_se"].isna().all() and df["pick"].sum() == 1


def test_the_page_shows_error_bars_and_the_pick_in_headless_chromium(tmp_path):
    study_dir, study = make_noisy_study(tmp_path)
    page = write_report(study_dir)
    dom, console = _chromium(page, tmp_path / "profile", "--dump-dom")
    assert console == [], console
    status = _status(dom)
    assert status["plots-rendered"] == status["plots-expected"], status
    # Every completed trial drawn once (the marks are outlines, not extra markers) ...
    assert int(status["svg-points"]) == int(status["trial-points"]) == len(study.trials)
    # ... each with its error bar, and the pick named on the plot and in the header.
    first_plot = dom.split('id="fig1"')[0]
    assert first_plot.count('class="errorbar"') >= len(study.trials)
    assert "pick: trial 1" in first_plot
    assert 'id="pick"' in dom and "Pick: trial 1 (static-F4" in dom
