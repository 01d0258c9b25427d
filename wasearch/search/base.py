"""The shared pretrained base every trial is adapted from, and the training configs.

``ensure_base`` trains ``results/<study>/base/best.pt`` once (several processes may ask at once:
one trains, the others wait on a lock); ``base_config``/``trial_config`` turn the space's
``base``/``trial`` sections into ``engine.TrainConfig``; ``load_space_data`` loads the space's
dataset. The device and thread helpers live here too, since the base is the first thing a run
trains (``search.py pretrain``, :func:`~wasearch.search.run.pretrain`, trains only the base).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..arch import Arch
from ..cli import UserError
from ..fileio import atomic_write_text, sha256_file
from ._lock import FileLock
from .space import SearchSpace

if TYPE_CHECKING:
    from ..data import DataSplits

__all__ = [
    "AUTO_TRIAL_LR_FACTOR",
    "base_config",
    "default_threads",
    "ensure_base",
    "load_space_data",
    "resolve_device",
    "set_threads",
    "trial_config",
    "trial_lr",
]

logger = logging.getLogger(__name__)


#: ``trial.lr: auto`` is this multiple of the base's last learning rate. Fine-tuning at the
#: rate where the base's schedule ended keeps its accuracy (a 10x larger rate undid 1.2-4
#: points of it and left trials ranking architectures no better than chance; Kendall tau 0.1
#: against 3-epoch training, 0.79 with this rule, on real CIFAR-10: docs/search.md).
AUTO_TRIAL_LR_FACTOR = 5.0


def trial_lr(space: SearchSpace) -> float:
    """The trial's learning rate: ``trial.lr``, or for ``auto`` 5x the base's last one."""
    from ..engine import last_lr

    lr = space.trial["lr"]
    if lr == "auto":
        return AUTO_TRIAL_LR_FACTOR * last_lr(base_config(space))
    return float(lr)


def _section_config(space: SearchSpace, section: dict, **extra: Any) -> Any:
    """A ``TrainConfig`` from the space's ``base`` or ``trial`` section."""
    from ..engine import TrainConfig

    return TrainConfig(
        epochs=section["epochs"],
        batch_size=space.data["batch_size"],
        lr=section["lr"],
        transform_lr=section["transform_lr"],
        seed=space.seed,
        max_batches_per_epoch=section["max_batches"],
        **extra,
    )


def base_config(space: SearchSpace) -> Any:
    """The training config of the shared base: the space's ``base`` section."""
    return _section_config(space, space.base)


def trial_config(space: SearchSpace) -> Any:
    """The training config of one trial: the space's ``trial`` budget."""
    section = {**space.trial, "lr": trial_lr(space)}
    return _section_config(
        space,
        section,
        warmup_batches=space.trial["warmup_batches"],
        distill=float(space.trial["distill"]),
    )


def load_space_data(space: SearchSpace) -> DataSplits:
    """The dataset a space names (errors as :class:`UserError`/``DataError``), its images fitted
    to the model's ``input_size`` (resized on the shorter side and center-cropped, said once in
    the log) when they have another size."""
    from ..data import load_dataset

    d = space.data
    try:
        data = load_dataset(
            d["dataset"],
            data_dir=d["data_dir"],
            download=d["download"],
            val_fraction=d["val_fraction"],
            limit_train=d["limit_train"],
            limit_test=d["limit_test"],
            seed=space.seed,
            image_size=space.input_size,
        )
    except ValueError as err:
        raise UserError(f"{space.path}: data: {err}") from None
    if data.image_size != (space.input_size, space.input_size):
        raise UserError(
            f"{space.path}: model.input_size: {space.input_size} but {data.name} images are "
            f"{data.image_size[0]}x{data.image_size[1]}"
        )
    if data.num_classes != space.num_classes:
        raise UserError(
            f"{space.path}: model.num_classes: {space.num_classes} but {data.name} has "
            f"{data.num_classes} classes"
        )
    return data


