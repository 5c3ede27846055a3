"""Tests for alwayssparse.data.images: file formats, splits, batching and augmentation.

Every data file is written here in its real on-disk format (IDX with ``struct``, CIFAR
batches with ``pickle``, images with Pillow), including deliberately broken ones.
"""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from alwayssparse.data.images import (
    CIFAR10_TEST_BATCH,
    CIFAR10_TRAIN_BATCHES,
    ImageBatches,
    ImageSet,
    ImageSplits,
    UnsafePickleError,
    channel_stats,
    evaluate_accuracy,
    holdout_split,
    load_cifar10,
    load_image_folder,
    load_mnist_like,
    normalize,
    random_crop_flip,
    read_idx,
)

# ---------------------------------------------------------------------------- IDX


def _idx_bytes(array: np.ndarray) -> bytes:
    """Serialises ``array`` as IDX: 0x0000, type byte, ndim, big-endian dims, big-endian data."""
    type_byte = {np.uint8: 0x08, np.int8: 0x09, np.int16: 0x0B, np.int32: 0x0C,
                 np.float32: 0x0D, np.float64: 0x0E}[array.dtype.type]  # fmt: skip
    header = struct.pack(">BBBB", 0, 0, type_byte, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def _write_idx(path: Path, array: np.ndarray, compress: bool) -> None:
    data = _idx_bytes(array)
    path.write_bytes(gzip.compress(data) if compress else data)


def _write_mnist_dir(directory: Path, n_train: int, n_test: int, compress: bool) -> dict:
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    directory.mkdir(exist_ok=True)
    for name, array in arrays.items():
        _write_idx(directory / (name + (".gz" if compress else "")), array, compress)
    return arrays


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize(
    "array",
    [
        np.arange(24, dtype=np.uint8).reshape(2, 3, 4),
        np.array([-5, 0, 300_000], dtype=np.int32),
        np.linspace(-1, 1, 6, dtype=np.float32).reshape(3, 2),
        np.array([1, -2], dtype=np.int16),
    ],
)
def test_read_idx_round_trip(tmp_path: Path, array: np.ndarray, compress: bool) -> None:
    path = tmp_path / "a.idx"
    _write_idx(path, array, compress)
    out = read_idx(path)
    assert tuple(out.shape) == array.shape
    np.testing.assert_array_equal(out.numpy(), array)


@pytest.mark.parametrize("compress", [False, True])
def test_load_mnist_like(tmp_path: Path, compress: bool) -> None:
    arrays = _write_mnist_dir(tmp_path, 12, 5, compress)
    splits = load_mnist_like(tmp_path)
    assert splits.train_x.shape == (12, 1, 28, 28) and splits.train_x.dtype == torch.uint8
    assert splits.test_x.shape == (5, 1, 28, 28)
    assert splits.train_y.dtype == torch.int64
    np.testing.assert_array_equal(splits.train_x[:, 0].numpy(), arrays["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(splits.test_y.numpy(), arrays["t10k-labels-idx1-ubyte"])


def test_idx_errors(tmp_path: Path) -> None:
    good = _idx_bytes(np.zeros((4, 28, 28), dtype=np.uint8))
    bad_magic = tmp_path / "bad_magic"
    bad_magic.write_bytes(b"\x08\x03\x00\x00" + good[4:])
    with pytest.raises(ValueError, match="bad IDX magic number"):
        read_idx(bad_magic)
    truncated = tmp_path / "truncated"
    truncated.write_bytes(good[:-10])
    with pytest.raises(ValueError, match="truncated IDX file"):
        read_idx(truncated)
    truncated_gz = tmp_path / "truncated.gz"
    truncated_gz.write_bytes(gzip.compress(good)[:-12])  # cut inside the gzip stream
    with pytest.raises(ValueError, match="truncated"):
        read_idx(truncated_gz)
    short_header = tmp_path / "short_header"
    short_header.write_bytes(good[:9])
    with pytest.raises(ValueError, match="truncated IDX header"):
        read_idx(short_header)
    trailing = tmp_path / "trailing"
    trailing.write_bytes(good + b"\x00")
    with pytest.raises(ValueError, match="trailing bytes"):
        read_idx(trailing)


def test_mnist_errors(tmp_path: Path) -> None:
    _write_mnist_dir(tmp_path, 6, 3, compress=False)
    # 5 labels for 6 images.
    _write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(5, dtype=np.uint8), False)
    with pytest.raises(ValueError, match="6 images but .* 5 labels"):
        load_mnist_like(tmp_path)
    os.remove(tmp_path / "t10k-images-idx3-ubyte")
    _write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(6, dtype=np.uint8), False)
    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte"):
        load_mnist_like(tmp_path)


# ---------------------------------------------------------------------------- CIFAR-10


def _write_cifar_dir(directory: Path, n_per_batch: int, protocol: int) -> ImageSplits:
    """Writes CIFAR-10 python batches with bytes keys, like the real (Python 2) files."""
    rng = np.random.default_rng(1)
    xs, ys = [], []
    for name in (*CIFAR10_TRAIN_BATCHES, CIFAR10_TEST_BATCH):
        data = rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, n_per_batch).tolist()
        batch = {b"batch_label": name.encode(), b"labels": labels, b"data": data,
                 b"filenames": [b"img%d.png" % i for i in range(n_per_batch)]}  # fmt: skip
        (directory / name).write_bytes(pickle.dumps(batch, protocol=protocol))
        xs.append(torch.from_numpy(data).reshape(-1, 3, 32, 32))
        ys.append(torch.tensor(labels))
    meta = {b"label_names": [f"class{i}".encode() for i in range(10)], b"num_vis": 3072}
    (directory / "batches.meta").write_bytes(pickle.dumps(meta, protocol=protocol))
    return ImageSplits(torch.cat(xs[:5]), torch.cat(ys[:5]), xs[5], ys[5])


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_load_cifar10_round_trip(tmp_path: Path, protocol: int) -> None:
    expected = _write_cifar_dir(tmp_path, 4, protocol)
    splits = load_cifar10(tmp_path)
    assert splits.train_x.shape == (20, 3, 32, 32) and splits.test_x.shape == (4, 3, 32, 32)
    assert torch.equal(splits.train_x, expected.train_x)
    assert torch.equal(splits.train_y, expected.train_y)
    assert torch.equal(splits.test_x, expected.test_x)
    assert splits.classes[3] == "class3"
    # Channel layout: the first 1024 values of a row are the red plane.
    row = expected.train_x[0].reshape(-1)
    assert torch.equal(splits.train_x[0, 0].reshape(-1), row[:1024])


