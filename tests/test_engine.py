import json
import math

import pytest
import torch

from wasearch.arch import Arch
from wasearch.data import load_dataset
from wasearch.engine import (
    DivergenceError,
    TrainConfig,
    evaluate,
    fit,
    init_from_checkpoint,
    load_checkpoint,
    split_loader,
)
from wasearch.models import build

WIDTH = 0.125


@pytest.fixture(scope="module")
def data():
    return load_dataset("synthetic", limit_train=1200, limit_test=300, val_fraction=0.05, seed=0)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data):
    """A normal 8-bit model trained 2 short epochs: the base for the adaptation tests."""
    out = tmp_path_factory.mktemp("base")
    torch.manual_seed(0)
    model = build(Arch.uniform("normal", bits=8, width=WIDTH))
    result = fit(model, data, TrainConfig(epochs=2, batch_size=64), out_dir=out, progress=False)
    return out, result


def test_short_training_improves_accuracy_and_writes_run_files(trained, data):
    out, result = trained
    assert len(result.history) == 2
    assert result.best_val_acc > 0.3  # 10 classes: chance is 0.1
    for name in ("best.pt", "last.pt", "metrics.csv", "metrics.json"):
        assert (out / name).is_file()
    rows = json.loads((out / "metrics.json").read_text())
    assert [r["epoch"] for r in rows] == [1, 2]
    assert rows[0]["lr"] == pytest.approx(1e-3) and rows[1]["lr"] == pytest.approx(1e-4)


def test_checkpoint_alone_rebuilds_and_evaluates(trained, data):
    out, result = trained
    ckpt = load_checkpoint(out / "best.pt")
    assert ckpt.arch == Arch.uniform("normal", bits=8, width=WIDTH)
    assert ckpt.data["mean"] == list(data.mean)
    loader = split_loader(data, data.val, batch_size=256, train=False, device="cpu")
    _, acc = evaluate(ckpt.model, loader)
    assert acc == pytest.approx(result.best_val_acc)


def test_resume_continues_from_last(tmp_path, data):
    model = build(Arch.uniform("normal", bits=None, width=WIDTH))
    cfg = TrainConfig(epochs=1, max_batches_per_epoch=3)
    fit(model, data, cfg, out_dir=tmp_path, progress=False)
    cfg2 = TrainConfig(epochs=2, max_batches_per_epoch=3)
    result = fit(build(model.arch), data, cfg2, out_dir=tmp_path, resume=True, progress=False)
    assert [h["epoch"] for h in result.history] == [1, 2]
    with pytest.raises(FileNotFoundError):
        fit(build(model.arch), data, cfg2, out_dir=tmp_path / "none", resume=True)


def test_static_model_initialized_from_normal_gives_same_float_outputs(trained, data):
    out, _ = trained
    x = next(iter(split_loader(data, data.test, batch_size=16, train=False, device="cpu")))[0]
    normal = build(Arch.uniform("normal", bits=None, width=WIDTH))
    init_from_checkpoint(normal, out / "best.pt")
    for tile in (2, 4, 6):
        wa = build(Arch.uniform("static", tile, None, width=WIDTH))
        init_from_checkpoint(wa, out / "best.pt")
        torch.testing.assert_close(wa.eval()(x), normal.eval()(x), rtol=1e-3, atol=1e-3)
        assert torch.equal(wa.layer1[0].conv1.weight, normal.layer1[0].conv1.weight)


def test_adaptation_warms_up_winograd_ranges_and_keeps_static_transforms(trained, data, tmp_path):
    out, _ = trained
    arch = Arch.uniform("static", 2, 8, width=WIDTH)
    model = build(arch)
    exact = model.layer1[0].conv1.B_t.clone()
    cfg = TrainConfig(epochs=1, max_batches_per_epoch=2, warmup_batches=3)
    result = fit(model, data, cfg, out_dir=tmp_path, init_from=out / "best.pt", progress=False)
    assert bool(model.layer1[0].conv1.q_input_wd.initialized)
    assert torch.equal(model.layer1[0].conv1.B_t, exact)
    # Static F2 at 8 bits from a normal 8-bit base stays far above chance.
    assert result.best_val_acc > 0.25


def test_adaptation_refuses_another_width(trained):
    out, _ = trained
    with pytest.raises(ValueError, match="width"):
        init_from_checkpoint(build(Arch.uniform("normal", width=0.25)), out / "best.pt")


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, data):
    model = build(Arch.uniform("normal", bits=None, width=WIDTH))
    cfg = TrainConfig(epochs=1, max_batches_per_epoch=2)
    fit(model, data, cfg, out_dir=tmp_path, progress=False)
    good = torch.load(tmp_path / "last.pt", weights_only=True)["model"]
    with torch.no_grad():
        model.fc.weight.fill_(math.nan)
    with pytest.raises(DivergenceError, match="last good checkpoint"):
        fit(model, data, cfg, out_dir=tmp_path, progress=False)
    after = torch.load(tmp_path / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(good[k], after[k]) for k in good)
    with pytest.raises(DivergenceError, match="no checkpoint was written"):
        fit(model, data, cfg, out_dir=tmp_path / "fresh", progress=False)


def test_engine_keeps_exporting_what_moved_to_checkpoint_and_fileio(tmp_path):
    from wasearch import checkpoint, engine, fileio

    for name in ("read_checkpoint", "save_checkpoint", "init_from_checkpoint", "CheckpointError"):
        assert getattr(engine, name) is getattr(checkpoint, name)
    assert engine.atomic_write_text is fileio.atomic_write_text
    payload = {"arch": Arch.uniform(width=WIDTH).to_dict(), "model": {"w": torch.ones(2)}}
    checkpoint.save_checkpoint(payload, tmp_path / "c.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temporary left behind
    assert torch.equal(engine.read_checkpoint(tmp_path / "c.pt")["model"]["w"], torch.ones(2))