def ensure_base(
    space: SearchSpace,
    study_dir: Path,
    *,
    data: DataSplits | Callable[[], DataSplits],
    device: str = "auto",
    progress: bool = True,
) -> Path:
    """Train the shared base once (``results/<study>/base/best.pt``) and return its path.

    Several processes may call this at once: a lock file lets one train while the others wait.
    An interrupted base training resumes from its ``last.pt``. ``data`` may be a callable, so
    that waiting for a finished base costs no data loading.

    Base checkpoints may come from another machine (a copied or shared ``results/``), so they
    are read safely: a ``best.pt`` or ``last.pt`` that cannot be (it needs full unpickling, is
    torn, or is not a checkpoint) stops with a :class:`UserError` naming it, and nothing is
    deleted. A ``last.pt`` of another architecture or recipe is moved aside to
    ``base.discarded-<time>/`` (never deleted) and the base is trained again.
    """
    from ..engine import DivergenceError, fit
    from ..models import build

    base_dir = study_dir / "base"
    done = base_dir / "done.json"
    if done.is_file():
        return _checked_base(base_dir / "best.pt")

    def waiting(holder: str) -> None:
        logger.info("waiting for %s, which is training the base of %s", holder, study_dir)

    with FileLock(study_dir / "base.lock", on_wait=waiting):
        if done.is_file():
            return _checked_base(base_dir / "best.pt")
        splits = data() if callable(data) else data
        arch = space.base_arch(num_classes=splits.num_classes)
        config = base_config(space)
        resume = (base_dir / "last.pt").is_file() and _base_resumable(base_dir, arch, config)
        logger.info(
            "%s the base (%s, %d epochs) in %s",
            "resuming" if resume else "training",
            arch.summary(),
            config.epochs,
            base_dir,
        )
        try:
            result = fit(
                build(arch),
                splits,
                config,
                out_dir=base_dir,
                device=device,
                resume=resume,
                progress=progress,
                log=logger.info,
                extra={"study": study_dir.name, "role": "search base"},
            )
        except DivergenceError as err:
            raise UserError(
                f"{space.path}: base: training diverged ({err}); lower base.lr"
            ) from None
        info = {
            "arch": arch.summary(),
            "best_val_acc": result.best_val_acc,
            "best_epoch": result.best_epoch,
            "epochs": config.epochs,
            "seconds": result.seconds,
            "sha256": sha256_file(base_dir / "best.pt"),
        }
        atomic_write_text(done, json.dumps(info, indent=1))
        logger.info(
            "base ready: val acc %.4f (epoch %d), %.0f s",
            result.best_val_acc,
            result.best_epoch,
            result.seconds,
        )
    return base_dir / "best.pt"


def _checked_base(best: Path) -> Path:
    """``best`` when it reads as a checkpoint (safely: nothing in it runs); else a UserError."""
    from ..engine import CheckpointError, read_checkpoint

    try:
        read_checkpoint(best)
    except (FileNotFoundError, CheckpointError) as err:
        raise UserError(
            f"{err}; the base is marked done ({best.parent / 'done.json'}), so replace the file "
            f"or move {best.parent} away to train the base again"
        ) from None
    return best


def _base_resumable(base_dir: Path, arch: Arch, config: Any) -> bool:
    """Whether ``base_dir/last.pt`` continues this base; one of another architecture or recipe
    is moved aside (kept, never deleted) and False returned."""
    from ..engine import CheckpointError, read_checkpoint

    last = base_dir / "last.pt"
    try:
        payload = read_checkpoint(last)
    except CheckpointError as err:
        raise UserError(f"{err}; or move {base_dir} away to train the base again") from None
    try:
        same_arch = Arch.from_dict(payload["arch"], str(last)) == arch
    except ValueError:
        same_arch = False
    if (
        same_arch
        and payload.get("config") == config.to_dict()
        and payload.get("epoch", 0) <= config.epochs  # == epochs: done but for done.json
    ):
        return True
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    aside, n = base_dir.with_name(f"base.discarded-{stamp}"), 1
    while aside.exists():
        n += 1
        aside = base_dir.with_name(f"base.discarded-{stamp}-{n}")
    os.replace(base_dir, aside)
    logger.warning(
        "%s was trained with another architecture or recipe than the space's base; moved it "
        "to %s (delete that when you no longer need it) and training the base again",
        last,
        aside,
    )
    return False


def resolve_device(requested: str) -> str:
    """``--device`` as torch names it; a device this machine lacks is a UserError."""
    from ..engine import select_device

    try:
        return str(select_device(requested))
    except (ValueError, RuntimeError) as err:
        raise UserError(f"--device: {err}") from None


def default_threads(workers: int = 1) -> int:
    """Torch threads per worker: the cores not busy with other work (one-minute load average),
    shared among the workers, at least one. Intra-op threads that compete with other processes
    for the same cores wait on each other; on a busy 2-core machine one thread per process is
    several times faster than two.

    The load is read once per process, at the first ask: a later ask would count the process's
    own work as another's (a benchmark that trains a base and then runs a study would halve its
    threads for the study)."""
    global _LOAD_AT_START
    if _LOAD_AT_START is None:
        try:
            _LOAD_AT_START = os.getloadavg()[0]
        except OSError:
            _LOAD_AT_START = 0.0
    cores = os.cpu_count() or 1
    free = max(1, cores - int(round(_LOAD_AT_START)))
    return max(1, free // max(1, workers))


_LOAD_AT_START: float | None = None


def set_threads(threads: int | None, workers: int = 1) -> int:
    """Set torch's threads (``--threads``, else :func:`default_threads`); return how many."""
    import torch

    n = threads or default_threads(workers)
    torch.set_num_threads(n)
    return n
