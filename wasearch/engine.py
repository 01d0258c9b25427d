"""Training and evaluation: fit, evaluate, checkpoints, resume, adaptation from a checkpoint.

Defaults are the Winograd-aware paper's: Adam, lr 1e-3, weight decay 4e-5, the learning rate
multiplied by 0.1 at 3/5 and 4/5 of the epochs, batch 64. The loss and accuracy of an epoch are
averaged over samples (the original code averaged batch means over the dataset size).

A checkpoint (``best.pt``, ``last.pt``) holds the ``Arch``, the training config, the data
normalization and the metrics besides the weights: :func:`load_checkpoint` rebuilds and evaluates
a model from the file alone.

Checkpoints are plain data: tensors, dicts, lists, strings and numbers (the ``Arch`` and the
config as dicts), and every read uses ``torch.load(weights_only=True)``, so a crafted ``.pt``
cannot run code. A file that needs full unpickling (an older wasearch or another tool wrote it) is
refused with one line naming the converter, ``python -m wasearch.convert OLD.pt NEW.pt``, the one
place that unpickles fully, for a file the user trusts. ``format`` is :data:`CHECKPOINT_FORMAT`;
a file of a newer format is refused.

Adaptation (:func:`init_from_checkpoint`): conv kernels have the same shape in every mode, so a
checkpoint of any architecture initializes any other of the same backbone and width. Weights,
BatchNorm and matching quantizer ranges are copied; static transforms keep their exact Cook-Toom
values; the Winograd-domain quantizers of every layer whose algorithm changed start empty and are
warmed up on the first training batches (:func:`warmup_ranges`). Every other weight, BatchNorm
statistic and range the model needs must be in the checkpoint with its shape: one that does not
fit is refused (:class:`CheckpointError`) rather than leaving layers at random initialization.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import pickle
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .arch import Arch
from .cli import UserError
from .data import BatchLoader, DataSplits, ImageSet
from .fileio import atomic_write_bytes, atomic_write_text
from .models import ResNetWA, build
from .quant import FakeQuantize

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "atomic_write_text",
    "check_init_from",
    "checkpoint_arch",
    "count_params",
    "DivergenceError",
    "FitResult",
    "TrainConfig",
    "evaluate",
    "fit",
    "init_from_checkpoint",
    "load_checkpoint",
    "read_checkpoint",
    "select_device",
    "warmup_ranges",
]

logger = logging.getLogger(__name__)
#: The checkpoint payload's layout. 1: the entries of :func:`_checkpoint_payload`, all plain data
#: (weights_only-loadable). Files without ``format`` are read as 1; newer ones are refused.
CHECKPOINT_FORMAT = 1


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be used: unreadable, needing full unpickling, of a newer format,
    not a wasearch checkpoint, or not fitting the model. One line that names the file."""


