"""Tiny spaces for tests and benchmarks: a search that runs in seconds on a CPU."""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path
from typing import Any

import yaml

__all__ = ["TINY_SPACE", "tiny_space", "write_space"]

#: A 4-unit space on ~128 synthetic images: width 0.125, one 2-batch epoch per trial.
TINY_SPACE: dict[str, Any] = {
    "name": "tiny",
    "seed": 0,
    "model": {"width": 0.125},
    "data": {
        "dataset": "synthetic",
        "val_fraction": 0.012,  # 60 validation images
        "limit_train": 128,
        "limit_test": 32,
        "batch_size": 32,
    },
    "base": {"conv": "normal", "bits": 8, "epochs": 1, "lr": 0.002, "max_batches": 2},
    "trial": {"epochs": 1, "lr": 0.0005, "max_batches": 2, "warmup_batches": 1},
    "choices": {
        "conv": ["normal", "static"],
        "tile": [4],
        "bits": [8],
        "granularity": ["tap"],
        "tie": "stage",
    },
    "objectives": ["accuracy", "latency_ms"],
    "latency": {"kind": "analytical", "profile": "cortex-a73"},
    "strategy": {"name": "nsga2", "population_size": 4},
    "budget": {"trials": 4},
    "storage": {"heartbeat_interval": 1, "grace_period": 3},
}


def tiny_space(**sections: Any) -> dict[str, Any]:
    """:data:`TINY_SPACE` with top-level keys replaced, or sections merged with a non-empty
    dict (an empty dict replaces the section)."""
    space = copy.deepcopy(TINY_SPACE)
    for key, value in sections.items():
        if isinstance(value, dict) and value and isinstance(space.get(key), dict):
            space[key] = {**space[key], **value}
        else:
            space[key] = value
    return space


def write_space(path: str | os.PathLike, space: dict[str, Any]) -> Path:
    path = Path(path)
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    return path


def copy_base(src_study_dir: str | os.PathLike, dst_study_dir: str | os.PathLike) -> None:
    """Reuse a trained base in another study folder (tests: train the tiny base once)."""
    dst = Path(dst_study_dir) / "base"
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(Path(src_study_dir) / "base", dst, dirs_exist_ok=True)


def space_with_base(
    root: str | os.PathLike, base_study_dir: str | os.PathLike, name: str, **changes: Any
) -> Path:
    """Write the tiny space named ``name`` (with ``changes``, as :func:`tiny_space` takes them)
    to ``root/<name>.yaml`` and give its study ``root/results/<name>`` the trained base of
    ``base_study_dir``; return the space file."""
    path = write_space(Path(root) / f"{name}.yaml", tiny_space(name=name, **changes))
    copy_base(base_study_dir, Path(root) / "results" / name)
    return path


def study_at(root: str | os.PathLike, name: str) -> Any:
    """The Optuna study ``name`` in its default SQLite storage under ``root/results``."""
    import optuna

    db = Path(root) / "results" / name / "study.db"
    return optuna.load_study(study_name=name, storage=f"sqlite:///{db}")
