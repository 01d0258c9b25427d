"""Measured latency: time the deploy kernels on this machine and keep the times in a table.

``measure_table`` times every operation a search space needs (each distinct geometry once) with
the kernels of ``wasearch.deploy``: warm-up calls, then ``repeats`` samples of enough calls to
last ``min_sample_s`` each; a row keeps the median per-call time and the interquartile range, and
the machine's identity (CPU model, logical cores, threads, GPU name, torch version). An existing
table is extended; rows already present are kept unless ``remeasure`` is set.

Bit-widths without an integer kernel here (``deploy.has_int_kernel``) are not timed: a
``MeasuredModel`` prices them with a profile calibrated on the measured rows, flagged estimated.

The timing harness lives in :mod:`.timing`, the kernels timed in :mod:`.kernels`, what a space
needs in :mod:`.plan`; their public names are importable from here too.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import torch

from .. import deploy
from ..arch import Arch
from .analytical import Profile, load_profile
from .base import LatencyError, LatencyReport
from .kernels import kernel_for
from .ops import OpKey, network_ops
from .plan import MeasurePlan, comparison_table, plan_networks
from .table import LatencyTable, Row, TableModel, table_rows_as_samples
from .timing import (
    STATS,
    NetworkTimer,
    Timing,
    device_identity,
    device_slug,
    time_callable,
    time_network_ops,
)

__all__ = [
    "STATS",
    "MeasurePlan",
    "MeasuredModel",
    "NetworkTimer",
    "Timing",
    "comparison_table",
    "device_identity",
    "device_slug",
    "kernel_for",
    "measure_plan",
    "measure_table",
    "plan_networks",
    "rows_from_samples",
    "time_callable",
    "time_network_ops",
]

logger = logging.getLogger(__name__)
_FLEX_NOTE = "same kernel as static"


# -- building a table ----------------------------------------------------------------------------
def _check_identity(
    table: LatencyTable, ident: dict[str, str], *, remeasure: bool
) -> LatencyTable:
    """Refuse to mix another device's (or thread count's) rows into ``table``; with
    ``remeasure``, start a fresh table instead."""
    old = table.identity()
    clash = [c for c in ("device", "threads", "stat") if old.get(c) and old[c] != ident.get(c)]
    if clash and not remeasure:
        c = clash[0]
        raise LatencyError(
            f"{table.source}: measured with {c}={old[c]!r}, this run has {c}={ident[c]!r}; "
            "write to another table (or remeasure to replace it)"
        )
    if clash:
        return LatencyTable(source=table.source)
    return table


def _static_twin(key: OpKey) -> OpKey:
    return replace(key, conv="static") if key.conv == "flex" else key


def _rows(targets: Iterable[OpKey], timing: Timing, ident: dict[str, str], stat: str) -> list[Row]:
    """Rows for ``targets`` (a key and its flex twins) from one timing."""
    stamp = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    rows = []
    for k in targets:
        info = dict(ident, measured_at=stamp, stat=stat)
        if k.conv == "flex":
            info["note"] = _FLEX_NOTE
        rows.append(Row(k, timing.stat(stat), timing.spread, timing.repeats, info))
    return rows


def rows_from_samples(
    samples: Mapping[OpKey, Sequence[float]],
    keys: Iterable[OpKey],
    *,
    stat: str = "median",
    identity: Mapping[str, str] | None = None,
) -> list[Row]:
    """Table rows for ``keys`` (keys over every context) from samples (a flex key takes its
    static twin's). Samples keyed in a context (``OpKey.after``, :class:`NetworkTimer`'s
    ``context``) make a row of their own per context, and count in the key's pooled row too,
    which holds every sample of the key."""
    ident = dict(identity or device_identity())
    pooled: dict[OpKey, list[float]] = {}
    contexts: dict[OpKey, dict[str, list[float]]] = {}
    for k, got in samples.items():
        pooled.setdefault(k.pooled(), []).extend(got)
        if k.after is not None:
            contexts.setdefault(k.pooled(), {}).setdefault(k.after, []).extend(got)
    rows = []
    for k in dict.fromkeys(key.pooled() for key in keys):
        twin = _static_twin(k)
        got = pooled.get(twin)
        if got:
            rows.extend(_rows([k], Timing(tuple(got)), ident, stat))
        for after, in_ctx in sorted(contexts.get(twin, {}).items()):
            rows.extend(_rows([replace(k, after=after)], Timing(tuple(in_ctx)), ident, stat))
    return rows


def measure_plan(
    plan: MeasurePlan,
    *,
    table: LatencyTable | None = None,
    batch: int | None = None,
    remeasure: bool = False,
    device: str | torch.device = "cpu",
    threads: int | None = None,
    repeats: int = 15,
    warmup_s: float = 0.05,
    stat: str = "median",
    progress: bool = False,
) -> tuple[LatencyTable, list[OpKey]]:
    """Time every operation a space needs, in place (see :func:`time_network_ops`).

    Runs the networks of :func:`plan_networks` that hold a missing row (every one with
    ``remeasure``: the uniform ones and, where direct and Winograd layers mix, the alternating
    ones) for ``repeats`` forward passes each; a key's row pools its samples from every network
    and layer that runs it (layers that share a geometry pool theirs; a kernel is timed next to
    either kind of neighbour), and a row per context (``after``: the kernel family of the
    searchable layer before it) pools those taken in that context, which
    :class:`TableModel` uses to price a network. Keys no network produced are timed in
    isolation (:func:`measure_table`), pooled only. Returns the table and the keys left
    untimed (no kernel here).
    """
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LatencyError("--device cuda: no CUDA device is available here")
    b = plan.batch if batch is None else batch
    table = table if table is not None else LatencyTable()
    ident = device_identity(dev, threads=threads)
    table = _check_identity(table, dict(ident, stat=stat), remeasure=remeasure)
    wanted = plan.keys(batch=b)
    untimeable = [k for k in wanted if not deploy.has_int_kernel(k.bits, dev)]
    missing: dict[OpKey, list[OpKey]] = {}  # timed (static twin) -> keys it fills
    for k in wanted:
        if k not in untimeable and (remeasure or k not in table):
            missing.setdefault(_static_twin(k), []).append(k)

    prev_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        nets = [
            a
            for a in plan_networks(plan, device=dev)
            if any(op.key.with_batch(b) in missing for op in network_ops(a))
        ]
        bar = None
        if progress and nets:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(nets), desc="measure", unit="net", leave=False)
        found: dict[OpKey, list[float]] = {}  # every network's samples of a missing key
        for arch in nets:
            if bar is not None:
                bar.set_postfix_str(arch.summary(), refresh=False)
            for key, samples in time_network_ops(
                arch,
                batch=b,
                device=dev,
                repeats=repeats,
                warmup_s=warmup_s,
                context=True,
                stat=stat,
            ).items():
                if key.pooled() in missing:
                    found.setdefault(key, []).extend(samples)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        timed = {k.pooled() for k in found}
        targets = [t for twin in timed for t in missing.pop(twin)]
        for row in rows_from_samples(found, targets, stat=stat, identity=ident):
            table.add(row)
    finally:
        torch.set_num_threads(prev_threads)
    # A traced network's generic operations run only in place: one no network produced stays
    # missing (a ``MeasuredModel`` times its network when pricing it).
    leftovers = [k for targets in missing.values() for k in targets if not k.generic]
    if leftovers:
        table, _ = measure_table(
            leftovers,
            table=table,
            remeasure=True,
            device=dev,
            threads=threads,
            repeats=repeats,
            stat=stat,
            progress=progress,
        )
    return table, untimeable


def measure_table(
    keys: Iterable[OpKey],
    *,
    table: LatencyTable | None = None,
    remeasure: bool = False,
    device: str | torch.device = "cpu",
    threads: int | None = None,
    repeats: int = 15,
    min_sample_s: float = 2e-3,
    warmup_s: float = 0.03,
    stat: str = "median",
    progress: bool = False,
    on_row: Callable[[Row], None] | None = None,
) -> tuple[LatencyTable, list[OpKey]]:
    """Time the keys the table lacks (all of them with ``remeasure``); return the extended table
    and the keys left untimed because their bit-width has no kernel here.

    ``flex`` keys are timed once with their ``static`` twin (the same deploy kernel) and stored
    as rows of their own with the note ``same kernel as static``. ``threads`` sets torch's
    intra-op threads for the duration. Refuses to extend a table measured on another device or
    thread count (``LatencyError``).
    """
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LatencyError("--device cuda: no CUDA device is available here")
    table = table if table is not None else LatencyTable()
    ident = device_identity(dev, threads=threads)
    table = _check_identity(table, dict(ident, stat=stat), remeasure=remeasure)

    wanted = list(dict.fromkeys(keys))
    untimeable = [k for k in wanted if not deploy.has_int_kernel(k.bits, dev)]
    todo: dict[OpKey, list[OpKey]] = {}  # timed key -> keys whose row it fills
    for k in wanted:
        if k in untimeable or (k in table and not remeasure):
            continue
        todo.setdefault(_static_twin(k), []).append(k)

    prev_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(todo), desc="measure", unit="op", leave=False)
        for timed, targets in todo.items():
            if bar is not None:
                bar.set_postfix_str(timed.describe(), refresh=False)
            fn = kernel_for(timed, device=dev)
            t = time_callable(
                fn, repeats=repeats, min_sample_s=min_sample_s, warmup_s=warmup_s, device=dev
            )
            del fn
            for row in _rows(targets, t, ident, stat):
                table.add(row)
                if on_row is not None:
                    on_row(row)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
    finally:
        torch.set_num_threads(prev_threads)
    return table, untimeable


# -- the measured model --------------------------------------------------------------------------
class MeasuredModel(TableModel):
    """A table measured on this machine that times what it lacks on first use.

    Rows missing from the table whose kernel exists here are timed when first asked for (when
    ``measure_missing``) and saved back to ``path`` atomically; bit-widths without a kernel are
    priced by the fallback profile (by default one calibrated on the table), flagged estimated.
    """

    kind = "measured"

    def __init__(
        self,
        path: str | os.PathLike | None = None,
        *,
        batch: int = 1,
        device: str = "cpu",
        threads: int | None = None,
        repeats: int = 15,
        measure_missing: bool = True,
        fallback: str | None = "calibrate",
        base_profile: str = "cortex-a73",
        context: bool = True,
    ) -> None:
        dev = torch.device(device)
        self.path = (
            Path(path)
            if path is not None
            else Path("results", "latency", f"{device_slug(dev, threads=threads)}.csv")
        )
        table = (
            LatencyTable.read(self.path)
            if self.path.exists()
            else LatencyTable(source=str(self.path))
        )
        super().__init__(
            table, batch=batch, fallback=fallback, base_profile=base_profile, context=context
        )
        self.device, self.threads, self.repeats = dev, threads, repeats
        self.measure_missing = measure_missing
        ident, old = device_identity(dev, threads=threads), table.identity()
        if old.get("device") and old["device"] != ident["device"]:
            raise LatencyError(
                f"{self.path}: measured on {old['device']!r}, this machine is "
                f"{ident['device']!r}; use kind 'table' to price with it"
            )

    def price(
        self, arch: Arch, *, input_size: int | None = None, batch: int | None = None
    ) -> LatencyReport:
        """As :meth:`LatencyModel.price`; first, when a traced network's generic operations
        (or any of its operations) are missing from the table, its deploy model is timed in
        place once and the rows it lacks are added and saved (``measure_missing``)."""
        if self.measure_missing and not arch.is_paper:
            self._time_in_place(arch, input_size=input_size, batch=batch)
        return super().price(arch, input_size=input_size, batch=batch)

    def _time_in_place(self, arch: Arch, *, input_size: int | None, batch: int | None) -> None:
        b = self.batch if batch is None else batch
        size = arch.input_size if input_size is None else input_size
        keys = [op.key.with_batch(b) for op in self.network_ops(arch, input_size=size)]
        missing = [k for k in dict.fromkeys(keys) if self._lookup(k) is None]
        if not any(k.generic for k in missing):
            return
        if size != arch.input_size:
            arch = replace(arch, input_size=size)
        stat = self.table.identity().get("stat", "median")
        ident = device_identity(self.device, threads=self.threads)
        self.table = _check_identity(self.table, dict(ident, stat=stat), remeasure=False)
        prev_threads = torch.get_num_threads()
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        try:
            samples = time_network_ops(
                arch, batch=b, device=self.device, repeats=self.repeats, warmup_s=0.05, stat=stat
            )
        finally:
            torch.set_num_threads(prev_threads)
        timeable = [k for k in missing if deploy.has_int_kernel(k.bits, self.device)]
        for row in rows_from_samples(samples, timeable, stat=stat, identity=ident):
            self.table.add(row)
            self._cache.pop(row.key, None)
        self.table.write(self.path)
        self._fallback = None if self._fallback_spec == "calibrate" else self._fallback
        logger.info("timed %s in place: %d rows", arch.network, len(timeable))

    @property
    def fallback(self) -> Profile | None:
        """As ``TableModel.fallback``; the base profile while the table is too small to fit."""
        if self._fallback_spec == "calibrate" and len(table_rows_as_samples(self.table)) < 3:
            return load_profile(self.base_profile)
        return super().fallback

    def _op_cost(self, key: OpKey) -> tuple[float, bool]:
        row = self._lookup(key)
        if row is not None:
            return row.seconds, False
        key = key.pooled()  # timed alone: no context
        if (
            self.measure_missing
            and not key.generic  # timed in place, by price
            and deploy.has_int_kernel(key.bits, self.device)
        ):
            self.table, _ = measure_table(
                [key],
                table=self.table,
                device=self.device,
                threads=self.threads,
                repeats=self.repeats,
                stat=self.table.identity().get("stat", "median"),
            )
            self.table.write(self.path)
            self._fallback = None if self._fallback_spec == "calibrate" else self._fallback
            logger.info("timed %s: %.3g s", key.describe(), self.table.get(key).seconds)
            return self.table.get(key).seconds, False
        return self._missing(key)