class DivergenceError(RuntimeError):
    """The training loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class TrainConfig:
    """How to train. Saved with every run and inside every checkpoint."""

    epochs: int = 120  # the paper's from-scratch budget
    batch_size: int = 64
    lr: float = 1e-3  # Adam
    weight_decay: float = 4e-5
    lr_decay_at: tuple[float, ...] = (0.6, 0.8)  # fractions of the epochs where lr *= 0.1
    seed: int = 0
    augment: bool = True  # random crop (4-pixel padding) and horizontal flip
    eval_batch_size: int = 256
    warmup_batches: int = 10  # Winograd-domain range warm-up after init_from_checkpoint
    max_batches_per_epoch: int | None = None  # cap (quick runs and tests)
    transform_lr: float | None = None  # Adam lr of flex transforms (None: lr); no weight decay

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "eval_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr!r} must be positive")
        if self.transform_lr is not None and not self.transform_lr > 0:
            raise ValueError(f"transform_lr={self.transform_lr!r} must be positive or None")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay={self.weight_decay!r} must be >= 0")
        self.lr_decay_at = tuple(self.lr_decay_at)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["lr_decay_at"] = list(self.lr_decay_at)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class FitResult:
    best_val_acc: float
    best_epoch: int
    last_epoch: int
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    out_dir: Path | None = None


@dataclass
class Checkpoint:
    arch: Arch
    model: ResNetWA
    config: TrainConfig
    data: dict[str, Any]
    epoch: int
    best_val_acc: float
    history: list[dict[str, float]]
    extra: dict[str, Any]


def select_device(requested: str | torch.device | None = None) -> torch.device:
    """``None``/``"auto"``: CUDA when available, else the CPU; otherwise the device asked for."""
    if requested in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(requested)!r} requested but CUDA is not available")
    return device


def _loader(
    data: DataSplits,
    split: ImageSet,
    *,
    batch_size: int,
    train: bool,
    device,
    seed: int = 0,
    augment: bool | None = None,
) -> BatchLoader:
    """A loader of ``split``: shuffled and (unless ``augment=False``) augmented when ``train``."""
    return BatchLoader(
        split,
        batch_size=batch_size,
        mean=data.mean,
        std=data.std,
        shuffle=train,
        augment=train if augment is None else augment,
        device=device,
        seed=seed,
    )


def selection_split(data: DataSplits) -> ImageSet:
    """The split that models are selected on: validation, or test when there is none."""
    return data.val if data.val is not None and len(data.val) else data.test


@torch.no_grad()
def evaluate(model: nn.Module, loader: BatchLoader) -> tuple[float, float]:
    """Mean cross-entropy and accuracy over a loader (model in eval mode)."""
    was_training = model.training
    model.eval()
    total, loss_sum, correct = 0, 0.0, 0
    for x, y in loader:
        out = model(x)
        loss_sum += F.cross_entropy(out, y, reduction="sum").item()
        correct += (out.argmax(1) == y).sum().item()
        total += y.numel()
    model.train(was_training)
    if total == 0:
        return float("nan"), float("nan")
    return loss_sum / total, correct / total


# The one atomic write of the package (wasearch.fileio); the old names stay importable.
_atomic_write_bytes = atomic_write_bytes


def _save_torch(obj: Any, path: Path) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    _atomic_write_bytes(path, buf.getvalue())


def _write_metrics(out_dir: Path, history: list[dict[str, float]]) -> None:
    if not history:
        return
    atomic_write_text(out_dir / "metrics.json", json.dumps(history, indent=1))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(history[0]))
    writer.writeheader()
    writer.writerows(history)
    atomic_write_text(out_dir / "metrics.csv", buf.getvalue())


def _plain(obj: Any, where: str, *, convert: bool = False) -> Any:
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
            out[key] = _plain(value, f"{where}[{key!r}]", convert=convert)
        return out
    if isinstance(obj, (list, tuple)):
        items = [_plain(v, f"{where}[{i}]", convert=convert) for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else tuple(items)
    if convert:
        if isinstance(obj, nn.Module):
            return dict(obj.state_dict())
        if callable(getattr(obj, "to_dict", None)):
            return _plain(obj.to_dict(), where, convert=True)
        if is_dataclass(obj) and not isinstance(obj, type):
            return _plain(asdict(obj), where, convert=True)
        if type(obj).__module__.split(".")[0] == "numpy" and hasattr(obj, "shape"):
            return torch.from_numpy(obj.copy())
    raise TypeError(
        f"{where} is a {type(obj).__module__}.{type(obj).__qualname__}; a checkpoint holds only "
        "tensors, dicts, lists, strings and numbers"
    )


def _checkpoint_payload(
    model, arch, config, data_info, epoch, best, history, optimizer, scheduler, extra
) -> dict[str, Any]:
    return {
        "format": CHECKPOINT_FORMAT,
        "arch": _plain(arch.to_dict(), "arch"),
        "config": _plain(config.to_dict(), "config"),
        "data": _plain(data_info, "data"),
        "epoch": int(epoch),
        "best_val_acc": float(best),
        "history": _plain(history, "history"),
        "model": model.state_dict(),  # str -> tensor (an OrderedDict: allowed by weights_only)
        "optimizer": None if optimizer is None else _plain(optimizer.state_dict(), "optimizer"),
        # MultiStepLR keeps its milestones in a Counter: stored as a dict, restored on resume.
        "scheduler": None if scheduler is None else _plain(scheduler.state_dict(), "scheduler"),
        "extra": _plain(extra, "extra"),
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


def _fitting_state(
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


def load_checkpoint(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> Checkpoint:
    """Rebuild the model a checkpoint describes, with its weights, ready to evaluate.

    Raises :class:`CheckpointError` (a ValueError) when the file cannot be used.
    """
    payload = read_checkpoint(path, map_location=device)
    arch = Arch.from_dict(payload["arch"], str(path))
    model = build(arch).to(device)
    model.load_state_dict(_fitting_state(path, payload["model"], model.state_dict()))
    model.eval()
    return Checkpoint(
        arch=arch,
        model=model,
        config=TrainConfig.from_dict(payload.get("config", {})),
        data=payload.get("data", {}),
        epoch=payload.get("epoch", 0),
        best_val_acc=payload.get("best_val_acc", float("nan")),
        history=payload.get("history", []),
        extra=payload.get("extra", {}),
    )


_WINOGRAD_DOMAIN = ("weight_wd", "input_wd", "product")
_TRANSFORMS = ("A_t", "G", "B_t")


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
        return leaf in _TRANSFORMS and (
            module_name in changed or dst_arch.choice(module_name).conv == "static"
        )

    return _fitting_state(path, payload["model"], model.state_dict(), optional=set_by_conversion)


def init_from_checkpoint(model: ResNetWA, path: str | os.PathLike) -> list[str]:
    """Initialize ``model`` from a checkpoint of another architecture (the adaptation shortcut).

    Every entry the model needs must be in the checkpoint with its shape, except what the
    conversion sets itself: the transforms of layers whose algorithm changed (and of static
    layers, which keep their exact values) and the Winograd-domain ranges of layers whose
    algorithm changed. Returns the names of the quantizers left empty (to be warmed up by
    :func:`warmup_ranges`). Raises :class:`CheckpointError` (a ValueError) when backbone, width
    or classes differ, or naming the first missing or mis-shaped entries;
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


