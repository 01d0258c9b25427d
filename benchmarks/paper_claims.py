#!/usr/bin/env python
"""The Winograd-aware paper's claims, reproduced in miniature on real CIFAR-10 images.

Fernandez-Marques et al., "Searching for Winograd-aware Quantized Networks" (MLSys 2020): a
network trained with direct convolution loses accuracy when its 3x3 layers run as 8-bit Winograd
F4/F6, because the transforms amplify quantization error; training with the Winograd pipeline in
the forward pass recovers it, and learning the transforms ("flex") recovers more than keeping them
fixed ("static"). Andri et al. (2022) add tap-wise quantization: one scale per tile position.

Sections, all on the same trained normal 8-bit ResNet-18-like model (the "base"):

1. Numerical error: on real activations of the base, the relative error of each quantized
   Winograd-aware layer against the float direct convolution, by tile, bits and granularity;
   then which quantizer makes the error (one stage quantized at a time).
2. Conversion without training: every searchable conv swapped to static Winograd, only the
   Winograd-domain ranges warmed up on a few batches; test accuracy.
3. Adaptation: the same fine-tuning budget from the base for static and flex, per-tensor and
   tap-wise, F4 and F6; test accuracy beside the base given the same extra budget.
4. Diagnostics: flex with a larger learning rate for its transforms, how far the transforms
   moved, and the quantization error of the adapted layers against their own float pipeline.
5. (``--long-steps N``) A longer budget: static against flex per-tensor with N steps, to see
   whether the gap closes, holds or widens as the budget grows.
6. (``--full``, or ``--scratch-epochs N``) From scratch: the paper's own protocol.
7. The fidelity frontier (``frontier.py``): F6 8-bit and F4/F6 at 6 and 4 bits against normal
   at the same bits, converted and adapted under section 3's budget, for each lever (per-tap
   power-of-two transform scales, a wider Winograd domain, distillation from the base) alone
   and combined, with each configuration's numerical error stage by stage.

Default mode: width 0.25, 20,000 training images, 2,000 test images, a short base schedule and a
short adaptation budget; sized for 2 CPU cores. ``--full``: the paper's setting (width 0.5, all
of CIFAR-10, 120 epochs), meant for a GPU. The trained base is cached under ``--work-dir`` and
reused. A rerun keeps the rows of the earlier run at ``--out`` that were measured on the same base
checkpoint (by content) with the same setting, and measures only what is missing (``--fresh``
measures everything again).

    python benchmarks/paper_claims.py                        # miniature, CPU
    python benchmarks/paper_claims.py --full --device cuda   # the paper's setting
    python benchmarks/paper_claims.py --only frontier --out benchmarks/results/frontier.md

Prints the tables, writes ``benchmarks/results/paper_claims.md`` and ``paper_claims.json``, and
prints one JSON line last.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import logging
import math
import os
import platform
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from wasearch.arch import Arch, LayerChoice
from wasearch.cli import UserError, run_main
from wasearch.data import (
    BatchLoader,
    DataSplits,
    load_real_cifar10,
)
from wasearch.engine import (
    TrainConfig,
    evaluate,
    fit,
    init_from_checkpoint,
    load_checkpoint,
    select_device,
    warmup_ranges,
)
from wasearch.fileio import atomic_write_text
from wasearch.latency.timing import machine_line
from wasearch.layers import Conv2d, WinogradConv2d
from wasearch.models import build, make_conv
from wasearch.quant import FakeQuantize
from wasearch.stats import binomial_se
from wasearch.winograd import transform_matrices, winograd_conv2d


def _load_frontier():
    """benchmarks/frontier.py (beside this script) as a module."""
    name = "frontier_for_paper_claims"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("frontier.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


frontier = _load_frontier()

RESULTS = Path(__file__).resolve().parent / "results"
STAGES = ("input", "weight", "transform", "weight_wd", "input_wd", "product", "output")
SECTIONS = ("error", "conversion", "adaptation", "long", "frontier", "scratch")


@dataclass(frozen=True)
class Setting:
    """Everything that sizes a run; printed and saved with the results."""

    name: str
    width: float  # channel multiplier of the ResNet-18-like
    train_images: int | None  # None: the whole training split
    val_fraction: float  # held out of train before the cap; only for per-epoch logs
    test_images: int | None  # class-balanced test subset; None: all 10,000
    batch_size: int
    base_epochs: int  # normal 8-bit base, from scratch
    base_lr: float
    adapt_steps: int  # fine-tuning budget of every adaptation run, in batches
    adapt_chunks: int  # ... run as this many short epochs, lr x0.1 after 3/5 and 4/5 of them
    adapt_lr: float
    adapt_tiles: tuple[int, ...]  # tiles of the adaptation table
    transform_lr_scales: tuple[float, ...]  # diagnostic: flex transforms' lr = scale * adapt_lr
    transform_lr_tiles: tuple[int, ...]  # ... for these tiles (per-tensor)
    long_steps: int  # investigation: static vs flex per-tensor with this budget; 0: none
    long_tiles: tuple[int, ...]  # ... for these tiles
    warmup_batches: int  # Winograd-domain range warm-up after a swap
    error_images: int  # test images whose activations the numerical error is measured on
    calib_batches: int  # training batches that set the ranges for the numerical error
    scratch_epochs: int  # 0: no from-scratch section
    seed: int = 0
    # The fidelity frontier (section 5, frontier.py): (tile, bits) pairs, flattened
    frontier_cells: tuple[int, ...] = (6, 8, 4, 6, 4, 4, 6, 6, 4, 8)
    frontier_distill: float = 0.5  # distillation weight of the frontier's distilled rows


MINIATURE = Setting(
    name="miniature",
    width=0.25,
    train_images=20_000,
    val_fraction=0.01,
    test_images=2_000,
    batch_size=64,
    base_epochs=5,
    base_lr=1e-3,
    adapt_steps=250,
    adapt_chunks=5,
    adapt_lr=1e-3,
    adapt_tiles=(4, 6),
    transform_lr_scales=(10.0,),
    transform_lr_tiles=(4,),  # F6 too: --transform-lr-tiles 4 6 (4 min more)
    long_steps=0,  # opt in: --long-steps 1000 (about 50 min more on 2 cores, F6)
    long_tiles=(6,),
    warmup_batches=10,
    error_images=128,
    calib_batches=4,
    scratch_epochs=0,
)

FULL = Setting(
    name="full",
    width=0.5,
    train_images=None,
    val_fraction=0.1,
    test_images=None,
    batch_size=64,
    base_epochs=120,
    base_lr=1e-3,
    adapt_steps=7_000,  # about 10 epochs of 45,000 images
    adapt_chunks=10,
    adapt_lr=1e-3,
    adapt_tiles=(4, 6),
    transform_lr_scales=(10.0,),
    transform_lr_tiles=(4, 6),
    long_steps=0,  # the from-scratch section answers it
    long_tiles=(4, 6),
    warmup_batches=10,
    error_images=512,
    calib_batches=8,
    scratch_epochs=120,
)


@dataclass
class Report:
    """What the run measured; becomes the markdown tables and the JSON."""

    setting: dict
    machine: dict
    command: str = ""
    data: dict = field(default_factory=dict)
    base: dict = field(default_factory=dict)
    error: list[dict] = field(default_factory=list)
    error_by_layer: list[dict] = field(default_factory=list)
    error_by_stage: list[dict] = field(default_factory=list)
    spread: list[dict] = field(default_factory=list)
    flex_initial_equals_static: bool | None = None
    conversion: list[dict] = field(default_factory=list)
    adaptation: list[dict] = field(default_factory=list)
    long: list[dict] = field(default_factory=list)
    scratch: list[dict] = field(default_factory=list)
    frontier: list[dict] = field(default_factory=list)
    frontier_error: list[dict] = field(default_factory=list)
    seconds: dict = field(default_factory=dict)
    reused: dict = field(default_factory=dict)  # section -> rows taken from an earlier run


# --------------------------------------------------------------------------------------------
# Small helpers


def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _pct(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def _noise_line(acc: float | None, n: int | None) -> str:
    """What every test accuracy of the tables is worth: its binomial standard error on the
    ``n`` test images (:func:`wasearch.stats.binomial_se`), at the base's accuracy; two rows
    closer than about 1.4 of it are the same to this measurement. Also says how the tables
    write each row's own standard error and that of a difference."""
    se = binomial_se(acc, n)
    if se is None:
        return "Standard error of the accuracies: unknown (no test image count recorded)."
    return (
        f"Noise: every test accuracy below is measured on the same {n:,} test images; its "
        f"binomial standard error is ±{100 * se:.2f} points near {_pct(acc)}% (sqrt(p(1-p)/n)), "
        f"so rows closer than about {100 * se * math.sqrt(2):.1f} points are indistinguishable. "
        "Every accuracy cell is written 'accuracy % (its standard error in points)', from that "
        "row's own accuracy; a difference of two accuracies carries sqrt(se1^2 + se2^2), which "
        "treats the two as independent. They were measured on the same test images, so their "
        "errors are correlated and that figure overstates the noise of a difference (it errs on "
        "the side of calling two rows the same)."
    )


