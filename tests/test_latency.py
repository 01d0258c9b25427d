"""Latency models: op counts, pricing, tables, profiles, calibration, the measure CLI."""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_discovery import user_nets  # noqa: F401  (fixture; tests/ is on sys.path)

from wasearch import Arch, LayerChoice, searchable_convs
from wasearch.cli import UserError
from wasearch.deploy import has_int_kernel
from wasearch.latency import (
    AnalyticalModel,
    LatencyError,
    LatencyTable,
    MeasuredModel,
    MeasurePlan,
    OpKey,
    Profile,
    TableModel,
    calibrate,
    format_latency_table,
    load_latency_model,
    load_profile,
    measure_table,
    network_ops,
    op_counts,
    time_network_ops,
    transform_ops,
)
from wasearch.latency.cli import register
from wasearch.latency.measure import measure_plan, plan_networks
from wasearch.netref import ModelRef
from wasearch.search.space import parse_space
from wasearch.winograd import cook_toom

ROOT = Path(__file__).resolve().parents[1]
WIDTH = 0.125
TINY_SPACE = {
    "model": {"backbone": "resnet18", "width": WIDTH, "input_size": 16},
    "choices": {"conv": ["normal", "static", "flex"], "tile": [2, 4], "bits": [None, 8, 16]},
    "latency": {"kind": "measured", "batch": 1},
    "budget": {"trials": 2},  # keys for other parts of the tool are validated, not ignored
}
FAST = {"repeats": 1, "min_sample_s": 0.0, "warmup_s": 0.0}


def _tiny_plan() -> MeasurePlan:
    """TINY_SPACE through the one parser; its table is what these tests build."""
    return MeasurePlan.for_space(parse_space(TINY_SPACE, require_latency_table=False))


# -- op counts -----------------------------------------------------------------------------------
def test_transform_op_counts_match_hand_counts() -> None:
    # F(2, 3): B^T rows hold two +-1 entries (4 additions, no multiplications per 1-D pass);
    # A^T = [[1 1 1 0], [0 1 -1 1]]-like: 2 + 2 additions.
    f2 = cook_toom(2)
    assert transform_ops(f2.B_t) == (4, 0)
    assert transform_ops(f2.A_t) == (4, 0)
    # F(4, 3), Lavin & Gray's B^T: rows with 3, 4, 4, 4, 4, 3 nonzeros -> 16 additions; the
    # entries 4, -5, 4, 4, -4, 4, -2, 2, 2, -2, 4, -5 are not +-1 -> 12 multiplications.
    f4 = cook_toom(4)
    assert transform_ops(f4.B_t) == (16, 12)
    # A^T (4 x 6): rows with 5, 4, 4, 5 nonzeros -> 14 additions; 2, -2, 4, 4, 8, -8 -> 6.
    assert transform_ops(f4.A_t) == (14, 6)
    # Dense (learned) F2: every one of the 16 entries multiplies, 3 additions per row.
    assert transform_ops(f2.B_t, dense=True) == (12, 16)


def test_layer_op_counts() -> None:
    c, k, h = 16, 32, 8
    direct = op_counts(OpKey("conv3x3", c, k, h, h, 2, "normal", None, None))
    assert direct.gemm_macs == {"fp32": 2 * k * c * 9 * h * h}
    # F2 on 8x8: 16 tiles per image, 16 positions; input transform 2 * 4 * 4 = 32 additions per
    # tile and input channel, output transform (4 + 2) * 4 = 24 per tile and output channel.
    f2 = op_counts(OpKey("conv3x3", c, k, h, h, 2, "static", 2, 8))
    tiles = 2 * 16
    assert f2.gemm_macs == {"int8": tiles * 16 * k * c}
    assert f2.elementwise_ops == {"int16": tiles * (c * 32 + k * 24)}
    # F4: 4 tiles per image, 36 positions; 2 * 6 * (16 + 12) = 336 and (6 + 4) * 20 = 200.
    f4 = op_counts(OpKey("conv3x3", c, k, h, h, 2, "static", 4, None))
    assert f4.gemm_macs == {"fp32": 2 * 4 * 36 * k * c}
    assert f4.elementwise_ops == {"fp32": 2 * 4 * (c * 336 + k * 200)}
    flex = op_counts(OpKey("conv3x3", c, k, h, h, 2, "flex", 4, None))
    assert flex.elementwise_ops["fp32"] > f4.elementwise_ops["fp32"]  # dense transforms