@torch.no_grad()
def warmup_ranges(model: nn.Module, loader: BatchLoader, batches: int = 10) -> int:
    """Initialize empty running quantizer ranges on ``batches`` training batches.

    Only the quantizers that have no range yet observe, as the mean of the batches' ranges; the
    rest of the model runs in evaluation mode, so BatchNorm statistics and existing ranges do not
    move. Returns the number of batches used.
    """
    quantizers = [
        m
        for m in model.modules()
        if isinstance(m, FakeQuantize)
        and m.running
        and m.bits is not None
        and not m.is_initialized
    ]
    if not quantizers or batches <= 0:
        return 0
    was_training = model.training
    model.eval()
    saved = [(q, q.momentum) for q in quantizers]
    used = 0
    for x, _ in loader:
        for q, _m in saved:
            q.train()
            q.momentum = 1.0 / (used + 1)  # running mean of the warm-up batches' ranges
        model(x)
        used += 1
        if used >= batches:
            break
    for q, momentum in saved:
        q.momentum = momentum
    model.train(was_training)
    return used


def _milestones(config: TrainConfig) -> list[int]:
    return sorted({max(1, int(round(f * config.epochs))) for f in config.lr_decay_at})


def last_lr(config: TrainConfig) -> float:
    """The learning rate of the last epoch ``config`` trains (its step schedule applied)."""
    return config.lr * 0.1 ** sum(m < config.epochs for m in _milestones(config))


