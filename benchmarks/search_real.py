#!/usr/bin/env python
"""Does the search find anything? A real-data search in miniature, resumable, end to end.

On real CIFAR-10 images (``spaces/cifar10_mini.yaml``: ResNet-18-like width 0.25, 8-bit,
normal / static / flex x F2/F4/F6 per residual block, tap-wise scales, Cortex-A73 analytical
latency) it runs

(a) the shared base (normal 8-bit, 5 epochs), trained once by the study's own machinery;
(b) the Optuna search (``wasearch.search.run_search``, what ``search.py run`` calls): its
    trials include the references, queued before any sampled trial and trained with exactly
    the trial recipe from the same base: all-normal, static/flex F2 and F4 (queued by the
    study), static/flex F6 (F4 on the 4x4 inputs of layer4; queued here);
(c) the differentiable sweep of the twin space (``spaces/cifar10_mini_dnas.yaml``), from a copy
    of the same base, its lambdas only (its references would repeat the Optuna study's);
(d) a latency table measured on this machine (``wasearch.latency.measure_plan``, cached under
    the work dir), which re-prices every trained trial: the same trained trials, a second
    target device, a second front;
(e) verification: the references and ``front_max`` sampled architectures (the Optuna front
    under the Cortex-A73 model, then the next Pareto layers where the front is all references)
    trained with a longer budget (2 epochs over the 20,000 training images:
    626 batches, > 4x a trial's 150, lr 5e-4 annealed x0.1 at 3/5 and 4/5, as
    ``benchmarks/proxy_fidelity.py``'s ``long_row``), evaluated on the test set; Kendall tau
    between the trial (proxy) accuracy and the longer-budget test accuracy; two architectures
    rerun with another seed (trial recipe and longer budget) for the noise level.

Budget on 2 CPU cores (from proxy_fidelity's figures: a 150-batch trial ~1-2 min with its
5,000-image validation, a 626-batch longer run ~5-6 min): base ~8 min, table ~3 min, 30 trials
~55 min, 3 differentiable points ~25 min, 11 longer runs + 2 noise reruns ~75 min: ~2.8 h.

    python benchmarks/search_real.py                 # the real run (~3 h on 2 cores)
    python benchmarks/search_real.py --tiny          # minutes: tiny subsets, figures meaningless

Every finished step is a row of ``--out`` (JSON, written atomically); the studies, the base and
the table live under ``--work-dir``; a rerun skips finished work and resumes the study, so an
interrupted run loses at most the step it was in. Writes ``--out``'s ``.md`` (the targets, met
or not, with numbers) and a figure (``.png`` with plotly's static export, else a self-contained
``.html``), and prints one JSON line last.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import logging
import math
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from wasearch.arch import Arch
from wasearch.cli import UserError, run_main
from wasearch.fileio import atomic_write_text, load_yaml
from wasearch.stats import binomial_se

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SPACE = ROOT / "spaces" / "cifar10_mini.yaml"
DNAS_SPACE = ROOT / "spaces" / "cifar10_mini_dnas.yaml"
PAPER_SPEEDUP = 2.66  # the paper's best speed-up over normal 8-bit (Cortex-A73)
F6_REFERENCES = (("static-F6", "static", 6), ("flex-F6", "flex", 6))

logger = logging.getLogger("search_real")


def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _proxy_fidelity():
    """benchmarks/proxy_fidelity.py as a module: its kendall_tau, Setting and long_row."""
    name = "proxy_fidelity_for_search_real"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, HERE / "proxy_fidelity.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def kendall_tau(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's tau-b: proxy_fidelity's, the one implementation."""
    return _proxy_fidelity().kendall_tau(x, y)


# --------------------------------------------------------------------------------------------
# Setting


@dataclass
class Setting:
    long_epochs: int = 2  # over the training subset: 626 batches, >= 4x the trial's 150
    long_lr: float = 5e-4  # x0.1 at 3/5 and 4/5 (TrainConfig's schedule)
    front_max: int = 4  # Optuna front architectures verified besides the references
    noise_archs: tuple[str, ...] = ("all-normal", "static-F4")  # rerun with seed + 1
    measure_repeats: int = 15  # samples per row of the measured latency table
    measure_threads: int = 1  # torch threads while timing (what a search on 2 loaded cores uses)
    verify_max: int | None = None  # cap on verified architectures (None: all)
    # overrides of the two spaces (the tiny run's); None: the spaces as shipped
    space_overrides: dict = field(default_factory=dict)
    dnas_overrides: dict = field(default_factory=dict)


