"""Latency tables in context: rows per kind of the searchable layer before an operation
(``OpKey.after``), how ``measure`` writes them, how a ``TableModel`` prices with them, and the
fidelity benchmark's two readings of one table."""

from __future__ import annotations

import argparse
import csv
import io
import math
from dataclasses import replace

import numpy as np
import pytest
from benchmark_module import load_benchmark

from wasearch import Arch, LayerChoice
from wasearch.latency import LatencyError, LatencyTable, MeasurePlan, Row, TableModel, network_ops
from wasearch.latency.measure import measure_plan, plan_networks, rows_from_samples
from wasearch.latency.ops import keys_in_context
from wasearch.latency.table import table_rows_as_samples

WIDTH = 0.125
DIRECT = LayerChoice("normal", None, None)
F2 = LayerChoice("static", 2, None)
F4 = LayerChoice("static", 4, None)


def _mixed() -> Arch:
    """The paper's network, all direct but its second and third searchable layers F2."""
    base = Arch.uniform("normal", None, None, width=WIDTH, input_size=16)
    names = base.layer_names
    return base.with_layers({names[1]: F2, names[2]: F4})


def test_keys_in_context_name_the_last_searchable_layer_before_each_op() -> None:
    arch = _mixed()
    ops = network_ops(arch)
    keys = keys_in_context(ops, batch=3)
    assert [k.pooled() for k in keys] == [op.key.with_batch(3) for op in ops]
    last = None
    for op, key in zip(ops, keys, strict=True):
        assert key.after == last and key.batch == 3
        if op.searchable:
            last = "direct" if op.key.conv == "normal" else f"F{op.key.tile}"
    # before the first searchable conv: no context; the layers: their predecessor's kind
    assert keys[0].after is None  # the stem
    conv = [k for op, k in zip(ops, keys, strict=True) if op.searchable]
    assert [k.after for k in conv[:4]] == [None, "direct", "F2", "F4"]
    assert keys[-1].after == "direct"  # the head, after the last (direct) layer
    assert "after F2" in conv[2].describe()


def _row(key, seconds, **info) -> Row:
    return Row(key, seconds, None, 3, dict(info))


def _table_for(arch: Arch, *, slow_after_other: float) -> LatencyTable:
    """Every operation of ``arch`` at 1 ms pooled; in context, a layer whose predecessor is of
    another kind costs ``slow_after_other`` more (its own kind: 1 ms)."""
    rows = []
    for key in dict.fromkeys(op.key for op in network_ops(arch)):
        rows.append(_row(key, 1e-3))
        for after in ("direct", "F2", "F4"):
            mine = "direct" if key.conv in (None, "normal") else f"F{key.tile}"
            extra = slow_after_other if key.op == "conv3x3" and after != mine else 0.0
            rows.append(_row(replace(key, after=after), 1e-3 + extra))
    return LatencyTable(rows)


def test_table_model_prices_each_operation_in_its_context() -> None:
    arch = _mixed()
    table = _table_for(arch, slow_after_other=0.5e-3)
    assert table.has_context
    n = len(network_ops(arch))
    pooled = TableModel(table, context=False).price(arch)
    assert pooled.total == pytest.approx(n * 1e-3)
    # layer 2 (F2 after direct), 3 (F4 after F2), 4 (direct after F4) pay the switch
    ctx = TableModel(table).price(arch)
    assert ctx.total == pytest.approx(n * 1e-3 + 3 * 0.5e-3)
    names = arch.layer_names
    assert ctx.layers[names[1]] == pytest.approx(1.5e-3)
    assert ctx.layers[names[0]] == pytest.approx(1e-3)  # first: no context, the pooled row
    assert ctx.layers[names[5]] == pytest.approx(1e-3)  # direct after direct
    assert {e.key.after for e in ctx.entries if e.searchable} == {None, "direct", "F2", "F4"}
    # layer_cost prices one layer alone: the pooled row
    spec = arch.specs()[1]
    assert TableModel(table).layer_cost(spec, F2) == pytest.approx(1e-3)
    # a context the table lacks: the pooled row
    f4f4 = arch.with_layers({names[3]: F4})
    sparse = LatencyTable(r for r in table if r.key.after != "F4")
    got = TableModel(sparse).price(f4f4)
    assert got.layers[names[3]] == pytest.approx(1e-3)  # F4 after F4: no row, pooled
    assert got.layers[names[4]] == pytest.approx(1e-3)  # direct after F4: no row, pooled


