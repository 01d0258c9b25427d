"""benchmarks/paper_claims.py end to end on a tiny generated CIFAR-10-like ImageFolder: every
section runs and renders, and a rerun keeps the rows it may keep and measures only what is new."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, replace

import pytest
import torch
from benchmark_module import load_benchmark

pc = load_benchmark("paper_claims")

TINY = [
    "--train-images", "60", "--test-images", "30", "--val-fraction", "0.1",
    "--batch-size", "10", "--base-epochs", "1",
    "--adapt-steps", "2", "--adapt-chunks", "1", "--adapt-tiles", "4",
    "--transform-lr-tiles", "4", "--error-images", "10", "--calib-batches", "1",
    "--warmup-batches", "1", "--device", "cpu", "--frontier-cells", "6", "8",
]  # fmt: skip


@pytest.fixture(scope="module")
def first_run(tiny_cifar, tmp_path_factory):
    work = tmp_path_factory.mktemp("pc")
    mp = pytest.MonkeyPatch()
    mp.setenv("WASEARCH_CACHE", str(work / "cache"))
    try:
        out = work / "out" / "claims.md"
        args = [*TINY, "--data-dir", str(tiny_cifar), "--work-dir", str(work), "--out", str(out)]
        assert pc.main(args) == 0
    finally:
        mp.undo()
    return work, out, args


def test_every_section_is_measured_and_rendered(first_run, capsys):
    _work, out, _args = first_run
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["command"].startswith("python benchmarks/paper_claims.py --train-images 60")
    assert len(report["base"]["sha256"]) == 16
    # 16 searchable layers; direct at 8 and 16 bits, static F2/F4/F6 x 2 bits x 2 granularities
    assert {(e["conv"], e["tile"]) for e in report["error"]} == {
        ("direct", None),
        ("static", 2),
        ("static", 4),
        ("static", 6),
    }
    assert all(e["layers"] == 16 for e in report["error"])
    assert report["flex_initial_equals_static"] is True
    # (8, 16 bits) x 3 tiles x 2 granularities, plus 8-bit float transforms x 3 tiles x 2
    assert len(report["conversion"]) == 18
    configs = [(r["config"], r["transform_lr"], r["steps"]) for r in report["adaptation"]]
    assert configs == [
        ("normal 8-bit", None, 2),
        ("static F4 8-bit per-tensor", None, 2),
        ("flex F4 8-bit per-tensor", None, 2),
        ("static F4 8-bit tap-wise", None, 2),
        ("flex F4 8-bit tap-wise", None, 2),
        ("flex F4 8-bit per-tensor", pytest.approx(1e-2), 2),
    ]
    for r in report["adaptation"]:
        assert 0.0 <= r["test_acc"] <= 1.0
        assert (r["transform_drift"] is None) == (r["conv"] != "flex")
    assert report["long"] == [] and report["reused"] == {}
    md = out.read_text()
    for heading in ("## 1. Numerical error", "## 2. Conversion", "## 3. Adaptation", "## 4. "):
        assert heading in md
    assert "## 5." not in md  # no --long-steps
    # The frontier: normal 8-bit plain and distilled, F6 8-bit with each layer lever alone,
    # both, both distilled; the errors of every distinct configuration, stage by stage.
    levers = [(r["tile"], r["transforms"], r["wd_bits"], r["distill"]) for r in report["frontier"]]
    assert levers == [
        (None, "tensor", None, 0.0),
        (None, "tensor", None, 0.5),
        (6, "tensor", None, 0.0),
        (6, "tap", None, 0.0),
        (6, "tensor", 10, 0.0),
        (6, "tap", 10, 0.0),
        (6, "tap", 10, 0.5),
    ]
    assert all(0.0 <= r["converted_acc"] <= 1.0 for r in report["frontier"])
    errors = {(e["tile"], e["transforms"], e["wd_bits"]): e for e in report["frontier_error"]}
    assert len(errors) == 5
    # exact transforms remove the transform stage's error; a wider domain shrinks the product's
    assert errors[(6, "tap", None)]["transform"] < errors[(6, "tensor", None)]["transform"] / 5
    assert errors[(6, "tensor", 10)]["product"] < errors[(6, "tensor", None)]["product"]
    assert "## 7. The fidelity frontier" in md
    assert "F6 8-bit within 1 point of normal 8-bit: **" in md
    # The machine the rows were measured on (this one: a fresh run), above the tables.
    machine = md.splitlines()[4]
    assert machine.startswith("Machine: cpu: ")
    assert f"ISA {torch.backends.cpu.get_cpu_capability()}" in machine and " threads" in machine
    assert report["machine"]["line"] in machine
    # Every adaptation accuracy with its standard error on the 30 test images.
    normal = report["adaptation"][0]
    se = math.sqrt(normal["test_acc"] * (1 - normal["test_acc"]) / 30)
    assert f"{100 * normal['test_acc']:.1f} ({100 * se:.2f})" in md


def test_rerun_keeps_measured_rows_and_adds_the_new_section(first_run, monkeypatch, capsys):
    work, out, args = first_run
    before = json.loads(out.with_suffix(".json").read_text())
    monkeypatch.setenv("WASEARCH_CACHE", str(work / "cache"))
    assert pc.main([*args, "--long-steps", "3", "--long-tiles", "4"]) == 0
    err = capsys.readouterr().err
    assert "base: reusing" in err
    measured = [
        line
        for line in err.splitlines()
        if line.startswith(("conversion: F", "adaptation: normal", "adaptation: static"))
        or line.startswith(("adaptation: flex", "error: layer"))
    ]
    assert measured == []  # nothing measured again
    assert "adaptation: 6 rows kept" in err
    after = json.loads(out.with_suffix(".json").read_text())
    assert after["reused"] == {"error": 14, "conversion": 18, "adaptation": 6, "frontier": 7}
    assert after["frontier"] == before["frontier"]
    for key in ("error", "error_by_stage", "conversion", "adaptation"):
        assert after[key] == before[key]
    assert [(r["config"], r["steps"]) for r in after["long"]] == [
        ("static F4 8-bit per-tensor", 3),
        ("flex F4 8-bit per-tensor", 3),
        ("flex F4 8-bit per-tensor", 3),  # at the transform lr of section 4
    ]
    assert [r["transform_lr"] for r in after["long"]] == [None, None, pytest.approx(1e-2)]
    md = out.read_text()
    assert "## 5. A longer budget: 3 steps instead of 2" in md
    assert "Rows kept from an earlier run" in md
    # ... and where they were measured: the earlier run's machine, as it recorded it.
    assert after["machine"]["earlier_rows"] == [before["machine"]["line"]]
    assert f"They were measured on: {before['machine']['line']}." in md


def test_earlier_rows_stand_only_for_the_same_base_and_setting(first_run, tmp_path):
    _work, out, _args = first_run
    saved = json.loads(out.with_suffix(".json").read_text())
    setting = pc.Setting(**{k: tuple(v) if isinstance(v, list) else v
                            for k, v in saved["setting"].items()})  # fmt: skip
    digest = saved["base"]["sha256"]
    path = out.with_suffix(".json")
    assert pc.previous_results(path, setting, digest) is not None
    # Which rows to run may change; what a row means may not.
    assert pc.previous_results(path, replace(setting, long_steps=50), digest) is not None
    assert pc.previous_results(path, replace(setting, adapt_lr=0.5), digest) is None
    assert pc.previous_results(path, setting, "0" * 16) is None
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert pc.previous_results(bad, setting, digest) is None
    assert pc.previous_results(tmp_path / "absent.json", setting, digest) is None


def test_only_runs_the_named_sections_into_their_own_report(first_run, tmp_path, capsys):
    work, _out, args = first_run
    alone = tmp_path / "frontier.md"
    argv = [*args[: args.index("--out")], "--out", str(alone), "--only", "frontier"]
    argv += ["--frontier-cells", "4", "6"]
    mp = pytest.MonkeyPatch()
    mp.setenv("WASEARCH_CACHE", str(work / "cache"))
    try:
        assert pc.main(argv) == 0
    finally:
        mp.undo()
    report = json.loads(alone.with_suffix(".json").read_text())
    assert report["error"] == report["conversion"] == report["adaptation"] == []
    assert {(r["tile"], r["bits"]) for r in report["frontier"]} == {(None, 6), (4, 6)}
    assert {r["wd_bits"] for r in report["frontier"] if r["tile"]} == {None, 8}
    md = alone.read_text()
    assert "## 1." not in md and "## 7. The fidelity frontier" in md
    assert "F4 6-bit within 1 point of normal 6-bit: **" in md
    capsys.readouterr()
    with pytest.raises(pc.UserError, match="--only and --skip"):
        pc.main([*argv, "--skip", "error"])
    with pytest.raises(pc.UserError, match="--frontier-cells"):
        pc.main([*argv[:-3], "--frontier-cells", "6"])
    with pytest.raises(pc.UserError, match="--frontier-cells: \\(5, 8\\)"):
        pc.main([*argv[:-3], "--frontier-cells", "5", "8"])
    with pytest.raises(pc.UserError, match="--frontier-distill: 2.0 must be in"):
        pc.main([*argv, "--frontier-distill", "2"])


def test_bad_long_tiles_is_one_user_error(first_run):
    _work, _out, args = first_run
    with pytest.raises(pc.UserError, match="--long-tiles"):
        pc.main([*args, "--long-steps", "2", "--long-tiles", "5"])


def test_missing_data_dir_is_one_user_error_naming_the_flag(tmp_path):
    with pytest.raises(pc.UserError, match="^--data-dir ") as err:
        pc.main(["--data-dir", str(tmp_path / "none"), "--out", str(tmp_path / "c.md")])
    assert "--download" not in str(err.value)  # this script has no such flag
    assert not (tmp_path / "c.md").exists()


# -- rendering stored rows: standard errors and the machine -----------------------------------


def _run_row(conv, tile, acc, **extra):
    return {
        "steps": 250,
        "config": f"{conv} F{tile} 8-bit per-tensor" if tile else "normal 8-bit",
        "conv": conv,
        "tile": tile,
        "granularity": "tensor" if tile else None,
        "transform_lr": None,
        "test_acc": acc,
        "error_vs_own_float": None,
        "error_vs_direct": None,
        "product_spread": None,
        "transform_drift": None,
        **extra,
    }


def _synthetic(tmp_path=None):
    """A stored report of an earlier run on another machine (its own machine summary, no line)."""
    setting = replace(pc.MINIATURE, adapt_tiles=(4,), long_steps=0)
    return pc.Report(
        setting=json.loads(json.dumps(asdict(setting))),
        machine={"summary": "64 CPU cores (elsewhere), torch 1.0", "device": "cpu"},
        command="python benchmarks/paper_claims.py",
        data={"train": 1000, "val": 0, "test": 400, "name": "cifar10"},
        base={"test_acc": 0.6},
        conversion=[
            {
                "tile": 4,
                "bits": 8,
                "granularity": "tensor",
                "float_transforms": False,
                "test_acc": 0.1,
            },
        ],  # fmt: skip
        adaptation=[
            _run_row("normal", None, 0.5),
            _run_row("static", 4, 0.5),
            _run_row("flex", 4, 0.75, test_images=100),  # a row measured on fewer images
        ],
        scratch=[_run_row("flex", 4, 0.9)],
    )


def _table_row(md: str, start: str) -> list[str]:
    line = next(x for x in md.splitlines() if x.startswith(start))
    return [c.strip() for c in line.strip("|").split("|")]


def test_every_accuracy_cell_carries_its_standard_error():
    md = pc.render(_synthetic())
    # Section 3: static 50% on 400 images: sqrt(.5 * .5 / 400) = 2.50 points; flex 75% on its
    # own 100 images: sqrt(.75 * .25 / 100) = 4.33; the difference sqrt(2.50^2 + 4.33^2) = 5.00.
    # Converted 10% on 400: sqrt(.1 * .9 / 400) = 1.50.
    assert _table_row(md, "| F4 8-bit per-tensor") == [
        "F4 8-bit per-tensor",
        "10.0 (1.50)",
        "50.0 (2.50)",
        "75.0 (4.33)",
        "+25.0 (5.00)",
    ]
    assert "independent" in md  # the difference's error says what it assumes
    # Section 2's cell, the base line, section 4's and section 6's accuracy columns.
    assert _table_row(md, "| F4 |")[1] == "10.0 (1.50)"
    assert "base 60.0 (2.45)" in md  # sqrt(.6 * .4 / 400)
    assert "the same budget 50.0 (2.50)" in md
    assert _table_row(md, "| flex F4 8-bit per-tensor | 250")[3] == "75.0 (4.33)"
    assert md.splitlines()[-3] == "| flex F4 8-bit per-tensor | 90.0 (1.50) |"  # section 6


def test_a_stored_report_shows_the_machine_it_was_measured_on(tmp_path, capsys):
    report = _synthetic()
    out = tmp_path / "claims.md"
    out.with_suffix(".json").write_text(json.dumps(asdict(report)))
    stored = out.with_suffix(".json").read_text()
    assert pc.main(["--render-only", "--out", str(out), "--device", "no-such-device"]) == 0
    assert out.with_suffix(".json").read_text() == stored  # nothing measured, nothing rewritten
    md = out.read_text()
    assert md == pc.render(report)
    machine = md.splitlines()[4]
    assert machine.startswith("Machine: 64 CPU cores (elsewhere), torch 1.0 (as recorded;")
    assert torch.backends.cpu.get_cpu_capability() not in machine  # not this machine's line
    printed = capsys.readouterr().out.strip().splitlines()
    assert json.loads(printed[-1])["machine"] == machine.removeprefix("Machine: ").rstrip(".")


def test_render_only_without_a_stored_report_is_one_user_error(tmp_path):
    with pytest.raises(pc.UserError, match="^--render-only: no stored report"):
        pc.main(["--render-only", "--out", str(tmp_path / "none.md")])
    assert not (tmp_path / "none.md").exists()
