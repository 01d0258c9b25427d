"""Latency models: what a network costs on a target device, layer by layer and end to end.

Three implementations behind one interface (:class:`LatencyModel`): ``analytical`` (operation
counts and a device profile), ``table`` (any CSV in the documented schema) and ``measured`` (a
table of the deploy kernels timed on this machine, extended on demand). Build one from a search
space's ``latency:`` mapping with :func:`load_latency_model`; see docs/latency.md.
``search.py measure`` builds the table of a space parsed by :func:`wasearch.search.load_space`
(:meth:`MeasurePlan.for_space`).
"""

from __future__ import annotations

from .analytical import (
    AnalyticalModel,
    FitReport,
    OpCounts,
    Profile,
    available_profiles,
    calibrate,
    load_profile,
    op_counts,
    transform_ops,
)
from .base import LatencyEntry, LatencyError, LatencyModel, LatencyReport, format_latency_table
from .factory import MODEL_KEYS, load_latency_model
from .measure import MeasuredModel, measure_plan, measure_table
from .ops import NetOp, OpKey, conv_key, network_ops
from .plan import MeasurePlan, comparison_table
from .table import LatencyTable, Row, TableModel
from .timing import NetworkTimer, device_identity, time_callable, time_network_ops

__all__ = [
    "MODEL_KEYS",
    "AnalyticalModel",
    "FitReport",
    "LatencyEntry",
    "LatencyError",
    "LatencyModel",
    "LatencyReport",
    "LatencyTable",
    "MeasurePlan",
    "MeasuredModel",
    "NetOp",
    "NetworkTimer",
    "OpCounts",
    "OpKey",
    "Profile",
    "Row",
    "TableModel",
    "available_profiles",
    "calibrate",
    "comparison_table",
    "conv_key",
    "device_identity",
    "format_latency_table",
    "load_latency_model",
    "load_profile",
    "measure_plan",
    "measure_table",
    "network_ops",
    "op_counts",
    "time_callable",
    "time_network_ops",
    "transform_ops",
]