# -- pricing -------------------------------------------------------------------------------------
def test_network_ops_cover_the_model() -> None:
    arch = Arch.uniform("normal", width=WIDTH)
    ops = network_ops(arch)
    names = [o.name for o in ops]
    assert [o.name for o in ops if o.searchable] == arch.layer_names
    # stem, 16 convs, 8 ReLUs, 8 residual adds, 3 max-pools, 3 shortcuts, head
    assert len(ops) == 1 + 16 + 8 + 8 + 3 + 3 + 1
    assert names[0] == "stem" and names[-1] == "head"
    assert "layer2.0.pool" in names and "layer2.0.shortcut" in names
    assert "layer1.0.pool" not in names and "layer1.0.shortcut" not in names


def test_price_sums_its_layers() -> None:
    model = AnalyticalModel("cortex-a73", batch=2)
    arch = Arch.uniform("static", 4, 8, width=0.5).with_layers(
        {"layer1.0.conv1": LayerChoice("normal", None, None)}
    )
    report = model.price(arch)
    assert list(report.layers) == arch.layer_names
    for spec in arch.specs():
        assert report.layers[spec.name] == model.layer_cost(spec, arch.choice(spec.name))
    assert math.isclose(report.total, sum(report.layers.values()) + sum(report.parts.values()))
    assert report.parts["stem"] > 0 and report.parts["head"] > 0
    assert report.estimated == frozenset(e.name for e in report.entries)  # analytical: all
    assert model.price(arch, batch=4).total > report.total
    text = format_latency_table(arch, report)
    assert "layer4.1.conv2" in text and "total (end to end)" in text and "*" in text


def test_analytical_ranks_algorithms_sensibly() -> None:
    model = AnalyticalModel("cortex-a53")
    spec = searchable_convs("resnet18", 1.0, 32)[5]  # 128 channels, 16x16
    direct = model.layer_cost(spec, LayerChoice("normal", None, None))
    f4 = model.layer_cost(spec, LayerChoice("static", 4, None))
    flex = model.layer_cost(spec, LayerChoice("flex", 4, None))
    f4_8 = model.layer_cost(spec, LayerChoice("static", 4, 8))
    assert f4 < direct and f4 < flex and f4_8 < f4


# -- profiles ------------------------------------------------------------------------------------
def test_shipped_profiles_load() -> None:
    for name in ("cortex-a73", "cortex-a53"):
        p = load_profile(name)
        assert p.name == name and p.gemm_macs_per_s["int8"] > p.gemm_macs_per_s["fp32"]


def _profile_dict() -> dict:
    return load_profile("cortex-a73").to_dict()


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.update(flops=1), "unknown key 'flops'"),
        (lambda d: d.pop("memory_bytes_per_s"), "missing key 'memory_bytes_per_s'"),
        (lambda d: d["gemm_macs_per_s"].update(fp32=-1.0), "gemm_macs_per_s.fp32"),
        (lambda d: d["elementwise_ops_per_s"].update(int4=1e9), "unknown key 'int4'"),
        (lambda d: d.update(op_overhead_s="fast"), "op_overhead_s"),
    ],
)
def test_malformed_profile_is_rejected(tmp_path: Path, mutate, message: str) -> None:
    data = _profile_dict()
    mutate(data)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(LatencyError, match=message):
        load_profile(path)


def test_profile_round_trip_and_unknown_name(tmp_path: Path) -> None:
    p = load_profile("cortex-a53")
    assert load_profile(p.save(tmp_path / "p.yaml")) == p
    with pytest.raises(LatencyError, match="cortex-a73"):
        load_profile("pixel-9000")


def test_calibrate_recovers_a_known_profile() -> None:
    truth = Profile(
        "truth",
        {"fp32": 2e10, "int8": 5e10, "int16": 3e10},
        {"fp32": 4e9, "int8": 1e10, "int16": 8e9},
        1e10,
        2e-5,
    )
    plan = MeasurePlan(width=0.5, tiles=(2, 4, 6), bits=(None, 8), batch=4)
    keys = plan.keys()
    samples = [(k, truth.seconds(op_counts(k))) for k in keys if k.conv != "flex"]
    fitted, report = calibrate(samples, base="cortex-a73")
    assert report.mape < 1e-3
    for k in keys:
        assert math.isclose(
            fitted.seconds(op_counts(k)), truth.seconds(op_counts(k)), rel_tol=1e-2
        )
    # int16 GEMMs were never seen: scaled from the base profile's int16 / int8 ratio
    base = load_profile("cortex-a73").gemm_macs_per_s
    assert math.isclose(
        fitted.gemm_macs_per_s["int16"], 5e10 * base["int16"] / base["int8"], rel_tol=1e-2
    )


