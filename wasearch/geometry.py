"""The backbone's geometry and the limits of every per-layer choice, without torch.

What an ``Arch`` is validated against, what the model builder lays out and what a search space
offers must agree; they are defined here once, in plain Python, so that reading or checking an
architecture (``wasearch.arch``, the search space) never imports torch and never imports the
model builder. ``wasearch.models``, ``wasearch.layers``, ``wasearch.quant`` and
``wasearch.winograd`` re-export the names they used to define.

The backbone is the Winograd-aware paper's ResNet-18-like CIFAR network (see
``wasearch.models``): a stem, four stages of two BasicBlocks with ``64 w, 128 w, 256 w, 512 w``
channels (w the width multiplier), every stage after the first starting with a 2x2 max-pool.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "BACKBONES",
    "BLOCKS_PER_STAGE",
    "CONV_KINDS",
    "GRANULARITIES",
    "TRANSFORM_SCALES",
    "MAX_BITS",
    "MAX_TILE",
    "MIN_BITS",
    "SPACE_TILES",
    "STAGES",
    "ConvSpec",
    "scaled_channels",
    "searchable_convs",
]

#: The backbones a model reference may name.
BACKBONES = ("resnet18",)
#: (channels at width 1, stride of the stage's first block) per stage; stride 2 is a max-pool.
STAGES = ((64, 1), (128, 2), (256, 2), (512, 2))
BLOCKS_PER_STAGE = 2

#: How a searchable convolution runs: direct, or Winograd with fixed or learned transforms.
CONV_KINDS = ("normal", "static", "flex")
#: The ranges of the Winograd-domain quantizers: one per tensor, or one per tile position.
GRANULARITIES = ("tensor", "tap")
#: How the transform matrices are quantized: one scale per matrix (the paper's), or one
#: power-of-two scale per tile position (exact for the default Cook-Toom points; see layers).
TRANSFORM_SCALES = ("tensor", "tap")
#: The bit-widths a fake quantizer supports (None, floating point, aside).
MIN_BITS = 2
MAX_BITS = 16
#: The largest output tile m of F(m x m, 3 x 3) that ``wasearch.winograd`` builds transforms for.
MAX_TILE = 8
#: The tiles a search space may offer (on every layer, whatever its size): the paper's.
SPACE_TILES = (2, 4, 6)


@dataclass(frozen=True)
class ConvSpec:
    """A searchable convolution: its module name and input geometry (per image)."""

    name: str
    in_channels: int
    out_channels: int
    height: int
    width: int

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.in_channels, self.out_channels, self.height, self.width)


def scaled_channels(base: int, width: float) -> int:
    """The channels of a layer with ``base`` channels at width 1, under width multiplier
    ``width`` (at least one)."""
    return max(1, int(round(base * width)))


def searchable_convs(
    backbone: str = "resnet18", width: float = 0.5, input_size: int = 32
) -> list[ConvSpec]:
    """The searchable convolutions of a backbone, in forward order, with their input geometry."""
    if backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}; available: {', '.join(BACKBONES)}")
    if not 0 < width < float("inf"):  # false for nan too
        raise ValueError(f"width={width!r} must be a positive finite number")
    specs = []
    c_in = scaled_channels(64, width)
    size = input_size
    for s, (base, stride) in enumerate(STAGES, start=1):
        c_out = scaled_channels(base, width)
        for b in range(BLOCKS_PER_STAGE):
            if b == 0 and stride == 2:
                size //= 2
            specs.append(ConvSpec(f"layer{s}.{b}.conv1", c_in, c_out, size, size))
            specs.append(ConvSpec(f"layer{s}.{b}.conv2", c_out, c_out, size, size))
            c_in = c_out
    return specs


def tile_fits(tile: int, height: int, width: int) -> bool:
    """Whether a whole F(tile x tile, 3 x 3) output tile fits a layer whose input is
    ``height x width``. A tile that does not still computes (one zero-padded partial tile,
    cropped), but mostly wasted work, which the latency models price: ``Arch.notes`` and a
    search space's notes say so (the space still offers it), and ``Arch.uniform`` falls back to
    a smaller tile when asked to. The one rule they share."""
    return tile <= min(height, width)
