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

import logging
import os
from dataclasses import replace
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
from .imagefolder import fit_images, load_image_folder
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
    "fit_images",
    "load_real_cifar10",
    "load_dataset",
    "make_synthetic",
    "normalize",
]

DATASETS = ("synthetic", "cifar10", "cifar100", "imagefolder")

logger = logging.getLogger(__name__)


def load_dataset(
    name: str = "synthetic",
    *,
    data_dir: str | os.PathLike | None = None,
    download: bool = False,
    val_fraction: float = 0.1,
    limit_train: int | None = None,
    limit_test: int | None = None,
    seed: int = 0,
    image_size: int | None = None,
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
        image_size: fit every image to ``image_size x image_size`` (the shorter side resized,
            then the centre cropped; :func:`fit_images`), said once in the log when the
            images are another size; None keeps them as they are.

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
    if image_size is not None and (
        isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1
    ):
        raise ValueError(f"image_size={image_size!r} must be a positive integer")
    if key == "synthetic":
        splits = load_synthetic(**options)
    elif key == "imagefolder":
        if data_dir is None:
            raise DataError(
                "the imagefolder dataset needs --data-dir: a folder with train/ and test/ "
                "subfolders of class folders"
            )
        splits = load_image_folder(Path(data_dir).expanduser(), image_size=image_size, **options)
    else:
        root = Path(data_dir).expanduser() if data_dir is not None else cache_root() / "data"
        splits = load_cifar(key, root, download=download, **options)
    return _fitted(splits, image_size)


def _fitted(splits: DataSplits, size: int | None) -> DataSplits:
    """``splits`` with every image fitted to ``size x size``, said once when that changes them
    (an ImageFolder is fitted while decoding, image by image)."""
    if size is None or splits.image_size == (size, size):
        return splits
    h, w = splits.image_size
    logger.info(
        "%s images are %dx%d: resized to %dx%d (shorter side, then centre crop)",
        splits.name, h, w, size, size,
    )  # fmt: skip

    def fit(s: ImageSet | None) -> ImageSet | None:
        return None if s is None else ImageSet(fit_images(s.images, size), s.labels)

    return replace(splits, train=fit(splits.train), val=fit(splits.val), test=fit(splits.test))
