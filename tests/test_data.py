"""Tests for wasearch.data: datasets, splits, caching, augmentation and batching."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from wasearch import data
from wasearch.data import (
    CIFAR10_MEAN,
    SYNTHETIC_CLASSES,
    BatchLoader,
    DataError,
    ImageSet,
    augment_batch,
    ensure_shared_cifar10,
    imagefolder,
    load_dataset,
    loader,
    make_synthetic,
    normalize,
)

CIFAR10_NAMES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip


_USER_CACHE = data.cache_root()  # read before the fixture below redirects it


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Keep decoded-image caches of these tests out of the user's cache."""
    monkeypatch.setenv("WASEARCH_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def synthetic_splits():
    return load_dataset("synthetic", seed=3)


# --------------------------------------------------------------------------------------------
# Synthetic


def test_synthetic_is_deterministic():
    a = make_synthetic(200, seed=5)
    b = make_synthetic(200, seed=5)
    c = make_synthetic(200, seed=6)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, c.images)


def test_synthetic_splits(synthetic_splits):
    s = synthetic_splits
    assert s.name == "synthetic" and s.synthetic
    assert s.classes == SYNTHETIC_CLASSES and s.num_classes == 10
    assert s.image_size == (32, 32)
    assert len(s.train) == 4500 and len(s.val) == 500 and len(s.test) == 1000
    for part in (s.train, s.val, s.test):
        assert part.images.dtype == torch.uint8 and part.images.shape[1:] == (3, 32, 32)
        assert part.labels.dtype == torch.int64
    # Balanced: the validation split and the test set are stratified.
    assert torch.bincount(s.val.labels, minlength=10).tolist() == [50] * 10
    assert torch.bincount(s.test.labels, minlength=10).tolist() == [100] * 10
    assert all(0.2 < m < 0.6 for m in s.mean) and all(0.1 < v < 0.4 for v in s.std)


def test_synthetic_limits_and_no_val():
    s = load_dataset("synthetic", val_fraction=0.0, limit_train=300, limit_test=50, seed=1)
    assert s.val is None
    assert len(s.train) == 300 and len(s.test) == 50
    assert torch.bincount(s.train.labels, minlength=10).tolist() == [30] * 10
    assert torch.bincount(s.test.labels, minlength=10).tolist() == [5] * 10


def test_synthetic_is_learnable():
    """A tiny CNN gets well above chance (10%) after one epoch on 2,000 images."""
    torch.manual_seed(0)
    s = load_dataset("synthetic", limit_train=2000, seed=0)
    width = 16
    model = nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1, bias=False),
        nn.BatchNorm2d(2 * width),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(2 * width, 2 * width, 3, padding=1, bias=False),
        nn.BatchNorm2d(2 * width),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * width, 10),
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    train = BatchLoader(s.train, batch_size=64, mean=s.mean, std=s.std, shuffle=True, augment=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small convolutions on shared cores: more threads only wait
    try:
        for x, y in train:
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        correct = 0
        with torch.no_grad():
            for x, y in BatchLoader(s.test, batch_size=500, mean=s.mean, std=s.std):
                correct += (model(x).argmax(1) == y).sum().item()
    finally:
        torch.set_num_threads(threads)
    accuracy = correct / len(s.test)
    print(f"synthetic one-epoch test accuracy: {accuracy:.3f}")
    assert accuracy > 0.4


# --------------------------------------------------------------------------------------------
# Arguments


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5])
def test_bad_val_fraction(fraction):
    with pytest.raises(ValueError, match=repr(fraction)):
        load_dataset("synthetic", val_fraction=fraction)


@pytest.mark.parametrize("limit", [0, -3, 2.5])
def test_bad_limit(limit):
    with pytest.raises(ValueError, match="limit_train"):
        load_dataset("synthetic", limit_train=limit)


def test_unknown_name():
    with pytest.raises(DataError, match="'mnist'.*synthetic, cifar10, cifar100, imagefolder"):
        load_dataset("mnist")


# --------------------------------------------------------------------------------------------
# CIFAR pickles


def _write_pickle(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def _trust_fake_cifar(monkeypatch, name: str, folder: Path) -> None:
    """Fake batches are not the published files: make the reader expect their MD5 sums."""
    sums = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in folder.iterdir()}
    table = data.cifar._CIFAR
    monkeypatch.setitem(table, name, dataclasses.replace(table[name], md5=sums))


