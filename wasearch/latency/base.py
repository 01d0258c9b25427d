"""The latency-model interface: per-operation costs, per-layer and end-to-end reports."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

from ..arch import Arch, LayerChoice
from ..cli import UserError
from ..models import ConvSpec
from .generic import is_guessed
from .ops import NetOp, OpKey, conv_key, keys_in_context, network_ops

__all__ = [
    "LatencyError",
    "LatencyEntry",
    "LatencyModel",
    "LatencyReport",
    "format_latency_table",
]


class LatencyError(UserError, ValueError):
    """A bad latency table, profile or model spec; the message names the row or key.

    A ``UserError`` (the CLIs report it in one line) and a ``ValueError`` (for library callers).
    """


@dataclass(frozen=True, slots=True)
class LatencyEntry:
    """The price of one operation of a network."""

    name: str
    key: OpKey
    seconds: float
    estimated: bool
    searchable: bool
    label: str = ""  # the layer choice's label for searchable convs, e.g. ``F4-flex/8``


@dataclass(frozen=True)
class LatencyReport:
    """Per-operation, per-layer and total seconds of one ``Arch`` at one input size and batch.

    ``entries`` are in forward order; ``layers`` holds the searchable convolutions by name,
    ``parts`` the rest (the paper's stem, pools, ReLUs, residual adds, shortcuts, head; any other
    network's traced modules and functions), so that ``total`` is end to end. ``guessed`` names
    the parts of a type the generic pricing does not know, whose analytical cost is a
    conservative per-element guess (``latency.generic``). ``estimated`` names the entries
    priced by a model rather than a measurement (every entry of an analytical model; a table's
    rows that were missing, such as bit-widths without a kernel on the measuring machine).
    """

    entries: tuple[LatencyEntry, ...]
    batch: int
    input_size: int
    source: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def layers(self) -> dict[str, float]:
        return {e.name: e.seconds for e in self.entries if e.searchable}

    @property
    def parts(self) -> dict[str, float]:
        return {e.name: e.seconds for e in self.entries if not e.searchable}

    @property
    def estimated(self) -> frozenset[str]:
        return frozenset(e.name for e in self.entries if e.estimated)

    @property
    def guessed(self) -> frozenset[str]:
        return frozenset(e.name for e in self.entries if is_guessed(e.key))

    @property
    def total(self) -> float:
        return math.fsum(e.seconds for e in self.entries)

    @property
    def searchable_total(self) -> float:
        return math.fsum(e.seconds for e in self.entries if e.searchable)

    @property
    def any_estimated(self) -> bool:
        return any(e.estimated for e in self.entries)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly form (for trial attributes and result files)."""
        return {
            "source": self.source,
            "batch": self.batch,
            "input_size": self.input_size,
            "total_s": self.total,
            "layers_s": self.layers,
            "parts_s": self.parts,
            "estimated": sorted(self.estimated),
        }


class LatencyModel(ABC):
    """Prices networks on one target: ``price(arch)`` end to end, ``layer_cost`` per choice.

    Subclasses implement :meth:`_op_cost`; results are cached per :class:`OpKey`, so the search
    (and a differentiable search, which asks for every candidate of every layer) can call
    :meth:`layer_cost` thousands of times at the price of a dict lookup.
    """

    kind: str = ""

    def __init__(self, *, batch: int = 1) -> None:
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise LatencyError(f"batch={batch!r} must be a positive integer")
        self.batch = batch
        self._cache: dict[OpKey, tuple[float, bool]] = {}

    # -- to implement -----------------------------------------------------------------------------
    @abstractmethod
    def _op_cost(self, key: OpKey) -> tuple[float, bool]:
        """Seconds of one operation, and whether that figure is estimated."""

    def describe(self) -> str:
        """One line naming the model (and its profile or table)."""
        return self.kind

    def in_context(self) -> bool:
        """Whether :meth:`price` asks for each operation in its network's context (``OpKey.after``:
        what ran before it); a table with rows in context says yes."""
        return False

    # -- public -----------------------------------------------------------------------------------
    def op_cost(self, key: OpKey) -> tuple[float, bool]:
        """Seconds of one operation and whether it is estimated (cached)."""
        hit = self._cache.get(key)
        if hit is None:
            hit = self._op_cost(key)
            self._cache[key] = hit
        return hit

    def layer_cost(self, spec: ConvSpec, choice: LayerChoice, batch: int | None = None) -> float:
        """Seconds of one searchable convolution under one candidate choice."""
        return self.op_cost(conv_key(spec, choice, self.batch if batch is None else batch))[0]

    def layer_estimated(
        self, spec: ConvSpec, choice: LayerChoice, batch: int | None = None
    ) -> bool:
        """Whether :meth:`layer_cost` of that choice comes from a model, not a measurement."""
        return self.op_cost(conv_key(spec, choice, self.batch if batch is None else batch))[1]

    def price(
        self, arch: Arch, *, input_size: int | None = None, batch: int | None = None
    ) -> LatencyReport:
        """Per-operation and total seconds of ``arch`` (defaults: its input size, the model's
        batch)."""
        b = self.batch if batch is None else batch
        size = arch.input_size if input_size is None else input_size
        ops = self.network_ops(arch, input_size=size)
        keys = (
            keys_in_context(ops, b) if self.in_context() else [op.key.with_batch(b) for op in ops]
        )
        entries = []
        for op, key in zip(ops, keys, strict=True):
            seconds, est = self.op_cost(key)
            label = arch.choice(op.name).label if op.searchable else ""
            entries.append(LatencyEntry(op.name, key, seconds, est, op.searchable, label))
        return LatencyReport(tuple(entries), b, size, self.describe())

    def network_ops(self, arch: Arch, *, input_size: int | None = None) -> list[NetOp]:
        """The operations :meth:`price` sums: the paper's network's, or any other's from its
        traced forward pass (``latency.ops.network_ops``)."""
        return network_ops(arch, input_size=input_size)


def _flag(entry: LatencyEntry) -> str:
    return "*" if entry.estimated else " "


_PART_GROUPS = (
    ("stem", "stem (conv + ReLU)"),
    ("conv1x1", "shortcuts (1x1 conv)"),
    ("maxpool", "max-pools"),
    ("relu", "ReLUs"),
    ("add_relu", "residual add + ReLU"),
    ("head", "head (avg-pool + fc)"),
    ("conv", "other convolutions"),
    ("norm", "norms"),
    ("act", "activations"),
    ("pool", "pools"),
    ("functions", "functions between modules (adds, flatten, ...)"),
    ("linear", "linear layers"),
    ("free", "identities, dropout, flatten"),
    ("module", "other modules (cost per element guessed)"),
)


def format_latency_table(arch: Arch, report: LatencyReport) -> str:
    """A text table of ``report`` (from ``model.price(arch)``): one row per searchable layer
    (geometry, choice, milliseconds, share of the total), the non-searchable parts grouped by
    kind, and the total. Entries priced by a model rather than measured carry a ``*``."""
    total = report.total or float("nan")
    lines = [
        f"latency: {report.source}, batch {report.batch}, input {report.input_size}x"
        f"{report.input_size}",
        f"{'layer':<16} {'in->out @HxW':<18} {'choice':<14} {'ms':>9} {'share':>7}",
    ]
    for e in report.entries:
        if not e.searchable:
            continue
        k = e.key
        geo = f"{k.in_channels}->{k.out_channels} @{k.height}x{k.width}"
        label = e.label or arch.choice(e.name).label
        lines.append(
            f"{e.name:<16} {geo:<18} {label:<14} {e.seconds * 1e3:>8.3f}{_flag(e)} "
            f"{e.seconds / total:>7.1%}"
        )
    lines.append(
        f"{'searchable convs':<50} {report.searchable_total * 1e3:>8.3f}  "
        f"{report.searchable_total / total:>7.1%}"
    )
    for op, title in _PART_GROUPS:
        group = [e for e in report.entries if not e.searchable and e.key.op == op]
        if not group:
            continue
        s = math.fsum(e.seconds for e in group)
        est = "*" if any(e.estimated for e in group) else " "
        name = f"{title} x{len(group)}" if len(group) > 1 else title
        lines.append(f"{name:<50} {s * 1e3:>8.3f}{est} {s / total:>7.1%}")
    est = "*" if report.any_estimated else " "
    lines.append(f"{'total (end to end)':<50} {report.total * 1e3:>8.3f}{est} {1:>7.1%}")
    if report.any_estimated:
        lines.append(
            "* estimated by the analytical model (no measurement or no kernel of that "
            "bit-width on the measuring machine)"
        )
    guessed = [e.name for e in report.entries if is_guessed(e.key)]
    if guessed:
        more = f" (+{len(guessed) - 4} more)" if len(guessed) > 4 else ""
        lines.append(
            f"of a type the analytical model does not know, priced per output element: "
            f"{', '.join(guessed[:4])}{more}"
        )
    return "\n".join(lines)
