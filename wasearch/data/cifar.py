"""CIFAR-10 and CIFAR-100: the python-pickle release (Krizhevsky, 2009), and the shared archive.

The batches are downloaded by torchvision when asked. Each batch file's MD5 is checked against
the published sum before it is unpickled (unpickling a substituted file could run code); a file
that differs is refused, named. A folder with an ImageFolder layout (``train/`` and ``test/`` of
class folders) is accepted as well.

The benchmarks' real data (:func:`load_real_cifar10`) may also come from a shared CIFAR-10 JPEG
archive next to the repository (``../shared/data``, or ``$WASEARCH_SHARED_DATA``), unpacked once
into the cache root (:func:`ensure_shared_cifar10`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .imagefolder import is_image_folder, load_image_folder
from .splits import (
    DataError,
    DataSplits,
    ImageSet,
    cache_root,
    check_options,
    split_indices,
    subset_indices,
)

__all__ = [
    "CIFAR10_CLASSES",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "ensure_shared_cifar10",
    "load_cifar",
    "load_real_cifar10",
]

logger = logging.getLogger(__name__)

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip

_SHARED_ARCHIVE = "cifar10-jpeg.tar.gz"


@dataclass(frozen=True)
class _CifarFormat:
    """One CIFAR release. ``md5`` holds the published sum of every file that is unpickled (as
    torchvision's ``CIFAR10``/``CIFAR100`` list them); a file is read only when it matches.
    Tests with fake batches put their own sums in: ``dataclasses.replace(fmt, md5=...)``."""

    title: str
    folder: str
    train_files: tuple[str, ...]
    test_file: str
    meta_file: str
    label_key: str
    names_key: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    md5: dict[str, str]


_CIFAR = {
    "cifar10": _CifarFormat(
        title="CIFAR-10",
        folder="cifar-10-batches-py",
        train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test_file="test_batch",
        meta_file="batches.meta",
        label_key="labels",
        names_key="label_names",
        mean=CIFAR10_MEAN,
        std=CIFAR10_STD,
        md5={
            "data_batch_1": "c99cafc152244af753f735de768cd75f",
            "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
            "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
            "data_batch_4": "634d18415352ddfa80567beed471001a",
            "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
            "test_batch": "40351d587109b95175f43aff81a1287e",
            "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
        },
    ),
    "cifar100": _CifarFormat(
        title="CIFAR-100",
        folder="cifar-100-python",
        train_files=("train",),
        test_file="test",
        meta_file="meta",
        label_key="fine_labels",
        names_key="fine_label_names",
        mean=CIFAR100_MEAN,
        std=CIFAR100_STD,
        md5={
            "train": "16019d7e3df5f24257cddd939b257f8d",
            "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
            "meta": "7973b15100ade9c7d40fb424638fde48",
        },
    ),
}


def _verified_bytes(path: Path, fmt: _CifarFormat) -> bytes:
    """The content of ``path``, once its MD5 is the published one; a DataError otherwise.

    The file is read once, so the bytes checked are the bytes unpickled."""
    content = path.read_bytes()
    expected = fmt.md5.get(path.name)
    actual = hashlib.md5(content, usedforsecurity=False).hexdigest()
    if actual != expected:
        raise DataError(
            f"{path} is not the published {fmt.title} file (md5 {actual}, expected {expected}); "
            f"it was not read: remove {path.parent} and pass --download for a fresh copy"
        )
    return content


def _read_pickle(path: Path, fmt: _CifarFormat) -> dict[str, object]:
    """One CIFAR pickle, checked against its published MD5 first, with keys (and bytes values of
    name lists) as str."""
    entry = pickle.loads(_verified_bytes(path, fmt), encoding="latin1")
    if not isinstance(entry, dict):
        raise DataError(f"{path} is not a CIFAR batch (expected a pickled dict)")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in entry.items()}


def _read_cifar_batch(path: Path, fmt: _CifarFormat) -> ImageSet:
    import numpy as np

    entry = _read_pickle(path, fmt)
    if "data" not in entry or fmt.label_key not in entry:
        raise DataError(f"{path} is not a {fmt.title} batch (no 'data' or '{fmt.label_key}')")
    data = np.asarray(entry["data"], dtype=np.uint8)
    # Rows are channel-major: 1024 red, 1024 green, 1024 blue values.
    images = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
    labels = torch.as_tensor(np.asarray(entry[fmt.label_key]), dtype=torch.int64)
    return ImageSet(images, labels)


def _cifar_names(path: Path, fmt: _CifarFormat, num_classes: int) -> tuple[str, ...]:
    if path.is_file():
        names = _read_pickle(path, fmt).get(fmt.names_key)
        if names:
            return tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)
    if fmt.title == "CIFAR-10":
        return CIFAR10_CLASSES
    return tuple(str(i) for i in range(num_classes))


def _download_cifar(name: str, root: Path, fmt: _CifarFormat) -> None:
    import torchvision

    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    logger.info("downloading %s into %s", fmt.title, root)
    try:
        root.mkdir(parents=True, exist_ok=True)
        cls(root=str(root), train=True, download=True)
        cls(root=str(root), train=False, download=True)
    except Exception as exc:  # network, disk or checksum problems all end the same way
        reason = " ".join(str(exc).split())  # one line
        raise DataError(f"could not download {fmt.title} into {root}: {reason}") from exc


def load_cifar(
    name: str,
    root: Path,
    *,
    download: bool,
    val_fraction: float,
    limit_train: int | None,
    limit_test: int | None,
    seed: int,
) -> DataSplits:
    """CIFAR-10 or -100 from ``root``: the python-pickle batches under ``root/<release folder>``
    (downloaded there when missing and ``download``), else an ImageFolder layout at ``root``."""
    fmt = _CIFAR[name]
    folder = root / fmt.folder
    needed = [folder / f for f in (*fmt.train_files, fmt.test_file)]
    if not all(p.is_file() for p in needed):
        if is_image_folder(root):
            logger.info("%s: reading the ImageFolder layout under %s", fmt.title, root)
            splits = load_image_folder(
                root,
                val_fraction=val_fraction,
                limit_train=limit_train,
                limit_test=limit_test,
                seed=seed,
                stats=(fmt.mean, fmt.std),
            )
            return DataSplits(
                name=name,
                train=splits.train,
                val=splits.val,
                test=splits.test,
                classes=splits.classes,
                mean=fmt.mean,
                std=fmt.std,
                synthetic=False,
            )
        if not download:
            missing = next(p for p in needed if not p.is_file())
            where = f"expected {folder}" if not folder.is_dir() else f"missing {missing}"
            raise DataError(
                f"{fmt.title} not found under {root} ({where}); pass --download to fetch it, "
                "or --data-dir to point at a copy"
            )
        _download_cifar(name, root, fmt)
    parts = [_read_cifar_batch(folder / f, fmt) for f in fmt.train_files]
    train_all = ImageSet(
        torch.cat([p.images for p in parts]), torch.cat([p.labels for p in parts])
    )
    test_all = _read_cifar_batch(folder / fmt.test_file, fmt)
    num_classes = int(max(train_all.labels.max(), test_all.labels.max())) + 1
    classes = _cifar_names(folder / fmt.meta_file, fmt, num_classes)
    train_idx, val_idx = split_indices(
        train_all.labels, val_fraction=val_fraction, limit=limit_train, seed=seed
    )
    return DataSplits(
        name=name,
        train=train_all.subset(train_idx),
        val=train_all.subset(val_idx) if val_idx is not None else None,
        test=test_all.subset(subset_indices(test_all.labels, limit=limit_test, seed=seed)),
        classes=classes,
        mean=fmt.mean,
        std=fmt.std,
        synthetic=False,
    )


def load_real_cifar10(
    data_dir: str | os.PathLike | None,
    *,
    val_fraction: float,
    limit_train: int | None,
    limit_test: int | None,
    seed: int,
) -> DataSplits:
    """Real CIFAR-10 images for the benchmarks: ``data_dir`` (torchvision's layout or an
    ImageFolder root), or without it the shared JPEG archive (:func:`ensure_shared_cifar10`).

    Raises DataError with one line naming ``--data-dir`` (the benchmarks' flag) and the layouts
    when neither is there or the folder holds no CIFAR-10.
    """
    root = Path(data_dir).expanduser() if data_dir else ensure_shared_cifar10()
    if root is None:
        raise DataError(
            "no CIFAR-10 found: pass --data-dir with a copy in torchvision layout (e.g. "
            "~/.cache/wasearch/data after: python train.py --dataset cifar10 --download ...; "
            "README, Data) or ImageFolder layout (train/, test/)"
        )
    check_options(val_fraction, limit_train, limit_test)
    try:
        return load_cifar(
            "cifar10",
            root,
            download=False,
            val_fraction=float(val_fraction),
            limit_train=limit_train,
            limit_test=limit_test,
            seed=seed,
        )
    except DataError as err:  # its advice names train.py's --download, which benchmarks lack
        reason = str(err).split("; pass --download")[0]
        raise DataError(
            f"--data-dir {root}: {reason}; give a copy in ImageFolder (train/, test/) or "
            "torchvision layout"
        ) from None


# --------------------------------------------------------------------------------------------
# The shared CIFAR-10 JPEG archive


def _shared_archive() -> Path | None:
    """The shared CIFAR-10 JPEG archive in ``$WASEARCH_SHARED_DATA`` (the archive or its folder)
    when set, else in ``<repo>/../shared/data``; None when absent."""
    env = os.environ.get("WASEARCH_SHARED_DATA")
    if env:
        path = Path(env).expanduser()
        path = path if path.suffix == ".gz" else path / _SHARED_ARCHIVE
    else:
        path = Path(__file__).resolve().parents[3] / "shared" / "data" / _SHARED_ARCHIVE
    return path if path.is_file() else None


def ensure_shared_cifar10(cache_dir: str | os.PathLike | None = None) -> Path | None:
    """Unpack the shared CIFAR-10 JPEG archive once and return its ImageFolder root.

    The archive is found through ``$WASEARCH_SHARED_DATA`` or at ``../shared/data`` next to the
    repository. It is unpacked into ``<cache_dir>/cifar10-jpeg`` (``cache_dir`` defaults to
    :func:`cache_root`), never into the repository; a marker file records which archive was
    unpacked, so later calls return at once. Returns None when the archive is absent.
    """
    archive = _shared_archive()
    if archive is None:
        return None
    dest = (Path(cache_dir).expanduser() if cache_dir is not None else cache_root()) / (
        "cifar10-jpeg"
    )
    stat = archive.stat()
    stamp = f"{archive.resolve()} {stat.st_size} {stat.st_mtime_ns}\n"
    marker = dest / ".unpacked"

    def _done() -> bool:
        return marker.is_file() and marker.read_text() == stamp

    if _done():
        return dest
    logger.info("unpacking %s into %s (once)", archive, dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".cifar10-jpeg-", dir=dest.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the unpacked data is not
    try:
        with tarfile.open(archive, "r:*") as tar:
            tar.extractall(tmp, filter="data")
        if not (tmp / "train").is_dir():
            raise DataError(f"{archive} has no train/ folder at its top level")
        (tmp / ".unpacked").write_text(stamp)
        if _done():  # another process finished first
            shutil.rmtree(tmp)
            return dest
        if dest.exists():
            shutil.rmtree(dest)  # stale or partial
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest
