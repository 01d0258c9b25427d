"""Checkpoints load without running code (weights_only), and adaptation refuses one that does not
fit the model: through the library and through the commands a user runs (train.py --modelDir,
adapt.py, train.py --resume, search.py run with a shared base)."""

from __future__ import annotations

import functools
import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from wasearch import engine, train_cli
from wasearch.arch import Arch
from wasearch.cli import run_main
from wasearch.data import load_dataset
from wasearch.engine import TrainConfig, fit, init_from_checkpoint, load_checkpoint
from wasearch.models import build
from wasearch.search import load_space
from wasearch.search.base import ensure_base, load_space_data
from wasearch.search.testing import copy_base, tiny_space, write_space

REPO = Path(__file__).resolve().parents[1]
WIDTH = 0.125
TINY = [
    "--dataset", "synthetic", "--mult", str(WIDTH), "--limit-train", "64", "--limit-test",
    "32", "--val-fraction", "0.01", "--batch_size", "32", "--epochs", "1", "--no-progress",
    "--use_cpu",
]  # fmt: skip


class _Armed:
    """Unpickled fully, this opens (creates) ``marker``: what a crafted .pt could do instead."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _malicious(path: Path, marker: Path) -> Path:
    """A .pt that looks like a wasearch checkpoint and creates ``marker`` when fully loaded."""
    arch = Arch.uniform("normal", bits=8, width=WIDTH).to_dict()
    torch.save({"format": 1, "arch": arch, "model": {}, "extra": {"x": _Armed(marker)}}, path)
    return path


def _one_error_line(err: str, path: Path) -> str:
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    assert err.strip().splitlines()[-1] == errors[0]
    assert str(path) in errors[0], errors[0]
    return errors[0]


def _train(argv: list[str]) -> int:
    return run_main(train_cli.main, argv)


def _adapt(argv: list[str]) -> int:
    return run_main(functools.partial(train_cli.main, prog="adapt.py", adapt=True), argv)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models: one torch thread is fastest on shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data():
    return load_dataset("synthetic", limit_train=64, limit_test=16, val_fraction=0.004, seed=0)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A normal 8-bit run trained by train.py (one short epoch): the adaptation source."""
    out = tmp_path_factory.mktemp("runs")
    argv = ["--use_normal_conv", "--Q", "--bits", "8", "--outDir", str(out), "--run-name", "src"]
    assert _train([*argv, *TINY]) == 0
    return out / "src"


# ---------------------------------------------------------------------------------------------
# A crafted checkpoint runs nothing


