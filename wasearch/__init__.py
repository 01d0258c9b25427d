"""wasearch: search Winograd-aware quantized convolutional networks.

Importing the package has no side effects: no argument parsing, no device selection, no files.
"""

from __future__ import annotations

from .arch import Arch, ArchError, LayerChoice
from .layers import Conv2d, Linear, WinogradConv2d
from .models import ConvSpec, build, searchable_convs
from .quant import FakeQuantize
from .winograd import cook_toom, transform_matrices, winograd_conv2d

__all__ = [
    "Arch",
    "ArchError",
    "Conv2d",
    "ConvSpec",
    "FakeQuantize",
    "LayerChoice",
    "Linear",
    "WinogradConv2d",
    "build",
    "cook_toom",
    "searchable_convs",
    "transform_matrices",
    "winograd_conv2d",
]

__version__ = "0.1.0"
