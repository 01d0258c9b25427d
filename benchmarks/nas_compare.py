#!/usr/bin/env python
"""Optuna's front against the differentiable sweep's points, on one space and the same data.

Runs ``search.py run`` twice in a scratch results folder: the Optuna space (default
``spaces/quick.yaml``) and its differentiable twin (default ``spaces/quick_dnas.yaml``; same model,
data, base, trial budget, choices and latency model). Both studies get the same base checkpoint
(trained once, copied), so the compute compared is the search's own: Optuna's sampled and
reference trials against the sweep's supernets and fine-tunes (its reference trials are left out
of its compute and of its points). For every differentiable point it reports the accuracy of the
Optuna front at that latency (the best front accuracy at a latency no larger) and the gap.

    python benchmarks/nas_compare.py [--optuna-space S] [--dnas-space S] [--out DIR]

The gap is the Optuna front's accuracy minus the point's (accuracy points; negative: the point
is better); a point faster than every Optuna front point is dominated by none of them and counts
as on the front. The differentiable points' weights also saw the supernet's epochs, so at equal
trial budget they have had more training than an Optuna trial: read accuracy gaps with that in
mind. Prints the machine (``wasearch.latency.timing.machine_line``, taken at the start; its
threads are what ``search.py run`` picks by default then), a table, then one JSON line (with
the machine).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(space: Path, results: Path) -> float:
    t0 = time.perf_counter()
    cmd = [
        sys.executable,
        str(ROOT / "search.py"),
        "run",
        str(space),
        "--results",
        str(results),
        "--no-progress",
        "--no-report",
    ]
    subprocess.run(cmd, check=True, cwd=ROOT)
    return time.perf_counter() - t0


def _load(results: Path, name: str):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    db = results / name / "study.db"
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{db}")
    return [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]


def _front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """(latency, accuracy) points not dominated by any other (lower latency, higher accuracy)."""
    front = []
    for lat, acc in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or acc > front[-1][1]:
            front.append((lat, acc))
    return front


def machine_header() -> str:
    """The machine line printed above the table: this machine, with the device and the torch
    threads that ``search.py run`` picks by default now (``--device auto``,
    :func:`default_threads`)."""
    from wasearch.engine import select_device
    from wasearch.latency.timing import machine_line
    from wasearch.search.base import default_threads

    return f"# machine: {machine_line(select_device('auto'), threads=default_threads())}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--optuna-space", default=str(ROOT / "spaces" / "quick.yaml"))
    p.add_argument("--dnas-space", default=str(ROOT / "spaces" / "quick_dnas.yaml"))
    p.add_argument("--out", help="results folder to keep (default: a temporary one)")
    args = p.parse_args(argv)

    from wasearch.fileio import load_yaml
    from wasearch.stats import trial_se

    load = os.getloadavg()[0]
    machine = machine_header()  # at the start: the load the searches began under
    results = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="nas_compare_"))
    o_name = load_yaml(args.optuna_space, what="space file")["name"]
    d_name = load_yaml(args.dnas_space, what="space file")["name"]
    # One base for both: pretrain under the Optuna study, copy it to the other.
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "search.py"),
            "pretrain",
            args.optuna_space,
            "--results",
            str(results),
        ],
        check=True,
        cwd=ROOT,
    )
    if not (results / d_name / "base").exists():
        shutil.copytree(results / o_name / "base", results / d_name / "base")
    o_wall = _run(Path(args.optuna_space), results)
    d_wall = _run(Path(args.dnas_space), results)

    optuna_trials = _load(results, o_name)
    dnas_trials = [
        t for t in _load(results, d_name) if t.user_attrs.get("source") == "differentiable"
    ]
    o_front = _front([(t.user_attrs["latency_ms"], t.values[0]) for t in optuna_trials])
    o_compute = sum(t.user_attrs.get("train_seconds", 0.0) for t in optuna_trials)
    d_compute = sum(t.user_attrs.get("train_seconds", 0.0) for t in dnas_trials)

    print(
        f"# spaces {args.optuna_space} vs {args.dnas_space}; results in {results}; "
        f"load average {load:.2f}"
    )
    print(machine)
    print(
        f"Optuna: {len(optuna_trials)} trials, front {len(o_front)} points, "
        f"{o_compute:.0f} s of trial compute ({o_wall:.0f} s wall incl. start-up)"
    )
    print(
        f"differentiable: {len(dnas_trials)} points, {d_compute:.0f} s of search compute "
        f"({d_wall:.0f} s wall incl. its reference trials)"
    )
    print(
        f"{'lambda':>7} {'latency ms':>11} {'acc':>7} {'± SE':>7} {'Optuna front acc':>17} "
        f"{'gap':>7}  arch"
    )
    rows = []
    for t in sorted(dnas_trials, key=lambda t: t.user_attrs["lambda"]):
        lat, acc = t.user_attrs["latency_ms"], t.values[0]
        se = trial_se(t.user_attrs)  # binomial, from the trial's validation images
        reach = [a for latency, a in o_front if latency <= lat * 1.0001]
        ref = max(reach) if reach else None
        # No Optuna front point is as fast: nothing of Optuna's dominates it, it extends the front.
        gap = None if ref is None else (ref - acc) * 100
        status = "faster than the whole Optuna front" if ref is None else f"{gap:+.1f}"
        rows.append(
            {
                "lambda": t.user_attrs["lambda"],
                "latency_ms": lat,
                "accuracy": acc,
                "accuracy_se": se,
                "optuna_front_accuracy": ref,
                "gap_points": gap,
                "on_or_within_1": ref is None or gap <= 1.0,
                "arch": t.user_attrs["arch_summary"],
            }
        )
        print(
            f"{t.user_attrs['lambda']:7g} {lat:11.3f} {acc:7.4f} "
            f"{'-' if se is None else f'{se:.4f}':>7} "
            f"{'-' if ref is None else f'{ref:.4f}':>17} {status:>7}  "
            f"{t.user_attrs['arch_summary']}"
        )
    within = [r for r in rows if r["on_or_within_1"]]
    ratio = d_compute / o_compute if o_compute else None
    print(
        f"{len(within)}/{len(rows)} differentiable points on or within 1 accuracy point of "
        f"the Optuna front; compute ratio {ratio:.2f} (target <= 0.20)"
    )
    if load > 1.5:
        print("# note: other work shared the cores during this run (load average > 1.5)")
    print(
        json.dumps(
            {
                "benchmark": "nas_compare",
                "machine": machine.removeprefix("# machine: "),
                "optuna_space": args.optuna_space,
                "dnas_space": args.dnas_space,
                "optuna_trials": len(optuna_trials),
                "optuna_compute_s": o_compute,
                "dnas_compute_s": d_compute,
                "compute_ratio": ratio,
                "points": rows,
                "within_1_point": len(within),
                "load_avg_start": load,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