def test_load_cifar10_numpy1_pickles(tmp_path: Path) -> None:
    """The real files name numpy 1's ``numpy.core.multiarray`` module; accept it too."""
    expected = _write_cifar_dir(tmp_path, 2, 2)
    for path in tmp_path.iterdir():
        # Protocol 2 GLOBAL opcodes are newline-terminated text, so renaming is safe.
        path.write_bytes(path.read_bytes().replace(b"numpy._core.", b"numpy.core."))
    assert b"numpy.core.multiarray" in (tmp_path / "test_batch").read_bytes()
    assert torch.equal(load_cifar10(tmp_path).test_x, expected.test_x)


def test_cifar_missing_batch(tmp_path: Path) -> None:
    _write_cifar_dir(tmp_path, 2, 2)
    os.remove(tmp_path / "data_batch_3")
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        load_cifar10(tmp_path)


class _Evil:
    """Pickles to a call of os.system; a safe loader must refuse before calling it."""

    def __reduce__(self) -> tuple:
        return (os.system, ("echo pwned > pwned.txt",))


def test_cifar_forbidden_global(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_cifar_dir(tmp_path, 2, 2)
    batch = {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1], b"x": _Evil()}
    (tmp_path / "data_batch_2").write_bytes(pickle.dumps(batch, protocol=2))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UnsafePickleError, match="forbidden global .*system"):
        load_cifar10(tmp_path)
    assert not (tmp_path / "pwned.txt").exists()


def test_cifar_corrupt_batch(tmp_path: Path) -> None:
    _write_cifar_dir(tmp_path, 2, 2)
    path = tmp_path / CIFAR10_TEST_BATCH
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_cifar10(tmp_path)


# ---------------------------------------------------------------------------- image folder


def _write_png(path: Path, color: tuple[int, int, int], size: tuple[int, int]) -> None:
    from PIL import Image

    Image.new("RGB", size, color).save(path)


def test_load_image_folder(tmp_path: Path) -> None:
    (tmp_path / "dog").mkdir()
    (tmp_path / "cat").mkdir()
    _write_png(tmp_path / "dog" / "a.png", (255, 0, 0), (40, 20))
    _write_png(tmp_path / "dog" / "b.PNG", (0, 255, 0), (20, 20))
    _write_png(tmp_path / "cat" / "c.jpg", (0, 0, 255), (20, 50))
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    data = load_image_folder(tmp_path, 16)
    assert data.classes == ("cat", "dog")  # sorted by name
    assert data.x.shape == (3, 3, 16, 16) and data.x.dtype == torch.uint8
    assert data.y.tolist() == [0, 1, 1]
    assert data.x[1, :, 8, 8].tolist() == [255, 0, 0]  # dog/a.png is red
    assert data.x[0, 2].float().mean() > 240  # cat/c.jpg is blue (JPEG is lossy)
    grey = load_image_folder(tmp_path, (8, 12), channels=1)
    assert grey.x.shape == (3, 1, 8, 12)


