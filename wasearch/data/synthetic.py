"""A generated, offline, deterministic 10-class 32x32 RGB set, for tests, demos and smoke runs.

Its classes are textures and shapes (:data:`SYNTHETIC_CLASSES`) that survive crop-and-flip
augmentation; results on it say ``synthetic`` (``DataSplits.synthetic``), never CIFAR.
"""

from __future__ import annotations

import math

import torch

from .splits import DataSplits, ImageSet, channel_stats, split_indices, subset_indices

__all__ = ["SYNTHETIC_CLASSES", "load_synthetic", "make_synthetic"]

SYNTHETIC_CLASSES = (
    "stripes-h", "stripes-v", "stripes-d", "checker", "dots",
    "disc", "ring", "square", "cross", "triangle",
)  # fmt: skip


def make_synthetic(n: int, *, seed: int = 0, size: int = 32) -> ImageSet:
    """Generate ``n`` images of the synthetic 10-class set (:data:`SYNTHETIC_CLASSES`).

    Each image is a flat background with one light pattern on it, plus pixel noise:

    - five textures filling the image, with a random period (4-9 px) and phase:
      ``stripes-h``, ``stripes-v``, ``stripes-d`` (either diagonal), ``checker`` and ``dots``
      (a grid of dots);
    - five shapes at a random center (within 5 px of the middle) and random size (radius
      7-10.5 px, stroke 2-3.5 px): ``disc``, ``ring``, ``square``, ``cross`` and ``triangle``
      (apex up or down).

    Colors are random per image: a dark background (0-0.45 per channel) and a foreground
    0.3-0.55 lighter in every channel, so no class owns a color; Gaussian noise with a random
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
    center = size / 2 - 0.5
    cx = center + uniform(-5, 5, n)
    cy = center + uniform(-5, 5, n)
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


def load_synthetic(
    *, val_fraction: float, limit_train: int | None, limit_test: int | None, seed: int
) -> DataSplits:
    """The synthetic set split like the real ones: 5,000 training images (validation held out
    of them) and 1,000 test images, generated from ``seed``."""
    train_all = make_synthetic(5000, seed=seed)
    test_all = make_synthetic(1000, seed=seed + 1_000_003)
    train_idx, val_idx = split_indices(
        train_all.labels, val_fraction=val_fraction, limit=limit_train, seed=seed
    )
    test = test_all.subset(subset_indices(test_all.labels, limit=limit_test, seed=seed))
    train = train_all.subset(train_idx)
    mean, std = channel_stats(train.images)
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
