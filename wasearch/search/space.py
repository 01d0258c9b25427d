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

This module is the one parser of a space: :func:`load_space` / :func:`parse_space`. The key-by-key
checks live in :mod:`wasearch.search.schema`, the expansion into units in
:mod:`wasearch.search.choices`; their public names are re-exported here.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..arch import Arch, LayerChoice
from ..cli import UserError
from ..fileio import load_yaml
from ..geometry import ConvSpec, searchable_convs
from ..netref import PAPER, ModelRef, ModelRefError
from .choices import REFERENCES, Unit, build_units, normalize_choice, reference_label
from .schema import (
    DEFAULTS,
    OBJECTIVES,
    PRUNERS,
    SPACE_TILES,
    STRATEGIES,
    TIES,
    Reader,
    check_sections,
    study_name_problem,
)

__all__ = [
    "DEFAULTS",
    "OBJECTIVES",
    "PRUNERS",
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
    report: dict[str, Any]  # tolerance: the report's and the run log's noise rule
    specs: tuple[ConvSpec, ...]
    units: tuple[Unit, ...]  # searched (two or more options)
    fixed: tuple[tuple[str, LayerChoice], ...]  # layers with a single possible choice
    notes: tuple[str, ...] = field(default=())  # what was removed, said once
    model_ref: ModelRef = PAPER  # the network (model.name, .kwargs, .checkpoint)

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
            model=self.model_ref,
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
            model=self.model_ref,
        )

    def params_of(self, arch: Arch) -> dict[str, str] | None:
        """The parameters that give ``arch``, or None when it is not in the space."""
        params = {}
        for unit in self.units:
            choices = {arch.choice(n) for n in unit.layers}
            if len(choices) != 1:
                return None
            label = normalize_choice(choices.pop()).label
            if label not in unit.labels:
                return None
            params[unit.name] = label
        for name, choice in self.fixed:
            if normalize_choice(arch.choice(name)) != choice:
                return None
        return params

    def references(self) -> list[tuple[str, dict[str, str]]]:
        """The reference architectures that exist in this space, as (name, params).

        All normal, uniform static F2/F4 and uniform flex F2/F4 at the reference bit-width (the
        base's when the space has it, else the first listed) and the first listed granularity,
        transform scales and Winograd-domain bit-width.
        A layer that cannot hold the tile takes the largest smaller tile it offers; a unit with
        a single option keeps it.
        """
        bits_list = self.choices["bits"]
        bits = self.base["bits"] if self.base["bits"] in bits_list else bits_list[0]
        gran = self.choices["granularity"][0]
        transforms = self.choices["transforms"][0]
        wd_bits = self.choices["wd_bits"][0]
        out = []
        for name, conv, tile in REFERENCES:
            params = {}
            for unit in self.units:
                label = reference_label(unit, conv, tile, bits, gran, transforms, wd_bits)
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


def load_space(path: str | os.PathLike, *, require_latency_table: bool = True) -> SearchSpace:
    """Read and validate a space file; :class:`UserError` naming the file and key otherwise.

    The YAML is read strictly (:func:`wasearch.fileio.load_yaml`): UTF-8 text, no key given
    twice, no absurd nesting. ``require_latency_table``: see :func:`parse_space`.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such space file")
    return parse_space(
        load_yaml(path, what="space file"),
        source=str(path),
        require_latency_table=require_latency_table,
    )


def parse_space(
    data: Any, *, source: str = "space", require_latency_table: bool = True
) -> SearchSpace:
    """Validate a parsed space (a dict) and return the :class:`SearchSpace`.

    ``require_latency_table=False`` accepts a ``measured`` or ``table`` latency model whose table
    is not there yet: ``search.py measure`` loads the space that way, since it builds the table.
    """
    r = Reader(source)
    settings = check_sections(data, r, require_latency_table=require_latency_table)
    model = settings["model"]
    ref = _model_ref(r, settings)
    if ref.is_paper:
        specs = tuple(
            searchable_convs(model["backbone"], float(model["width"]), model["input_size"])
        )
    else:
        specs = tuple(_discovered_specs(r, ref, settings))
    units, fixed, notes = build_units(r, settings["choices"], specs)
    if not units:
        r.fail("choices", "leaves nothing to search: every layer has a single possible choice")
    return SearchSpace(
        path=source,
        **settings,
        specs=specs,
        units=units,
        fixed=fixed,
        notes=tuple(notes),
        model_ref=ref,
    )


def _model_ref(r: Reader, settings: Mapping[str, Any]) -> ModelRef:
    """The space's network: ``model.name`` with its ``kwargs`` and ``checkpoint``."""
    model = settings["model"]
    try:
        ref = ModelRef.from_parts(
            model["name"], model["kwargs"], model["checkpoint"], where="model.name"
        )
    except ModelRefError as err:
        r.fail("", str(err).replace("model.name.", "model."))
    given = settings["raw"].get("model") or {}
    paper_keys = [k for k in ("backbone", "width") if k in given]
    if not ref.is_paper and paper_keys:
        r.fail(
            f"model.{paper_keys[0]}",
            "applies only to the paper's network (name: resnet18_cifar); set the model's own "
            "options in model.kwargs",
        )
    return ref


def _discovered_specs(r: Reader, ref: ModelRef, settings: Mapping[str, Any]) -> list[ConvSpec]:
    """Any model but the paper's: traced once to find its searchable convolutions (and the
    operations the latency models price)."""
    from ..discovery import discover

    model = settings["model"]
    classes = model["num_classes"]
    if classes is None:
        classes = 100 if settings["data"]["dataset"] == "cifar100" else 10
    try:
        return discover(ref, num_classes=classes, input_size=model["input_size"]).specs
    except ModelRefError as err:
        r.fail("", str(err))
        raise  # unreachable: fail raises
