#!/usr/bin/env python
"""Does a freshly measured latency table rank networks, and layers' options, as this machine does?

For each bit-width of ``--bits`` (``fp32``, ``8`` for the int8 kernels, or both: ``--bits fp32
8`` or ``--bits both``), on the network of ``--space`` (default ``spaces/resnet18_cifar10.yaml``:
the paper's ResNet-18-like network, width 0.5, 32x32; any space's model works: torchvision,
timm, a user factory; ``--width``, the paper's network only, and ``--input-size`` override the
space's). Every searchable layer may be direct (``normal``) or static/flex Winograd F2/F4/F6
(every tile on every layer: a layer smaller than its tile computes one partial tile).

1. **Networks that span the latency range.** The 7 uniform references (all-direct; static and
   flex x F2/F4/F6) plus ``--archs`` random mixes picked by *stratified sampling*: draw
   ``--candidates`` random mixes (each with its own probability of a direct layer) plus the two
   extremes (every layer at its predicted fastest, and slowest, option), keep the distinct ones
   that are not a reference, predict each with a *pilot table* (each table network warmed up
   0.05 s, then ``--pilot`` passes timed op by op in place; in ``--sequential`` mode the full
   table, built first) as its fixed parts plus each layer's row, cut the predicted range
   [fastest, slowest] into ``--archs`` equal-width bins and pick one candidate per bin
   (seeded; the first bin takes the fastest candidate and the last the slowest; an empty bin
   takes the unpicked candidate nearest its centre). The pilot table only chooses networks:
   every prediction reported comes from the full table of step 2.
2. **Timing.** The table: every operation timed in place in ``measure``'s networks (the 4
   uniform deploy networks, direct and static F2/F4/F6, and each tile's 2 networks alternating it
   with direct), each key's row pooling every network's samples, and a row per context (the kind of
   the searchable layer before the operation), as ``search.py measure`` does, each op-by-op pass
   followed by a plain pass of the same network and the clock's cost per module operation
   (``NetworkTimer.op_overhead``: the mean excess over all of that network's pairs with ``--stat
   mean``, else the median) taken off once every round is done; the end-to-end times: each chosen
   network's deploy model, plain forward passes. Interleaved (default): ``--repeats`` rounds, each
   running every op-by-op job and every end-to-end job once in a shuffled order, each timed pass
   right after 2 untimed passes of the same network (so neither a table row nor an end-to-end time
   is charged the cold start of switching networks: caches, oneDNN primitives, allocator).
   ``--sequential``: the table first (``measure_plan``: warm-up, then ``--repeats`` passes per
   network), then each network (warm-up, then ``--repeats`` passes).
3. **End to end.** For each network, the table's prediction (``TableModel.price(arch).total``,
   each operation priced in its context) against its measured time: mean absolute percentage
   error (MAPE), worst error, Spearman's rank correlation (average ranks for ties: static and
   flex share a kernel, so their uniform references tie in the prediction). The same figures
   for the table's pooled rows alone (``TableModel(context=False)``) are printed beside them
   (``pooled`` in the JSON): the two readings of one measurement, paired.
4. **Per layer.** For each searchable layer, its distinct kernels (direct, and Winograd F2/F4/F6;
   flex runs the static kernel, so it is not a distinct option) ordered by the table (swap: the
   swapped network priced end to end, less the all-direct one, so that the rows in context of the
   layer and of the operations after it count; isolated: the layer's pooled rows) against an
   *independent* measurement, paired by round: ``--layer-reference swap`` (default): the layer set
   to each option in turn in a *context* network whose searchable layers are all direct, each such
   network timed end to end (a separate harness and separate minutes from the table's),
   ``--layer-repeats`` interleaved rounds per layer, each network built ``--layer-instances`` times
   (3) and a round's time of an option the mean of its builds' (two builds of one network differ by
   more than a layer's options do: :func:`swapped_layer_rounds`); what the search's choice for that
   layer does to a network, neighbours' caches included. ``isolated``: each kernel timed alone
   (``kernel_for``), all kernels sampled once per round in a shuffled order; a kernel alone keeps
   its weights in cache from call to call, which a network's pass does not (at batch 1 a Winograd
   layer's transformed weights are 1.8-7x a direct layer's: alone, F4 and F6 look up to twice as
   fast as in a network). A pair of options is *resolved* when the median of its per-round
   differences (swap: of the two networks' times; isolated: the log of the kernels' ratio) is at
   least ``--layer-tie`` away from 0 (swap: 0.5 % of the context network's time; isolated: 2 % of
   the kernel's) and its 95 % bootstrap interval over rounds excludes 0; a closer pair is a tie,
   which either order gets right (a search loses nothing by picking either). Reported: Kendall's
   tau over the resolved pairs of all layers pooled, (concordant - discordant) / resolved (a layer
   with one resolved pair weighs one pair; layers of one geometry share their rows, but the search
   prices layers, so each counts), per layer the same over its own pairs (the worst layer is
   named), and how many pairs were resolved. Beside it: Spearman over all four options (ties by
   noise included: one swapped pair moves it by 0.4), and the *pick regret*: what the option the
   table prices fastest costs over the fastest measured, from the paired rounds (of the network's
   time for swap, of the kernel's for isolated).
5. **Confidence.** Each figure carries a 95 % percentile-bootstrap interval (``--bootstrap``
   resamples, seeded): MAPE and Spearman resample the networks, the per-layer figure resamples
   the layers. It is the uncertainty of the figure over *which* networks (layers) were drawn,
   given their measured times, not of the timing noise of one network.

Targets, each printed beside its figure as met / not met: MAPE <= 5 %, Spearman >= 0.95 end to
end, per-layer rank agreement (tau over the resolved pairs) >= 0.9 (the point estimates; the
intervals say how firm).

``--stat`` picks what both the table rows and the end-to-end times keep of their samples. The
default is ``mean``: means add up (a network's mean time is the sum of its operations' means),
medians do not when other processes interrupt the run. ``median`` and ``min`` are there to show
it.

Every run prints the machine first (``timing.machine_line``: CPU model, ISA, cores, threads,
torch, load average), then per bit-width a table of networks and the figures, and last one JSON
line of figures (machine included). Bad input: one ``error: ...`` line naming the flag, exit 2.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from wasearch import Arch, LayerChoice
from wasearch.cli import UserError
from wasearch.deploy import has_int_kernel
from wasearch.latency import LatencyTable, MeasurePlan, TableModel
from wasearch.latency.kernels import kernel_for
from wasearch.latency.measure import (
    NetworkTimer,
    Timing,
    device_identity,
    measure_plan,
    plan_networks,
    rows_from_samples,
)
from wasearch.latency.ops import conv_key
from wasearch.latency.timing import calls_per_sample, machine_line, time_sample

ROOT = Path(__file__).resolve().parents[1]
TILES = (2, 4, 6)
#: The targets (issue 14): MAPE at most, Spearman end to end at least, per-layer mean at least.
TARGETS = {"mape": 0.05, "spearman": 0.95, "layer_rank": 0.9}
#: Default --layer-tie per --layer-reference: of the network's time (swap), of the kernel's.
LAYER_TIE = {"swap": 0.005, "isolated": 0.02}
WARM_PASSES = 2  # untimed passes of a network right before each of its timed passes


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is a ``UserError`` (one line, exit 2 from ``main``)."""

    def error(self, message: str):  # type: ignore[override]
        raise UserError(message)


