"""The Optuna study of a search: samplers, pruner, the latency constraint, and opening or
creating the study (its folder, storage and latency model resolved first) and checking that it
was made from the same space.

The rest of the search lives next to this module, one job each (see docs/search.md): the study
folder and storages in :mod:`.storage`, the trial record in :mod:`.record`, the shared base in
:mod:`.base`, the per-process worker in :mod:`.worker`, failing over dead workers' trials in
:mod:`.failover`, the run loop in :mod:`.run` and export in :mod:`.export`.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import time
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from ..arch import Arch
from ..cli import UserError
from ..fileio import atomic_write_text, first_line
from ._lock import worker_id
from .record import reference_attrs
from .space import SearchSpace, parse_space
from .storage import (
    default_storage_url,
    is_rdb,
    redact,
    storage_url,
    study_dir_of,
)

if TYPE_CHECKING:
    import optuna

__all__ = [
    "Prepared",
    "check_same_space",
    "make_pruner",
    "make_sampler",
    "open_study",
    "prepare",
    "sampler_seed",
    "save_study_files",
]

_SPACE_SECTIONS = ("seed", "model", "data", "base", "trial", "choices", "objectives", "latency")


def make_sampler(space: SearchSpace, *, seed: int | None) -> optuna.samplers.BaseSampler:
    """The sampler of ``strategy.name``. The latency constraint, when the space sets one, reaches
    the sampler through each trial (``Trial.set_constraint``, set by the worker once the trial is
    priced): Optuna 5's samplers read it from there, and its ``constraints_func`` is deprecated."""
    import optuna

    st = space.strategy
    name = st["name"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if name == "nsga2":
            return optuna.samplers.NSGAIISampler(population_size=st["population_size"], seed=seed)
        if name == "tpe":
            return optuna.samplers.TPESampler(n_startup_trials=st["n_startup_trials"], seed=seed)
        if name == "gp":
            return optuna.samplers.GPSampler(n_startup_trials=st["n_startup_trials"], seed=seed)
        return optuna.samplers.RandomSampler(seed=seed)


def make_pruner(space: SearchSpace) -> optuna.pruners.BasePruner:
    """MedianPruner for single-objective studies (``strategy.pruner``), else none."""
    import optuna

    if space.multi_objective or space.strategy["pruner"] == "none":
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(
        n_startup_trials=max(1, space.strategy["n_startup_trials"]), n_warmup_steps=0
    )


def sampler_seed(space: SearchSpace, url: str, index: int) -> int:
    """Reproducible on one machine; distinct for each process sharing a remote database."""
    if is_rdb(url) and not url.startswith("sqlite"):
        return (space.seed * 1_000_003 + zlib.crc32(worker_id().encode())) % 2**31
    return space.seed + index


def open_study(
    space: SearchSpace,
    storage: optuna.storages.BaseStorage,
    *,
    study_name: str,
    sampler_seed: int | None,
    latency_model: Any = None,
    reference_latency_ms: float | None = None,
) -> tuple[optuna.Study, bool]:
    """Create the study (attributes, references queued) or load it and check it matches."""
    import optuna

    sampler = make_sampler(space, seed=sampler_seed)
    pruner = make_pruner(space)
    try:
        study = optuna.create_study(
            storage=storage,
            study_name=study_name,
            directions=space.directions,
            sampler=sampler,
            pruner=pruner,
        )
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(
            study_name=study_name, storage=storage, sampler=sampler, pruner=pruner
        )
        check_same_space(study, space)
        return study, False
    # optuna-dashboard and Study.trials_dataframe() show these instead of "Objective 0/1".
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(list(space.study_objectives))
    attrs = {
        "objectives": list(space.study_objectives),
        "space_path": space.path,
        "space": space.raw,
        "dataset": space.data["dataset"],
        "synthetic": space.data["dataset"] == "synthetic",
        "latency_model": space.latency or None,
        "latency_device": latency_model.describe() if latency_model is not None else None,
        "sampler": space.strategy["name"],
        "created": _dt.datetime.now().isoformat(timespec="seconds"),
        "reference_latency_ms": reference_latency_ms,
        "constraints": {k: v for k, v in space.constraints.items() if v is not None},
        "scalarization": space.strategy["scalarize"],
        "space_units": {u.name: list(u.layers) for u in space.units},
    }
    for key, value in attrs.items():
        study.set_user_attr(key, value)
    for name, params in space.references():
        study.enqueue_trial(params, user_attrs=reference_attrs(name))
    return study, True


def check_same_space(study: optuna.Study, space: SearchSpace) -> None:
    """A UserError naming the section when ``space`` differs from the one the study was
    created with (its directions, its ``space`` attribute, its searched units)."""
    have = [d.name.lower() for d in study.directions]
    if have != space.directions:
        raise UserError(
            f"{space.path}: study {study.study_name!r} optimizes {have} but the space asks for "
            f"{space.directions}; give it another name (name: or --study-name)"
        )
    stored = None
    for _ in range(20):  # a study created a moment ago by another worker gets its attrs soon
        stored = study.user_attrs.get("space")
        if stored is not None:
            break
        time.sleep(0.5)
    if stored is None:
        return
    try:
        before = parse_space(stored, source="the stored space")
    except UserError:
        return  # e.g. a latency table that moved: nothing to compare against
    for key in _SPACE_SECTIONS:
        old = getattr(before, key)
        new = getattr(space, key)
        if old != new:
            raise UserError(
                f"{space.path}: {key}: differs from the space study {study.study_name!r} was "
                f"created with ({_short(old)} before, {_short(new)} now); rerun with the old "
                "space, or start a new study (another name: or --study-name)"
            )
    if [(u.name, u.labels) for u in before.units] != [(u.name, u.labels) for u in space.units]:
        raise UserError(
            f"{space.path}: choices: the searched units or options differ from the study's; "
            "start a new study (another name: or --study-name)"
        )


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


@dataclass
class Prepared:
    """Where a study lives and what opening it needs: its folder, storage URL, the latency
    model and the all-normal architecture's latency (ms)."""

    space: SearchSpace
    study_dir: Path
    url: str
    latency_model: Any
    reference_latency_ms: float | None


def prepare(
    space: SearchSpace,
    *,
    results: str | os.PathLike = "results",
    study_name: str | None = None,
    storage: str | None = None,
) -> Prepared:
    """Resolve the study's folder and storage and load its latency model (errors name the key)
    before anything is written or trained."""
    study_dir = study_dir_of(space, results=results, study_name=study_name)
    url = storage_url(space, study_dir, storage)
    latency_model, ref_ms = None, None
    if space.latency:
        latency_model, ref_ms = _latency(space)
    return Prepared(space, study_dir, url, latency_model, ref_ms)


def _latency(space: SearchSpace) -> tuple[Any, float]:
    """The latency model and the all-normal architecture's latency (ms); errors name the key."""
    from ..latency import load_latency_model

    try:
        model = load_latency_model(dict(space.latency))
        ref = Arch.uniform(
            "normal",
            None,
            space.base["bits"],
            backbone=space.model["backbone"],
            width=space.model["width"],
            num_classes=space.num_classes,
            input_size=space.input_size,
            model=space.model_ref,
        )
        ms = model.price(ref).total * 1e3
        for unit in space.units:  # price every option once: missing table rows show up now
            for option in unit.options:
                for layer in unit.layers:
                    spec = next(s for s in space.specs if s.name == layer)
                    model.layer_cost(spec, option)
    except UserError as err:
        msg = str(err)
        raise UserError(msg if msg.startswith(space.path) else f"{space.path}: {msg}") from None
    except (ValueError, KeyError, FileNotFoundError) as err:
        raise UserError(f"{space.path}: latency: {first_line(err)}") from None
    return model, ms


def save_study_files(space: SearchSpace, study_dir: Path, url: str) -> None:
    """``space.yaml`` (the space as run) and ``storage.txt`` (a storage that is not the default
    and has no password) in the study folder, once."""
    study_dir.mkdir(parents=True, exist_ok=True)
    if not (study_dir / "space.yaml").is_file():
        atomic_write_text(study_dir / "space.yaml", yaml.safe_dump(space.raw, sort_keys=False))
    default = default_storage_url(study_dir)
    if url != default and redact(url) == url and not (study_dir / "storage.txt").is_file():
        atomic_write_text(study_dir / "storage.txt", url + "\n")
