"""ImageFolder datasets: ``root/train/<class>/*.jpg|png|...`` and ``root/test/`` (or ``val/``).

Only the images a split keeps are decoded (limits are applied to the file lists first), and the
decoded tensors are cached in one ``.pt`` file under ``<cache root>/decoded/``, keyed by the
folder, the classes and every selected file's size and modification time, so a second run
with the same selection reads one file instead of decoding again. The cache is written
atomically and read with ``weights_only=True``; an unreadable or foreign cache file is ignored.

With an ``image_size`` every image is fitted to ``image_size x image_size`` as it is decoded
(:func:`fit_images`: the shorter side resized to the size, then the centre cropped), so folders
of other or mixed sizes load; without one, all images must have the same size.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from ..fileio import atomic_writer
from .splits import (
    DataError,
    DataSplits,
    ImageSet,
    cache_root,
    channel_stats,
    split_indices,
    subset_indices,
)

__all__ = ["IMAGE_EXTENSIONS", "fit_images", "is_image_folder", "load_image_folder"]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")

_CACHE_VERSION = 1


def is_image_folder(root: Path) -> bool:
    return (root / "train").is_dir() and ((root / "test").is_dir() or (root / "val").is_dir())


def _list_split(folder: Path) -> tuple[tuple[str, ...], list[str], list[int]]:
    """Class names (sorted folder names) and the sorted image files of each, with labels."""
    if not folder.is_dir():
        raise DataError(f"missing folder {folder} (expected one folder per class inside it)")
    classes = tuple(
        sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
    )
    if not classes:
        raise DataError(f"no class folders in {folder}")
    files: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        class_dir = folder / name
        names = sorted(
            e.name
            for e in os.scandir(class_dir)
            if not e.name.startswith(".")
            and e.name.lower().endswith(IMAGE_EXTENSIONS)
            and e.is_file()
        )
        if not names:
            raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {class_dir}")
        prefix = os.path.join(class_dir, "")  # plain strings: 60,000 Paths cost a second
        files.extend(prefix + n for n in names)
        labels.extend([label] * len(names))
    return classes, files, labels


def _pil_decode(path: str) -> torch.Tensor:
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            array = np.asarray(im.convert("RGB"))
    except (OSError, UnidentifiedImageError) as exc:
        raise DataError(f"cannot decode image {path}: {exc}") from exc
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def fit_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """(N, 3, H, W) or (3, H, W) uint8 images at ``size x size``: the shorter side resized to
    ``size`` (antialiased bilinear), then the centre cropped. Images already that size are
    returned as they are."""
    from torchvision.transforms.v2 import functional as TF

    if tuple(images.shape[-2:]) == (size, size):
        return images
    if min(images.shape[-2:]) != size:
        images = TF.resize(images, size, antialias=True)
    return TF.center_crop(images, [size, size])


def _decode_files(files: Sequence[str], image_size: int | None = None) -> torch.Tensor:
    """Decode ``files`` into one (N, 3, H, W) uint8 tensor; all must have the same size, or
    each is fitted to ``image_size`` (:func:`fit_images`).

    JPEG and PNG go through torchvision's libjpeg/libpng decoders (about twice as fast as PIL
    on small images), everything else, and anything they reject, through PIL.
    """
    from torchvision.io import ImageReadMode, decode_image, read_file

    def decode(path: str) -> torch.Tensor:
        if path.lower().endswith((".jpg", ".jpeg", ".png")):
            try:
                return decode_image(read_file(path), mode=ImageReadMode.RGB)
            except (RuntimeError, ValueError):
                pass  # PIL may still read it, or names the file when it cannot
        return _pil_decode(path)

    if not files:
        return torch.empty(0, 3, 0, 0, dtype=torch.uint8)
    with warnings.catch_warnings():
        # torchvision 0.29 deprecates its decoders in favour of torchcodec, not installed here.
        warnings.simplefilter("ignore", DeprecationWarning)
        first = decode(files[0])
        if image_size is not None:
            first = fit_images(first, image_size)
        out = torch.empty(len(files), *first.shape, dtype=torch.uint8)
        out[0] = first
        for i in range(1, len(files)):
            image = decode(files[i])
            if image_size is not None:
                image = fit_images(image, image_size)
            if image.shape != first.shape:
                raise DataError(
                    f"image {files[i]} is {image.shape[2]}x{image.shape[1]} but {files[0]} is "
                    f"{first.shape[2]}x{first.shape[1]}; all images must have the same size "
                    "(or give an input size, e.g. train.py --input-size, to fit them to it)"
                )
            out[i] = image
    return out


def _cache_key(
    root: Path,
    classes: Sequence[str],
    selections: Sequence[Sequence[str]],
    image_size: int | None = None,
) -> str:
    digest = hashlib.sha256(f"v{_CACHE_VERSION}\n{root}\n".encode())
    if image_size is not None:  # the native-size key stays what it was
        digest.update(f"size {image_size}\n".encode())
    digest.update("\n".join(classes).encode())
    for files in selections:
        digest.update(b"\n--\n")
        for path in files:
            stat = os.stat(path)
            digest.update(f"{path}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:32]


def _read_cache(path: Path) -> dict[str, object] | None:
    if not path.is_file():
        return None
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, EOFError, RuntimeError, ValueError, pickle.UnpicklingError) as exc:
        # a truncated or foreign file: decode again
        logger.warning("ignoring unreadable cache %s: %s", path, exc)
        return None
    if not isinstance(content, dict) or content.get("version") != _CACHE_VERSION:
        return None
    return content


def _write_cache(path: Path, content: dict[str, object]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_writer(path) as fh:
            torch.save(content, fh)
    except OSError as exc:  # a read-only cache only costs time
        logger.warning("could not write the decoded-image cache %s: %s", path, exc)


def load_image_folder(
    root: Path,
    *,
    val_fraction: float,
    limit_train: int | None,
    limit_test: int | None,
    seed: int,
    stats: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
    image_size: int | None = None,
) -> DataSplits:
    """``root/train/<class>/...`` and ``root/test/`` (or ``root/val/``) as splits; ``stats``
    (mean, std) replaces the statistics measured on the training images (CIFAR's published
    ones for a CIFAR copy in this layout); ``image_size`` fits every image to that square."""
    if not root.is_dir():
        raise DataError(
            f"image folder {root} does not exist; pass --data-dir pointing at a folder with "
            "train/ and test/ subfolders"
        )
    test_dir = root / "test" if (root / "test").is_dir() else root / "val"
    if not (root / "train").is_dir() or not test_dir.is_dir():
        missing = root / "train" if not (root / "train").is_dir() else root / "test"
        raise DataError(f"missing folder {missing} (expected train/ and test/ or val/ in {root})")
    classes, train_files, train_labels = _list_split(root / "train")
    test_classes, test_files, test_labels = _list_split(test_dir)
    if test_classes != classes:
        only_train = sorted(set(classes) - set(test_classes))
        only_test = sorted(set(test_classes) - set(classes))
        raise DataError(
            f"class folders differ between {root / 'train'} and {test_dir}: "
            f"only in train {only_train}, only in {test_dir.name} {only_test}"
        )

    # Choose the files first, so limits decode only what they keep.
    train_idx, val_idx = split_indices(
        torch.tensor(train_labels, dtype=torch.int64),
        val_fraction=val_fraction,
        limit=limit_train,
        seed=seed,
    )
    test_idx = subset_indices(
        torch.tensor(test_labels, dtype=torch.int64), limit=limit_test, seed=seed
    )
    val_idx_list = val_idx.tolist() if val_idx is not None else []
    selections = {
        "train": [train_files[i] for i in train_idx.tolist()],
        "val": [train_files[i] for i in val_idx_list],
        "test": [test_files[i] for i in test_idx.tolist()],
    }
    select_labels = {
        "train": [train_labels[i] for i in train_idx.tolist()],
        "val": [train_labels[i] for i in val_idx_list],
        "test": [test_labels[i] for i in test_idx.tolist()],
    }

    key = _cache_key(root.resolve(), classes, list(selections.values()), image_size)
    cache_file = cache_root() / "decoded" / f"{key}.pt"
    content = _read_cache(cache_file)
    if content is not None:
        logger.info("decoded images from cache %s", cache_file)
    else:
        total = sum(len(v) for v in selections.values())
        logger.info("decoding %d images under %s", total, root)
        content = {"version": _CACHE_VERSION}
        for split, files in selections.items():
            content[f"{split}_images"] = _decode_files(files, image_size)
            content[f"{split}_labels"] = torch.tensor(select_labels[split], dtype=torch.int64)
        sizes = {tuple(content[f"{s}_images"].shape[-2:]) for s in selections if selections[s]}
        if len(sizes) > 1:
            raise DataError(
                f"images under {root} differ in size between splits ({sorted(sizes)}); "
                "all images must have the same size"
            )
        _write_cache(cache_file, content)

    train = ImageSet(content["train_images"], content["train_labels"])
    val = ImageSet(content["val_images"], content["val_labels"]) if val_idx is not None else None
    test = ImageSet(content["test_images"], content["test_labels"])
    mean, std = stats if stats is not None else channel_stats(train.images)
    return DataSplits(
        name="imagefolder",
        train=train,
        val=val,
        test=test,
        classes=classes,
        mean=tuple(mean),
        std=tuple(std),
        synthetic=False,
    )
