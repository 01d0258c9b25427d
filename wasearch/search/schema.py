"""The space file's schema: every key with its default, and the checks that read it key by key.

:data:`DEFAULTS` is the single list of default values (documented in ``spaces/README.md``).
:func:`check_sections` validates every section of a parsed space except the per-layer choice
expansion (:mod:`wasearch.search.choices`) and returns the sections with their defaults filled;
:class:`Reader` raises the one-line ``UserError('<file>: <key>: <problem>')`` every check ends in.
The limits of a choice (conv kinds, tiles, granularities, bit-widths) come from the torch-free
:mod:`wasearch.geometry`, the one place that defines them.
"""

from __future__ import annotations

import copy
import importlib.util
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..arch import ArchError, LayerChoice
from ..cli import UserError
from ..data import DATASETS
from ..geometry import (
    BACKBONES,
    CONV_KINDS,
    GRANULARITIES,
    MAX_BITS,
    MIN_BITS,
    SPACE_TILES,
    TRANSFORM_SCALES,
)

__all__ = [
    "CHOICE_VALUE_KEYS",
    "DEFAULTS",
    "OBJECTIVES",
    "PRUNERS",
    "SPACE_TILES",
    "STRATEGIES",
    "TIES",
    "Reader",
    "check_sections",
    "study_name_problem",
]