def _test_n(report: Report, row: dict | None = None) -> int | None:
    """Test images an accuracy was measured on: the row's own count where it records one,
    else the run's test split."""
    n = (row or {}).get("test_images")
    return n if n is not None else report.data.get("test")


def _acc_se(acc: float | None, n: int | None) -> str:
    """``acc`` in % with its binomial standard error in points: ``69.2 (1.03)``."""
    if acc is None or (isinstance(acc, float) and math.isnan(acc)):
        return "-"
    se = binomial_se(acc, n)
    return _pct(acc) if se is None else f"{_pct(acc)} ({100 * se:.2f})"


def _diff_se(a: float | None, b: float | None, n_a: int | None, n_b: int | None) -> str:
    """``a - b`` in points with the standard error of the difference, sqrt(se_a^2 + se_b^2)
    (the two taken as independent): ``+16.8 (1.45)``."""
    if a is None or b is None:
        return "-"
    se_a, se_b = binomial_se(a, n_a), binomial_se(b, n_b)
    if se_a is None or se_b is None:
        return f"{100 * (a - b):+.1f}"
    return f"{100 * (a - b):+.1f} ({100 * math.sqrt(se_a**2 + se_b**2):.2f})"


def _machine_text(machine: dict) -> str:
    """The machine a report's rows were measured on, as the report recorded it: the machine
    line of :func:`wasearch.latency.timing.machine_line` where it has one; reports written
    before it had only a summary, which is shown as such (never this machine's line)."""
    if machine.get("line"):
        return machine["line"]
    text = machine.get("summary") or "not recorded"
    return f"{text} (as recorded; its CPU model, ISA and load average were not recorded)"


def _sci(x: float | None) -> str:
    return "-" if x is None else f"{x:.2e}"


def _md_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _label(choice: LayerChoice) -> str:
    if choice.conv == "normal":
        return f"normal {choice.bits}-bit"
    gran = "tap-wise" if choice.granularity == "tap" else "per-tensor"
    return f"{choice.conv} F{choice.tile} {choice.bits}-bit {gran}"


def _searchable(model: nn.Module) -> dict[str, nn.Module]:
    modules = dict(model.named_modules())
    return {name: modules[name] for name in model.arch.layer_names}


def _loader(data: DataSplits, split, setting: Setting, *, train: bool, device) -> BatchLoader:
    return BatchLoader(
        split,
        batch_size=setting.batch_size if train else 256,
        mean=data.mean,
        std=data.std,
        shuffle=train,
        augment=train,
        device=device,
        seed=setting.seed,
    )


def _test_accuracy(model: nn.Module, data: DataSplits, setting: Setting, device) -> float:
    return evaluate(model, _loader(data, data.test, setting, train=False, device=device))[1]


def _config(setting: Setting, steps: int | None = None, **changes) -> TrainConfig:
    # The budget as short epochs, so that the paper's step schedule (x0.1 at 3/5 and 4/5)
    # anneals it: at a constant lr even the normal model loses accuracy it had when annealed.
    steps = setting.adapt_steps if steps is None else steps
    base = TrainConfig(
        epochs=setting.adapt_chunks,
        batch_size=setting.batch_size,
        lr=setting.adapt_lr,
        seed=setting.seed,
        warmup_batches=setting.warmup_batches,
        max_batches_per_epoch=math.ceil(steps / setting.adapt_chunks),
    )
    return replace(base, **changes)


def _steps(config: TrainConfig) -> int:
    return config.epochs * (config.max_batches_per_epoch or 0)


# --------------------------------------------------------------------------------------------
# Reusing an earlier run's rows

# Setting fields that only choose which rows to measure; every other field changes what a row
# means, so an earlier run's rows stand for this run's only where those agree.
_PLAN_FIELDS = (
    "name",
    "frontier_cells",
    "frontier_distill",
    "adapt_tiles",
    "transform_lr_scales",
    "transform_lr_tiles",
    "long_steps",
    "long_tiles",
    "scratch_epochs",
)


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def previous_results(path: Path, setting: Setting, base_digest: str) -> Report | None:
    """The report an earlier run left at ``path``, when its rows can stand for this run's: the
    same base checkpoint (by content) and the same setting apart from which rows to run."""
    if not path.is_file():
        return None
    try:
        report = Report(**json.loads(path.read_text()))
    except (ValueError, TypeError) as err:
        _log(f"reuse: {path} is not a report of this script ({err}); measuring everything")
        return None
    if report.base.get("sha256") != base_digest:
        _log(f"reuse: {path} was measured on another base model; measuring everything")
        return None
    mine = json.loads(json.dumps(asdict(setting)))  # tuples as lists, as the file has them
    differ = [k for k in mine if k not in _PLAN_FIELDS and report.setting.get(k) != mine[k]]
    if differ:
        _log(f"reuse: {path} had another {', '.join(differ)}; measuring everything")
        return None
    return report


# What the error section measured: taken together from an earlier run, or not at all.
_ERROR_FIELDS = (
    "error",
    "error_by_layer",
    "error_by_stage",
    "spread",
    "flex_initial_equals_static",
)


def _conversion_key(row: dict) -> tuple:
    return (row["tile"], row["bits"], row["granularity"], row.get("float_transforms", False))


def _run_key(row: dict, default_steps: int) -> tuple:
    return (
        row["conv"],
        row["tile"],
        row["granularity"],
        row["transform_lr"],
        row.get("steps", default_steps),
    )


def _row_key(section: str, default_steps: int):
    """What identifies a row of ``section`` (rows saved before rows had ``steps``: the run's
    ``adapt_steps``)."""
    if section == "conversion":
        return _conversion_key
    if section == "frontier":
        return frontier.row_key
    if section == "frontier_error":
        return frontier.error_key
    return lambda row: _run_key(row, default_steps)


def _merged(report: Report, previous: Report | None, finished: set[str]) -> dict:
    """``report`` as a dict, with the rows of ``previous`` that belong to sections this run has
    not finished (not reached yet, or skipped) and that it has not measured itself."""
    state = asdict(report)
    if previous is None:
        return state
    old = asdict(previous)
    if "error" not in finished and not state["error"]:
        state.update({key: old[key] for key in _ERROR_FIELDS})
    for section in ("conversion", "adaptation", "long", "scratch", "frontier", "frontier_error"):
        if section in finished or section == "frontier_error" and "frontier" in finished:
            continue
        key = _row_key(section, previous.setting["adapt_steps"])
        have = {key(r) for r in state[section]}
        state[section] = state[section] + [r for r in old[section] if key(r) not in have]
    return state


