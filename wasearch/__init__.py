"""wasearch: search Winograd-aware quantized convolutional networks.

Importing the package has no side effects: no argument parsing, no device selection, no files.
The names below are loaded on first use, so that ``import wasearch.arch`` or ``wasearch.fileio``
(the torch-free parts: architecture files, YAML, geometry) does not pull in torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # for type checkers and editors; at run time see __getattr__
    from .arch import Arch, ArchError, LayerChoice  # noqa: F401
    from .geometry import ConvSpec, searchable_convs  # noqa: F401
    from .layers import Conv2d, Linear, WinogradConv2d  # noqa: F401
    from .models import build  # noqa: F401
    from .quant import FakeQuantize  # noqa: F401
    from .winograd import cook_toom, transform_matrices, winograd_conv2d  # noqa: F401

_HOMES = {
    "Arch": ".arch",
    "ArchError": ".arch",
    "LayerChoice": ".arch",
    "ConvSpec": ".geometry",
    "searchable_convs": ".geometry",
    "Conv2d": ".layers",
    "Linear": ".layers",
    "WinogradConv2d": ".layers",
    "build": ".models",
    "FakeQuantize": ".quant",
    "cook_toom": ".winograd",
    "transform_matrices": ".winograd",
    "winograd_conv2d": ".winograd",
}

__all__ = sorted(_HOMES)

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(home, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOMES})
