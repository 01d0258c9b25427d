"""Measured latency: time the deploy kernels on this machine and keep the times in a table.

``measure_table`` times every operation a search space needs (each distinct geometry once) with
the kernels of ``wasearch.deploy``: warm-up calls, then ``repeats`` samples of enough calls to
last ``min_sample_s`` each; a row keeps the median per-call time and the interquartile range, and
the machine's identity (CPU model, logical cores, threads, GPU name, torch version). An existing
table is extended; rows already present are kept unless ``remeasure`` is set.

Bit-widths without an integer kernel here (``deploy.has_int_kernel``) are not timed: a
``MeasuredModel`` prices them with a profile calibrated on the measured rows, flagged estimated.
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
import os
import platform
import re
import statistics
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import deploy
from ..arch import Arch, LayerChoice
from ..models import searchable_convs
from ..winograd import transform_matrices
from .analytical import Profile, load_profile
from .base import LatencyError
from .ops import SEARCHABLE_OP, OpKey, conv_key, network_ops
from .table import LatencyTable, Row, TableModel, table_rows_as_samples

__all__ = [
    "STATS",
    "MeasurePlan",
    "MeasuredModel",
    "Timing",
    "comparison_table",
    "device_identity",
    "device_slug",
    "kernel_for",
    "measure_plan",
    "measure_table",
    "plan_networks",
    "time_callable",
    "time_network_ops",
    "NetworkTimer",
    "rows_from_samples",
]

logger = logging.getLogger(__name__)
_FLEX_NOTE = "same kernel as static"


# -- machine identity ----------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown cpu"


def device_identity(
    device: str | torch.device = "cpu", *, threads: int | None = None
) -> dict[str, str]:
    """``device`` (CPU model, or GPU name), ``cores`` (logical CPUs), ``threads``, ``torch``."""
    dev = torch.device(device)
    if dev.type == "cuda":
        name = f"cuda: {torch.cuda.get_device_name(dev)}"
    else:
        name = f"cpu: {_cpu_model()}"
    return {
        "device": name,
        "cores": str(os.cpu_count() or 0),
        "threads": str(threads if threads is not None else torch.get_num_threads()),
        "torch": torch.__version__.split("+")[0],
    }


def device_slug(device: str | torch.device = "cpu", *, threads: int | None = None) -> str:
    """A file-name-safe name of this machine, e.g. ``cpu-amd-epyc-2t``."""
    ident = device_identity(device, threads=threads)
    slug = re.sub(r"[^a-z0-9]+", "-", ident["device"].lower()).strip("-")
    return f"{slug[:40].rstrip('-')}-{ident['threads']}t"


# -- timing --------------------------------------------------------------------------------------
#: Statistics a table row can keep of its samples (the ``stat`` column).
STATS = ("median", "mean", "min")


@dataclass(frozen=True)
class Timing:
    """Per-call times of ``repeats`` samples of ``number`` calls each.

    ``median`` is robust to the occasional preempted sample; ``mean`` is additive (the mean
    of a network's operations sums to the network's mean, which medians do not when other
    processes interrupt random operations); ``min`` estimates the uninterrupted time.
    """

    samples: tuple[float, ...]
    number: int = 1  # calls per sample

    @property
    def repeats(self) -> int:
        return len(self.samples)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.samples)

    @property
    def min(self) -> float:
        return min(self.samples)

    @property
    def spread(self) -> float:
        """Interquartile range (the full range below 4 samples)."""
        s = sorted(self.samples)
        if len(s) >= 4:
            q = statistics.quantiles(s, n=4)
            return q[2] - q[0]
        return s[-1] - s[0]

    def stat(self, name: str) -> float:
        if name not in STATS:
            raise ValueError(f"stat={name!r}; use one of {', '.join(STATS)}")
        return getattr(self, name)


def time_callable(
    fn: Callable[[], Any],
    *,
    repeats: int = 15,
    warmup: int = 3,
    warmup_s: float = 0.03,
    min_sample_s: float = 2e-3,
    device: str | torch.device = "cpu",
) -> Timing:
    """Time ``fn()``: at least ``warmup`` calls and ``warmup_s`` seconds of warm-up (oneDNN
    creates its primitives, caches fill), then ``repeats`` samples of ``number`` calls each,
    where ``number`` makes a sample last about ``min_sample_s`` (timer resolution, call noise)."""
    if repeats < 1:
        raise ValueError(f"repeats={repeats!r} must be >= 1")
    cuda = torch.device(device).type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    with torch.inference_mode():
        fn()  # the first call pays one-off costs: keep it out of the estimate
        sync()
        calls, t0 = 0, time.perf_counter()
        while calls < max(warmup, 1) or time.perf_counter() - t0 < warmup_s:
            fn()
            sync()
            calls += 1
        per_call = (time.perf_counter() - t0) / calls
        number = max(1, math.ceil(min_sample_s / max(per_call, 1e-9)))
        samples = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(number):
                fn()
            sync()
            samples.append((time.perf_counter() - t0) / number)
    return Timing(tuple(samples), number)


# -- kernels for one op --------------------------------------------------------------------------
def _example(shape: Sequence[int], device: torch.device, *, nonneg: bool = False) -> torch.Tensor:
    x = torch.randn(*shape, device=device)
    if nonneg:
        x = x.relu_()
    return x.contiguous(memory_format=torch.channels_last)


def kernel_for(key: OpKey, *, device: str | torch.device = "cpu") -> Callable[[], torch.Tensor]:
    """A zero-argument callable running the deploy kernel of ``key`` on random data.

    The kernels are those ``deploy.to_deploy`` builds (random weights; 8-bit activation ranges
    fixed from the example input, as a calibrated model has them). Raises ``LatencyError`` for a
    bit-width with no kernel here.
    """
    dev = torch.device(device)
    if not deploy.has_int_kernel(key.bits, dev):
        raise LatencyError(f"no {key.bits}-bit kernel on {dev.type}: {key.describe()}")
    b, c, k, h, w = key.batch, key.in_channels, key.out_channels, key.height, key.width
    bias = torch.randn(k, device=dev) * 0.1

    def weight(kh: int) -> torch.Tensor:
        return torch.randn(k, c, kh, kh, device=dev) / math.sqrt(c * kh * kh)

    with torch.no_grad():
        if key.op == SEARCHABLE_OP:
            x = _example((b, c, h, w), dev, nonneg=True)
            amax = float(x.abs().max()) if key.bits is not None else None
            if key.conv == "normal":
                mod = deploy.DirectConv(weight(3), bias, padding=1, bits=key.bits, act_amax=amax)
            else:
                A_t, G, B_t = (t.to(dev) for t in transform_matrices(key.tile))
                mod = deploy.WinogradConv(weight(3), bias, A_t, G, B_t, bits=key.bits)
                if key.bits is not None:  # fix the per-position range from this input
                    mod.act_amax = _winograd_input_amax(x, B_t, key.tile)
            mod = mod.to(dev)
            return lambda: mod(x)
        if key.op == "conv1x1":
            x = _example((b, c, h, w), dev, nonneg=True)
            amax = float(x.abs().max()) if key.bits is not None else None
            mod = deploy.DirectConv(weight(1), bias, padding=0, bits=key.bits, act_amax=amax).to(
                dev
            )
            return lambda: mod(x)
        if key.op == "stem":
            x = torch.randn(b, c, h, w, device=dev)  # the network's input: NCHW
            mod = deploy.DirectConv(weight(3), bias, padding=1).to(dev)
            return lambda: torch.relu_(mod(x.contiguous(memory_format=torch.channels_last)))
        if key.op == "maxpool":
            x = _example((b, c, h, w), dev)
            pool = torch.nn.MaxPool2d(2)
            return lambda: pool(x)
        if key.op == "relu":
            x = _example((b, c, h, w), dev)
            return lambda: torch.relu_(x)
        if key.op == "add_relu":
            x = _example((b, c, h, w), dev, nonneg=True)
            y = _example((b, c, h, w), dev, nonneg=True) * 1e-6  # keeps values bounded
            return lambda: torch.relu_(x.add_(y))
        if key.op == "head":
            x = _example((b, c, h, w), dev)
            head = deploy.Head(torch.randn(k, c, device=dev) / math.sqrt(c), bias).to(dev)
            return lambda: head(x)
    raise LatencyError(f"unknown op {key.op!r}")


def _winograd_input_amax(x: torch.Tensor, B_t: torch.Tensor, m: int) -> torch.Tensor:
    a = m + 2
    cols = torch.nn.functional.unfold(x.contiguous(), a, padding=1, stride=m)
    n, _, t = cols.shape
    tiles = cols.view(n, -1, a, a, t).permute(2, 3, 0, 1, 4).reshape(a, a, -1)
    v = torch.matmul(B_t, (B_t @ tiles.reshape(a, -1)).view(a, a, -1))
    return v.abs().reshape(a * a, -1).amax(dim=1).cpu()


# -- what a space needs --------------------------------------------------------------------------
@dataclass(frozen=True)
class MeasurePlan:
    """The operations of a search space: backbone geometry, the allowed choices, the batch."""

    backbone: str = "resnet18"
    width: float = 0.5
    input_size: int = 32
    num_classes: int = 10
    convs: tuple[str, ...] = ("normal", "static", "flex")
    tiles: tuple[int, ...] = (2, 4, 6)
    bits: tuple[int | None, ...] = (None,)
    batch: int = 1
    latency: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_space(cls, data: Any, source: str = "space") -> MeasurePlan:
        """Read ``model: {backbone, width, input_size, num_classes}``, ``choices: {conv, tile,
        bits}`` and ``latency: {..., batch}`` from a search-space mapping; other keys are left to
        the search."""
        if not isinstance(data, Mapping):
            raise LatencyError(f"{source}: expected a mapping (a search space YAML)")
        model = data.get("model") or {}
        choices = data.get("choices") or {}
        latency = data.get("latency") or {}
        for name, part in (("model", model), ("choices", choices), ("latency", latency)):
            if not isinstance(part, Mapping):
                raise LatencyError(f"{source}: '{name}' must be a mapping")

        def listed(key: str, default: tuple) -> tuple:
            value = choices.get(key, list(default))
            if not isinstance(value, list | tuple) or not value:
                raise LatencyError(f"{source}: choices.{key} must be a non-empty list")
            return tuple(value)

        convs = listed("conv", cls.convs)
        bad = [c for c in convs if c not in ("normal", "static", "flex")]
        if bad:
            raise LatencyError(
                f"{source}: choices.conv: unknown {bad[0]!r}; use normal, static, flex"
            )
        tiles = listed("tile", cls.tiles)
        for t in tiles:
            if isinstance(t, bool) or not isinstance(t, int) or not 2 <= t <= 8:
                raise LatencyError(f"{source}: choices.tile: {t!r}; use integers in 2..8")
        bits = listed("bits", cls.bits)
        for b in bits:
            if b is not None and (
                isinstance(b, bool) or not isinstance(b, int) or not 2 <= b <= 16
            ):
                raise LatencyError(f"{source}: choices.bits: {b!r}; use 2..16 or null")
        batch = latency.get("batch", 1)
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise LatencyError(f"{source}: latency.batch: {batch!r} must be a positive integer")
        try:
            plan = cls(
                backbone=str(model.get("backbone", cls.backbone)),
                width=float(model.get("width", cls.width)),
                input_size=int(model.get("input_size", cls.input_size)),
                num_classes=int(model.get("num_classes", cls.num_classes)),
                convs=convs,
                tiles=tiles,
                bits=bits,
                batch=batch,
                latency=dict(latency),
            )
            searchable_convs(plan.backbone, plan.width, plan.input_size)
        except (TypeError, ValueError) as err:
            raise LatencyError(f"{source}: model: {err}") from None
        return plan

    def choices(self) -> list[LayerChoice]:
        out = []
        for conv in self.convs:
            for bits in self.bits:
                if conv == "normal":
                    out.append(LayerChoice("normal", None, bits))
                else:
                    out.extend(LayerChoice(conv, t, bits) for t in self.tiles)
        return list(dict.fromkeys(out))

    def keys(self, *, batch: int | None = None) -> list[OpKey]:
        """Every operation the space can produce, each distinct key once, in network order."""
        b = self.batch if batch is None else batch
        keys: dict[OpKey, None] = {}
        choices = self.choices()
        for bits in self.bits:  # the shortcuts run at the default bit-width: any of the list
            default = LayerChoice("normal", None, bits)
            arch = Arch(self.backbone, self.width, self.num_classes, self.input_size, default)
            for op in network_ops(arch):
                if not op.searchable:
                    keys[op.key.with_batch(b)] = None
                    continue
                spec = op.spec
                for choice in choices:
                    if choice.conv != "normal" and choice.tile > min(spec.height, spec.width):
                        continue  # F(m x m, 3 x 3) reads (m + 2)^2 tiles: it does not fit
                    keys[conv_key(spec, choice, b)] = None
        return list(keys)


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
    if key.conv != "flex":
        return key
    return OpKey(
        key.op,
        key.in_channels,
        key.out_channels,
        key.height,
        key.width,
        key.batch,
        "static",
        key.tile,
        key.bits,
    )


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


class NetworkTimer:
    """The deploy model of ``arch`` on a random input, timed operation by operation *in place*.

    :meth:`run` makes forward passes with a clock read after each operation
    (``DeployResNet.forward``'s ``tick``); :meth:`run_total` times plain forward passes end to
    end. In place, each operation runs with the caches and allocator state a real forward pass
    leaves it, which timing one kernel alone in a loop does not reproduce.
    """

    def __init__(self, arch: Arch, *, batch: int = 1, device: str | torch.device = "cpu") -> None:
        from ..models import build

        self.arch = arch
        self.device = torch.device(device)
        self.x = torch.randn(batch, 3, arch.input_size, arch.input_size, device=self.device)
        quantized = any(c.bits is not None for _, c in arch) or arch.default.bits is not None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # substitutions are reported by the caller
            self.deployed = deploy.to_deploy(
                build(arch).eval().to(self.device), calibration=self.x if quantized else None
            )
        self.keys = {op.name: op.key.with_batch(batch) for op in network_ops(arch)}

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def warmup(self, seconds: float = 0.05) -> NetworkTimer:
        with torch.inference_mode():
            t0, runs = time.perf_counter(), 0
            while runs < 2 or time.perf_counter() - t0 < seconds:
                self.deployed(self.x)
                runs += 1
            self._sync()
        return self

    def run(self, repeats: int = 1) -> dict[OpKey, list[float]]:
        """Per-operation samples of ``repeats`` passes (layers sharing a key pool theirs)."""
        samples: dict[OpKey, list[float]] = {}
        clock = [0.0]

        def tick(name: str) -> None:
            self._sync()
            now = time.perf_counter()
            samples.setdefault(self.keys[name], []).append(now - clock[0])
            clock[0] = now

        with torch.inference_mode():
            for _ in range(repeats):
                clock[0] = time.perf_counter()
                self.deployed(self.x, tick)
        return samples

    def run_total(self, repeats: int = 1) -> list[float]:
        """End-to-end seconds of ``repeats`` plain forward passes."""
        out = []
        with torch.inference_mode():
            for _ in range(repeats):
                t0 = time.perf_counter()
                self.deployed(self.x)
                self._sync()
                out.append(time.perf_counter() - t0)
        return out


def time_network_ops(
    arch: Arch,
    *,
    batch: int = 1,
    device: str | torch.device = "cpu",
    repeats: int = 15,
    warmup_s: float = 0.05,
) -> dict[OpKey, list[float]]:
    """Per-operation samples of ``repeats`` forward passes of ``arch``'s deploy model, timed in
    place (see :class:`NetworkTimer`), after ``warmup_s`` seconds of warm-up."""
    timer = NetworkTimer(arch, batch=batch, device=device).warmup(warmup_s)
    return timer.run(repeats)


def rows_from_samples(
    samples: Mapping[OpKey, Sequence[float]],
    keys: Iterable[OpKey],
    *,
    stat: str = "median",
    identity: Mapping[str, str] | None = None,
) -> list[Row]:
    """Table rows for ``keys`` from pooled samples (a flex key takes its static twin's)."""
    ident = dict(identity or device_identity())
    rows = []
    for k in keys:
        got = samples.get(_static_twin(k))
        if got:
            rows.extend(_rows([k], Timing(tuple(got)), ident, stat))
    return rows


def plan_networks(plan: MeasurePlan, *, device: str | torch.device = "cpu") -> list[Arch]:
    """Uniform networks whose operations cover a plan's keys: direct, and static F(m) for each
    tile, at each bit-width with a kernel here (layers too small for a tile fall back to the
    largest that fits, as ``Arch.uniform`` does)."""
    archs = []
    common = {
        "backbone": plan.backbone,
        "width": plan.width,
        "num_classes": plan.num_classes,
        "input_size": plan.input_size,
    }
    for bits in plan.bits:
        if not deploy.has_int_kernel(bits, device):
            continue
        if "normal" in plan.convs:
            archs.append(Arch.uniform("normal", None, bits, **common))
        if any(c != "normal" for c in plan.convs):
            archs.extend(Arch.uniform("static", t, bits, **common) for t in plan.tiles)
    return archs


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

    Runs the uniform networks of :func:`plan_networks` that hold a missing row (every one with
    ``remeasure``) and keeps ``repeats`` forward passes' samples per distinct key (layers that
    share a geometry pool theirs); keys no network produced are timed in isolation
    (:func:`measure_table`). Returns the table and the keys left untimed (no kernel here).
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
        for arch in nets:
            if bar is not None:
                bar.set_postfix_str(arch.summary(), refresh=False)
            for key, samples in time_network_ops(
                arch, batch=b, device=dev, repeats=repeats, warmup_s=warmup_s
            ).items():
                targets = missing.pop(key, None)
                if targets:
                    for row in _rows(targets, Timing(tuple(samples)), ident, stat):
                        table.add(row)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
    finally:
        torch.set_num_threads(prev_threads)
    leftovers = [k for targets in missing.values() for k in targets]
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
        timed = (
            OpKey(
                k.op,
                k.in_channels,
                k.out_channels,
                k.height,
                k.width,
                k.batch,
                "static",
                k.tile,
                k.bits,
            )
            if k.conv == "flex"
            else k
        )
        todo.setdefault(timed, []).append(k)

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
        super().__init__(table, batch=batch, fallback=fallback, base_profile=base_profile)
        self.device, self.threads, self.repeats = dev, threads, repeats
        self.measure_missing = measure_missing
        ident, old = device_identity(dev, threads=threads), table.identity()
        if old.get("device") and old["device"] != ident["device"]:
            raise LatencyError(
                f"{self.path}: measured on {old['device']!r}, this machine is "
                f"{ident['device']!r}; use kind 'table' to price with it"
            )

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
        if self.measure_missing and deploy.has_int_kernel(key.bits, self.device):
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


# -- reporting -----------------------------------------------------------------------------------
def comparison_table(
    table: LatencyTable | TableModel, plan: MeasurePlan, *, batch: int | None = None
) -> str:
    """Per searchable geometry: direct convolution against F2/F4/F6 (ms and ratio to direct),
    one block per bit-width; estimated entries (no kernel here) carry a ``*``."""
    model = table if isinstance(table, TableModel) else TableModel(table, fallback=None)
    b = plan.batch if batch is None else batch
    specs = searchable_convs(plan.backbone, plan.width, plan.input_size)
    groups: dict[tuple[int, int, int, int], list[str]] = {}
    for s in specs:
        groups.setdefault((s.in_channels, s.out_channels, s.height, s.width), []).append(s.name)
    tiles = sorted(set(plan.tiles)) if any(c != "normal" for c in plan.convs) else []
    lines = []
    for bits in plan.bits:
        bits_name = "fp32" if bits is None else f"{bits}-bit"
        lines.append(f"per-layer comparison, {bits_name}, batch {b} (ms; ratio to direct)")
        head = f"{'in->out @HxW':<18} {'layers':<30} {'direct':>9}"
        head += "".join(f" {'F' + str(t):>16}" for t in tiles)
        lines.append(head)
        for (c, k, h, w), names in groups.items():
            label = names[0] if len(names) == 1 else f"{names[0]} (+{len(names) - 1})"
            base = _cell(model, OpKey(SEARCHABLE_OP, c, k, h, w, b, "normal", None, bits))
            row = f"{f'{c}->{k} @{h}x{w}':<18} {label:<30} {base[0]:>9}"
            for t in tiles:
                if t + 2 > min(h, w) + 2:
                    row += f" {'-':>16}"
                    continue
                cell = _cell(model, OpKey(SEARCHABLE_OP, c, k, h, w, b, "static", t, bits))
                ratio = f"{cell[1] / base[1]:.2f}x" if base[1] and cell[1] else ""
                row += f" {cell[0] + ' ' + ratio:>16}"
            lines.append(row)
        lines.append("")
    return "\n".join(lines).rstrip()


def _cell(model: TableModel, key: OpKey) -> tuple[str, float | None]:
    try:
        s, est = model.op_cost(key)
    except LatencyError:
        return "n/a", None
    return f"{s * 1e3:.3f}{'*' if est else ''}", s