def _positive(kind: type, minimum: float = 1, below: float | None = None):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{text} is below {minimum}")
        if below is not None and value >= below:
            raise argparse.ArgumentTypeError(f"{text} is not below {below}")
        return value

    parse.__name__ = kind.__name__
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--space",
        default=str(ROOT / "spaces" / "resnet18_cifar10.yaml"),
        help="the space whose network is measured (default: the paper's)",
    )
    p.add_argument(
        "--archs",
        type=_positive(int, 3),
        default=24,
        help="random mixes picked stratified over the predicted range (>= 3; default 24), "
        "measured beside the 7 uniform references",
    )
    p.add_argument(
        "--candidates",
        type=_positive(int, 3),
        default=2000,
        help="random mixes drawn and predicted to pick --archs from (default 2000)",
    )
    p.add_argument(
        "--bits",
        nargs="+",
        choices=("fp32", "8", "both"),
        default=["fp32"],
        help="bit-width(s) of every searchable conv: fp32 (default), 8 (int8 kernels), "
        "several (--bits fp32 8) or both",
    )
    p.add_argument("--batch", type=_positive(int), default=1)
    p.add_argument(
        "--width", type=_positive(float, 1e-9), default=None, help="the paper's network: its width"
    )
    p.add_argument(
        "--input-size", type=_positive(int, 4), default=None, help="default: the space's"
    )
    p.add_argument(
        "--threads",
        type=_positive(int),
        default=1,
        help="torch threads (default 1: the 2 cores here are shared)",
    )
    p.add_argument(
        "--device", default="cpu", help="torch device to time on (default cpu; cuda: fp32 only)"
    )
    p.add_argument(
        "--repeats",
        type=_positive(int),
        default=25,
        help="timed passes per table network and per network (end to end)",
    )
    p.add_argument(
        "--pilot",
        type=_positive(int),
        default=3,
        help="timed passes per table network for the pilot table that picks the mixes",
    )
    p.add_argument(
        "--layer-repeats",
        type=_positive(int, 2),
        default=30,
        help="interleaved rounds of the per-layer measurement, swaps or kernels alone (>= 2; "
        "default 30)",
    )
    p.add_argument(
        "--layer-instances",
        type=_positive(int),
        default=3,
        help="swap: networks built per option of a layer (and of the all-direct context), "
        "each round's time of an option the mean of its instances' (default 3; 1: one each)",
    )
    p.add_argument(
        "--layer-reference",
        choices=("swap", "isolated"),
        default="swap",
        help="what the per-layer order is measured on: swap (default): the layer's option "
        "swapped into an all-direct network, timed end to end; isolated: each kernel alone",
    )
    p.add_argument(
        "--layer-tie",
        type=_positive(float, 0, below=1),
        default=None,
        help="two options of a layer closer than this are a tie, either order right: a "
        "fraction of the network's time (swap; default 0.005) or of the kernel's (isolated; "
        "default 0.02)",
    )
    p.add_argument(
        "--bootstrap",
        type=_positive(int, 10),
        default=2000,
        help="bootstrap resamples of the 95 %% intervals (default 2000)",
    )
    p.add_argument(
        "--stat",
        choices=("median", "mean", "min"),
        default="mean",
        help="statistic of the samples, the same for table rows and end-to-end times "
        "(default: mean, the additive one; see the module doc)",
    )
    p.add_argument(
        "--sequential",
        action="store_true",
        help="build the whole table first, then time the networks (default: interleaved rounds)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--table",
        default=None,
        help="write the measured table here (several --bits: BITS is inserted before the "
        "suffix; default: a temporary file)",
    )
    return p