STRATEGIES = ("nsga2", "tpe", "random", "gp", "differentiable")
TIES = ("layer", "block", "stage", "all")
PRUNERS = ("median", "none")
# Objective names as stored in the study (docs/study_format.md) and their directions.
OBJECTIVES = {
    "accuracy": "maximize",
    "latency_ms": "minimize",
    "params": "minimize",
    "bitops": "minimize",
}
OBJECTIVE_ALIASES = {"latency": "latency_ms", "acc": "accuracy", "val_acc": "accuracy"}
#: Every key of a space with its default (None: no default / not set). One place, one comment each.
DEFAULTS: dict[str, dict[str, Any]] = {
    "model": {
        "name": "resnet18_cifar",  # or torchvision:NAME | timm:NAME | package.module:function
        "kwargs": None,  # keyword arguments of the model's builder (not the paper's network)
        "checkpoint": None,  # a state_dict of the user's own model to start from
        "backbone": "resnet18",  # the paper's network (name: resnet18_cifar)
        "width": 0.5,  # its channel multiplier (the paper's 0.5)
        "input_size": 32,  # image side; data of another size are resized and center-cropped
        "num_classes": None,  # default: the dataset's
    },
    "data": {
        "dataset": "synthetic",  # synthetic | cifar10 | cifar100 | imagefolder
        "data_dir": None,  # dataset folder (CIFAR default: ~/.cache/wasearch/data)
        "download": False,  # let torchvision download CIFAR when missing
        "val_fraction": 0.1,  # held out from train; trials are selected on it, never on test
        "limit_train": None,  # at most this many training images (quick runs)
        "limit_test": None,  # at most this many test images
        "batch_size": 64,
    },
    "base": {
        "conv": "normal",  # the shared pretrained base every trial starts from
        "tile": None,
        "bits": 8,
        "granularity": "tensor",
        "epochs": 30,
        "lr": 1e-3,
        "transform_lr": None,  # Adam lr of flex transforms (None: lr)
        "max_batches": None,  # cap batches per epoch (quick runs)
    },
    "trial": {
        "epochs": 2,  # fine-tuning epochs per trial (the adaptation shortcut)
        # Adam lr; auto: 5x the last lr of the base's schedule (1e-3 decayed twice: 5e-5). A larger
        # lr undoes the base and stops the trials from ranking architectures (docs/search.md).
        "lr": "auto",
        "transform_lr": None,  # Adam lr of flex transforms (None: lr); see docs/fidelity.md
        "max_batches": None,
        "warmup_batches": 10,  # batches that initialize new Winograd-domain quantizer ranges
        "distill": 0.0,  # weight of distillation from the base (0: off; docs/fidelity.md)
    },
    "choices": {
        "conv": ["normal", "static", "flex"],
        "tile": [2, 4, 6],
        "bits": [8],
        "granularity": ["tap"],  # tensor | tap: Winograd-domain quantizer ranges (see README)
        "transforms": ["tensor"],  # tensor | tap: the transforms' scales (docs/fidelity.md)
        "wd_bits": [None],  # Winograd-domain precision; null: the layer's bits
        "tie": "layer",  # layer | block | stage | all: layers that share one choice
        "groups": {},  # name -> [layer patterns]: layers that share one choice
        "layers": {},  # layer pattern -> {conv/tile/bits/granularity/...: value or list}
    },
    "objectives": {},  # a list; default [accuracy, latency_ms]
    "latency": {},  # the latency model: {kind: analytical, profile: ...} | measured | table
    "constraints": {
        "latency_ms": None,  # feasible when latency <= this
        "prune_infeasible": False,  # skip training candidates the constraint rules out
    },
    "strategy": {
        "name": None,  # nsga2 (2+ objectives) | tpe (1 objective) | random | gp
        "population_size": 10,  # NSGA-II
        "n_startup_trials": 5,  # TPE / GP: random trials before modelling
        "scalarize": None,  # {latency_weight: w}: maximize acc - w * latency / all-normal latency
        "pruner": "median",  # single objective only: median | none
        # differentiable (wiNAS-style supernet, see wasearch/search/differentiable.py):
        "lambdas": None,  # weights of E[latency]/latency(base) in the logit loss ([0, 0.5, 2])
        "epochs": None,  # supernet epochs, warm-up included (3)
        "warmup_epochs": None,  # epochs that train weights only (1)
        "arch_lr": None,  # Adam lr of the architecture logits (0.01)
        "tau": None,  # Gumbel-softmax temperature (1.0)
    },
    "budget": {
        "trials": 20,  # completed trials in the whole study (all workers together)
        "timeout": None,  # seconds per `search.py run` invocation
    },
    "storage": {
        "url": None,  # default sqlite:///results/<name>/study.db
        "heartbeat_interval": 30,  # seconds between a running trial's heartbeats (RDB storages)
        "grace_period": 90,  # a trial silent this long is failed over and retried
        "max_retry": 2,  # times a failed-over trial is retried
    },
    "export": {
        "epochs": 120,  # epochs of the printed train.py command (full training)
    },
    "report": {
        # accuracies within this many standard errors of their difference count as the same:
        # the report's pick is the fastest trial within it of the best (wasearch/stats.py)
        "tolerance": 1.0,
    },
}
TOP_KEYS = ("name", "description", "seed", *DEFAULTS)
SCALAR_TOP = {"name", "description", "seed", "objectives"}
CHOICE_VALUE_KEYS = ("conv", "tile", "bits", "granularity", "transforms", "wd_bits")


def study_name_problem(name: object) -> str | None:
    """Why ``name`` cannot name a study, else None: a study's name is its folder under
    ``results/``, so only letters, digits, '-', '_' and '.', not starting with '.' (no ``..``,
    no ``/``: the folder stays inside ``results/``). Used for ``name:`` and ``--study-name``."""
    if not isinstance(name, str) or not name or not all(c.isalnum() or c in "-_." for c in name):
        return f"{name!r} must be a non-empty string of letters, digits, '-', '_', '.'"
    if name.startswith("."):
        return f"{name!r} must not start with '.'"
    return None


