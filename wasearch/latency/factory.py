"""``load_latency_model``: a latency model from the dict a search space names it with."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from .analytical import AnalyticalModel
from .base import LatencyError, LatencyModel
from .measure import MeasuredModel
from .table import TableModel

__all__ = ["MODEL_KEYS", "load_latency_model"]

#: Keys each kind accepts (``kind`` and ``batch`` always).
MODEL_KEYS: dict[str, tuple[str, ...]] = {
    "analytical": ("profile",),
    "table": ("path", "fallback", "base_profile", "context"),
    "measured": (
        "path",
        "device",
        "threads",
        "repeats",
        "measure_missing",
        "fallback",
        "base_profile",
        "context",
    ),
}


def load_latency_model(spec: Mapping[str, Any] | str | os.PathLike) -> LatencyModel:
    """Build a latency model.

    ``spec`` is a mapping (the ``latency:`` section of a search space)::

        {kind: analytical, profile: cortex-a73, batch: 1}
        {kind: table, path: phone.csv, fallback: cortex-a73}
        {kind: measured, path: results/latency/cpu.csv, threads: 1}

    or a string: a shipped profile name (``cortex-a53``), a profile ``.yaml`` path or a table
    ``.csv`` path. Keys (unknown ones are rejected, naming the key):

    * ``kind``: ``analytical`` | ``table`` | ``measured`` (required in a mapping);
    * ``batch``: the batch ``price`` uses by default (1);
    * ``profile`` (analytical): shipped name or YAML path (``cortex-a73``);
    * ``path`` (table: required; measured: default ``results/latency/<machine>-<threads>t.csv``);
    * ``fallback`` (table, measured): a profile for rows the table lacks (bit-widths without a
      kernel, unmeasured batches), ``calibrate`` to fit one to the table, or null to refuse such
      rows (default: table null, measured ``calibrate``);
    * ``base_profile`` (table, measured): the profile whose ratios fill what calibration cannot
      see (``cortex-a73``);
    * ``context`` (table, measured): price each operation with the table's row in its context
      (what ran before it) where the table has one (true), or with the pooled rows only;
    * ``device`` (measured): ``cpu`` | ``cuda``; ``threads``: torch threads while timing;
      ``repeats``: timed samples per row (15); ``measure_missing``: time rows the table lacks on
      first use (true).
    """
    if isinstance(spec, str | os.PathLike):
        text = str(spec)
        if text.endswith(".csv"):
            return TableModel(text)
        return AnalyticalModel(text)
    if not isinstance(spec, Mapping):
        raise LatencyError(
            f"latency model: expected a mapping with a 'kind' or a string, got {spec!r}"
        )
    kind = spec.get("kind")
    if kind not in MODEL_KEYS:
        raise LatencyError(
            f"latency: kind {kind!r} is unknown; use one of {', '.join(MODEL_KEYS)}"
        )
    allowed = ("kind", "batch") + MODEL_KEYS[kind]
    unknown = sorted(set(spec) - set(allowed))
    if unknown:
        raise LatencyError(
            f"latency: unknown key {unknown[0]!r} for kind {kind!r}; allowed: {', '.join(allowed)}"
        )
    batch = spec.get("batch", 1)
    if kind == "analytical":
        return AnalyticalModel(spec.get("profile", "cortex-a73"), batch=batch)
    if not isinstance(spec.get("context", True), bool):
        raise LatencyError(f"latency: context {spec['context']!r} must be true or false")
    opts = {k: spec[k] for k in ("fallback", "base_profile", "context") if k in spec}
    if kind == "table":
        if "path" not in spec:
            raise LatencyError("latency: kind 'table' needs a 'path' to a CSV table")
        return TableModel(spec["path"], batch=batch, **opts)
    opts.update(
        {k: spec[k] for k in ("device", "threads", "repeats", "measure_missing") if k in spec}
    )
    return MeasuredModel(spec.get("path"), batch=batch, **opts)