def tiny_setting() -> Setting:
    common = {
        "model": {"width": 0.125},
        "data": {"val_fraction": 0.1, "limit_train": 48, "limit_test": 30, "batch_size": 16},
        "base": {"epochs": 1},
        "trial": {"max_batches": 2, "warmup_batches": 1},
    }
    return Setting(
        long_epochs=1,
        front_max=1,
        noise_archs=("all-normal",),
        measure_repeats=2,
        verify_max=1,
        space_overrides={**common, "budget": {"trials": 2}},
        dnas_overrides={**common, "strategy": {"lambdas": [0.0], "epochs": 2, "warmup_epochs": 1}},
    )


def _merged(raw: dict, overrides: dict) -> dict:
    out = dict(raw)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


def make_space(path: Path, overrides: dict, data: dict):
    """The space file with the setting's overrides and the data location applied (parsed by the
    one parser, so every check of ``search.py run`` applies)."""
    from wasearch.search.space import parse_space

    raw = _merged(load_yaml(path, what="space file"), overrides)
    raw["data"] = {**raw.get("data", {}), **data}
    return parse_space(raw, source=str(path))


# --------------------------------------------------------------------------------------------
# Results file


@dataclass
class Results:
    setting: dict
    machine: str
    rows: dict[str, dict] = field(default_factory=dict)  # step -> what it measured
    seconds: float = 0.0

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(asdict(self), indent=1))


def _record(results: Results, out: Path, key: str, row: dict, t0: float) -> None:
    row.setdefault("seconds", round(time.perf_counter() - t0, 1))
    results.rows[key] = row
    results.seconds += row["seconds"]
    results.save(out)
    shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}
    _log(f"done {key}: {json.dumps(shown, default=str)[:300]}")


# --------------------------------------------------------------------------------------------
# Steps


def _complete(study) -> list:
    from optuna.trial import TrialState

    return [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]


def _open(space, results_dir: Path):
    import optuna

    from wasearch.search.storage import space_storage
    from wasearch.search.study import open_study, prepare, sampler_seed

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    prep = prepare(space, results=results_dir)
    storage = space_storage(prep.url, space)
    study, _ = open_study(
        space,
        storage,
        study_name=space.name,
        sampler_seed=sampler_seed(space, prep.url, 0),
        latency_model=prep.latency_model,
        reference_latency_ms=prep.reference_latency_ms,
    )
    return study, prep


def queue_f6_references(space, results_dir: Path) -> list[str]:
    """Create the study (it queues its five references) and queue static/flex F6 after them
    (F6 where the unit offers it, else the largest smaller tile), once."""
    from wasearch.search.choices import reference_label
    from wasearch.search.record import reference_attrs

    study, _ = _open(space, results_dir)
    have = {t.user_attrs.get("reference") for t in study.get_trials(deepcopy=False)}
    bits = space.base["bits"]
    first = [space.choices[k][0] for k in ("granularity", "transforms", "wd_bits")]
    queued = []
    for name, conv, tile in F6_REFERENCES:
        if name in have:
            continue
        params = {u.name: reference_label(u, conv, tile, bits, *first) for u in space.units}
        if None in params.values():
            continue  # the kind is not in the space
        study.enqueue_trial(params, user_attrs=reference_attrs(name))
        queued.append(name)
    return queued


def run_study(space, results_dir: Path, device: str, threads: int | None, trials=None) -> dict:
    """``search.py run``'s library call; an interrupted run stops the benchmark (rerun resumes)."""
    from wasearch.search import RunOptions, run_search

    options = RunOptions(
        results=str(results_dir), device=device, threads=threads, report=False, trials=trials
    )
    result = run_search(space, options, progress=False)
    if result.status == "interrupted":
        raise KeyboardInterrupt
    if result.done < result.target and result.status not in ("finished",):
        raise UserError(f"{space.name}: {result.message}")
    return {"status": result.status, "done": result.done, "target": result.target}


def measure_latency_table(space, path: Path, setting: Setting) -> dict:
    from wasearch.latency.measure import measure_plan
    from wasearch.latency.plan import MeasurePlan
    from wasearch.latency.table import LatencyTable

    plan = MeasurePlan.for_space(space)
    table = LatencyTable.read(path) if path.is_file() else LatencyTable(source=str(path))
    try:
        table, untimed = measure_plan(
            plan,
            table=table,
            batch=plan.batch,
            threads=setting.measure_threads,
            repeats=setting.measure_repeats,
        )
    finally:
        if len(table):
            path.parent.mkdir(parents=True, exist_ok=True)
            table.write(path)
    return {"path": str(path), "rows": len(table), "untimed": len(untimed)}


