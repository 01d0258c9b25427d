"""A model reference: which network to build, as plain data (no torch).

The network is an input, like the data and the latency model. A reference names it in one of
four ways, with keyword arguments for its builder and, optionally, a checkpoint of the user's own
trained weights to start from:

``resnet18_cifar``
    The Winograd-aware paper's ResNet-18-like CIFAR network (``wasearch.models``), the default;
    its width multiplier is the arch's ``width``.
``torchvision:NAME``
    ``torchvision.models.get_model(NAME, weights=None, **kwargs)``: never downloads weights.
``timm:NAME``
    ``timm.create_model(NAME, pretrained=False, **kwargs)`` (timm is an optional extra).
``package.module:function``
    The user's own factory, imported from the working directory (like a Python config file:
    the module named in the user's own space or arch file is imported and the function called
    with ``kwargs``). Nothing named inside a checkpoint is ever imported.

YAML form, in an arch file or a space's ``model:`` section::

    model: torchvision:resnet18                      # short
    model: {name: mynets.small:make_net, kwargs: {depth: 4}, checkpoint: runs/mine.pt}

The number of classes is the arch's (or space's) ``num_classes``: it is passed to a builder that
takes a ``num_classes`` argument unless ``kwargs`` sets it, and the model's output is checked.
Building and tracing the model is :mod:`wasearch.discovery`; this module only parses and checks.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .cli import UserError

__all__ = ["KINDS", "PAPER", "PAPER_NAME", "ModelRef", "ModelRefError"]

#: The paper's network, as a reference names it.
PAPER_NAME = "resnet18_cifar"
#: How a reference builds its model.
KINDS = ("paper", "torchvision", "timm", "factory")
_REF_KEYS = ("name", "kwargs", "checkpoint")
_PREFIXES = ("torchvision", "timm")
_DOTTED = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


class ModelRefError(UserError, ValueError):
    """A model reference that cannot be parsed, imported, built or traced; the message names the
    key and the cause."""


@dataclass(frozen=True)
class ModelRef:
    """Which network to build: ``kind`` (see :data:`KINDS`), ``name`` as written after any
    ``torchvision:``/``timm:`` prefix, the builder's keyword arguments (a hashable, sorted
    tuple of pairs; :attr:`kwargs_dict` gives the mapping) and an optional checkpoint path."""

    kind: str = "paper"
    name: str = PAPER_NAME
    kwargs: tuple[tuple[str, Any], ...] = ()
    checkpoint: str | None = None

    @property
    def is_paper(self) -> bool:
        return self.kind == "paper"

    @property
    def text(self) -> str:
        """The reference as written: ``resnet18_cifar``, ``torchvision:resnet18``, ``a.b:f``."""
        return self.name if self.kind in ("paper", "factory") else f"{self.kind}:{self.name}"

    @property
    def kwargs_dict(self) -> dict[str, Any]:
        return {k: _thaw(v) for k, v in self.kwargs}

    def to_yaml_value(self) -> str | dict[str, Any]:
        """The short string when there is nothing else to say, else the mapping."""
        if not self.kwargs and self.checkpoint is None:
            return self.text
        out: dict[str, Any] = {"name": self.text}
        if self.kwargs:
            out["kwargs"] = self.kwargs_dict
        if self.checkpoint is not None:
            out["checkpoint"] = self.checkpoint
        return out

    @classmethod
    def parse(cls, value: Any, where: str = "model") -> ModelRef:
        """A reference from its YAML value (a string or ``{name, kwargs, checkpoint}``)."""
        kwargs: Any = {}
        checkpoint = None
        if isinstance(value, Mapping):
            unknown = sorted(set(map(str, value)) - set(_REF_KEYS))
            if unknown:
                raise ModelRefError(
                    f"{where}: unknown key(s) {unknown}; allowed: {list(_REF_KEYS)}"
                )
            if "name" not in value:
                raise ModelRefError(f"{where}.name: missing (e.g. torchvision:resnet18)")
            name = value["name"]
            kwargs = value.get("kwargs") or {}
            checkpoint = value.get("checkpoint")
        else:
            name = value
        return cls.from_parts(name, kwargs, checkpoint, where=where)

    @classmethod
    def from_parts(
        cls, name: Any, kwargs: Any = None, checkpoint: Any = None, *, where: str = "model"
    ) -> ModelRef:
        """A checked reference from its name text, keyword arguments and checkpoint path."""
        key = where
        if not isinstance(name, str) or not name.strip():
            raise ModelRefError(
                f"{key}: {name!r} must be {PAPER_NAME}, torchvision:NAME, timm:NAME or "
                "package.module:function"
            )
        name = name.strip()
        if name == PAPER_NAME:
            kind, rest = "paper", name
        elif ":" in name:
            prefix, rest = name.split(":", 1)
            kind = prefix if prefix in _PREFIXES else "factory"
            if kind == "factory":
                rest = name
                if not _DOTTED.match(prefix) or not rest.split(":", 1)[1].isidentifier():
                    raise ModelRefError(
                        f"{key}: {name!r} is not package.module:function (dotted module path, "
                        "a colon, a function name)"
                    )
            elif not _DOTTED.match(rest):
                raise ModelRefError(f"{key}: {name!r}: {rest!r} is not a {kind} model name")
        else:
            raise ModelRefError(
                f"{key}: {name!r} is not a model reference; use {PAPER_NAME}, "
                f"torchvision:{name}, timm:{name} or package.module:function"
            )
        if kwargs is None:
            kwargs = {}
        if not isinstance(kwargs, Mapping) or not all(isinstance(k, str) for k in kwargs):
            raise ModelRefError(f"{where}.kwargs: {kwargs!r} must map argument names to values")
        if kind == "paper" and kwargs:
            raise ModelRefError(
                f"{where}.kwargs: {PAPER_NAME} takes none (its width is the arch's width)"
            )
        if kind in ("torchvision", "timm") and ("weights" in kwargs or "pretrained" in kwargs):
            raise ModelRefError(
                f"{where}.kwargs: no weights are downloaded; start from your own weights with "
                f"{where}.checkpoint instead"
            )
        if checkpoint is not None and (not isinstance(checkpoint, str) or not checkpoint):
            raise ModelRefError(f"{where}.checkpoint: {checkpoint!r} must be a file path")
        if kind == "paper" and checkpoint is not None:
            raise ModelRefError(
                f"{where}.checkpoint: the paper's network starts from a wasearch run "
                "(train.py --modelDir, a space's base), not from a state_dict"
            )
        frozen = tuple(sorted((k, _freeze(v, f"{where}.kwargs.{k}")) for k, v in kwargs.items()))
        return cls(kind, rest, frozen, checkpoint)


#: The default reference: the paper's network.
PAPER = ModelRef()


def _freeze(value: Any, where: str) -> Any:
    """YAML data as hashable values: lists become tuples, mappings sorted tuples of pairs."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | tuple):
        return ("__list__", tuple(_freeze(v, where) for v in value))
    if isinstance(value, Mapping):
        return ("__map__", tuple(sorted((str(k), _freeze(v, where)) for k, v in value.items())))
    raise ModelRefError(f"{where}: {value!r} is not plain YAML data")


def _thaw(value: Any) -> Any:
    if isinstance(value, tuple):
        tag, items = value
        if tag == "__list__":
            return [_thaw(v) for v in items]
        return {k: _thaw(v) for k, v in items}
    return value
