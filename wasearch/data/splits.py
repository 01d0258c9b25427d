"""What every dataset loader shares: the in-memory sets, the splits, the error, the cache folder.

An :class:`ImageSet` holds decoded images as uint8 tensors; :class:`DataSplits` is what
``load_dataset`` returns. Validation is held out of the training set class-balanced and
deterministically from the seed (:func:`split_indices`) before any limit applies, so limiting the
training images never changes which images are validation.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..cli import UserError

__all__ = [
    "DataError",
    "DataSplits",
    "ImageSet",
    "cache_root",
    "channel_stats",
    "check_options",
    "split_indices",
    "subset_indices",
]


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
    """What ``load_dataset`` returns: the splits and what a model needs to know about them."""

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


def cache_root() -> Path:
    """``$WASEARCH_CACHE`` when set, else ``~/.cache/wasearch``."""
    env = os.environ.get("WASEARCH_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "wasearch"


def check_options(val_fraction: float, limit_train: int | None, limit_test: int | None) -> None:
    """Raise ValueError for an out-of-range ``val_fraction`` or limit (the loaders' options)."""
    if not isinstance(val_fraction, (int, float)) or not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    for flag, limit in (("limit_train", limit_train), ("limit_test", limit_test)):
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)):
            raise ValueError(f"{flag} must be a positive int or None, got {limit!r}")
        if limit is not None and limit < 1:
            raise ValueError(f"{flag} must be a positive int or None, got {limit!r}")


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


def split_indices(
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


def subset_indices(labels: torch.Tensor, *, limit: int | None, seed: int) -> torch.Tensor:
    """All indices, or a deterministic class-balanced random subset of ``limit`` of them."""
    if limit is None or limit >= len(labels):
        return torch.arange(len(labels))
    order = _stratified_order(labels, torch.Generator().manual_seed(seed + 7919))
    return torch.sort(order[:limit]).values


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
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
