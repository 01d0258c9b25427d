"""Latency tables: CSV files of measured operation times, and the model that looks them up.

Schema (one row per operation; the header names the columns, in any order; see docs/latency.md):

=============  ========  =========================================================================
column         required  meaning
=============  ========  =========================================================================
op             yes       ``conv3x3``, ``conv1x1``, ``stem``, ``maxpool``, ``relu``, ``add_relu``,
                         ``head`` (see ``wasearch.latency.ops``); a traced network's generic
                         ops: ``conv``, ``linear``, ``pool``, ``norm``, ``act``, ``free``,
                         ``functions``, ``module`` (see ``wasearch.latency.generic``)
in_channels    yes       input channels C (``stem``: 3)
out_channels   yes       output channels K (``head``: classes; pools, ReLUs: C)
height, width  yes       the op's input size per image (``maxpool``: before pooling)
batch          yes       images per call
conv           yes       ``conv3x3``: ``normal``, ``static`` or ``flex``; other ops: empty
tile           yes       output tile m of a Winograd conv3x3 (2..8); otherwise empty
bits           yes       ``fp32`` (or empty): floating point; else 2..16 (conv3x3, conv1x1, conv)
seconds        yes       time of one call (the ``stat`` of the samples, median if absent), >= 0
spread         no        interquartile range of the timed samples, seconds
repeats        no        number of timed samples
stat           no        ``median``, ``mean`` or ``min``: what ``seconds`` is of the samples
device         no        what it ran on (CPU model or GPU name)
cores          no        logical CPUs of the machine
threads        no        intra-op threads used
torch          no        torch version
measured_at    no        ISO time of the measurement
note           no        free text (``measure`` writes ``same kernel as static`` on flex rows)
detail         generic   a generic op's type, parameters and shapes, as ``latency.generic``
                         writes it (required for those ops, empty for the others)
after          no        the context: the kernel family (``direct``, ``F2`` ... ``F8``) of the
                         searchable conv that ran last before the op; empty: every context
                         pooled (the row used where a context has none)
=============  ========  =========================================================================

Any other column is kept and ignored. Tables are written atomically (temporary file, then rename).
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..fileio import InputFileError, atomic_write_text, read_text
from ..layers import CONV_KINDS
from ..quant import MAX_BITS, MIN_BITS
from ..winograd import MAX_TILE
from .analytical import Profile, calibrate, load_profile, op_counts, precision
from .base import LatencyError, LatencyModel
from .generic import GENERIC_OPS
from .ops import OPS, SEARCHABLE_OP, OpKey
from .timing import STATS

__all__ = ["COLUMNS", "REQUIRED", "LatencyTable", "Row", "TableModel", "table_rows_as_samples"]

REQUIRED = (
    "op",
    "in_channels",
    "out_channels",
    "height",
    "width",
    "batch",
    "conv",
    "tile",
    "bits",
    "seconds",
)
COLUMNS = REQUIRED + (
    "spread",
    "repeats",
    "stat",
    "device",
    "cores",
    "threads",
    "torch",
    "measured_at",
    "note",
    "detail",
    "after",
)
_IDENTITY = ("device", "cores", "threads", "torch", "stat")


@dataclass(frozen=True)
class Row:
    """One timed operation."""

    key: OpKey
    seconds: float
    spread: float | None = None
    repeats: int | None = None
    info: dict[str, str] = field(default_factory=dict)  # device, cores, threads, torch, ...

    def to_record(self) -> dict[str, str]:
        k = self.key
        rec = {
            "op": k.op,
            "in_channels": str(k.in_channels),
            "out_channels": str(k.out_channels),
            "height": str(k.height),
            "width": str(k.width),
            "batch": str(k.batch),
            "conv": k.conv or "",
            "tile": "" if k.tile is None else str(k.tile),
            "bits": "fp32" if k.bits is None else str(k.bits),
            "seconds": f"{self.seconds:.6e}",
            "spread": "" if self.spread is None else f"{self.spread:.3e}",
            "repeats": "" if self.repeats is None else str(self.repeats),
            "detail": k.detail or "",
            "after": k.after or "",
        }
        rec.update({c: str(self.info.get(c, "")) for c in COLUMNS if c not in rec})
        rec.update({c: str(v) for c, v in self.info.items() if c not in rec})
        return rec


def _parse_row(rec: dict[str, str], where: str) -> Row:
    def integer(col: str, *, lo: int = 1, hi: int | None = None) -> int:
        text = (rec.get(col) or "").strip()
        try:
            v = int(text)
        except ValueError:
            raise LatencyError(f"{where}: column {col!r}: {text!r} is not an integer") from None
        if v < lo or (hi is not None and v > hi):
            rng = f"{lo}..{hi}" if hi is not None else f">= {lo}"
            raise LatencyError(f"{where}: column {col!r}: {v} is out of range ({rng})")
        return v

    def number(col: str, *, required: bool) -> float | None:
        text = (rec.get(col) or "").strip()
        if not text:
            if required:
                raise LatencyError(f"{where}: column {col!r} is empty")
            return None
        try:
            v = float(text)
        except ValueError:
            raise LatencyError(f"{where}: column {col!r}: {text!r} is not a number") from None
        if not math.isfinite(v) or v < 0:
            raise LatencyError(f"{where}: column {col!r}: {text} must be a finite time >= 0")
        return v

    op = (rec.get("op") or "").strip()
    if op not in OPS + GENERIC_OPS:
        raise LatencyError(
            f"{where}: column 'op': unknown {op!r}; use one of {', '.join(OPS + GENERIC_OPS)}"
        )
    detail = (rec.get("detail") or "").strip() or None
    if (op in GENERIC_OPS) != (detail is not None):
        need = "needs" if op in GENERIC_OPS else "must be empty for"
        raise LatencyError(f"{where}: column 'detail' {need} op {op!r}")
    conv = (rec.get("conv") or "").strip() or None
    tile_text = (rec.get("tile") or "").strip()
    bits_text = (rec.get("bits") or "").strip().lower()
    if op == SEARCHABLE_OP:
        if conv not in CONV_KINDS:
            raise LatencyError(
                f"{where}: column 'conv': {conv!r}; a conv3x3 row needs one of "
                f"{', '.join(CONV_KINDS)}"
            )
        tile = None if conv == "normal" else integer("tile", lo=2, hi=MAX_TILE)
        if conv == "normal" and tile_text:
            raise LatencyError(f"{where}: column 'tile': {tile_text!r} given for a normal conv")
    else:
        if conv is not None or tile_text:
            raise LatencyError(f"{where}: columns 'conv'/'tile' must be empty for op {op!r}")
        tile = None
    if bits_text in ("", "fp32", "fp", "float", "none"):
        bits = None
    else:
        bits = integer("bits", lo=MIN_BITS, hi=MAX_BITS)
    if bits is not None and op not in (SEARCHABLE_OP, "conv1x1", "conv"):
        raise LatencyError(f"{where}: column 'bits': op {op!r} runs in floating point; use fp32")
    key = OpKey(
        op,
        integer("in_channels"),
        integer("out_channels"),
        integer("height"),
        integer("width"),
        integer("batch"),
        conv,
        tile,
        bits,
        detail,
    )
    after = (rec.get("after") or "").strip() or None
    if after is not None and not _is_family(after):
        raise LatencyError(
            f"{where}: column 'after': {after!r}; use direct, F2 .. F{MAX_TILE} or leave it empty"
        )
    if after is not None:
        key = replace(key, after=after)
    seconds = number("seconds", required=True)
    spread = number("spread", required=False)
    rep_text = (rec.get("repeats") or "").strip()
    repeats = integer("repeats") if rep_text else None
    stat = (rec.get("stat") or "").strip()
    if stat and stat not in STATS:
        raise LatencyError(
            f"{where}: column 'stat': {stat!r}; use {', '.join(STATS)} or leave it empty"
        )
    info = {
        c: (v or "").strip()
        for c, v in rec.items()
        if c is not None
        and c not in REQUIRED + ("spread", "repeats", "detail", "after")
        and (v or "").strip()
    }
    return Row(key, float(seconds), spread, repeats, info)


def _is_family(text: str) -> bool:
    """Whether ``text`` names a kernel family: ``direct`` or ``F<tile>``, tile 2..MAX_TILE."""
    if text == "direct":
        return True
    tile = text[1:]
    return text[:1] == "F" and tile.isascii() and tile.isdigit() and 2 <= int(tile) <= MAX_TILE


class LatencyTable:
    """Rows keyed by :class:`OpKey`; read from and written to CSV (see the module doc)."""

    def __init__(self, rows: Iterable[Row] = (), *, source: str = "table") -> None:
        self.source = source
        self._rows: dict[OpKey, Row] = {}
        self._in_context = 0  # rows with a context (``after``)
        for r in rows:
            self.add(r)

    # -- access -----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._rows)

    def __iter__(self) -> Iterator[Row]:
        return iter(self._rows.values())

    def __contains__(self, key: object) -> bool:
        return key in self._rows

    def get(self, key: OpKey) -> Row | None:
        return self._rows.get(key)

    def add(self, row: Row, *, replace_existing: bool = True) -> None:
        if row.key in self._rows:
            if not replace_existing:
                return
        elif row.key.after is not None:
            self._in_context += 1
        self._rows[row.key] = row

    @property
    def rows_in_context(self) -> int:
        """How many rows are timed in a context (``after`` set)."""
        return self._in_context

    @property
    def has_context(self) -> bool:
        """Whether any row is timed in a context: then a :class:`TableModel` prices each
        operation in its network's context."""
        return self._in_context > 0

    def keys(self) -> list[OpKey]:
        return list(self._rows)

    def identity(self) -> dict[str, str]:
        """The device identity the rows agree on (columns device, cores, threads, torch)."""
        ident: dict[str, str] = {}
        for row in self._rows.values():
            for c in _IDENTITY:
                v = row.info.get(c)
                if v and c not in ident:
                    ident[c] = v
        return ident

    # -- I/O --------------------------------------------------------------------------------------
    @classmethod
    def read(cls, path: str | os.PathLike) -> LatencyTable:
        """Read a table CSV; :class:`LatencyError` naming the file when it cannot be read, is
        binary or not UTF-8 (:func:`wasearch.fileio.read_text`), or holds a bad row."""
        path = Path(path)
        try:
            text = read_text(path, what="latency table")
        except InputFileError as err:
            raise LatencyError(str(err)) from None
        return cls.parse(text, source=str(path))

    @classmethod
    def parse(cls, text: str, *, source: str = "table") -> LatencyTable:
        try:
            return cls._parse(text, source)
        except csv.Error as err:  # e.g. a cell over the csv module's field size limit
            raise LatencyError(f"{source}: not a readable CSV table ({err})") from None

    @classmethod
    def _parse(cls, text: str, source: str) -> LatencyTable:
        reader = csv.DictReader(io.StringIO(text))
        header = [h.strip() for h in (reader.fieldnames or [])]
        missing = [c for c in REQUIRED if c not in header]
        if missing:
            raise LatencyError(
                f"{source}: missing column {missing[0]!r}; a latency table needs "
                f"{', '.join(REQUIRED)}"
            )
        reader.fieldnames = header
        table = cls(source=source)
        first_line: dict[OpKey, int] = {}
        for rec in reader:
            line = reader.line_num
            if not any((v or "").strip() for v in rec.values() if isinstance(v, str)):
                continue
            if None in rec:
                raise LatencyError(f"{source}: row {line}: more cells than header columns")
            row = _parse_row(rec, f"{source}: row {line}")
            if row.key in first_line:
                raise LatencyError(
                    f"{source}: row {line}: duplicate of row "
                    f"{first_line[row.key]} ({row.key.describe()})"
                )
            first_line[row.key] = line
            table.add(row)
        return table

    def to_csv(self) -> str:
        out = io.StringIO()
        extra = sorted({c for r in self._rows.values() for c in r.info} - set(COLUMNS))
        writer = csv.DictWriter(out, fieldnames=list(COLUMNS) + extra, lineterminator="\n")
        writer.writeheader()
        order = {op: i for i, op in enumerate(OPS + GENERIC_OPS)}
        for row in sorted(self._rows.values(), key=lambda r: _sort_key(r.key, order)):
            writer.writerow(row.to_record())
        return out.getvalue()

    def write(self, path: str | os.PathLike) -> Path:
        """Write atomically: a temporary file in the same folder, then ``os.replace``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, self.to_csv())
        self.source = str(path)
        return path


def _sort_key(k: OpKey, order: dict[str, int]) -> tuple:
    return (
        order.get(k.op, 99),
        k.batch,
        k.in_channels,
        k.out_channels,
        k.height,
        k.width,
        k.conv or "",
        k.tile or 0,
        -1 if k.bits is None else k.bits,
        k.detail or "",
        k.after or "",
    )


def _normalize(key: OpKey) -> OpKey:
    """Flex deploys with the same kernel as static: look flex rows up as static ones."""
    return replace(key, conv="static") if key.conv == "flex" else key


class TableModel(LatencyModel):
    """Looks operations up in a :class:`LatencyTable`.

    A ``flex`` row that the table lacks is read from the ``static`` row of the same geometry (the
    deploy kernels are the same). Rows still missing (a bit-width without a kernel on the
    measuring machine, a batch not measured) are estimated with the ``fallback`` profile when one
    is given: anchored on the nearest measured row of the same geometry and algorithm (other
    bit-width or batch) and scaled by the profile's ratio between the two, else from the profile
    alone; such entries are flagged estimated. ``fallback="calibrate"`` fits a profile to the
    table itself (``analytical.calibrate``), ratios for unmeasured precisions taken from
    ``base_profile``. Without a fallback, a missing row raises :class:`LatencyError`.

    Where the table holds rows in context (column ``after``, ``search.py measure`` writes
    them), :meth:`price` looks each operation up in its network's context (what ran before it,
    ``ops.keys_in_context``), and the pooled row where that context has none; ``context=False``
    prices with the pooled rows only. :meth:`layer_cost` prices a layer alone, so with the
    pooled rows: its context is the other layers' choice.
    """

    kind = "table"

    def __init__(
        self,
        table: LatencyTable | str | os.PathLike,
        *,
        batch: int = 1,
        fallback: Profile | str | None = None,
        base_profile: str = "cortex-a73",
        context: bool = True,
    ) -> None:
        super().__init__(batch=batch)
        self.table = table if isinstance(table, LatencyTable) else LatencyTable.read(table)
        self.context = context
        self._fallback_spec = fallback
        self._fallback: Profile | None = fallback if isinstance(fallback, Profile) else None
        self.base_profile = base_profile

    def describe(self) -> str:
        return f"{self.kind} ({self.table.source}, {len(self.table)} rows)"

    @property
    def fallback(self) -> Profile | None:
        """The profile that prices missing rows (fitted on first use for ``"calibrate"``)."""
        if self._fallback is None and self._fallback_spec is not None:
            if self._fallback_spec == "calibrate":
                self._fallback, _ = calibrate(
                    table_rows_as_samples(self.table),
                    base=self.base_profile,
                    name=f"calibrated to {self.table.source}",
                )
            else:
                self._fallback = load_profile(self._fallback_spec)
        return self._fallback

    def in_context(self) -> bool:
        return self.context and self.table.has_context

    def _lookup(self, key: OpKey) -> Row | None:
        """The row of ``key``: its own, its static twin's (flex), or, for a key in a context
        the table lacks, the pooled row's (``after`` empty)."""
        row = self.table.get(key)
        if row is None and key.conv == "flex":
            row = self.table.get(_normalize(key))
        if row is None and key.after is not None:
            return self._lookup(key.pooled())
        return row

    def _missing(self, key: OpKey) -> tuple[float, bool]:
        key = key.pooled()
        profile = self.fallback
        if profile is None:
            raise LatencyError(
                f"{self.table.source}: no row for {key.describe()}; measure it "
                "(python search.py measure SPACE.yaml) or give the model a fallback profile"
            )
        anchor = self._anchor(key)
        if anchor is None:
            return profile.seconds(op_counts(key)), True
        ratio = profile.seconds(op_counts(key)) / max(
            profile.seconds(op_counts(anchor.key)), 1e-30
        )
        return anchor.seconds * ratio, True

    def _anchor(self, key: OpKey) -> Row | None:
        """The measured row nearest to ``key``: same op, geometry and algorithm."""
        want = _normalize(key)
        best, best_rank = None, None
        for row in self.table:
            k = _normalize(row.key)
            if k.after is not None:
                continue
            if (k.op, k.in_channels, k.out_channels, k.height, k.width, k.conv, k.tile) != (
                want.op,
                want.in_channels,
                want.out_channels,
                want.height,
                want.width,
                want.conv,
                want.tile,
            ) or (k.detail != want.detail):
                continue
            rank = (
                k.batch != want.batch,
                abs(math.log(k.batch / want.batch)),
                precision(k.bits) != precision(want.bits),
                k.bits is not None,  # then prefer float32 as the anchor
                abs((k.bits or 32) - (want.bits or 32)),
            )
            if best_rank is None or rank < best_rank:
                best, best_rank = row, rank
        return best

    def _op_cost(self, key: OpKey) -> tuple[float, bool]:
        row = self._lookup(key)
        if row is not None:
            return row.seconds, False
        return self._missing(key)


def table_rows_as_samples(table: LatencyTable) -> list[tuple[OpKey, float]]:
    """``(key, seconds)`` for calibration: the pooled rows (those in a context time the same
    operations again), less flex rows that copy static ones."""
    return [
        (r.key, r.seconds)
        for r in table
        if r.key.after is None
        and not (r.key.conv == "flex" and r.info.get("note") == "same kernel as static")
    ]
