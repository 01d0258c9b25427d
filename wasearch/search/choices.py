"""The searched parameters of a space: per-layer choices, grouped into units.

Each searchable layer's options are the product of ``choices`` (conv x tile x bits x
granularity x transforms x wd_bits; a direct convolution has no tile, a per-tensor range and no
Winograd domain; a floating-point layer no quantizer options; a ``wd_bits`` equal to the
layer's bits is the same option as null), narrowed by
``choices.layers`` patterns; layers are grouped into units by ``choices.groups`` and then
``choices.tie``. A unit offers the options every one of its layers can take. Every tile is
offered on every layer: a tile larger than a layer's input (F6 on a 4x4 input) computes one
partial tile, padded and cropped, mostly wasted work; the latency models price that waste, so
the search may still prefer a smaller tile there, and the space says so once in its notes. A
layer left with a single option is fixed rather than searched.
"""

from __future__ import annotations

import fnmatch
import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..arch import LayerChoice
from ..geometry import ConvSpec, tile_fits
from .schema import CHOICE_VALUE_KEYS, Reader

__all__ = [
    "REFERENCES",
    "Unit",
    "block_of",
    "build_units",
    "layer_options",
    "normalize_choice",
    "reference_label",
    "stage_of",
]

#: Reference architectures enqueued first: (name, conv, tile).
REFERENCES = (
    ("all-normal", "normal", None),
    ("static-F2", "static", 2),
    ("static-F4", "static", 4),
    ("flex-F2", "flex", 2),
    ("flex-F4", "flex", 4),
)


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


def build_units(
    r: Reader, choices: Mapping[str, Any], specs: Sequence[ConvSpec]
) -> tuple[tuple[Unit, ...], tuple[tuple[str, LayerChoice], ...], list[str]]:
    """The searched units, the fixed layers (name, choice) in network order, and the notes on
    tiles larger than a layer's input, from a checked ``choices`` section and the backbone's
    searchable layers."""
    names = [s.name for s in specs]
    by_name = {s.name: s for s in specs}

    # Per-layer option lists: the global lists, narrowed by choices.layers patterns.
    per_layer = {n: {k: list(choices[k]) for k in CHOICE_VALUE_KEYS} for n in names}
    overrides = choices["layers"]
    if not isinstance(overrides, Mapping):
        r.fail("choices.layers", f"must map layer patterns to {{{', '.join(CHOICE_VALUE_KEYS)}}}")
    for pattern, values in overrides.items():
        key = f"choices.layers.{pattern}"
        matched = _match(r, key, pattern, names)
        if not isinstance(values, Mapping):
            r.fail(key, "must be a mapping such as {conv: [normal, static], bits: 8}")
        r.unknown(key, values, CHOICE_VALUE_KEYS)
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
        unit = {"layer": n, "block": block_of(n), "stage": stage_of(n), "all": "all"}[tie]
        unit_layers.setdefault(unit, []).append(n)
        owner[n] = unit

    units, fixed, notes = [], [], []
    partial: dict[tuple[int, int, int], list[str]] = {}
    for unit_name, all_members in unit_layers.items():
        options = None
        members = []
        for n in all_members:
            opts, large = layer_options(per_layer[n], by_name[n])
            for tile in large:
                partial.setdefault((tile, by_name[n].height, by_name[n].width), []).append(n)
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
                f"no choice is possible for {', '.join(members)}: the choices.layers entries "
                "of its layers leave no choice in common",
            )
        if len(options) == 1:
            fixed.extend((n, options[0]) for n in members)
        else:
            units.append(Unit(unit_name, tuple(members), tuple(options)))
    for (tile, h, w), layers in sorted(partial.items()):
        notes.append(
            f"F{tile} on {_name_span(sorted(set(layers), key=names.index), names)} ({h}x{w} "
            "input) computes one partial tile: most of its work is wasted; the latency model "
            "prices it"
        )
    order = {n: i for i, n in enumerate(names)}
    fixed.sort(key=lambda item: order[item[0]])
    return tuple(units), tuple(fixed), notes


def block_of(name: str) -> str:
    """A layer's block: its parent module path (``layer3.0`` for ``layer3.0.conv1``; the
    ``features`` Sequential for ``features.3``); a top-level layer is its own block."""
    return name.rpartition(".")[0] or name


def stage_of(name: str) -> str:
    """A layer's stage: its top-level module (``layer3``, ``features``)."""
    return name.split(".", 1)[0]


def layer_options(
    values: Mapping[str, list[Any]], spec: ConvSpec
) -> tuple[list[LayerChoice], set[int]]:
    """The distinct choices a layer can take, and those of its tiles larger than its input
    (offered too: one partial tile each)."""
    options: list[LayerChoice] = []
    large: set[int] = set()
    for conv in values["conv"]:
        if conv == "normal":
            combos: Iterable[tuple[Any, ...]] = (
                (None, b, "tensor", "tensor", None) for b in values["bits"]
            )
        else:
            combos = itertools.product(
                values["tile"],
                values["bits"],
                values["granularity"],
                values["transforms"],
                values["wd_bits"],
            )
        for tile, bits, gran, transforms, wd in combos:
            if tile is not None and not tile_fits(tile, spec.height, spec.width):
                large.add(tile)
            choice = normalize_choice(LayerChoice(conv, tile, bits, gran, transforms, wd))
            if choice not in options:
                options.append(choice)
    return options, large


def reference_label(
    unit: Unit,
    conv: str,
    tile: int | None,
    bits: Any,
    gran: str,
    transforms: str = "tensor",
    wd_bits: int | None = None,
) -> str | None:
    if len(unit.options) == 1:
        return unit.labels[0]
    tiles = [tile] if tile is None else [t for t in (tile, tile - 2, 2) if t >= 2]
    for t in tiles:
        want = normalize_choice(LayerChoice(conv, t, bits, gran, transforms, wd_bits))
        if want in unit.options:
            return want.label
    return None


def normalize_choice(choice: LayerChoice) -> LayerChoice:
    """The canonical form of a choice: a direct conv has a per-tensor range and no Winograd
    domain; a floating-point layer no quantizer options; ``wd_bits`` equal to ``bits`` is
    None."""
    if choice.conv == "normal":
        return LayerChoice("normal", None, choice.bits)
    if choice.bits is None:
        return LayerChoice(choice.conv, choice.tile, None, choice.granularity)
    if choice.wd_bits == choice.bits:
        return LayerChoice(
            choice.conv, choice.tile, choice.bits, choice.granularity, choice.transforms
        )
    return choice


def _match(r: Reader, key: str, pattern: Any, names: Sequence[str]) -> list[str]:
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


def _name_span(layers: Sequence[str], names: Sequence[str] = ()) -> str:
    """``layer4.*`` when the layers are every searchable layer under one module, else a list."""
    if len(layers) > 1:
        prefix = layers[0].rpartition(".")[0]
        while prefix:
            under = [n for n in names if n.startswith(prefix + ".")]
            if set(layers) <= set(under):
                if set(under) == set(layers):
                    return f"{prefix}.*"
                break
            prefix = prefix.rpartition(".")[0]
    return (
        ", ".join(layers) if len(layers) <= 4 else f"{layers[0]} .. {layers[-1]} ({len(layers)})"
    )
