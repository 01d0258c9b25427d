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

Any other network (an ``Arch`` whose ``model`` is a torchvision, timm or user-factory reference)
is built by its own builder (:func:`wasearch.discovery.build_reference`, the user's checkpoint
loaded) and then converted in place by :func:`convert`: each searchable convolution is replaced
by the layer its choice names, keeping its weight, bias, padding and everything around it, so
adaptation starts from the trained model as it was.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from .discovery import build_reference, discover
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

__all__ = [
    "BACKBONES",
    "ConvSpec",
    "ResNetWA",
    "build",
    "convert",
    "searchable_convs",
    "make_conv",
]


def make_conv(in_channels: int, out_channels: int, choice: LayerChoice) -> nn.Module:
    """A 3x3, stride-1, padding-1 convolution of the chosen kind."""
    if choice.conv == "normal":
        return Conv2d(in_channels, out_channels, 3, 1, 1, bits=choice.bits)
    return WinogradConv2d(in_channels, out_channels, **_winograd_options(choice))


def _winograd_options(choice: LayerChoice) -> dict:
    """The ``WinogradConv2d`` keyword arguments of a Winograd choice."""
    return {
        "tile": choice.tile,
        "mode": choice.conv,
        "bits": choice.bits,
        "granularity": choice.granularity,
        "transforms": choice.transforms,
        "wd_bits": choice.wd_bits,
    }


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


def build(arch: Arch) -> nn.Module:
    """Build the network an ``Arch`` describes: the paper's with fresh weights, any other from
    its reference (its ``checkpoint`` loaded when it names one), converted by :func:`convert`."""
    if arch.is_paper:
        return ResNetWA(arch)
    arch.validate()
    return convert(build_reference(arch.model, num_classes=arch.num_classes), arch)


def convert(model: nn.Module, arch: Arch) -> nn.Module:
    """Replace, in place, each searchable convolution of ``model`` by the layer ``arch`` chooses
    for it (weights and bias kept), and return ``model`` with ``model.arch = arch``.

    Every other convolution but the first one the forward pass meets (it reads the image, kept
    in floating point as the paper's stem is) becomes a direct convolution quantized to the
    arch's default bit-width, as the paper's 1x1 shortcuts are; linear layers stay as they are.
    """
    found = discover(arch.model, num_classes=arch.num_classes, input_size=arch.input_size)
    modules = dict(model.named_modules())
    searchable = set(arch.layer_names)
    first = found.convs[0].name if found.convs else None
    for conv in found.convs:
        old = modules.get(conv.name)
        if not isinstance(old, nn.Conv2d):
            raise ValueError(f"{conv.name}: expected an nn.Conv2d in the model, got {old!r}")
        if conv.name in searchable:
            new: nn.Module = layer_for(old, arch.choice(conv.name))
        elif conv.name != first:
            new = Conv2d.from_conv(old, bits=arch.default.bits)
        else:
            continue
        _replace(model, conv.name, new)
    model.arch = arch
    return model


def layer_for(conv: nn.Conv2d, choice: LayerChoice) -> nn.Module:
    """The layer ``choice`` makes of a searchable ``conv`` (any module path, padding and bias):
    its weight and bias copied, its padding kept."""
    if choice.conv == "normal":
        return Conv2d.from_conv(conv, bits=choice.bits)
    return WinogradConv2d.from_conv(conv, **_winograd_options(choice))


def _replace(root: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, leaf, new)
