"""``search.py export``: write the Arch YAML of a trial or of the Pareto front, with the
``train.py`` commands that train each (both from :mod:`.record`)."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..arch import Arch
from ..cli import UserError
from ..fileio import atomic_write_text, refused_writes_as_user_errors
from .record import front_trials, train_commands
from .storage import open_storage, redact, sqlite_path, storage_url

if TYPE_CHECKING:
    import optuna

__all__ = ["ExportedArch", "export_trials", "load_study_for"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExportedArch:
    """One exported trial: its Arch file, what the search measured, the commands to train it."""

    number: int
    path: Path
    arch: Arch
    val_acc: float | None
    latency_ms: float | None
    checkpoint: Path | None
    commands: tuple[str, ...]


def load_study_for(
    study_dir: Path, *, storage: str | None = None, study_name: str | None = None
) -> tuple[optuna.Study, str]:
    """Open the study of a results folder (its SQLite file, its storage.txt, or ``storage``)."""
    import optuna

    if not study_dir.is_dir():
        raise UserError(f"{study_dir}: no such study folder")
    url = storage_url(None, study_dir, storage)
    db = sqlite_path(url)
    if db is not None and not db.is_file():
        raise UserError(
            f"{study_dir}: no study.db in this folder (name its storage with --storage)"
        )
    store = open_storage(url, heartbeat_interval=None, grace_period=None, create=False)
    name = study_name or study_dir.resolve().name
    try:
        return optuna.load_study(study_name=name, storage=store), url
    except KeyError:
        names = optuna.study.get_all_study_names(storage=store)
        raise UserError(
            f"no study named {name!r} in {redact(url)} (it holds {', '.join(names) or 'none'}); "
            "pick one with --study-name"
        ) from None


def export_trials(
    study_dir: str | os.PathLike,
    *,
    trial: int | None = None,
    storage: str | None = None,
    study_name: str | None = None,
) -> list[ExportedArch]:
    """Write ``results/<study>/pareto/trial_<n>.yaml`` for one trial or (``trial=None``) the front.

    :class:`UserError` (one line) for a study without wasearch trials (one that plain Optuna
    made: no trial has an ``arch`` attribute) and for a folder it cannot write.
    """
    from optuna.trial import TrialState

    study_dir = Path(study_dir)
    study, url = load_study_for(study_dir, storage=storage, study_name=study_name)
    trials = study.get_trials(deepcopy=False)
    if not any("arch" in t.user_attrs for t in trials) and "space" not in study.user_attrs:
        raise UserError(
            f"study {study.study_name!r} in {redact(url)} has no wasearch trials (no trial has "
            "an 'arch' attribute): it was not made by search.py run; nothing to export"
        )
    if trial is not None:
        chosen = [t for t in trials if t.number == trial]
        if not chosen:
            raise UserError(f"--trial {trial}: the study has trials 0..{len(trials) - 1}")
        if "arch" not in chosen[0].user_attrs:
            raise UserError(f"--trial {trial}: it has no architecture ({chosen[0].state.name})")
        if chosen[0].state != TrialState.COMPLETE:
            logger.warning("trial %d is %s, not COMPLETE", trial, chosen[0].state.name)
    else:
        with_arch = [t for t in trials if "arch" in t.user_attrs]
        chosen = front_trials(with_arch, study.user_attrs.get("objectives") or [])
        if not chosen and any(t.state == TrialState.COMPLETE for t in with_arch):
            raise UserError(
                f"{study_dir}: no completed trial meets the study's constraints "
                f"({_constraints(study.user_attrs)}), so its Pareto front is empty; export one "
                "trial with --trial N"
            )
        if not chosen:
            raise UserError(f"{study_dir}: no completed trial yet; nothing to export")
    space = study.user_attrs.get("space") or {}
    out_dir = study_dir / "pareto"
    with refused_writes_as_user_errors():
        out_dir.mkdir(parents=True, exist_ok=True)
    exported = []
    for t in sorted(chosen, key=lambda x: x.number):
        arch = Arch.from_yaml(t.user_attrs["arch"], f"trial {t.number}")
        path = out_dir / f"trial_{t.number}.yaml"
        acc, lat = t.user_attrs.get("val_acc"), t.user_attrs.get("latency_ms")
        header = [
            f"# study {study.study_name}, trial {t.number} ({t.state.name})"
            + (f", reference {t.user_attrs['reference']}" if "reference" in t.user_attrs else ""),
            f"# {arch.summary()}",
            "# val acc "
            + (f"{acc:.4f}" if isinstance(acc, float) else "?")
            + " after the search's fine-tuning; latency "
            + (f"{lat:.3f} ms" if isinstance(lat, float) else "?"),
        ]
        with refused_writes_as_user_errors():
            atomic_write_text(path, "\n".join(header) + "\n" + arch.to_yaml())
        ckpt = study_dir / "trials" / str(t.number) / "best.pt"
        commands = train_commands(space, path, study.study_name, t.number, ckpt)
        exported.append(
            ExportedArch(
                t.number, path, arch, acc, lat, ckpt if ckpt.is_file() else None, commands
            )
        )
    return exported


def _constraints(attrs: Mapping[str, Any]) -> str:
    limits = {k: v for k, v in (attrs.get("constraints") or {}).items() if k != "prune_infeasible"}
    return ", ".join(f"{k} <= {v}" for k, v in limits.items()) or "none recorded"
