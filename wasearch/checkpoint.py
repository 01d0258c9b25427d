"""Checkpoint files: what they hold, writing them, reading them safely, fitting them to a model.

A checkpoint (``best.pt``, ``last.pt``) holds the ``Arch``, the training config, the data
normalization and the metrics besides the weights, so a model can be rebuilt and evaluated from
the file alone (``wasearch.engine.load_checkpoint``).

Checkpoints are plain data: tensors, dicts, lists, strings and numbers (the ``Arch`` and the
config as dicts), and every read uses ``torch.load(weights_only=True)``, so a crafted ``.pt``
cannot run code. A file that needs full unpickling (an older wasearch or another tool wrote it) is
refused with one line naming the converter, ``python -m wasearch.convert OLD.pt NEW.pt``, the one
place that unpickles fully, for a file the user trusts. ``format`` is :data:`CHECKPOINT_FORMAT`;
a file of a newer format is refused. Files are written atomically (:func:`save_checkpoint`).

Adaptation (:func:`init_from_checkpoint`): conv kernels have the same shape in every mode, so a
checkpoint of any architecture initializes any other of the same backbone and width. Weights,
BatchNorm and matching quantizer ranges are copied; static transforms keep their exact Cook-Toom
values; the Winograd-domain quantizers of every layer whose algorithm changed start empty and are
warmed up on the first training batches (``wasearch.engine.warmup_ranges``). Every other weight,
BatchNorm statistic and range the model needs must be in the checkpoint with its shape: one that
does not fit is refused (:class:`CheckpointError`) rather than leaving layers at random
initialization.

The training loop, ``TrainConfig`` and ``load_checkpoint`` (which rebuilds that config) stay in
``wasearch.engine``, which re-exports this module's public names.
"""

from __future__ import annotations

import io
import os
import pickle
from collections.abc import Callable, Mapping
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .arch import Arch
from .cli import UserError
from .fileio import atomic_write_bytes
from .models import ResNetWA
from .quant import FakeQuantize

__all__ = [
    "CHECKPOINT_FORMAT",
    "TRANSFORMS",
    "CheckpointError",
    "check_init_from",
    "checkpoint_arch",
    "checkpoint_payload",
    "fitting_state",
    "init_from_checkpoint",
    "plain_data",
    "read_checkpoint",
    "save_checkpoint",
]

#: The checkpoint payload's layout. 1: the entries of :func:`checkpoint_payload`, all plain data
#: (weights_only-loadable). Files without ``format`` are read as 1; newer ones are refused.
CHECKPOINT_FORMAT = 1
#: The names of a Winograd layer's transform parameters or buffers.
TRANSFORMS = ("A_t", "G", "B_t")
_WINOGRAD_DOMAIN = ("weight_wd", "input_wd", "product")


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be used: unreadable, needing full unpickling, of a newer format,
    not a wasearch checkpoint, or not fitting the model. One line that names the file."""


def save_checkpoint(payload: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Write ``payload`` (from :func:`checkpoint_payload`, or converted plain data) to ``path``
    atomically: a reader sees the old file or the new one, never a torn one.

    Serialized in memory first, then written as bytes: ``torch.save`` into a file reports a full
    disk as a ``RuntimeError`` from its zip writer, not as the ``OSError`` (ENOSPC) that the
    callers turn into one line naming the file."""
    buf = io.BytesIO()
    torch.save(payload, buf)
    atomic_write_bytes(path, buf.getvalue())


