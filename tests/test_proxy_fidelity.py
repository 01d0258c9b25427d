"""benchmarks/proxy_fidelity.py: its statistics, and its whole path in miniature on a generated
CIFAR-10-like ImageFolder (a rerun resumes and measures nothing twice)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from benchmark_module import load_benchmark

pf = load_benchmark("proxy_fidelity")


def test_kendall_tau_orders_ties_and_lengths():
    assert pf.kendall_tau([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert pf.kendall_tau([1, 2, 3, 4], [40, 30, 20, 10]) == pytest.approx(-1.0)
    # one discordant pair of six: (5 - 1) / 6
    assert pf.kendall_tau([1, 2, 3, 4], [1, 2, 4, 3]) == pytest.approx(4 / 6)
    # tau-b with a tie in y: 5 concordant, 0 discordant, 1 tie -> 5 / sqrt(6 * 5)
    assert pf.kendall_tau([1, 2, 3, 4], [1, 2, 3, 3]) == pytest.approx(5 / np.sqrt(30))
    with pytest.raises(ValueError, match="differ in length"):
        pf.kendall_tau([1, 2], [1])


@pytest.mark.parametrize(("acc", "n"), [(0.67, 5000), (0.9, 200)])
def test_binomial_se_matches_a_simulation(acc, n):
    rng = np.random.default_rng(0)
    simulated = rng.binomial(n, acc, size=20_000) / n
    assert pf.binomial_se(acc, n) == pytest.approx(simulated.std(), rel=0.05)


def test_mixes_fall_back_where_f6_does_not_fit():
    archs = pf.architectures(pf.Setting(mixes=3), num_classes=10)
    assert {"all-normal", "static-F6", "flex-F4", "mix-3"} <= set(archs)
    f6 = archs["static-F6"]
    for name in ("mix-1", "mix-2", "mix-3"):
        for layer, choice in archs[name]:
            if choice.tile is not None:
                assert choice.tile <= f6.choice(layer).tile  # the arch validated, too
    random.seed(1)  # the mixes come from the setting's seed, not the global generator
    again = pf.architectures(pf.Setting(mixes=3), num_classes=10)
    assert again["mix-2"] == archs["mix-2"]


def test_tiny_run_writes_tables_and_resumes(tiny_cifar, tmp_path, capsys):
    out = tmp_path / "proxy.json"
    argv = [
        "--tiny", "--data-dir", str(tiny_cifar), "--work-dir", str(tmp_path / "work"),
        "--out", str(out), "--device", "cpu", "--archs", "all-normal", "static-F4", "mix-1",
    ]  # fmt: skip
    assert pf.main(argv) == 0
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    saved = json.loads(out.read_text())
    rows = saved["rows"]
    # 3 architectures x (2 recipes + long), and static-F4 again with the second seed
    assert len(rows) == 3 * 3 + 3
    assert "long|static-F4|-|1" in rows and "proxy|mix-1|b|0" in rows
    for row in rows.values():
        assert 0 <= row["val_acc"] <= 1 and row["val_se"] >= 0
    assert set(figures["recipes"]) == {"a", "b"}
    assert figures["recipes"]["a"]["n"] == 3
    md = out.with_suffix(".md").read_text()
    assert "Kendall tau" in md and "| mix-1 |" in md and "--archs all-normal" in md

    # A rerun keeps every row and measures nothing again.
    assert pf.main(argv) == 0
    assert json.loads(out.read_text())["rows"] == rows


def test_bad_input_is_one_line(tiny_cifar, tmp_path, capsys):
    from wasearch.cli import run_main

    common = ["--tiny", "--work-dir", str(tmp_path / "w"), "--out", str(tmp_path / "o.json")]
    assert run_main(pf.main, [*common, "--data-dir", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--data-dir" in err[0]
    argv = [*common, "--data-dir", str(tiny_cifar), "--archs", "static-F8"]
    assert run_main(pf.main, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'static-F8'" in err[0]
    assert not (tmp_path / "w").exists()
