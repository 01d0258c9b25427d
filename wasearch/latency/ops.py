"""The operations a latency model prices: their keys, and the list of them that makes a network.

Every entry of a latency table, and every quantity a latency model computes, is the time of one
*operation* of the deploy model (``wasearch.deploy``) at one geometry and batch:

==========  =====================================================  ================================
op          what runs                                              geometry (per image)
==========  =====================================================  ================================
conv3x3     a searchable 3x3 convolution, BN folded                input C x H x W, K outputs;
            (``conv``: normal / static / flex, ``tile``, ``bits``)  conv, tile, bits
conv1x1     a projection shortcut, BN folded (``bits``)            input C x H x W, K outputs
stem        the float 3x3 stem convolution and its ReLU            input 3 x H x W, K outputs
maxpool     2x2 max-pooling at the start of a downsampling block   input C x H x W (before pooling)
relu        the ReLU after a block's first convolution             C x H x W
add_relu    the residual addition and the block's last ReLU        C x H x W
head        global average pooling and the float classifier        C x H x W in, K = classes
==========  =====================================================  ================================

Geometry columns are always the op's *input* (C, H, W) and its output channels K; ops with no
channel change have K = C.

That list is the paper's network (its deploy form, ``wasearch.deploy.DeployResNet``, fuses and
folds exactly these). Any other network's operations come from its traced forward pass
(``wasearch.discovery``): each searchable convolution is a ``conv3x3`` as above, and every other
unit module call and group of functions between two is a *generic* operation
(``wasearch.latency.generic``: ``conv``, ``linear``, ``pool``, ``norm``, ``act``, ``free``,
``functions``, ``module``) whose key's ``detail`` holds its type, parameters and shapes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from ..arch import Arch, LayerChoice
from ..models import ConvSpec, searchable_convs
from .generic import generic_fields

__all__ = [
    "OPS",
    "SEARCHABLE_OP",
    "NetOp",
    "OpKey",
    "conv_key",
    "keys_in_context",
    "network_ops",
    "traced_ops",
]

SEARCHABLE_OP = "conv3x3"
OPS = (SEARCHABLE_OP, "conv1x1", "stem", "maxpool", "relu", "add_relu", "head")


@dataclass(frozen=True, slots=True)
class OpKey:
    """One operation at one geometry, batch and algorithm: the unit a latency model prices.

    ``conv`` and ``tile`` are set for ``conv3x3`` only (tile None for normal); ``bits`` is None for
    floating point and is meaningful for ``conv3x3`` and ``conv1x1``. ``after`` is the
    operation's *context*: the kernel family (``direct``, ``F2`` ...) of the searchable
    convolution that ran last before it in the forward pass (see :func:`keys_in_context`);
    None for a key priced over every context (a table's pooled row).
    """

    op: str
    in_channels: int
    out_channels: int
    height: int
    width: int
    batch: int = 1
    conv: str | None = None
    tile: int | None = None
    bits: int | None = None
    #: A generic operation's type, parameters and shapes (``wasearch.latency.generic``).
    detail: str | None = None
    #: The kernel family of the last searchable convolution before this operation.
    after: str | None = None

    def with_batch(self, batch: int) -> OpKey:
        return replace(self, batch=batch)

    def pooled(self) -> OpKey:
        """This key over every context (``after`` None)."""
        return self if self.after is None else replace(self, after=None)

    @property
    def generic(self) -> bool:
        """Whether this is a generic operation of a traced network (not one of :data:`OPS`)."""
        return self.detail is not None

    @property
    def algorithm(self) -> str:
        """``direct``, ``F4`` ...: the kernel family (flex and static deploy alike)."""
        if self.op != SEARCHABLE_OP or self.conv == "normal":
            return "direct" if self.op in (SEARCHABLE_OP, "conv1x1", "stem") else self.op
        return f"F{self.tile}"

    def describe(self) -> str:
        bits = "fp32" if self.bits is None else f"{self.bits}-bit"
        geo = f"{self.in_channels}->{self.out_channels} @{self.height}x{self.width} b{self.batch}"
        after = "" if self.after is None else f" after {self.after}"
        if self.op == SEARCHABLE_OP:
            algo = "normal" if self.conv == "normal" else f"F{self.tile}-{self.conv}"
            return f"conv3x3 {algo} {bits} {geo}{after}"
        if self.op == "conv1x1":
            return f"conv1x1 {bits} {geo}{after}"
        if self.detail is not None:
            prec = "" if self.bits is None else f" {bits}"
            return f"{self.op}{prec} {self.detail} b{self.batch}{after}"
        return f"{self.op} {geo}{after}"


def conv_key(spec: ConvSpec, choice: LayerChoice, batch: int = 1) -> OpKey:
    """The key of a searchable convolution under a choice. A Winograd conv's ``bits`` is its
    Winograd domain's (``wd_bits`` when set): its product and transforms run at that
    precision, which decides its kernel (the 8-bit input and output around a 10-bit domain
    are the small part). The transforms' scales (``transforms``) cost nothing: they fold into
    the requantization of the Winograd-domain tensors."""
    return OpKey(
        SEARCHABLE_OP,
        spec.in_channels,
        spec.out_channels,
        spec.height,
        spec.width,
        batch,
        choice.conv,
        None if choice.conv == "normal" else choice.tile,
        choice.bits if choice.conv == "normal" else choice.domain_bits,
    )


@dataclass(frozen=True, slots=True)
class NetOp:
    """One operation of a network, by name, in forward order.

    Searchable convolutions carry their ``spec`` (and are named as the model names them); the
    other parts are named ``stem``, ``<block>.pool``, ``<block>.relu``, ``<block>.shortcut``,
    ``<block>.add_relu`` and ``head``.
    """

    name: str
    key: OpKey  # at batch 1; searchable ones with the arch's choice
    spec: ConvSpec | None = None
    module: str | None = None  # a traced network's module path (None: functions, the paper's)

    @property
    def searchable(self) -> bool:
        return self.spec is not None


def network_ops(arch: Arch, *, input_size: int | None = None) -> list[NetOp]:
    """Every operation of the deploy form of ``arch``'s network, in forward order.

    Any network but the paper's: from its traced forward pass (:func:`traced_ops`). The paper's
    is derived from ``searchable_convs``: a block's ``conv1`` that halves the size follows a
    max-pool, one that changes the channel count has a 1x1 projection shortcut (at
    ``arch.default.bits``, as ``models.BasicBlock`` builds it).
    """
    size = arch.input_size if input_size is None else input_size
    if not arch.is_paper:
        return traced_ops(arch, input_size=size)
    specs = searchable_convs(arch.backbone, arch.width, size)
    choices = dict(arch.layers)
    ops: list[NetOp] = []
    stem_c = specs[0].in_channels
    ops.append(NetOp("stem", OpKey("stem", 3, stem_c, size, size)))
    prev_c, prev_h, prev_w = stem_c, size, size
    for spec in specs:
        block, conv = spec.name.rsplit(".", 1)
        choice = choices.get(spec.name, arch.default)
        if conv == "conv1":
            if (spec.height, spec.width) != (prev_h, prev_w):
                ops.append(
                    NetOp(f"{block}.pool", OpKey("maxpool", prev_c, prev_c, prev_h, prev_w))
                )
            block_in = spec
            ops.append(NetOp(spec.name, conv_key(spec, choice), spec))
            ops.append(
                NetOp(
                    f"{block}.relu",
                    OpKey("relu", spec.out_channels, spec.out_channels, spec.height, spec.width),
                )
            )
        else:
            ops.append(NetOp(spec.name, conv_key(spec, choice), spec))
            if block_in.in_channels != block_in.out_channels:
                ops.append(
                    NetOp(
                        f"{block}.shortcut",
                        OpKey(
                            "conv1x1",
                            block_in.in_channels,
                            block_in.out_channels,
                            block_in.height,
                            block_in.width,
                            bits=arch.default.bits,
                        ),
                    )
                )
            ops.append(
                NetOp(
                    f"{block}.add_relu",
                    OpKey(
                        "add_relu", spec.out_channels, spec.out_channels, spec.height, spec.width
                    ),
                )
            )
        prev_c, prev_h, prev_w = spec.out_channels, spec.height, spec.width
    ops.append(NetOp("head", OpKey("head", prev_c, arch.num_classes, prev_h, prev_w)))
    return ops


def keys_in_context(ops: Sequence[NetOp], batch: int | None = None) -> list[OpKey]:
    """Each operation's key with its context: ``after`` set to the kernel family (``direct``,
    ``F2`` ...) of the last searchable convolution before it in ``ops`` (None before the
    first). A layer's time depends on what ran just before it: a Winograd layer among direct
    ones, and the direct layer after it, run slower than among their own kind (their code,
    scratch and data come back into cache), so a table can hold a row per context
    (docs/latency.md, "Neighbours")."""
    out, last = [], None
    for op in ops:
        key = op.key if batch is None else op.key.with_batch(batch)
        out.append(key if last is None else replace(key, after=last))
        if op.searchable:
            last = op.key.algorithm
    return out


def traced_ops(arch: Arch, *, input_size: int | None = None) -> list[NetOp]:
    """The operations of any network, from its traced forward pass (cached per reference and
    size): each searchable convolution under ``arch``'s choice, every other unit module call
    and each group of functions between two as a generic operation. A non-searchable
    convolution other than the first runs at ``arch.default.bits`` (``models.convert``)."""
    from ..discovery import discover

    size = arch.input_size if input_size is None else input_size
    found = discover(arch.model, num_classes=arch.num_classes, input_size=size)
    specs = {s.name: s for s in found.specs}
    first = found.convs[0].name if found.convs else None
    choices = dict(arch.layers)
    ops: list[NetOp] = []
    for t in found.ops:
        spec = specs.get(t.name) if t.module is not None else None
        if spec is not None:
            choice = choices.get(spec.name, arch.default)
            ops.append(NetOp(t.name, conv_key(spec, choice), spec, t.module))
            continue
        bits = arch.default.bits if t.category == "conv" and t.module != first else None
        fields = generic_fields(t.category, t.kind, t.params, t.inputs, t.output)
        ops.append(NetOp(t.name, OpKey(**fields, bits=bits), None, t.module))
    return ops
