"""benchmarks/search_real.py: its helpers, both shipped spaces, and its whole path in miniature
(--tiny on a generated CIFAR-10-like ImageFolder, through the real-data loader): the rows it
records, a rerun that resumes without training again, the report naming its targets, and a
missing dataset ending in one line."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from benchmark_module import load_benchmark

from wasearch.cli import run_main
from wasearch.search.space import load_space

sr = load_benchmark("search_real")
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["cifar10_mini.yaml", "cifar10_mini_dnas.yaml"])
def test_spaces_load(name, monkeypatch):
    monkeypatch.chdir(ROOT)
    space = load_space(ROOT / "spaces" / name)
    assert space.data["dataset"] == "cifar10" and space.data["val_fraction"] == 0.1
    assert space.model["width"] == 0.25 and space.choices["granularity"] == ["tap"]
    assert space.trial["max_batches"] == 150 and space.trial["lr"] == "auto"
    assert space.base["epochs"] == 5 and space.base["lr"] == 0.001
    assert space.latency == {"kind": "analytical", "profile": "cortex-a73", "batch": 1}
    assert len(space.units) == 8  # one unit per residual block
    labels = set(space.units[0].labels)
    assert {"normal/8", "F6-static/8tx", "F6-flex/8tx"} <= labels
    assert "F6-static/8tx" not in space.units[-1].labels  # layer4's 4x4 inputs
    if "dnas" in name:
        assert space.strategy["name"] == "differentiable" and len(space.strategy["lambdas"]) >= 2
    else:
        assert space.strategy["name"] in ("nsga2", "tpe") and space.budget["trials"] >= 20


def test_front_and_tau():
    pts = [
        {"val_acc": a, "latency_ms": {"x": lat}}
        for a, lat in [(0.7, 3.0), (0.6, 1.0), (0.65, 2.5), (0.5, 2.0), (0.7, 4.0)]
    ]
    assert [(p["val_acc"], p["latency_ms"]["x"]) for p in sr.front(pts, "x")] == [
        (0.6, 1.0),
        (0.65, 2.5),
        (0.7, 3.0),
    ]
    assert sr.kendall_tau([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)


def test_verification_fills_from_the_next_pareto_layers():
    """A front made only of references (uniform static F4 fastest, all-normal most accurate)
    must still send sampled architectures to the longer budget: the next Pareto layers'."""

    def pt(n, acc, lat, ref=None):
        return {"number": n, "arch": f"a{n}", "arch_summary": f"s{n}", "val_acc": acc,
                "val_se": 0.01, "reference": ref, "latency_ms": {"m": lat}}  # fmt: skip

    pts = [
        pt(0, 0.70, 4.0, "all-normal"), pt(1, 0.68, 3.0, "static-F4"),
        pt(2, 0.69, 3.5), pt(3, 0.685, 3.6), pt(4, 0.66, 3.9), pt(5, 0.67, 5.0),
    ]  # fmt: skip
    layers = sr.pareto_layers(pts, "m")
    assert [[p["number"] for p in layer] for layer in layers] == [[1, 2, 0], [3], [4, 5]]
    chosen = sr.verification_set(pts, sr.Setting(front_max=3), "m")
    assert [(c["name"], c["pareto_layer"]) for c in chosen] == [
        ("all-normal", None), ("static-F4", None), ("trial-2", 1), ("trial-3", 2), ("trial-4", 3),
    ]  # fmt: skip
    assert len(sr.verification_set(pts, sr.Setting(front_max=1), "m")) == 3


def test_tiny_run_records_resumes_and_reports(tiny_cifar, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WASEARCH_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "o" / "sr.json"
    argv = [
        "--tiny", "--data-dir", str(tiny_cifar), "--work-dir", str(tmp_path / "work"),
        "--out", str(out), "--device", "cpu", "--threads", "1",
    ]  # fmt: skip
    assert sr.main(argv) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["benchmark"] == "search_real" and "cores" in last["machine"]
    assert last["trials"] == 2 and last["dnas_points"] == 1 and last["verified"] == 1
    saved = json.loads(out.read_text())
    rows = saved["rows"]
    assert {"base", "search", "dnas", "latency_table", "verify_set"} <= set(rows)
    assert {"long|all-normal|0", "long|all-normal|1", "proxy|all-normal|1"} <= set(rows)
    long = rows["long|all-normal|0"]
    assert 0 <= long["test_acc"] <= 1 and long["test_se"] > 0 and long["test_images"] == 30
    assert Path(rows["latency_table"]["path"]).is_file()
    for p in saved["points"]["optuna"] + saved["points"]["dnas"]:
        assert set(p["latency_ms"]) == {"a73", "here"} and p["latency_ms"]["here"] > 0
    assert saved["points"]["dnas"][0]["source"] == "differentiable"
    assert saved["machine"] == last["machine"]
    md = out.with_suffix(".md").read_text()
    for target in ("dominates or matches every uniform reference", "within 0.5 point",
                   "Kendall tau", "Differentiable points", "2.66x", "Machine: cpu"):  # fmt: skip
        assert target in md, target
    assert "Wall time per part" in md
    figure = Path(last["figure"])
    assert figure.is_file() and figure.suffix in (".png", ".html")

    # A rerun keeps every row, trains nothing again and is fast.
    t0 = time.perf_counter()
    assert sr.main(argv) == 0
    assert time.perf_counter() - t0 < 15
    again = json.loads(out.read_text())
    assert again["rows"] == rows
    assert len(again["points"]["optuna"]) == 2
    assert "resuming: 8 rows" in capsys.readouterr().err


def test_figure_falls_back_to_html_when_png_export_fails(tmp_path, monkeypatch, capsys):
    """kaleido installed but no browser to drive: the run must not end in a traceback after
    hours of work; it writes the HTML figure and says why, leaving no partial PNG."""
    import plotly.graph_objects as go

    def fail(*_args, **_kwargs):
        raise RuntimeError("Kaleido requires Google Chrome to be installed.\nmore")

    real = sr.importlib.util.find_spec
    monkeypatch.setattr(
        sr.importlib.util,
        "find_spec",
        lambda name, *a: object() if name == "kaleido" else real(name, *a),
    )
    monkeypatch.setattr(go.Figure, "write_image", fail)
    point = {"latency_ms": {"a73": 1.0}, "val_acc": 0.5, "reference": None, "arch": "a"}
    points = {"optuna": [{**point, "arch_summary": "normal/8 x16"}], "dnas": []}
    path = sr.write_figure({"models": ["a73"], "verified": []}, points, tmp_path / "fig")
    assert path == tmp_path / "fig.html" and path.is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fig.html"]
    err = capsys.readouterr().err
    assert "no PNG (Kaleido requires Google Chrome to be installed.)" in err


def test_missing_data_is_one_line(tmp_path, capsys):
    common = ["--tiny", "--work-dir", str(tmp_path / "w"), "--out", str(tmp_path / "o.json")]
    assert run_main(sr.main, [*common, "--data-dir", str(tmp_path / "missing")]) == 2
    err = [
        line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("error")
    ]
    assert len(err) == 1 and "--data-dir" in err[0] and "ImageFolder" in err[0]
    assert not (tmp_path / "w").exists() and not (tmp_path / "o.json").exists()
