"""Example user models for wasearch: plain torch modules built by a factory function.

A space or an arch file names one as ``examples.smallnets:FUNCTION`` (imported from the working
directory, like a Python config file) with keyword arguments under ``kwargs``; wasearch traces it
once, finds its 3x3 stride-1 convolutions and searches those. Nothing here knows about wasearch.

- :func:`vgg_cifar`: a VGG-style plain classifier for 32x32 images (Simonyan & Zisserman's
  stacks of 3x3 convolutions, max-pooling between stages, batch norm after every conv).
- :func:`fullres_net`: convolutions that keep the image's full resolution, as a super-resolution
  or U-Net encoder does, where Winograd pays most (every output pixel of a large map is cheap);
  here closed by global pooling and a linear classifier, so that the search's objective stays
  classification accuracy (see the README's "Your own network").
"""

from __future__ import annotations

from torch import nn

__all__ = ["fullres_net", "vgg_cifar"]


class ConvBNReLU(nn.Module):
    """A 3x3 convolution (padding 1, no bias), batch norm and ReLU."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.bn(self.conv(x)))


class VGG(nn.Module):
    """Stages ``stage1`` .. of :class:`ConvBNReLU` blocks, each stage closed by a 2x2 max-pool,
    then global average pooling and a linear head."""

    def __init__(self, num_classes: int, width: int, stages: tuple[int, ...]) -> None:
        super().__init__()
        c_in = 3
        for i, count in enumerate(stages, start=1):
            c_out = width * 2 ** (i - 1)
            blocks = [ConvBNReLU(c_in if j == 0 else c_out, c_out) for j in range(count)]
            stage = nn.Sequential()
            for j, block in enumerate(blocks, start=1):
                stage.add_module(f"block{j}", block)
            stage.add_module("pool", nn.MaxPool2d(2))
            self.add_module(f"stage{i}", stage)
            c_in = c_out
        self.stages = len(stages)
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, num_classes)
        )

    def forward(self, x):
        for i in range(1, self.stages + 1):
            x = getattr(self, f"stage{i}")(x)
        return self.head(x)


def vgg_cifar(
    num_classes: int = 10, width: int = 16, stages: tuple[int, ...] = (1, 1, 2, 2)
) -> nn.Module:
    """:class:`VGG`: ``stages[i]`` convolutions of ``width * 2**i`` channels per stage.

    The first convolution reads the image (wasearch keeps it floating point); every other one is
    a searchable 3x3 stride-1 convolution (``stage2.block1.conv`` ...). The default has 6
    convolutions, 5 searchable; ``tie: stage`` ties each stage's convolutions together.
    """
    return VGG(num_classes, width, tuple(stages))


class FullResNet(nn.Module):
    """A stem, ``depth`` residual pairs of 3x3 convolutions at the input's full resolution, then
    global average pooling and a linear head."""

    def __init__(self, num_classes: int = 10, channels: int = 16, depth: int = 2) -> None:
        super().__init__()
        self.stem = ConvBNReLU(3, channels)
        self.body = nn.ModuleList(
            nn.Sequential(
                ConvBNReLU(channels, channels),
                nn.Conv2d(channels, channels, 3, padding=1, bias=False),
                nn.BatchNorm2d(channels),
            )
            for _ in range(depth)
        )
        self.relu = nn.ReLU()
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes)
        )

    def forward(self, x):
        x = self.stem(x)
        for block in self.body:
            x = self.relu(x + block(x))
        return self.head(x)


def fullres_net(num_classes: int = 10, channels: int = 16, depth: int = 2) -> nn.Module:
    """:class:`FullResNet`: ``2 * depth`` searchable convolutions, all at the input's size."""
    return FullResNet(num_classes, channels, depth)
