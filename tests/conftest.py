"""Fixtures shared by the test files."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

CIFAR10_NAMES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip


@pytest.fixture(scope="module")
def tiny_cifar(tmp_path_factory):
    """A generated CIFAR-10-like ImageFolder (8 train, 3 test images per class, 32x32 PNG)."""
    root = tmp_path_factory.mktemp("cifar")
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("test", 3)):
        for c, name in enumerate(CIFAR10_NAMES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                img = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
                img[..., c % 3] //= 4  # a little class signal
                Image.fromarray(img).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def tiny_data():
    """64 training and 32 test images of the synthetic set, no validation split: enough for one
    epoch of a layer-choice test that trains, checkpoints and reloads."""
    from wasearch.data import load_dataset

    return load_dataset("synthetic", limit_train=64, limit_test=32, val_fraction=0, seed=0)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` skip when CUDA is absent. Nothing deselects ``slow`` tests: the
    README's ``python -m pytest`` runs them (``-m "not slow"`` leaves them out)."""
    gpu = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu:
        return
    import torch  # only when a gpu test was collected

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(
        reason="marked gpu: needs CUDA, and torch.cuda.is_available() is False"
    )
    for item in gpu:
        item.add_marker(skip)
