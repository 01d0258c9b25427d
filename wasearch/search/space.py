"""Search spaces: the YAML file that says what to search, under which cost, how and for how long.

A space is validated completely before any work starts; every error is a one-line
:class:`~wasearch.cli.UserError` naming the file and the key, e.g.
``spaces/x.yaml: choices.tile: 5 is not one of 2, 4, 6``. The schema is documented in
``spaces/README.md``; :data:`DEFAULTS` is the single list of default values.

The searched quantity is one categorical parameter per *unit*: a searchable layer, a block, a
stage, a named group of layers, or the whole network (``choices.tie`` and ``choices.groups``).
A unit's options are the :class:`~wasearch.arch.LayerChoice` labels (``normal/8``,
``F4-static/8t``, ...) that every layer of the unit can take: a tile that does not fit a layer's
input (F6 on a 4x4 input) is removed for that unit, and :attr:`SearchSpace.notes` says so once.
"""

from __future__ import annotations

import copy
import fnmatch
import importlib.util
import itertools
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..arch import Arch, ArchError, LayerChoice
from ..cli import UserError
from ..data import DATASETS
from ..fileio import load_yaml
from ..layers import CONV_KINDS, GRANULARITIES
from ..models import BACKBONES, ConvSpec, searchable_convs
from ..quant import MAX_BITS, MIN_BITS

__all__ = [
    "DEFAULTS",
    "OBJECTIVES",
    "REFERENCES",
    "SPACE_TILES",
    "STRATEGIES",
    "TIES",
    "SearchSpace",
    "Unit",
    "load_space",
    "parse_space",
    "study_name_problem",
]

SPACE_TILES = (2, 4, 6)  # the tiles of the paper, and the ones the latency models price
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
_OBJECTIVE_ALIASES = {"latency": "latency_ms", "acc": "accuracy", "val_acc": "accuracy"}
#: Reference architectures enqueued first: (name, conv, tile).
REFERENCES = (
    ("all-normal", "normal", None),
    ("static-F2", "static", 2),
    ("static-F4", "static", 4),
    ("flex-F2", "flex", 2),
    ("flex-F4", "flex", 4),
)