def fit(
    model: ResNetWA,
    data: DataSplits,
    config: TrainConfig,
    *,
    out_dir: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    resume: bool = False,
    init_from: str | os.PathLike | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    extra: dict[str, Any] | None = None,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> FitResult:
    """Train ``model`` on ``data.train``, select on ``data.val`` (``data.test`` when no val).

    With ``out_dir`` the run writes ``metrics.csv``/``metrics.json`` every epoch, ``last.pt``
    every epoch and ``best.pt`` when validation accuracy improves, all atomically. ``resume``
    continues from ``out_dir/last.pt``. ``init_from`` initializes the weights from another
    checkpoint and warms up the new quantizer ranges. ``on_epoch`` sees each epoch's metrics
    (a search uses it to report and prune). A NaN or infinite loss raises
    :class:`DivergenceError` after the last good epoch was saved.
    """
    log = log or logger.info
    device = select_device(device)
    torch.manual_seed(config.seed)
    model.to(device)
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    data_info = {
        "dataset": data.name,
        "mean": list(data.mean),
        "std": list(data.std),
        "classes": list(data.classes),
        "synthetic": data.synthetic,
    }
    extra = dict(extra or {})
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and n.endswith("weight")]
    # Flex transforms get their own group only when asked, so older checkpoints still resume.
    own_lr = config.transform_lr is not None
    transforms = [
        p for n, p in model.named_parameters() if own_lr and n.rsplit(".", 1)[-1] in _TRANSFORMS
    ]
    no_decay = [
        p
        for n, p in model.named_parameters()
        if not (p.ndim > 1 and n.endswith("weight"))
        and not (own_lr and n.rsplit(".", 1)[-1] in _TRANSFORMS)
    ]
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if transforms:
        groups.append({"params": transforms, "weight_decay": 0.0, "lr": config.transform_lr})
    optimizer = torch.optim.Adam(groups, lr=config.lr)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, _milestones(config), gamma=0.1)
    train_loader = _loader(
        data, data.train, batch_size=config.batch_size, train=True, device=device, seed=config.seed
    )
    val_split = selection_split(data)
    val_loader = _loader(
        data, val_split, batch_size=config.eval_batch_size, train=False, device=device
    )

    start_epoch, best, best_epoch, history = 1, -1.0, 0, []
    if resume:
        if out is None or not (out / "last.pt").is_file():
            raise FileNotFoundError(f"nothing to resume: {out}/last.pt does not exist")
        last = out / "last.pt"
        payload = read_checkpoint(last, map_location=device)
        if Arch.from_dict(payload["arch"], str(last)) != model.arch:
            raise ValueError(f"{last} holds another architecture; cannot resume into it")
        model.load_state_dict(_fitting_state(last, payload["model"], model.state_dict()))
        try:
            optimizer.load_state_dict(payload["optimizer"])
            sched = dict(payload["scheduler"])
            if isinstance(sched.get("milestones"), dict):
                sched["milestones"] = Counter(sched["milestones"])
            scheduler.load_state_dict(sched)
            start_epoch = payload["epoch"] + 1
            best, history = payload["best_val_acc"], payload["history"]
            best_epoch = max((h["epoch"] for h in history if h["val_acc"] == best), default=0)
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(
                f"checkpoint {last} cannot be resumed here (its optimizer, scheduler or history "
                f"does not fit this run: {type(err).__name__}: {_first_line(err)})"
            ) from None
        extra = {**payload.get("extra", {}), **extra}
        log(f"resuming {out} at epoch {start_epoch}/{config.epochs}")
    elif init_from is not None:
        empty = init_from_checkpoint(model, init_from)
        used = warmup_ranges(model, train_loader, config.warmup_batches) if empty else 0
        log(
            f"initialized from {init_from}; {len(empty)} quantizer ranges warmed up on "
            f"{used} batches"
        )
        extra.setdefault("init_from", str(init_from))

    t_start = time.perf_counter()
    for epoch in range(start_epoch, config.epochs + 1):
        t0 = time.perf_counter()
        model.train()
        train_loader.set_epoch(epoch)
        n_batches = len(train_loader)
        if config.max_batches_per_epoch:
            n_batches = min(n_batches, config.max_batches_per_epoch)
        seen, loss_sum, correct = 0, 0.0, 0
        bar = _progress(n_batches, f"epoch {epoch}/{config.epochs}", progress)
        for i, (x, y) in enumerate(train_loader):
            if i >= n_batches:
                break
            out_logits = model(x)
            loss = F.cross_entropy(out_logits, y)
            if not torch.isfinite(loss):
                bar.close()
                raise DivergenceError(
                    f"loss became {loss.item()} at epoch {epoch}, batch {i + 1}; "
                    + (
                        f"the last good checkpoint is {out / 'last.pt'}"
                        if out and (out / "last.pt").exists()
                        else "no checkpoint was written"
                    )
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                seen += y.numel()
                loss_sum += loss.item() * y.numel()
                correct += (out_logits.argmax(1) == y).sum().item()
            if progress:  # the epoch's running mean; refresh=False only stores the text (a
                # few microseconds), which tqdm draws at its next rate-limited redraw
                bar.set_postfix(
                    loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}", refresh=False
                )
            bar.update(1)
        bar.close()
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        val_loss, val_acc = evaluate(model, val_loader)
        row = {
            "epoch": epoch,
            "lr": lr,
            "train_loss": loss_sum / max(seen, 1),
            "train_acc": correct / max(seen, 1),
            "val_loss": val_loss,
            "val_acc": val_acc,
            "seconds": time.perf_counter() - t0,
        }
        history.append(row)
        improved = val_acc > best
        if improved:
            best, best_epoch = val_acc, epoch
        if out is not None:
            payload = _checkpoint_payload(
                model,
                model.arch,
                config,
                data_info,
                epoch,
                best,
                history,
                optimizer,
                scheduler,
                extra,
            )
            _save_torch(payload, out / "last.pt")
            if improved:
                _save_torch(payload, out / "best.pt")
            _write_metrics(out, history)
        log(
            f"epoch {epoch}/{config.epochs}  lr {lr:.2e}  train loss {row['train_loss']:.4f} "
            f"acc {row['train_acc']:.4f}  val loss {val_loss:.4f} acc {val_acc:.4f}"
            f"{'  *' if improved else ''}  ({row['seconds']:.1f}s)"
        )
        if on_epoch is not None:
            on_epoch(row)
    return FitResult(
        best_val_acc=best,
        best_epoch=best_epoch,
        last_epoch=history[-1]["epoch"] if history else 0,
        history=history,
        seconds=time.perf_counter() - t_start,
        out_dir=out,
    )


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else ""


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, disable=not enabled, dynamic_ncols=True)


def count_params(model: nn.Module) -> int:
    """Trainable parameters (flex transforms included)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
