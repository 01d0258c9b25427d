"""benchmarks/latency_fidelity.py: stratified networks, bootstrap intervals, per-layer ranking,
targets and bad input; miniature runs of the benchmark on tiny networks."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from benchmark_module import load_benchmark
from test_discovery import user_nets  # noqa: F401  (fixture; tests/ is on sys.path)

from wasearch.latency import LatencyTable, TableModel, network_ops

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "model": {"backbone": "resnet18", "width": 0.125, "input_size": 16},
    "choices": {"conv": ["normal", "static", "flex"], "tile": [2, 4], "bits": [None, 8]},
    "latency": {"kind": "measured", "batch": 1},
    "budget": {"trials": 2},
}
QUICK = [
    "--threads",
    "1",
    "--candidates",
    "150",
    "--layer-repeats",
    "3",
    "--layer-instances",
    "2",
    "--bootstrap",
    "200",
]


@pytest.fixture(scope="module")
def fid():
    return load_benchmark("latency_fidelity")


def _space(tmp_path: Path, model: dict | None = None) -> Path:
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({**TINY, **({"model": model} if model else {})}))
    return path


# -- the stratified picker -----------------------------------------------------------------------
def test_stratified_pick_spans_a_skewed_pool(fid) -> None:
    # most candidates cheap, few expensive (as random mixes are): a random pick of 6 would
    # almost surely miss the top; the picker takes one per equal-width bin and both ends.
    rng = np.random.default_rng(1)
    pred = np.concatenate([rng.uniform(1.0, 1.5, 500), rng.uniform(1.5, 4.0, 20), [4.0]])
    picked, empty = fid.stratified_pick(pred, 6, seed=0)
    assert len(set(picked)) == 6 and empty == 0
    got = pred[picked]
    assert got.min() == pred.min() and got.max() == pred.max()
    width = (pred.max() - pred.min()) / 6
    bins = sorted(min(int((v - pred.min()) / width), 5) for v in got)
    assert bins == [0, 1, 2, 3, 4, 5]  # one per bin
    assert fid.stratified_pick(pred, 6, seed=0) == (picked, empty)  # seeded


def test_stratified_pick_when_every_candidate_is_in_one_bin(fid) -> None:
    # nothing to stratify: still k distinct candidates, every inner bin reported empty
    picked, empty = fid.stratified_pick([2.0] * 10, 4, seed=0)
    assert len(set(picked)) == 4 and empty == 2
    # a cluster and one outlier: the middle bins are empty and filled from the nearest
    pred = [1.0, 1.01, 1.02, 1.03, 1.04, 5.0]
    picked, empty = fid.stratified_pick(pred, 4, seed=0)
    assert picked[0] == 0 and picked[-1] == 5 and empty == 2 and len(set(picked)) == 4
    with pytest.raises(ValueError, match="cannot pick 4 of 3"):
        fid.stratified_pick([1.0, 2.0, 3.0], 4)


# -- statistics ----------------------------------------------------------------------------------
def test_bootstrap_interval_holds_the_estimate_and_narrows_with_data(fid) -> None:
    rng = np.random.default_rng(0)
    small, large = rng.normal(10, 2, 15), rng.normal(10, 2, 600)
    p1, lo1, hi1 = fid.bootstrap_ci(lambda ix: small[ix].mean(), len(small), seed=3)
    p2, lo2, hi2 = fid.bootstrap_ci(lambda ix: large[ix].mean(), len(large), seed=3)
    assert p1 == pytest.approx(small.mean()) and lo1 <= p1 <= hi1
    assert lo2 <= p2 <= hi2 and lo2 < 10 < hi2
    assert hi2 - lo2 < (hi1 - lo1) / 3  # ~sqrt(600/15) = 6.3x narrower
    # the standard error of a mean of 15 draws of sd 2 is 0.52: a 95 % interval ~2 wide
    assert 1.2 < hi1 - lo1 < 3.2
    assert fid.bootstrap_ci(lambda ix: small[ix].mean(), len(small), seed=3) == (p1, lo1, hi1)


def test_spearman_ties_and_constant_sides(fid) -> None:
    assert fid.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert fid.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # static and flex predicted the same (a tie): average ranks, not an arbitrary order
    assert fid.spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486833)
    assert np.isnan(fid.spearman([1, 1, 1], [1, 2, 3]))


# -- bad input -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--archs", "1"], "--archs"),
        (["--bits", "4"], "--bits"),
        (["--repeats", "zero"], "--repeats"),
        (["--archs", "30", "--candidates", "10"], "--candidates"),
        (["--device", "cuda:9"], "--device"),
        (["--layer-repeats", "1"], "--layer-repeats"),
        (["--layer-instances", "0"], "--layer-instances"),
        (["--layer-tie", "1.5"], "--layer-tie"),
        (["--layer-tie", "two"], "--layer-tie"),
        (["--layer-reference", "cold"], "--layer-reference"),
    ],
)
def test_bad_flag_is_one_line_and_exit_2(fid, argv, flag, capsys, tmp_path) -> None:
    if flag == "--device":
        import torch

        if torch.cuda.is_available():
            pytest.skip("a CUDA device is here")
    rc = fid.main(["--space", str(_space(tmp_path)), *argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and flag in err, err


def test_bad_flag_from_the_command_line(tmp_path) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "latency_fidelity.py"), "--stat", "mode"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "--stat" in proc.stderr, proc.stderr
    assert proc.stdout == ""


def _rounds(mean: float, rel: float, n: int, seed: int) -> np.ndarray:
    """``n`` per-round samples of a kernel of ``mean`` seconds, log-normal noise ``rel``."""
    return mean * np.exp(np.random.default_rng(seed).normal(0, rel, n))


def _log_ratio(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.log(a) - np.log(b)


def test_pair_order_resolves_clear_gaps_and_calls_close_ones_a_tie(fid) -> None:
    fast, slow = _rounds(1.0, 0.01, 30, 1), _rounds(1.3, 0.01, 30, 2)
    kw = {"tie": np.log1p(0.02), "resamples": 500, "seed": 0}
    assert fid.pair_order(_log_ratio(slow, fast), **kw) == 1
    assert fid.pair_order(_log_ratio(fast, slow), **kw) == -1
    # 1 % apart: below the tie margin, whatever the rounds say
    near = _rounds(1.01, 0.001, 30, 3)
    assert fid.pair_order(_log_ratio(near, _rounds(1.0, 0.001, 30, 4)), **kw) == 0
    # 10 % apart on average but 30 % noise in 5 rounds: the interval holds 0
    assert fid.pair_order(_log_ratio(_rounds(1.1, 0.3, 5, 5), _rounds(1.0, 0.3, 5, 6)), **kw) == 0
    # paired rounds: a machine slowing down in the same rounds does not hide a 5 % gap
    drift = np.linspace(1.0, 2.0, 30)
    assert fid.pair_order(_log_ratio(1.05 * drift, drift), **kw) == 1
    # differences in seconds, the tie in seconds: 0.1 ms apart resolves against a 0.05 ms tie
    net = _rounds(2e-3, 0.002, 30, 7)
    assert fid.pair_order(net + 1e-4 - net, tie=5e-5, resamples=500, seed=0) == 1
    assert fid.pair_order(net + 1e-4 - net, tie=2e-4, resamples=500, seed=0) == 0


def test_layer_agreement_counts_resolved_pairs_and_regret(fid) -> None:
    means = [1.0, 2.0, 3.0, 4.0]
    rounds = [_rounds(m, 0.01, 20, i) for i, m in enumerate(means)]
    kw = {"tie": 0.02, "resamples": 300}
    right = fid.layer_agreement([1, 2, 3, 4], rounds, **kw)
    assert right["tau"] == 1.0 and right["resolved"] == right["pairs"] == 6
    assert right["regret"] == 0.0
    wrong = fid.layer_agreement([4, 3, 2, 1], rounds, **kw)
    assert wrong["tau"] == -1.0 and wrong["regret"] == pytest.approx(3.0, rel=0.03)
    # one swapped pair of six: tau (5 - 1) / 6; the table's pick is still the fastest
    swap = fid.layer_agreement([1, 2, 4, 3], rounds, **kw)
    assert swap["tau"] == pytest.approx(4 / 6) and swap["regret"] == 0.0
    # two options the rounds cannot tell apart: their pair is a tie, either order is right
    tied = [_rounds(1.0, 0.001, 20, 7), _rounds(1.005, 0.001, 20, 8), rounds[2], rounds[3]]
    got = fid.layer_agreement([1.1, 1.0, 3, 4], tied, **kw)
    assert got["resolved"] == 5 and got["tau"] == 1.0
    assert got["regret"] == pytest.approx(0.005, abs=0.002)
    # nothing resolved: no figure rather than a perfect one
    flat = [_rounds(1.0, 0.001, 20, 9 + i) for i in range(4)]
    assert np.isnan(fid.layer_agreement([1, 2, 3, 4], flat, **kw)["tau"])
    # swapped into a network (scale: its time): options 2 % of a 10 ms network apart resolve
    # against a 0.5 % tie, not against a 10 % one
    nets = [10e-3 + 2e-4 * i + _rounds(1e-5, 0.1, 20, 20 + i) for i in range(4)]
    on_net = {"resamples": 300, "scale": 10e-3}
    assert fid.layer_agreement([1, 2, 3, 4], nets, tie=0.005, **on_net)["tau"] == 1.0
    assert np.isnan(fid.layer_agreement([1, 2, 3, 4], nets, tie=0.1, **on_net)["tau"])
    # the table's pick (the slowest) costs 3 x 0.2 ms of a 10 ms network
    backwards = fid.layer_agreement([4, 3, 2, 1], nets, tie=0.005, **on_net)
    assert backwards["tau"] == -1.0 and backwards["regret"] == pytest.approx(0.06, abs=0.005)
    # paired: a machine twice as slow in some rounds does not change who is fastest
    slow = np.where(np.arange(20) % 3 == 0, 2.0, 1.0)
    drifting = [n * slow for n in nets]
    assert fid.layer_agreement([1, 2, 3, 4], drifting, tie=0.005, **on_net)["regret"] == 0.0


def test_swaps_time_every_build_each_round_and_average_them(fid, monkeypatch, tmp_path) -> None:
    """Each option of a layer (and the all-direct context) is built --layer-instances times,
    every build timed once per round, and a round's time of the option is its builds' mean:
    builds with fixed offsets (where their tensors lie) average out instead of ordering the
    options."""
    built: list = []

    class Stub:  # a NetworkTimer whose every pass takes a fixed time of its own build
        def __init__(self, arch, **_kw) -> None:
            self.offset = 1.0 + 0.1 * (len(built) % 3)  # builds come in threes
            built.append(arch)

        def warmup(self, *_a):
            return self

    monkeypatch.setattr(fid, "NetworkTimer", Stub)
    calls: list[Stub] = []

    def timed(timer, *, ops):
        calls.append(timer)
        return [timer.offset]

    monkeypatch.setattr(fid, "timed_pass", timed)
    args = fid.build_parser().parse_args(
        ["--space", str(_space(tmp_path)), "--layer-repeats", "4", "--layer-instances", "3"]
    )
    base = fid.base_arch(args, None)
    rounds = fid.swapped_layer_rounds(base, None, args, torch.device("cpu"))
    layers = [spec.name for spec in base.specs()]
    assert list(rounds) == layers
    options = len(fid.layer_options(None))
    # the context's 3 builds once, then 3 per Winograd option of each layer
    assert len(built) == 3 + 3 * (options - 1) * len(layers)
    assert len(calls) == len(layers) * 4 * options * 3  # every build once a round
    for got in rounds.values():
        assert len(got) == options and all(len(r) == 4 for r in got)
        for per_round in got:  # builds at 1.0, 1.1, 1.2 (the context's alike): mean 1.1
            assert per_round == pytest.approx([1.1] * 4)


# -- miniature runs ------------------------------------------------------------------------------
def test_miniature_run_prints_machine_table_and_json_last(fid, capsys, tmp_path) -> None:
    table = tmp_path / "t.csv"
    argv = ["--space", str(_space(tmp_path)), "--archs", "5", "--repeats", "2", "--bits", "both"]
    rc = fid.main([*argv, *QUICK, "--table", str(table)])
    out = capsys.readouterr().out.strip().splitlines()
    assert rc == 0
    assert out[0].startswith("machine: cpu") and "ISA" in out[0] and "load average" in out[0]
    figures = json.loads(out[-1])
    assert "ISA" in figures["machine"] and figures["timing"] == "interleaved"
    assert figures["targets"] == {"mape_max": 0.05, "spearman_min": 0.95, "layer_rank_min": 0.9}
    assert set(figures["results"]) == {"fp32", "8"}
    for bits, r in figures["results"].items():
        assert r["bits"] == bits and r["networks"] == 7 + 5 and r["references"] == 7
        for name in ("mape", "spearman", "layer_rank"):
            lo, hi = r[f"{name}_ci"]
            assert lo <= hi and isinstance(r[f"{name}_target_met"], bool)
        assert r["mape_target_met"] == (r["mape"] <= 0.05)
        assert r["targets_met"] == all(
            r[f"{n}_target_met"] for n in ("mape", "spearman", "layer_rank")
        )
        assert r["layer_count"] == 16 and 0 <= r["layers_ranked"] <= 16
        assert 0 <= r["layer_pairs_resolved"] <= r["layer_pairs"] == 16 * 6
        assert r["layer_regret_worst"] >= r["layer_regret_mean"] >= 0
        # pooled tau over the resolved pairs: none resolved, no figure
        assert np.isnan(r["layer_rank"]) == (r["layer_pairs_resolved"] == 0)
        if r["layers_ranked"]:
            assert -1 <= r["layer_rank"] <= 1
            assert r["worst_layer"].startswith("layer") and -1 <= r["worst_layer_rank"] <= 1
        # stratified: the chosen mixes span the candidates' predicted range, end to end
        assert r["picked_range_ms"] == r["candidate_range_ms"], r
        lo, hi = r["candidate_range_ms"]
        assert hi > 1.2 * lo  # the pool itself spans a range (all-direct to Winograd-heavy)
        assert "rows" not in r  # the JSON line holds figures only
    assert any(line.startswith("  layer rank") and "target >= 0.9" in line for line in out)
    # the fast prediction that picks the mixes is the table's pooled price, end to end
    base = fid.base_arch(fid.build_parser().parse_args(["--space", str(_space(tmp_path))]), None)
    table = LatencyTable.read(tmp_path / "t-fp32.csv")
    assert table.has_context  # the table networks were timed in context
    pooled = TableModel(table, context=False)
    fast = fid.FastPredictor(TableModel(table), base)
    arch = fid.random_arch(random.Random(5), base, None)
    assert fast(arch) == pytest.approx(pooled.price(arch).total, rel=1e-9)
    # both readings scored, each its own figures
    r = figures["results"]["fp32"]
    assert r["context_rows"] > 0 and set(r["pooled"]) >= {"mape", "spearman", "layer_rank"}
    assert any(line.startswith("  pooled rows   MAPE") for line in out)


@pytest.mark.parametrize("network", ["paper", "torchvision", "vgg"])
def test_end_to_end_prediction_of_three_networks(fid, network, user_nets, tmp_path) -> None:  # noqa: F811
    """The measured table's prediction of whole networks against their deploy models timed end
    to end (the benchmark, tiny): a loose bound, since the 2 cores here are shared; the targets
    (MAPE <= 5 %, Spearman >= 0.95, per-layer rank >= 0.9) are the benchmark's."""
    model = {
        "paper": {"backbone": "resnet18", "width": 0.125, "input_size": 16},
        "torchvision": {"name": "torchvision:resnet18", "input_size": 64},
        "vgg": {"name": f"{user_nets}:make_vgg", "input_size": 16},
    }[network]
    table = tmp_path / "t.csv"
    args = fid.build_parser().parse_args(
        ["--space", str(_space(tmp_path, model)), "--archs", "3", "--repeats", "5", *QUICK]
        + ["--stat", "median"]
        + ["--layer-reference", "isolated"]  # the swaps build 3 networks a layer: the runs above
        + ["--table", str(table)]
    )
    figures = fid.fidelity(args)
    assert figures["network"] == (model.get("name") or "resnet18_cifar")
    # every operation of the networks predicted was measured, in place
    rows = LatencyTable.read(table)
    arch = fid.random_arch(random.Random(0), fid.base_arch(args, None), None)
    assert all(op.key in rows for op in network_ops(arch))
    assert figures["results"]["fp32"]["mape"] < 0.5, figures


def test_miniature_sequential_run(fid, capsys, tmp_path) -> None:
    argv = ["--space", str(_space(tmp_path)), "--archs", "3", "--repeats", "2", "--sequential"]
    assert fid.main([*argv, *QUICK]) == 0
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    r = figures["results"]["fp32"]
    assert figures["timing"] == "sequential" and r["networks"] == 7 + 3
    assert r["picked_range_ms"] == r["candidate_range_ms"]