def _reusable(previous: Report | None, section: str) -> dict[tuple, dict]:
    if previous is None:
        return {}
    rows = getattr(previous, section)
    key = _row_key(section, previous.setting["adapt_steps"])
    if section in ("conversion", "frontier", "frontier_error"):
        return {key(r): r for r in rows}
    return {key(r): {"steps": previous.setting["adapt_steps"], **r} for r in rows}


# --------------------------------------------------------------------------------------------
# Data and the base model


def load_data(setting: Setting, data_dir: str | None) -> DataSplits:
    return load_real_cifar10(
        data_dir,
        val_fraction=setting.val_fraction,
        limit_train=setting.train_images,
        limit_test=setting.test_images,
        seed=setting.seed,
    )


def _base_key(setting: Setting) -> str:
    keys = (
        "width",
        "train_images",
        "val_fraction",
        "test_images",
        "batch_size",
        "base_epochs",
        "base_lr",
        "seed",
    )
    text = json.dumps({k: getattr(setting, k) for k in keys}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def train_base(
    setting: Setting, data: DataSplits, work_dir: Path, device, *, retrain: bool
) -> Path:
    """Train (or reuse) the normal 8-bit base; returns its checkpoint."""
    run = work_dir / f"base-{setting.name}-{_base_key(setting)}"
    ckpt = run / "last.pt"
    if ckpt.is_file() and not retrain:
        if load_checkpoint(ckpt).epoch == setting.base_epochs:
            _log(f"base: reusing {ckpt}")
            return ckpt
    if run.exists():
        for name in ("last.pt", "best.pt"):
            (run / name).unlink(missing_ok=True)
    arch = Arch.uniform("normal", None, 8, width=setting.width)
    config = TrainConfig(
        epochs=setting.base_epochs,
        batch_size=setting.batch_size,
        lr=setting.base_lr,
        seed=setting.seed,
    )
    _log(f"base: training normal 8-bit, width {setting.width}, {setting.base_epochs} epochs")
    fit(build(arch), data, config, out_dir=run, device=device, progress=False, log=_log)
    return ckpt


def adapted_model(
    arch: Arch,
    base_ckpt: Path,
    loader: BatchLoader,
    batches: int,
    *,
    float_transforms: bool = False,
) -> nn.Module:
    """``arch`` initialized from the base; the new (Winograd-domain) ranges warmed up.

    ``float_transforms`` leaves the transform matrices unquantized (a diagnostic)."""
    model = build(arch)
    init_from_checkpoint(model, base_ckpt)
    if float_transforms:
        for module in model.modules():
            if isinstance(module, WinogradConv2d):
                module.q_transform.bits = None
    warmup_ranges(model, loader, batches)
    return model


# --------------------------------------------------------------------------------------------
# Numerical error on real activations


@torch.no_grad()
def capture_inputs(model: nn.Module, batches: Iterable[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The input of every searchable conv of ``model`` (eval mode) on ``batches``."""
    seen: dict[str, list[torch.Tensor]] = {}
    hooks = []
    for name, module in _searchable(model).items():

        def hook(_m, args, name=name):
            seen.setdefault(name, []).append(args[0].detach().clone())

        hooks.append(module.register_forward_pre_hook(hook))
    model.eval()
    try:
        for x in batches:
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return {name: torch.cat(xs) for name, xs in seen.items()}


def _error_images(data: DataSplits, setting: Setting, device) -> torch.Tensor:
    """The first ``error_images`` test images: what the numerical-error tables measure on."""
    loader = BatchLoader(
        data.test, batch_size=setting.error_images, mean=data.mean, std=data.std, device=device
    )
    return next(iter(loader))[0]


def _error_inputs(base: nn.Module, data: DataSplits, setting: Setting, device):
    """Every searchable conv's input in the base: on ``calib_batches`` training batches (they
    set the ranges) and on the error images (they measure)."""
    loader = _loader(data, data.train, setting, train=False, device=device)
    batches = [x for (x, _), _ in zip(loader, range(setting.calib_batches), strict=False)]
    test_x = _error_images(data, setting, device)
    return capture_inputs(base, batches), capture_inputs(base, [test_x])


def _rel_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _layer_from_base(base_conv: Conv2d, choice: LayerChoice, stages: Sequence[str] | None):
    """A conv of ``choice`` with the base conv's weight and input/output ranges; with ``stages``
    only those quantizers stay on."""
    layer = make_conv(base_conv.in_channels, base_conv.out_channels, choice)
    state = {
        k: v
        for k, v in base_conv.state_dict().items()
        if k == "weight" or k.startswith(("q_input.", "q_output."))
    }
    layer.load_state_dict(state, strict=False)
    if stages is not None:
        for stage in STAGES:
            q = getattr(layer, f"q_{stage}", None)
            if isinstance(q, FakeQuantize) and stage not in stages:
                q.bits = None
    return layer


@torch.no_grad()
def _run_layer(
    layer: nn.Module, calib: torch.Tensor, test: torch.Tensor, batch: int
) -> torch.Tensor:
    warmup_ranges(layer, [(x, None) for x in calib.split(batch)], batches=10**6)
    layer.eval()
    return torch.cat([layer(x) for x in test.split(batch)])


@torch.no_grad()
def _domain_amax(layer: WinogradConv2d, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Largest magnitude at every tile position of the Winograd-domain weights, inputs and
    products of ``layer`` (its transforms as used, float otherwise) on inputs ``x``."""
    amax: dict[str, torch.Tensor] = {}

    class _Probe(nn.Module):
        def __init__(self, key: str) -> None:
            super().__init__()
            self.key = key

        def forward(self, t: torch.Tensor) -> torch.Tensor:
            a = t.abs().reshape(t.shape[0], -1).amax(dim=1)
            amax[self.key] = a if self.key not in amax else torch.maximum(amax[self.key], a)
            return t

    quant = {k: _Probe(k) for k in ("weight_wd", "input_wd", "product")}
    A_t, G, B_t = layer.transforms()
    for chunk in x.split(64):
        winograd_conv2d(chunk, layer.weight, A_t, G, B_t, quant=quant)
    return amax


def numerical_error(
    base: nn.Module, data: DataSplits, setting: Setting, report: Report, device
) -> None:
    """Layer by layer, on real activations of the base: quantized WA layer vs float conv."""
    calib, test = _error_inputs(base, data, setting, device)
    convs = _searchable(base)
    batch = setting.batch_size
    rows: dict[tuple, list[float]] = {}
    for name, conv in convs.items():
        x, xc = test[name], calib[name]
        ref = F.conv2d(x, conv.weight, padding=1)
        for bits in (8, 16):
            direct = Conv2d(conv.in_channels, conv.out_channels, 3, 1, 1, bits=bits)
            direct.load_state_dict(conv.state_dict())
            direct.eval()
            with torch.no_grad():
                err = _rel_error(direct(x), ref)
            rows.setdefault(("direct", None, bits, "-"), []).append(err)
            report.error_by_layer.append(
                {
                    "layer": name,
                    "conv": "direct",
                    "tile": None,
                    "bits": bits,
                    "granularity": "-",
                    "error": err,
                }
            )
        for tile in (2, 4, 6):
            # The tile the uniform architecture gives this layer (F6 does not fit 4x4 inputs).
            fit_tile = Arch.uniform("static", tile, 8, width=setting.width).choice(name).tile
            for bits in (8, 16):
                for gran in ("tensor", "tap"):
                    choice = LayerChoice("static", fit_tile, bits, gran)
                    y = _run_layer(_layer_from_base(conv, choice, None), xc, x, batch)
                    err = _rel_error(y, ref)
                    rows.setdefault(("static", tile, bits, gran), []).append(err)
                    report.error_by_layer.append(
                        {
                            "layer": name,
                            "conv": "static",
                            "tile": fit_tile,
                            "bits": bits,
                            "granularity": gran,
                            "error": err,
                        }
                    )
            # Flex at initialization: the same matrices and quantizers, so the same outputs.
            if report.flex_initial_equals_static is not False:
                s = _run_layer(
                    _layer_from_base(conv, LayerChoice("static", fit_tile, 8), None), xc, x, batch
                )
                f = _run_layer(
                    _layer_from_base(conv, LayerChoice("flex", fit_tile, 8), None), xc, x, batch
                )
                report.flex_initial_equals_static = bool(torch.equal(s, f))
            # Which quantizer makes the error: one stage at a time, 8 bits.
            if tile in (4, 6):
                for gran in ("tensor", "tap"):
                    choice = LayerChoice("static", fit_tile, 8, gran)
                    for stage in (*STAGES, "all"):
                        if gran == "tap" and stage not in ("weight_wd", "input_wd", "product"):
                            continue  # identical to per-tensor: only these three are tap-wise
                        stages = STAGES if stage == "all" else (stage,)
                        y = _run_layer(_layer_from_base(conv, choice, stages), xc, x, batch)
                        rows.setdefault(("stage", tile, stage, gran), []).append(
                            _rel_error(y, ref)
                        )
                spread_layer = _layer_from_base(conv, LayerChoice("static", fit_tile, 8), None)
                for key, amax in _domain_amax(spread_layer, x).items():
                    amax = amax.clamp_min(1e-12)
                    rows.setdefault(("spread", tile, key), []).append(
                        (amax.max() / amax.min()).item()
                    )
        _log(f"error: {name} done")
    for key, values in rows.items():
        entry = {"mean": sum(values) / len(values), "max": max(values), "layers": len(values)}
        if key[0] in ("direct", "static"):
            report.error.append(
                {"conv": key[0], "tile": key[1], "bits": key[2], "granularity": key[3], **entry}
            )
        elif key[0] == "stage":
            report.error_by_stage.append(
                {"tile": key[1], "stage": key[2], "granularity": key[3], **entry}
            )
        else:
            values = sorted(values)
            report.spread.append(
                {
                    "tile": key[1],
                    "tensor": key[2],
                    "median": values[len(values) // 2],
                    "max": values[-1],
                }
            )


# --------------------------------------------------------------------------------------------
# Conversion and adaptation


def conversion(
    base_ckpt: Path,
    data: DataSplits,
    setting: Setting,
    report: Report,
    device,
    reuse: dict[tuple, dict],
    save=lambda: None,
) -> None:
    warm = _loader(data, data.train, setting, train=False, device=device)
    runs = [
        (bits, tile, gran, False)
        for bits in (8, 16)
        for tile in (2, 4, 6)
        for gran in ("tensor", "tap")
    ]
    # Diagnostic: 8 bits everywhere except the transform matrices themselves.
    runs += [(8, tile, gran, True) for tile in (2, 4, 6) for gran in ("tensor", "tap")]
    for bits, tile, gran, float_transforms in runs:
        if (tile, bits, gran, float_transforms) in reuse:
            report.conversion.append(reuse[(tile, bits, gran, float_transforms)])
            report.reused["conversion"] = report.reused.get("conversion", 0) + 1
            continue
        arch = Arch.uniform("static", tile, bits, granularity=gran, width=setting.width)
        model = adapted_model(
            arch, base_ckpt, warm, setting.warmup_batches, float_transforms=float_transforms
        ).to(device)
        acc = _test_accuracy(model, data, setting, device)
        report.conversion.append(
            {
                "tile": tile,
                "bits": bits,
                "granularity": gran,
                "float_transforms": float_transforms,
                "test_acc": acc,
            }
        )
        note = ", float transforms" if float_transforms else ""
        _log(f"conversion: F{tile} {bits}-bit {gran}{note}: {100 * acc:.1f}%")
        save()


def _transform_drift(model: nn.Module) -> float | None:
    """Mean over flex layers of ||T - T_0|| / ||T_0||, over A^T, G and B^T together."""
    drifts = []
    for module in _searchable(model).values():
        if isinstance(module, WinogradConv2d) and module.mode == "flex":
            ref = transform_matrices(module.tile)
            num = sum(
                (t.detach().cpu() - r).norm() ** 2
                for t, r in zip((module.A_t, module.G, module.B_t), ref, strict=True)
            )
            den = sum(r.norm() ** 2 for r in ref)
            drifts.append(math.sqrt(float(num / den)))
    return sum(drifts) / len(drifts) if drifts else None


@torch.no_grad()
def _adapted_errors(model: nn.Module, x: torch.Tensor) -> dict[str, float | None]:
    """On the model's own activations, over its WA layers: the mean relative error of each
    quantized layer against its own float pipeline (same transforms, nothing quantized) and
    against the float direct conv, and the median spread of the Hadamard product's per-position
    ranges (max / min over tile positions)."""
    inputs = capture_inputs(model, [x])
    own, direct, spread = [], [], []
    for name, module in _searchable(model).items():
        if not isinstance(module, WinogradConv2d):
            continue
        xi = inputs[name]
        y = module(xi)
        ref_own = winograd_conv2d(xi, module.weight, module.A_t, module.G, module.B_t)
        own.append(_rel_error(y, ref_own))
        direct.append(_rel_error(y, F.conv2d(xi, module.weight, padding=1)))
        amax = _domain_amax(module, xi)["product"].clamp_min(1e-12)
        spread.append((amax.max() / amax.min()).item())
    if not own:
        return {"error_vs_own_float": None, "error_vs_direct": None, "product_spread": None}
    return {
        "error_vs_own_float": sum(own) / len(own),
        "error_vs_direct": sum(direct) / len(direct),
        "product_spread": sorted(spread)[len(spread) // 2],
    }


def _fine_tune(
    choice: LayerChoice | None,
    base_ckpt: Path,
    data: DataSplits,
    setting: Setting,
    device,
    *,
    config: TrainConfig,
    epochs_from_scratch: int = 0,
) -> dict:
    """Fine-tune (or, with ``epochs_from_scratch``, train) one uniform architecture."""
    model = build(_uniform(choice or LayerChoice("normal", None, 8), setting))
    t0 = time.perf_counter()
    init_from = None if epochs_from_scratch else base_ckpt
    fit(model, data, config, device=device, init_from=init_from, progress=False, log=_log)
    seconds = time.perf_counter() - t0
    model.to(device)
    acc = _test_accuracy(model, data, setting, device)
    test_x = _error_images(data, setting, device)
    errors = _adapted_errors(model, test_x)
    return {
        "config": "normal 8-bit" if choice is None else _label(choice),
        "conv": "normal" if choice is None else choice.conv,
        "tile": None if choice is None else choice.tile,
        "granularity": None if choice is None else choice.granularity,
        "transform_lr": config.transform_lr if choice is not None else None,
        "steps": _steps(config),
        "test_acc": acc,
        **errors,
        "transform_drift": _transform_drift(model),
        "seconds": seconds,
    }


def fine_tune_runs(
    runs: list[tuple[LayerChoice | None, TrainConfig]],
    section: str,
    base_ckpt: Path,
    data: DataSplits,
    setting: Setting,
    report: Report,
    device,
    reuse: dict[tuple, dict],
    save,
) -> None:
    rows: list[dict] = getattr(report, section)
    for choice, cfg in runs:
        key = (
            "normal" if choice is None else choice.conv,
            None if choice is None else choice.tile,
            None if choice is None else choice.granularity,
            None if choice is None else cfg.transform_lr,
            _steps(cfg),
        )
        if key in reuse:
            rows.append(reuse[key])
            report.reused[section] = report.reused.get(section, 0) + 1
            continue
        row = _fine_tune(choice, base_ckpt, data, setting, device, config=cfg)
        rows.append(row)
        _log(
            f"{section}: {row['config']} (transform lr {row['transform_lr']}, "
            f"{row['steps']} steps): {100 * row['test_acc']:.1f}%  ({row['seconds']:.0f}s)"
        )
        save()  # a long run keeps every finished row, for a rerun to reuse


def adaptation_runs(setting: Setting) -> list[tuple[LayerChoice | None, TrainConfig]]:
    """The adaptation section: normal, then static and flex per tile and granularity, then flex
    per-tensor at each transform lr scale; all with the ``adapt_steps`` budget."""
    config = _config(setting)
    runs: list[tuple[LayerChoice | None, TrainConfig]] = [(None, config)]
    for tile in setting.adapt_tiles:
        for gran in ("tensor", "tap"):
            for conv in ("static", "flex"):
                runs.append((LayerChoice(conv, tile, 8, gran), config))
    for scale in setting.transform_lr_scales:
        for tile in setting.transform_lr_tiles:
            tuned = replace(config, transform_lr=scale * setting.adapt_lr)
            runs.append((LayerChoice("flex", tile, 8, "tensor"), tuned))
    return runs


def long_runs(setting: Setting) -> list[tuple[LayerChoice | None, TrainConfig]]:
    """Static against flex (at the weights' lr and at each transform lr scale), per-tensor, with
    ``long_steps`` instead of ``adapt_steps``: does the gap close, hold or widen when the budget
    grows?"""
    config = _config(setting, steps=setting.long_steps)
    runs: list[tuple[LayerChoice | None, TrainConfig]] = []
    for tile in setting.long_tiles:
        runs.append((LayerChoice("static", tile, 8, "tensor"), config))
        runs.append((LayerChoice("flex", tile, 8, "tensor"), config))
        for scale in setting.transform_lr_scales:
            tuned = replace(config, transform_lr=scale * setting.adapt_lr)
            runs.append((LayerChoice("flex", tile, 8, "tensor"), tuned))
    return runs


def _uniform(choice: LayerChoice, setting: Setting) -> Arch:
    """Every searchable conv of the setting's network ``choice`` (F6 falls back to F4 where it
    does not fit, as the paper's uniform networks do)."""
    return Arch.uniform(
        choice.conv,
        choice.tile,
        choice.bits,
        granularity=choice.granularity,
        transforms=choice.transforms,
        wd_bits=choice.wd_bits,
        width=setting.width,
    )


def _frontier_pairs(cells: tuple[int, ...]) -> list[tuple[int, int]]:
    """``--frontier-cells`` as (tile, bits) pairs; one :class:`UserError` line if it is not."""
    if len(cells) % 2:
        raise UserError(f"--frontier-cells: {list(cells)} must be (tile, bits) pairs")
    pairs = list(zip(cells[::2], cells[1::2], strict=True))
    for tile, bits in pairs:
        if tile not in (2, 4, 6) or not 2 <= bits <= 16:
            raise UserError(f"--frontier-cells: ({tile}, {bits}) is not a tile 2/4/6, bits 2..16")
    return pairs


def frontier_section(
    base: nn.Module,
    base_ckpt: Path,
    data: DataSplits,
    setting: Setting,
    report: Report,
    device,
    reuse: dict[tuple, dict],
    reuse_errors: dict[tuple, dict],
    save,
) -> None:
    """Section 7: F6 and sub-8-bit Winograd, lever by lever (``frontier.py``)."""
    pairs = _frontier_pairs(setting.frontier_cells)
    warm = _loader(data, data.train, setting, train=False, device=device)

    def uniform(choice: LayerChoice) -> Arch:
        return _uniform(choice, setting)

    def convert(choice: LayerChoice) -> float:
        model = adapted_model(uniform(choice), base_ckpt, warm, setting.warmup_batches)
        return _test_accuracy(model.to(device), data, setting, device)

    def adapt(lever) -> dict:
        config = _config(setting, distill=lever.distill)
        model = build(uniform(lever.choice))
        t0 = time.perf_counter()
        fit(model, data, config, device=device, init_from=base_ckpt, progress=False, log=_log)
        seconds = time.perf_counter() - t0
        acc = _test_accuracy(model.to(device), data, setting, device)
        return {"test_acc": acc, "steps": _steps(config), "seconds": seconds}

    captured: dict[str, dict[str, torch.Tensor]] = {}

    def layer_errors(choice: LayerChoice, stages) -> list[float]:
        if not captured:
            captured["calib"], captured["test"] = _error_inputs(base, data, setting, device)
        arch = uniform(choice)  # F6 falls back to F4 where it does not fit
        errs = []
        for name, conv in _searchable(base).items():
            x, xc = captured["test"][name], captured["calib"][name]
            ref = F.conv2d(x, conv.weight, padding=1)
            layer = _layer_from_base(conv, arch.choice(name), stages)
            errs.append(_rel_error(_run_layer(layer, xc, x, setting.batch_size), ref))
        return errs

    kept = frontier.measure(
        frontier.plan(setting.frontier_distill, pairs),
        convert=convert,
        adapt=adapt,
        layer_errors=layer_errors,
        rows=report.frontier,
        error_rows=report.frontier_error,
        reuse=reuse,
        reuse_errors=reuse_errors,
        save=save,
        log=_log,
    )
    if kept:
        report.reused["frontier"] = kept


def from_scratch(base_ckpt: Path, data: DataSplits, setting: Setting, report: Report, device):
    config = TrainConfig(
        epochs=setting.scratch_epochs,
        batch_size=setting.batch_size,
        lr=setting.base_lr,
        seed=setting.seed,
    )
    for tile in setting.adapt_tiles:
        for gran in ("tensor", "tap"):
            for conv in ("static", "flex"):
                choice = LayerChoice(conv, tile, 8, gran)
                row = _fine_tune(
                    choice,
                    base_ckpt,
                    data,
                    setting,
                    device,
                    config=config,
                    epochs_from_scratch=setting.scratch_epochs,
                )
                report.scratch.append(row)
                _log(f"scratch: {row['config']}: {100 * row['test_acc']:.1f}%")


# --------------------------------------------------------------------------------------------
# Output


def _conversion_index(report: Report) -> dict[tuple, float]:
    return {
        (c["tile"], c["bits"], c["granularity"], c.get("float_transforms", False)): c["test_acc"]
        for c in report.conversion
    }


def render(report: Report) -> str:
    s = report.setting
    out = [
        "# The paper's claims in miniature, on real CIFAR-10",
        "",
        f"`{report.command}`" if report.command else "",
        "",
        f"Machine{' of the rows this run measured' if report.reused else ''}: "
        f"{_machine_text(report.machine)}.",
        "",
        f"Mode **{s['name']}**: ResNet-18-like width {s['width']}, "
        f"{report.data.get('train', '?'):,} training images "
        f"({'all' if s['train_images'] is None else 'a class-balanced subset'}), "
        f"{report.data.get('test', '?'):,} test images, batch {s['batch_size']}. "
        f"Base: normal 8-bit, {s['base_epochs']} epochs from scratch, Adam lr {s['base_lr']:g} "
        f"(x0.1 at 3/5 and 4/5). "
        f"{'This run (rows kept from an earlier one not counted)' if report.reused else 'Total'}"
        f" time {report.seconds.get('total', 0) / 60:.1f} min wall, "
        f"{report.seconds.get('cpu', 0) / 60:.1f} min CPU.",
        "",
        f"Base model (normal 8-bit): **{_pct(report.base.get('test_acc'))}%** test accuracy"
        + (
            f" (standard error {100 * se_base:.2f} points)."
            if (se_base := binomial_se(report.base.get("test_acc"), _test_n(report))) is not None
            else "."
        ),
        "",
        _noise_line(report.base.get("test_acc"), report.data.get("test")),
        "",
    ]
    if report.error or report.conversion or report.adaptation:
        _render_core(report, out)
    if report.long:
        out += [
            "",
            f"## 5. A longer budget: {s['long_steps']} steps instead of {s['adapt_steps']}",
            "",
            "Static against flex (at the weights' lr and at the larger transform lr of section "
            "4), per-tensor, 8 bits, the same schedule stretched; does the gap close, hold or "
            "widen as the budget grows? Test accuracy % (standard error); 'flex - static' in "
            "points (standard error of the difference, the two taken as independent), one per "
            "flex column.",
            "",
        ]
        lrs = [None, *(scale * s["adapt_lr"] for scale in s["transform_lr_scales"])]
        # Every per-tensor run by (conv, tile, transform lr, steps): the table's cells.
        by_run = {
            (r["conv"], r["tile"], r["transform_lr"], r.get("steps", s["adapt_steps"])): r
            for r in (*report.adaptation, *report.long)
            if r["granularity"] == "tensor"
        }
        rows = []
        for tile in s["long_tiles"]:
            for steps in (s["adapt_steps"], s["long_steps"]):
                st = by_run.get(("static", tile, None, steps))
                cells = [by_run.get(("flex", tile, lr, steps)) for lr in lrs]
                gaps = [
                    _diff_se(
                        fl["test_acc"], st["test_acc"], _test_n(report, fl), _test_n(report, st)
                    )
                    if st and fl
                    else "-"
                    for fl in cells
                ]
                rows.append(
                    (
                        f"F{tile} 8-bit per-tensor",
                        steps,
                        _acc_se(st["test_acc"], _test_n(report, st)) if st else "-",
                        *(
                            _acc_se(fl["test_acc"], _test_n(report, fl)) if fl else "-"
                            for fl in cells
                        ),
                        " / ".join(gaps),
                    )
                )
        header = (
            "configuration",
            "steps",
            "static",
            "flex",
            *(f"flex, transform lr {lr:g}" for lr in lrs[1:]),
            "flex - static",
        )
        out.append(_md_table(header, rows))
    if report.scratch:
        out += ["", f"## 6. From scratch, {s['scratch_epochs']} epochs (the paper's protocol)", ""]
        out.append(
            _md_table(
                ("configuration", "test acc % (SE)"),
                [
                    (r["config"], _acc_se(r["test_acc"], _test_n(report, r)))
                    for r in report.scratch
                ],
            )
        )
    if report.frontier or report.frontier_error:
        out += [
            "",
            frontier.render(
                report.frontier,
                report.frontier_error,
                report.base.get("test_acc"),
                s["adapt_steps"],
                acc=lambda a: _acc_se(a, _test_n(report)),
                diff=lambda a, b: _diff_se(a, b, _test_n(report), _test_n(report)),
                pct=_pct,
                table=_md_table,
            ),
        ]
    if report.reused:
        out += [
            "",
            "Rows kept from an earlier run with the same base checkpoint and setting (not "
            "measured again): "
            + ", ".join(f"{k} {v}" for k, v in report.reused.items())
            + ". "
            + (
                "They were measured on: " + "; ".join(report.machine["earlier_rows"]) + "."
                if report.machine.get("earlier_rows")
                else "The machine they were measured on was not recorded."
            ),
        ]
    out += [
        "",
        "Seconds per section: "
        + ", ".join(f"{k} {v:.0f}" for k, v in report.seconds.items())
        + ".",
        "",
    ]
    return "\n".join(out)


def _render_core(report: Report, out: list[str]) -> None:
    """Sections 1-4 (numerical error, conversion, adaptation, diagnostics) into ``out``."""
    s = report.setting
    out += [
        "## 1. Numerical error on real activations",
        "",
        f"Relative error ||y - y_ref|| / ||y_ref|| of each searchable layer's output against the "
        f"float direct convolution (same weights), on the base model's own inputs to that layer "
        f"for {s['error_images']} test images; ranges set on {s['calib_batches']} training "
        "batches. Mean (max) over the 16 layers. F6 falls back to F4 on the 4x4 layers of the "
        "last stage, as the uniform architectures do. 'direct' is the quantized direct conv "
        "(input, weight and output quantized): the floor every Winograd row sits on.",
        "",
    ]
    err = {(e["conv"], e["tile"], e["bits"], e["granularity"]): e for e in report.error}

    def cell(key):
        e = err.get(key)
        return "-" if e is None else f"{_sci(e['mean'])} ({_sci(e['max'])})"

    rows = [
        ("direct", "-", cell(("direct", None, 8, "-")), "-", cell(("direct", None, 16, "-")), "-")
    ]
    for tile in (2, 4, 6):
        rows.append(
            (
                f"static F{tile}",
                "",
                *(cell(("static", tile, b, g)) for b in (8, 16) for g in ("tensor", "tap")),
            )
        )
    rows = [(r[0], *r[2:]) for r in rows]
    out.append(
        _md_table(
            (
                "layer",
                "8-bit per-tensor",
                "8-bit tap-wise",
                "16-bit per-tensor",
                "16-bit tap-wise",
            ),
            rows,
        )
    )
    out += [
        "",
        "Flex at initialization computes exactly what static does (the same Cook-Toom matrices "
        "and quantizers): "
        + (
            "verified bit-for-bit on every layer, so it has no row of its own. "
            if report.flex_initial_equals_static
            else "NOT identical (a bug). "
        )
        + "Flex differs only after training: see section 4.",
        "",
        "Which quantizer makes the error (8 bits, one stage quantized at a time, the rest float; "
        "mean over layers). Only the three Winograd-domain stages have a tap-wise form:",
        "",
    ]
    stage = {(e["tile"], e["stage"], e["granularity"]): e["mean"] for e in report.error_by_stage}
    rows = []
    for st in (*STAGES, "all"):
        row = [st]
        for tile in (4, 6):
            row.append(_sci(stage.get((tile, st, "tensor"))))
            row.append(_sci(stage.get((tile, st, "tap"))) if (tile, st, "tap") in stage else "=")
        rows.append(row)
    out.append(
        _md_table(
            ("quantized stage", "F4 per-tensor", "F4 tap-wise", "F6 per-tensor", "F6 tap-wise"),
            rows,
        )
    )
    if report.spread:
        out += [
            "",
            "Why one scale fails: the largest magnitude at each of the (m+2)^2 tile positions, "
            "max over positions / min over positions (median and max over layers):",
            "",
        ]
        rows = [
            (f"F{e['tile']}", e["tensor"], f"{e['median']:.3g}", f"{e['max']:.3g}")
            for e in sorted(report.spread, key=lambda e: (e["tile"], e["tensor"]))
        ]
        out.append(_md_table(("tile", "tensor", "median spread", "max spread"), rows))

    out += [
        "",
        "## 2. Conversion without training",
        "",
        f"The base model with every searchable conv swapped to static Winograd; weights, "
        f"BatchNorm and input/output ranges kept, the Winograd-domain ranges warmed up on "
        f"{s['warmup_batches']} training batches; no fine-tuning. Test accuracy % (standard "
        f"error); base {_acc_se(report.base.get('test_acc'), _test_n(report))}.",
        "",
    ]
    conv = _conversion_index(report)
    n_test = _test_n(report)
    rows = [
        (
            f"F{t}",
            *(
                _acc_se(conv.get((t, b, g, False)), n_test)
                for b in (8, 16)
                for g in ("tensor", "tap")
            ),
            *(_acc_se(conv.get((t, 8, g, True)), n_test) for g in ("tensor", "tap")),
        )
        for t in (2, 4, 6)
    ]
    out.append(
        _md_table(
            (
                "tile",
                "8-bit per-tensor",
                "8-bit tap-wise",
                "16-bit per-tensor",
                "16-bit tap-wise",
                "8-bit per-tensor, float transforms",
                "8-bit tap-wise, float transforms",
            ),
            rows,
        )
    )

    out += [
        "",
        "## 3. Adaptation under one budget",
        "",
        f"From the base, every configuration fine-tuned for the same {s['adapt_steps']} batches "
        f"of {s['batch_size']} (Adam lr {s['adapt_lr']:g}, x0.1 after 3/5 and 4/5 of the "
        "budget; weight decay 4e-5 on weights only, none on flex transforms), after the range "
        "warm-up above. "
        "Test accuracy % (standard error); 'flex - static' in points (standard error of the "
        "difference, the two taken as independent).",
        "",
    ]
    main_rows = [r for r in report.adaptation if r["transform_lr"] is None]
    ad = {(r["conv"], r["tile"], r["granularity"]): r for r in main_rows}
    normal = ad.get(("normal", None, None))
    out += [
        f"Normal 8-bit: base {_acc_se(report.base.get('test_acc'), n_test)}, the base "
        "fine-tuned with the same budget "
        f"{_acc_se(normal['test_acc'], _test_n(report, normal)) if normal else '-'}.",
        "",
    ]
    rows = []
    for tile in s["adapt_tiles"]:
        for gran in ("tensor", "tap"):
            st, fl = ad.get(("static", tile, gran)), ad.get(("flex", tile, gran))
            conv_acc = conv.get((tile, 8, gran, False))
            rows.append(
                (
                    f"F{tile} 8-bit {'tap-wise' if gran == 'tap' else 'per-tensor'}",
                    _acc_se(conv_acc, n_test),
                    _acc_se(st["test_acc"], _test_n(report, st)) if st else "-",
                    _acc_se(fl["test_acc"], _test_n(report, fl)) if fl else "-",
                    _diff_se(
                        fl["test_acc"], st["test_acc"], _test_n(report, fl), _test_n(report, st)
                    )
                    if st and fl
                    else "-",
                )
            )
    out.append(
        _md_table(
            ("configuration", "converted (no training)", "static", "flex", "flex - static"), rows
        )
    )

    out += [
        "",
        "## 4. Diagnostics: why flex does (not) pull ahead",
        "",
        "Flex with its own learning rate for the transforms (the weights keep the base lr), and "
        "for every adapted model: how far the flex transforms moved from Cook-Toom "
        "(||T - T0|| / ||T0||, A^T, G, B^T together, mean over layers), and each Winograd layer's "
        "quantization error on the adapted model's own activations against its own float "
        "pipeline (same transforms, nothing quantized) and against the float direct conv; "
        "'product spread' is the median over layers of the Hadamard product's largest "
        "per-position magnitude over its smallest (section 1 measures it on the base).",
        "",
    ]
    rows = []
    for r in (*report.adaptation, *report.long):
        if r["conv"] == "normal":
            continue
        lr = "base" if r["transform_lr"] is None else f"{r['transform_lr']:g}"
        rows.append(
            (
                r["config"],
                r.get("steps", s["adapt_steps"]),
                lr if r["conv"] == "flex" else "-",
                _acc_se(r["test_acc"], _test_n(report, r)),
                "-" if r["transform_drift"] is None else f"{r['transform_drift']:.3f}",
                _sci(r["error_vs_own_float"]),
                _sci(r["error_vs_direct"]),
                "-" if r["product_spread"] is None else f"{r['product_spread']:.3g}",
            )
        )
    out.append(
        _md_table(
            (
                "configuration",
                "steps",
                "transform lr",
                "test acc % (SE)",
                "transform drift",
                "error vs own float",
                "error vs direct conv",
                "product spread",
            ),
            rows,
        )
    )


def summary(report: Report) -> dict:
    """The headline figures, for the JSON line."""
    conv = _conversion_index(report)
    ad = {
        (r["conv"], r["tile"], r["granularity"], r["transform_lr"]): r["test_acc"]
        for r in report.adaptation
    }
    out: dict[str, object] = {
        "benchmark": "paper_claims",
        "machine": _machine_text(report.machine),  # where the rows were measured
        "mode": report.setting["name"],
        "width": report.setting["width"],
        "train_images": report.data.get("train"),
        "test_images": report.data.get("test"),
        "base_test_acc": report.base.get("test_acc"),
        "base_test_acc_se": binomial_se(report.base.get("test_acc"), _test_n(report)),
        "flex_initial_equals_static": report.flex_initial_equals_static,
    }
    for e in report.error:
        if e["conv"] == "static":
            out[f"error_F{e['tile']}_{e['bits']}bit_{e['granularity']}"] = e["mean"]
    for (tile, bits, gran, float_transforms), acc in conv.items():
        suffix = "_float_transforms" if float_transforms else ""
        out[f"convert_F{tile}_{bits}bit_{gran}{suffix}"] = acc
    out["adapt_normal_8bit"] = ad.get(("normal", None, None, None))
    for tile in report.setting["adapt_tiles"]:
        for gran in ("tensor", "tap"):
            st, fl = ad.get(("static", tile, gran, None)), ad.get(("flex", tile, gran, None))
            out[f"adapt_static_F{tile}_{gran}"] = st
            out[f"adapt_flex_F{tile}_{gran}"] = fl
            if st is not None and fl is not None:
                out[f"flex_minus_static_F{tile}_{gran}"] = fl - st
    for (_conv, tile, gran, tlr), acc in ad.items():
        if tlr is not None:
            out[f"adapt_flex_F{tile}_{gran}_transform_lr_{tlr:g}"] = acc
    for r in report.long:
        out[f"long_{r['conv']}_F{r['tile']}_{r['steps']}_steps"] = r["test_acc"]
    for r in report.scratch:
        out[f"scratch_{r['conv']}_F{r['tile']}_{r['granularity']}"] = r["test_acc"]
    out.update(frontier.summary(report.frontier))
    out["seconds"] = round(report.seconds.get("total", 0.0), 1)
    out["cpu_seconds"] = round(report.seconds.get("cpu", 0.0), 1)
    return out


# --------------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="paper_claims.py",
        description="The Winograd-aware paper's claims in miniature on real CIFAR-10.",
    )
    p.add_argument(
        "--full",
        action="store_true",
        help="the paper's setting: width 0.5, all of CIFAR-10, 120 epochs (a GPU)",
    )
    p.add_argument(
        "--data-dir",
        help="CIFAR-10 in ImageFolder or torchvision layout "
        "(default: the shared archive, unpacked to the cache)",
    )
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, ...")
    p.add_argument(
        "--work-dir", help="where the base model is cached (default <cache>/paper_claims)"
    )
    p.add_argument("--retrain", action="store_true", help="retrain the base even if cached")
    p.add_argument(
        "--fresh",
        action="store_true",
        help="start a new report and measure every row; by default the rows of an earlier run "
        "at --out's .json with the same base checkpoint and setting are kept, so a rerun "
        "measures only what is new",
    )
    p.add_argument(
        "--out",
        default=str(RESULTS / "paper_claims.md"),
        help="markdown report (a .json with the same stem is written beside it)",
    )
    p.add_argument(
        "--render-only",
        action="store_true",
        help="measure nothing: write --out's markdown again from the .json beside it (the "
        "rows and the machine they were measured on, as stored) and print it; the other "
        "options are ignored",
    )
    p.add_argument(
        "--skip",
        nargs="*",
        default=[],
        choices=SECTIONS,
        help="sections to leave out",
    )
    p.add_argument(
        "--only",
        nargs="+",
        choices=SECTIONS,
        help="run only these sections (the base is trained or reused either way); with --out "
        "to a new file, a report of them alone",
    )
    overrides = p.add_argument_group(
        "overrides of the mode's setting (see Setting in this file for what each one does)"
    )
    for f in Setting.__dataclass_fields__.values():
        if f.name == "name":
            continue
        kind = f.type if isinstance(f.type, str) else f.type.__name__
        flag = f"--{f.name.replace('_', '-')}"
        mini, full = (getattr(m, f.name) for m in (MINIATURE, FULL))
        helptext = (
            f"miniature {'all' if mini is None else mini}, full {'all' if full is None else full}"
        )
        if "tuple" in kind:
            number = int if "int" in kind else float
            overrides.add_argument(flag, nargs="+", type=number, help=helptext)
        else:
            overrides.add_argument(flag, type=float if "float" in kind else int, help=helptext)
    return p


def _machine(device: torch.device) -> dict:
    cores = os.cpu_count()
    text = f"{cores} CPU cores ({platform.machine()}), torch {torch.__version__}"
    if device.type == "cuda":
        text = f"{torch.cuda.get_device_name(device)}, " + text
    else:
        text += f", {torch.get_num_threads()} threads"
    return {
        "summary": text,
        "line": machine_line(device, threads=torch.get_num_threads()),
        "device": str(device),
        "cores": cores,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def render_only(out_md: Path) -> int:
    """Write ``out_md`` again from the report stored beside it (``.json``), measuring nothing;
    print it and the summary line. The machine shown is the one stored with the rows."""
    out_json = out_md.with_suffix(".json")
    if not out_json.is_file():
        raise UserError(f"--render-only: no stored report at {out_json}")
    try:
        report = Report(**json.loads(out_json.read_text()))
    except (ValueError, TypeError) as err:
        raise UserError(
            f"--render-only: {out_json} is not a report of this script ({err})"
        ) from None
    atomic_write_text(out_md, render(report))
    _log(f"render-only: {out_md} written from {out_json}; nothing measured on this machine")
    print(render(report))
    print(json.dumps(summary(report)))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.render_only:
        return render_only(Path(args.out))
    if args.only and args.skip:
        raise UserError("--only and --skip: give one of them")
    if args.only:
        args.skip = [name for name in SECTIONS if name not in args.only]
    if args.long_tiles is not None and any(t not in (2, 4, 6) for t in args.long_tiles):
        raise UserError(f"--long-tiles: {args.long_tiles} must be tiles among 2, 4, 6")
    if args.frontier_distill is not None and not 0 < args.frontier_distill <= 1:
        raise UserError(f"--frontier-distill: {args.frontier_distill} must be in (0, 1]")
    if args.frontier_cells is not None:
        _frontier_pairs(tuple(args.frontier_cells))
    logging.basicConfig(level=logging.WARNING)
    setting = FULL if args.full else MINIATURE
    changes = {}
    for name in Setting.__dataclass_fields__:
        value = getattr(args, name, None)
        if value is not None and name != "name":
            changes[name] = tuple(value) if isinstance(value, list) else value
    if changes:
        setting = replace(setting, **changes)
    try:
        device = select_device(args.device)
    except ValueError as err:
        raise UserError(f"--device: {err}") from None
    from wasearch.data import cache_root

    work_dir = Path(args.work_dir) if args.work_dir else cache_root() / "paper_claims"
    out_md = Path(args.out)
    out_md.parent.mkdir(parents=True, exist_ok=True)
    argv = sys.argv[1:] if argv is None else list(argv)
    report = Report(
        setting=asdict(setting),
        machine=_machine(device),
        command=" ".join(["python benchmarks/paper_claims.py", *argv]),
    )
    t_start = time.perf_counter()
    cpu_start = time.process_time()
    torch.manual_seed(setting.seed)

    data = load_data(setting, args.data_dir)
    report.data = {
        "train": len(data.train),
        "val": len(data.val) if data.val else 0,
        "test": len(data.test),
        "name": data.name,
    }
    _log(f"data: {report.data}; setting {setting}")

    t = time.perf_counter()
    base_ckpt = train_base(setting, data, work_dir, device, retrain=args.retrain)
    base = load_checkpoint(base_ckpt, device=device).model
    report.base = {
        "checkpoint": str(base_ckpt),
        "sha256": file_digest(base_ckpt),
        "test_acc": _test_accuracy(base, data, setting, device),
    }
    report.seconds["base"] = time.perf_counter() - t
    _log(f"base: test accuracy {100 * report.base['test_acc']:.1f}%")
    out_json = out_md.with_suffix(".json")
    previous = None
    if not args.fresh:
        previous = previous_results(out_json, setting, report.base["sha256"])
    if previous is not None:
        # The rows kept from it were measured there, not here: say where, as it recorded it.
        earlier = [_machine_text(previous.machine), *previous.machine.get("earlier_rows", [])]
        report.machine["earlier_rows"] = list(dict.fromkeys(earlier))

    def error_section() -> None:
        if previous is not None and previous.error:
            for key in _ERROR_FIELDS:
                setattr(report, key, getattr(previous, key))
            report.reused["error"] = len(report.error)
            return
        numerical_error(base, data, setting, report, device)

    def rows(section: str) -> dict[tuple, dict]:
        return _reusable(previous, section)

    def fine_tune(section: str, runs: list[tuple[LayerChoice | None, TrainConfig]]) -> None:
        fine_tune_runs(
            runs, section, base_ckpt, data, setting, report, device, rows(section), save
        )

    finished: set[str] = set()

    def save() -> None:
        """Write the tables so far, atomically; an earlier run's rows that this run has not
        reached (or skips) stay in the files, so a crash or a --skip loses nothing."""
        state = _merged(report, previous, finished)
        atomic_write_text(out_md, render(Report(**state)))
        atomic_write_text(out_json, json.dumps(state, indent=1))

    sections = (
        ("error", error_section),
        (
            "conversion",
            lambda: conversion(base_ckpt, data, setting, report, device, rows("conversion"), save),
        ),
        ("adaptation", lambda: fine_tune("adaptation", adaptation_runs(setting))),
        ("long", lambda: fine_tune("long", long_runs(setting))),
        (
            "frontier",
            lambda: frontier_section(
                base,
                base_ckpt,
                data,
                setting,
                report,
                device,
                rows("frontier"),
                rows("frontier_error"),
                save,
            ),
        ),
        ("scratch", lambda: from_scratch(base_ckpt, data, setting, report, device)),
    )
    for name, run in sections:
        if name in args.skip or (name == "scratch" and setting.scratch_epochs <= 0):
            continue
        if name == "long" and setting.long_steps <= 0:
            continue
        t = time.perf_counter()
        run()
        if report.reused.get(name):
            _log(f"{name}: {report.reused[name]} rows kept from {out_json}")
        report.seconds[name] = time.perf_counter() - t
        report.seconds["total"] = time.perf_counter() - t_start
        finished.add(name)
        save()  # after every section too, so a long run leaves its tables as it goes
    report.seconds["total"] = time.perf_counter() - t_start
    report.seconds["cpu"] = time.process_time() - cpu_start
    save()
    final = Report(**_merged(report, previous, finished))
    print(render(final))
    print(json.dumps(summary(final)))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