def trial_points(study, models: dict[str, Any], kind: str) -> list[dict]:
    """Every COMPLETE trial as a point: accuracy, its SE, a latency per model (re-priced)."""
    points = []
    for t in _complete(study):
        a = t.user_attrs
        arch = Arch.from_yaml(a["arch"], source=f"trial {t.number}")
        n = a.get("val_images")
        points.append(
            {
                "study": kind,
                "number": t.number,
                "source": a.get("source", "optuna"),
                "reference": a.get("reference"),
                "lambda": a.get("lambda"),
                "val_acc": a["val_acc"],
                "val_images": n,
                "val_se": binomial_se(a["val_acc"], n),
                "train_seconds": a.get("train_seconds"),
                "supernet_seconds": a.get("supernet_seconds"),
                "arch_summary": a.get("arch_summary"),
                "arch": a["arch"],
                "latency_ms": {m: model.price(arch).total * 1e3 for m, model in models.items()},
            }
        )
    return points


def front(points: list[dict], model: str) -> list[dict]:
    """Points no other point dominates (higher accuracy, lower latency under ``model``)."""
    out: list[dict] = []
    for p in sorted(points, key=lambda p: (p["latency_ms"][model], -p["val_acc"])):
        if not out or p["val_acc"] > out[-1]["val_acc"]:
            out.append(p)
    return out


def pareto_layers(points: list[dict], model: str) -> list[list[dict]]:
    """Non-dominated sorting under ``model``: the front, then the front of what is left, ..."""
    left, layers = list(points), []
    while left:
        layer = front(left, model)
        layers.append(layer)
        taken = {id(p) for p in layer}
        left = [p for p in left if id(p) not in taken]
    return layers


def verification_set(optuna_points: list[dict], setting: Setting, model: str) -> list[dict]:
    """The references (in queue order), then ``front_max`` sampled architectures: the Optuna
    front's, and where it holds fewer than ``front_max`` that are not references, the next
    Pareto layers' (non-dominated sorting), so the longer budget also ranks what the search
    sampled; spread over latency when a layer holds more than are needed. Each architecture
    once; each sampled one records its Pareto layer (1: the front)."""
    chosen: list[dict] = []
    seen: set[str] = set()
    for p in sorted(optuna_points, key=lambda p: p["number"]):
        if p["reference"] and p["arch"] not in seen:
            chosen.append({"name": p["reference"], "pareto_layer": None, **_slim(p)})
            seen.add(p["arch"])
    sampled = 0
    for rank, layer in enumerate(pareto_layers(optuna_points, model), start=1):
        need = setting.front_max - sampled
        if need <= 0:
            break
        extra = [p for p in layer if p["arch"] not in seen]
        if len(extra) > need:
            step = (len(extra) - 1) / max(1, need - 1)
            extra = [extra[round(i * step)] for i in range(need)]
        for p in extra:
            chosen.append({"name": f"trial-{p['number']}", "pareto_layer": rank, **_slim(p)})
            seen.add(p["arch"])
            sampled += 1
    if setting.verify_max is not None:
        chosen = chosen[: setting.verify_max]
    return chosen


def _slim(p: dict) -> dict:
    return {k: p[k] for k in ("number", "arch", "arch_summary", "val_acc", "val_se")}


def proxy_rerun(arch: Arch, space, base: Path, data, seed: int, device: str) -> dict:
    """The trial recipe again (``trial_config`` of the space), with another seed: proxy_fidelity's
    ``adapt_row``, the one fine-tune-and-score."""
    from wasearch.search.base import trial_config

    config = replace(trial_config(space), seed=seed)
    return _proxy_fidelity().adapt_row(arch, base, data, config, device)


def long_run(arch: Arch, space, base: Path, data, setting: Setting, seed: int, device) -> dict:
    """proxy_fidelity's longer budget (its ``long_row``), from the study's base."""
    pf = _proxy_fidelity()
    pf_setting = pf.Setting(
        width=space.model["width"],
        batch_size=space.data["batch_size"],
        warmup_batches=space.trial["warmup_batches"],
        long_epochs=setting.long_epochs,
        long_lr=setting.long_lr,
        seed=space.seed,
    )
    row = pf.long_row(arch, base, data, pf_setting, seed, device)
    row.pop("seconds", None)
    return row


# --------------------------------------------------------------------------------------------
# Analysis


def _se_diff(*ses: float | None) -> float | None:
    if any(s is None for s in ses):
        return None
    return math.sqrt(sum(s * s for s in ses))