def test_the_crafted_checkpoint_is_armed(tmp_path):
    """Fully unpickled, the test file does create its marker: the tests below can fail."""
    marker = tmp_path / "pwned"
    torch.load(_malicious(tmp_path / "evil.pt", marker), weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("how", ["train.py --modelDir", "adapt.py", "train.py --resume"])
def test_crafted_checkpoint_through_the_training_commands(tmp_path, capsys, how):
    marker = tmp_path / "pwned"
    out = tmp_path / "runs"
    common = ["--static", "--F", "2", "--outDir", str(out), "--run-name", "run", *TINY]
    if how == "train.py --resume":
        (out / "run").mkdir(parents=True)
        evil = _malicious(out / "run" / "last.pt", marker)
        code = _train([*common, "--resume"])
    else:
        (tmp_path / "src").mkdir()
        evil = _malicious(tmp_path / "src" / "best.pt", marker)
        code = (_train if how.startswith("train") else _adapt)(
            [*common, "--modelDir", str(tmp_path / "src")]
        )
    assert not marker.exists()
    assert code == 2
    line = _one_error_line(capsys.readouterr().err, evil)
    assert f"python -m wasearch.convert {evil} NEW.pt" in line


def _search_cli():
    spec = importlib.util.spec_from_file_location("search_script", REPO / "search.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["last.pt", "best.pt"])
def test_crafted_base_checkpoint_stops_the_search(tmp_path, capsys, name):
    """An unfinished base (last.pt) or a finished one (best.pt + done.json) from elsewhere."""
    marker = tmp_path / "pwned"
    space = write_space(tmp_path / "evil.yaml", tiny_space(name="evil"))
    base = tmp_path / "results" / "evil" / "base"
    base.mkdir(parents=True)
    evil = _malicious(base / name, marker)
    if name == "best.pt":
        (base / "done.json").write_text(json.dumps({"arch": "normal", "epochs": 1}))
    argv = ["run", str(space), "--results", str(tmp_path / "results"), "--device", "cpu"]
    code = run_main(_search_cli().main, [*argv, "--no-progress", "--threads", "1"])
    assert not marker.exists()
    assert code == 2
    _one_error_line(capsys.readouterr().err, evil)
    assert evil.is_file()  # refused, not deleted


# ---------------------------------------------------------------------------------------------
# What the project writes loads with weights_only=True, and resumes exactly


def test_checkpoints_load_with_weights_only(tmp_path, data):
    arch = Arch.uniform("flex", 4, 8, granularity="tap", width=WIDTH)
    config = TrainConfig(epochs=1, max_batches_per_epoch=1, transform_lr=0.01)
    extra = {"where": tmp_path / "x", "score": np.float32(0.5), "pair": (1, 2)}
    fit(build(arch), data, config, out_dir=tmp_path, progress=False, extra=extra)
    for name in ("best.pt", "last.pt"):
        payload = torch.load(tmp_path / name, weights_only=True)
        assert payload["format"] == engine.CHECKPOINT_FORMAT
        assert Arch.from_dict(payload["arch"]) == arch
        assert payload["extra"]["where"] == str(tmp_path / "x")
        assert payload["extra"]["score"] == 0.5 and type(payload["extra"]["score"]) is float
    with pytest.raises(TypeError, match=r"extra\['bad'\]"):
        fit(build(arch), data, config, out_dir=tmp_path / "b", progress=False,
            extra={"bad": object()})  # fmt: skip


def test_resume_restores_optimizer_and_scheduler_exactly(tmp_path, data):
    """Three epochs in one go == one epoch, a stop, and a resume: weights, Adam moments, lr."""
    arch = Arch.uniform("flex", 2, 8, width=WIDTH)
    config = TrainConfig(
        epochs=3, batch_size=16, lr_decay_at=(0.3, 0.6), max_batches_per_epoch=2, transform_lr=5e-3
    )
    torch.manual_seed(0)
    straight = fit(build(arch), data, config, out_dir=tmp_path / "a", progress=False)

    class Stop(Exception):
        pass

    def stop_after_one(row):
        if row["epoch"] == 1:
            raise Stop

    with pytest.raises(Stop):
        fit(build(arch), data, config, out_dir=tmp_path / "b", progress=False,
            on_epoch=stop_after_one)  # fmt: skip
    resumed = fit(build(arch), data, config, out_dir=tmp_path / "b", resume=True, progress=False)
    lrs = [h["lr"] for h in straight.history]
    assert len(set(lrs)) == 3 and [h["lr"] for h in resumed.history] == lrs  # decays at 1 and 2
    a = torch.load(tmp_path / "a" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "last.pt", weights_only=True)
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert a["scheduler"] == b["scheduler"]
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    for index, state in a["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][index][key]), (index, key)


# ---------------------------------------------------------------------------------------------
# Older checkpoints: refused with the way out, converted on request


def _old_style(run_dir: Path, path: Path) -> Path:
    """best.pt as an older version might have pickled it: Arch and TrainConfig objects, a Path."""
    payload = torch.load(run_dir / "best.pt", weights_only=True)
    payload["arch"] = Arch.from_dict(payload["arch"])
    payload["config"] = TrainConfig.from_dict(payload["config"])
    payload["extra"] = {"out_dir": run_dir}
    torch.save(payload, path)
    return path


def test_old_full_pickle_checkpoint_is_refused_then_converted(run_dir, tmp_path, capsys):
    old = _old_style(run_dir, tmp_path / "old.pt")
    with pytest.raises(ValueError, match="needs full unpickling") as info:
        load_checkpoint(old)
    message = str(info.value)
    assert "\n" not in message and f"python -m wasearch.convert {old} NEW.pt" in message

    from wasearch import convert

    new = tmp_path / "new.pt"
    assert run_main(convert.main, [str(old), str(new)]) == 0
    assert str(new) in capsys.readouterr().out
    payload = torch.load(new, weights_only=True)
    assert payload["extra"]["out_dir"] == str(run_dir)
    converted, original = load_checkpoint(new), load_checkpoint(run_dir / "best.pt")
    assert converted.arch == original.arch and converted.config == original.config
    for key, value in original.model.state_dict().items():
        assert torch.equal(value, converted.model.state_dict()[key]), key


def test_convert_refusals_are_one_line(run_dir, tmp_path, capsys):
    from wasearch import convert

    old = _old_style(run_dir, tmp_path / "old.pt")
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    (tmp_path / "taken.pt").write_bytes(b"keep me")
    cases = [
        ([str(tmp_path / "missing.pt"), str(tmp_path / "n1.pt")], tmp_path / "missing.pt"),
        ([str(old), str(tmp_path / "taken.pt")], tmp_path / "taken.pt"),
        ([str(foreign), str(tmp_path / "n2.pt")], foreign),
    ]
    for argv, named in cases:
        assert run_main(convert.main, argv) == 2
        _one_error_line(capsys.readouterr().err, named)
    assert (tmp_path / "taken.pt").read_bytes() == b"keep me"
    assert not (tmp_path / "n1.pt").exists() and not (tmp_path / "n2.pt").exists()


def test_newer_format_is_refused(run_dir, tmp_path):
    payload = torch.load(run_dir / "best.pt", weights_only=True)
    payload["format"] = engine.CHECKPOINT_FORMAT + 1
    torch.save(payload, tmp_path / "future.pt")
    with pytest.raises(ValueError, match="newer"):
        load_checkpoint(tmp_path / "future.pt")


# ---------------------------------------------------------------------------------------------
# Adaptation refuses a checkpoint that does not fit


def _damaged(run_dir: Path, how: str) -> tuple[Path, str]:
    payload = torch.load(run_dir / "best.pt", weights_only=True)
    if how == "empty":
        first = next(iter(build(Arch.uniform("normal", width=WIDTH)).state_dict()))
        payload["model"], named = {}, f"missing {first}"
    elif how == "deleted":
        del payload["model"]["layer2.1.conv2.weight"]
        named = "missing layer2.1.conv2.weight"
    else:
        payload["model"]["fc.weight"] = torch.zeros(10, 3)
        shape = tuple(build(Arch.uniform("normal", width=WIDTH)).fc.weight.shape)
        named = f"shape of fc.weight is (10, 3) in the checkpoint and {shape} in the model"
    path = run_dir / f"{how}.pt"
    torch.save(payload, path)
    return path, named


@pytest.mark.parametrize("how", ["empty", "deleted", "mis-shaped"])
def test_adapting_from_a_checkpoint_that_does_not_fit_is_refused(run_dir, tmp_path, capsys, how):
    bad, named = _damaged(run_dir, how)
    out = tmp_path / "runs"
    argv = ["--modelDir", str(run_dir), "--modelToLoad", bad.name, "--static", "--F", "2"]
    assert _adapt([*argv, "--Q", "--outDir", str(out), *TINY]) == 2
    line = _one_error_line(capsys.readouterr().err, bad)
    assert "does not fit the model" in line and named in line
    assert not any(out.glob("*/last.pt"))  # nothing trained


def test_adaptation_still_works_and_leaves_out_only_what_conversion_adds(run_dir, tmp_path):
    """Normal 8-bit -> static F2 and flex F4: transforms and Winograd-domain ranges are new."""
    for conv, tile in (("static", 2), ("flex", 4)):
        model = build(Arch.uniform(conv, tile, 8, width=WIDTH))
        empty = init_from_checkpoint(model, run_dir / "best.pt")
        assert empty and all(e.rsplit(".", 1)[-1] in ("q_input_wd", "q_product") for e in empty)
    out = tmp_path / "runs"
    argv = ["--modelDir", str(run_dir), "--static", "--F", "2", "--Q", "--outDir", str(out)]
    assert _adapt([*argv, *TINY]) == 0
    assert any(out.glob("*/best.pt"))


def test_flex_to_flex_needs_the_learned_transforms(run_dir, tmp_path, data):
    arch = Arch.uniform("flex", 4, 8, width=WIDTH)
    fit(build(arch), data, TrainConfig(epochs=1, max_batches_per_epoch=1), out_dir=tmp_path,
        progress=False)  # fmt: skip
    payload = torch.load(tmp_path / "last.pt", weights_only=True)
    del payload["model"]["layer3.0.conv1.G"]
    torch.save(payload, tmp_path / "no_g.pt")
    with pytest.raises(ValueError, match=r"does not fit the model: missing layer3\.0\.conv1\.G"):
        init_from_checkpoint(build(arch), tmp_path / "no_g.pt")


# ---------------------------------------------------------------------------------------------
# The study's base: another recipe is moved aside, a finished base is not trained again


@pytest.fixture(scope="module")
def base_study(tmp_path_factory):
    root = tmp_path_factory.mktemp("base") / "results" / "tiny"
    space = load_space(write_space(root.parent.parent / "tiny.yaml", tiny_space()))
    ensure_base(space, root, data=lambda: load_space_data(space), device="cpu", progress=False)
    return space, root


def test_base_of_another_recipe_is_moved_aside_not_deleted(base_study, tmp_path):
    space, src = base_study
    study = tmp_path / "results" / "tiny"
    copy_base(src, study)
    (study / "base" / "done.json").unlink()
    payload = torch.load(study / "base" / "last.pt", weights_only=True)
    payload["config"]["lr"] = 0.123  # trained with another recipe
    torch.save(payload, study / "base" / "last.pt")
    ensure_base(space, study, data=lambda: load_space_data(space), device="cpu", progress=False)
    assert (study / "base" / "done.json").is_file()
    aside = [p for p in study.iterdir() if p.name.startswith("base.discarded")]
    assert len(aside) == 1
    kept = torch.load(aside[0] / "last.pt", weights_only=True)
    assert kept["config"]["lr"] == 0.123


def test_finished_base_without_done_json_is_not_trained_again(base_study, tmp_path):
    space, src = base_study
    study = tmp_path / "results" / "tiny"
    copy_base(src, study)
    (study / "base" / "done.json").unlink()
    before = os.stat(study / "base" / "best.pt").st_mtime_ns
    ensure_base(space, study, data=lambda: load_space_data(space), device="cpu", progress=False)
    assert (study / "base" / "done.json").is_file()
    assert os.stat(study / "base" / "best.pt").st_mtime_ns == before
    assert not [p for p in study.iterdir() if p.name.startswith("base.discarded")]


# ---------------------------------------------------------------------------------------------
# CIFAR batches are pickles too: only the published files are unpickled


def test_cifar_sums_are_the_published_ones():
    import torchvision

    from wasearch.data.cifar import _CIFAR

    releases = {"cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100}
    for name, cls in releases.items():
        published = dict(cls.train_list + cls.test_list) | {cls.meta["filename"]: cls.meta["md5"]}
        fmt = _CIFAR[name]
        assert fmt.md5 == published
        assert set(published) == {*fmt.train_files, fmt.test_file, fmt.meta_file}


def test_cifar_batch_that_is_not_the_published_file_is_not_unpickled(tmp_path, capsys):
    import pickle

    marker = tmp_path / "pwned"
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]
    for name in names:
        (folder / name).write_bytes(pickle.dumps(_Armed(marker)))
    pickle.loads((folder / "test_batch").read_bytes())  # armed: the check below can fail
    assert marker.exists()
    marker.unlink()
    argv = ["--use_normal_conv", "--outDir", str(tmp_path / "runs"), *TINY]
    assert _train([*argv, "--dataset", "cifar10", "--data-dir", str(tmp_path)]) == 2
    assert not marker.exists()
    line = _one_error_line(capsys.readouterr().err, folder / "data_batch_1")
    assert "md5" in line and "--download" in line