def _fake_cifar10(root: Path, per_batch: int = 20, n_test: int = 30) -> dict[str, np.ndarray]:
    """A CIFAR-10-format folder with small random batches; returns what it wrote."""
    rng = np.random.default_rng(0)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    written = {}
    for name, n in [
        *((f"data_batch_{i}", per_batch) for i in range(1, 6)),
        ("test_batch", n_test),
    ]:
        pixels = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = np.arange(n) % 10
        _write_pickle(folder / name, {b"data": pixels, b"labels": labels.tolist()})
        written[name] = pixels
        written[name + "_labels"] = labels
    _write_pickle(folder / "batches.meta", {b"label_names": [n.encode() for n in CIFAR10_NAMES]})
    return written


def test_cifar10_from_pickles(tmp_path, monkeypatch):
    written = _fake_cifar10(tmp_path)
    _trust_fake_cifar(monkeypatch, "cifar10", tmp_path / "cifar-10-batches-py")
    s = load_dataset("cifar10", data_dir=tmp_path, val_fraction=0.1)
    assert s.name == "cifar10" and not s.synthetic
    assert s.classes == CIFAR10_NAMES
    assert s.mean == CIFAR10_MEAN
    assert len(s.train) == 90 and len(s.val) == 10 and len(s.test) == 30
    assert s.test.images.shape == (30, 3, 32, 32) and s.test.images.dtype == torch.uint8
    # Rows are channel-major (R plane, G plane, B plane); the test set keeps its file order.
    expected = torch.from_numpy(written["test_batch"][7].reshape(3, 32, 32))
    assert torch.equal(s.test.images[7], expected)
    assert s.test.labels.tolist() == written["test_batch_labels"].tolist()
    # Train and validation together are exactly the five batches.
    all_rows = np.concatenate([written[f"data_batch_{i}"] for i in range(1, 6)])
    loaded = torch.cat([s.train.images, s.val.images]).reshape(100, 3072).numpy()
    assert sorted(map(bytes, loaded)) == sorted(map(bytes, all_rows))


def test_cifar100_from_pickles(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for name, n in (("train", 40), ("test", 20)):
        pixels = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        _write_pickle(folder / name, {b"data": pixels, b"fine_labels": [i % 4 for i in range(n)]})
    _write_pickle(folder / "meta", {b"fine_label_names": [b"apple", b"bear", b"cup", b"dog"]})
    _trust_fake_cifar(monkeypatch, "cifar100", folder)
    s = load_dataset("cifar100", data_dir=tmp_path, val_fraction=0.0, limit_test=8)
    assert s.classes == ("apple", "bear", "cup", "dog")
    assert len(s.train) == 40 and s.val is None and len(s.test) == 8
    assert torch.bincount(s.test.labels).tolist() == [2, 2, 2, 2]


def test_missing_cifar_names_folder_and_flag(tmp_path):
    with pytest.raises(DataError) as info:
        load_dataset("cifar10", data_dir=tmp_path / "nowhere")
    message = str(info.value)
    assert "\n" not in message
    assert str(tmp_path / "nowhere" / "cifar-10-batches-py") in message
    assert "--download" in message


def test_failed_download_is_a_data_error(tmp_path, monkeypatch):
    import torchvision

    def offline(**kwargs):
        raise RuntimeError("Error downloading cifar-10-python.tar.gz:\nno network")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(DataError, match="could not download CIFAR-10") as info:
        load_dataset("cifar10", data_dir=tmp_path, download=True)
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------------------------
# ImageFolder


def _image(seed: int, size: int = 16) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(size, size, 3), dtype=np.uint8)


def _image_folder(root: Path, classes=("cat", "dog", "frog"), n_train=10, n_test=4) -> Path:
    """root/train/<class>/NN.png and root/test/<class>/NN.png, plus two JPEGs in test."""
    for split, n in (("train", n_train), ("test", n_test)):
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(_image(1000 * c + i + (0 if split == "train" else 500))).save(
                    folder / f"{i:02d}.png"
                )
    smooth = np.zeros((16, 16, 3), dtype=np.uint8)
    smooth[:, :, 0] = np.arange(16, dtype=np.uint8)[None, :] * 16
    smooth[:, :, 1] = 128
    for name in classes[:2]:
        Image.fromarray(smooth).save(root / "test" / name / "zz.jpg", quality=95)
    return root