def analyse(results: Results, points: dict, models: list[str], setting: Setting) -> dict:
    rows = results.rows
    optuna_pts = [p for p in points["optuna"]]
    sampled = [p for p in optuna_pts if not p["reference"]]
    refs = {p["reference"]: p for p in optuna_pts if p["reference"]}
    out: dict = {"models": models}

    # 1. the front against every uniform reference (trial accuracy, within noise)
    dominance = {}
    for m in models:
        per = {}
        for name, r in refs.items():
            if name == "all-normal":
                continue
            reach = [p for p in sampled if p["latency_ms"][m] <= r["latency_ms"][m] * 1.0001]
            best = max(reach, key=lambda p: p["val_acc"]) if reach else None
            se = _se_diff(r["val_se"], best["val_se"]) if best else None
            gap = best["val_acc"] - r["val_acc"] if best else None
            per[name] = {
                "ref_acc": r["val_acc"],
                "ref_latency_ms": r["latency_ms"][m],
                "front_acc": best["val_acc"] if best else None,
                "front_trial": best["number"] if best else None,
                "gap": gap,
                "se": se,
                "met": best is not None and se is not None and gap >= -se,
            }
        dominance[m] = {"refs": per, "met": bool(per) and all(v["met"] for v in per.values())}
    out["dominance"] = dominance

    # 2. verification: longer-budget accuracies, Kendall tau, seed noise
    vset = rows.get("verify_set", {}).get("archs", [])
    seed = setting_seed(results)
    verified = []
    for v in vset:
        long = rows.get(f"long|{v['name']}|{seed}")
        if long:
            verified.append({**v, "long": long})
    out["verified"] = verified
    tau = None
    if len(verified) > 2:
        tau = kendall_tau(
            [v["val_acc"] for v in verified], [v["long"]["test_acc"] for v in verified]
        )
    out["kendall_tau"] = tau
    out["kendall_n"] = len(verified)
    noise = {}
    for name in setting.noise_archs:
        a, b = rows.get(f"long|{name}|{seed}"), rows.get(f"long|{name}|{seed + 1}")
        p0 = refs.get(name)
        p1 = rows.get(f"proxy|{name}|{seed + 1}")
        noise[name] = {
            "proxy_spread": abs(p0["val_acc"] - p1["val_acc"]) if p0 and p1 else None,
            "long_spread": abs(a["test_acc"] - b["test_acc"]) if a and b else None,
        }
    out["noise"] = noise

    # 3. headline: the fastest verified front architecture within 0.5 point of all-normal
    normal = next((v for v in verified if v["name"] == "all-normal"), None)
    by_arch = {p["arch"]: p for p in optuna_pts}
    head = None
    if normal:
        base_acc = normal["long"]["test_acc"]
        ok = [
            v
            for v in verified
            if v["name"] != "all-normal" and v["long"]["test_acc"] >= base_acc - 0.005
        ]
        if ok:
            best = min(ok, key=lambda v: by_arch[v["arch"]]["latency_ms"][models[0]])
            lat = by_arch[best["arch"]]["latency_ms"]
            ref_lat = by_arch[normal["arch"]]["latency_ms"]
            head = {
                "name": best["name"],
                "arch_summary": best["arch_summary"],
                "test_acc": best["long"]["test_acc"],
                "test_se": best["long"]["test_se"],
                "normal_test_acc": base_acc,
                "normal_test_se": normal["long"]["test_se"],
                "speedup": {m: ref_lat[m] / lat[m] for m in models},
            }
    out["headline"] = head
    out["headline_met"] = head is not None and head["speedup"][models[0]] > 1.0

    # 4. differentiable points against the Optuna front, at the compute each used
    dnas = []
    for m in models:
        fr = front(optuna_pts, m)
        for p in points["dnas"]:
            reach = [f for f in fr if f["latency_ms"][m] <= p["latency_ms"][m] * 1.0001]
            ref = max(reach, key=lambda f: f["val_acc"]) if reach else None
            se = _se_diff(p["val_se"], ref["val_se"]) if ref else None
            gap = ref["val_acc"] - p["val_acc"] if ref else None
            dnas.append(
                {
                    "model": m,
                    "lambda": p["lambda"],
                    "latency_ms": p["latency_ms"][m],
                    "val_acc": p["val_acc"],
                    "val_se": p["val_se"],
                    "front_acc": ref["val_acc"] if ref else None,
                    "gap": gap,
                    "se": se,
                    "met": ref is None or (se is not None and gap <= se),
                }
            )
    out["dnas"] = dnas
    out["dnas_met"] = bool(dnas) and all(d["met"] for d in dnas)
    out["optuna_compute_s"] = sum(p["train_seconds"] or 0 for p in optuna_pts)
    out["dnas_compute_s"] = sum(p["train_seconds"] or 0 for p in points["dnas"])
    return out


