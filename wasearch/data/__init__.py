"""Datasets held in memory as uint8 tensors, with tensor-side augmentation and batching.

Every dataset is decoded once into ``(N, 3, H, W)`` uint8 tensors (an :class:`ImageSet`), so an
epoch costs only indexing, augmentation and the float conversion of each batch, never image
decoding. :func:`load_dataset` returns a :class:`DataSplits` (train, validation held out from
train, test, class names, normalization statistics); :class:`BatchLoader` iterates normalized
float batches on a device.

Supported datasets (:data:`DATASETS`), one module each:

``synthetic`` (:mod:`.synthetic`)
    A generated, offline, deterministic 10-class 32x32 RGB set (see :func:`make_synthetic`).
``cifar10`` / ``cifar100`` (:mod:`.cifar`)
    The python-pickle release (Krizhevsky, 2009), downloaded by torchvision when asked. Each
    batch file's MD5 is checked against the published sum before it is unpickled (unpickling a
    substituted file could run code); a file that differs is refused, named. A folder with an
    ImageFolder layout (``train/`` and ``test/`` of class folders) is accepted as well.
``imagefolder`` (:mod:`.imagefolder`)
    ``root/train/<class>/*.jpg|png|...`` and ``root/test/<class>/...`` (or ``root/val/``). Decoded
    tensors are cached in one ``.pt`` file under ``<cache root>/decoded/``.

The splits and the shared types live in :mod:`.splits`, batching and augmentation in
:mod:`.loader`.

Folders: the cache root is ``$WASEARCH_CACHE`` when set, else ``~/.cache/wasearch``. The default
``data_dir`` for CIFAR is ``<cache root>/data``.
"""

from __future__ import annotations

import os
from pathlib import Path

from .cifar import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    ensure_shared_cifar10,
    load_cifar,
    load_real_cifar10,
)
from .imagefolder import load_image_folder
from .loader import BatchLoader, augment_batch, normalize
from .splits import DataError, DataSplits, ImageSet, cache_root, check_options
from .synthetic import SYNTHETIC_CLASSES, load_synthetic, make_synthetic

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "DATASETS",
    "SYNTHETIC_CLASSES",
    "BatchLoader",
    "DataError",
    "DataSplits",
    "ImageSet",
    "augment_batch",
    "cache_root",
    "ensure_shared_cifar10",
    "load_real_cifar10",
    "load_dataset",
    "make_synthetic",
    "normalize",
]

DATASETS = ("synthetic", "cifar10", "cifar100", "imagefolder")


def load_dataset(
    name: str = "synthetic",
    *,
    data_dir: str | os.PathLike | None = None,
    download: bool = False,
    val_fraction: float = 0.1,
    limit_train: int | None = None,
    limit_test: int | None = None,
    seed: int = 0,
) -> DataSplits:
    """Load a dataset into memory and split it.

    Args:
        name: one of :data:`DATASETS`.
        data_dir: where the data lives. For CIFAR, the folder holding ``cifar-10-batches-py`` /
            ``cifar-100-python`` (default ``<cache root>/data``, i.e. ``~/.cache/wasearch/data``),
            or an ImageFolder layout; for ``imagefolder``, the root with ``train/`` and ``test/``
            (or ``val/``). Ignored for ``synthetic``.
        download: let torchvision download CIFAR when it is missing.
        val_fraction: the share of the training set held out as validation, in [0, 1); chosen
            at random (deterministically from ``seed``), class-balanced, before limits apply.
        limit_train: keep at most this many training images (after the validation split).
        limit_test: keep at most this many test images (a class-balanced random subset).
        seed: fixes the validation split, the subsets and the synthetic images.

    Raises:
        DataError: an unknown name, or data that is missing or malformed.
        ValueError: an out-of-range ``val_fraction`` or limit.
    """
    check_options(val_fraction, limit_train, limit_test)
    key = name.lower() if isinstance(name, str) else name
    if key not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    options = {
        "val_fraction": float(val_fraction),
        "limit_train": limit_train,
        "limit_test": limit_test,
        "seed": seed,
    }
    if key == "synthetic":
        return load_synthetic(**options)
    if key == "imagefolder":
        if data_dir is None:
            raise DataError(
                "the imagefolder dataset needs --data-dir: a folder with train/ and test/ "
                "subfolders of class folders"
            )
        return load_image_folder(Path(data_dir).expanduser(), **options)
    root = Path(data_dir).expanduser() if data_dir is not None else cache_root() / "data"
    return load_cifar(key, root, download=download, **options)
