"""What a search space needs measured: every operation its architectures can produce.

:meth:`MeasurePlan.for_space` reads a space parsed by the one parser
(:func:`wasearch.search.space.load_space`): the per-layer options it produced (``choices``
narrowed by ``choices.layers``, tiles that do not fit a layer's input removed) and the layers'
geometry. The plan adds no choice limits of its own. A plan built directly (benchmarks, tests)
gives every searchable layer every choice of ``convs x tiles x bits`` whose tile fits its input.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from .. import deploy
from ..arch import Arch, LayerChoice
from ..geometry import SPACE_TILES, ConvSpec
from ..netref import PAPER, ModelRef
from .base import LatencyError
from .ops import SEARCHABLE_OP, OpKey, conv_key, network_ops
from .table import LatencyTable, TableModel

if TYPE_CHECKING:  # the search imports the latency models; only the type is needed here
    from ..search.space import SearchSpace

__all__ = ["MeasurePlan", "comparison_table", "plan_networks"]


@dataclass(frozen=True)
class MeasurePlan:
    """The operations of a search space: backbone geometry, the choices, the batch.

    ``layers`` holds each searchable layer's geometry and the options the space gives it (empty:
    the product of ``convs``, ``tiles`` and ``bits``). The fixed parts (the paper's stem, pools,
    ReLUs, shortcuts, head; any other ``model``'s traced modules and functions) are planned at
    each bit-width of ``fixed_bits`` (empty: ``bits``), since a projection shortcut (any
    non-searchable convolution but the first, in another model) runs at the architecture's
    default bit-width. ``backbone`` and ``width`` apply to the paper's network only.
    """

    backbone: str = "resnet18"
    width: float = 0.5
    input_size: int = 32
    num_classes: int = 10
    convs: tuple[str, ...] = ("normal", "static", "flex")
    tiles: tuple[int, ...] = SPACE_TILES
    bits: tuple[int | None, ...] = (None,)
    batch: int = 1
    latency: dict[str, Any] = field(default_factory=dict)
    layers: tuple[tuple[ConvSpec, tuple[LayerChoice, ...]], ...] = ()
    fixed_bits: tuple[int | None, ...] = ()
    source: str = ""
    model: ModelRef = PAPER

    @classmethod
    def for_space(cls, space: SearchSpace) -> MeasurePlan:
        """The plan of a parsed space: each layer's options as its unit (or its fixed choice)
        offers them; ``convs``, ``tiles`` and ``bits`` are those the options use. The fixed parts
        are planned at every bit-width of the choices, as before, and at the base's, which is
        the default bit-width of every architecture the search builds
        (:meth:`~wasearch.search.space.SearchSpace.arch`)."""
        per_layer: dict[str, tuple[LayerChoice, ...]] = {n: (c,) for n, c in space.fixed}
        for unit in space.units:
            per_layer.update((n, unit.options) for n in unit.layers)
        layers = tuple((spec, per_layer[spec.name]) for spec in space.specs)
        options = [o for _, opts in layers for o in opts]
        bits = tuple(dict.fromkeys(o.bits for o in options))
        return cls(
            backbone=space.model["backbone"],
            width=float(space.model["width"]),
            input_size=space.input_size,
            num_classes=space.num_classes,
            convs=tuple(dict.fromkeys(o.conv for o in options)),
            tiles=tuple(sorted({o.tile for o in options if o.conv != "normal"})),
            bits=bits,
            batch=space.latency.get("batch", 1),
            latency=dict(space.latency),
            layers=layers,
            fixed_bits=tuple(dict.fromkeys((*bits, space.base["bits"]))),
            source=space.path,
            model=space.model_ref,
        )

    def specs(self) -> list[ConvSpec]:
        """The searchable layers, in network order."""
        if self.layers:
            return [spec for spec, _ in self.layers]
        return self._arch(None).specs()

    def choices(self) -> list[LayerChoice]:
        """Every distinct choice some layer can take."""
        if self.layers:
            return list(dict.fromkeys(o for _, opts in self.layers for o in opts))
        out = []
        for conv in self.convs:
            for bits in self.bits:
                if conv == "normal":
                    out.append(LayerChoice("normal", None, bits))
                else:
                    out.extend(LayerChoice(conv, t, bits) for t in self.tiles)
        return list(dict.fromkeys(out))

    def layer_options(self) -> dict[str, tuple[LayerChoice, ...]]:
        """Each searchable layer's options, by name."""
        if self.layers:
            return {spec.name: opts for spec, opts in self.layers}
        choices = tuple(self.choices())
        return {s.name: choices for s in self.specs()}

    def _arch(self, bits: int | None) -> Arch:
        default = LayerChoice("normal", None, bits)
        return Arch(
            self.backbone,
            self.width,
            self.num_classes,
            self.input_size,
            default,
            model=self.model,
        )

    def keys(self, *, batch: int | None = None) -> list[OpKey]:
        """Every operation the space can produce, each distinct key once, in network order."""
        b = self.batch if batch is None else batch
        keys: dict[OpKey, None] = {}
        specs = {s.name: s for s in self.specs()}
        options = self.layer_options()
        for bits in self.fixed_bits or self.bits:
            for op in network_ops(self._arch(bits)):
                if not op.searchable:
                    keys[op.key.with_batch(b)] = None
                    continue
                for choice in options[op.name]:
                    keys[conv_key(specs[op.name], choice, b)] = None
        return list(keys)


def plan_networks(plan: MeasurePlan, *, device: str | torch.device = "cpu") -> list[Arch]:
    """The networks whose operations, timed in place, make a plan's rows.

    Uniform networks cover every key: direct, and static F(m) for each tile, at each bit-width
    with a kernel here; a layer smaller than a tile keeps it (one partial tile), so that every
    planned geometry runs in place. Where the plan has both direct and Winograd layers, each
    tile's two *alternating* networks follow (the searchable layers in network order, every
    other one F(m) and the rest direct, then the complement): a layer's time depends on its
    neighbours' kind (a Winograd layer among direct neighbours runs slower than among Winograd
    ones, and the direct layer after it too), and a searched network mixes kinds, so its rows
    pool samples taken next to either kind. Any network but the paper's also runs direct at
    each other bit-width of ``fixed_bits``: its non-searchable convolutions run at the default
    bit-width, and are timed in place only."""
    archs = []
    common = {
        "backbone": plan.backbone,
        "width": plan.width,
        "num_classes": plan.num_classes,
        "input_size": plan.input_size,
        "model": plan.model,
        "fallback": False,
    }
    for bits in plan.bits:
        if not deploy.has_int_kernel(bits, device):
            continue
        direct = "normal" in plan.convs
        winograd = any(c != "normal" for c in plan.convs)
        if direct:
            archs.append(Arch.uniform("normal", None, bits, **common))
        if winograd:
            archs.extend(Arch.uniform("static", t, bits, **common) for t in plan.tiles)
        if direct and winograd:
            for t in plan.tiles:
                archs.extend(_alternating(Arch.uniform("static", t, bits, **common), bits))
    if not plan.model.is_paper:  # its other convs run at the default bit-width: in place only
        for bits in plan.fixed_bits:
            if bits not in plan.bits and deploy.has_int_kernel(bits, device):
                archs.append(Arch.uniform("normal", None, bits, **common))
    return list(dict.fromkeys(archs))  # one searchable layer: alternating is uniform


def _alternating(winograd: Arch, bits: int | None) -> list[Arch]:
    """``winograd`` with every other searchable layer direct: from the first, then from the
    second (each layer runs once as Winograd and once as direct among the other kind)."""
    direct = LayerChoice("normal", None, bits)
    names = [spec.name for spec in winograd.specs()]
    return [
        winograd.with_layers({n: direct for i, n in enumerate(names) if i % 2 == parity})
        for parity in (1, 0)
    ]


# -- reporting -----------------------------------------------------------------------------------
def comparison_table(
    table: LatencyTable | TableModel, plan: MeasurePlan, *, batch: int | None = None
) -> str:
    """Per searchable geometry: direct convolution against F2/F4/F6 (ms and ratio to direct),
    one block per bit-width; estimated entries (no kernel here) carry a ``*``."""
    model = table if isinstance(table, TableModel) else TableModel(table, fallback=None)
    b = plan.batch if batch is None else batch
    specs = plan.specs()
    groups: dict[tuple[int, int, int, int], list[str]] = {}
    for s in specs:
        groups.setdefault((s.in_channels, s.out_channels, s.height, s.width), []).append(s.name)
    tiles = sorted(set(plan.tiles)) if any(c != "normal" for c in plan.convs) else []
    lines = []
    for bits in plan.bits:
        bits_name = "fp32" if bits is None else f"{bits}-bit"
        lines.append(f"per-layer comparison, {bits_name}, batch {b} (ms; ratio to direct)")
        head = f"{'in->out @HxW':<18} {'layers':<30} {'direct':>9}"
        head += "".join(f" {'F' + str(t):>16}" for t in tiles)
        lines.append(head)
        for (c, k, h, w), names in groups.items():
            label = names[0] if len(names) == 1 else f"{names[0]} (+{len(names) - 1})"
            base = _cell(model, OpKey(SEARCHABLE_OP, c, k, h, w, b, "normal", None, bits))
            row = f"{f'{c}->{k} @{h}x{w}':<18} {label:<30} {base[0]:>9}"
            for t in tiles:
                cell = _cell(model, OpKey(SEARCHABLE_OP, c, k, h, w, b, "static", t, bits))
                ratio = f"{cell[1] / base[1]:.2f}x" if base[1] and cell[1] else ""
                row += f" {cell[0] + ' ' + ratio:>16}"
            lines.append(row)
        lines.append("")
    return "\n".join(lines).rstrip()


def _cell(model: TableModel, key: OpKey) -> tuple[str, float | None]:
    try:
        s, est = model.op_cost(key)
    except LatencyError:
        return "n/a", None
    return f"{s * 1e3:.3f}{'*' if est else ''}", s