# -- tables --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_table(tmp_path_factory) -> tuple[LatencyTable, list[OpKey], list[OpKey], Path]:
    plan = _tiny_plan()
    keys = plan.keys()
    table, untimed = measure_plan(plan, threads=1, repeats=2, warmup_s=0.0)
    path = table.write(tmp_path_factory.mktemp("lat") / "cpu.csv")
    return table, keys, untimed, path


def test_measured_table_covers_the_space_and_survives_reload(tiny_table) -> None:
    table, keys, untimed, path = tiny_table
    assert {k.bits for k in untimed} == {16}  # no 16-bit kernel here
    assert all(not has_int_kernel(k.bits) for k in untimed)
    timed = [k for k in keys if k not in untimed]
    assert timed and all(k in table for k in timed)
    assert {k.op for k in keys} == {
        "conv3x3",
        "conv1x1",
        "stem",
        "maxpool",
        "relu",
        "add_relu",
        "head",
    }
    assert any(k.conv == "flex" and k.tile == 4 for k in timed)
    # Every tile on every layer: F4 on the 2x2 inputs of stage 4 is one partial tile, planned
    # and timed in place (uniform networks keep the tile there: plan_networks, fallback=False).
    assert any(k.tile == 4 and k.height < 4 for k in timed)
    again = LatencyTable.read(path)
    assert set(again.keys()) == set(table.keys())
    for row in table:
        got = again.get(row.key)
        assert math.isclose(got.seconds, row.seconds, rel_tol=1e-5)
        assert got.info["device"] == row.info["device"]
    ident = again.identity()
    assert ident["device"].startswith("cpu") and ident["threads"] == "1"
    assert ident["stat"] == "median"


def test_in_place_timing_covers_every_operation() -> None:
    """The deploy model's ``tick`` names are exactly ``network_ops``' names."""
    arch = Arch.uniform("static", 4, None, width=WIDTH, input_size=16)
    samples = time_network_ops(arch, repeats=2, warmup_s=0.0)
    ops = network_ops(arch)
    assert set(samples) == {op.key for op in ops}
    for op in ops:  # layers sharing a geometry pool their samples: 2 per occurrence
        n = sum(1 for o in ops if o.key == op.key)
        assert len(samples[op.key]) == 2 * n
    plan = _tiny_plan()
    nets = plan_networks(plan)
    assert {a.default.bits for a in nets} == {None, 8}  # 16-bit: no kernel, no network
    # normal, F2, F4, then F2 and F4 alternating with direct (two each), at fp32 and 8-bit
    assert len(nets) == 2 * (3 + 2 * 2)
    mixed = [a for a in nets if len({c.conv for _, c in a}) == 2]
    assert len(mixed) == 2 * 2 * 2
    for a in mixed:  # neighbours of the other kind: no two searchable layers in a row alike
        kinds = [c.conv for _, c in a]
        assert all(x != y for x, y in zip(kinds, kinds[1:], strict=False))


def test_table_model_prices_and_flags_estimates(tiny_table) -> None:
    table, _, _, path = tiny_table
    arch = Arch.uniform("flex", 4, 8, width=WIDTH, input_size=16)
    model = load_latency_model({"kind": "table", "path": str(path)})
    report = model.price(arch)
    assert not report.estimated
    assert math.isclose(report.total, sum(report.layers.values()) + sum(report.parts.values()))
    spec = arch.specs()[0]
    row = table.get(
        OpKey(
            "conv3x3",
            spec.in_channels,
            spec.out_channels,
            spec.height,
            spec.width,
            1,
            "flex",
            4,
            8,
        )
    )
    assert math.isclose(report.layers[spec.name], row.seconds, rel_tol=1e-5)
    arch16 = Arch.uniform("static", 2, 16, width=WIDTH, input_size=16)
    with pytest.raises(LatencyError, match="no row for conv3x3 F2-static 16-bit"):
        model.price(arch16)
    estimating = TableModel(table, fallback="calibrate")
    report16 = estimating.price(arch16)
    assert set(arch16.layer_names) <= report16.estimated
    assert "layer2.0.shortcut" in report16.estimated  # a 16-bit 1x1 conv: no kernel either
    assert "stem" not in report16.estimated and "head" not in report16.estimated
    assert all(v > 0 for v in report16.layers.values())
    assert "*" in format_latency_table(arch16, report16)


