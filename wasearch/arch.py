"""``Arch``: one immutable, serializable description of a network configuration.

An ``Arch`` names the network (the paper's backbone and width multiplier, or any other model by
a :class:`~wasearch.netref.ModelRef`), its classes and input size and, for every searchable
convolution by its module path, a :class:`LayerChoice` ``{conv, tile, bits, granularity,
transforms, wd_bits}``. The model builder, train.py, the latency models, the search and the
reports all speak it, and every checkpoint embeds it.

YAML form (short and hand-editable; ``default`` applies to every layer not listed under
``layers`` and gives the bit-width of the non-searchable quantized parts, the 1x1 shortcuts)::

    backbone: resnet18
    width: 0.5
    num_classes: 10
    input_size: 32
    default: {conv: normal, bits: 8}
    layers:
      layer3.0.conv1: {conv: flex, tile: 4, bits: 8}
      layer3.1.conv2: {conv: static, tile: 2, bits: 8, granularity: tap}
      layer4.0.conv1: {conv: static, tile: 6, bits: 8, granularity: tap, transforms: tap,
                       wd_bits: 10}

``save`` writes every layer explicitly, so a saved file reads as the whole network.

Any other network replaces ``backbone``/``width`` by ``model: torchvision:resnet18`` (or
``{name, kwargs, checkpoint}``, see :mod:`wasearch.netref`); its searchable layers are found by
tracing it once (:func:`wasearch.discovery.discover`, which imports torch).

For the paper's network this module does not import torch: the geometry and the limits it
validates against come from :mod:`wasearch.geometry`, so a space, a report or a command line can
read and check architectures without loading the model builder.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from .cli import UserError
from .fileio import InputFileError, atomic_write_text, parse_yaml, read_text
from .geometry import (
    BACKBONES,
    CONV_KINDS,
    GRANULARITIES,
    MAX_BITS,
    MAX_TILE,
    MIN_BITS,
    TRANSFORM_SCALES,
    ConvSpec,
    searchable_convs,
    tile_fits,
)
from .netref import PAPER, PAPER_NAME, ModelRef

__all__ = ["Arch", "ArchError", "LayerChoice"]

_CHOICE_KEYS = ("conv", "tile", "bits", "granularity", "transforms", "wd_bits")
_ARCH_KEYS = ("model", "backbone", "width", "num_classes", "input_size", "default", "layers")


class ArchError(UserError, ValueError):
    """An invalid architecture; the message names the layer (or key) and the bad value."""


@dataclass(frozen=True)
class LayerChoice:
    """How one searchable convolution runs.

    ``conv``: ``normal`` (direct convolution), ``static`` or ``flex`` Winograd; ``tile``: the
    output tile m of F(m x m, 3 x 3), None for normal; ``bits``: 2..16, or None for floating point;
    ``granularity``: the Winograd-domain quantizers' ranges, per ``tensor`` or per ``tap``;
    ``transforms``: the transform matrices' scales, one per ``tensor`` (the paper's) or one
    power-of-two scale per ``tap`` (exact for the default Cook-Toom matrices at 8 bits);
    ``wd_bits``: the Winograd domain's precision (transformed weights and inputs, their
    product), 2..16, or None for ``bits``. The last two need a quantized Winograd conv.
    """

    conv: str = "normal"
    tile: int | None = None
    bits: int | None = None
    granularity: str = "tensor"
    transforms: str = "tensor"
    wd_bits: int | None = None

    def check(self, where: str = "layer") -> LayerChoice:
        """Validate the values on their own (not against a geometry); return self."""
        if self.conv not in CONV_KINDS:
            raise ArchError(
                f"{where}: unknown conv kind {self.conv!r}; use one of {', '.join(CONV_KINDS)}"
            )
        if self.conv == "normal":
            if self.tile is not None:
                raise ArchError(f"{where}: tile={self.tile!r} given for a normal conv; drop it")
        elif (
            isinstance(self.tile, bool)
            or not isinstance(self.tile, int)
            or not (2 <= self.tile <= MAX_TILE)
        ):
            raise ArchError(
                f"{where}: tile={self.tile!r} for a {self.conv} Winograd conv; use an integer "
                f"in 2..{MAX_TILE} (2, 4, 6 usual)"
            )
        for key, value, null in (
            ("bits", self.bits, "floating point"),
            ("wd_bits", self.wd_bits, "the layer's bits"),
        ):
            if value is not None and (
                isinstance(value, bool)
                or not isinstance(value, int)
                or not MIN_BITS <= value <= MAX_BITS
            ):
                raise ArchError(
                    f"{where}: {key}={value!r} is out of range; use {MIN_BITS}..{MAX_BITS} "
                    f"or null for {null}"
                )
        if self.granularity not in GRANULARITIES:
            raise ArchError(
                f"{where}: granularity={self.granularity!r}; use one of {', '.join(GRANULARITIES)}"
            )
        if self.transforms not in TRANSFORM_SCALES:
            raise ArchError(
                f"{where}: transforms={self.transforms!r}; use one of "
                f"{', '.join(TRANSFORM_SCALES)}"
            )
        for key, value, default in (
            ("transforms", self.transforms, "tensor"),
            ("wd_bits", self.wd_bits, None),
        ):
            if value == default:
                continue
            if self.conv == "normal":
                raise ArchError(
                    f"{where}: {key}={value!r} given for a normal conv, which has no Winograd "
                    "domain; drop it"
                )
            if self.bits is None:
                raise ArchError(
                    f"{where}: {key}={value!r} given for a floating-point conv (bits: null); "
                    "it sets a quantizer: drop it or set bits"
                )
        return self

    @property
    def domain_bits(self) -> int | None:
        """The Winograd domain's precision: ``wd_bits``, else ``bits``."""
        return self.bits if self.wd_bits is None else self.wd_bits

    @property
    def label(self) -> str:
        """Short text such as ``normal/8``, ``F4-flex/8``, ``F2-static/fp``, ``F4-static/8t``;
        ``x`` after the bits marks per-tap transform scales, ``-w10`` a 10-bit Winograd domain
        (``F6-static/8tx-w10``)."""
        bits = "fp" if self.bits is None else str(self.bits)
        if self.conv == "normal":
            return f"normal/{bits}"
        tap = "t" if self.granularity == "tap" else ""
        exact = "x" if self.transforms == "tap" else ""
        wd = "" if self.wd_bits is None else f"-w{self.wd_bits}"
        return f"F{self.tile}-{self.conv}/{bits}{tap}{exact}{wd}"

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"conv": self.conv}
        if self.tile is not None:
            d["tile"] = self.tile
        d["bits"] = self.bits
        if self.granularity != "tensor":
            d["granularity"] = self.granularity
        if self.transforms != "tensor":
            d["transforms"] = self.transforms
        if self.wd_bits is not None:
            d["wd_bits"] = self.wd_bits
        return d

    @classmethod
    def from_dict(cls, data: Any, where: str = "layer") -> LayerChoice:
        if isinstance(data, str):  # shorthand: "normal"
            data = {"conv": data}
        if not isinstance(data, Mapping):
            raise ArchError(
                f"{where}: expected a mapping like {{conv: flex, tile: 4, bits: 8}}, got {data!r}"
            )
        unknown = sorted(set(data) - set(_CHOICE_KEYS))
        if unknown:
            raise ArchError(f"{where}: unknown key(s) {unknown}; allowed: {list(_CHOICE_KEYS)}")
        return cls(**dict(data)).check(where)