def check_sections(data: Any, r: Reader, *, require_latency_table: bool = True) -> dict[str, Any]:
    """Check every key of a parsed space against :data:`DEFAULTS`; return the space's settings
    (``name``, ``seed``, ``raw``, ``objectives`` and each section with its defaults filled in),
    named as the fields of :class:`~wasearch.search.space.SearchSpace`.

    ``require_latency_table=False`` accepts a ``measured`` or ``table`` latency model whose table
    does not exist yet (or has no path): ``search.py measure`` is the command that builds it.
    """
    if not isinstance(data, Mapping):
        r.fail("", "the file must be a mapping of sections (name, model, data, choices, ...)")
    r.unknown("", data, TOP_KEYS)
    raw = copy.deepcopy(dict(data))
    sections: dict[str, dict[str, Any]] = {}
    for key, defaults in DEFAULTS.items():
        if key in SCALAR_TOP:
            continue
        given = data.get(key)
        if given is None:
            given = {}
        if not isinstance(given, Mapping):
            r.fail(key, f"must be a mapping, got {given!r}")
        if key != "latency":  # the latency model's own keys belong to it
            r.unknown(key, given, defaults)
        sections[key] = {**copy.deepcopy(defaults), **dict(given)}

    name = data.get("name")
    if name is None:
        name = Path(r.source).stem
    problem = study_name_problem(name)
    if problem is not None:
        r.fail("name", problem)
    seed = data.get("seed", 0)
    r.integer("seed", seed, minimum=0)
    if "description" in data and not isinstance(data["description"], str):
        r.fail("description", "must be a string")

    model = sections["model"]
    if model["backbone"] not in BACKBONES:
        r.one_of("model.backbone", model["backbone"], BACKBONES)
    r.number("model.width", model["width"], positive=True)
    r.integer("model.input_size", model["input_size"], minimum=8)
    if model["num_classes"] is not None:
        r.integer("model.num_classes", model["num_classes"], minimum=2)

    d = sections["data"]
    r.one_of("data.dataset", d["dataset"], DATASETS)
    if d["data_dir"] is not None and not isinstance(d["data_dir"], str):
        r.fail("data.data_dir", f"{d['data_dir']!r} must be a folder path or null")
    if d["dataset"] == "imagefolder" and d["data_dir"] is None:
        r.fail("data.data_dir", "the imagefolder dataset needs a folder with train/ and test/")
    r.boolean("data.download", d["download"])
    r.number("data.val_fraction", d["val_fraction"])
    if not 0 < d["val_fraction"] < 1:
        r.fail(
            "data.val_fraction",
            f"{d['val_fraction']!r} must be in (0, 1): trials are selected on a validation "
            "split held out from train, never on the test set",
        )
    for key in ("limit_train", "limit_test"):
        if d[key] is not None:
            r.integer(f"data.{key}", d[key], minimum=1)
    r.integer("data.batch_size", d["batch_size"], minimum=1)

    base = sections["base"]
    base_choice = r.choice("base", base)
    base.update(base_choice.to_dict(), tile=base_choice.tile, granularity=base_choice.granularity)
    r.integer("base.epochs", base["epochs"], minimum=1)
    r.number("base.lr", base["lr"], positive=True)
    if base["transform_lr"] is not None:
        r.number("base.transform_lr", base["transform_lr"], positive=True)
    if base["max_batches"] is not None:
        r.integer("base.max_batches", base["max_batches"], minimum=1)

    trial = sections["trial"]
    r.integer("trial.epochs", trial["epochs"], minimum=1)
    if trial["lr"] != "auto":
        if isinstance(trial["lr"], str):
            r.fail("trial.lr", f"{trial['lr']!r} must be a number or auto")
        r.number("trial.lr", trial["lr"], positive=True)
    if trial["transform_lr"] is not None:
        r.number("trial.transform_lr", trial["transform_lr"], positive=True)
    if trial["max_batches"] is not None:
        r.integer("trial.max_batches", trial["max_batches"], minimum=1)
    r.integer("trial.warmup_batches", trial["warmup_batches"], minimum=0)
    r.number("trial.distill", trial["distill"])
    if not 0 <= trial["distill"] <= 1:
        r.fail("trial.distill", f"{trial['distill']!r} must be in [0, 1] (0: off)")

    choices = sections["choices"]
    for key in CHOICE_VALUE_KEYS:
        choices[key] = r.value_list(f"choices.{key}", choices[key], key)
    r.one_of("choices.tie", choices["tie"], TIES)

    objectives = _objectives(r, data.get("objectives"))
    latency = sections["latency"]
    constraints = sections["constraints"]
    if constraints["latency_ms"] is not None:
        r.number("constraints.latency_ms", constraints["latency_ms"], positive=True)
    r.boolean("constraints.prune_infeasible", constraints["prune_infeasible"])

    strategy = sections["strategy"]
    scal = strategy["scalarize"]
    if scal is not None:
        if not isinstance(scal, Mapping):
            r.fail("strategy.scalarize", "must be a mapping like {latency_weight: 0.2}")
        r.unknown("strategy.scalarize", scal, ("latency_weight",))
        if "latency_weight" not in scal:
            r.fail("strategy.scalarize.latency_weight", "is required")
        r.number("strategy.scalarize.latency_weight", scal["latency_weight"])
        if scal["latency_weight"] < 0:
            r.fail("strategy.scalarize.latency_weight", "must be >= 0")
        if "latency_ms" not in objectives:
            r.fail("strategy.scalarize", "needs latency_ms among the objectives")
        if len(objectives) != 2:
            r.fail("strategy.scalarize", "combines exactly [accuracy, latency_ms]")
        strategy["scalarize"] = dict(scal)
    n_values = 1 if scal is not None else len(objectives)
    if strategy["name"] is None:
        strategy["name"] = "nsga2" if n_values > 1 else "tpe"
    r.one_of("strategy.name", strategy["name"], STRATEGIES)
    if strategy["name"] == "gp" and importlib.util.find_spec("scipy") is None:
        r.fail(
            "strategy.name",
            "gp needs scipy, which is not installed here (pip install scipy); "
            "or use nsga2, tpe or random",
        )
    _check_differentiable(r, strategy, objectives)
    r.integer("strategy.population_size", strategy["population_size"], minimum=2)
    r.integer("strategy.n_startup_trials", strategy["n_startup_trials"], minimum=0)
    r.one_of("strategy.pruner", strategy["pruner"], PRUNERS)
    if n_values > 1 and "pruner" in (data.get("strategy") or {}) and strategy["pruner"] != "none":
        r.fail(
            "strategy.pruner",
            "Optuna cannot prune multi-objective studies; add scalarize: {latency_weight: w}, "
            "use a single objective, or set pruner: none",
        )

    budget = sections["budget"]
    r.integer("budget.trials", budget["trials"], minimum=1)
    if budget["timeout"] is not None:
        r.number("budget.timeout", budget["timeout"], positive=True)

    storage = sections["storage"]
    if storage["url"] is not None and not isinstance(storage["url"], str):
        r.fail("storage.url", "must be a storage URL or a journal file path")
    for key in ("heartbeat_interval", "grace_period"):
        r.integer(f"storage.{key}", storage[key], minimum=1)
    if storage["grace_period"] <= storage["heartbeat_interval"]:
        r.fail("storage.grace_period", "must be longer than storage.heartbeat_interval")
    r.integer("storage.max_retry", storage["max_retry"], minimum=0)
    r.integer("export.epochs", sections["export"]["epochs"], minimum=1)
    r.number("report.tolerance", sections["report"]["tolerance"])
    if sections["report"]["tolerance"] < 0:
        r.fail("report.tolerance", f"{sections['report']['tolerance']!r} must be >= 0")

    needs_latency = (
        "latency_ms" in objectives or constraints["latency_ms"] is not None or scal is not None
    )
    _check_latency(r, latency, needed=needs_latency, require_table=require_latency_table)
    return {
        "name": name,
        "seed": seed,
        "raw": raw,
        "model": model,
        "data": d,
        "base": base,
        "trial": trial,
        "choices": choices,
        "objectives": objectives,
        "latency": dict(latency),
        "constraints": constraints,
        "strategy": strategy,
        "budget": budget,
        "storage": storage,
        "export": sections["export"],
        "report": sections["report"],
    }