def test_extending_a_table_times_only_what_is_missing(tiny_table, tmp_path: Path) -> None:
    table, keys, untimed, path = tiny_table
    reloaded = LatencyTable.read(path)
    rows: list = []
    measure_table(keys, table=reloaded, threads=1, on_row=rows.append, **FAST)
    assert rows == []
    extra = OpKey("conv3x3", 8, 8, 16, 16, 2, "static", 2, None)
    measure_table([extra], table=reloaded, threads=1, on_row=rows.append, **FAST)
    assert [r.key for r in rows] == [extra]
    rows.clear()
    measure_table([extra], table=reloaded, threads=1, remeasure=True, on_row=rows.append, **FAST)
    assert len(rows) == 1
    with pytest.raises(LatencyError, match="threads"):
        measure_table([extra], table=reloaded, threads=2, **FAST)
    with pytest.raises(LatencyError, match="stat"):
        measure_table([extra], table=reloaded, threads=1, stat="min", **FAST)


def test_measured_model_times_missing_rows(tmp_path: Path) -> None:
    path = tmp_path / "m.csv"
    model = load_latency_model({"kind": "measured", "path": str(path), "threads": 1, "repeats": 1})
    assert isinstance(model, MeasuredModel)
    spec = searchable_convs("resnet18", WIDTH, 16)[0]
    s = model.layer_cost(spec, LayerChoice("static", 2, None))
    assert s > 0 and not model.layer_estimated(spec, LayerChoice("static", 2, None))
    assert len(LatencyTable.read(path)) == 1


