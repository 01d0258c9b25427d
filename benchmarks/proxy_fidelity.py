#!/usr/bin/env python
"""Does a search trial's accuracy rank architectures the way longer training does?

The adaptation shortcut scores every candidate by fine-tuning it briefly from one shared base.
That score is only useful if it orders architectures as a longer training would. This benchmark
measures it on real CIFAR-10 images: a fixed set of architectures (every uniform reference, F6
included, plus mixes tied per residual block) is scored by several trial recipes (fine-tuning
batches and learning rate), then each is trained with a longer budget (at least 4x the longest
recipe, its learning rate annealed) and evaluated on the test set. For each recipe it reports
Kendall's tau between the proxy (validation accuracy after the recipe) and the longer-budget
accuracy, beside the noise: the binomial standard error of each accuracy, and the spread of two
architectures rerun with another seed.

    python benchmarks/proxy_fidelity.py            # miniature, 2 CPU cores: about an hour

Every measured row is written at once to ``--out`` (JSON, atomically); a rerun with the same
setting measures only what is missing, so an interrupted run resumes. The base is cached under
``--work-dir``. Prints the tables, writes ``benchmarks/results/proxy_fidelity.md`` and ``.json``,
and prints one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from wasearch.arch import Arch, LayerChoice
from wasearch.cli import UserError, run_main
from wasearch.data import BatchLoader, DataSplits, load_real_cifar10
from wasearch.engine import (
    TrainConfig,
    evaluate,
    fit,
    load_checkpoint,
    select_device,
)
from wasearch.fileio import atomic_write_text
from wasearch.latency.timing import cpu_model
from wasearch.models import build
from wasearch.stats import binomial_se as shared_binomial_se

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Recipe:
    """One way to score a candidate: ``batches`` fine-tuning batches at a constant ``lr``."""

    name: str
    batches: int
    lr: float

    def config(self, setting: Setting, seed: int) -> TrainConfig:
        return TrainConfig(
            epochs=1,
            batch_size=setting.batch_size,
            lr=self.lr,
            seed=seed,
            warmup_batches=setting.warmup_batches,
            max_batches_per_epoch=self.batches,
        )


@dataclass
class Setting:
    width: float = 0.25
    train_images: int = 20_000  # class-balanced subset of the 45,000 left after validation
    val_fraction: float = 0.1  # 5,000 of CIFAR-10's training images: what trials rank on
    test_images: int | None = None  # None: all 10,000 (only the longer budget is tested)
    batch_size: int = 64
    base_epochs: int = 5
    base_lr: float = 1e-3  # x0.1 at 3/5 and 4/5 of the epochs: ends at 1e-5
    warmup_batches: int = 10
    recipes: tuple[Recipe, ...] = (
        Recipe("shipped", 150, 5e-4),  # the trial recipe shipped until this benchmark
        Recipe("gentle", 150, 5e-5),  # 5x the base's final learning rate
        Recipe("gentle-short", 50, 5e-5),  # a third of the cost
    )
    long_epochs: int = 2  # over the whole training subset, lr x0.1 at 3/5 and 4/5
    long_lr: float = 5e-4
    mixes: int = 2  # random architectures tied per residual block
    noise_archs: tuple[str, ...] = ("static-F4",)  # rerun with seed + 1
    seed: int = 0

    def key(self) -> dict:
        return asdict(self)


def _machine() -> dict:
    return {
        "cpu": cpu_model(),
        "isa": torch.backends.cpu.get_cpu_capability(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "load_1min": round(os.getloadavg()[0], 2),
        "torch": torch.__version__,
    }


def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Statistics


def binomial_se(acc: float, n: int) -> float:
    """Standard error of an accuracy measured on ``n`` independent images: the one formula
    (:func:`wasearch.stats.binomial_se`), NaN where it is undefined (this file's tables)."""
    se = shared_binomial_se(acc, n)
    return float("nan") if se is None else se


def kendall_tau(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's tau-b (ties in either sequence counted as neither concordant nor discordant)."""
    if len(x) != len(y):
        raise ValueError(f"sequences differ in length: {len(x)} and {len(y)}")
    concordant = discordant = ties_x = ties_y = 0
    for i in range(len(x)):
        for j in range(i + 1, len(x)):
            dx, dy = x[i] - x[j], y[i] - y[j]
            if dx == 0 and dy == 0:
                continue
            if dx == 0:
                ties_x += 1
            elif dy == 0:
                ties_y += 1
            elif (dx > 0) == (dy > 0):
                concordant += 1
            else:
                discordant += 1
    denom = math.sqrt((concordant + discordant + ties_x) * (concordant + discordant + ties_y))
    return (concordant - discordant) / denom if denom else float("nan")


# --------------------------------------------------------------------------------------------
# Architectures


def architectures(setting: Setting, num_classes: int) -> dict[str, Arch]:
    """The uniform references (F6 with its fallback on 4x4 inputs) and seeded per-block mixes."""

    def uniform(conv: str, tile: int | None) -> Arch:
        return Arch.uniform(
            conv, tile, 8, granularity="tap", width=setting.width, num_classes=num_classes
        )

    archs = {"all-normal": uniform("normal", None)}
    for conv in ("static", "flex"):
        for tile in (2, 4, 6):
            archs[f"{conv}-F{tile}"] = uniform(conv, tile)
    base = archs["all-normal"]
    blocks: dict[str, list[str]] = {}
    for name in base.layer_names:
        blocks.setdefault(name.rsplit(".", 1)[0], []).append(name)
    options = [LayerChoice("normal", None, 8, "tap")] + [
        LayerChoice(conv, tile, 8, "tap") for conv in ("static", "flex") for tile in (2, 4, 6)
    ]
    rng = random.Random(setting.seed)
    for i in range(setting.mixes):
        changes = {}
        for names in blocks.values():
            choice = rng.choice(options)
            for name in names:
                c = choice
                # F6 does not fit the last stage's 4x4 inputs: fall back as the references do.
                while c.tile is not None and c.tile > 2 and c.tile not in _fitting(archs, name):
                    c = LayerChoice(c.conv, c.tile - 2, c.bits, c.granularity)
                changes[name] = c
        archs[f"mix-{i + 1}"] = base.with_layers(changes)
    return archs


def _fitting(archs: dict[str, Arch], name: str) -> set[int]:
    """Tiles that fit layer ``name`` (what the uniform references fell back to, and below)."""
    largest = archs["static-F6"].choice(name).tile
    return {t for t in (2, 4, 6) if t <= largest}


# --------------------------------------------------------------------------------------------
# Measuring


def load_data(setting: Setting, data_dir: str | None) -> DataSplits:
    return load_real_cifar10(
        data_dir,
        val_fraction=setting.val_fraction,
        limit_train=setting.train_images,
        limit_test=setting.test_images,
        seed=setting.seed,
    )


def train_base(setting: Setting, data: DataSplits, work_dir: Path, device) -> Path:
    run = work_dir / "base"
    ckpt = run / "last.pt"
    config = TrainConfig(
        epochs=setting.base_epochs,
        batch_size=setting.batch_size,
        lr=setting.base_lr,
        seed=setting.seed,
    )
    arch = Arch.uniform("normal", None, 8, width=setting.width, num_classes=data.num_classes)
    resume = False
    if ckpt.is_file():
        done = load_checkpoint(ckpt)
        if done.arch == arch and done.config == config and done.epoch == config.epochs:
            _log(f"base: reusing {ckpt}")
            return ckpt
        resume = done.arch == arch and done.config == config
    _log(f"base: normal 8-bit, width {setting.width}, {setting.base_epochs} epochs")
    fit(
        build(arch),
        data,
        config,
        out_dir=run,
        device=device,
        resume=resume,
        progress=False,
        log=_log,
    )
    return ckpt


def _test_loader(data: DataSplits, split, device) -> BatchLoader:
    return BatchLoader(split, batch_size=256, mean=data.mean, std=data.std, device=device)


@dataclass
class Results:
    setting: dict
    machine: dict
    rows: dict[str, dict] = field(default_factory=dict)  # key -> measured row
    seconds: float = 0.0

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(asdict(self), indent=1))


def adapt_row(arch: Arch, base: Path, data: DataSplits, config: TrainConfig, device) -> dict:
    """Fine-tune ``arch`` from ``base`` with ``config`` (a trial): its best validation
    accuracy, that accuracy's standard error and image count, and the seconds it took."""
    t0 = time.perf_counter()
    result = fit(
        build(arch),
        data,
        config,
        init_from=base,
        device=device,
        progress=False,
        log=lambda _: None,
    )
    n = len(data.val)
    return {
        "val_acc": result.best_val_acc,
        "val_se": binomial_se(result.best_val_acc, n),
        "val_images": n,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def proxy_row(
    arch: Arch, base: Path, data: DataSplits, setting: Setting, recipe: Recipe, seed: int, device
) -> dict:
    return adapt_row(arch, base, data, recipe.config(setting, seed), device)


def long_row(
    arch: Arch, base: Path, data: DataSplits, setting: Setting, seed: int, device
) -> dict:
    t0 = time.perf_counter()
    config = TrainConfig(
        epochs=setting.long_epochs,
        batch_size=setting.batch_size,
        lr=setting.long_lr,
        seed=seed,
        warmup_batches=setting.warmup_batches,
    )
    model = build(arch)
    result = fit(
        model, data, config, init_from=base, device=device, progress=False, log=lambda _: None
    )
    # The last epoch's weights (annealed), not the best on validation: nothing is selected.
    _, test_acc = evaluate(model, _test_loader(data, data.test, device))
    val = result.history[-1]["val_acc"] if result.history else float("nan")
    return {
        "val_acc": val,
        "val_se": binomial_se(val, len(data.val)),
        "test_acc": test_acc,
        "test_se": binomial_se(test_acc, len(data.test)),
        "test_images": len(data.test),
        "batches": setting.long_epochs * math.ceil(len(data.train) / setting.batch_size),
        "seconds": round(time.perf_counter() - t0, 1),
    }


def _key(kind: str, arch: str, recipe: str | None, seed: int) -> str:
    return f"{kind}|{arch}|{recipe or '-'}|{seed}"


# --------------------------------------------------------------------------------------------
# Tables


def analyse(results: Results, names: Sequence[str], setting: Setting) -> dict:
    rows = results.rows
    seed = setting.seed
    longs = {n: rows.get(_key("long", n, None, seed)) for n in names}
    verified = [n for n in names if longs[n]]
    out: dict = {"recipes": {}, "verified": len(verified)}
    for recipe in setting.recipes:
        have = [n for n in verified if _key("proxy", n, recipe.name, seed) in rows]
        proxy = [rows[_key("proxy", n, recipe.name, seed)]["val_acc"] for n in have]
        tau_test = (
            kendall_tau(proxy, [longs[n]["test_acc"] for n in have]) if len(have) > 2 else None
        )
        tau_val = (
            kendall_tau(proxy, [longs[n]["val_acc"] for n in have]) if len(have) > 2 else None
        )
        seconds = [rows[_key("proxy", n, recipe.name, seed)]["seconds"] for n in have]
        spread = []
        for n in setting.noise_archs:
            a, b = (
                rows.get(_key("proxy", n, recipe.name, seed)),
                rows.get(_key("proxy", n, recipe.name, seed + 1)),
            )
            if a and b:
                spread.append(abs(a["val_acc"] - b["val_acc"]))
        out["recipes"][recipe.name] = {
            "n": len(have),
            "tau_test": tau_test,
            "tau_val": tau_val,
            "mean_seconds": sum(seconds) / len(seconds) if seconds else None,
            "seed_spread": max(spread) if spread else None,
        }
    spread = []
    for n in setting.noise_archs:
        a, b = rows.get(_key("long", n, None, seed)), rows.get(_key("long", n, None, seed + 1))
        if a and b:
            spread.append(abs(a["test_acc"] - b["test_acc"]))
    out["long_seed_spread"] = max(spread) if spread else None
    return out


def _pct(x: float | None, digits: int = 1) -> str:
    return (
        "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.{digits}f}"
    )


def _num(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}"


def _cpus_note(rows: dict[str, dict], current: str) -> str:
    """Where a resumed run's rows were measured, when not all on this run's machine (rows from
    before rows named their CPU count as 'an earlier machine')."""
    counts: dict[str, int] = {}
    for row in rows.values():
        cpu = row.get("cpu", "an earlier machine")
        counts[cpu] = counts.get(cpu, 0) + 1
    if set(counts) <= {current}:
        return ""
    parts = ", ".join(f"{n} on {cpu}" for cpu, n in counts.items())
    return (
        f" Rows measured on more than one machine: {parts} (accuracies do not depend on it; "
        "seconds do)."
    )


def render(
    results: Results, archs: dict[str, Arch], setting: Setting, summary: dict, command: str
) -> str:
    m = results.machine
    rows = results.rows
    seed = setting.seed
    longest = max(r.batches for r in setting.recipes)
    lines = [
        "# Proxy fidelity: does a trial's accuracy rank architectures like longer training?",
        "",
        f"`{command}`",
        "",
        f"Machine: {m['cpu']} ({m['isa']}), {m['cores']} cores, {m['threads']} torch threads, "
        f"load {m['load_1min']} at start, torch {m['torch']}. Total {results.seconds / 60:.0f} "
        "min of measuring in this results file (rows reused from an interrupted run included)."
        + _cpus_note(rows, m["cpu"]),
        "",
        f"Setting: ResNet-18-like width {setting.width}, real CIFAR-10 (JPEG), "
        f"{setting.train_images:,} training images, {int(50_000 * setting.val_fraction):,} "
        "validation images (what trials rank on), the test set only for the longer budget. "
        f"Base: normal 8-bit, {setting.base_epochs} epochs, Adam lr {setting.base_lr:g} "
        "(x0.1 at 3/5 and 4/5). Every architecture is 8-bit with tap-wise Winograd-domain "
        "scales and starts from that base (the adaptation shortcut). Longer budget: "
        f"{setting.long_epochs} epochs over the training subset "
        f"({setting.long_epochs * math.ceil(setting.train_images / setting.batch_size)} batches, "
        f">= {setting.long_epochs * setting.train_images // setting.batch_size // longest}x the "
        f"longest recipe), lr {setting.long_lr:g} x0.1 at 3/5 and 4/5, last epoch's weights.",
        "",
        "## Kendall tau between the proxy and the longer budget",
        "",
        "| recipe | batches | lr | tau vs long test | tau vs long val | n | proxy seed spread "
        "(pt) | s per trial |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for recipe in setting.recipes:
        s = summary["recipes"][recipe.name]
        lines.append(
            f"| {recipe.name} | {recipe.batches} | {recipe.lr:g} | {_num(s['tau_test'])} | "
            f"{_num(s['tau_val'])} | {s['n']} | {_pct(s['seed_spread'], 2)} | "
            f"{_num(s['mean_seconds'])} |"
        )
    lines += [
        "",
        "Proxy seed spread: the largest |difference| between two seeds' proxy accuracy over "
        f"{', '.join(setting.noise_archs)}. Longer budget, the same: "
        f"{_pct(summary['long_seed_spread'], 2)} points of test accuracy.",
        "",
        "## Accuracies (%), standard error in brackets",
        "",
        "| architecture | "
        + " | ".join(r.name for r in setting.recipes)
        + " | long val | long test |",
        "|---|" + "---|" * (len(setting.recipes) + 2),
    ]
    for name in archs:
        cells = []
        for recipe in setting.recipes:
            r = rows.get(_key("proxy", name, recipe.name, seed))
            cells.append(f"{_pct(r['val_acc'])} ({_pct(r['val_se'])})" if r else "-")
        r = rows.get(_key("long", name, None, seed))
        cells.append(f"{_pct(r['val_acc'])} ({_pct(r['val_se'])})" if r else "-")
        cells.append(f"{_pct(r['test_acc'])} ({_pct(r['test_se'])})" if r else "-")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Mixes (one choice per residual block):", ""]
    for name, arch in archs.items():
        if name.startswith("mix-"):
            lines.append(f"- {name}: {arch.summary()}")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="proxy_fidelity.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--data-dir",
        help="CIFAR-10 (ImageFolder or python batches); default: the "
        "shared archive unpacked into the cache",
    )
    p.add_argument(
        "--work-dir",
        default=str(Path("~/.cache/wasearch/bench/proxy_fidelity")),
        help="base checkpoint cache",
    )
    p.add_argument("--out", default=str(HERE / "results" / "proxy_fidelity.json"))
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--tiny",
        action="store_true",
        help="a minutes-long smoke run (tiny subsets; figures mean nothing)",
    )
    p.add_argument("--fresh", action="store_true", help="measure everything again")
    p.add_argument(
        "--archs", nargs="+", metavar="NAME",
        help="measure only these architectures (all-normal, static-F2 .. flex-F6, mix-1 ..)",
    )  # fmt: skip
    return p


def tiny_setting() -> Setting:
    return Setting(
        width=0.125,
        train_images=256,
        test_images=200,
        batch_size=16,
        base_epochs=1,
        recipes=(Recipe("a", 2, 5e-4), Recipe("b", 2, 5e-5)),
        long_epochs=1,
        mixes=1,
        warmup_batches=1,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setting = tiny_setting() if args.tiny else Setting()
    device = select_device(args.device)
    out = Path(args.out)
    work = Path(args.work_dir).expanduser() / ("tiny" if args.tiny else "default")
    t_start = time.perf_counter()
    data = load_data(setting, args.data_dir)
    results = Results(setting=_jsonable(setting.key()), machine=_machine())
    if out.is_file() and not args.fresh:
        try:
            old = json.loads(out.read_text())
        except (OSError, ValueError) as err:
            raise UserError(f"--out {out}: cannot be read ({err}); pass --fresh") from None
        if old.get("setting") == results.setting:
            results.rows, results.seconds = old.get("rows", {}), old.get("seconds", 0.0)
            earlier = (old.get("machine") or {}).get("cpu")
            for row in results.rows.values():
                if earlier:
                    row.setdefault("cpu", earlier)
            _log(f"resuming: {len(results.rows)} rows of {out} kept")
    archs = architectures(setting, data.num_classes)
    if args.archs:
        unknown = [a for a in args.archs if a not in archs]
        if unknown:
            raise UserError(f"--archs: unknown {unknown[0]!r}; choose from {', '.join(archs)}")
        archs = {name: archs[name] for name in args.archs}
    base = train_base(setting, data, work, device)
    plan: list[tuple[str, str, str | None, int]] = []
    for name in archs:
        for recipe in setting.recipes:
            plan.append(("proxy", name, recipe.name, setting.seed))
        plan.append(("long", name, None, setting.seed))
    for name in (n for n in setting.noise_archs if n in archs):
        for recipe in setting.recipes:
            plan.append(("proxy", name, recipe.name, setting.seed + 1))
        plan.append(("long", name, None, setting.seed + 1))
    recipes = {r.name: r for r in setting.recipes}
    for i, (kind, name, recipe, seed) in enumerate(plan):
        key = _key(kind, name, recipe, seed)
        if key in results.rows:
            continue
        t0 = time.perf_counter()
        if kind == "proxy":
            row = proxy_row(archs[name], base, data, setting, recipes[recipe], seed, device)
        else:
            row = long_row(archs[name], base, data, setting, seed, device)
        row["cpu"] = results.machine["cpu"]  # a resumed run may span machines: each row says
        results.rows[key] = row
        results.seconds += time.perf_counter() - t0
        results.save(out)
        shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}
        _log(f"[{i + 1}/{len(plan)}] {key}: {shown}")
    summary = analyse(results, list(archs), setting)
    command = "python benchmarks/proxy_fidelity.py" + (" --tiny" if args.tiny else "")
    if args.archs:
        command += " --archs " + " ".join(args.archs)
    text = render(results, archs, setting, summary, command)
    md = out.with_suffix(".md")
    atomic_write_text(md, text)
    print(text)
    figures = {
        "recipes": summary["recipes"],
        "long_seed_spread": summary["long_seed_spread"],
        "wall_s": round(time.perf_counter() - t_start, 1),
        "machine": results.machine,
    }
    print(json.dumps(figures))
    return 0


def _jsonable(obj: object) -> object:
    """``obj`` as plain JSON values (dataclasses as dicts)."""

    def default(o: object) -> object:
        return asdict(o) if hasattr(o, "__dataclass_fields__") else str(o)

    return json.loads(json.dumps(obj, default=default))


if __name__ == "__main__":
    sys.exit(run_main(main))
