"""Smoke test on real CIFAR-10 images (the shared JPEG archive), skipped when it is absent.

A few hundred images, read through the project's own path (the shared archive unpacked to the
cache, then the ImageFolder reader), one short fit of a normal 8-bit network, then the adaptation
shortcut to a tap-wise static F4 8-bit network on the same real images.
"""

from __future__ import annotations

import math

import pytest
import torch

from wasearch.arch import Arch
from wasearch.data import CIFAR10_MEAN, BatchLoader, ensure_shared_cifar10, load_dataset
from wasearch.engine import TrainConfig, evaluate, fit, init_from_checkpoint, warmup_ranges
from wasearch.models import build

WIDTH = 0.125


@pytest.fixture(scope="module")
def cifar_root():
    root = ensure_shared_cifar10()  # unpacked once into the user's cache, never the repository
    if root is None:
        pytest.skip(
            "real-data smoke test skipped: the shared CIFAR-10 archive "
            "(../shared/data/cifar10-jpeg.tar.gz, or $WASEARCH_SHARED_DATA) is not present"
        )
    return root


@pytest.fixture(scope="module")
def cifar(cifar_root, tmp_path_factory):
    # The decoded-image cache of this small subset goes to a temporary folder.
    mp = pytest.MonkeyPatch()
    mp.setenv("WASEARCH_CACHE", str(tmp_path_factory.mktemp("cache")))
    try:
        return load_dataset(
            "cifar10", data_dir=cifar_root, val_fraction=0, limit_train=320, limit_test=200
        )
    finally:
        mp.undo()


def test_real_images_are_cifar10(cifar):
    assert cifar.name == "cifar10" and not cifar.synthetic
    assert cifar.num_classes == 10 and cifar.image_size == (32, 32)
    assert cifar.classes[0] == "airplane" and cifar.classes[-1] == "truck"
    assert len(cifar.train) == 320 and len(cifar.test) == 200
    # Class-balanced subsets of real photographs: every class present, natural pixel statistics.
    assert torch.bincount(cifar.train.labels, minlength=10).min() == 32
    assert torch.bincount(cifar.test.labels, minlength=10).min() == 20
    mean = cifar.train.images.float().mean(dim=(0, 2, 3)) / 255
    assert torch.allclose(mean, torch.tensor(CIFAR10_MEAN), atol=0.05)


def test_short_fit_on_real_images_then_adapt_to_tap_wise_f4(cifar, tmp_path):
    torch.manual_seed(0)
    model = build(Arch.uniform("normal", None, 8, width=WIDTH))
    config = TrainConfig(epochs=3, batch_size=32, lr=2e-3, lr_decay_at=(), eval_batch_size=200)
    result = fit(model, cifar, config, out_dir=tmp_path / "run", progress=False)
    losses = [h["train_loss"] for h in result.history]
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0]  # it learns something from 320 real images
    assert (tmp_path / "run" / "last.pt").is_file()

    wa = build(Arch.uniform("static", 4, 8, granularity="tap", width=WIDTH))
    empty = init_from_checkpoint(wa, tmp_path / "run" / "last.pt")
    assert empty and all(".q_" in name for name in empty)
    norm = {"mean": cifar.mean, "std": cifar.std}
    assert warmup_ranges(wa, BatchLoader(cifar.train, batch_size=32, **norm), 2) == 2
    loss, acc = evaluate(wa, BatchLoader(cifar.test, batch_size=200, **norm))
    assert math.isfinite(loss) and 0.0 <= acc <= 1.0