# -- statistics ----------------------------------------------------------------------------------
def _average_ranks(values: Sequence[float]) -> np.ndarray:
    """Ranks 1..n, tied values sharing the mean of their ranks."""
    x = np.asarray(values, dtype=float)
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and x[order[j + 1]] == x[order[i]]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rho with average ranks for ties; nan when either side is constant."""
    ra, rb = _average_ranks(a), _average_ranks(b)
    if len(ra) < 2 or np.ptp(ra) == 0 or np.ptp(rb) == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def bootstrap_ci(
    stat: Callable[[np.ndarray], float],
    n: int,
    *,
    resamples: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float, float]:
    """``(point, low, high)``: ``stat`` of the indices ``0..n-1`` and the percentile bootstrap
    interval of ``stat`` over ``resamples`` draws of ``n`` indices with replacement (seeded).
    Resamples where ``stat`` is nan (e.g. a constant side of a correlation) are dropped."""
    if n < 1:
        raise ValueError("bootstrap_ci needs at least one item")
    point = float(stat(np.arange(n)))
    rng = np.random.default_rng(seed)
    got = np.array([stat(rng.integers(0, n, n)) for _ in range(resamples)], dtype=float)
    got = got[~np.isnan(got)]
    if not len(got):
        return point, float("nan"), float("nan")
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(got, [tail, 100 - tail])
    return point, float(low), float(high)


def stratified_pick(predicted: Sequence[float], k: int, *, seed: int = 0) -> tuple[list[int], int]:
    """Indices of ``k`` distinct candidates spread over ``[min, max]`` of ``predicted``.

    The range is cut into ``k`` equal-width bins; the first bin takes the fastest candidate, the
    last the slowest, every other bin a random one of its own (seeded). A bin with no candidate
    left takes the unpicked candidate nearest its centre. Returns the indices (in bin order) and
    the number of bins that were empty. Raises ``ValueError`` if there are fewer than ``k``
    candidates."""
    pred = np.asarray(predicted, dtype=float)
    if k < 1 or len(pred) < k:
        raise ValueError(f"cannot pick {k} of {len(pred)} candidates")
    rng = np.random.default_rng(seed)
    lo, hi = float(pred.min()), float(pred.max())
    width = (hi - lo) / k
    if width > 0:
        bins = np.minimum(((pred - lo) / width).astype(int), k - 1)
    else:
        bins = np.zeros(len(pred), dtype=int)
    picked: list[int | None] = [None] * k
    taken: set[int] = set()
    picked[0] = int(np.argmin(pred))
    taken.add(picked[0])
    if k > 1:
        last = int(np.argmax(pred))
        if last in taken:  # every candidate predicted the same: any other one
            last = next(i for i in range(len(pred)) if i not in taken)
        picked[k - 1] = last
        taken.add(last)
    for b in range(1, k - 1):
        members = [i for i in np.flatnonzero(bins == b) if i not in taken]
        if members:
            picked[b] = int(rng.choice(members))
            taken.add(picked[b])
    empty = 0
    for b in range(k):
        if picked[b] is None:
            empty += 1
            centre = lo + (b + 0.5) * width
            rest = [i for i in range(len(pred)) if i not in taken]
            picked[b] = min(rest, key=lambda i: (abs(pred[i] - centre), i))
            taken.add(picked[b])
    return [int(i) for i in picked], empty


# -- networks ------------------------------------------------------------------------------------
def random_arch(rng: random.Random, base: Arch, bits: int | None) -> Arch:
    """``base``'s network, each searchable layer direct with a drawn probability, else
    static or flex with any tile (a layer smaller than its tile: one partial tile)."""
    p_direct = rng.random()
    layers = {}
    for spec in base.specs():
        if rng.random() < p_direct:
            layers[spec.name] = LayerChoice("normal", None, bits)
            continue
        layers[spec.name] = LayerChoice(rng.choice(("static", "flex")), rng.choice(TILES), bits)
    return base.with_layers(layers)


def layer_options(bits: int | None) -> list[LayerChoice]:
    """The distinct kernels of a layer: direct and static F2/F4/F6 (flex runs static's)."""
    return [LayerChoice("normal", None, bits)] + [LayerChoice("static", t, bits) for t in TILES]


@functools.lru_cache(maxsize=4)
def _load_space(path: str):
    """The parsed space (cached: a traced network's discovery costs seconds)."""
    from wasearch.search.space import load_space

    return load_space(path, require_latency_table=False)


def base_arch(args: argparse.Namespace, bits: int | None) -> Arch:
    """The all-direct network of ``--space`` (``--width``, ``--input-size`` applied)."""
    space = _load_space(args.space)
    if args.width is not None and not space.model_ref.is_paper:
        raise UserError(f"--width applies to the paper's network only, not {space.model_ref.text}")
    return Arch.uniform(
        "normal",
        None,
        bits,
        backbone=space.model["backbone"],
        width=args.width if args.width is not None else space.model["width"],
        num_classes=space.num_classes,
        input_size=args.input_size or space.input_size,
        model=space.model_ref,
    )


def references(base: Arch, bits: int | None) -> list[Arch]:
    """The uniform references: all-direct, static and flex x F2/F4/F6 (tiles kept everywhere)."""
    common = {
        "backbone": base.backbone,
        "width": base.width,
        "num_classes": base.num_classes,
        "input_size": base.input_size,
        "model": base.model,
        "fallback": False,
    }
    out = [Arch.uniform("normal", None, bits, **common)]
    for conv in ("static", "flex"):
        out.extend(Arch.uniform(conv, t, bits, **common) for t in TILES)
    return out


class FastPredictor:
    """A table's end-to-end prediction of ``base``'s mixes as the fixed parts plus each layer's
    pooled row (what the table's pooled reading, ``TableModel(context=False).price``, sums,
    without pricing every operation again): it only picks the mixes to measure."""

    def __init__(self, model: TableModel, base: Arch) -> None:
        model = TableModel(model.table, batch=model.batch, context=False)
        report = model.price(base)
        self.model = model
        self.fixed = report.total - report.searchable_total
        self.specs = {s.name: s for s in base.specs()}

    def __call__(self, arch: Arch) -> float:
        return self.fixed + sum(self.model.layer_cost(self.specs[n], c) for n, c in arch)

    def extreme(self, base: Arch, bits: int | None, *, fastest: bool) -> Arch:
        pick = min if fastest else max
        layers = {}
        for name, spec in self.specs.items():
            layers[name] = pick(layer_options(bits), key=lambda c: self.model.layer_cost(spec, c))
        return base.with_layers(layers)


# -- timing --------------------------------------------------------------------------------------
def timed_pass(timer: NetworkTimer, *, ops: bool) -> dict | list[float]:
    """One timed pass right after ``WARM_PASSES`` untimed ones of the same network; with
    ``ops``, timed operation by operation as the clock reads it (``NetworkTimer.run_raw``: a
    plain pass follows it, for the clock's cost, which ``NetworkTimer.correct`` takes off once
    every round is done)."""
    timer.warmup(0.0)  # exactly WARM_PASSES (2) untimed passes, then the timed one
    return timer.run_raw(1) if ops else timer.run_total(1)


def pilot_table(
    table_nets: Sequence[NetworkTimer], keys, passes: int, stat: str, ident: dict
) -> LatencyTable:
    samples: dict = {}
    for timer in table_nets:
        timer.warmup()
        for key, got in timer.run(passes).items():
            samples.setdefault(key, []).extend(got)
    return LatencyTable(rows_from_samples(samples, keys, stat=stat, identity=ident))


def isolated_layer_rounds(
    base: Arch, bits: int | None, args: argparse.Namespace, device: torch.device
) -> dict:
    """Each distinct searchable kernel of ``base`` timed alone, in ``--layer-repeats`` rounds:
    each kernel warmed up once (``calls_per_sample``), then every round samples every kernel
    once, in a shuffled order (seeded), each sample right after ``WARM_PASSES`` untimed calls of
    the same kernel. A layer's options thus see the same minutes of the machine: their samples
    are paired by round. Returns ``{key: [one sample per round]}``."""
    keys = list(
        dict.fromkeys(
            conv_key(spec, c, args.batch) for spec in base.specs() for c in layer_options(bits)
        )
    )
    fns, number = {}, {}
    for key in tqdm(keys, desc="layer warm-up", leave=False):
        fns[key] = kernel_for(key, device=device)
        number[key] = calls_per_sample(fns[key], device=device)
    out: dict = {key: [] for key in keys}
    rng = random.Random(args.seed + 2)
    for _ in tqdm(range(args.layer_repeats), desc="layer rounds", leave=False):
        rng.shuffle(keys)
        for key in keys:
            time_sample(fns[key], WARM_PASSES, device=device)  # untimed
            out[key].append(time_sample(fns[key], number[key], device=device))
    return out


def swapped_layer_rounds(
    base: Arch, bits: int | None, args: argparse.Namespace, device: torch.device
) -> dict[str, list[list[float]]]:
    """For each searchable layer of ``base``: the *context* network (every searchable layer
    direct) with that layer set to each of its options in turn, each built
    ``--layer-instances`` times, timed end to end in ``--layer-repeats`` rounds, each round
    timing every instance once in a shuffled order (seeded), each pass right after
    ``WARM_PASSES`` untimed ones. Returns ``{layer: [per-round seconds of each option's
    network, the mean of its instances']}``, options as :func:`layer_options`; the first
    (direct) is the context itself.

    Instances, because two builds of one network differ by more than the rounds show: on the
    Zen 5 machine of the tenth session, six builds of the paper's width-0.25 network in 8-bit,
    interleaved over 150 rounds, had medians 4-12 % apart (float32: 2.6 %), where a layer's
    options differ by 1-3 % of the network; each build's offset (where its tensors lie, its
    random weights) is the same in every round, so the rounds' interval cannot see it, and
    one build per option resolved pairs in the order of its builds' offsets."""
    opts = layer_options(bits)
    context = base.with_layers({spec.name: opts[0] for spec in base.specs()})
    copies = args.layer_instances

    def builds(arch: Arch) -> list[NetworkTimer]:
        return [
            NetworkTimer(arch, batch=args.batch, device=device, stat=args.stat).warmup()
            for _ in range(copies)
        ]

    ctx = builds(context)
    rng = random.Random(args.seed + 2)
    out = {}
    for spec in tqdm(base.specs(), desc="layer swaps", leave=False):
        nets = [ctx] + [builds(context.with_layers({spec.name: o})) for o in opts[1:]]
        got: list[list[float]] = [[] for _ in nets]
        slots = [(i, j) for i in range(len(nets)) for j in range(copies)]
        for _ in range(args.layer_repeats):
            rng.shuffle(slots)
            times: list[list[float]] = [[] for _ in nets]
            for i, j in slots:
                times[i].extend(timed_pass(nets[i][j], ops=False))
            for i, t in enumerate(times):
                got[i].append(float(np.mean(t)))
        out[spec.name] = got
        del nets
    return out


def pair_order(d: Sequence[float], *, tie: float, resamples: int, seed: int) -> int:
    """The measured order of two options from their paired per-round differences ``d`` (``a``
    less ``b``, or the log of their ratio): +1 when ``a`` is slower, -1 when faster, 0 when
    the rounds do not resolve it: the median difference is within ``tie`` of 0 (``d``'s
    units), or its 95 % percentile-bootstrap interval over rounds (``resamples`` draws, seeded)
    holds 0."""
    d = np.asarray(d, dtype=float)
    med = float(np.median(d))
    if abs(med) < tie:
        return 0
    rng = np.random.default_rng(seed)
    meds = np.median(d[rng.integers(0, len(d), (resamples, len(d)))], axis=1)
    lo, hi = np.percentile(meds, [2.5, 97.5])
    if lo > 0:
        return 1
    if hi < 0:
        return -1
    return 0


def layer_agreement(
    table: Sequence[float],
    rounds: Sequence[Sequence[float]],
    *,
    tie: float,
    resamples: int,
    seed: int = 0,
    scale: float | None = None,
) -> dict:
    """How the table orders one layer's options (``table``: its rows, seconds) against a
    measurement of them paired by round (``rounds``: each option's per-round samples).

    Pairs are compared by their per-round log ratio with a tie of ``log(1 + tie)`` (kernels
    timed alone: ``tie`` is a fraction of the kernel's time), or, given ``scale``, by their
    per-round difference with a tie of ``tie * scale`` (the layer swapped in a network:
    ``scale`` is the network's time). ``tau``: over the pairs the rounds resolve
    (:func:`pair_order`), (concordant - discordant) / resolved, a pair the table ties counting
    as neither (Kendall's tau on the pairs a measurement can order; nan when it orders none).
    ``regret``: what picking the option the table prices fastest costs against the fastest
    measured (the option whose median per-round difference to the first is lowest): the
    median per-round difference of the two, as a fraction of the fastest kernel's time
    (isolated) or of ``scale`` (swapped), 0 when they are the same option."""
    n = len(table)
    r = np.asarray(rounds, dtype=float)
    concordant = discordant = resolved = 0
    for i in range(n):
        for j in range(i + 1, n):
            if scale is None:
                d, margin = np.log(r[i]) - np.log(r[j]), float(np.log1p(tie))
            else:
                d, margin = r[i] - r[j], tie * scale
            order = pair_order(d, tie=margin, resamples=resamples, seed=seed + i * n + j)
            if order == 0:
                continue
            resolved += 1
            said = np.sign(table[i] - table[j])
            concordant += int(said == order)
            discordant += int(said == -order)
    # the regret from paired rounds too: medians of unpaired samples of a drifting machine
    # can rank options the other way round from every round's comparison
    rel = np.log(r) if scale is None else r
    best = int(np.argmin(np.median(rel - rel[0], axis=1)))
    pick = int(np.argmin(table))
    gap = max(float(np.median(rel[pick] - rel[best])), 0.0)
    return {
        "tau": (concordant - discordant) / resolved if resolved else float("nan"),
        "concordant": concordant,
        "discordant": discordant,
        "resolved": resolved,
        "pairs": n * (n - 1) // 2,
        "regret": float(np.expm1(gap)) if scale is None else gap / scale,
    }


# -- scoring a table -----------------------------------------------------------------------------
def readings(model: TableModel, pooled: TableModel) -> list[tuple[str, TableModel]]:
    """The two readings of one table the benchmark scores: in context (the default) and
    pooled (its rows over every context only)."""
    return [("context", model), ("pooled", pooled)]


def end_to_end(
    model: TableModel, archs: Sequence[Arch], measured: Sequence[float], args: argparse.Namespace
) -> dict:
    """``model``'s end-to-end predictions of ``archs`` against their measured seconds: the
    predictions, signed errors, and MAPE and Spearman with their bootstrap intervals."""
    pred = np.array([model.price(a).total for a in archs])
    meas = np.asarray(measured, dtype=float)
    errors = (pred - meas) / meas
    errs = np.abs(errors)
    mape = bootstrap_ci(
        lambda ix: float(np.mean(errs[ix])), len(archs), resamples=args.bootstrap, seed=args.seed
    )
    rho = bootstrap_ci(
        lambda ix: spearman(pred[ix], meas[ix]),
        len(archs),
        resamples=args.bootstrap,
        seed=args.seed,
    )
    return {"pred": pred, "errors": errors, "mape": mape, "spearman": rho}


def per_layer(
    model: TableModel,
    base: Arch,
    bits: int | None,
    rounds: dict,
    tie: float,
    args: argparse.Namespace,
) -> dict:
    """``model``'s order of each layer's options against ``rounds`` (the swaps or the kernels
    alone). Swap: an option's prediction is the all-direct network with the layer set to it,
    priced end to end, less the all-direct network (so the neighbours' rows in context count,
    as in the measurement); isolated: the option's pooled row. Returns the layers' entries and
    the pooled tau with its interval."""
    swap = args.layer_reference == "swap"
    opts = layer_options(bits)
    context = base.with_layers({spec.name: opts[0] for spec in base.specs()})
    ctx_total = model.price(context).total if swap else 0.0
    layers = []
    for li, spec in enumerate(base.specs()):
        if swap:  # the first option (direct) is the context itself: 0
            p = [0.0] + [
                model.price(context.with_layers({spec.name: o})).total - ctx_total
                for o in opts[1:]
            ]
        else:
            p = [model.op_cost(conv_key(spec, c, args.batch))[0] for c in opts]
        got = rounds[spec.name] if swap else [rounds[conv_key(spec, c, args.batch)] for c in opts]
        # swap: each option's network less the context's, per round (the layer's marginal cost)
        med = np.median(np.asarray(got) - (np.asarray(got[0]) if swap else 0), axis=1)
        agree = layer_agreement(
            p,
            got,
            tie=tie,
            resamples=args.bootstrap,
            seed=args.seed + 1000 * li,
            scale=float(np.median(got[0])) if swap else None,
        )
        layers.append(
            {
                "layer": spec.name,
                "geometry": f"{spec.in_channels}->{spec.out_channels} @{spec.height}x{spec.width}",
                "table_ms": [round(v * 1e3, 4) for v in p],
                "measured_ms": [round(float(v) * 1e3, 4) for v in med],
                "rho": spearman(p, med),
                **agree,
            }
        )
    # pooled over layers: (concordant - discordant) / resolved pairs, so that a layer whose
    # rounds resolve one pair weighs one pair, not as much as a layer with six
    c = np.array([e["concordant"] for e in layers], dtype=float)
    d = np.array([e["discordant"] for e in layers], dtype=float)
    r = np.array([e["resolved"] for e in layers], dtype=float)
    rank = bootstrap_ci(
        lambda ix: float((c[ix].sum() - d[ix].sum()) / r[ix].sum()) if r[ix].sum() else np.nan,
        len(layers),
        resamples=args.bootstrap,
        seed=args.seed,
    )
    return {
        "layers": layers,
        "rank": rank,
        "resolved": int(r.sum()),
        "ranked": int(np.count_nonzero(r)),
    }


# -- the benchmark -------------------------------------------------------------------------------
def parse_bits(values: Sequence[str]) -> list[str]:
    out: list[str] = []
    for v in values:
        out.extend(("fp32", "8") if v == "both" else (v,))
    return list(dict.fromkeys(out))


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        figures = fidelity(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(strip_rows(figures)))
    return 0


def strip_rows(figures: dict) -> dict:
    out = dict(figures)
    out["results"] = {
        b: {k: v for k, v in r.items() if k not in ("rows", "layers")}
        for b, r in figures["results"].items()
    }
    return out


def fidelity(args: argparse.Namespace) -> dict:
    """Run the benchmark for every ``--bits``; print its tables and return the figures (the
    JSON line, plus each bit-width's ``rows`` and ``layers``)."""
    try:
        device = torch.device(args.device)
    except RuntimeError as err:
        raise UserError(f"--device {args.device!r}: {err}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {args.device}: no CUDA device is available here")
    bits_list = parse_bits(args.bits)
    for b in bits_list:
        if not has_int_kernel(None if b == "fp32" else int(b), device):
            raise UserError(f"--bits {b}: no {b}-bit kernel on {device.type}; use --bits fp32")
    if args.candidates < args.archs:
        raise UserError(f"--candidates {args.candidates} is below --archs {args.archs}")
    base = base_arch(args, None)  # checks --space and --width before any timing
    torch.set_num_threads(args.threads)
    load0 = os.getloadavg()[0]
    machine = machine_line(device, threads=args.threads)
    print(f"machine: {machine}" + ("  (> 1.5 at start: shared cores)" if load0 > 1.5 else ""))
    print(f"network: {base.network} at {base.input_size}x{base.input_size} ({args.space})")
    t_start = time.perf_counter()
    ident = device_identity(device, threads=args.threads)
    results = {}
    for b in bits_list:
        torch.manual_seed(args.seed)
        results[b] = run_bits(args, b, device, multi=len(bits_list) > 1)
    load1 = os.getloadavg()[0]
    return {
        "benchmark": "latency_fidelity",
        "machine": machine,
        "network": base.network,
        "input_size": base.input_size,
        "device": ident["device"],
        "threads": args.threads,
        "torch": ident["torch"],
        "stat": args.stat,
        "timing": "sequential" if args.sequential else "interleaved",
        "batch": args.batch,
        "width": base.width if base.is_paper else None,
        "archs": args.archs,
        "candidates": args.candidates,
        "repeats": args.repeats,
        "seed": args.seed,
        "ci": f"95% percentile bootstrap, {args.bootstrap} resamples: networks (MAPE, "
        "Spearman), layers (per-layer rank)",
        "targets": {
            "mape_max": TARGETS["mape"],
            "spearman_min": TARGETS["spearman"],
            "layer_rank_min": TARGETS["layer_rank"],
        },
        "all_targets_met": all(r["targets_met"] for r in results.values()),
        "results": results,
        "load_average_start": round(load0, 2),
        "load_average_end": round(load1, 2),
        "shared_cores": load0 > 1.5,
        "seconds": round(time.perf_counter() - t_start, 1),
    }


def _ci(point_lo_hi: tuple[float, float, float], digits: int = 4) -> list[float]:
    return [round(v, digits) for v in point_lo_hi[1:]]


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def run_bits(args: argparse.Namespace, bits_name: str, device: torch.device, multi: bool) -> dict:
    bits = None if bits_name == "fp32" else int(bits_name)
    base = base_arch(args, bits)
    print(f"\n== bits {bits_name} ==")
    plan = MeasurePlan(
        backbone=base.backbone,
        width=base.width,
        input_size=base.input_size,
        num_classes=base.num_classes,
        bits=(bits,),
        batch=args.batch,
        model=base.model,
    )
    ident = device_identity(device, threads=args.threads)
    keys = plan.keys()
    table_nets = [  # samples keyed in context: rows per neighbour kind, and pooled
        NetworkTimer(a, batch=args.batch, device=device, context=True, stat=args.stat)
        for a in plan_networks(plan)
    ]

    # 1. the networks: uniform references + stratified mixes (picked with a pilot table)
    if args.sequential:
        table, _ = measure_plan(
            plan,
            device=device,
            threads=args.threads,
            repeats=args.repeats,
            stat=args.stat,
            progress=True,
        )
        chooser = TableModel(table, batch=args.batch)
    else:
        chooser = TableModel(
            pilot_table(table_nets, keys, args.pilot, args.stat, ident), batch=args.batch
        )
    fast = FastPredictor(chooser, base)
    rng = random.Random(args.seed)
    candidates = [random_arch(rng, base, bits) for _ in range(args.candidates)]
    candidates += [fast.extreme(base, bits, fastest=True), fast.extreme(base, bits, fastest=False)]
    refs = references(base, bits)
    # distinct mixes only, none a reference (the extremes can be: all-direct on a small net)
    candidates = [a for a in dict.fromkeys(candidates) if a not in set(refs)]
    if len(candidates) < args.archs:
        raise UserError(
            f"--archs {args.archs}: only {len(candidates)} distinct mixes among the "
            f"--candidates {args.candidates} drawn; draw more or pick fewer"
        )
    cand_pred = [fast(a) for a in candidates]
    picked, empty = stratified_pick(cand_pred, args.archs, seed=args.seed)
    archs = refs + [candidates[i] for i in picked]
    kinds = ["ref"] * len(refs) + ["mix"] * len(picked)
    by_summary = {t.arch: t for t in table_nets}
    nets = [
        by_summary.get(a) or NetworkTimer(a, batch=args.batch, device=device, stat=args.stat)
        for a in archs
    ]
    print(
        f"picked {len(picked)} of {len(candidates)} candidate mixes over the predicted range "
        f"{min(cand_pred) * 1e3:.3f}..{max(cand_pred) * 1e3:.3f} ms "
        f"({'table' if args.sequential else f'pilot table, {args.pilot} passes'}; "
        f"{empty} of {args.archs} equal-width bins empty, filled from the nearest)"
    )

    # 2. timing
    if args.sequential:
        e2e = [n.warmup().run_total(args.repeats) for n in nets]
    else:
        raw: list[dict] = [{} for _ in table_nets]
        e2e = [[] for _ in nets]
        jobs = [(t, None, j) for j, t in enumerate(table_nets)]
        jobs += [(n, i, None) for i, n in enumerate(nets)]
        order = random.Random(args.seed + 1)
        for _ in tqdm(range(args.repeats), desc="rounds", leave=False):
            order.shuffle(jobs)
            for timer, i, j in jobs:
                if i is None:
                    for key, got in timed_pass(timer, ops=True).items():
                        raw[j].setdefault(key, []).extend(got)
                else:
                    e2e[i].extend(timed_pass(timer, ops=False))
        samples: dict = {}
        for timer, got in zip(table_nets, raw, strict=True):  # the clock's cost off, at the end
            for key, vals in timer.correct(got).items():
                samples.setdefault(key, []).extend(vals)
        table = LatencyTable(rows_from_samples(samples, keys, stat=args.stat, identity=ident))
    if args.table:
        path = Path(args.table)
        if multi:
            path = path.with_name(f"{path.stem}-{bits_name}{path.suffix}")
    else:
        path = Path(tempfile.mkdtemp()) / f"fidelity-{bits_name}.csv"
    table.write(path)
    model = TableModel(table, batch=args.batch)
    pooled = TableModel(table, batch=args.batch, context=False)
    n_ctx = table.rows_in_context
    print(
        f"table: {len(table)} rows ({n_ctx} in context); "
        f"{'sequential' if args.sequential else 'interleaved'} timing, {args.repeats} samples "
        f"per row and network, stat {args.stat} ({path})"
    )

    # 3. end to end: the table in context (each operation's row after its predecessor's kind)
    # and its pooled rows alone, from the same timings
    e2e_meas = [Timing(tuple(t)).stat(args.stat) for t in e2e]
    ends = {name: end_to_end(m, archs, e2e_meas, args) for name, m in readings(model, pooled)}
    rows = []
    print(
        f"{'#':>3} {'kind':<4} {'architecture':<52} {'pred ms':>9} {'meas ms':>9} {'error':>7} "
        f"{'pooled':>7}"
    )
    for i, (arch, kind) in enumerate(zip(archs, kinds, strict=True)):
        pred, meas = ends["context"]["pred"][i], e2e_meas[i]
        err, err_pooled = ends["context"]["errors"][i], ends["pooled"]["errors"][i]
        rows.append(
            {
                "kind": kind,
                "arch": arch.summary(),
                "predicted_s": pred,
                "predicted_pooled_s": ends["pooled"]["pred"][i],
                "measured_s": meas,
                "error": err,
            }
        )
        print(
            f"{i:>3} {kind:<4} {arch.summary()[:52]:<52} {pred * 1e3:>9.3f} {meas * 1e3:>9.3f} "
            f"{err:>+7.1%} {err_pooled:>+7.1%}",
            flush=True,
        )
    meas = np.array(e2e_meas)
    errs = np.abs(ends["context"]["errors"])
    mape, rho = ends["context"]["mape"], ends["context"]["spearman"]

    # 4. per layer: the table's order of each layer's kernels against an independent timing
    swap = args.layer_reference == "swap"
    rounds = (swapped_layer_rounds if swap else isolated_layer_rounds)(base, bits, args, device)
    tie = args.layer_tie if args.layer_tie is not None else LAYER_TIE[args.layer_reference]
    per = {
        name: per_layer(m, base, bits, rounds, tie, args) for name, m in readings(model, pooled)
    }
    layers, layer_rank = per["context"]["layers"], per["context"]["rank"]
    rho_all = np.array([e["rho"] for e in layers], dtype=float)
    rho_all = rho_all[~np.isnan(rho_all)]
    regret = np.array([e["regret"] for e in layers])
    resolved, ranked = per["context"]["resolved"], per["context"]["ranked"]
    pairs = sum(e["pairs"] for e in layers)
    worst = min(
        (e for e in layers if not np.isnan(e["tau"])), key=lambda e: e["tau"], default=None
    )
    if swap:
        print(
            f"\nper layer: the table's prediction vs the layer swapped into an all-direct "
            f"network, timed end to end ({args.layer_repeats} interleaved rounds, "
            f"{args.layer_instances} builds of each network); options "
            f"direct, F2, F4, F6; both: the network less the all-direct one (ms; table: priced "
            f"in context, measured: median over rounds); tau over the pairs the rounds resolve "
            f"(differ by >= {tie:.1%} of the network, 95% CI); regret of the network"
        )
    else:
        print(
            f"\nper layer: the table's rows (timed in place) vs each kernel timed alone "
            f"({args.layer_repeats} interleaved rounds); options direct, F2, F4, F6 (ms); tau "
            f"over the pairs the rounds resolve (differ by >= {tie:.0%}, 95% CI)"
        )
    print(
        f"{'layer':<24} {'geometry':<18} {'table':<30} {'measured':<30} {'tau':>6} "
        f"{'pairs':>5} {'rho':>6} {'regret':>7} {'pooled':>6}"
    )
    for e, p in zip(layers, per["pooled"]["layers"], strict=True):
        tb = " ".join(f"{v:+.3f}" if swap else f"{v:.3f}" for v in e["table_ms"])
        al = " ".join(f"{v:+.3f}" if swap else f"{v:.3f}" for v in e["measured_ms"])
        print(
            f"{e['layer'][:24]:<24} {e['geometry']:<18} {tb:<30} {al:<30} {e['tau']:>6.2f} "
            f"{e['resolved']:>2}/{e['pairs']:<2} {e['rho']:>6.2f} {e['regret']:>+7.1%} "
            f"{p['tau']:>6.2f}"
        )

    met = {
        "mape": mape[0] <= TARGETS["mape"],
        "spearman": rho[0] >= TARGETS["spearman"],
        "layer_rank": layer_rank[0] >= TARGETS["layer_rank"],
    }
    print(
        f"\nbits {bits_name}: {len(rows)} networks ({len(refs)} uniform + {len(picked)} "
        f"stratified mixes), measured {meas.min() * 1e3:.3f}..{meas.max() * 1e3:.3f} ms"
    )
    print(
        f"  MAPE          {mape[0]:7.1%}  95% CI [{mape[1]:.1%}, {mape[2]:.1%}]   "
        f"target <= {TARGETS['mape']:.0%}: {_met(met['mape'])}  (worst {errs.max():.1%})"
    )
    print(
        f"  Spearman e2e  {rho[0]:7.3f}  95% CI [{rho[1]:.3f}, {rho[2]:.3f}]   "
        f"target >= {TARGETS['spearman']}: {_met(met['spearman'])}"
    )
    print(
        f"  layer rank    {layer_rank[0]:7.3f}  95% CI [{layer_rank[1]:.3f}, {layer_rank[2]:.3f}]"
        f"   target >= {TARGETS['layer_rank']}: {_met(met['layer_rank'])}  (tau over the "
        f"{resolved} of {pairs} pairs resolved, in {ranked} layers; worst "
        + (f"{worst['layer']} {worst['tau']:.2f}" if worst else "n/a")
        + ")"
    )
    print(
        f"  layer rho     {float(np.mean(rho_all)) if len(rho_all) else float('nan'):7.3f}  "
        f"(Spearman over all 4 options, unresolved pairs included)   pick regret: mean "
        f"{regret.mean():.1%}, worst {regret.max():.1%}"
    )
    pe, pl = ends["pooled"], per["pooled"]
    print(
        f"  pooled rows   MAPE {pe['mape'][0]:.1%}, Spearman {pe['spearman'][0]:.3f}, layer rank "
        f"{pl['rank'][0]:.3f} ({pl['resolved']} pairs): the same table without its rows in "
        f"context ({n_ctx} of {len(table)} rows)"
    )
    print(f"  CI: percentile bootstrap over networks / layers, {args.bootstrap} resamples")
    print(f"  machine: {machine_line(device, threads=args.threads)}")
    return {
        "bits": bits_name,
        "table_rows": len(table),
        "networks": len(rows),
        "references": len(refs),
        "mixes": len(picked),
        "candidate_range_ms": [round(min(cand_pred) * 1e3, 4), round(max(cand_pred) * 1e3, 4)],
        "picked_range_ms": [
            round(min(cand_pred[i] for i in picked) * 1e3, 4),
            round(max(cand_pred[i] for i in picked) * 1e3, 4),
        ],
        "empty_bins": empty,
        "measured_range_ms": [round(meas.min() * 1e3, 4), round(meas.max() * 1e3, 4)],
        "mape": round(mape[0], 4),
        "mape_ci": _ci(mape),
        "worst_error": round(float(errs.max()), 4),
        "within_5pct": round(float(np.mean(errs <= 0.05)), 3),
        "spearman": round(rho[0], 4),
        "spearman_ci": _ci(rho),
        "layer_rank": round(layer_rank[0], 4),
        "layer_rank_ci": _ci(layer_rank),
        "layer_count": len(layers),
        "layers_ranked": ranked,
        "layer_pairs_resolved": resolved,
        "layer_pairs": int(pairs),
        "layer_reference": args.layer_reference,
        "layer_instances": args.layer_instances if swap else None,
        "layer_tie": tie,
        "layer_rho": round(float(np.mean(rho_all)), 4) if len(rho_all) else None,
        "layer_regret_mean": round(float(regret.mean()), 4),
        "layer_regret_worst": round(float(regret.max()), 4),
        "worst_layer": worst["layer"] if worst else None,
        "worst_layer_rank": round(worst["tau"], 4) if worst else None,
        "mape_target_met": bool(met["mape"]),
        "spearman_target_met": bool(met["spearman"]),
        "layer_rank_target_met": bool(met["layer_rank"]),
        "targets_met": bool(all(met.values())),
        "context_rows": n_ctx,
        "pooled": {
            "mape": round(pe["mape"][0], 4),
            "mape_ci": _ci(pe["mape"]),
            "spearman": round(pe["spearman"][0], 4),
            "spearman_ci": _ci(pe["spearman"]),
            "layer_rank": round(pl["rank"][0], 4),
            "layer_rank_ci": _ci(pl["rank"]),
            "layer_pairs_resolved": pl["resolved"],
        },
        "machine": machine_line(device, threads=args.threads),
        "rows": rows,
        "layers": layers,
    }


if __name__ == "__main__":
    sys.exit(main())