def test_image_folder_loads(tmp_path):
    root = _image_folder(tmp_path / "imgs")
    s = load_dataset("imagefolder", data_dir=root, val_fraction=0.0)
    assert s.name == "imagefolder" and s.classes == ("cat", "dog", "frog")
    assert len(s.train) == 30 and s.val is None and len(s.test) == 14
    assert s.image_size == (16, 16)
    # Without a split or limits, files keep their sorted order: dog/03.png is train[13].
    assert torch.equal(s.train.images[13], torch.from_numpy(_image(1003)).permute(2, 0, 1))
    assert s.train.labels.tolist() == [0] * 10 + [1] * 10 + [2] * 10
    # The JPEG (cat/zz.jpg follows cat/00..03.png) decodes close to what was written.
    jpeg = s.test.images[4].permute(1, 2, 0).int()
    assert s.test.labels[4] == 0
    assert (jpeg[:, :, 1] - 128).abs().max() <= 4
    assert (jpeg[:, :, 0] - torch.arange(16)[None, :] * 16).abs().max() <= 12
    expected_mean = torch.cat([s.train.images]).double().mean(dim=(0, 2, 3)) / 255
    assert s.mean == pytest.approx(expected_mean.tolist(), abs=1e-4)


def test_image_folder_split_and_limits_decode_only_the_selection(tmp_path, monkeypatch):
    root = _image_folder(tmp_path / "imgs")
    decoded = []
    real_decode = imagefolder._decode_files

    def counting(files, image_size=None):
        decoded.extend(files)
        return real_decode(files, image_size)

    monkeypatch.setattr(imagefolder, "_decode_files", counting)
    s = load_dataset("imagefolder", data_dir=root, val_fraction=0.2, limit_train=9, limit_test=6)
    assert len(s.val) == 6 and len(s.train) == 9 and len(s.test) == 6
    assert len(decoded) == 21
    assert torch.bincount(s.val.labels).tolist() == [2, 2, 2]
    assert torch.bincount(s.train.labels).tolist() == [3, 3, 3]
    assert torch.bincount(s.test.labels).tolist() == [2, 2, 2]
    # The validation split does not depend on the limit.
    again = load_dataset("imagefolder", data_dir=root, val_fraction=0.2)
    assert torch.equal(again.val.images, s.val.images)
    assert len(again.train) == 24