def plain_data(obj: Any, where: str, *, convert: bool = False) -> Any:
    """``obj`` as data that ``torch.load(weights_only=True)`` reads on any supported torch.

    Paths become strings, NumPy scalars numbers, a ``Counter`` a dict; with ``convert`` (only
    :mod:`wasearch.convert`) objects with ``to_dict()``, dataclasses and modules (their state
    dict) are turned into data too. Anything else raises TypeError naming ``where``: a caller
    put something into a checkpoint that does not belong there.
    """
    if obj is None or isinstance(obj, (torch.Tensor, torch.device, torch.dtype)):
        return obj
    if type(obj).__module__.split(".")[0] == "numpy" and getattr(obj, "ndim", None) == 0:
        return obj.item()  # before float: numpy.float64 is a float subclass
    for base in (bool, int, float, str, bytes):  # subclasses (enums, numpy) pickle by class
        if isinstance(obj, base):
            return obj if type(obj) is base else base(obj)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, Mapping):
        out = {}
        for key, value in obj.items():
            if not isinstance(key, (str, int, float, bool)) and key is not None:
                raise TypeError(f"{where} has a key of type {type(key).__name__}: {key!r}")
            out[key] = plain_data(value, f"{where}[{key!r}]", convert=convert)
        return out
    if isinstance(obj, (list, tuple)):
        items = [plain_data(v, f"{where}[{i}]", convert=convert) for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else tuple(items)
    if convert:
        if isinstance(obj, nn.Module):
            return dict(obj.state_dict())
        if callable(getattr(obj, "to_dict", None)):
            return plain_data(obj.to_dict(), where, convert=True)
        if is_dataclass(obj) and not isinstance(obj, type):
            return plain_data(asdict(obj), where, convert=True)
        if type(obj).__module__.split(".")[0] == "numpy" and hasattr(obj, "shape"):
            return torch.from_numpy(obj.copy())
    raise TypeError(
        f"{where} is a {type(obj).__module__}.{type(obj).__qualname__}; a checkpoint holds only "
        "tensors, dicts, lists, strings and numbers"
    )


def checkpoint_payload(
    model, arch, config, data_info, epoch, best, history, optimizer, scheduler, extra
) -> dict[str, Any]:
    """The checkpoint of a training run at the end of ``epoch``, as plain data (see the module
    doc); ``arch`` and ``config`` are turned into dicts, the optimizer and scheduler states may
    be None."""
    return {
        "format": CHECKPOINT_FORMAT,
        "arch": plain_data(arch.to_dict(), "arch"),
        "config": plain_data(config.to_dict(), "config"),
        "data": plain_data(data_info, "data"),
        "epoch": int(epoch),
        "best_val_acc": float(best),
        "history": plain_data(history, "history"),
        "model": model.state_dict(),  # str -> tensor (an OrderedDict: allowed by weights_only)
        "optimizer": None
        if optimizer is None
        else plain_data(optimizer.state_dict(), "optimizer"),
        # MultiStepLR keeps its milestones in a Counter: stored as a dict, restored on resume.
        "scheduler": None
        if scheduler is None
        else plain_data(scheduler.state_dict(), "scheduler"),
        "extra": plain_data(extra, "extra"),
    }


# The entries a checkpoint may hold and their types; "arch" and "model" are required.
_ENTRIES: dict[str, type | tuple[type, ...]] = {
    "format": int,
    "arch": dict,
    "config": dict,
    "data": dict,
    "epoch": int,
    "best_val_acc": (int, float),
    "history": list,
    "model": dict,
    "optimizer": (dict, type(None)),
    "scheduler": (dict, type(None)),
    "extra": dict,
}


def _convert_hint(path: Path) -> str:
    return (
        f"checkpoint {path} needs full unpickling (written by an older wasearch or another "
        f"tool); if you trust it, convert it: python -m wasearch.convert {path} NEW.pt"
    )


def _load_error(path: Path, err: Exception) -> CheckpointError:
    message = str(err)
    if isinstance(err, pickle.UnpicklingError) and (
        "Unsupported global" in message or "Unsupported class" in message
    ):
        return CheckpointError(_convert_hint(path))
    # torch's own text is long; keep the line that says what went wrong
    tail = message.split("WeightsUnpickler error:", 1)[-1]
    reason = next((ln.strip() for ln in tail.splitlines() if ln.strip()), type(err).__name__)
    return CheckpointError(
        f"checkpoint {path} cannot be read (torn, or not a checkpoint): {reason[:200]}"
    )


def read_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict[str, Any]:
    """The payload of a checkpoint, loaded with ``weights_only=True`` and checked for shape.

    Raises FileNotFoundError when there is no file and :class:`CheckpointError` (one line naming
    the file) when it cannot be used; nothing in the file is executed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - a torn, foreign or unsafe file: one line
        raise _load_error(path, err) from None
    if not isinstance(payload, dict) or "arch" not in payload or "model" not in payload:
        raise CheckpointError(f"{path} is not a wasearch checkpoint (no 'arch'/'model' entries)")
    for key, kind in _ENTRIES.items():
        if key in payload and (
            not isinstance(payload[key], kind) or isinstance(payload[key], bool)
        ):
            raise CheckpointError(
                f"{path} is not a wasearch checkpoint: its {key!r} entry is a "
                f"{type(payload[key]).__name__}"
            )
    fmt = payload.get("format", 1)
    if fmt > CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"checkpoint {path} has format {fmt}, newer than this wasearch reads "
            f"({CHECKPOINT_FORMAT}); update wasearch to use it"
        )
    return payload


def fitting_state(
    path: str | os.PathLike,
    state: Mapping[str, Any],
    own: Mapping[str, torch.Tensor],
    *,
    optional: Callable[[str], bool] = lambda key: False,
) -> dict[str, torch.Tensor]:
    """The entries of ``state`` for every key of ``own``: present, a tensor of the same shape.

    Keys for which ``optional(key)`` holds are left out (a conversion sets them itself). A
    missing or mis-shaped key raises :class:`CheckpointError` naming the first few of each.
    """
    load, missing, misfit = {}, [], []
    for key, value in own.items():
        if optional(key):
            continue
        source = state.get(key)
        if source is None:
            missing.append(key)
        elif not isinstance(source, torch.Tensor):
            misfit.append(f"{key} is a {type(source).__name__} in the checkpoint, not a tensor")
        elif source.shape != value.shape:
            misfit.append(
                f"shape of {key} is {tuple(source.shape)} in the checkpoint and "
                f"{tuple(value.shape)} in the model"
            )
        else:
            load[key] = source
    if missing or misfit:
        parts = []
        if missing:
            more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
            parts.append(f"missing {', '.join(missing[:3])}{more}")
        parts += misfit[:3] + ([f"{len(misfit) - 3} more mis-shaped"] if len(misfit) > 3 else [])
        raise CheckpointError(f"checkpoint {path} does not fit the model: {'; '.join(parts)}")
    return load


def _layer_changed(src: Arch, dst: Arch, name: str) -> bool:
    a, b = src.choice(name), dst.choice(name)
    return (a.conv, a.tile, a.granularity) != (b.conv, b.tile, b.granularity)


def checkpoint_arch(path: str | os.PathLike) -> Arch:
    """The architecture a checkpoint was trained as; :class:`CheckpointError` if unusable."""
    return Arch.from_dict(read_checkpoint(path)["arch"], str(path))


def check_init_from(model: ResNetWA, path: str | os.PathLike) -> None:
    """Raise :class:`CheckpointError` where :func:`init_from_checkpoint` would refuse ``path``
    for ``model``; change nothing. A command line calls it before it prints or writes anything.
    """
    _adaptation_state(model, path)


def _adaptation_state(model: ResNetWA, path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The checkpoint entries that initialize ``model`` (see :func:`init_from_checkpoint`)."""
    payload = read_checkpoint(path)
    src_arch = Arch.from_dict(payload["arch"], str(path))
    dst_arch = model.arch
    for key in ("backbone", "width", "num_classes"):
        if getattr(src_arch, key) != getattr(dst_arch, key):
            raise CheckpointError(
                f"checkpoint {path} has {key}={getattr(src_arch, key)!r} but the model has "
                f"{getattr(dst_arch, key)!r}; adaptation needs the same backbone, width, classes"
            )
    changed = {n for n in dst_arch.layer_names if _layer_changed(src_arch, dst_arch, n)}

    def set_by_conversion(key: str) -> bool:
        if ".q_" in key:
            module_name, rest = key.split(".q_", 1)
            # Winograd-domain ranges of another algorithm mean nothing here
            return module_name in changed and rest.split(".")[0] in _WINOGRAD_DOMAIN
        module_name, leaf = key.rsplit(".", 1)
        # static transforms stay exact; other tiles' transforms do not apply
        return leaf in TRANSFORMS and (
            module_name in changed or dst_arch.choice(module_name).conv == "static"
        )

    return fitting_state(path, payload["model"], model.state_dict(), optional=set_by_conversion)


def init_from_checkpoint(model: ResNetWA, path: str | os.PathLike) -> list[str]:
    """Initialize ``model`` from a checkpoint of another architecture (the adaptation shortcut).

    Every entry the model needs must be in the checkpoint with its shape, except what the
    conversion sets itself: the transforms of layers whose algorithm changed (and of static
    layers, which keep their exact values) and the Winograd-domain ranges of layers whose
    algorithm changed. Returns the names of the quantizers left empty (to be warmed up by
    ``wasearch.engine.warmup_ranges``). Raises :class:`CheckpointError` (a ValueError) when
    backbone, width or classes differ, or naming the first missing or mis-shaped entries;
    :func:`check_init_from` makes the same checks without loading anything.
    """
    load = _adaptation_state(model, path)
    model.load_state_dict(load, strict=False)
    # Quantizers the checkpoint did not initialize (new stages, or ranges skipped above).
    empty = []
    for name, module in model.named_modules():
        if isinstance(module, FakeQuantize) and module.running and module.bits is not None:
            key = f"{name}.initialized"
            if key not in load or not bool(load[key]):
                module.reset_range()
                empty.append(name)
    return empty