def _check_differentiable(r: Reader, strategy: dict[str, Any], objectives: Any) -> None:
    keys = ("lambdas", "epochs", "warmup_epochs", "arch_lr", "tau")
    if strategy["name"] != "differentiable":
        given = [k for k in keys if strategy.get(k) is not None]
        if given:
            r.fail(f"strategy.{given[0]}", "applies to name: differentiable only")
        return
    if "latency_ms" not in objectives:
        r.fail("strategy.name", "differentiable needs latency_ms among the objectives")
    lambdas = strategy["lambdas"]
    if lambdas is not None:
        if isinstance(lambdas, int | float) and not isinstance(lambdas, bool):
            lambdas = [lambdas]
        if not isinstance(lambdas, list) or not lambdas:
            r.fail("strategy.lambdas", "must be a non-empty list of numbers >= 0")
        for i, lam in enumerate(lambdas):
            r.number(f"strategy.lambdas[{i}]", lam)
            if lam < 0:
                r.fail(f"strategy.lambdas[{i}]", f"{lam} must be >= 0")
        strategy["lambdas"] = [float(v) for v in lambdas]
    for key in ("epochs", "warmup_epochs"):
        if strategy[key] is not None:
            r.integer(f"strategy.{key}", strategy[key], minimum=0 if key == "warmup_epochs" else 1)
    for key in ("arch_lr", "tau"):
        if strategy[key] is not None:
            r.number(f"strategy.{key}", strategy[key], positive=True)
    if (
        strategy["epochs"] is not None
        and strategy["warmup_epochs"] is not None
        and strategy["warmup_epochs"] >= strategy["epochs"]
    ):
        r.fail("strategy.warmup_epochs", "must be smaller than strategy.epochs")