def _csv(rows: list[str], header: str | None = None) -> str:
    header = header or "op,in_channels,out_channels,height,width,batch,conv,tile,bits,seconds"
    return "\n".join([header, *rows]) + "\n"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            _csv(
                ["conv3x3,8,8,16,16,1,normal,,fp32,1e-4"],
                "op,in_channels,out_channels,height,width,batch,conv,tile,bits",
            ),
            "missing column 'seconds'",
        ),
        (
            _csv(["conv3x3,8,8,16,16,1,normal,,fp32,1e-4", "relu,8,8,16,16,1,,,fp32,-2e-6"]),
            "row 3: column 'seconds'",
        ),
        (_csv(["conv5x5,8,8,16,16,1,,,fp32,1e-4"]), "row 2: column 'op'"),
        (_csv(["conv3x3,8,8,16,16,1,winograd,4,fp32,1e-4"]), "row 2: column 'conv'"),
        (_csv(["conv3x3,8,8,16,16,1,static,,8,1e-4"]), "row 2: column 'tile'"),
        (_csv(["conv3x3,8,8,16,16,1,static,4,32,1e-4"]), "row 2: column 'bits'"),
        (
            _csv(["relu,8,8,16,16,1,,,fp32,1e-6", "relu,8,8,16,16,1,,,fp32,2e-6"]),
            "row 3: duplicate of row 2",
        ),
        (_csv(["relu,8,8,16,16,1,,,fp32,nan"]), "row 2: column 'seconds'"),
        (_csv(["norm,8,8,16,16,1,,,fp32,1e-6"]), "row 2: column 'detail' needs op 'norm'"),
        (
            _csv(
                ["relu,8,8,16,16,1,,,fp32,1e-6,p90"],
                "op,in_channels,out_channels,height,width,batch,conv,tile,bits,seconds,stat",
            ),
            "row 2: column 'stat': 'p90'",
        ),
    ],
)
def test_malformed_table_is_rejected(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(LatencyError, match=message):
        LatencyTable.read(path)


def test_model_spec_keys_are_checked(tmp_path: Path) -> None:
    assert isinstance(
        load_latency_model({"kind": "analytical", "profile": "cortex-a53"}), AnalyticalModel
    )
    assert load_latency_model("cortex-a73").profile.name == "cortex-a73"
    assert load_latency_model({"kind": "analytical", "batch": 8}).batch == 8
    with pytest.raises(LatencyError, match="unknown key 'profil'"):
        load_latency_model({"kind": "analytical", "profil": "cortex-a73"})
    with pytest.raises(LatencyError, match="kind 'gpu' is unknown"):
        load_latency_model({"kind": "gpu"})
    with pytest.raises(LatencyError, match="needs a 'path'"):
        load_latency_model({"kind": "table"})
    with pytest.raises(LatencyError, match="cannot read"):
        load_latency_model({"kind": "table", "path": str(tmp_path / "none.csv")})


def test_calibrate_command(tiny_table, tmp_path: Path, capsys) -> None:
    _, _, _, path = tiny_table
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    out = tmp_path / "fitted.yaml"
    args = parser.parse_args(["calibrate", str(path), "--out", str(out)])
    assert args.func(args) == 0
    assert "MAPE" in capsys.readouterr().out
    profile = load_profile(out)
    assert profile.name == "fitted"
    assert "fit: MAPE" in out.read_text()


# -- the CLI end to end --------------------------------------------------------------------------
def test_search_py_measure_end_to_end(tmp_path: Path) -> None:
    space = tmp_path / "tiny.yaml"
    space.write_text(yaml.safe_dump(TINY_SPACE))
    out = tmp_path / "table.csv"
    cmd = [
        sys.executable,
        str(ROOT / "search.py"),
        "measure",
        str(space),
        "--out",
        str(out),
        "--repeats",
        "1",
        "--threads",
        "1",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    # No skip on an ImportError: `measure` needs no optional package, so a failed import of any
    # part of wasearch is a bug this test must report.
    assert proc.returncode == 0, proc.stderr
    assert "per-layer comparison, fp32" in proc.stdout
    assert "16-bit: no integer kernel" in proc.stdout
    table = LatencyTable.read(out)
    plan = _tiny_plan()
    assert all(k in table for k in plan.keys() if has_int_kernel(k.bits))
    # user mistakes: one line, exit code 2
    bad = subprocess.run(
        cmd[:3] + [str(tmp_path / "missing.yaml")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert bad.returncode == 2 and bad.stderr.startswith("error: ")
    assert "Traceback" not in bad.stderr


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"choices": {"tile": [2, 5]}}, "choices.tile: 5 is not one of 2, 4, 6"),
        ({"choices": {"tiles": [2]}}, "choices.tiles: unknown key"),
        ({"latency": {"kind": "measured", "batch": 0}}, "latency.batch: 0 must be >= 1"),
        (  # one choice per layer (F6 kept on the 4x4 layers too): nothing is left to search
            {"model": {"input_size": 8}, "choices": {"conv": ["static"], "tile": [6]}},
            "leaves nothing to search",
        ),
    ],
)
def test_measure_reads_the_space_through_the_one_parser(tmp_path: Path, change, message) -> None:
    space = tmp_path / "bad.yaml"
    space.write_text(yaml.safe_dump({**TINY_SPACE, **change}))
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["measure", str(space), "--out", str(tmp_path / "t.csv")])
    with pytest.raises(UserError) as info:
        args.func(args)
    assert str(info.value).startswith(f"{space}: ") and message in str(info.value)
    assert not (tmp_path / "t.csv").exists()


# -- any network ---------------------------------------------------------------------------------
TORCHVISION = ModelRef.parse("torchvision:resnet18")

# A user model with a module type and a function the generic pricing does not know.
ODD_SOURCE = """
import torch
from torch import nn


class Swishy(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(x)


class Odd(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.body = nn.Conv2d(4, 4, 3, padding=1)
        self.odd = Swishy()
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        y = self.odd(self.body(self.stem(x)))
        y = torch.cat([y, torch.special.erf(y)], 1).mean((2, 3))
        return self.fc(y)


def make_odd(num_classes=10):
    return Odd(num_classes)
"""