def test_image_folder_cache(tmp_path, monkeypatch):
    root = _image_folder(tmp_path / "imgs")
    first = load_dataset("imagefolder", data_dir=root)
    cached = list((tmp_path / "cache" / "decoded").glob("*.pt"))
    assert len(cached) == 1

    def no_decoding(files, image_size=None):
        raise AssertionError("decoded although the cache is valid")

    monkeypatch.setattr(imagefolder, "_decode_files", no_decoding)
    second = load_dataset("imagefolder", data_dir=root)
    assert torch.equal(first.train.images, second.train.images)
    assert torch.equal(first.test.labels, second.test.labels)
    # A changed file invalidates the cache.
    touched = root / "train" / "cat" / "00.png"
    stat = touched.stat()
    os.utime(touched, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    with pytest.raises(AssertionError, match="decoded although"):
        load_dataset("imagefolder", data_dir=root)


def test_cifar10_accepts_an_image_folder(tmp_path):
    root = _image_folder(tmp_path / "imgs")
    s = load_dataset("cifar10", data_dir=root, val_fraction=0.0)
    assert s.name == "cifar10" and s.mean == CIFAR10_MEAN and s.classes == ("cat", "dog", "frog")


def test_image_folder_errors(tmp_path):
    with pytest.raises(DataError, match="--data-dir"):
        load_dataset("imagefolder")
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("imagefolder", data_dir=tmp_path / "absent")

    no_test = tmp_path / "no_test"
    (no_test / "train" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match=str(no_test / "test")):
        load_dataset("imagefolder", data_dir=no_test)

    empty = _image_folder(tmp_path / "empty", n_train=2, n_test=1)
    (empty / "train" / "zebra").mkdir()
    with pytest.raises(DataError, match=str(empty / "train" / "zebra")):
        load_dataset("imagefolder", data_dir=empty)

    mismatch = _image_folder(tmp_path / "mismatch", n_train=2, n_test=1)
    (mismatch / "test" / "frog").rename(mismatch / "test" / "toad")
    with pytest.raises(DataError, match="only in train \\['frog'\\]"):
        load_dataset("imagefolder", data_dir=mismatch)

    sizes = _image_folder(tmp_path / "sizes", n_train=2, n_test=1)
    odd = sizes / "train" / "dog" / "01.png"
    Image.fromarray(_image(0, size=8)).save(odd)
    with pytest.raises(DataError, match=str(odd)):
        load_dataset("imagefolder", data_dir=sizes, val_fraction=0.0)


def test_images_of_other_sizes_are_fitted_to_the_input_size(tmp_path, caplog):
    # Mixed sizes (16x16 and an 8x8 file) load once an input size is given: each image is
    # resized by its shorter side and centre-cropped to 12x12, in the decode cache too.
    sizes = _image_folder(tmp_path / "sizes", n_train=2, n_test=1)
    Image.fromarray(_image(0, size=8)).save(sizes / "train" / "dog" / "01.png")
    wide = np.zeros((16, 24, 3), dtype=np.uint8)
    wide[:, 4:20] = 200  # the centre 16 columns bright, the margins dark
    Image.fromarray(wide).save(sizes / "train" / "cat" / "00.png")
    s = load_dataset("imagefolder", data_dir=sizes, val_fraction=0.0, image_size=12)
    assert s.image_size == (12, 12) and len(s.train) == 6
    assert int(s.train.images[0].min()) >= 150  # the crop kept the centre, not the dark margins
    again = load_dataset("imagefolder", data_dir=sizes, val_fraction=0.0, image_size=12)
    assert torch.equal(again.train.images, s.train.images)
    # Any dataset: the synthetic 32x32 set fitted to 28x28, said once in the log.
    with caplog.at_level("INFO", logger="wasearch.data"):
        small = load_dataset("synthetic", limit_train=20, limit_test=10, image_size=28)
    assert small.image_size == (28, 28) and small.test.images.shape[-2:] == (28, 28)
    assert sum("resized to 28x28" in r.message for r in caplog.records) == 1
    assert load_dataset("synthetic", limit_train=20, limit_test=10, image_size=32).image_size == (
        32,
        32,
    )


# --------------------------------------------------------------------------------------------
# Augmentation and normalization


def test_crop_flip_exact():
    x = torch.arange(2 * 3 * 6 * 5, dtype=torch.int64).reshape(2, 3, 6, 5).to(torch.uint8)
    p = 4
    centred = torch.full((2,), p)
    mirrored = loader._crop_flip(x, centred, centred, torch.tensor([True, False]), p)
    assert torch.equal(mirrored[0], x[0].flip(-1))
    assert torch.equal(mirrored[1], x[1])
    # top = p + 2, left = p - 3: out[i, j] = x[i + 2, j - 3], zero outside the image.
    shifted = loader._crop_flip(x, centred + 2, centred - 3, torch.tensor([False, False]), p)
    expected = torch.zeros_like(x)
    expected[:, :, :4, 3:] = x[:, :, 2:, :2]
    assert torch.equal(shifted, expected)


def test_augment_batch():
    x = make_synthetic(64, seed=0).images
    out = augment_batch(x, torch.Generator().manual_seed(1))
    again = augment_batch(x, torch.Generator().manual_seed(1))
    assert out.shape == x.shape and out.dtype == torch.uint8
    assert torch.equal(out, again)
    assert not torch.equal(out, augment_batch(x, torch.Generator().manual_seed(2)))
    # Every output is one of the 9 x 9 x 2 crops and flips of its input, and both flips occur.
    top, left, flip = torch.meshgrid(
        torch.arange(9), torch.arange(9), torch.arange(2), indexing="ij"
    )
    top, left, flip = top.flatten(), left.flatten(), flip.flatten().bool()
    flips = set()
    for i in range(8):
        candidates = loader._crop_flip(x[i].expand(len(top), -1, -1, -1), top, left, flip, 4)
        matches = (candidates == out[i]).flatten(1).all(dim=1)
        assert matches.any(), f"image {i} is no crop/flip of its input"
        flips.update(flip[matches].tolist())
    assert flips == {False, True}


def test_normalize():
    x = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 3, 1, 1)
    out = normalize(x, (0.0, 0.2, 0.5), (1.0, 0.5, 0.25))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.flatten(), torch.tensor([0.0, 0.0, 2.0]))


# --------------------------------------------------------------------------------------------
# BatchLoader