@dataclass(frozen=True)
class Arch:
    """A network configuration: backbone and one :class:`LayerChoice` per searchable conv."""

    backbone: str = "resnet18"
    width: float = 0.5
    num_classes: int = 10
    input_size: int = 32
    default: LayerChoice = field(default_factory=LayerChoice)
    layers: tuple[tuple[str, LayerChoice], ...] = ()
    #: The network (see :mod:`wasearch.netref`); the paper's by default, whose width and
    #: backbone are the fields above. Any other model is traced to find its searchable convs.
    model: ModelRef = PAPER

    def __post_init__(self) -> None:
        # Resolve: every searchable layer gets a choice (listed, else the default), in order.
        self._check_scalars()
        given = dict(self.layers)
        specs = self.specs()
        names = [s.name for s in specs]
        unknown = [n for n in given if n not in names]
        if unknown:
            raise ArchError(
                f"unknown layer {unknown[0]!r} for {self.network} (searchable: {names[0]} .. "
                f"{names[-1]}, {len(names)} layers)"
            )
        resolved = tuple((n, given.get(n, self.default)) for n in names)
        object.__setattr__(self, "layers", resolved)
        self.validate()

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def uniform(
        cls,
        conv: str = "normal",
        tile: int | None = None,
        bits: int | None = None,
        *,
        granularity: str = "tensor",
        transforms: str = "tensor",
        wd_bits: int | None = None,
        backbone: str = "resnet18",
        width: float = 0.5,
        num_classes: int = 10,
        input_size: int = 32,
        fallback: bool = True,
        model: ModelRef = PAPER,
    ) -> Arch:
        """Every searchable conv the same choice.

        Layers whose input is smaller than the tile (F6 on a 4x4 input) fall back to the largest
        tile that fits when ``fallback`` is set (the paper's uniform F6 networks do the same);
        without it they keep the tile, computed on a padded partial tile.
        """
        choice = LayerChoice(
            conv, tile if conv != "normal" else None, bits, granularity, transforms, wd_bits
        )
        choice.check("uniform choice")
        layers = []
        probe = cls(backbone, width, num_classes, input_size, model=model)
        for spec in probe.specs():
            c = choice
            if conv != "normal" and fallback:
                while c.tile > 2 and not tile_fits(c.tile, spec.height, spec.width):
                    c = replace(c, tile=c.tile - 2)
            layers.append((spec.name, c))
        return cls(backbone, width, num_classes, input_size, choice, tuple(layers), model)

    def with_layers(self, changes: Mapping[str, LayerChoice]) -> Arch:
        """A copy with some layers' choices replaced."""
        merged = dict(self.layers)
        merged.update(changes)
        return replace(self, layers=tuple(merged.items()))

    # -- access -------------------------------------------------------------------------------
    @property
    def is_paper(self) -> bool:
        """Whether the network is the paper's (geometry known without tracing, priced by the
        latency models)."""
        return self.model.is_paper

    @property
    def network(self) -> str:
        """The network's name: ``resnet18_cifar`` (the paper's) or the reference's text."""
        return PAPER_NAME if self.is_paper else self.model.text

    def specs(self) -> list[ConvSpec]:
        """The searchable convolutions in forward order: the paper's from its geometry (no
        torch), any other model's by tracing it once (:func:`wasearch.discovery.discover`)."""
        if not self.is_paper:
            from .discovery import discover

            return discover(
                self.model, num_classes=self.num_classes, input_size=self.input_size
            ).specs
        if self.backbone not in BACKBONES:
            raise ArchError(f"backbone: unknown {self.backbone!r}; available: {list(BACKBONES)}")
        return searchable_convs(self.backbone, self.width, self.input_size)

    def choice(self, name: str) -> LayerChoice:
        for n, c in self.layers:
            if n == name:
                return c
        raise KeyError(name)

    def __iter__(self) -> Iterator[tuple[str, LayerChoice]]:
        return iter(self.layers)

    @property
    def layer_names(self) -> list[str]:
        return [n for n, _ in self.layers]

    def summary(self) -> str:
        """One short line, e.g. ``normal/8 x10, F4-flex/8 x6``."""
        counts: dict[str, int] = {}
        for _, c in self.layers:
            counts[c.label] = counts.get(c.label, 0) + 1
        return ", ".join(f"{k} x{v}" for k, v in counts.items())

    # -- validation ---------------------------------------------------------------------------
    def validate(self) -> Arch:
        """Check every value and every layer's choice. Any tile takes any input size: a layer
        smaller than its tile computes one padded partial tile (see :meth:`notes`)."""
        self._check_scalars()
        self.default.check("default")
        for name, choice in self.layers:
            choice.check(name)
        return self

    def notes(self) -> list[str]:
        """Layers whose tile is larger than their input: most of the tile's work is thrown
        away (cropped), so a smaller tile is usually as fast there."""
        out = []
        for spec, (name, choice) in zip(self.specs(), self.layers, strict=True):
            if choice.conv != "normal" and not tile_fits(choice.tile, spec.height, spec.width):
                cheaper = "a smaller tile" if choice.tile > 2 else "a direct conv"
                out.append(
                    f"{name}: F{choice.tile} on a {spec.height}x{spec.width} input computes one "
                    f"partial tile, mostly wasted work; {cheaper} may cost less there"
                )
        return out

    def _check_scalars(self) -> None:
        def bad_int(value: Any, low: int) -> bool:
            return isinstance(value, bool) or not isinstance(value, int) or value < low

        width_ok = isinstance(self.width, int | float) and not isinstance(self.width, bool)
        if (
            not width_ok
            or (isinstance(self.width, float) and not math.isfinite(self.width))
            or self.width <= 0
        ):
            raise ArchError(f"width: {self.width!r} must be a positive finite number")
        if bad_int(self.num_classes, 2):
            raise ArchError(f"num_classes: {self.num_classes!r} must be an integer >= 2")
        if bad_int(self.input_size, 8):
            raise ArchError(f"input_size: {self.input_size!r} must be an integer >= 8")

    # -- serialization ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        if self.is_paper:
            head: dict[str, Any] = {"backbone": self.backbone, "width": self.width}
        else:
            head = {"model": self.model.to_yaml_value()}
        return {
            **head,
            "num_classes": self.num_classes,
            "input_size": self.input_size,
            "default": self.default.to_dict(),
            "layers": {n: c.to_dict() for n, c in self.layers},
        }

    @classmethod
    def from_dict(cls, data: Any, source: str = "arch") -> Arch:
        if not isinstance(data, Mapping):
            raise ArchError(f"{source}: expected a mapping with keys {list(_ARCH_KEYS)}")
        unknown = sorted(set(data) - set(_ARCH_KEYS))
        if unknown:
            raise ArchError(f"{source}: unknown key(s) {unknown}; allowed: {list(_ARCH_KEYS)}")
        default = LayerChoice.from_dict(data.get("default", {"conv": "normal"}), "default")
        layers = data.get("layers") or {}
        if not isinstance(layers, Mapping):
            raise ArchError(f"{source}: 'layers' must map layer names to choices")
        choices = tuple((str(n), LayerChoice.from_dict(c, str(n))) for n, c in layers.items())
        kwargs = {
            k: data[k] for k in ("backbone", "width", "num_classes", "input_size") if k in data
        }
        if "model" in data:
            kwargs["model"] = ModelRef.parse(data["model"], "model")
            paper_keys = [k for k in ("backbone", "width") if k in data]
            if not kwargs["model"].is_paper and paper_keys:
                raise ArchError(
                    f"{source}: {paper_keys[0]}: applies only to the paper's network "
                    f"(model: {PAPER_NAME}); set the model's own options in model.kwargs"
                )
        return cls(default=default, layers=choices, **kwargs)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)

    @classmethod
    def from_yaml(cls, text: str, source: str = "arch") -> Arch:
        """Parse strictly (:func:`wasearch.fileio.parse_yaml`: a key given twice is an error)."""
        try:
            data = parse_yaml(text, source=source)
        except InputFileError as err:
            raise ArchError(str(err)) from None
        return cls.from_dict(data, source)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the YAML form atomically (temporary file, then rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, self.to_yaml())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Arch:
        path = Path(path)
        try:
            text = read_text(path, what="architecture file")
        except InputFileError as err:
            raise ArchError(str(err)) from None
        try:
            return cls.from_yaml(text, str(path))
        except ArchError as err:
            msg = str(err)
            raise ArchError(msg if msg.startswith(str(path)) else f"{path}: {msg}") from None