def test_traced_network_ops_cover_every_module_and_function() -> None:
    arch = Arch.uniform("static", 4, 8, model=TORCHVISION, input_size=64)
    ops = network_ops(arch)
    names = [o.name for o in ops]
    assert [o.name for o in ops if o.searchable] == arch.layer_names
    # 20 convs (13 searchable), 20 BatchNorms, 17 ReLU calls (the stem's, 2 per block), 3 pools
    # and fc; 8 residual additions (before each block's second ReLU call), the flatten before fc
    assert len(ops) == 20 + 20 + 17 + 3 + 8 + 1
    assert names[:4] == ["conv1", "bn1", "relu", "maxpool"] and names[-2:] == ["fc:pre", "fc"]
    key = {o.name: o.key for o in ops}
    assert key["layer1.0.relu#2:pre"].op == "functions"
    assert key["layer1.0.relu#2:pre"].detail.startswith("add_ 1x64x16x16|1x64x16x16->")
    assert key["conv1"].op == "conv" and key["conv1"].bits is None  # reads the image: float
    assert key["layer2.0.downsample.0"].bits == 8  # converted at the default bit-width
    assert key["layer2.0.conv1"].op == "conv"  # stride 2: not searchable
    model = AnalyticalModel("cortex-a73")
    report = model.price(arch)
    assert math.isclose(report.total, sum(report.layers.values()) + sum(report.parts.values()))
    assert report.parts["conv1"] > report.parts["layer1.0.relu#2:pre"] > 0
    assert report.parts["fc:pre"] == 0  # flatten: a view
    assert not report.guessed
    assert model.price(arch, input_size=96).total > report.total
    text = format_latency_table(arch, report)
    assert "norms x20" in text and "functions between modules" in text and "other conv" in text


def test_unknown_types_are_priced_per_element_and_named(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "odd_nets.py").write_text(ODD_SOURCE)
    monkeypatch.chdir(tmp_path)
    try:
        arch = Arch.uniform("static", 2, None, model=ModelRef.parse("odd_nets:make_odd"))
        report = AnalyticalModel("cortex-a53").price(arch)
    finally:
        sys.modules.pop("odd_nets", None)
    assert report.layers == {"body": report.layers["body"]}
    # Swishy: an unknown module; erf between modules: an unknown function
    assert report.guessed == {"odd", "fc:pre"}
    assert report.parts["odd"] > 0 and report.parts["fc:pre"] > 0
    assert "priced per output element: odd, fc:pre" in format_latency_table(arch, report)


def test_measured_model_times_a_traced_network_in_place(user_nets, tmp_path: Path) -> None:  # noqa: F811
    path = tmp_path / "m.csv"
    arch = Arch.uniform("static", 4, None, model=ModelRef.parse(f"{user_nets}:make_vgg"))
    report = MeasuredModel(path, threads=1, repeats=2).price(arch, input_size=16)
    assert not report.estimated  # every operation timed, in its network
    table = LatencyTable.read(path)  # generic rows round-trip
    ops = {k.op for k in table.keys()}
    assert ops == {"conv3x3", "conv", "norm", "act", "pool", "free", "linear"}
    assert all(k in table for k in (e.key for e in report.entries))
    again = MeasuredModel(path, threads=1, repeats=2).price(arch, input_size=16)
    assert len(LatencyTable.read(path)) == len(table)  # nothing timed again
    assert math.isclose(again.total, report.total, rel_tol=1e-5)  # the rows, as written


def test_space_of_any_network_is_planned_and_measured(tmp_path: Path) -> None:
    space = {
        "model": {"name": "torchvision:resnet18", "input_size": 32},
        "choices": {"conv": ["normal", "static"], "tile": [2, 6], "bits": [None]},
        "latency": {"kind": "measured", "batch": 1},
        "budget": {"trials": 2},
    }
    plan = MeasurePlan.for_space(parse_space(space, require_latency_table=False))
    keys = plan.keys()
    assert {k.op for k in keys} == {
        "conv3x3",
        "conv",
        "norm",
        "act",
        "pool",
        "functions",
        "linear",
    }
    assert any(k.tile == 6 and k.height == 1 for k in keys)  # layer4 at 1x1: a partial tile
    table, untimed = measure_plan(plan, threads=1, repeats=1, warmup_s=0.0)
    assert not untimed and all(k in table for k in keys)
    # normal, F2, F6 (kept on every layer); normal at the base's 8 bits, for the other convs
    assert [a.summary() for a in plan_networks(plan)][:3] == [
        "normal/fp x13",
        "F2-static/fp x13",
        "F6-static/fp x13",
    ]
    # a row pools its key's samples from every network and layer that ran it (uniform and
    # alternating: a kernel timed next to either kind of neighbour), not the first network's
    runs: dict = {}
    most: dict = {}  # the most layers of one network that run a key
    for a in plan_networks(plan):
        here: dict = {}
        for op in network_ops(a):
            k = op.key.with_batch(plan.batch)
            here[k] = here.get(k, 0) + 1
        for k, n in here.items():
            runs[k] = runs.get(k, 0) + n
            most[k] = max(most.get(k, 0), n)
    pooled = [k for k in keys if k.op == "conv3x3" and k.conv != "flex"]
    assert pooled and all(table.get(k).repeats == runs[k] for k in pooled)
    assert all(runs[k] > most[k] for k in pooled)  # every kernel: more than one network's


