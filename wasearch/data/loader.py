"""Batches from an in-memory :class:`~wasearch.data.ImageSet`: augmentation and normalization.

Images stay uint8 in memory; a batch is gathered by indexing, augmented on the CPU (random crop
with zero padding and horizontal flip, vectorized over the batch), moved to the device as uint8
and normalized there, so an epoch costs no image decoding and little memory traffic.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

from .splits import ImageSet

__all__ = ["BatchLoader", "augment_batch", "normalize"]


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
