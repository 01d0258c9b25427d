#!/usr/bin/env python
"""What the adaptation shortcut buys: wall time per search trial, adapted vs from scratch.

On a space (default ``spaces/quick.yaml``), for each of its reference architectures (and
``--random N`` sampled ones):

* adapted: initialize from the space's shared base and fine-tune for the trial budget, as
  ``search.py run`` does; record the validation accuracy reached and the wall time;
* from scratch: train the same architecture with the base's recipe, epoch by epoch, until it
  reaches the adapted accuracy, at most ``--scratch-cap`` epochs (reported as capped, and its
  time is then a lower bound).

Prints the machine (``wasearch.latency.timing.machine_line``, at the start), a table, the
trials per hour of both, the base's one-off cost, and last one JSON line (with the machine).

    python benchmarks/search_cost.py [SPACE] [--scratch-cap 8] [--random 0] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


class _Reached(Exception):
    """Raised from ``on_epoch`` when the from-scratch run reaches the target accuracy."""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("space", nargs="?", default=str(REPO / "spaces" / "quick.yaml"))
    p.add_argument("--scratch-cap", type=int, default=8, help="max from-scratch epochs (8)")
    p.add_argument("--random", type=int, default=0, help="also N random architectures (0)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: idle cores)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)

    import torch

    from wasearch.engine import TrainConfig, fit
    from wasearch.latency.timing import machine_line
    from wasearch.models import build
    from wasearch.search.base import default_threads, ensure_base, load_space_data, trial_config
    from wasearch.search.space import load_space
    from wasearch.stats import binomial_se

    threads = args.threads or default_threads()
    torch.set_num_threads(threads)
    load_before = os.getloadavg()
    machine = machine_line(args.device, threads=threads)
    print(f"# machine: {machine}", flush=True)
    space = load_space(args.space)
    data = load_space_data(space)
    candidates = [(name, space.arch(params)) for name, params in space.references()]
    rng = random.Random(space.seed)
    for i in range(args.random):
        params = {u.name: rng.choice(u.labels) for u in space.units}
        candidates.append((f"random-{i}", space.arch(params)))

    with tempfile.TemporaryDirectory(prefix="search_cost_") as tmp:
        study_dir = Path(tmp) / space.name
        t0 = time.perf_counter()
        base = ensure_base(space, study_dir, data=data, device=args.device, progress=False)
        base_s = time.perf_counter() - t0
        trial_cfg = trial_config(space)
        rows = []
        for name, arch in candidates:
            t0 = time.perf_counter()
            adapted = fit(build(arch), data, trial_cfg, device=args.device, init_from=base,
                          progress=False, log=lambda _m: None)  # fmt: skip
            adapt_s = time.perf_counter() - t0
            target = adapted.best_val_acc
            scratch_config = TrainConfig(
                epochs=args.scratch_cap,
                batch_size=space.data["batch_size"],
                lr=space.base["lr"],
                seed=space.seed,
                max_batches_per_epoch=space.base["max_batches"],
            )
            best = {"acc": 0.0, "epoch": 0}

            def on_epoch(row: dict, best=best, target=target) -> None:
                if row["val_acc"] > best["acc"]:
                    best["acc"], best["epoch"] = row["val_acc"], int(row["epoch"])
                if row["val_acc"] >= target:
                    raise _Reached

            t0 = time.perf_counter()
            reached = False
            try:
                fit(build(arch), data, scratch_config, device=args.device, progress=False,
                    log=lambda _m: None, on_epoch=on_epoch)  # fmt: skip
            except _Reached:
                reached = True
            scratch_s = time.perf_counter() - t0
            rows.append(
                {
                    "arch": name,
                    "summary": arch.summary(),
                    "adapt_s": round(adapt_s, 2),
                    "adapt_val_acc": round(target, 4),
                    # binomial standard error of either accuracy (the same validation images)
                    "val_se": round(binomial_se(target, adapted.val_images) or 0.0, 4),
                    "val_images": adapted.val_images,
                    "scratch_s": round(scratch_s, 2),
                    "scratch_epochs": best["epoch"] if reached else args.scratch_cap,
                    "scratch_val_acc": round(best["acc"], 4),
                    "capped": not reached,
                }
            )
            r = rows[-1]
            print(
                f"{name:<12} {r['summary'][:34]:<34} adapted {r['adapt_s']:7.1f} s -> "
                f"{r['adapt_val_acc']:.4f} ± {r['val_se']:.4f} | scratch {r['scratch_s']:7.1f} s, "
                f"{r['scratch_epochs']} ep -> {r['scratch_val_acc']:.4f}"
                + ("  (CAPPED: did not reach it)" if r["capped"] else ""),
                flush=True,
            )

    n = len(rows)
    adapt_mean = sum(r["adapt_s"] for r in rows) / n
    scratch_mean = sum(r["scratch_s"] for r in rows) / n
    budget = space.budget["trials"]
    figures = {
        "space": space.name,
        "machine": machine,
        "torch_threads": threads,
        "loadavg_before": round(load_before[0], 2),
        "loadavg_after": round(os.getloadavg()[0], 2),
        "base_s": round(base_s, 1),
        "trials": n,
        "adapt_s_per_trial": round(adapt_mean, 2),
        "scratch_s_per_trial": round(scratch_mean, 2),
        "scratch_capped": sum(r["capped"] for r in rows),
        "scratch_cap_epochs": args.scratch_cap,
        "speedup": round(scratch_mean / adapt_mean, 2),
        "adapted_trials_per_hour": round(3600 / adapt_mean, 1),
        "scratch_trials_per_hour": round(3600 / scratch_mean, 1),
        f"adapted_trials_per_hour_with_base_over_{budget}": round(
            3600 * budget / (base_s + budget * adapt_mean), 1
        ),
        "rows": rows,
    }
    print(
        f"\n{n} architectures of {space.name}: adapted {adapt_mean:.1f} s/trial "
        f"({figures['adapted_trials_per_hour']} trials/h), from scratch to the same val acc "
        f"{scratch_mean:.1f} s/trial ({figures['scratch_trials_per_hour']} trials/h"
        + (f", {figures['scratch_capped']} capped at {args.scratch_cap} epochs: a lower bound"
           if figures["scratch_capped"] else "")
        + f"); speed-up {figures['speedup']}x; base {base_s:.0f} s once "
        f"({threads} torch thread(s), load {load_before[0]:.2f} -> {figures['loadavg_after']})"
    )  # fmt: skip
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