def _objectives(r: Reader, given: Any) -> tuple[str, ...]:
    if given is None:
        return ("accuracy", "latency_ms")
    if isinstance(given, str):
        given = [given]
    if not isinstance(given, Sequence) or not given:
        r.fail("objectives", "must be a list such as [accuracy, latency_ms]")
    names = []
    for item in given:
        key = OBJECTIVE_ALIASES.get(item, item) if isinstance(item, str) else item
        if key not in OBJECTIVES:
            r.fail("objectives", f"{item!r} is not one of {', '.join(OBJECTIVES)}")
        if key in names:
            r.fail("objectives", f"{item!r} is listed twice")
        names.append(key)
    if names[0] != "accuracy":
        r.fail("objectives", "the first objective must be accuracy")
    return tuple(names)


def _check_latency(
    r: Reader, latency: Mapping[str, Any], *, needed: bool, require_table: bool
) -> None:
    """The latency model's own keys are its business (``wasearch.latency.load_latency_model``);
    checked here are the kind and what it reads, when an objective or constraint needs latency,
    and ``batch`` whenever it is given (``search.py measure`` reads it too)."""
    if "batch" in latency:
        r.integer("latency.batch", latency["batch"], minimum=1)
    if not needed:
        return
    if not latency:
        r.fail(
            "latency",
            "is required for a latency objective or constraint, e.g. "
            "{kind: analytical, profile: cortex-a73}",
        )
    kind = latency.get("kind")
    kinds = ("analytical", "measured", "table")
    if kind not in kinds:
        r.fail("latency.kind", f"{kind!r} is not one of {', '.join(kinds)}")
    if kind == "analytical":
        if not isinstance(latency.get("profile"), str):
            r.fail("latency.profile", "names a device profile (e.g. cortex-a73) or a YAML file")
        return
    path = latency.get("path")
    if path is None and not require_table:
        return
    if not isinstance(path, str):
        r.fail("latency.path", f"the {kind} latency model needs the table's path")
    if require_table and not Path(path).expanduser().is_file():
        hint = (
            f"build it with: python search.py measure {r.source}"
            if kind == "measured"
            else "give an existing latency table"
        )
        r.fail("latency.path", f"{path} does not exist; {hint}")