def test_ticking_wraps_each_unit_forward_and_restores_it() -> None:
    """``DeployNet.ticking`` ticks before and after every call of the named modules, the k-th
    call of a module in a pass named ``path#k``, the output unchanged; on exit every wrapped
    module's ``forward`` is what it was (the class's method, or its own attribute)."""
    import torch
    from torch import nn

    from wasearch.deploy import DeployNet

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.act = nn.Conv2d(3, 3, 3, padding=1), nn.ReLU()

        def forward(self, x):
            return self.act(self.act(self.conv(x)) - 0.5)

    body = Twice()
    own = body.act.forward  # a bound method set as the module's own attribute
    body.act.forward = own
    net = DeployNet(body, kernels={}, substituted=[])
    x = torch.randn(1, 3, 6, 6)
    plain = net(x)
    names: list[str] = []
    with net.ticking(["conv", "act"], names.append):
        assert torch.equal(net(x), plain)
        assert torch.equal(net(x), plain)  # the calls are counted per pass
    pass_names = ["conv:pre", "conv", "act:pre", "act", "act#2:pre", "act#2"]
    assert names == pass_names * 2
    assert "forward" not in body.conv.__dict__ and body.act.__dict__["forward"] is own
    names.clear()
    assert torch.equal(net(x), plain) and names == []  # outside: nothing ticks


def test_op_overhead_spreads_the_in_place_excess_over_module_operations(monkeypatch) -> None:
    # Deterministic: the op-by-op pass and the plain pass are stand-ins with known times.
    from wasearch.latency.ops import OpKey
    from wasearch.latency.timing import NetworkTimer

    timer = NetworkTimer.__new__(NetworkTimer)
    timer._hook_cost, timer._excess, timer.stat = 2e-6, [], "median"
    conv = OpKey("conv3x3", 8, 8, 4, 4)
    glue = OpKey("functions", 8, 8, 4, 4, detail="glue")
    raw = {conv: [100e-6, 100e-6, 100e-6, 100e-6], glue: [20e-6]}  # 4 module ops, 420 us
    monkeypatch.setattr(timer, "_run_raw", lambda repeats=1: {k: list(v) for k, v in raw.items()})
    plain = [380e-6]
    monkeypatch.setattr(timer, "run_total", lambda repeats=1: plain * repeats)
    assert timer.op_overhead() == pytest.approx(10e-6)  # (420 - 380) / 4 module operations
    assert len(timer._excess) == 9  # the pairs taken on first use
    got = timer.run(1)
    assert got[conv] == pytest.approx([90e-6] * 4)  # module operations corrected
    assert got[glue] == pytest.approx([20e-6])  # the functions between modules are not
    assert len(timer._excess) == 10  # each timed pass is paired with a plain one
    # The estimate follows the pairs as they come: the median over all of them, and samples
    # taken earlier are corrected with the estimate of the moment they are corrected at.
    early = timer.run_raw(1)
    plain[0] = 340e-6  # the clock's cost grows to (420 - 340) / 4 = 20 us a module operation
    later = timer.run_raw(20)
    assert len(timer._excess) == 31 and timer.op_overhead() == pytest.approx(20e-6)
    assert timer.correct(early)[conv] == pytest.approx([80e-6] * 4)
    assert timer.correct(later)[glue] == pytest.approx([20e-6] * 20)
    # Rows summarized by their mean take the mean excess off: 11 pairs at 10 us, 20 at 20 us.
    timer.stat = "mean"
    assert timer.op_overhead() == pytest.approx((11 * 10e-6 + 20 * 20e-6) / 31)
    timer.stat = "median"
    # A plain pass slower than the ticked one (noise): never below the hooks' own cost.
    timer._excess = []
    plain[0] = 500e-6
    assert timer.op_overhead() == pytest.approx(2e-6)
