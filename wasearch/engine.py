"""Training and evaluation: fit, evaluate, resume, adaptation from a checkpoint.

Defaults are the Winograd-aware paper's: Adam, lr 1e-3, weight decay 4e-5, the learning rate
multiplied by 0.1 at 3/5 and 4/5 of the epochs, batch 64. The loss and accuracy of an epoch are
averaged over samples (the original code averaged batch means over the dataset size).

A run with an output folder writes ``last.pt`` every epoch and ``best.pt`` when validation
accuracy improves; :func:`load_checkpoint` rebuilds and evaluates a model from such a file alone.
What a checkpoint holds, how it is written and read safely (``weights_only``, no code runs) and
how one architecture's checkpoint initializes another (:func:`init_from_checkpoint`) is
:mod:`wasearch.checkpoint`; its public names are re-exported here, and so is
``atomic_write_text`` (:mod:`wasearch.fileio`), which older callers import from this module.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .arch import Arch
from .checkpoint import (
    CHECKPOINT_FORMAT,
    TRANSFORMS,
    CheckpointError,
    check_init_from,
    checkpoint_arch,
    checkpoint_payload,
    fitting_state,
    init_from_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from .data import BatchLoader, DataSplits, ImageSet
from .fileio import atomic_write_text, first_line
from .models import ResNetWA, build
from .quant import FakeQuantize

__all__ = [
    "CHECKPOINT_FORMAT",
    "Checkpoint",
    "CheckpointError",
    "DivergenceError",
    "FitResult",
    "TrainConfig",
    "atomic_write_text",
    "check_init_from",
    "checkpoint_arch",
    "count_params",
    "distillation_loss",
    "evaluate",
    "fit",
    "init_from_checkpoint",
    "last_lr",
    "load_checkpoint",
    "read_checkpoint",
    "save_checkpoint",
    "select_device",
    "selection_split",
    "split_loader",
    "warmup_ranges",
]

logger = logging.getLogger(__name__)


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
    # Knowledge distillation from the checkpoint the run starts from (``fit(init_from=...)``):
    # loss = (1 - distill) * CE + distill * T^2 * KL(teacher || student) at temperature T.
    distill: float = 0.0
    distill_temperature: float = 4.0

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
        if not 0.0 <= self.distill <= 1.0:
            raise ValueError(f"distill={self.distill!r} must be in [0, 1] (0: off)")
        if not self.distill_temperature > 0:
            raise ValueError(f"distill_temperature={self.distill_temperature!r} must be positive")
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
    val_images: int = 0  # images of the selection split: an accuracy's binomial n (stats.py)


@dataclass
class Checkpoint:
    """What :func:`load_checkpoint` returns: the rebuilt model (in eval mode) and the run's
    record. It lives here rather than in :mod:`wasearch.checkpoint` because it holds a
    :class:`TrainConfig`, which the training loop owns."""

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


def split_loader(
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


def _write_metrics(out_dir: Path, history: list[dict[str, float]]) -> None:
    if not history:
        return
    atomic_write_text(out_dir / "metrics.json", json.dumps(history, indent=1))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(history[0]))
    writer.writeheader()
    writer.writerows(history)
    atomic_write_text(out_dir / "metrics.csv", buf.getvalue())


def load_checkpoint(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> Checkpoint:
    """Rebuild the model a checkpoint describes, with its weights, ready to evaluate.

    Raises :class:`CheckpointError` (a ValueError) when the file cannot be used.
    """
    payload = read_checkpoint(path, map_location=device)
    arch = Arch.from_dict(payload["arch"], str(path))
    model = build(arch).to(device)
    model.load_state_dict(fitting_state(path, payload["model"], model.state_dict()))
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


def _teacher(config: TrainConfig, source: str | os.PathLike | None) -> nn.Module | None:
    """The frozen model ``config.distill`` learns from: the checkpoint the run started from."""
    if not config.distill:
        return None
    if source is None:
        raise ValueError(
            f"distill={config.distill}: distillation learns from the checkpoint the run "
            "starts from, and this run starts from scratch (give init_from)"
        )
    teacher = load_checkpoint(source).model.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def distillation_loss(
    ce: torch.Tensor, logits: torch.Tensor, target: torch.Tensor, config: TrainConfig
) -> torch.Tensor:
    """``(1 - a) * ce + a * T^2 * KL(softmax(target / T) || softmax(logits / T))``, a =
    ``config.distill`` and T its temperature (Hinton et al., 2015; the T^2 keeps the soft
    term's gradient on the scale of the hard one's)."""
    a, t = config.distill, config.distill_temperature
    soft = F.kl_div(
        F.log_softmax(logits / t, dim=1),
        F.log_softmax(target / t, dim=1),
        reduction="batchmean",
        log_target=True,
    )
    return (1.0 - a) * ce + a * t * t * soft


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
    teacher_from: str | os.PathLike | None = None,
) -> FitResult:
    """Train ``model`` on ``data.train``, select on ``data.val`` (``data.test`` when no val).

    With ``out_dir`` the run writes ``metrics.csv``/``metrics.json`` every epoch, ``last.pt``
    every epoch and ``best.pt`` when validation accuracy improves, all atomically. ``resume``
    continues from ``out_dir/last.pt``. ``init_from`` initializes the weights from another
    checkpoint and warms up the new quantizer ranges. With ``config.distill`` the run
    distills from ``teacher_from`` (default: ``init_from``); its train loss is then the mixed
    loss. ``on_epoch`` sees each epoch's metrics
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
        p for n, p in model.named_parameters() if own_lr and n.rsplit(".", 1)[-1] in TRANSFORMS
    ]
    no_decay = [
        p
        for n, p in model.named_parameters()
        if not (p.ndim > 1 and n.endswith("weight"))
        and not (own_lr and n.rsplit(".", 1)[-1] in TRANSFORMS)
    ]
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if transforms:
        groups.append({"params": transforms, "weight_decay": 0.0, "lr": config.transform_lr})
    optimizer = torch.optim.Adam(groups, lr=config.lr)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, _milestones(config), gamma=0.1)
    train_loader = split_loader(
        data, data.train, batch_size=config.batch_size, train=True, device=device, seed=config.seed
    )
    val_split = selection_split(data)
    val_loader = split_loader(
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
        model.load_state_dict(fitting_state(last, payload["model"], model.state_dict()))
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
                f"does not fit this run: {type(err).__name__}: {first_line(err)})"
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

    source = teacher_from or init_from or extra.get("teacher_from") or extra.get("init_from")
    teacher = _teacher(config, source)
    if teacher is not None:
        extra.setdefault("teacher_from", str(source))
        teacher.to(device)

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
            if teacher is not None:
                with torch.no_grad():
                    target = teacher(x)
                loss = distillation_loss(loss, out_logits, target, config)
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
            payload = checkpoint_payload(
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
            save_checkpoint(payload, out / "last.pt")
            if improved:
                save_checkpoint(payload, out / "best.pt")
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
        val_images=len(val_split),
    )


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, disable=not enabled, dynamic_ncols=True)


def count_params(model: nn.Module) -> int:
    """Trainable parameters (flex transforms included)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
