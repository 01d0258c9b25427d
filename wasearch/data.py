"""Datasets held in memory as uint8 tensors, with tensor-side augmentation and batching.

Every dataset is decoded once into ``(N, 3, H, W)`` uint8 tensors (an :class:`ImageSet`), so an
epoch costs only indexing, augmentation and the float conversion of each batch, never image
decoding. :func:`load_dataset` returns a :class:`DataSplits` (train, validation held out from
train, test, class names, normalization statistics); :class:`BatchLoader` iterates normalized
float batches on a device.

Supported datasets (:data:`DATASETS`):

``synthetic``
    A generated, offline, deterministic 10-class 32x32 RGB set (see :func:`make_synthetic`).
``cifar10`` / ``cifar100``
    The python-pickle release (Krizhevsky, 2009), downloaded by torchvision when asked. Each
    batch file's MD5 is checked against the published sum before it is unpickled (unpickling a
    substituted file could run code); a file that differs is refused, named. A folder with an
    ImageFolder layout (``train/`` and ``test/`` of class folders) is accepted as well.
``imagefolder``
    ``root/train/<class>/*.jpg|png|...`` and ``root/test/<class>/...`` (or ``root/val/``). Decoded
    tensors are cached in one ``.pt`` file under ``<cache root>/decoded/``.

Folders: the cache root is ``$WASEARCH_CACHE`` when set, else ``~/.cache/wasearch``. The default
``data_dir`` for CIFAR is ``<cache root>/data``.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import pickle
import shutil
import tarfile
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .cli import UserError
from .fileio import atomic_writer

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

logger = logging.getLogger(__name__)

DATASETS = ("synthetic", "cifar10", "cifar100", "imagefolder")

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip

SYNTHETIC_CLASSES = (
    "stripes-h", "stripes-v", "stripes-d", "checker", "dots",
    "disc", "ring", "square", "cross", "triangle",
)  # fmt: skip

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")

_CACHE_VERSION = 1
_SHARED_ARCHIVE = "cifar10-jpeg.tar.gz"


class DataError(UserError):
    """A user-caused data problem (missing folder, bad name); the message is one clear line."""


@dataclass(frozen=True)
class ImageSet:
    """Images and labels held in memory."""

    images: torch.Tensor  # (N, 3, H, W) uint8
    labels: torch.Tensor  # (N,) int64

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4 or self.images.shape[1] != 3:
            raise ValueError(
                f"images must be a (N, 3, H, W) uint8 tensor, got {tuple(self.images.shape)} "
                f"{self.images.dtype}"
            )
        if self.labels.dtype != torch.int64 or self.labels.dim() != 1:
            raise ValueError(
                f"labels must be a (N,) int64 tensor, got {tuple(self.labels.shape)} "
                f"{self.labels.dtype}"
            )
        if len(self.labels) != len(self.images):
            raise ValueError(
                f"{len(self.images)} images but {len(self.labels)} labels; they must match"
            )

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: torch.Tensor) -> ImageSet:
        """The images at ``indices``, in that order."""
        return ImageSet(self.images[indices], self.labels[indices])


@dataclass(frozen=True)
class DataSplits:
    """What :func:`load_dataset` returns: the splits and what a model needs to know about them."""

    name: str  # "cifar10", "cifar100", "imagefolder", "synthetic"
    train: ImageSet
    val: ImageSet | None  # held out from train; None when val_fraction == 0
    test: ImageSet
    classes: tuple[str, ...]
    mean: tuple[float, float, float]  # per channel, in [0, 1] units
    std: tuple[float, float, float]
    synthetic: bool  # True for the generated set, so results can say so

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_size(self) -> tuple[int, int]:
        height, width = self.train.images.shape[-2:]
        return int(height), int(width)


# --------------------------------------------------------------------------------------------
# Folders


def cache_root() -> Path:
    """``$WASEARCH_CACHE`` when set, else ``~/.cache/wasearch``."""
    env = os.environ.get("WASEARCH_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "wasearch"


def _shared_archive() -> Path | None:
    """The shared CIFAR-10 JPEG archive in ``$WASEARCH_SHARED_DATA`` (the archive or its folder)
    when set, else in ``<repo>/../shared/data``; None when absent."""
    env = os.environ.get("WASEARCH_SHARED_DATA")
    if env:
        path = Path(env).expanduser()
        path = path if path.suffix == ".gz" else path / _SHARED_ARCHIVE
    else:
        path = Path(__file__).resolve().parents[2] / "shared" / "data" / _SHARED_ARCHIVE
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


# --------------------------------------------------------------------------------------------
# Splits


def _stratified_order(labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random permutation of ``range(len(labels))`` whose every prefix is class-balanced:
    it visits the first sample of each class (in random class order), then the second, ..."""
    n = len(labels)
    perm = torch.randperm(n, generator=generator)
    permuted = labels[perm]
    order = torch.argsort(permuted, stable=True)
    counts = torch.bincount(permuted)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty(n, dtype=torch.long)
    rank[order] = torch.arange(n) - starts[permuted[order]]  # rank within its class
    return perm[torch.argsort(rank * n + torch.arange(n))]


