#!/usr/bin/env python
"""Deploy Winograd kernels against ``torch.nn.functional.conv2d``, per layer geometry.

For every distinct searchable-conv geometry of the ResNet-18-like backbone (width 0.5 and 1.0,
32x32 input) at batch 1 and 32: the median time of F.conv2d (the faster of NCHW and
channels-last inputs, so the baseline is torch's best) and of the deploy Winograd kernels
F2/F4/F6 in float32 (``wasearch.deploy.WinogradConv``), as ratios to conv2d. ``--before`` adds
the training-time ``winograd_conv2d`` (NCHW, Kronecker transforms, weights transformed on every
call) for F4, the kernel before the deploy optimizations. The kernels of one geometry are timed
in interleaved rounds (one call each per round, shuffled), so that load from other processes on
a shared machine hits them alike. Target (issue 3): F4 at or below conv2d's time on layers with
64 or more channels at batch 32 (issue 14: and at batch 1, in float32 and 8-bit). ``--bits 8``
times the int8 kernels instead: the deploy Winograd kernel with its Winograd-domain product on
oneDNN's int8 convolution (input ranges per tile position, calibrated on the input) against
oneDNN's int8 direct convolution on a non-negative (post-ReLU) input. ``--device cuda`` times
them on a GPU (each call synchronized; float32 only).

Prints the machine (``wasearch.latency.timing.machine_line``), a table, then one JSON line of
figures (with the machine line in it).

    python benchmarks/kernels.py                      # CPU, 1 thread
    python benchmarks/kernels.py --device cuda        # a GPU
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import sys
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from wasearch.deploy import DirectConv, WinogradConv, int8_available, winograd_input_tiles
from wasearch.latency.timing import Timing, device_identity, machine_line
from wasearch.models import searchable_convs
from wasearch.winograd import transform_matrices, winograd_conv2d


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--widths", type=float, nargs="+", default=[0.5, 1.0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    p.add_argument("--tiles", type=int, nargs="+", default=[2, 4, 6])
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: the 2 cores here are shared)",
    )
    p.add_argument("--repeats", type=int, default=9, help="timed rounds (one call per kernel)")
    p.add_argument(
        "--stat",
        choices=("median", "min", "mean"),
        default="median",
        help="statistic of the samples (default: median)",
    )
    p.add_argument(
        "--before",
        action="store_true",
        help="also time the training-time winograd_conv2d (F4) as 'before'",
    )
    p.add_argument(
        "--transforms",
        choices=("auto", "fused", "kron", "separable"),
        default="auto",
        help="2-D transform form of the deploy kernel (default: auto)",
    )
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, ...")
    p.add_argument(
        "--bits",
        choices=("fp32", "8"),
        default="fp32",
        help="fp32 (default): float kernels against F.conv2d; 8: the int8 kernels (Winograd-"
        "domain product on oneDNN's int8 convolution) against oneDNN's int8 direct convolution",
    )
    return p


def machine_header(machine: str, load: float) -> str:
    """The line printed above the table: the machine the figures were measured on
    (:func:`machine_line`), and whether other work shared its cores at the start."""
    return f"# machine: {machine}" + (
        " (> 1.5 at start: the cores were shared, times are noisy)" if load > 1.5 else ""
    )


def interleaved(
    fns: dict[str, Callable[[], object]],
    *,
    repeats: int,
    rng: random.Random,
    sync: Callable[[], None] = lambda: None,
) -> dict[str, Timing]:
    """One call of every kernel per round, in a shuffled order, ``repeats`` rounds: on a shared
    machine a burst of load then hits every kernel alike, not the one timed at that moment.
    ``sync`` waits for the device (``torch.cuda.synchronize`` on a GPU) before a clock read."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    with torch.inference_mode():
        for fn in fns.values():  # warm-up: oneDNN primitives, caches, allocator
            fn()
            fn()
        sync()
        for _ in range(repeats):
            rng.shuffle(names)
            for name in names:
                t0 = time.perf_counter()
                fns[name]()
                sync()
                samples[name].append(time.perf_counter() - t0)
    return {name: Timing(tuple(v)) for name, v in samples.items()}


