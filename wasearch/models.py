"""The ResNet-18-like CIFAR backbone of the Winograd-aware paper, built from an ``Arch``.

Layout (width multiplier w, default 0.5): a 3x3 stem convolution of ``64 w`` channels in floating
point, four stages of two BasicBlocks with ``64 w, 128 w, 256 w, 512 w`` channels, global average
pooling and a floating-point classifier. Winograd has no stride-2 form worth having, so where
ResNet-18 uses a stride-2 3x3 convolution the block starts with a 2x2 max-pool and both of its
paths continue at stride 1 (the paper's code does the same); the projection shortcut is a 1x1
quantized direct convolution. Every 3x3 convolution inside a block is *searchable*: its kind
(normal, static or flex Winograd), tile and bit-width come from the ``Arch``.

The geometry (stages, channels, the searchable convolutions and their input sizes) lives in the
torch-free :mod:`wasearch.geometry`, which ``wasearch.arch`` reads without importing this module;
``BACKBONES``, ``ConvSpec`` and ``searchable_convs`` stay importable from here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from .geometry import (
    BACKBONES,
    BLOCKS_PER_STAGE,
    STAGES,
    ConvSpec,
    scaled_channels,
    searchable_convs,
)
from .layers import Conv2d, WinogradConv2d

if TYPE_CHECKING:
    from .arch import Arch, LayerChoice

__all__ = ["BACKBONES", "ConvSpec", "ResNetWA", "build", "searchable_convs", "make_conv"]


def make_conv(in_channels: int, out_channels: int, choice: LayerChoice) -> nn.Module:
    """A 3x3, stride-1, padding-1 convolution of the chosen kind."""
    if choice.conv == "normal":
        return Conv2d(in_channels, out_channels, 3, 1, 1, bits=choice.bits)
    return WinogradConv2d(
        in_channels,
        out_channels,
        tile=choice.tile,
        mode=choice.conv,
        bits=choice.bits,
        granularity=choice.granularity,
    )


class BasicBlock(nn.Module):
    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        downsample: bool,
        conv1: LayerChoice,
        conv2: LayerChoice,
        shortcut_bits: int | None,
    ) -> None:
        super().__init__()
        # Max-pool instead of a stride-2 conv: Winograd is stride 1 only.
        self.pool = nn.MaxPool2d(2) if downsample else nn.Identity()
        self.conv1 = make_conv(in_channels, out_channels, conv1)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = make_conv(out_channels, out_channels, conv2)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        if in_channels != out_channels:
            self.shortcut = nn.Sequential(
                Conv2d(in_channels, out_channels, 1, bits=shortcut_bits),
                nn.BatchNorm2d(out_channels),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNetWA(nn.Module):
    """ResNet-18-like CIFAR network whose block convolutions follow an ``Arch``."""

    def __init__(self, arch: Arch) -> None:
        super().__init__()
        arch.validate()
        self.arch = arch
        stem = scaled_channels(64, arch.width)
        self.conv1 = nn.Conv2d(3, stem, 3, 1, 1, bias=False)  # floating point, as in the paper
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU(inplace=True)
        c_in = stem
        for s, (base, stride) in enumerate(STAGES, start=1):
            c_out = scaled_channels(base, arch.width)
            blocks = []
            for b in range(BLOCKS_PER_STAGE):
                prefix = f"layer{s}.{b}"
                blocks.append(
                    BasicBlock(
                        c_in,
                        c_out,
                        downsample=(b == 0 and stride == 2),
                        conv1=arch.choice(f"{prefix}.conv1"),
                        conv2=arch.choice(f"{prefix}.conv2"),
                        shortcut_bits=arch.default.bits,
                    )
                )
                c_in = c_out
            self.add_module(f"layer{s}", nn.Sequential(*blocks))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, arch.num_classes)  # floating point, as in the paper

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def build(arch: Arch) -> ResNetWA:
    """Build the network an ``Arch`` describes (weights freshly initialized)."""
    return ResNetWA(arch)