#: Every key of a space with its default (None: no default / not set). One place, one comment each.
DEFAULTS: dict[str, dict[str, Any]] = {
    "model": {
        "backbone": "resnet18",  # the only backbone so far
        "width": 0.5,  # channel multiplier (the paper's 0.5)
        "input_size": 32,  # image side; must match the dataset
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
    },
    "choices": {
        "conv": ["normal", "static", "flex"],
        "tile": [2, 4, 6],
        "bits": [8],
        "granularity": ["tap"],  # tensor | tap: Winograd-domain quantizer ranges (see README)
        "tie": "layer",  # layer | block | stage | all: layers that share one choice
        "groups": {},  # name -> [layer patterns]: layers that share one choice
        "layers": {},  # layer pattern -> {conv/tile/bits/granularity: value or list}
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
}
_TOP_KEYS = ("name", "description", "seed", *DEFAULTS)
_SCALAR_TOP = {"name", "description", "seed", "objectives"}
_CHOICE_VALUE_KEYS = ("conv", "tile", "bits", "granularity")


@dataclass(frozen=True)
class Unit:
    """One searched parameter: the layers that share a choice and the labels they can take."""

    name: str
    layers: tuple[str, ...]
    options: tuple[LayerChoice, ...]

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(o.label for o in self.options)

    def option(self, label: str) -> LayerChoice:
        for o in self.options:
            if o.label == label:
                return o
        raise KeyError(f"{self.name}: {label!r} is not one of {', '.join(self.labels)}")


@dataclass(frozen=True)
class SearchSpace:
    """A validated space. ``raw`` is the parsed YAML; the sections are dicts with defaults."""

    path: str
    name: str
    seed: int
    raw: dict[str, Any]
    model: dict[str, Any]
    data: dict[str, Any]
    base: dict[str, Any]
    trial: dict[str, Any]
    choices: dict[str, Any]
    objectives: tuple[str, ...]
    latency: dict[str, Any]
    constraints: dict[str, Any]
    strategy: dict[str, Any]
    budget: dict[str, Any]
    storage: dict[str, Any]
    export: dict[str, Any]
    specs: tuple[ConvSpec, ...]
    units: tuple[Unit, ...]  # searched (two or more options)
    fixed: tuple[tuple[str, LayerChoice], ...]  # layers with a single possible choice
    notes: tuple[str, ...] = field(default=())  # what was removed, said once

    # -- derived ------------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        given = self.model.get("num_classes")
        if given is not None:
            return given
        return 100 if self.data["dataset"] == "cifar100" else 10

    @property
    def input_size(self) -> int:
        return self.model["input_size"]

    @property
    def scalarized(self) -> bool:
        return self.strategy.get("scalarize") is not None

    @property
    def study_objectives(self) -> tuple[str, ...]:
        """The names of the study's values, in order (``score`` when scalarized)."""
        return ("score",) if self.scalarized else self.objectives

    @property
    def directions(self) -> list[str]:
        if self.scalarized:
            return ["maximize"]
        return [OBJECTIVES[o] for o in self.objectives]

    @property
    def multi_objective(self) -> bool:
        return len(self.directions) > 1

    @property
    def size(self) -> int:
        """Number of distinct architectures in the space."""
        return math.prod(len(u.options) for u in self.units)

    def base_arch(self, *, num_classes: int | None = None) -> Arch:
        b = self.base
        return Arch.uniform(
            b["conv"],
            b["tile"],
            b["bits"],
            granularity=b["granularity"],
            backbone=self.model["backbone"],
            width=self.model["width"],
            num_classes=num_classes or self.num_classes,
            input_size=self.input_size,
        )

    def arch(self, params: Mapping[str, str], *, num_classes: int | None = None) -> Arch:
        """The Arch that a trial's parameters (unit name -> option label) describe."""
        layers: dict[str, LayerChoice] = dict(self.fixed)
        for unit in self.units:
            label = params.get(unit.name)
            if label is None:
                raise KeyError(f"parameter {unit.name!r} is missing")
            choice = unit.option(label)
            for name in unit.layers:
                layers[name] = choice
        ordered = tuple((s.name, layers[s.name]) for s in self.specs)
        return Arch(
            backbone=self.model["backbone"],
            width=self.model["width"],
            num_classes=num_classes or self.num_classes,
            input_size=self.input_size,
            default=LayerChoice("normal", None, self.base["bits"]),
            layers=ordered,
        )

    def params_of(self, arch: Arch) -> dict[str, str] | None:
        """The parameters that give ``arch``, or None when it is not in the space."""
        params = {}
        for unit in self.units:
            choices = {arch.choice(n) for n in unit.layers}
            if len(choices) != 1:
                return None
            label = _normalize(choices.pop()).label
            if label not in unit.labels:
                return None
            params[unit.name] = label
        for name, choice in self.fixed:
            if _normalize(arch.choice(name)) != choice:
                return None
        return params

    def references(self) -> list[tuple[str, dict[str, str]]]:
        """The reference architectures that exist in this space, as (name, params).

        All normal, uniform static F2/F4 and uniform flex F2/F4 at the reference bit-width (the
        base's when the space has it, else the first listed) and the first listed granularity.
        A layer that cannot hold the tile takes the largest smaller tile it offers; a unit with
        a single option keeps it.
        """
        bits_list = self.choices["bits"]
        bits = self.base["bits"] if self.base["bits"] in bits_list else bits_list[0]
        gran = self.choices["granularity"][0]
        out = []
        for name, conv, tile in REFERENCES:
            params = {}
            for unit in self.units:
                label = _reference_label(unit, conv, tile, bits, gran)
                if label is None:
                    break
                params[unit.name] = label
            else:
                if params not in [p for _, p in out]:
                    out.append((name, params))
        return out

    def describe(self) -> str:
        """A few lines: the units (consecutive ones with the same options folded), the fixed
        layers and the size of the space."""
        lines = [
            f"space {self.name} ({self.path}): {len(self.units)} searched units, "
            f"{len(self.fixed)} fixed layers, {self.size:.3g} architectures"
        ]
        runs: list[list[Unit]] = []
        for u in self.units:
            if (
                runs
                and runs[-1][-1].labels == u.labels
                and len(u.layers) == len(runs[-1][-1].layers)
            ):
                runs[-1].append(u)
            else:
                runs.append([u])
        for run in runs:
            name = run[0].name if len(run) == 1 else f"{run[0].name} .. {run[-1].name}"
            per = f"{len(run[0].layers)} layer(s)" + (
                f" x {len(run)} units" if len(run) > 1 else ""
            )
            lines.append(f"  {name:<32} {per}: {', '.join(run[0].labels)}")
        for n, c in self.fixed:
            lines.append(f"  {n:<32} fixed: {c.label}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Loading and validation


def study_name_problem(name: object) -> str | None:
    """Why ``name`` cannot name a study, else None: a study's name is its folder under
    ``results/``, so only letters, digits, '-', '_' and '.', not starting with '.' (no ``..``,
    no ``/``: the folder stays inside ``results/``). Used for ``name:`` and ``--study-name``."""
    if not isinstance(name, str) or not name or not all(c.isalnum() or c in "-_." for c in name):
        return f"{name!r} must be a non-empty string of letters, digits, '-', '_', '.'"
    if name.startswith("."):
        return f"{name!r} must not start with '.'"
    return None


def load_space(path: str | os.PathLike) -> SearchSpace:
    """Read and validate a space file; :class:`UserError` naming the file and key otherwise.

    The YAML is read strictly (:func:`wasearch.fileio.load_yaml`): UTF-8 text, no key given
    twice, no absurd nesting.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such space file")
    return parse_space(load_yaml(path, what="space file"), source=str(path))


def parse_space(data: Any, *, source: str = "space") -> SearchSpace:
    """Validate a parsed space (a dict) and return the :class:`SearchSpace`."""
    r = _Reader(source)
    if not isinstance(data, Mapping):
        r.fail("", "the file must be a mapping of sections (name, model, data, choices, ...)")
    r.unknown("", data, _TOP_KEYS)
    raw = copy.deepcopy(dict(data))
    sections: dict[str, dict[str, Any]] = {}
    for key, defaults in DEFAULTS.items():
        if key in _SCALAR_TOP:
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
        name = Path(source).stem
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

    choices = sections["choices"]
    for key in _CHOICE_VALUE_KEYS:
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

    needs_latency = (
        "latency_ms" in objectives or constraints["latency_ms"] is not None or scal is not None
    )
    if needs_latency:
        _check_latency(r, latency)

    specs = tuple(searchable_convs(model["backbone"], float(model["width"]), model["input_size"]))
    units, fixed, notes = _units(r, choices, specs)
    if not units:
        r.fail("choices", "leaves nothing to search: every layer has a single possible choice")

    return SearchSpace(
        path=source,
        name=name,
        seed=seed,
        raw=raw,
        model=model,
        data=d,
        base=base,
        trial=trial,
        choices=choices,
        objectives=objectives,
        latency=dict(latency),
        constraints=constraints,
        strategy=strategy,
        budget=budget,
        storage=storage,
        export=sections["export"],
        specs=specs,
        units=units,
        fixed=fixed,
        notes=tuple(notes),
    )


def _check_differentiable(r: _Reader, strategy: dict[str, Any], objectives: Any) -> None:
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


def _objectives(r: _Reader, given: Any) -> tuple[str, ...]:
    if given is None:
        return ("accuracy", "latency_ms")
    if isinstance(given, str):
        given = [given]
    if not isinstance(given, Sequence) or not given:
        r.fail("objectives", "must be a list such as [accuracy, latency_ms]")
    names = []
    for item in given:
        key = _OBJECTIVE_ALIASES.get(item, item) if isinstance(item, str) else item
        if key not in OBJECTIVES:
            r.fail("objectives", f"{item!r} is not one of {', '.join(OBJECTIVES)}")
        if key in names:
            r.fail("objectives", f"{item!r} is listed twice")
        names.append(key)
    if names[0] != "accuracy":
        r.fail("objectives", "the first objective must be accuracy")
    return tuple(names)


def _check_latency(r: _Reader, latency: Mapping[str, Any]) -> None:
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
    if "batch" in latency:
        r.integer("latency.batch", latency["batch"], minimum=1)
    if kind == "analytical":
        if not isinstance(latency.get("profile"), str):
            r.fail("latency.profile", "names a device profile (e.g. cortex-a73) or a YAML file")
    else:
        path = latency.get("path")
        if not isinstance(path, str):
            r.fail("latency.path", f"the {kind} latency model needs the table's path")
        if not Path(path).expanduser().is_file():
            hint = (
                f"build it with: python search.py measure {r.source}"
                if kind == "measured"
                else "give an existing latency table"
            )
            r.fail("latency.path", f"{path} does not exist; {hint}")


def _units(
    r: _Reader, choices: Mapping[str, Any], specs: Sequence[ConvSpec]
) -> tuple[tuple[Unit, ...], tuple[tuple[str, LayerChoice], ...], list[str]]:
    names = [s.name for s in specs]
    by_name = {s.name: s for s in specs}

    # Per-layer option lists: the global lists, narrowed by choices.layers patterns.
    per_layer = {n: {k: list(choices[k]) for k in _CHOICE_VALUE_KEYS} for n in names}
    overrides = choices["layers"]
    if not isinstance(overrides, Mapping):
        r.fail("choices.layers", "must map layer patterns to {conv, tile, bits, granularity}")
    for pattern, values in overrides.items():
        key = f"choices.layers.{pattern}"
        matched = _match(r, key, pattern, names)
        if not isinstance(values, Mapping):
            r.fail(key, "must be a mapping such as {conv: [normal, static], bits: 8}")
        r.unknown(key, values, _CHOICE_VALUE_KEYS)
        for k, v in values.items():
            allowed = r.value_list(f"{key}.{k}", v, k)
            for n in matched:
                per_layer[n][k] = allowed

    # Units: named groups first, then the tie rule for the remaining layers.
    groups = choices["groups"]
    if not isinstance(groups, Mapping):
        r.fail("choices.groups", "must map group names to lists of layer patterns")
    owner: dict[str, str] = {}
    unit_layers: dict[str, list[str]] = {}
    for group, patterns in groups.items():
        key = f"choices.groups.{group}"
        if not isinstance(group, str) or group in names:
            r.fail(key, "a group name must be a string that is not a layer name")
        if isinstance(patterns, str):
            patterns = [patterns]
        if not isinstance(patterns, Sequence) or not patterns:
            r.fail(key, "must be a list of layer names or patterns (layer2.*)")
        members = []
        for p in patterns:
            for n in _match(r, key, p, names):
                if n in owner and owner[n] != group:
                    r.fail(key, f"{n} is already in group {owner[n]!r}")
                if n not in members:
                    members.append(n)
                owner[n] = group
        unit_layers[group] = members
    tie = choices["tie"]
    for n in names:
        if n in owner:
            continue
        stage, block, _ = n.split(".")
        unit = {"layer": n, "block": f"{stage}.{block}", "stage": stage, "all": "all"}[tie]
        unit_layers.setdefault(unit, []).append(n)
        owner[n] = unit

    units, fixed, notes = [], [], []
    removed: dict[tuple[int, int], list[str]] = {}
    for unit_name, all_members in unit_layers.items():
        options = None
        members = []
        for n in all_members:
            opts, dropped = _layer_options(per_layer[n], by_name[n])
            for tile in dropped:
                removed.setdefault((tile, by_name[n].height), []).append(n)
            if len(opts) == 1 and len(all_members) > 1:
                fixed.append((n, opts[0]))  # a layer pinned to one choice leaves its unit
                continue
            members.append(n)
            options = opts if options is None else [o for o in options if o in opts]
        if not members:
            continue
        if not options:
            r.fail(
                f"choices (unit {unit_name})",
                f"no choice is possible for {', '.join(members)}: every listed tile is too "
                "large for its input, or a choices.layers entry excludes everything",
            )
        if len(options) == 1:
            fixed.extend((n, options[0]) for n in members)
        else:
            units.append(Unit(unit_name, tuple(members), tuple(options)))
    for (tile, size), layers in sorted(removed.items()):
        notes.append(
            f"F{tile} removed for {_name_span(layers)}: their {size}x{size} input (padded "
            f"{size + 2}x{size + 2}) cannot hold an F({tile}x{tile}, 3x3) input tile of "
            f"{tile + 2}x{tile + 2}"
        )
    order = {n: i for i, n in enumerate(names)}
    fixed.sort(key=lambda item: order[item[0]])
    return tuple(units), tuple(fixed), notes


def _layer_options(
    values: Mapping[str, list[Any]], spec: ConvSpec
) -> tuple[list[LayerChoice], set[int]]:
    """The distinct choices a layer can take, and the tiles removed because they do not fit."""
    options: list[LayerChoice] = []
    dropped: set[int] = set()
    for conv in values["conv"]:
        if conv == "normal":
            combos: Iterable[tuple[Any, ...]] = ((None, b, "tensor") for b in values["bits"])
        else:
            combos = itertools.product(values["tile"], values["bits"], values["granularity"])
        for tile, bits, gran in combos:
            if tile is not None and tile > min(spec.height, spec.width):
                dropped.add(tile)
                continue
            choice = LayerChoice(conv, tile, bits, gran)
            if choice not in options:
                options.append(choice)
    return options, dropped


def _reference_label(unit: Unit, conv: str, tile: int | None, bits: Any, gran: str) -> str | None:
    if len(unit.options) == 1:
        return unit.labels[0]
    tiles = [tile] if tile is None else [t for t in (tile, tile - 2, 2) if t >= 2]
    for t in tiles:
        want = _normalize(LayerChoice(conv, t, bits, gran if conv != "normal" else "tensor"))
        if want in unit.options:
            return want.label
    return None


def _normalize(choice: LayerChoice) -> LayerChoice:
    if choice.conv == "normal" and choice.granularity != "tensor":
        return LayerChoice("normal", None, choice.bits, "tensor")
    return choice


def _match(r: _Reader, key: str, pattern: Any, names: Sequence[str]) -> list[str]:
    if not isinstance(pattern, str):
        r.fail(key, f"{pattern!r} must be a layer name or pattern")
    matched = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
    if not matched:
        r.fail(
            key,
            f"{pattern!r} matches no searchable layer (they are {names[0]} .. {names[-1]}, "
            f"{len(names)} layers)",
        )
    return matched


def _name_span(layers: Sequence[str]) -> str:
    return (
        ", ".join(layers) if len(layers) <= 4 else f"{layers[0]} .. {layers[-1]} ({len(layers)})"
    )


class _Reader:
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
        """A choice list (conv kinds, tiles, bit-widths or granularities), checked item by item."""
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
