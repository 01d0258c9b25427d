#!/usr/bin/env python
"""Time full training steps (forward, backward, Adam) of a network, per configuration.

The network is the paper's ResNet-18-like (``--width``, 32x32), or any shipped space's model
(``--space spaces/X.yaml``: its model reference, input size and classes). Each configuration
runs in a fresh subprocess so that its peak memory (peak RSS on the CPU,
``torch.cuda.max_memory_allocated`` on CUDA) is its own; the processes step in interleaved
rounds (each configuration once per round, the order rotating), and a configuration's time
against normal 8-bit is the median of its per-round ratios, so that a shared machine's slow
minutes fall on every configuration alike. Prints the machine, a table, then one JSON line.

    python benchmarks/train_step.py                      # width 0.5, batch 32, CPU
    python benchmarks/train_step.py --steps 10 --configs normal8 flex4
    python benchmarks/train_step.py --configs normal8 flex4 flex4_tap   # per tap, as the spaces
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

#: Each configuration's layers: ``(conv, tile, bits)``, and for the ``_tap`` ones the shipped
#: CIFAR spaces' quantizers (one Winograd-domain range per tile position, power-of-two
#: transform scales per position) instead of the paper's one range per tensor. The default run
#: measures the paper's; name the ``_tap`` ones to measure what those spaces' trials run.
CONFIGS = {
    "normal_fp32": ("normal", None, None),
    "normal8": ("normal", None, 8),
    "static4": ("static", 4, 8),
    "flex2": ("flex", 2, 8),
    "flex4": ("flex", 4, 8),
    "flex6": ("flex", 6, 8),
    "static4_tap": ("static", 4, 8, "tap"),
    "flex4_tap": ("flex", 4, 8, "tap"),
}
#: What a run measures without ``--configs``.
DEFAULT_CONFIGS = ("normal_fp32", "normal8", "static4", "flex2", "flex4", "flex6")
LABELS = {
    "normal_fp32": "normal FP32",
    "normal8": "normal 8-bit",
    "static4": "static F4 8-bit",
    "flex2": "flex F2 8-bit",
    "flex4": "flex F4 8-bit",
    "flex6": "flex F6 8-bit",
    "static4_tap": "static F4 8-bit, per tap",
    "flex4_tap": "flex F4 8-bit, per tap",
}


#: Suffix of a configuration run with the fused CPU kernels off (``--torch-ops``).
TORCH_OPS = "/torch-ops"
#: Suffix of a configuration run with large tensors on transparent huge pages (``--thp``).
THP = "/thp"
#: Suffix of a configuration run with glibc's default malloc settings (``--glibc-malloc``):
#: every other process keeps freed memory for reuse, as the scripts do (``wasearch.allocator``).
GLIBC = "/glibc-malloc"
#: Each variant's suffix: its label and what it changes in the child's environment (the rest
#: is this process's environment).
VARIANTS = {
    TORCH_OPS: (" (torch ops)", {"WASEARCH_FUSED_KERNELS": "0"}),
    THP: (" (huge pages)", {"THP_MEM_ALLOC_ENABLE": "1"}),
    GLIBC: (" (glibc defaults)", {"WASEARCH_MALLOC": "glibc"}),
}


def _split(name: str) -> tuple[str, str]:
    """``(configuration, variant suffix or "")`` of a measured name."""
    for suffix in VARIANTS:
        if name.endswith(suffix):
            return name.removesuffix(suffix), suffix
    return name, ""


#: The settings a child reports back (its environment's, and the allocator it ran with).
REPORTED_ENV = ("THP_MEM_ALLOC_ENABLE", "WASEARCH_FUSED_KERNELS", "WASEARCH_MALLOC")


def child_env(name: str, base: dict[str, str]) -> dict[str, str]:
    """The environment a measured name's process runs with: ``base`` with its variant's one
    change."""
    variant = _split(name)[1]
    return {**base, **(VARIANTS[variant][1] if variant else {})}


def _label(name: str) -> str:
    base, variant = _split(name)
    return LABELS[base] + (VARIANTS[variant][0] if variant else "")


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


def arch_of(name: str, space: str | None, width: float):
    """The architecture a configuration measures: every searchable layer as ``CONFIGS`` says,
    on the paper's network (``width``) or ``space``'s."""
    from wasearch.arch import Arch

    conv, tile, bits, *tap = CONFIGS[name]
    net = _network(space, width)
    if tap:  # the shipped CIFAR spaces' quantizers
        net.update(granularity="tap", transforms="tap")
    return Arch.uniform(conv, tile, bits, **net)


def _serve(
    name: str,
    width: float,
    batch: int,
    warmup: int,
    device: str,
    threads: int | None,
    space: str | None = None,
) -> None:
    """One configuration's process: build, warm up, then time one training step per ``step``
    line read from stdin (one JSON line back each), and at ``end`` report peak memory."""
    import torch

    from wasearch.allocator import keep_freed_memory

    allocator = keep_freed_memory()  # as train.py and search.py run
    if threads:
        torch.set_num_threads(threads)
    from wasearch.models import build

    torch.manual_seed(0)
    arch = arch_of(name, space, width)
    model = build(arch).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=4e-5)
    size = arch.input_size
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, arch.num_classes, (batch,), device=device)
    cuda = device.startswith("cuda")

    def step() -> float:
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for _ in range(warmup):
        step()
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        if line.strip() != "step":
            break
        print(json.dumps({"step_s": step()}), flush=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB (Linux: KiB)
    gpu_peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
    env = {k: os.environ.get(k) for k in REPORTED_ENV}
    env["allocator"] = allocator
    print(
        json.dumps(
            {
                "peak_rss_mib": peak,
                "rss_before_steps_mib": rss_before,
                "gpu_peak_mib": gpu_peak,
                "env": env,
            }
        ),
        flush=True,
    )


class _Child:
    """A configuration's serving process, spoken to one JSON line at a time."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> None:
        self.name = name
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )

    def read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            raise SystemExit(f"train_step: the {self.name} process ended early (exit {code})")
        return json.loads(line)

    def ask(self, command: str) -> dict:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self) -> dict:
        out = self.ask("end")
        self.proc.wait()
        return out