def geometries(widths: Sequence[float]) -> list[tuple[float, int, int, int]]:
    seen: dict[tuple[float, int, int, int], None] = {}
    for w in widths:
        for s in searchable_convs("resnet18", w, 32):
            seen[(w, s.in_channels, s.out_channels, s.height)] = None
    return list(seen)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    load = os.getloadavg()[0]
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"--device {args.device}: CUDA is not available here", file=sys.stderr)
        return 2
    int8 = args.bits == "8"
    if int8 and (device.type != "cpu" or not int8_available()):
        print(
            f"--bits 8: no int8 convolution kernel on {args.device} with this torch build",
            file=sys.stderr,
        )
        return 2
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    ident = device_identity(device, threads=args.threads)
    machine = machine_line(device, threads=args.threads)
    print(machine_header(machine, load))
    cols = [f"F{t}" for t in args.tiles] + (["F4 before"] if args.before else [])
    print(
        f"{'width':>5} {'batch':>5} {'C->K @HxW':<16} {'conv2d ms':>10} "
        + " ".join(f"{c:>10}" for c in cols)
        + f"   (ratio to conv2d, {args.stat} of {args.repeats}; < 1 is faster)"
    )
    results = []
    t_start = time.perf_counter()
    order = random.Random(0)
    for batch in args.batches:
        for width, c, k, h in geometries(args.widths):
            x = torch.randn(batch, c, h, h, device=device)
            if int8:  # a network's direct convolutions read post-ReLU (non-negative) inputs
                x = x.relu()
            xl = x.contiguous(memory_format=torch.channels_last)
            w = torch.randn(k, c, 3, 3, device=device) / (3 * c**0.5)
            b = torch.randn(k, device=device)
            if int8:
                direct = DirectConv(w, b, padding=1, bits=8, act_amax=float(x.max()))
                fns = {"conv2d_int8": functools.partial(direct, xl)}
            else:
                fns = {
                    "conv2d_nchw": functools.partial(F.conv2d, x, w, b, padding=1),
                    "conv2d_cl": functools.partial(F.conv2d, xl, w, b, padding=1),
                }
            errs = {}
            for m in args.tiles:
                if m > h:
                    continue
                A_t, G, B_t = transform_matrices(m)
                A_t, G, B_t = (t.to(device) for t in (A_t, G, B_t))
                amax = None
                if int8:  # the Winograd-domain input's range per tile position, calibrated
                    a = m + 2
                    v = B_t @ winograd_input_tiles(x, m).reshape(a, -1)
                    amax = torch.matmul(B_t, v.view(a, a, -1)).abs().reshape(a * a, -1).amax(1)
                mod = WinogradConv(
                    w, b, A_t, G, B_t, transform=args.transforms, bits=8 if int8 else None,
                    act_amax=amax,
                ).to(device)  # fmt: skip
                fns[f"F{m}"] = functools.partial(mod, xl)
                with torch.no_grad():
                    ref = F.conv2d(x, w, b, padding=1)
                    errs[f"F{m}"] = float((mod(xl) - ref).abs().max() / ref.abs().max())
            if args.before and h >= 4:
                A_t, G, B_t = (t.to(device) for t in transform_matrices(4))
                fns["F4_before"] = functools.partial(winograd_conv2d, x, w, A_t, G, B_t, bias=b)
            times = interleaved(fns, repeats=args.repeats, rng=order, sync=sync)
            stat = {name: t.stat(args.stat) for name, t in times.items()}
            row = {"width": width, "batch": batch, "in": c, "out": k, "size": h}
            if int8:
                base = row["conv2d_s"] = stat["conv2d_int8"]
            else:
                base = min(stat["conv2d_nchw"], stat["conv2d_cl"])
                row.update(
                    conv2d_s=base,
                    conv2d_nchw_s=stat["conv2d_nchw"],
                    conv2d_cl_s=stat["conv2d_cl"],
                )
            cells = []
            for name in [f"F{m}" for m in args.tiles] + (["F4_before"] if args.before else []):
                if name not in stat:
                    cells.append(f"{'-':>10}")
                    continue
                row[f"{name}_s"], row[f"{name}_ratio"] = stat[name], stat[name] / base
                if name in errs:
                    row[f"{name}_relerr"] = errs[name]
                cells.append(f"{stat[name] / base:>10.2f}")
            results.append(row)
            print(
                f"{width:>5} {batch:>5} {f'{c}->{k} @{h}x{h}':<16} {base * 1e3:>10.3f} "
                + " ".join(cells),
                flush=True,
            )

    met_by_batch = {}
    print()
    for bt in args.batches:
        target = [
            r
            for r in results
            if r["batch"] == bt and min(r["in"], r["out"]) >= 64 and "F4_ratio" in r
        ]
        met = [r for r in target if r["F4_ratio"] <= 1.0]
        met_by_batch[str(bt)] = f"{len(met)}/{len(target)}"
        print(
            f"F4 <= {'int8 direct' if int8 else 'conv2d'} on {len(met)} of {len(target)} layers "
            f"with >= 64 channels at batch {bt}"
            + (
                ""
                if len(met) == len(target)
                else "; not on: "
                + ", ".join(
                    f"w{r['width']} {r['in']}->{r['out']}@{r['size']} ({r['F4_ratio']:.2f}x)"
                    for r in target
                    if r["F4_ratio"] > 1.0
                )
            )
        )
    summary = {
        "benchmark": "kernels",
        "machine": machine,
        "device": ident["device"],
        "threads": args.threads,
        "torch": ident["torch"],
        "load_average_start": round(load, 2),
        "shared_cores": load > 1.5,
        "transforms": args.transforms,
        "stat": args.stat,
        "repeats": args.repeats,
        "bits": args.bits,
        "f4_target_met": met_by_batch,
        "seconds": round(time.perf_counter() - t_start, 1),
        "rows": [
            {k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.items()}
            for r in results
        ],
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