def _split_indices(
    labels: torch.Tensor, *, val_fraction: float, limit: int | None, seed: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Deterministic (train, val) index sets: val is held out first, then train is capped."""
    n = len(labels)
    order = _stratified_order(labels, torch.Generator().manual_seed(seed))
    n_val = 0
    if val_fraction > 0:
        n_val = min(max(1, round(val_fraction * n)), n - 1)
    val = torch.sort(order[:n_val]).values if n_val else None
    rest = order[n_val:]
    if limit is not None:
        rest = rest[:limit]
    return torch.sort(rest).values, val


def _subset_indices(labels: torch.Tensor, *, limit: int | None, seed: int) -> torch.Tensor:
    """All indices, or a deterministic class-balanced random subset of ``limit`` of them."""
    if limit is None or limit >= len(labels):
        return torch.arange(len(labels))
    order = _stratified_order(labels, torch.Generator().manual_seed(seed + 7919))
    return torch.sort(order[:limit]).values


def _channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std in [0, 1] units, in chunks to keep memory flat."""
    # Exact integer sums of pixel values and their squares.
    total = torch.zeros(3, dtype=torch.int64)
    total_sq = torch.zeros(3, dtype=torch.int64)
    for chunk in images.split(4096):
        x = chunk.to(torch.int32)
        total += x.sum(dim=(0, 2, 3), dtype=torch.int64)
        total_sq += x.square_().sum(dim=(0, 2, 3), dtype=torch.int64)
    count = max(images.numel() // 3, 1)
    mean = total.double() / count
    std = (total_sq.double() / count - mean.square()).clamp_min(0.0).sqrt()
    mean, std = mean / 255.0, std / 255.0
    return tuple(round(v, 4) for v in mean.tolist()), tuple(round(v, 4) for v in std.tolist())


# --------------------------------------------------------------------------------------------
# Synthetic


def make_synthetic(n: int, *, seed: int = 0, size: int = 32) -> ImageSet:
    """Generate ``n`` images of the synthetic 10-class set (:data:`SYNTHETIC_CLASSES`).

    Each image is a flat background with one light pattern on it, plus pixel noise:

    - five textures filling the image, with a random period (4-9 px) and phase:
      ``stripes-h``, ``stripes-v``, ``stripes-d`` (either diagonal), ``checker`` and ``dots``
      (a grid of dots);
    - five shapes at a random centre (within 5 px of the middle) and random size (radius
      7-10.5 px, stroke 2-3.5 px): ``disc``, ``ring``, ``square``, ``cross`` and ``triangle``
      (apex up or down).

    Colours are random per image: a dark background (0-0.45 per channel) and a foreground
    0.3-0.55 lighter in every channel, so no class owns a colour; Gaussian noise with a random
    sigma of 0.02-0.1 is added. Every class is symmetric under a horizontal flip or holds both
    mirror images, and keeps its identity under a 4 px shift, so it survives crop-and-flip
    augmentation. Textures are learned within one short epoch; telling the shapes apart takes
    longer, so bigger models and longer training keep gaining.

    The classes are balanced (``n // 10`` or one more each) and shuffled. The same ``seed``
    gives the same bytes.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n!r}")
    g = torch.Generator().manual_seed(seed)
    num_classes = len(SYNTHETIC_CLASSES)
    labels = (torch.arange(n) % num_classes)[torch.randperm(n, generator=g)]

    def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
        return low + (high - low) * torch.rand(*shape, generator=g)

    # Draw every parameter for every image, so one image's bytes do not depend on the others'
    # classes.
    centre = size / 2 - 0.5
    cx = centre + uniform(-5, 5, n)
    cy = centre + uniform(-5, 5, n)
    radius = uniform(7, 10.5, n)
    width = uniform(2.0, 3.5, n)
    period = uniform(4, 9, n)
    phase = uniform(0, 2 * math.pi, n)
    phase2 = uniform(0, 2 * math.pi, n)
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    background = uniform(0.0, 0.45, n, 3)
    foreground = background + uniform(0.3, 0.55, n, 3)  # lighter in every channel
    sigma = uniform(0.02, 0.1, n)
    noise = torch.randn(n, 3, size, size, generator=g)

    coords = torch.arange(size, dtype=torch.float32)
    yy, xx = coords[None, :, None], coords[None, None, :]  # (1, size, 1), (1, 1, size)

    # Signed distance (in px, positive inside) of the pattern, per class; the mask is its
    # anti-aliased indicator.
    sdf = torch.empty(n, size, size)
    for label, name in enumerate(SYNTHETIC_CLASSES):
        sel = torch.nonzero(labels == label).flatten()
        if len(sel) == 0:
            continue
        dx = xx - cx[sel, None, None]
        dy = yy - cy[sel, None, None]
        r = radius[sel, None, None]
        w = width[sel, None, None]
        k = 2 * math.pi / period[sel, None, None]
        ph = phase[sel, None, None]
        s = sign[sel, None, None]
        if name == "stripes-h":
            d = torch.sin(k * yy + ph) / k
        elif name == "stripes-v":
            d = torch.sin(k * xx + ph) / k
        elif name == "stripes-d":
            d = torch.sin(k * (xx + s * yy) / math.sqrt(2) + ph) / k
        elif name == "checker":
            d = torch.sin(k * xx + ph) * torch.sin(k * yy + phase2[sel, None, None]) / k
        elif name == "dots":  # a grid of dots of radius 0.3 period
            gx = (xx + ph / k).remainder(period[sel, None, None]) - period[sel, None, None] / 2
            gy = (yy + phase2[sel, None, None] / k).remainder(period[sel, None, None])
            gy = gy - period[sel, None, None] / 2
            d = 0.3 * period[sel, None, None] - torch.sqrt(gx**2 + gy**2)
        elif name == "disc":
            d = r - torch.sqrt(dx**2 + dy**2)
        elif name == "ring":
            d = w / 2 - (torch.sqrt(dx**2 + dy**2) - r).abs()
        elif name == "square":
            d = 0.85 * r - torch.maximum(dx.abs(), dy.abs())
        elif name == "cross":
            arm_v = torch.minimum(w / 2 - dx.abs(), r - dy.abs())
            arm_h = torch.minimum(w / 2 - dy.abs(), r - dx.abs())
            d = torch.maximum(arm_v, arm_h)
        elif name == "triangle":  # apex up or down; symmetric under a horizontal flip
            half_width = (s * dy + r) / 2
            d = torch.minimum(r - dy.abs(), 0.9 * (half_width - dx.abs()))
        else:  # pragma: no cover - SYNTHETIC_CLASSES and this chain must agree
            raise AssertionError(name)
        sdf[sel] = d.expand(len(sel), size, size)

    mask = (sdf + 0.5).clamp_(0.0, 1.0)[:, None]  # (n, 1, size, size)
    bg = background[:, :, None, None]
    fg = foreground[:, :, None, None]
    image = noise.mul_(sigma[:, None, None, None]).add_(bg).addcmul_(mask, fg - bg)
    images = image.clamp_(0.0, 1.0).mul_(255.0).round_().to(torch.uint8)
    return ImageSet(images, labels)


def _load_synthetic(
    *, val_fraction: float, limit_train: int | None, limit_test: int | None, seed: int
) -> DataSplits:
    train_all = make_synthetic(5000, seed=seed)
    test_all = make_synthetic(1000, seed=seed + 1_000_003)
    train_idx, val_idx = _split_indices(
        train_all.labels, val_fraction=val_fraction, limit=limit_train, seed=seed
    )
    test = test_all.subset(_subset_indices(test_all.labels, limit=limit_test, seed=seed))
    train = train_all.subset(train_idx)
    mean, std = _channel_stats(train.images)
    return DataSplits(
        name="synthetic",
        train=train,
        val=train_all.subset(val_idx) if val_idx is not None else None,
        test=test,
        classes=SYNTHETIC_CLASSES,
        mean=mean,
        std=std,
        synthetic=True,
    )


# --------------------------------------------------------------------------------------------
# CIFAR (python pickle release)


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


def _load_cifar(
    name: str,
    root: Path,
    *,
    download: bool,
    val_fraction: float,
    limit_train: int | None,
    limit_test: int | None,
    seed: int,
) -> DataSplits:
    fmt = _CIFAR[name]
    folder = root / fmt.folder
    needed = [folder / f for f in (*fmt.train_files, fmt.test_file)]
    if not all(p.is_file() for p in needed):
        if _is_image_folder(root):
            logger.info("%s: reading the ImageFolder layout under %s", fmt.title, root)
            splits = _load_image_folder(
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
    train_idx, val_idx = _split_indices(
        train_all.labels, val_fraction=val_fraction, limit=limit_train, seed=seed
    )
    return DataSplits(
        name=name,
        train=train_all.subset(train_idx),
        val=train_all.subset(val_idx) if val_idx is not None else None,
        test=test_all.subset(_subset_indices(test_all.labels, limit=limit_test, seed=seed)),
        classes=classes,
        mean=fmt.mean,
        std=fmt.std,
        synthetic=False,
    )


# --------------------------------------------------------------------------------------------
# ImageFolder


def _is_image_folder(root: Path) -> bool:
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


def _decode_files(files: Sequence[str]) -> torch.Tensor:
    """Decode ``files`` into one (N, 3, H, W) uint8 tensor; all must have the same size.

    JPEG and PNG go through torchvision's libjpeg/libpng decoders (about twice as fast as PIL
    on small images), everything else, and anything they reject, through PIL.
    """
    try:
        from torchvision.io import ImageReadMode, decode_image, read_file
    except ImportError:  # a torchvision without image decoders
        decode_image = None

    def decode(path: str) -> torch.Tensor:
        if decode_image is not None and path.lower().endswith((".jpg", ".jpeg", ".png")):
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
        out = torch.empty(len(files), *first.shape, dtype=torch.uint8)
        out[0] = first
        for i in range(1, len(files)):
            image = decode(files[i])
            if image.shape != first.shape:
                raise DataError(
                    f"image {files[i]} is {image.shape[2]}x{image.shape[1]} but {files[0]} is "
                    f"{first.shape[2]}x{first.shape[1]}; all images must have the same size"
                )
            out[i] = image
    return out


def _cache_key(root: Path, classes: Sequence[str], selections: Sequence[Sequence[str]]) -> str:
    digest = hashlib.sha256(f"v{_CACHE_VERSION}\n{root}\n".encode())
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


def _load_image_folder(
    root: Path,
    *,
    val_fraction: float,
    limit_train: int | None,
    limit_test: int | None,
    seed: int,
    stats: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
) -> DataSplits:
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
    train_idx, val_idx = _split_indices(
        torch.tensor(train_labels, dtype=torch.int64),
        val_fraction=val_fraction,
        limit=limit_train,
        seed=seed,
    )
    test_idx = _subset_indices(
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

    key = _cache_key(root.resolve(), classes, list(selections.values()))
    cache_file = cache_root() / "decoded" / f"{key}.pt"
    content = _read_cache(cache_file)
    if content is not None:
        logger.info("decoded images from cache %s", cache_file)
    else:
        total = sum(len(v) for v in selections.values())
        logger.info("decoding %d images under %s", total, root)
        content = {"version": _CACHE_VERSION}
        for split, files in selections.items():
            content[f"{split}_images"] = _decode_files(files)
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
    mean, std = stats if stats is not None else _channel_stats(train.images)
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


# --------------------------------------------------------------------------------------------
# Entry point


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
    if not isinstance(val_fraction, (int, float)) or not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    for flag, limit in (("limit_train", limit_train), ("limit_test", limit_test)):
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)):
            raise ValueError(f"{flag} must be a positive int or None, got {limit!r}")
        if limit is not None and limit < 1:
            raise ValueError(f"{flag} must be a positive int or None, got {limit!r}")
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
        return _load_synthetic(**options)
    if key == "imagefolder":
        if data_dir is None:
            raise DataError(
                "the imagefolder dataset needs --data-dir: a folder with train/ and test/ "
                "subfolders of class folders"
            )
        return _load_image_folder(Path(data_dir).expanduser(), **options)
    root = Path(data_dir).expanduser() if data_dir is not None else cache_root() / "data"
    return _load_cifar(key, root, download=download, **options)


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
    try:
        return load_dataset(
            "cifar10",
            data_dir=root,
            val_fraction=val_fraction,
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
# Augmentation and batching


def _crop_flip(
    x: torch.Tensor, top: torch.Tensor, left: torch.Tensor, flip: torch.Tensor, padding: int
) -> torch.Tensor:
    """Crop each image of ``x`` (B, C, H, W), zero-padded by ``padding``, at (``top``, ``left``)
    in padded coordinates (``padding`` means no shift), then mirror it where ``flip``."""
    b, c, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))  # (B, C, H + 2p, W + 2p)
    rows = top[:, None] + torch.arange(h, device=x.device)  # (B, H)
    cols = left[:, None] + torch.arange(w, device=x.device)  # (B, W)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    batch = torch.arange(b, device=x.device)[:, None, None, None]
    channel = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]


def augment_batch(
    x_uint8: torch.Tensor, generator: torch.Generator, *, padding: int = 4
) -> torch.Tensor:
    """Random crop (same size, ``padding`` px of zero padding) and random horizontal flip,
    drawn independently per image from ``generator``; vectorized over the batch.

    ``x_uint8`` is (B, C, H, W) on the generator's device (the CPU for a CPU generator); the
    result has the same shape and dtype.
    """
    if x_uint8.dim() != 4:
        raise ValueError(f"expected a (B, C, H, W) batch, got shape {tuple(x_uint8.shape)}")
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding!r}")
    b = x_uint8.shape[0]
    dev = generator.device
    top = torch.randint(0, 2 * padding + 1, (b,), generator=generator, device=dev)
    left = torch.randint(0, 2 * padding + 1, (b,), generator=generator, device=dev)
    flip = torch.rand(b, generator=generator, device=dev) < 0.5
    return _crop_flip(
        x_uint8, top.to(x_uint8.device), left.to(x_uint8.device), flip.to(x_uint8.device), padding
    )


def _stat_tensor(values: Sequence[float] | torch.Tensor, device: torch.device) -> torch.Tensor:
    t = torch.as_tensor(values, dtype=torch.float32, device=device).flatten()
    if t.numel() != 3:
        raise ValueError(f"expected 3 per-channel values, got {values!r}")
    return t.view(1, 3, 1, 1)


def normalize(
    x_uint8: torch.Tensor,
    mean: Sequence[float] | torch.Tensor,
    std: Sequence[float] | torch.Tensor,
) -> torch.Tensor:
    """``(x / 255 - mean) / std`` per channel, as float32; ``x_uint8`` is (B, 3, H, W)."""
    m = _stat_tensor(mean, x_uint8.device)
    s = _stat_tensor(std, x_uint8.device)
    return x_uint8.to(torch.float32).div_(255.0).sub_(m).div_(s)


class BatchLoader:
    """Iterates ``(x, y)`` batches from an :class:`ImageSet`: ``x`` float32 normalized
    (B, 3, H, W) and ``y`` int64 (B,), both on ``device``.

    Images stay uint8 in memory; each batch is gathered, augmented (when ``augment``) on the
    CPU, moved to ``device`` as uint8 and normalized there. With ``shuffle``, each epoch (each
    call to ``iter``) draws a new order from a generator seeded with ``seed`` and the epoch
    number, so runs are reproducible; :meth:`set_epoch` positions a resumed run.
    """

    def __init__(
        self,
        data: ImageSet,
        *,
        batch_size: int,
        mean: Sequence[float] | torch.Tensor,
        std: Sequence[float] | torch.Tensor,
        shuffle: bool = False,
        augment: bool = False,
        drop_last: bool = False,
        device: str | torch.device = "cpu",
        seed: int = 0,
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.data = data
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augment = augment
        self.drop_last = drop_last
        self.device = torch.device(device)
        self.seed = seed
        self.epoch = 0
        self._mean = _stat_tensor(mean, self.device)
        self._std = _stat_tensor(std, self.device)

    def __len__(self) -> int:
        n = len(self.data)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration use the order and augmentation of ``epoch``."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # A seed mixed from (seed, epoch), so seed s + 1 does not replay epoch 1 of seed s.
        mixed = (self.seed * 1_000_003 + self.epoch) % (2**63)
        self.epoch += 1
        generator = torch.Generator().manual_seed(mixed)
        n = len(self.data)
        order = torch.randperm(n, generator=generator) if self.shuffle else torch.arange(n)
        non_blocking = self.device.type == "cuda"
        for i in range(len(self)):
            idx = order[i * self.batch_size : (i + 1) * self.batch_size]
            x = self.data.images[idx]
            if self.augment:
                x = augment_batch(x, generator)
            if non_blocking:
                x = x.pin_memory()
            x = x.to(self.device, non_blocking=non_blocking)
            y = self.data.labels[idx].to(self.device, non_blocking=non_blocking)
            x = x.to(torch.float32).div_(255.0).sub_(self._mean).div_(self._std)
            yield x, y