def setting_seed(results: Results) -> int:
    return int(results.setting.get("seed", 0))


# --------------------------------------------------------------------------------------------
# Report


def _pct(x: float | None, digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{100 * x:.{digits}f}"


def _met(ok: bool) -> str:
    return "**met**" if ok else "**not met**"


def render(results: Results, summary: dict, points: dict, command: str, figure: Path) -> str:
    rows = results.rows
    models = summary["models"]
    m0 = models[0]
    label = {m: _model_label(m) for m in models}
    seconds = {k.split("|")[0]: 0.0 for k in rows}
    for k, r in rows.items():
        seconds[k.split("|")[0]] += r.get("seconds", 0.0)
    lines = [
        "# Does the search find anything? A real-data search in miniature",
        "",
        f"`{command}`",
        "",
        f"Machine: {results.machine}. Measuring in this results file: "
        f"{results.seconds / 60:.0f} min (rows of interrupted runs included).",
        "",
        "Space `spaces/cifar10_mini.yaml` (per residual block: normal / static / flex x "
        "F2/F4/F6, 8-bit, tap-wise scales; width "
        f"{results.setting['space']['model']['width']}), "
        f"data {results.setting['space']['data']}; "
        f"trial recipe {results.setting['space']['trial']}"
        "; the references are trials of the study (queued first, the same recipe and base).",
        "",
        "Wall time per part (min): "
        + ", ".join(f"{k} {v / 60:.1f}" for k, v in seconds.items() if k != "verify_set"),
        "",
        "## Targets",
        "",
    ]
    for m in models:
        d = summary["dominance"][m]
        worst = [
            f"{n}: front {_pct(v['front_acc'])} vs {_pct(v['ref_acc'])} (gap "
            f"{_pct(v['gap'], 2)} pt, SE {_pct(v['se'], 2)})"
            for n, v in d["refs"].items()
        ]
        lines.append(
            f"- Front dominates or matches every uniform reference within noise ({label[m]}, "
            f"trial accuracy on the validation images, 1 SE of the difference): {_met(d['met'])}. "
            + "; ".join(worst)
        )
    head = summary["headline"]
    if head:
        sp = ", ".join(f"{head['speedup'][m]:.2f}x ({label[m]})" for m in models)
        lines.append(
            f"- Fastest verified architecture within 0.5 point of all-normal's longer-budget test "
            f"accuracy: {_met(summary['headline_met'])}: {head['name']} ({head['arch_summary']}) "
            f"{_pct(head['test_acc'], 2)} +- {_pct(head['test_se'], 2)} vs all-normal "
            f"{_pct(head['normal_test_acc'], 2)} +- {_pct(head['normal_test_se'], 2)}; speed-up "
            f"{sp}; the paper: {PAPER_SPEEDUP}x."
        )
    else:
        lines.append(
            "- Fastest verified architecture within 0.5 point of all-normal's longer-budget test "
            "accuracy: **not met**: none verified within 0.5 point (or all-normal not "
            f"verified), so no speed-up to set beside the paper's {PAPER_SPEEDUP}x."
        )
    tau = summary["kendall_tau"]
    lines.append(
        f"- Kendall tau (trial accuracy vs longer-budget test accuracy) >= 0.6: "
        f"{_met(tau is not None and tau >= 0.6)}: tau "
        f"{'-' if tau is None else f'{tau:.2f}'} over {summary['kendall_n']} architectures."
    )
    within = sum(d["met"] for d in summary["dnas"])
    lines.append(
        f"- Differentiable points on or within 1 SE of the Optuna front: "
        f"{_met(summary['dnas_met'])}: {within}/{len(summary['dnas'])} (point x latency model); "
        f"compute: differentiable {summary['dnas_compute_s'] / 60:.1f} min (supernets and "
        f"fine-tunes) for {len({d['lambda'] for d in summary['dnas']})} points, Optuna "
        f"{summary['optuna_compute_s'] / 60:.1f} min (all its trials): "
        + (
            f"{summary['dnas_compute_s'] / summary['optuna_compute_s']:.2f}x Optuna's."
            if summary["optuna_compute_s"]
            else "-."
        )
    )
    noise = "; ".join(
        f"{n}: trial {_pct(v['proxy_spread'], 2)} pt, longer {_pct(v['long_spread'], 2)} pt"
        for n, v in summary["noise"].items()
    )
    lines += [
        "",
        f"Noise (|difference| between seeds): {noise}.",
        "",
        f"Figure: `{figure.name}`.",
        "",
        "## Verified architectures (accuracy %, binomial SE in brackets)",
        "",
        "| name | Pareto layer | architecture | trial val | longer test | "
        + " | ".join(f"ms {label[m]}" for m in models)
        + " |",
        "|---|---|---|---|---|" + "---|" * len(models),
    ]
    by_arch = {p["arch"]: p for p in points["optuna"]}
    for v in summary["verified"]:
        lat = by_arch[v["arch"]]["latency_ms"]
        lines.append(
            f"| {v['name']} | {v.get('pareto_layer') or 'reference'} | {v['arch_summary']} "
            f"| {_pct(v['val_acc'])} ({_pct(v['val_se'])}) "
            f"| {_pct(v['long']['test_acc'])} ({_pct(v['long']['test_se'])}) | "
            + " | ".join(f"{lat[m]:.3f}" for m in models)
            + " |"
        )
    for m in models:
        lines += [
            "",
            f"## Optuna front, {label[m]}",
            "",
            "| trial | reference | val acc | ms | architecture |",
            "|---|---|---|---|---|",
        ]
        for p in front(points["optuna"], m):
            lines.append(
                f"| {p['number']} | {p['reference'] or ''} | {_pct(p['val_acc'])} "
                f"({_pct(p['val_se'])}) | {p['latency_ms'][m]:.3f} | {p['arch_summary']} |"
            )
    lines += ["", "## Differentiable points", "", "| model | lambda | val acc | ms | front acc |"]
    lines.append("|---|---|---|---|---|")
    for d in summary["dnas"]:
        lines.append(
            f"| {label[d['model']]} | {d['lambda']:g} | {_pct(d['val_acc'])} "
            f"({_pct(d['val_se'])}) | {d['latency_ms']:.3f} | {_pct(d['front_acc'])} |"
        )
    lines += [
        "",
        f"The second pricing ({label[models[-1]]}) re-prices the same trained trials with a "
        "latency table measured on this machine; nothing was retrained for it. Timings measured "
        "while other work shares the cores are noisier (the load is in the machine line).",
    ]
    del m0
    return "\n".join(lines) + "\n"


def _model_label(m: str) -> str:
    return {"a73": "Cortex-A73 analytical", "here": "measured here"}.get(m, m)


def _val_acc(p: dict) -> float:
    return p["val_acc"]


def write_figure(summary: dict, points: dict, path_stem: Path) -> Path:
    """One panel per latency model; PNG via plotly's static export (kaleido) when installed,
    else a self-contained HTML file (plotly only)."""
    from plotly.subplots import make_subplots

    models = summary["models"]
    fig = make_subplots(rows=1, cols=len(models), subplot_titles=[_model_label(m) for m in models])
    verified = {v["arch"]: v for v in summary["verified"]}
    for i, m in enumerate(models, start=1):
        show = i == 1
        sampled = [p for p in points["optuna"] if not p["reference"]]
        refs = [p for p in points["optuna"] if p["reference"]]
        fr = front(points["optuna"], m)

        def add(pts, name, mode="markers", acc=_val_acc, m=m, col=i, show=show, **marker):
            fig.add_scatter(
                x=[p["latency_ms"][m] for p in pts],
                y=[100 * acc(p) for p in pts],
                mode=mode,
                name=name,
                legendgroup=name,
                showlegend=show,
                text=[p.get("reference") or p["arch_summary"] for p in pts],
                marker=marker,
                row=1,
                col=col,
            )

        add(sampled, "Optuna trials", color="lightgray", size=6)
        add(fr, "Optuna front", mode="lines+markers", color="royalblue", size=8)
        add(refs, "references", mode="markers+text", color="black", symbol="square", size=8)
        add(points["dnas"], "differentiable", color="crimson", symbol="diamond", size=10)
        ver = [p for p in points["optuna"] if p["arch"] in verified]
        ver = list({p["arch"]: p for p in ver}.values())
        add(
            ver,
            "longer budget (test)",
            acc=lambda p: verified[p["arch"]]["long"]["test_acc"],
            color="seagreen",
            symbol="circle-open",
            size=11,
        )
        fig.update_xaxes(title_text="latency (ms)", row=1, col=i)
        fig.update_yaxes(title_text="accuracy (%)", row=1, col=i)
    fig.update_layout(width=650 * len(models), height=520, title="cifar10_mini: accuracy-latency")
    if importlib.util.find_spec("kaleido") is not None:
        path = path_stem.with_suffix(".png")
        tmp = path.with_name(f".{path.name}.tmp")
        try:  # kaleido drives a Chrome or Chromium; without one, the HTML below
            fig.write_image(str(tmp), format="png")
            tmp.replace(path)
            return path
        except Exception as err:  # noqa: BLE001
            tmp.unlink(missing_ok=True)
            why = (str(err).strip().splitlines() or [type(err).__name__])[0]
            _log(f"warning: no PNG ({why}); writing HTML instead")
    path = path_stem.with_suffix(".html")
    atomic_write_text(path, fig.to_html(include_plotlyjs=True, full_html=True))
    return path


# --------------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="search_real.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--data-dir",
        help="CIFAR-10 (ImageFolder: train/ and test/ of class folders, or torchvision's python "
        "batches); default: the shared archive unpacked into the cache",
    )
    p.add_argument(
        "--synthetic",
        action="store_true",
        help="the project's generated images instead of CIFAR-10 (tests; figures meaningless)",
    )
    p.add_argument(
        "--work-dir",
        default=str(Path("~/.cache/wasearch/bench/search_real")),
        help="studies, base and latency table",
    )
    p.add_argument("--out", default=str(HERE / "results" / "search_real.json"))
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: idle cores)")
    p.add_argument(
        "--tiny",
        action="store_true",
        help="a minutes-long smoke run (tiny subsets, two trials, one verification; figures "
        "mean nothing)",
    )
    p.add_argument("--fresh", action="store_true", help="discard the rows and studies; redo all")
    return p


