"""``search.py measure`` and ``search.py calibrate``: build a latency table, fit a profile to one.

Thin: parse, call the library, print. User mistakes raise ``wasearch.cli.UserError`` (one line,
exit code 2, through ``run_main``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from ..cli import UserError

__all__ = ["register"]


def register(subparsers: Any) -> None:
    """Add the ``measure`` and ``calibrate`` sub-commands to ``subparsers``."""
    p = subparsers.add_parser(
        "measure",
        help="time every (layer geometry x candidate) of a search space on this machine",
        description="Time the deploy kernels of every operation a search space can produce "
        "(searchable convs for each allowed conv/tile/bits, and the fixed parts), in place in "
        "uniform deploy networks and ones alternating direct and Winograd layers, and write a "
        "latency table (CSV). An existing table is "
        "extended; present rows are kept unless --remeasure.",
    )
    p.add_argument(
        "space",
        help="search space YAML, validated as `search.py run` does (reads model:, "
        "choices:, latency:)",
    )
    p.add_argument(
        "--device", choices=("cpu", "cuda"), default="cpu", help="where to time (default: cpu)"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads while timing (default: torch's, here %(default)s"
        " = all cores)",
    )
    p.add_argument(
        "--out",
        default=None,
        help="table CSV (default: the space's latency.path, else "
        "results/latency/<machine>-<threads>t.csv)",
    )
    p.add_argument(
        "--remeasure", action="store_true", help="time again the rows the table already has"
    )
    p.add_argument(
        "--batch",
        type=int,
        default=None,
        help="images per call (default: the space's latency.batch, else 1)",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=15,
        help="timed forward passes per network; a row keeps the median of its "
        "samples (default: 15)",
    )
    p.add_argument(
        "--stat",
        choices=("median", "mean", "min"),
        default="median",
        help="what a row keeps of its samples: median (robust; default), mean (adds up to a "
        "network's mean when other processes interrupt), min (uninterrupted time)",
    )
    p.set_defaults(func=_measure)

    c = subparsers.add_parser(
        "calibrate",
        help="fit an analytical device profile to a measured latency table",
        description="Fit the analytical model's throughputs (non-negative least squares on the "
        "operation counts, relative errors) to a latency table and write a profile YAML.",
    )
    c.add_argument("table", help="latency table CSV (e.g. from search.py measure)")
    c.add_argument("--out", required=True, help="profile YAML to write")
    c.add_argument(
        "--base",
        default="cortex-a73",
        help="profile whose ratios fill precisions the table lacks (default: %(default)s)",
    )
    c.add_argument("--name", default=None, help="profile name (default: the output's stem)")
    c.set_defaults(func=_calibrate)


def _measure(args: argparse.Namespace) -> int:
    import torch

    from .. import deploy
    from ..search.space import load_space
    from .measure import measure_plan
    from .plan import MeasurePlan, comparison_table
    from .table import LatencyTable, TableModel
    from .timing import device_identity, device_slug

    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads {args.threads}: must be >= 1")
    if args.repeats < 1:
        raise UserError(f"--repeats {args.repeats}: must be >= 1")
    if args.batch is not None and args.batch < 1:
        raise UserError(f"--batch {args.batch}: must be >= 1")
    # The one parser: every mistake in the space is one line naming the file and the key. The
    # table may not exist yet: this command builds it.
    space = load_space(args.space, require_latency_table=False)
    plan = MeasurePlan.for_space(space)
    batch = args.batch or plan.batch
    out = args.out
    if out is None and plan.latency.get("kind") in ("measured", "table"):
        out = plan.latency.get("path")
    if out is None:
        out = str(
            Path("results", "latency", f"{device_slug(args.device, threads=args.threads)}.csv")
        )
    out_path = Path(out)
    table = LatencyTable.read(out_path) if out_path.exists() else LatencyTable(source=str(out))

    keys = plan.keys(batch=batch)
    ident = device_identity(args.device, threads=args.threads)
    present = sum(1 for k in keys if k in table)
    print(
        f"device: {ident['device']}, {ident['cores']} cores, {ident['threads']} threads, "
        f"torch {ident['torch']}"
    )
    print(
        f"space {args.space}: "
        f"{f'{plan.backbone} x{plan.width}' if plan.model.is_paper else plan.model.text} "
        f"@{plan.input_size}, "
        f"batch {batch}: {len(keys)} operations, {present} already in {out}"
    )
    t0 = time.perf_counter()
    try:
        table, untimed = measure_plan(
            plan,
            table=table,
            batch=batch,
            remeasure=args.remeasure,
            device=args.device,
            threads=args.threads,
            repeats=args.repeats,
            stat=args.stat,
            progress=True,
        )
    finally:
        if len(table):
            table.write(out_path)  # keep what was timed, even when interrupted
    print(
        f"timed in {time.perf_counter() - t0:.1f} s; {len(table)} rows in {out_path} "
        f"({table.rows_in_context} of them in context: after a direct or a Winograd layer)"
    )
    print()
    fallback = "calibrate" if len(table) >= 3 else None
    model = TableModel(table, batch=batch, fallback=fallback)
    print(comparison_table(model, plan, batch=batch))
    if untimed:
        widths = sorted({k.bits for k in untimed}, key=lambda b: b or 0)
        dev = torch.device(args.device).type
        print(
            f"\n* {', '.join(f'{b}-bit' for b in widths)}: no integer kernel on this {dev} "
            f"(int8 here: {'yes' if deploy.int8_available() else 'no'}); "
            f"{len(untimed)} operations not timed, priced by the analytical model "
            "calibrated on this table and flagged estimated"
        )
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    from .analytical import calibrate
    from .table import LatencyTable, table_rows_as_samples

    table = LatencyTable.read(args.table)
    name = args.name or Path(args.out).stem
    profile, report = calibrate(table_rows_as_samples(table), base=args.base, name=name)
    ident = table.identity()
    header = (
        f"fitted by `search.py calibrate` to {args.table} ({report.rows} rows)\n"
        f"device: {ident.get('device', '?')}, threads {ident.get('threads', '?')}, "
        f"torch {ident.get('torch', '?')}\n"
        f"fit: MAPE {report.mape:.1%}, worst {report.worst:.1%} ({report.worst_row})\n"
        + (
            f"not measured ({', '.join(report.unfitted)}): scaled by the ratios of {args.base}\n"
            if report.unfitted
            else ""
        )
        + ".inf means the fit found that term negligible"
    )
    profile.save(args.out, header=header)
    print(report.format())
    print(f"wrote {args.out}")
    return 0
