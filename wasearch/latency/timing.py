"""Timing on this machine: who measured (the machine's identity) and how (the harness).

:func:`time_callable` times one kernel in a loop: warm-up calls, then ``repeats`` samples of
enough calls to last ``min_sample_s`` each. :class:`NetworkTimer` times a whole deploy network
operation by operation, in place. :class:`Timing` keeps the samples and the statistics a table
row can store of them.
"""

from __future__ import annotations

import math
import os
import platform
import re
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import deploy
from ..arch import Arch
from ..discovery import OUTPUT_OP
from .ops import OpKey, keys_in_context, network_ops

__all__ = [
    "STATS",
    "NetworkTimer",
    "Timing",
    "calls_per_sample",
    "cpu_model",
    "device_identity",
    "device_slug",
    "machine_line",
    "time_callable",
    "time_network_ops",
    "time_sample",
]


# -- machine identity ----------------------------------------------------------------------------
def cpu_model(cpuinfo: str | None = None) -> str:
    """The CPU's model name, with its family and model numbers where ``/proc/cpuinfo`` gives
    them: a virtual machine's name is often generic (``AMD EPYC`` was a Zen 4 in one session
    and a Zen 5 in the next), and the numbers tell such machines apart, so a latency table
    timed on one is not silently reused on the other. ``cpuinfo``: that file's text (tests)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        key = key.strip().lower()
        if not sep:
            if fields:  # the first processor's block ends at its blank line
                break
            continue
        fields.setdefault(key, value.strip())
    name = fields.get("model name") or platform.processor() or platform.machine()
    name = name or "unknown cpu"
    family, model = fields.get("cpu family"), fields.get("model")
    if family and model and family.isdigit() and model.isdigit():
        return f"{name} (family {family}, model {model})"
    return name


def device_identity(
    device: str | torch.device = "cpu", *, threads: int | None = None
) -> dict[str, str]:
    """``device`` (CPU model, or GPU name), ``cores`` (logical CPUs), ``threads``, ``torch``."""
    dev = torch.device(device)
    if dev.type == "cuda":
        name = f"cuda: {torch.cuda.get_device_name(dev)}"
    else:
        name = f"cpu: {cpu_model()}"
    return {
        "device": name,
        "cores": str(os.cpu_count() or 0),
        "threads": str(threads if threads is not None else torch.get_num_threads()),
        "torch": torch.__version__.split("+")[0],
    }


def machine_line(device: str | torch.device = "cpu", *, threads: int | None = None) -> str:
    """One line naming the machine a figure was measured on: the device (CPU model or GPU), the
    ISA level torch dispatches to, cores, threads, torch, and the 1-minute load average (a
    figure measured while other work ran is not an idle figure)."""
    ident = device_identity(device, threads=threads)
    isa = torch.backends.cpu.get_cpu_capability()
    try:
        load = f"{os.getloadavg()[0]:.2f}"
    except OSError:
        load = "unknown"
    return (
        f"{ident['device']}, ISA {isa}, {ident['cores']} cores, {ident['threads']} threads, "
        f"torch {ident['torch']}, load average {load}"
    )


def device_slug(device: str | torch.device = "cpu", *, threads: int | None = None) -> str:
    """A file-name-safe name of this machine, e.g. ``cpu-amd-epyc-f25m17-2t``: the model name
    (its first 32 characters), the CPU family and model where known, and the threads."""
    ident = device_identity(device, threads=threads)
    name, numbers = ident["device"], ""
    found = re.search(r" \(family (\d+), model (\d+)\)$", name)
    if found:
        name, numbers = name[: found.start()], f"-f{found[1]}m{found[2]}"
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return f"{slug[:32].rstrip('-')}{numbers}-{ident['threads']}t"


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


def calls_per_sample(
    fn: Callable[[], Any],
    *,
    warmup: int = 3,
    warmup_s: float = 0.03,
    min_sample_s: float = 2e-3,
    device: str | torch.device = "cpu",
) -> int:
    """Warm ``fn`` up (one first call for one-off costs, then at least ``warmup`` calls and
    ``warmup_s`` seconds: oneDNN creates its primitives, caches fill) and return how many calls
    make a sample last about ``min_sample_s`` (timer resolution, call noise)."""
    sync = _sync(device)
    with torch.inference_mode():
        fn()  # the first call pays one-off costs: keep it out of the estimate
        sync()
        calls, t0 = 0, time.perf_counter()
        while calls < max(warmup, 1) or time.perf_counter() - t0 < warmup_s:
            fn()
            sync()
            calls += 1
        per_call = (time.perf_counter() - t0) / calls
    return max(1, math.ceil(min_sample_s / max(per_call, 1e-9)))


def time_sample(
    fn: Callable[[], Any], number: int, *, device: str | torch.device = "cpu"
) -> float:
    """One sample: the time per call of ``number`` back-to-back calls of ``fn``."""
    sync = _sync(device)
    with torch.inference_mode():
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        sync()
        return (time.perf_counter() - t0) / number


def _sync(device: str | torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)


def time_callable(
    fn: Callable[[], Any],
    *,
    repeats: int = 15,
    warmup: int = 3,
    warmup_s: float = 0.03,
    min_sample_s: float = 2e-3,
    device: str | torch.device = "cpu",
) -> Timing:
    """Time ``fn()``: warm-up as :func:`calls_per_sample` does, then ``repeats`` samples of
    ``number`` calls each, where ``number`` makes a sample last about ``min_sample_s``."""
    if repeats < 1:
        raise ValueError(f"repeats={repeats!r} must be >= 1")
    number = calls_per_sample(
        fn, warmup=warmup, warmup_s=warmup_s, min_sample_s=min_sample_s, device=device
    )
    samples = [time_sample(fn, number, device=device) for _ in range(repeats)]
    return Timing(tuple(samples), number)


class NetworkTimer:
    """The deploy model of ``arch`` on a random input, timed operation by operation *in place*.

    :meth:`run` makes forward passes with a clock read after each operation
    (``DeployResNet.forward``'s ``tick``; for any other network, hooks on its traced unit
    modules, ``DeployNet.ticking``: functions between two modules are timed together);
    :meth:`run_total` times plain forward passes end to end. In place, each operation runs with
    the caches and allocator state a real forward pass leaves it, which timing one kernel alone
    in a loop does not reproduce.

    With ``context``, each operation's samples are keyed in its context (``OpKey.after``: the
    kernel family of the searchable convolution before it, ``ops.keys_in_context``), so that
    one operation timed after a direct layer and after a Winograd one keeps two sets of samples.

    ``stat``: the statistic the samples will be summarized by (a table row's ``stat``);
    :meth:`op_overhead` estimates the clock's cost in the same one, so that a network's rows,
    less that cost, add up to the same statistic of its plain passes.
    """

    def __init__(
        self,
        arch: Arch,
        *,
        batch: int = 1,
        device: str | torch.device = "cpu",
        context: bool = False,
        stat: str = "median",
    ) -> None:
        from ..models import build

        if stat not in STATS:
            raise ValueError(f"stat must be one of {', '.join(STATS)}, not {stat!r}")
        self.arch = arch
        self.stat = stat
        self.device = torch.device(device)
        self.x = torch.randn(batch, 3, arch.input_size, arch.input_size, device=self.device)
        quantized = any(c.bits is not None for _, c in arch) or arch.default.bits is not None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # substitutions are reported by the caller
            self.deployed = deploy.to_deploy(
                build(arch).eval().to(self.device), calibration=self.x if quantized else None
            )
        ops = network_ops(arch)
        keys = keys_in_context(ops, batch) if context else [op.key.with_batch(batch) for op in ops]
        self.keys = {op.name: key for op, key in zip(ops, keys, strict=True)}
        self.modules = [op.module for op in ops if op.module is not None]
        self._hook_cost: float | None = None
        self._excess: list[float] = []  # per module operation, one per paired pass

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

    def _run_raw(self, repeats: int = 1) -> dict[OpKey, list[float]]:
        """Per-operation samples of ``repeats`` passes as the clock read them (uncorrected)."""
        samples: dict[OpKey, list[float]] = {}
        clock = [0.0]
        tick = self._ticker(self.keys, samples, clock)
        with torch.inference_mode():
            if not isinstance(self.deployed, deploy.DeployNet):
                for _ in range(repeats):
                    clock[0] = time.perf_counter()
                    self.deployed(self.x, tick)
                return samples
            with self.deployed.ticking(self.modules, tick):  # any traced network
                for _ in range(repeats):
                    clock[0] = time.perf_counter()
                    self.deployed(self.x)
                    tick(OUTPUT_OP)
        return samples

    def _ticker(
        self, keys: dict[str, OpKey], samples: dict[OpKey, list[float]], clock: list[float]
    ) -> Callable[[str], None]:
        """The in-place clock: ``tick(name)`` adds the time since ``clock[0]`` to the samples of
        ``keys[name]`` and restarts the clock (names not in ``keys`` are passed over: no
        functions before that module, its time runs on). Every call is a cost the clock adds,
        so it is kept short; :meth:`hook_cost` measures this same closure."""
        now_s = time.perf_counter
        sync = self._sync if self.device.type == "cuda" else None

        def tick(name: str) -> None:
            key = keys.get(name)
            if key is None:
                return
            if sync is not None:
                sync()
            now = now_s()
            got = samples.get(key)
            if got is None:
                samples[key] = [now - clock[0]]
            else:
                got.append(now - clock[0])
            clock[0] = now

        return tick

    def run(self, repeats: int = 1) -> dict[OpKey, list[float]]:
        """Per-operation samples of ``repeats`` passes (layers sharing a key pool theirs), each
        module operation's sample less what the in-place clock adds to it
        (:meth:`op_overhead`, as estimated once these passes are done)."""
        return self.correct(self.run_raw(repeats))

    def run_raw(self, repeats: int = 1) -> dict[OpKey, list[float]]:
        """Per-operation samples of ``repeats`` passes as the clock read them, each pass
        followed by a plain one: the pair is one more sample of what the clock costs
        (:meth:`op_overhead`). :meth:`correct` takes that cost off, with the estimate of the
        moment: a caller that times a network in many calls corrects its samples once, at
        the end."""
        samples: dict[OpKey, list[float]] = {}
        for _ in range(repeats):
            one = self._run_raw(1)
            self._note_pair(one, self.run_total(1)[0])
            for key, got in one.items():
                samples.setdefault(key, []).extend(got)
        return samples

    def correct(self, samples: dict[OpKey, list[float]]) -> dict[OpKey, list[float]]:
        """``samples`` of :meth:`run_raw` with :meth:`op_overhead` taken off every module
        operation's (never below 0; the functions between modules are left as read)."""
        cost = self.op_overhead()
        return {
            key: list(got) if key.op == "functions" else [max(v - cost, 0.0) for v in got]
            for key, got in samples.items()
        }

    def _note_pair(self, raw: dict[OpKey, list[float]], plain: float) -> None:
        ops = sum(len(v) for k, v in raw.items() if k.op != "functions")
        if ops:
            self._excess.append((sum(sum(v) for v in raw.values()) - plain) / ops)

    def op_overhead(self, pairs: int = 9) -> float:
        """Seconds the in-place clock adds to one module operation of *this* network.

        Measured on the network itself: a pass timed operation by operation and a plain pass, back
        to back; the operations' sum exceeds the plain pass by what the ticks (the wrapped
        forwards, clock reads, bookkeeping, and the caches they disturb) cost, spread over the
        module operations of a pass. The median over every pair so far (``pairs`` of them taken on
        first use; :meth:`run_raw` adds one per pass it times; their mean where the samples are
        summarized by their mean, which makes the rows of the network's own passes add up to its
        plain passes' mean), at least the cost of the ticks alone (:meth:`hook_cost`). A probe
        module's tick cost alone (~6 us with forward hooks) left the operation-by-operation sums of
        small networks 5-13 % above their plain passes (the more so the cheaper their operations:
        direct convolutions at batch 1), so a table over-priced direct layers against Winograd
        ones. One estimate taken on first use and kept was not enough either: on the VGG at batch 1
        (Zen 5), the excess of one network moved from 301 to 176 us between its first pairs and
        later ones, and across networks it ranged 117-343 us (all-direct to all-F6), so the uniform
        F4 and F6 references were predicted 11-31 % above their plain passes.
        """
        floor = self.hook_cost()
        self.run_raw(max(pairs - len(self._excess), 0))  # the pairs still missing
        if not self._excess:  # a network without module operations
            return floor
        center = statistics.mean if self.stat == "mean" else statistics.median
        return max(center(self._excess), floor)

    def hook_cost(self, calls: int = 400, repeats: int = 5) -> float:
        """Seconds the in-place clock adds to one module call (its wrapped forward and ticks,
        measured on an identity module with and without them; the median of ``repeats``).
        Cached."""
        if self._hook_cost is not None:
            return self._hook_cost
        probe = deploy.DeployNet(
            torch.nn.Sequential(torch.nn.Identity()), kernels={}, substituted=[]
        )
        x = self.x
        found: dict[OpKey, list[float]] = {}
        tick = self._ticker({"0": OpKey("free", 1, 1, 1, 1, detail="probe")}, found, [0.0])

        def loop() -> float:
            t0 = time.perf_counter()
            for _ in range(calls):
                probe(x)
            return (time.perf_counter() - t0) / calls

        diffs = []
        with torch.inference_mode():
            for _ in range(repeats):
                plain = loop()
                with probe.ticking(["0"], tick):
                    hooked = loop()
                found.clear()
                diffs.append(hooked - plain)
        self._hook_cost = max(statistics.median(diffs), 0.0)
        return self._hook_cost

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
    context: bool = False,
    stat: str = "median",
) -> dict[OpKey, list[float]]:
    """Per-operation samples of ``repeats`` forward passes of ``arch``'s deploy model, timed in
    place (see :class:`NetworkTimer`, also for ``context`` and ``stat``), after ``warmup_s``
    seconds of warm-up."""
    timer = NetworkTimer(arch, batch=batch, device=device, context=context, stat=stat)
    timer.warmup(warmup_s)
    return timer.run(repeats)