def _data_location(args) -> tuple[dict, Path | None]:
    """The data section the spaces get, and the ImageFolder/torchvision root (None: synthetic).
    A missing dataset is one UserError line naming where the images are expected."""
    from wasearch.data import ensure_shared_cifar10

    if args.synthetic:
        return {"dataset": "synthetic", "data_dir": None}, None
    if args.data_dir:
        root = Path(args.data_dir).expanduser().resolve()
        if not root.is_dir():
            raise UserError(
                f"--data-dir {root}: no such folder; CIFAR-10 is expected there in ImageFolder "
                "(train/, test/ of class folders) or torchvision layout (cifar-10-batches-py/)"
            )
    else:
        root = ensure_shared_cifar10()
        if root is None:
            raise UserError(
                "no CIFAR-10 found: pass --data-dir with a copy in ImageFolder (train/, test/) "
                "or torchvision layout (e.g. ~/.cache/wasearch/data after: python train.py "
                "--dataset cifar10 --download ...), or put the shared archive at "
                "../shared/data/cifar10-jpeg.tar.gz"
            )
    return {"dataset": "cifar10", "data_dir": str(root), "download": False}, root


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    from wasearch.engine import select_device
    from wasearch.latency import load_latency_model
    from wasearch.latency.timing import device_slug, machine_line
    from wasearch.search.base import default_threads, load_space_data, set_threads

    t_start = time.perf_counter()
    setting = tiny_setting() if args.tiny else Setting()
    device = str(select_device(args.device))
    machine = machine_line(device, threads=args.threads or default_threads())
    _log(f"# machine: {machine}")
    data_section, root = _data_location(args)
    space = make_space(SPACE, setting.space_overrides, data_section)
    dnas_space = make_space(DNAS_SPACE, setting.dnas_overrides, data_section)
    if root is not None:
        from wasearch.data import load_real_cifar10

        d = space.data
        data = load_real_cifar10(
            root,
            val_fraction=d["val_fraction"],
            limit_train=d["limit_train"],
            limit_test=d["limit_test"],
            seed=space.seed,
        )
    else:
        data = load_space_data(space)

    key = {
        "space": {k: v for k, v in space.raw.items() if k != "data"}
        | {"data": {k: v for k, v in space.raw["data"].items() if k != "data_dir"}},
        "dnas_space": {k: v for k, v in dnas_space.raw.items() if k != "data"},
        "long_epochs": setting.long_epochs,
        "long_lr": setting.long_lr,
        "front_max": setting.front_max,
        "noise_archs": list(setting.noise_archs),
        "verify_max": setting.verify_max,
        "seed": space.seed,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
    work = Path(args.work_dir).expanduser() / (("tiny-" if args.tiny else "") + digest[:10])
    out = Path(args.out)
    if args.fresh and work.is_dir():
        shutil.rmtree(work)  # this benchmark's own folder (named by the setting's digest)
    results = Results(setting=json.loads(json.dumps(key, default=str)), machine=machine)
    if out.is_file() and not args.fresh:
        try:
            old = json.loads(out.read_text())
        except (OSError, ValueError) as err:
            raise UserError(f"--out {out}: cannot be read ({err}); pass --fresh") from None
        if old.get("setting") == results.setting:
            results.rows, results.seconds = old.get("rows", {}), old.get("seconds", 0.0)
            _log(f"resuming: {len(results.rows)} rows of {out} kept")
    studies = work / "studies"
    studies.mkdir(parents=True, exist_ok=True)
    atomic_write_text(work / "setting.json", json.dumps(key, indent=1, default=str))
    set_threads(args.threads)
    rows = results.rows
    seed = space.seed

    # (a) the shared base
    from wasearch.search.run import RunOptions, pretrain

    if "base" not in rows:
        t0 = time.perf_counter()
        options = RunOptions(results=str(studies), device=device, threads=args.threads)
        base = pretrain(space, options, progress=False)
        info = json.loads((base.parent / "done.json").read_text())
        _record(results, out, "base", {"path": str(base), **info}, t0)
    base = Path(rows["base"]["path"])

    # (b) the Optuna search, the references among its trials
    if "search" not in rows:
        t0 = time.perf_counter()
        queued = queue_f6_references(space, studies)
        if queued:
            _log(f"queued {', '.join(queued)} after the study's references")
        _record(results, out, "search", run_study(space, studies, device, args.threads), t0)

    # (c) the differentiable sweep of the twin space, from a copy of the same base
    if "dnas" not in rows:
        t0 = time.perf_counter()
        twin_base = studies / dnas_space.name / "base"
        if not (twin_base / "done.json").is_file():
            if twin_base.exists():
                shutil.rmtree(twin_base)
            shutil.copytree(base.parent, twin_base)
        lambdas = dnas_space.strategy["lambdas"]
        row = run_study(dnas_space, studies, device, args.threads, trials=len(lambdas))
        _record(results, out, "dnas", row, t0)

    # (d) the second pricing: a latency table measured here, once
    table_path = work / "latency" / f"{device_slug('cpu', threads=setting.measure_threads)}.csv"
    if "latency_table" not in rows:
        t0 = time.perf_counter()
        _record(
            results, out, "latency_table", measure_latency_table(space, table_path, setting), t0
        )
    models = {
        "a73": load_latency_model(dict(space.latency)),
        "here": load_latency_model(
            {"kind": "table", "path": rows["latency_table"]["path"], "fallback": "calibrate"}
        ),
    }
    study, _ = _open(space, studies)
    dstudy, _ = _open(dnas_space, studies)
    points = {
        "optuna": trial_points(study, models, "optuna"),
        "dnas": [
            p for p in trial_points(dstudy, models, "dnas") if p["source"] == "differentiable"
        ],
    }

    # (e) verification: the set is a function of the finished study, so it is chosen again on
    # every run (a rule changed between runs re-records it; finished rows stay, keyed by name)
    chosen = verification_set(points["optuna"], setting, "a73")
    if rows.get("verify_set", {}).get("archs") != chosen:
        _record(results, out, "verify_set", {"archs": chosen, "seconds": 0.0}, time.perf_counter())
    vset = rows["verify_set"]["archs"]
    plan: list[tuple[str, str, int]] = [("long", v["name"], seed) for v in vset]
    names = {v["name"] for v in vset}
    for n in setting.noise_archs:
        if n in names:
            plan += [("proxy", n, seed + 1), ("long", n, seed + 1)]
    by_name = {v["name"]: v for v in vset}
    for i, (kind, name, s) in enumerate(plan):
        k = f"{kind}|{name}|{s}"
        if k in rows:
            continue
        t0 = time.perf_counter()
        arch = Arch.from_yaml(by_name[name]["arch"], source=name)
        _log(f"[{i + 1}/{len(plan)}] {k}: {arch.summary()}")
        if kind == "long":
            row = long_run(arch, space, base, data, setting, s, device)
        else:
            row = proxy_rerun(arch, space, base, data, s, device)
        _record(results, out, k, row, t0)

    # report
    summary = analyse(results, points, list(models), setting)
    given = list(argv if argv is not None else sys.argv[1:])
    command = " ".join(["python benchmarks/search_real.py", *given])
    stem = out.with_suffix("")
    figure = write_figure(summary, points, stem)
    text = render(results, summary, points, command, figure)
    atomic_write_text(out.with_suffix(".md"), text)
    snapshot = {**asdict(results), "points": points, "summary": summary}
    atomic_write_text(out, json.dumps(snapshot, indent=1, default=str))
    print(text)
    print(
        json.dumps(
            {
                "benchmark": "search_real",
                "machine": machine,
                "rows": len(rows),
                "trials": len(points["optuna"]),
                "dnas_points": len(points["dnas"]),
                "verified": len(summary["verified"]),
                "kendall_tau": summary["kendall_tau"],
                "dominance_met": {m: d["met"] for m, d in summary["dominance"].items()},
                "headline": summary["headline"],
                "figure": str(figure),
                "wall_s": round(time.perf_counter() - t_start, 1),
            },
            default=str,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