def _id_set(n: int = 10) -> ImageSet:
    """Images whose first pixel is their index, labels equal to their index."""
    images = torch.zeros(n, 3, 4, 4, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.arange(n, dtype=torch.uint8)
    return ImageSet(images, torch.arange(n))


def test_batch_loader_lengths():
    s = _id_set(10)
    assert len(BatchLoader(s, batch_size=4, mean=(0, 0, 0), std=(1, 1, 1))) == 3
    dropping = BatchLoader(s, batch_size=4, mean=(0, 0, 0), std=(1, 1, 1), drop_last=True)
    assert len(dropping) == 2
    assert [len(y) for _, y in dropping] == [4, 4]
    with pytest.raises(ValueError, match="0"):
        BatchLoader(s, batch_size=0, mean=(0, 0, 0), std=(1, 1, 1))


def test_batch_loader_epochs():
    s = _id_set(10)
    loader = BatchLoader(s, batch_size=4, mean=(0, 0, 0), std=(1, 1, 1), shuffle=True, seed=3)
    epochs = []
    for _ in range(3):
        batches = list(loader)
        assert [len(y) for _, y in batches] == [4, 4, 2]
        x, y = batches[0]
        assert x.dtype == torch.float32 and x.shape == (4, 3, 4, 4) and y.dtype == torch.int64
        # The batch pairs each image with its own label.
        assert torch.equal((x[:, 0, 0, 0] * 255).round().long(), y)
        order = torch.cat([y for _, y in batches])
        assert sorted(order.tolist()) == list(range(10))
        epochs.append(order.tolist())
    assert epochs[0] != epochs[1] != epochs[2]
    # A fresh loader with the same seed replays the epochs; set_epoch jumps to one.
    replay = BatchLoader(s, batch_size=4, mean=(0, 0, 0), std=(1, 1, 1), shuffle=True, seed=3)
    assert torch.cat([y for _, y in replay]).tolist() == epochs[0]
    replay.set_epoch(2)
    assert torch.cat([y for _, y in replay]).tolist() == epochs[2]
    ordered = BatchLoader(s, batch_size=4, mean=(0, 0, 0), std=(1, 1, 1))
    assert torch.cat([y for _, y in ordered]).tolist() == list(range(10))


def test_batch_loader_normalizes_after_augmenting():
    s = make_synthetic(64, seed=0)
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    loader = BatchLoader(s, batch_size=64, mean=mean, std=std, augment=True, seed=0)
    ((x, _),) = list(loader)
    generator = torch.Generator().manual_seed(0)  # seed 0, epoch 0, no shuffle draws
    expected = normalize(augment_batch(s.images, generator), mean, std)
    torch.testing.assert_close(x, expected)


# --------------------------------------------------------------------------------------------
# Shared archive and the real CIFAR-10


def test_ensure_shared_cifar10_unpacks_once(tmp_path, monkeypatch):
    source = _image_folder(tmp_path / "src", n_train=1, n_test=1)
    archive = tmp_path / "shared" / "cifar10-jpeg.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        for split in ("train", "test"):
            tar.add(source / split, arcname=split)
    monkeypatch.setenv("WASEARCH_SHARED_DATA", str(archive.parent))
    root = ensure_shared_cifar10(tmp_path / "c")
    assert root == tmp_path / "c" / "cifar10-jpeg"
    assert (root / "train" / "cat" / "00.png").is_file()

    def no_unpacking(*args, **kwargs):
        raise AssertionError("unpacked twice")

    monkeypatch.setattr(tarfile, "open", no_unpacking)
    assert ensure_shared_cifar10(tmp_path / "c") == root
    monkeypatch.setenv("WASEARCH_SHARED_DATA", str(tmp_path / "nothing-here"))
    assert ensure_shared_cifar10(tmp_path / "c") is None


def test_real_cifar10_subset():
    # Unpacked into the user's cache (once, about 20 s); decoded tensors go to the test's cache.
    root = ensure_shared_cifar10(_USER_CACHE)
    if root is None:
        pytest.skip("shared CIFAR-10 archive absent (../shared/data or $WASEARCH_SHARED_DATA)")
    s = load_dataset(
        "imagefolder", data_dir=root, val_fraction=0.01, limit_train=300, limit_test=200
    )
    assert s.classes == CIFAR10_NAMES
    assert s.image_size == (32, 32)
    assert len(s.train) == 300 and len(s.val) == 500 and len(s.test) == 200
    assert torch.bincount(s.train.labels).tolist() == [30] * 10
    assert torch.bincount(s.test.labels).tolist() == [20] * 10
    assert 0.1 < float(s.train.images.float().mean()) / 255 < 0.9