def test_context_rows_round_trip_and_bad_contexts_are_named(tmp_path) -> None:
    arch = _mixed()
    table = _table_for(arch, slow_after_other=0.25e-3)
    path = table.write(tmp_path / "t.csv")
    again = LatencyTable.read(path)
    assert set(again.keys()) == set(table.keys()) and again.has_context
    assert again.rows_in_context == sum(1 for k in table.keys() if k.after is not None) > 0
    assert "after" in path.read_text().splitlines()[0].split(",")
    for row in table:
        assert math.isclose(again.get(row.key).seconds, row.seconds, rel_tol=1e-5)
        assert "after" not in again.get(row.key).info
    # a table without the column (written before it existed): its rows, pooled
    records = list(csv.DictReader(io.StringIO(path.read_text())))
    out = io.StringIO()
    header = [c for c in records[0] if c != "after"]
    writer = csv.DictWriter(out, fieldnames=header, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(r for r in records if not r["after"])
    old = LatencyTable.parse(out.getvalue())
    assert not old.has_context and set(old.keys()) == {k.pooled() for k in table.keys()}
    text = path.read_text().splitlines()
    col = text[0].split(",").index("after")
    # a bad context: one message naming the row and the column
    for bad in ("F1", "F9", "winograd", "f2", "F\u00b2", "F"):
        lines = list(text)
        cells = lines[1].split(",")
        cells[col] = bad
        lines[1] = ",".join(cells)
        with pytest.raises(LatencyError, match=rf"row 2: column 'after': '{bad}'"):
            LatencyTable.parse("\n".join(lines) + "\n", source="t.csv")
    # the same key in one context twice is a duplicate; in two contexts it is not
    dup = [text[0], text[1], text[1]]
    with pytest.raises(LatencyError, match="row 3: duplicate of row 2"):
        LatencyTable.parse("\n".join(dup) + "\n")


def test_calibration_and_anchors_read_pooled_rows_only() -> None:
    arch = _mixed()
    table = _table_for(arch, slow_after_other=5e-3)
    keys = [k for k, _ in table_rows_as_samples(table)]
    assert keys and all(k.after is None for k in keys)
    # a missing bit-width is anchored on the pooled row, whatever the context asked for
    model = TableModel(table, fallback="cortex-a73")
    arch8 = arch.with_layers({arch.layer_names[1]: LayerChoice("static", 2, 8)})
    report = model.price(arch8)
    assert arch.layer_names[1] in report.estimated
    assert report.layers[arch.layer_names[1]] < 5e-3  # not the 6 ms context row


def test_rows_from_samples_pool_every_context_and_keep_each() -> None:
    arch = _mixed()
    ops = network_ops(arch)
    keys = keys_in_context(ops)
    samples: dict = {}
    for i, k in enumerate(keys):
        samples.setdefault(k, []).extend([1e-3 * (i + 1)] * 2)
    wanted = [op.key for op in ops] + [
        replace(op.key, conv="flex") for op in ops if op.key.conv == "static"
    ]
    rows = {r.key: r for r in rows_from_samples(samples, wanted, stat="mean")}
    for k in dict.fromkeys(op.key for op in ops):
        mine = [s for kk, got in samples.items() if kk.pooled() == k for s in got]
        assert rows[k].repeats == len(mine)
        assert rows[k].seconds == pytest.approx(float(np.mean(mine)))
        for kk, got in samples.items():
            if kk.pooled() == k and kk.after is not None:
                assert rows[kk].repeats == len(got)
                assert rows[kk].seconds == pytest.approx(float(np.mean(got)))
    # a flex key takes its static twin's rows, in every context
    flex = [k for k in rows if k.conv == "flex"]
    assert {k.after for k in flex} == {None, "direct", "F2"}  # F2 after direct, F4 after F2
    assert all(rows[k].info["note"] == "same kernel as static" for k in flex)


def test_measure_writes_a_row_per_context_beside_the_pooled_one() -> None:
    plan = MeasurePlan(backbone="resnet18", width=WIDTH, input_size=16, bits=(None,), tiles=(2,))
    table, untimed = measure_plan(plan, threads=1, repeats=2, warmup_s=0.0)
    assert not untimed and table.has_context
    expected: dict = {}  # each context key's sample count over the plan's networks
    for a in plan_networks(plan):
        for k in keys_in_context(network_ops(a), plan.batch):
            expected[k] = expected.get(k, 0) + 2
    convs = [k for k in expected if k.op == "conv3x3"]
    assert {k.after for k in convs} == {None, "direct", "F2"}
    for k in convs:
        if k.after is not None:
            assert table.get(k).repeats == expected[k], k.describe()
    # every pooled row holds every sample of its key, in whatever context
    for k in {c.pooled() for c in convs}:
        total = sum(n for kk, n in expected.items() if kk.pooled() == k)
        assert table.get(k).repeats == total
    # a direct layer is timed after direct (uniform) and after F2 (alternating networks)
    direct = [k for k in convs if k.conv == "normal" and k.after == "F2"]
    assert direct and all(replace(k, after="direct") in table for k in direct)


# -- the fidelity benchmark's per-layer reading ----------------------------------------------
def test_per_layer_swap_prices_the_whole_swapped_network_in_context(monkeypatch) -> None:
    """A table whose pooled rows put F2 below direct, but whose rows in context charge the
    switch of kinds (as this machine's swaps measure): priced in context, every layer's
    order agrees with swaps that find F2 slower; its pooled rows say the opposite."""
    fid = load_benchmark("latency_fidelity")
    base = Arch.uniform("normal", None, None, width=WIDTH, input_size=16)
    rows = []
    for arch in (base, Arch.uniform("static", 2, None, width=WIDTH, input_size=16)):
        for key in dict.fromkeys(op.key for op in network_ops(arch)):
            cheap = 0.8e-3 if key.conv == "static" else 1e-3
            rows.append(_row(key, cheap))
            for after in ("direct", "F2"):
                mine = "F2" if key.conv == "static" else "direct"
                switch = 0.4e-3 if key.op == "conv3x3" and after != mine else 0.0
                rows.append(_row(replace(key, after=after), cheap + switch))
    table = LatencyTable(rows)
    args = argparse.Namespace(layer_reference="swap", batch=1, bootstrap=200, seed=0)
    monkeypatch.setattr(fid, "layer_options", lambda bits: [DIRECT, F2])  # the rows' options
    rng = np.random.default_rng(0)
    rounds = {}
    for spec in base.specs():  # measured: F2 costs 0.2 ms more than direct in every round
        net = 20e-3 + rng.normal(0, 1e-5, 12)
        rounds[spec.name] = [net, net + 0.2e-3]
    got = fid.per_layer(TableModel(table), base, None, rounds, 0.005, args)
    pooled = fid.per_layer(TableModel(table, context=False), base, None, rounds, 0.005, args)
    assert got["resolved"] == pooled["resolved"] == len(base.specs())
    assert got["rank"][0] == 1.0 and pooled["rank"][0] == -1.0
    # priced in context, a middle layer: the row's gain, the switch in and the switch back
    # out (the next layer's); the first layer follows no searchable one (its pooled row) and
    # the last precedes none: one switch each
    table_ms = [e["table_ms"] for e in got["layers"]]
    assert all(t[0] == 0.0 for t in table_ms)
    assert table_ms[1][1] == pytest.approx(-0.2 + 0.4 + 0.4, abs=1e-9)
    assert table_ms[0][1] == table_ms[-1][1] == pytest.approx(-0.2 + 0.4, abs=1e-9)
    assert pooled["layers"][0]["table_ms"][1] == pytest.approx(-0.2, abs=1e-9)


def test_the_latency_dict_turns_contexts_off_and_names_a_bad_value(tmp_path) -> None:
    from wasearch.latency import load_latency_model

    arch = _mixed()
    path = _table_for(arch, slow_after_other=0.5e-3).write(tmp_path / "t.csv")
    on = load_latency_model({"kind": "table", "path": str(path)})
    off = load_latency_model({"kind": "table", "path": str(path), "context": False})
    assert on.price(arch).total == pytest.approx(off.price(arch).total + 3 * 0.5e-3)
    measured = load_latency_model(
        {"kind": "measured", "path": str(path), "context": False, "measure_missing": False}
    )
    assert measured.price(arch).total == pytest.approx(off.price(arch).total)
    with pytest.raises(LatencyError, match="latency: context 'no' must be true or false"):
        load_latency_model({"kind": "table", "path": str(path), "context": "no"})