def test_image_folder_errors(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    _write_png(tmp_path / "a" / "x.png", (1, 2, 3), (8, 8))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty: class folder has no images"):
        load_image_folder(tmp_path, 8)
    (tmp_path / "empty" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(ValueError, match="cannot read image .*broken.png"):
        load_image_folder(tmp_path, 8)
    with pytest.raises(FileNotFoundError):
        load_image_folder(tmp_path / "missing", 8)


# ---------------------------------------------------------------------------- batching


def _random_set(n: int, size: int = 32, channels: int = 3, seed: int = 0) -> ImageSet:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, channels, size, size), generator=gen, dtype=torch.uint8)
    return ImageSet(x, torch.arange(n) % 4)


def test_channel_stats_and_normalize() -> None:
    data = _random_set(20)
    mean, std = channel_stats(data.x)
    ref = data.x.double() / 255
    assert torch.allclose(mean.double(), ref.mean(dim=(0, 2, 3)), atol=1e-6)
    assert torch.allclose(std.double(), ref.std(dim=(0, 2, 3), unbiased=False), atol=1e-6)
    z = normalize(data.x, mean, std)
    assert z.dtype == torch.float32
    assert torch.allclose(z.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4)
    assert torch.allclose(z.std(dim=(0, 2, 3)), torch.ones(3), atol=1e-2)


def test_random_crop_flip_shapes_and_reproducibility() -> None:
    x = _random_set(8).x
    a = random_crop_flip(x, torch.Generator().manual_seed(3))
    b = random_crop_flip(x, torch.Generator().manual_seed(3))
    c = random_crop_flip(x, torch.Generator().manual_seed(4))
    assert a.shape == x.shape and a.dtype == x.dtype
    assert torch.equal(a, b) and not torch.equal(a, c)
    # With no padding only flips remain: each image is itself or its mirror.
    f = random_crop_flip(x, torch.Generator().manual_seed(0), padding=0)
    for img, out in zip(x, f, strict=True):
        assert torch.equal(out, img) or torch.equal(out, img.flip(-1))


def test_image_batches_train_and_eval() -> None:
    data = _random_set(10)
    train = ImageBatches(data, 4, torch.Generator().manual_seed(0), train=True)
    assert train.augment and len(train) == 2  # 32x32 training data is augmented
    batches = list(train)
    assert [xb.shape for xb, _ in batches] == [(4, 3, 32, 32)] * 2
    assert all(xb.dtype == torch.float32 and yb.dtype == torch.int64 for xb, yb in batches)
    again = list(ImageBatches(data, 4, torch.Generator().manual_seed(0), train=True))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again, strict=True))
    ev = ImageBatches(data, 4, mean=train.mean, std=train.std)
    assert not ev.augment and len(ev) == 3
    xs, ys = zip(*ev, strict=True)
    assert torch.equal(torch.cat(ys), data.y)  # in order, last batch partial
    assert torch.allclose(torch.cat(xs), normalize(data.x, train.mean, train.std))
    mnist = ImageBatches(_random_set(8, 28, 1), 4, torch.Generator(), train=True)
    assert not mnist.augment  # no flips for digits by default
    with pytest.raises(ValueError, match="Generator"):
        ImageBatches(data, 4, train=True)


def test_holdout_split_is_stratified_and_seeded() -> None:
    data = _random_set(40)
    train, valid = holdout_split(data, 0.3, seed=1)  # 10 images per class
    assert len(train) == 28 and len(valid) == 12
    assert torch.bincount(valid.y).tolist() == [3, 3, 3, 3]
    _, valid2 = holdout_split(data, 0.3, seed=1)
    _, valid3 = holdout_split(data, 0.3, seed=2)
    assert torch.equal(valid.x, valid2.x) and not torch.equal(valid.x, valid3.x)
    # Disjoint and complete: every image is in exactly one part.
    all_x = torch.cat([train.x, valid.x]).flatten(1)
    assert torch.unique(all_x, dim=0).shape[0] == 40
    with pytest.raises(ValueError, match="fraction"):
        holdout_split(data, 1.0)


def test_evaluate_accuracy() -> None:
    class Oracle(nn.Module):
        """Predicts class = round(mean pixel of channel 0) from crafted inputs."""

        def __init__(self) -> None:
            super().__init__()
            self.dummy = nn.Parameter(torch.zeros(()))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            assert not self.training
            return nn.functional.one_hot(x[:, 0, 0, 0].round().long(), 4).float()

    y = torch.tensor([0, 1, 2, 3, 0])
    x = y.float().view(-1, 1, 1, 1).expand(-1, 3, 2, 2).clone()
    x[4] = 3.0  # one wrong prediction
    model = Oracle().train()
    assert evaluate_accuracy(model, x, y, batch_size=2) == pytest.approx(0.8)
    assert model.training  # mode restored
    xu = x.to(torch.uint8)
    acc = evaluate_accuracy(model, xu, y, 2, mean=torch.zeros(3), std=torch.full((3,), 1 / 255))
    assert acc == pytest.approx(0.8)
    with pytest.raises(ValueError, match="mean and std"):
        evaluate_accuracy(model, xu, y)