class Reader:
    """Type checks that raise ``UserError('<file>: <key>: <problem>')``."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, key: str, message: str) -> None:
        where = f"{self.source}: {key}: " if key else f"{self.source}: "
        raise UserError(where + message)

    def unknown(self, key: str, given: Mapping[str, Any], allowed: Iterable[str]) -> None:
        allowed = list(allowed)
        for k in given:
            if k not in allowed:
                self.fail(
                    f"{key}.{k}" if key else str(k), f"unknown key; allowed: {', '.join(allowed)}"
                )

    def one_of(self, key: str, value: Any, allowed: Sequence[Any]) -> None:
        if value not in allowed or isinstance(value, bool):
            self.fail(key, f"{value!r} is not one of {', '.join(map(str, allowed))}")

    def integer(self, key: str, value: Any, *, minimum: int | None = None) -> None:
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(key, f"{value!r} must be an integer")
        if minimum is not None and value < minimum:
            self.fail(key, f"{value!r} must be >= {minimum}")

    def number(self, key: str, value: Any, *, positive: bool = False) -> None:
        """A finite int or float (YAML's ``.inf`` and ``.nan`` are refused)."""
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.fail(key, f"{value!r} must be a number")
        if isinstance(value, float) and not math.isfinite(value):
            self.fail(key, f"{value!r} must be a finite number")
        if positive and not value > 0:
            self.fail(key, f"{value!r} must be > 0")

    def boolean(self, key: str, value: Any) -> None:
        if not isinstance(value, bool):
            self.fail(key, f"{value!r} must be true or false")

    def value_list(self, key: str, value: Any, kind: str) -> list[Any]:
        """A choice list (conv kinds, tiles, bit-widths, granularities, transform scales or
        Winograd-domain bit-widths), checked item by item."""
        items = list(value) if isinstance(value, list | tuple) else [value]
        if not items:
            self.fail(key, "must list at least one value")
        for item in items:
            if kind == "conv":
                self.one_of(key, item, CONV_KINDS)
            elif kind == "tile":
                self.one_of(key, item, SPACE_TILES)
            elif kind == "granularity":
                self.one_of(key, item, GRANULARITIES)
            elif kind == "transforms":
                self.one_of(key, item, TRANSFORM_SCALES)
            elif item is not None and (
                isinstance(item, bool)
                or not isinstance(item, int)
                or not MIN_BITS <= item <= MAX_BITS
            ):
                self.fail(key, f"{item!r} is not a bit-width in {MIN_BITS}..{MAX_BITS} or null")
        if len(set(items)) != len(items):
            self.fail(key, f"{items!r} lists a value twice")
        return items

    def choice(self, key: str, section: Mapping[str, Any]) -> LayerChoice:
        conv = section["conv"]
        self.one_of(f"{key}.conv", conv, CONV_KINDS)
        tile = section["tile"]
        if conv != "normal":
            if tile is None:
                self.fail(f"{key}.tile", f"a {conv} Winograd base needs a tile (2, 4 or 6)")
            self.one_of(f"{key}.tile", tile, SPACE_TILES)
        else:
            tile = None
        self.one_of(f"{key}.granularity", section["granularity"], GRANULARITIES)
        bits = section["bits"]
        if bits is not None:
            self.value_list(f"{key}.bits", bits, "bits")
        try:
            return LayerChoice(conv, tile, bits, section["granularity"]).check(key)
        except ArchError as err:
            self.fail(key, str(err))
            raise  # unreachable
