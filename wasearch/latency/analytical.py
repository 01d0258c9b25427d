"""Analytical latency: operation counts turned into seconds by a device profile.

Counts come from the actual transform matrices (``wasearch.winograd.cook_toom``): a static
Cook-Toom transform is sparse and mostly +-1, so a hand-written or generated kernel applies it
with additions (an entry of 0 costs nothing, +-1 one addition, any other value a multiplication
and an addition); a learned (flex) transform is dense, every entry a multiply-add. The 2-D input
transform ``B^T d B`` applies the 1-D one to the alpha columns and then the alpha rows of a tile
(2 alpha applications), the output transform ``A^T M A`` to alpha columns and then m rows. The
weight transform runs once at conversion and costs nothing at inference. The Winograd-domain
product is a GEMM of ``alpha^2 * K * C`` multiply-adds per tile; a direct convolution does
``K * C * 9`` per output pixel.

Time of one operation (additive, no overlap assumed, so that ``calibrate`` is a linear fit)::

    t = overhead + sum_p gemm_macs[p] / gemm_macs_per_s[p]
                 + sum_p elementwise_ops[p] / elementwise_ops_per_s[p]
                 + bytes / memory_bytes_per_s

over the precision classes ``fp32``, ``int8`` (bit-widths 2..8 run on 8-bit kernels) and
``int16`` (9..16). Transforms of an integer layer run in ``int16``: their outputs outgrow 8 bits.
``overhead`` is ``op_overhead_s`` times the kernel launches of the operation (see ``OpCounts``).
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from ..fileio import InputFileError, atomic_write_text, parse_yaml, read_text
from ..winograd import cook_toom, tile_counts
from .base import LatencyError, LatencyModel
from .generic import generic_counts
from .ops import OpKey

__all__ = [
    "FEATURES",
    "PRECISIONS",
    "FitReport",
    "OpCounts",
    "AnalyticalModel",
    "Profile",
    "available_profiles",
    "calibrate",
    "load_profile",
    "op_counts",
    "precision",
    "transform_ops",
]

PRECISIONS = ("fp32", "int8", "int16")
_ELEM_BYTES = {"fp32": 4, "int8": 1, "int16": 2}
_ACC_BYTES = 4  # int32 or float32 accumulators of the Winograd-domain product
_PROFILE_KEYS = (
    "name",
    "description",
    "gemm_macs_per_s",
    "elementwise_ops_per_s",
    "memory_bytes_per_s",
    "op_overhead_s",
)
#: Feature order of ``OpCounts.features`` and of the calibration's least squares.
FEATURES = (
    "overhead",
    *(f"gemm_{p}" for p in PRECISIONS),
    *(f"ew_{p}" for p in PRECISIONS),
    "bytes",
)


def precision(bits: int | None) -> str:
    """The precision class a bit-width runs at: ``fp32`` (None), ``int8`` (<= 8), ``int16``."""
    if bits is None:
        return "fp32"
    return "int8" if bits <= 8 else "int16"


# -- op counts -----------------------------------------------------------------------------------
def transform_ops(matrix: Sequence[Sequence[Any]], *, dense: bool = False) -> tuple[int, int]:
    """(additions, multiplications) of one 1-D application ``matrix @ vector``.

    Static (``dense=False``): a row with n nonzero entries costs n - 1 additions and one
    multiplication per entry other than +-1. Dense (a learned transform): every entry is a
    multiplication and each row ``cols - 1`` additions.
    """
    rows = [list(r) for r in matrix]
    if dense:
        return sum(len(r) - 1 for r in rows), sum(len(r) for r in rows)
    adds = sum(max(sum(1 for v in r if v != 0) - 1, 0) for r in rows)
    mults = sum(1 for r in rows for v in r if v != 0 and abs(v) != 1)
    return adds, mults


@functools.lru_cache(maxsize=32)
def _winograd_ew(tile: int, dense: bool) -> tuple[int, int]:
    """Element-wise ops per tile: (input transform per input channel, output per output one)."""
    ct = cook_toom(tile, 3)
    a = ct.alpha
    in_adds, in_mults = transform_ops(ct.B_t, dense=dense)
    out_adds, out_mults = transform_ops(ct.A_t, dense=dense)
    return 2 * a * (in_adds + in_mults), (a + tile) * (out_adds + out_mults)


@dataclass(frozen=True)
class OpCounts:
    """Work of one operation: GEMM multiply-adds and element-wise ops per precision, bytes moved,
    and kernel launches (each costs the profile's ``op_overhead_s``): 1 for a direct convolution
    or an element-wise op, 3 for a Winograd convolution (input transform, GEMM, output
    transform), one more for an integer layer's input quantization."""

    gemm_macs: dict[str, float]
    elementwise_ops: dict[str, float]
    bytes: float
    launches: int = 1

    def features(self) -> np.ndarray:
        return np.array(
            [self.launches]
            + [self.gemm_macs.get(p, 0.0) for p in PRECISIONS]
            + [self.elementwise_ops.get(p, 0.0) for p in PRECISIONS]
            + [self.bytes],
            dtype=np.float64,
        )


def op_counts(key: OpKey) -> OpCounts:
    """Operation counts of the deploy kernel ``key`` names (see the module doc); a generic
    operation of a traced network by :func:`wasearch.latency.generic.generic_counts`."""
    b, c, k, h, w = key.batch, key.in_channels, key.out_channels, key.height, key.width
    if key.generic:
        try:
            macs, ew, moved, launches = generic_counts(key)
        except ValueError as err:
            raise LatencyError(f"{key.op}: {err}") from None
        p = precision(key.bits)
        return OpCounts({p: macs} if macs else {}, {"fp32": ew} if ew else {}, moved, launches)
    if key.op in ("conv3x3", "conv1x1", "stem"):
        p = precision(key.bits) if key.op != "stem" else "fp32"
        e = _ELEM_BYTES[p]
        if key.op == "conv3x3" and key.conv in ("static", "flex"):
            m = key.tile
            a = m + 2
            th, tw = tile_counts(h, w, m)
            t = b * th * tw
            ew_in, ew_out = _winograd_ew(m, key.conv == "flex")
            tp = "fp32" if p == "fp32" else "int16"
            ew = {tp: float(t * (c * ew_in + k * ew_out))}
            data = t * a * a * (2 * c * e + 2 * k * _ACC_BYTES)  # V and M, written and read
            return OpCounts(
                {p: float(t * a * a * k * c)},
                ew,
                float(b * (c + k) * h * w * e + data + a * a * k * c * e),
                launches=3 + (p != "fp32"),  # input transform, GEMM, output transform
            )
        taps = 1 if key.op == "conv1x1" else 9
        ew = {"fp32": float(b * k * h * w)} if key.op == "stem" else {}  # the stem's ReLU
        return OpCounts(
            {p: float(b * k * c * taps * h * w)},
            ew,
            float(b * (c + k) * h * w * e + k * c * taps * e),
            launches=1 + (p != "fp32"),  # integer layers quantize their input first
        )
    n = float(b * c * h * w)
    if key.op == "maxpool":
        return OpCounts({}, {"fp32": n}, n * 4 * 1.25)
    if key.op == "relu":
        return OpCounts({}, {"fp32": n}, n * 4 * 2)
    if key.op == "add_relu":
        return OpCounts({}, {"fp32": 2 * n}, n * 4 * 3)
    if key.op == "head":
        return OpCounts({"fp32": float(b * c * k)}, {"fp32": n}, n * 4 + c * k * 4)
    raise LatencyError(f"unknown op {key.op!r}")


# -- profiles ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Profile:
    """A device's throughputs (see the module doc for how they combine)."""

    name: str
    gemm_macs_per_s: dict[str, float]
    elementwise_ops_per_s: dict[str, float]
    memory_bytes_per_s: float
    op_overhead_s: float
    description: str = ""

    @classmethod
    def from_dict(cls, data: Any, source: str = "profile") -> Profile:
        if not isinstance(data, Mapping):
            raise LatencyError(f"{source}: expected a mapping with keys {list(_PROFILE_KEYS)}")
        unknown = sorted(set(data) - set(_PROFILE_KEYS))
        if unknown:
            raise LatencyError(
                f"{source}: unknown key {unknown[0]!r}; allowed: {list(_PROFILE_KEYS)}"
            )
        missing = [k for k in _PROFILE_KEYS[2:] if k not in data]
        if missing:
            raise LatencyError(f"{source}: missing key {missing[0]!r}")

        def rate(value: Any, where: str, *, zero_ok: bool = False) -> float:
            try:
                v = float(value)
            except (TypeError, ValueError):
                raise LatencyError(f"{source}: {where}: {value!r} is not a number") from None
            if math.isnan(v) or v < 0 or (v == 0 and not zero_ok):
                raise LatencyError(
                    f"{source}: {where}: {value!r} must be {'>= 0' if zero_ok else 'positive'}"
                )
            return v

        tables = {}
        for key in ("gemm_macs_per_s", "elementwise_ops_per_s"):
            table = data[key]
            if not isinstance(table, Mapping):
                raise LatencyError(
                    f"{source}: {key}: expected a mapping {{fp32: ..., int8: ..., int16: ...}}}}"
                )
            bad = sorted(set(map(str, table)) - set(PRECISIONS))
            if bad:
                raise LatencyError(
                    f"{source}: {key}: unknown key {bad[0]!r}; allowed: {list(PRECISIONS)}"
                )
            absent = [p for p in PRECISIONS if p not in table]
            if absent:
                raise LatencyError(f"{source}: {key}: missing key {absent[0]!r}")
            tables[key] = {p: rate(table[p], f"{key}.{p}") for p in PRECISIONS}
        return cls(
            name=str(data.get("name", source)),
            gemm_macs_per_s=tables["gemm_macs_per_s"],
            elementwise_ops_per_s=tables["elementwise_ops_per_s"],
            memory_bytes_per_s=rate(data["memory_bytes_per_s"], "memory_bytes_per_s"),
            op_overhead_s=rate(data["op_overhead_s"], "op_overhead_s", zero_ok=True),
            description=str(data.get("description", "")),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "gemm_macs_per_s": dict(self.gemm_macs_per_s),
            "elementwise_ops_per_s": dict(self.elementwise_ops_per_s),
            "memory_bytes_per_s": self.memory_bytes_per_s,
            "op_overhead_s": self.op_overhead_s,
        }

    def coefficients(self) -> np.ndarray:
        """Seconds per unit of each of :data:`FEATURES`."""
        return np.array(
            [self.op_overhead_s]
            + [_inverse(self.gemm_macs_per_s[p]) for p in PRECISIONS]
            + [_inverse(self.elementwise_ops_per_s[p]) for p in PRECISIONS]
            + [_inverse(self.memory_bytes_per_s)],
            dtype=np.float64,
        )

    def seconds(self, counts: OpCounts) -> float:
        return float(counts.features() @ self.coefficients())

    def save(self, path: str | os.PathLike, *, header: str = "") -> Path:
        """Write the profile as YAML, atomically (temporary file, then rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if header:
            text = "".join(f"# {line}\n" for line in header.splitlines()) + text
        atomic_write_text(path, text)
        return path


def _inverse(rate: float) -> float:
    """Seconds per unit of a throughput; an infinite throughput (fitted as free) costs 0."""
    return 0.0 if math.isinf(rate) else 1.0 / rate


def available_profiles() -> list[str]:
    """Names of the profiles shipped in ``wasearch/latency/profiles``."""
    root = resources.files("wasearch.latency") / "profiles"
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))


def load_profile(name_or_path: str | os.PathLike) -> Profile:
    """A shipped profile by name (``cortex-a73``) or a profile YAML file by path."""
    text_name = str(name_or_path)
    if not text_name.endswith((".yaml", ".yml")) and os.sep not in text_name:
        root = resources.files("wasearch.latency") / "profiles"
        entry = root / f"{text_name}.yaml"
        if not entry.is_file():
            raise LatencyError(
                f"unknown device profile {text_name!r}; shipped: "
                f"{', '.join(available_profiles())} (or give a .yaml path)"
            )
        text, source = entry.read_text(encoding="utf-8"), text_name
    else:
        source = str(Path(name_or_path))
        try:
            text = read_text(name_or_path, what="profile")
        except InputFileError as err:
            raise LatencyError(str(err)) from None
    try:
        data = parse_yaml(text, source=source)
    except InputFileError as err:
        raise LatencyError(str(err)) from None
    return Profile.from_dict(data, source)


class AnalyticalModel(LatencyModel):
    """Prices operations from their counts and a device :class:`Profile`; all estimated."""

    kind = "analytical"

    def __init__(self, profile: Profile | str | os.PathLike, *, batch: int = 1) -> None:
        super().__init__(batch=batch)
        self.profile = profile if isinstance(profile, Profile) else load_profile(profile)

    def describe(self) -> str:
        return f"analytical ({self.profile.name})"

    def _op_cost(self, key: OpKey) -> tuple[float, bool]:
        return self.profile.seconds(op_counts(key)), True


# -- calibration ---------------------------------------------------------------------------------
def _nnls(A: np.ndarray, y: np.ndarray, *, max_iter: int = 500) -> np.ndarray:
    """Non-negative least squares, min ||A x - y|| with x >= 0 (Lawson & Hanson, 1974)."""
    n = A.shape[1]
    x = np.zeros(n)
    passive = np.zeros(n, dtype=bool)
    for _ in range(max_iter):
        grad = A.T @ (y - A @ x)
        free = ~passive & (grad > 1e-12 * max(1.0, float(np.abs(grad).max())))
        if not free.any():
            break
        passive[np.argmax(np.where(free, grad, -np.inf))] = True
        while True:
            z = np.zeros(n)
            z[passive] = np.linalg.lstsq(A[:, passive], y, rcond=None)[0]
            if (z[passive] > 0).all():
                x = z
                break
            neg = passive & (z <= 0)
            alpha = np.min(x[neg] / (x[neg] - z[neg]))
            x = x + alpha * (z - x)
            passive &= x > 1e-15
            x[~passive] = 0.0
    return x


@dataclass(frozen=True)
class FitReport:
    """How well a calibrated profile reproduces the table it was fitted to."""

    rows: int
    mape: float  # mean absolute percentage error
    worst: float  # largest absolute percentage error
    worst_row: str
    per_op: dict[str, float]  # MAPE per op kind
    unfitted: tuple[str, ...]  # features with no data, carried over from the base profile

    def format(self) -> str:
        lines = [
            f"fit on {self.rows} rows: MAPE {self.mape:.1%}, worst {self.worst:.1%} "
            f"({self.worst_row})"
        ]
        lines += [f"  {op:<10} MAPE {v:.1%}" for op, v in sorted(self.per_op.items())]
        if self.unfitted:
            lines.append(
                "  no data for " + ", ".join(self.unfitted) + ": scaled from the base "
                "profile's ratios"
            )
        return "\n".join(lines)


def calibrate(
    samples: Iterable[tuple[OpKey, float]],
    *,
    base: Profile | str = "cortex-a73",
    name: str = "calibrated",
) -> tuple[Profile, FitReport]:
    """Fit a profile to measured ``(key, seconds)`` pairs.

    Non-negative least squares on the op-count features, each row weighted by 1 / its time so
    that the fit minimizes relative errors. Features no sample exercises (e.g. ``int16`` GEMMs on
    a machine without such a kernel) keep the base profile's ratio to the nearest fitted
    precision of the same kind (``int16`` GEMM = fitted ``int8`` GEMM x base int16/int8, else
    from ``fp32``), so the result stays on the measured scale.
    """
    base_p = base if isinstance(base, Profile) else load_profile(base)
    pairs = [(k, float(s)) for k, s in samples if float(s) > 0]
    if len(pairs) < 3:
        raise LatencyError(
            f"calibration needs at least 3 timed rows with positive times, got {len(pairs)}"
        )
    X = np.stack([op_counts(k).features() for k, _ in pairs])
    y = np.array([s for _, s in pairs])
    used = X.any(axis=0)
    Xw = X[:, used] / y[:, None]
    scale = np.linalg.norm(Xw, axis=0)
    scale[scale == 0] = 1.0
    coef = np.zeros(len(FEATURES))
    coef[used] = _nnls(Xw / scale, np.ones(len(y))) / scale

    base_coef = base_p.coefficients()
    unfitted = tuple(f for f, u in zip(FEATURES, used, strict=True) if not u)
    nearest = {"fp32": ("int16", "int8"), "int8": ("int16", "fp32"), "int16": ("int8", "fp32")}
    index = {f: i for i, f in enumerate(FEATURES)}
    for group in ("gemm", "ew"):
        for p in PRECISIONS:
            i = index[f"{group}_{p}"]
            if used[i]:
                continue
            refs = [index[f"{group}_{q}"] for q in nearest[p]]
            ref = next((r for r in refs if used[r] and coef[r] > 0 and base_coef[r] > 0), None)
            coef[i] = base_coef[i] if ref is None else coef[ref] * base_coef[i] / base_coef[ref]
    if not used[-1]:
        coef[-1] = base_coef[-1]

    def rate(c: float) -> float:
        return math.inf if c <= 0 else float(f"{1.0 / float(c):.4g}")

    feats = dict(zip(FEATURES, coef, strict=True))
    profile = Profile(
        name=name,
        gemm_macs_per_s={p: rate(feats[f"gemm_{p}"]) for p in PRECISIONS},
        elementwise_ops_per_s={p: rate(feats[f"ew_{p}"]) for p in PRECISIONS},
        memory_bytes_per_s=rate(feats["bytes"]),
        op_overhead_s=float(f"{float(feats['overhead']):.4g}"),
        description=f"fitted to {len(pairs)} measured rows (base ratios: {base_p.name})",
    )
    pred = X @ coef
    err = np.abs(pred - y) / y
    worst = int(np.argmax(err))
    per_op: dict[str, list[float]] = {}
    for (k, _), e in zip(pairs, err, strict=True):
        per_op.setdefault(k.op, []).append(float(e))
    report = FitReport(
        rows=len(pairs),
        mape=float(err.mean()),
        worst=float(err[worst]),
        worst_row=pairs[worst][0].describe(),
        per_op={op: float(np.mean(v)) for op, v in per_op.items()},
        unfitted=unfitted,
    )
    return profile, report
