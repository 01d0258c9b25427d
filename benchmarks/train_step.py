#!/usr/bin/env python
"""Time full training steps (forward, backward, Adam) of a network, per configuration.

The network is the paper's ResNet-18-like (``--width``, 32x32), or any shipped space's model
(``--space spaces/X.yaml``: its model reference, input size and classes). Each configuration
runs in a fresh subprocess so that its peak memory (peak RSS on the CPU,
``torch.cuda.max_memory_allocated`` on CUDA) is its own. Prints the machine, a table, then one
JSON line.

    python benchmarks/train_step.py                      # width 0.5, batch 32, CPU
    python benchmarks/train_step.py --steps 10 --configs normal8 flex4
    python benchmarks/train_step.py --space spaces/example_fullres.yaml --configs normal8 flex4
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

CONFIGS = {
    "normal_fp32": ("normal", None, None),
    "normal8": ("normal", None, 8),
    "static4": ("static", 4, 8),
    "flex2": ("flex", 2, 8),
    "flex4": ("flex", 4, 8),
    "flex6": ("flex", 6, 8),
}
LABELS = {
    "normal_fp32": "normal FP32",
    "normal8": "normal 8-bit",
    "static4": "static F4 8-bit",
    "flex2": "flex F2 8-bit",
    "flex4": "flex F4 8-bit",
    "flex6": "flex F6 8-bit",
}


def _network(space_path: str | None, width: float) -> dict:
    """The keyword arguments of ``Arch.uniform`` for the network measured."""
    if space_path is None:
        return {"width": width}
    from wasearch.search import load_space

    space = load_space(space_path)
    net = {
        "model": space.model_ref,
        "num_classes": space.num_classes,
        "input_size": space.input_size,
    }
    if space.model_ref.is_paper:
        net.update(backbone=space.model["backbone"], width=float(space.model["width"]))
    return net


def _child(
    name: str,
    width: float,
    batch: int,
    steps: int,
    warmup: int,
    device: str,
    threads: int | None,
    space: str | None = None,
) -> dict:
    import torch

    if threads:
        torch.set_num_threads(threads)
    from wasearch.arch import Arch
    from wasearch.models import build

    torch.manual_seed(0)
    conv, tile, bits = CONFIGS[name]
    net = _network(space, width)
    arch = Arch.uniform(conv, tile, bits, **net)
    model = build(arch).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=4e-5)
    size = arch.input_size
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, arch.num_classes, (batch,), device=device)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(warmup + steps):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB (Linux: KiB)
    gpu_peak = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None
    return {
        "step_s": statistics.median(times),
        "step_min_s": min(times),
        "images_per_s": batch / statistics.median(times),
        "peak_rss_mib": peak,
        "rss_before_steps_mib": rss_before,
        "gpu_peak_mib": gpu_peak,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    p.add_argument("--width", type=float, default=0.5)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=7, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's, all cores)")
    p.add_argument("--space", help="measure this space's model (default: the paper's network)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        res = _child(
            args.child,
            args.width,
            args.batch,
            args.steps,
            args.warmup,
            args.device,
            args.threads,
            args.space,
        )
        print(json.dumps(res))
        return 0

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from wasearch.latency.timing import machine_line

    load = os.getloadavg()[0]

    network = (
        f"ResNet-18-like width {args.width}, 32x32" if args.space is None else f"{args.space}"
    )
    print(f"# {network}, batch {args.batch}, device {args.device}")
    print(f"# machine: {machine_line(args.device, threads=args.threads)}")
    results = {}
    for name in args.configs:
        cmd = [
            sys.executable,
            __file__,
            "--child",
            name,
            "--width",
            str(args.width),
            "--batch",
            str(args.batch),
            "--steps",
            str(args.steps),
            "--warmup",
            str(args.warmup),
            "--device",
            args.device,
        ]
        cmd += ["--threads", str(args.threads)] if args.threads else []
        cmd += ["--space", args.space] if args.space else []
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        results[name] = json.loads(out.stdout.strip().splitlines()[-1])
    base = results.get("normal8")
    header = (
        f"{'config':18s} {'step s':>8s} {'img/s':>8s} {'peak MiB':>9s} {'x time':>7s} "
        f"{'x mem':>6s}"
    )
    print(header)
    print("-" * len(header))
    for name, r in results.items():
        mem = r["gpu_peak_mib"] if r["gpu_peak_mib"] is not None else r["peak_rss_mib"]
        if base:
            base_mem = base["gpu_peak_mib"] or base["peak_rss_mib"]
            r["time_vs_normal8"] = r["step_s"] / base["step_s"]
            r["mem_vs_normal8"] = mem / base_mem
            ratio = f"{r['time_vs_normal8']:7.2f} {r['mem_vs_normal8']:6.2f}"
        else:
            ratio = ""
        print(f"{LABELS[name]:18s} {r['step_s']:8.3f} {r['images_per_s']:8.1f} {mem:9.0f} {ratio}")
    if os.getloadavg()[0] > 1.5 or load > 1.5:
        print("# note: other work shared the cores during this run (load average > 1.5)")
    summary = {
        "benchmark": "train_step",
        "width": args.width,
        "batch": args.batch,
        "device": args.device,
        "load_avg_start": load,
        "space": args.space,
        "machine": machine_line(args.device, threads=args.threads),
        "results": results,
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