def interleave(children: list[_Child], rounds: int) -> dict[str, list[float]]:
    """Step times per configuration over ``rounds`` rounds; every round steps each
    configuration once, in an order that rotates by one each round, so that a slow minute of a
    shared machine falls on all of them alike and the ratios are taken within a round."""
    times: dict[str, list[float]] = {c.name: [] for c in children}
    for r in range(rounds):
        k = r % len(children)
        for child in children[k:] + children[:k]:
            times[child.name].append(child.ask("step")["step_s"])
    return times


def paired_ratio(times: list[float], base: list[float]) -> dict:
    """Median of the per-round ratios ``times[i] / base[i]``, with their 25th and 75th
    percentiles (the spread a reader can expect from run to run on this machine)."""
    ratios = sorted(t / b for t, b in zip(times, base, strict=True))
    q = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else ratios * 3
    return {"median": statistics.median(ratios), "q25": q[0], "q75": q[-1]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(DEFAULT_CONFIGS))
    p.add_argument("--width", type=float, default=0.5)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=9, help="interleaved rounds (one step each)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's, all cores)")
    p.add_argument("--space", help="measure this space's model (default: the paper's network)")
    p.add_argument(
        "--torch-ops",
        action="store_true",
        help="also run every configuration with the fused CPU kernels off "
        "(WASEARCH_FUSED_KERNELS=0), interleaved in the same rounds: before and after",
    )
    p.add_argument(
        "--thp",
        action="store_true",
        help="also run every configuration with torch's CPU tensors of 2 MiB and more on "
        "transparent huge pages (THP_MEM_ALLOC_ENABLE=1), in the same rounds",
    )
    p.add_argument(
        "--glibc-malloc",
        action="store_true",
        help="also run every configuration with glibc's default malloc settings "
        "(WASEARCH_MALLOC=glibc; the others keep freed memory for reuse, as the scripts do), "
        "in the same rounds",
    )
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        _serve(
            args.child,
            args.width,
            args.batch,
            args.warmup,
            args.device,
            args.threads,
            args.space,
        )
        return 0
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be at least 1 and --warmup at least 0")
    if args.batch < 1 or (args.threads is not None and args.threads < 1):
        p.error("--batch and --threads must be at least 1")
    if not args.width > 0:
        p.error("--width must be positive")

    base_env = dict(os.environ)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from wasearch.latency.timing import machine_line

    load = os.getloadavg()[0]

    network = (
        f"ResNet-18-like width {args.width}, 32x32" if args.space is None else f"{args.space}"
    )
    print(f"# {network}, batch {args.batch}, device {args.device}")
    machine = machine_line(args.device, threads=args.threads)
    print(f"# machine: {machine}")
    thp = base_env.get("THP_MEM_ALLOC_ENABLE")
    print(f"# THP_MEM_ALLOC_ENABLE={thp or 'unset'} (huge pages for tensors of 2 MiB and more)")
    print(
        f"# {args.steps} interleaved rounds after {args.warmup} warm-up steps; each "
        "configuration in its own process; x time: median of per-round ratios [25th-75th]"
    )
    configs = list(dict.fromkeys(args.configs))
    plain = list(configs)
    if args.torch_ops:
        configs += [f"{name}{TORCH_OPS}" for name in plain]
    if args.thp:
        configs += [f"{name}{THP}" for name in plain]
    if args.glibc_malloc:
        configs += [f"{name}{GLIBC}" for name in plain]
    children = []
    try:
        for name in configs:
            cmd = [
                sys.executable,
                __file__,
                "--child",
                _split(name)[0],
                "--width",
                str(args.width),
                "--batch",
                str(args.batch),
                "--warmup",
                str(args.warmup),
                "--device",
                args.device,
            ]
            cmd += ["--threads", str(args.threads)] if args.threads else []
            cmd += ["--space", args.space] if args.space else []
            children.append(_Child(name, cmd, child_env(name, base_env)))
            children[-1].read()  # ready: warmed up, before the next one starts
        times = interleave(children, args.steps)
        memory = {c.name: c.close() for c in children}
    finally:
        for c in children:
            if c.proc.poll() is None:
                c.proc.kill()
    results = {}
    for name in configs:
        t = times[name]
        results[name] = {
            "step_s": statistics.median(t),
            "step_min_s": min(t),
            "step_times_s": t,
            "images_per_s": args.batch / statistics.median(t),
            **memory[name],
        }
    base = results.get("normal8")
    header = (
        f"{'config':30s} {'step s':>8s} {'img/s':>8s} {'peak MiB':>9s} {'x time':>7s} "
        f"{'[25th-75th]':>12s} {'x mem':>6s}"
    )
    print(header)
    print("-" * len(header))
    for name, r in results.items():
        mem = r["gpu_peak_mib"] if r["gpu_peak_mib"] is not None else r["peak_rss_mib"]
        if base:
            base_mem = base["gpu_peak_mib"] or base["peak_rss_mib"]
            ratio = paired_ratio(r["step_times_s"], base["step_times_s"])
            r["time_vs_normal8"] = ratio["median"]
            r["time_vs_normal8_q25_q75"] = [ratio["q25"], ratio["q75"]]
            r["mem_vs_normal8"] = mem / base_mem
            spread = f"[{ratio['q25']:.2f}-{ratio['q75']:.2f}]"
            ratio_text = f"{r['time_vs_normal8']:7.2f} {spread:>12s} {r['mem_vs_normal8']:6.2f}"
        else:
            ratio_text = ""
        print(
            f"{_label(name):30s} {r['step_s']:8.3f} {r['images_per_s']:8.1f} {mem:9.0f} "
            f"{ratio_text}"
        )
    allocators = sorted({str(r.get("env", {}).get("allocator")) for r in results.values()})
    print(f"# malloc (wasearch.allocator, as the scripts run it): {'; '.join(allocators)}")
    # The load at the end counts this run's own threads (one configuration steps at a time).
    own = args.threads or torch.get_num_threads()
    load_end = os.getloadavg()[0]
    print(f"# load average {load:.2f} at the start, {load_end:.2f} at the end ({own} own threads)")
    if load > 1.5 or load_end > own + 1.0:
        print("# note: other work shared the cores during this run")
    summary = {
        "benchmark": "train_step",
        "width": args.width,
        "batch": args.batch,
        "device": args.device,
        "rounds": args.steps,
        "warmup": args.warmup,
        "load_avg_start": load,
        "load_avg_end": load_end,
        "thp_mem_alloc_enable": thp,
        "space": args.space,
        "machine": machine,
        "results": results,
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
