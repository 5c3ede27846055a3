"""Image-classification data: file-format readers, hold-out splits, batching, augmentation.

Images are held as ``torch.uint8`` tensors of shape ``[N, C, H, W]`` and labels as
``torch.int64`` tensors of shape ``[N]``; conversion to normalised floats happens per
batch, so a whole data set costs one byte per pixel. Three on-disk formats are read:

* **IDX** (:func:`read_idx`, :func:`load_mnist_like`): the format of MNIST and
  Fashion-MNIST (LeCun et al.), raw or gzip-compressed. Debian's
  ``dataset-fashion-mnist`` package installs Fashion-MNIST under
  ``/usr/share/datasets/fashion-mnist``.
* **CIFAR-10 "python version"** (:func:`load_cifar10`): pickled batches, read with a
  restricted unpickler that can rebuild numpy arrays and nothing else, so a malicious
  pickle cannot run code.
* **Class-per-folder images** (:func:`load_image_folder`): ``root/<class>/<image>``,
  decoded with Pillow.

Training batches (:class:`ImageBatches`) are normalised per channel with statistics
of the training split and, for 32x32 images, augmented with the standard CIFAR recipe
of He et al. 2016 (section 4.2): 4-pixel zero padding, a random 32x32 crop and a
random horizontal flip. All randomness comes from a caller-supplied
``torch.Generator`` so runs are reproducible.
"""

from __future__ import annotations

import codecs
import gzip
import math
import pickle
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "CIFAR10_TEST_BATCH",
    "CIFAR10_TRAIN_BATCHES",
    "IMAGE_EXTENSIONS",
    "MNIST_FILES",
    "ImageBatches",
    "ImageSet",
    "ImageSplits",
    "UnsafePickleError",
    "channel_stats",
    "count_correct",
    "crop_flip",
    "crop_flip_draws",
    "evaluate_accuracy",
    "holdout_split",
    "load_cifar10",
    "load_image_folder",
    "load_mnist_like",
    "normalize",
    "random_crop_flip",
    "read_idx",
    "shard_rows",
]


@dataclass(frozen=True)
class ImageSet:
    """Labelled images.

    Attributes:
        x: ``torch.uint8`` images ``[N, C, H, W]``.
        y: ``torch.int64`` class indices ``[N]``.
        classes: Class names indexed by label, or ``()`` when the format has none.
    """

    x: Tensor
    y: Tensor
    classes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_images(self.x, self.y, "")

    def __len__(self) -> int:
        return int(self.x.shape[0])


@dataclass(frozen=True)
class ImageSplits:
    """Train and test splits of an image-classification data set.

    Attributes:
        train_x: ``torch.uint8`` training images ``[N, C, H, W]``.
        train_y: ``torch.int64`` training labels ``[N]``.
        test_x: ``torch.uint8`` test images ``[M, C, H, W]``.
        test_y: ``torch.int64`` test labels ``[M]``.
        classes: Class names indexed by label, or ``()`` when the format has none.
    """

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    classes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_images(self.train_x, self.train_y, "train_")
        _check_images(self.test_x, self.test_y, "test_")
        if self.train_x.shape[1:] != self.test_x.shape[1:]:
            raise ValueError(
                f"train and test image shapes differ: {tuple(self.train_x.shape[1:])} vs "
                f"{tuple(self.test_x.shape[1:])}"
            )

    @property
    def train(self) -> ImageSet:
        """The training split as an :class:`ImageSet`."""
        return ImageSet(self.train_x, self.train_y, self.classes)

    @property
    def test(self) -> ImageSet:
        """The test split as an :class:`ImageSet`."""
        return ImageSet(self.test_x, self.test_y, self.classes)


def _check_images(x: Tensor, y: Tensor, prefix: str) -> None:
    """Raises ``ValueError`` unless ``x`` is uint8 ``[N, C, H, W]`` and ``y`` int64 ``[N]``."""
    if x.dtype != torch.uint8 or x.dim() != 4:
        raise ValueError(
            f"{prefix}x must be a torch.uint8 tensor [N, C, H, W], "
            f"got dtype={x.dtype} shape={tuple(x.shape)}"
        )
    if y.dtype != torch.int64 or y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(
            f"{prefix}y must be a torch.int64 tensor [{x.shape[0]}], "
            f"got dtype={y.dtype} shape={tuple(y.shape)}"
        )


# --------------------------------------------------------------------------------------
# IDX (MNIST / Fashion-MNIST)
# --------------------------------------------------------------------------------------

# IDX type byte -> big-endian numpy dtype (http://yann.lecun.com/exdb/mnist/, "THE IDX
# FILE FORMAT").
_IDX_DTYPES: dict[int, str] = {
    0x08: "u1",
    0x09: "i1",
    0x0B: ">i2",
    0x0C: ">i4",
    0x0D: ">f4",
    0x0E: ">f8",
}

MNIST_FILES: dict[str, str] = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}
"""Base names of the four IDX files of MNIST-like data sets (``.gz`` optional)."""


def _read_maybe_gzip(path: Path) -> bytes:
    """Reads ``path``, decompressing when it starts with the gzip magic bytes.

    Sniffing the content rather than the suffix copes with files that were decompressed
    but kept their ``.gz`` name (or the reverse), which browsers sometimes do.
    """
    data = path.read_bytes()
    if data[:2] != b"\x1f\x8b":
        return data
    try:
        return gzip.decompress(data)
    except (OSError, EOFError) as exc:
        raise ValueError(f"{path}: corrupt or truncated gzip data ({exc})") from exc


def read_idx(path: str | Path) -> Tensor:
    """Reads one IDX file (raw or gzip-compressed) into a tensor.

    The format is a 4-byte magic number ``0x00 0x00 <type> <ndim>``, then ``ndim``
    big-endian uint32 dimension sizes, then the data in C order, big-endian.

    Args:
        path: The ``.idx*-ubyte`` file, optionally ``.gz``-compressed.

    Returns:
        A tensor of the stored shape; uint8 data stays ``torch.uint8``, other types
        become the native-endian torch equivalent.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: For a bad magic number, an unknown type byte, a truncated header or
            body, or trailing bytes after the data. The message names the file.
    """
    path = Path(path)
    data = _read_maybe_gzip(path)
    if len(data) < 4:
        raise ValueError(f"{path}: truncated IDX file ({len(data)} bytes, no header)")
    if data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(
            f"{path}: bad IDX magic number 0x{data[:4].hex()} "
            f"(expected 0x0000TTDD with type TT in {sorted(hex(t) for t in _IDX_DTYPES)})"
        )
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: truncated IDX header ({ndim} dims need {header} bytes)")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = header + math.prod(shape) * dtype.itemsize
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "trailing bytes in"
        raise ValueError(
            f"{path}: {what} IDX file: shape {shape} of {dtype} needs {expected} bytes, "
            f"found {len(data)}"
        )
    array = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    # astype(native) copies into a writable, native-endian array that torch can wrap.
    return torch.from_numpy(array.astype(dtype.newbyteorder("=")))


def _find_idx(directory: Path, base: str) -> Path:
    """Finds ``base`` or a common variant of it (``.gz``, ``.idx`` dot spelling)."""
    dotted = base.replace("-idx", ".idx")  # e.g. "train-images.idx3-ubyte" (Kaggle copies)
    candidates = [directory / name for b in (base, dotted) for name in (b, b + ".gz")]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    names = ", ".join(c.name for c in candidates)
    raise FileNotFoundError(f"{directory}: no IDX file found; looked for {names}")


def _idx_images_labels(directory: Path, x_key: str, y_key: str) -> tuple[Tensor, Tensor]:
    """Reads one images/labels IDX pair and checks that they belong together."""
    x_path = _find_idx(directory, MNIST_FILES[x_key])
    y_path = _find_idx(directory, MNIST_FILES[y_key])
    x, y = read_idx(x_path), read_idx(y_path)
    if x.dim() != 3 or x.dtype != torch.uint8:
        raise ValueError(
            f"{x_path}: expected uint8 images [N, H, W], got {x.dtype} {tuple(x.shape)}"
        )
    if y.dim() != 1:
        raise ValueError(f"{y_path}: expected labels [N], got shape {tuple(y.shape)}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(
            f"{x_path.name} has {x.shape[0]} images but {y_path.name} has {y.shape[0]} labels"
        )
    return x.unsqueeze(1), y.long()  # [N, 1, H, W], [N]


def load_mnist_like(directory: str | Path) -> ImageSplits:
    """Loads MNIST, Fashion-MNIST or any data set stored as the four MNIST IDX files.

    Args:
        directory: Folder holding ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
            ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte``, each optionally
            ``.gz``-compressed.

    Returns:
        :class:`ImageSplits` with uint8 images ``[N, 1, 28, 28]`` (60,000 train and
        10,000 test for (Fashion-)MNIST) and int64 labels.

    Raises:
        FileNotFoundError: If a file is missing.
        ValueError: If a file is malformed (see :func:`read_idx`), has the wrong rank,
            or the image and label counts differ.
    """
    directory = Path(directory)
    train_x, train_y = _idx_images_labels(directory, "train_x", "train_y")
    test_x, test_y = _idx_images_labels(directory, "test_x", "test_y")
    return ImageSplits(train_x, train_y, test_x, test_y)


# --------------------------------------------------------------------------------------
# CIFAR-10 python batches
# --------------------------------------------------------------------------------------

CIFAR10_TRAIN_BATCHES: tuple[str, ...] = tuple(f"data_batch_{i}" for i in range(1, 6))
"""File names of the five CIFAR-10 training batches (10,000 images each)."""
CIFAR10_TEST_BATCH = "test_batch"
"""File name of the CIFAR-10 test batch (10,000 images)."""


def _numpy_pickle_globals() -> dict[tuple[str, str], Any]:
    """The globals a pickled numpy array may reference, keyed by ``(module, name)``.

    The reconstruction helpers are taken from numpy's own ``__reduce_ex__`` output rather
    than imported by name, because numpy 2 moved them from ``numpy.core`` to
    ``numpy._core`` (and importing the old path warns); pickles written by either
    version name their own module, so both spellings are accepted.
    """
    reconstruct = np.zeros(1).__reduce_ex__(2)[0]  # numpy.(_)core.multiarray._reconstruct
    frombuffer = np.zeros(1).__reduce_ex__(5)[0]  # numpy.(_)core.numeric._frombuffer
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        # Python 3 pickles bytes with protocol < 3 as _codecs.encode(str, "latin1").
        ("_codecs", "encode"): codecs.encode,
        ("builtins", "bytes"): bytes,
        ("builtins", "bytearray"): bytearray,
    }
    for core in ("numpy.core", "numpy._core"):
        allowed[(f"{core}.multiarray", "_reconstruct")] = reconstruct
        allowed[(f"{core}.numeric", "_frombuffer")] = frombuffer
    return allowed


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle referenced a global outside the allowed set; nothing was executed."""


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals needed to rebuild numpy arrays.

    ``pickle.load`` calls any importable callable named in the stream, so loading an
    untrusted pickle can execute arbitrary code. Overriding ``find_class`` (the Python
    documentation's "Restricting Globals" recipe) makes every other global an error.
    """

    _allowed: dict[tuple[str, str], Any] | None = None

    def find_class(self, module: str, name: str) -> Any:
        if _RestrictedUnpickler._allowed is None:
            _RestrictedUnpickler._allowed = _numpy_pickle_globals()
        try:
            return _RestrictedUnpickler._allowed[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"forbidden global {module}.{name} in pickle; only numpy array "
                "reconstruction is allowed"
            ) from None


def _load_restricted_pickle(path: Path) -> Any:
    """Unpickles ``path`` with :class:`_RestrictedUnpickler`.

    ``encoding="bytes"`` reads the original CIFAR files, which Python 2 wrote with
    ``str`` (byte-string) keys and values.
    """
    try:
        with path.open("rb") as f:
            return _RestrictedUnpickler(f, encoding="bytes").load()
    except UnsafePickleError as exc:
        raise UnsafePickleError(f"{path}: {exc}") from exc
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as exc:
        raise ValueError(f"{path}: corrupt or truncated pickle ({exc})") from exc


def _get(d: dict[Any, Any], key: str, path: Path) -> Any:
    """Looks up ``key`` as bytes (Python 2 pickles) or str (Python 3 pickles)."""
    for k in (key.encode(), key):
        if k in d:
            return d[k]
    raise ValueError(f"{path}: CIFAR batch has no {key!r} entry (keys: {sorted(map(str, d))})")


def _read_cifar_batch(path: Path) -> tuple[Tensor, Tensor]:
    """Reads one CIFAR batch into uint8 images ``[N, 3, 32, 32]`` and int64 labels ``[N]``."""
    if not path.is_file():
        raise FileNotFoundError(f"missing CIFAR-10 batch {path}")
    batch = _load_restricted_pickle(path)
    if not isinstance(batch, dict):
        raise ValueError(f"{path}: expected a pickled dict, got {type(batch).__name__}")
    data = np.asarray(_get(batch, "data", path))
    labels = np.asarray(_get(batch, "labels", path))
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: expected uint8 data [N, 3072], got {data.dtype} {data.shape}")
    if labels.ndim != 1 or labels.shape[0] != data.shape[0]:
        raise ValueError(f"{path}: {data.shape[0]} images but labels of shape {labels.shape}")
    # Each row is 1024 red, then 1024 green, then 1024 blue values, each plane row-major.
    x = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())  # [N, 3, 32, 32]
    return x, torch.from_numpy(labels.astype(np.int64))


def _cifar_classes(directory: Path) -> tuple[str, ...]:
    """Reads class names from ``batches.meta``; ``()`` when the file is absent."""
    path = directory / "batches.meta"
    if not path.is_file():
        return ()
    meta = _load_restricted_pickle(path)
    names = _get(meta, "label_names", path)
    return tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)


def load_cifar10(directory: str | Path) -> ImageSplits:
    """Loads the CIFAR-10 "python version" (Krizhevsky 2009).

    Args:
        directory: The ``cifar-10-batches-py`` folder (or its parent), holding
            ``data_batch_1`` ... ``data_batch_5``, ``test_batch`` and optionally
            ``batches.meta``.

    Returns:
        :class:`ImageSplits` with uint8 images ``[N, 3, 32, 32]`` (50,000 train and
        10,000 test for the real data), int64 labels, and the class names from
        ``batches.meta`` (``()`` if it is absent).

    Raises:
        FileNotFoundError: If a batch is missing.
        UnsafePickleError: If a file references any global other than numpy array
            reconstruction (it is never executed). A subclass of
            ``pickle.UnpicklingError``.
        ValueError: If a batch is corrupt or has the wrong layout.
    """
    directory = Path(directory)
    if (directory / "cifar-10-batches-py").is_dir():
        directory = directory / "cifar-10-batches-py"
    train = [_read_cifar_batch(directory / name) for name in CIFAR10_TRAIN_BATCHES]
    test_x, test_y = _read_cifar_batch(directory / CIFAR10_TEST_BATCH)
    return ImageSplits(
        train_x=torch.cat([x for x, _ in train]),
        train_y=torch.cat([y for _, y in train]),
        test_x=test_x,
        test_y=test_y,
        classes=_cifar_classes(directory),
    )


# --------------------------------------------------------------------------------------
# Class-per-folder images
# --------------------------------------------------------------------------------------

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
)
"""File suffixes (lower case) that :func:`load_image_folder` treats as images."""


def _pair(size: int | tuple[int, int]) -> tuple[int, int]:
    """Normalises ``size`` to ``(height, width)``."""
    h, w = (size, size) if isinstance(size, int) else size
    if h <= 0 or w <= 0:
        raise ValueError(f"size must be positive, got {size!r}")
    return h, w


def _decode_image(path: Path, size: tuple[int, int], mode: str) -> Tensor:
    """Decodes one image, resizes it to cover ``size`` and center-crops; returns ``[C, H, W]``.

    Resizing so that the image *covers* the target (then cropping the excess) keeps the
    aspect ratio, like torchvision's ``Resize(size)`` + ``CenterCrop(size)``.
    """
    from PIL import Image  # Imported lazily: only this loader needs Pillow.

    th, tw = size
    try:
        with Image.open(path) as file:
            img = file.convert(mode)  # convert() decodes, so errors surface here
        scale = max(th / img.height, tw / img.width)
        rw, rh = max(tw, round(img.width * scale)), max(th, round(img.height * scale))
        img = img.resize((rw, rh), Image.Resampling.BILINEAR)
        left, top = (rw - tw) // 2, (rh - th) // 2
        img = img.crop((left, top, left + tw, top + th))
        array = np.asarray(img, dtype=np.uint8).reshape(th, tw, -1)  # [H, W, C]
    except (OSError, ValueError) as exc:  # PIL.UnidentifiedImageError is an OSError
        raise ValueError(f"cannot read image {path}: {exc}") from exc
    return torch.from_numpy(array.copy()).permute(2, 0, 1)  # [C, H, W]


def _class_images(folder: Path) -> list[Path]:
    """Lists the image files of one class folder, sorted by name, skipping hidden files."""
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
    )


def load_image_folder(
    root: str | Path, size: int | tuple[int, int], *, channels: int = 3
) -> ImageSet:
    """Loads a ``root/<class_name>/<image>`` directory tree (torchvision ``ImageFolder``).

    Classes are the sub-folders of ``root`` sorted by name, so label ``i`` is the
    ``i``-th name in sorted order; images within a class are sorted by file name.

    Args:
        root: Folder with one sub-folder per class.
        size: Output ``H = W`` (int) or ``(H, W)``. Each image is resized, keeping its
            aspect ratio, to the smallest size covering the target, then center-cropped.
        channels: 3 to convert every image to RGB, 1 for greyscale.

    Returns:
        :class:`ImageSet` with uint8 images ``[N, channels, H, W]``, int64 labels and the
        class names.

    Raises:
        FileNotFoundError: If ``root`` is not a directory.
        ValueError: If ``root`` has no class folders, a class folder has no images
            (suffixes in :data:`IMAGE_EXTENSIONS`), or an image cannot be decoded.
        ImportError: If Pillow is not installed.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    size_hw = _pair(size)
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise ValueError(f"{root}: no class sub-folders")
    images: list[Tensor] = []
    labels: list[int] = []
    for label, folder in enumerate(class_dirs):
        files = _class_images(folder)
        if not files:
            raise ValueError(
                f"{folder}: class folder has no images (suffixes {sorted(IMAGE_EXTENSIONS)})"
            )
        mode = "RGB" if channels == 3 else "L"
        images.extend(_decode_image(path, size_hw, mode) for path in files)
        labels.extend([label] * len(files))
    return ImageSet(
        x=torch.stack(images),  # [N, C, H, W]
        y=torch.tensor(labels, dtype=torch.int64),
        classes=tuple(p.name for p in class_dirs),
    )


# --------------------------------------------------------------------------------------
# Hold-out split, normalisation, augmentation, batching, evaluation
# --------------------------------------------------------------------------------------


def holdout_split(data: ImageSet, fraction: float, seed: int = 0) -> tuple[ImageSet, ImageSet]:
    """Splits a training set into train and validation parts, stratified by class.

    From every class, ``round(fraction * n_class)`` images chosen uniformly at random
    (from ``torch.Generator().manual_seed(seed)``) go to validation and the rest to
    train. Stratifying keeps the class balance of small validation sets equal to the
    training set's, and the fixed seed makes the split identical across runs, so that
    tuning on it never touches the test set. Within each part, images keep their
    original relative order.

    Args:
        data: The full training set.
        fraction: Share of each class to hold out, in ``[0, 1)``.
        seed: Seed of the random selection.

    Returns:
        ``(train, valid)`` image sets.

    Raises:
        ValueError: If ``fraction`` is outside ``[0, 1)``.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must be in [0, 1), got {fraction!r}")
    gen = torch.Generator().manual_seed(seed)
    is_valid = torch.zeros(len(data), dtype=torch.bool)
    for label in torch.unique(data.y).tolist():
        idx = torch.nonzero(data.y == label).squeeze(1)  # [n_class]
        n_valid = round(fraction * idx.numel())
        chosen = idx[torch.randperm(idx.numel(), generator=gen)[:n_valid]]
        is_valid[chosen] = True
    train = ImageSet(data.x[~is_valid], data.y[~is_valid], data.classes)
    valid = ImageSet(data.x[is_valid], data.y[is_valid], data.classes)
    return train, valid


def channel_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and standard deviation of uint8 images, in ``[0, 1]`` units.

    Compute these on the training split only and reuse them for validation and test
    data, so no information leaks from held-out data.

    Args:
        x: uint8 images ``[N, C, H, W]``.

    Returns:
        ``(mean, std)``, each float32 ``[C]``.
    """
    # Accumulate in float64 over chunks: exact enough and never a float copy of all data.
    c = x.shape[1]
    total = torch.zeros(c, dtype=torch.float64)
    total_sq = torch.zeros(c, dtype=torch.float64)
    for chunk in x.split(4096):
        v = chunk.to(torch.float64) / 255.0  # [n, C, H, W]
        total += v.sum(dim=(0, 2, 3))
        total_sq += (v * v).sum(dim=(0, 2, 3))
    count = x.shape[0] * x.shape[2] * x.shape[3]
    mean = total / count
    std = (total_sq / count - mean * mean).clamp_min(0.0).sqrt()
    return mean.float(), std.float()


def normalize(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """Converts uint8 images ``[B, C, H, W]`` to float32 ``(x / 255 - mean) / std``.

    ``mean`` and ``std`` are ``[C]`` in ``[0, 1]`` units (see :func:`channel_stats`); a
    zero ``std`` (a constant channel) is treated as 1 to avoid dividing by zero.
    """
    std = torch.where(std > 0, std, torch.ones_like(std))
    x = x.to(torch.float32) / 255.0  # [B, C, H, W]
    return (x - mean.view(1, -1, 1, 1).to(x.device)) / std.view(1, -1, 1, 1).to(x.device)


def crop_flip_draws(
    batch: int, generator: torch.Generator, padding: int = 4
) -> tuple[Tensor, Tensor, Tensor]:
    """The random choices of :func:`random_crop_flip` for ``batch`` images.

    Returns:
        ``(dy, dx, flip)``, each ``[batch]``: crop offsets in ``[0, 2 * padding]`` and whether
        to flip. Drawing them for a whole global batch and applying a slice of them
        (:func:`crop_flip`) lets each process augment only its own shard, identically to one
        process augmenting everything.
    """
    dy = torch.randint(0, 2 * padding + 1, (batch,), generator=generator)  # [B]
    dx = torch.randint(0, 2 * padding + 1, (batch,), generator=generator)  # [B]
    flip = torch.rand(batch, generator=generator) < 0.5  # [B]
    return dy, dx, flip


def crop_flip(x: Tensor, dy: Tensor, dx: Tensor, flip: Tensor, padding: int = 4) -> Tensor:
    """Pad ``x`` ``[B, C, H, W]`` by ``padding``, crop at offsets ``(dy, dx)`` and flip where
    ``flip`` (see :func:`random_crop_flip`); same shape and dtype."""
    b, _, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))  # [B, C, H + 2p, W + 2p]
    rows = (dy[:, None] + torch.arange(h)).to(x.device)  # [B, H]
    cols = dx[:, None] + torch.arange(w)  # [B, W]
    # Flipping = reading the crop's columns right to left.
    cols = torch.where(flip[:, None], cols.flip(1), cols).to(x.device)  # [B, W]
    batch = torch.arange(b, device=x.device)[:, None, None]  # [B, 1, 1]
    # Advanced indices separated by a slice move to the front: result is [B, H, W, C].
    out = padded[batch, :, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()  # [B, C, H, W]


def random_crop_flip(x: Tensor, generator: torch.Generator, padding: int = 4) -> Tensor:
    """Standard CIFAR augmentation (He et al. 2016, section 4.2), vectorised over a batch.

    Each image is zero-padded by ``padding`` pixels on every side, a random window of
    the original size is cropped from it, and it is flipped left-right with probability
    1/2. Works on uint8 or float images; zero padding before normalisation is black.

    Args:
        x: Images ``[B, C, H, W]``.
        generator: Source of randomness (CPU generator), for reproducibility.
        padding: Padding in pixels; the crop offset is uniform in ``[0, 2 * padding]``.

    Returns:
        Augmented images of the same shape and dtype.
    """
    return crop_flip(x, *crop_flip_draws(x.shape[0], generator, padding), padding=padding)


def shard_rows(n: int, rank: int, world_size: int) -> slice:
    """Rank ``rank``'s contiguous share of ``n`` rows split as evenly as possible."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    return slice(rank * n // world_size, (rank + 1) * n // world_size)


class ImageBatches:
    """Iterates over an :class:`ImageSet` in normalised (and optionally augmented) batches.

    In training mode each iteration is one epoch over a fresh random permutation, the
    last incomplete batch is dropped (a batch of one breaks BatchNorm and a tiny batch
    gives a noisy step), and :func:`random_crop_flip` is applied when ``augment`` is on.
    In evaluation mode batches are in order and the last one may be smaller.

    With ``world_size > 1`` each batch is drawn whole (permutation and augmentation choices,
    the same on every process) and only rows :func:`shard_rows` of it are loaded, augmented
    and yielded: process ``rank``'s shard of the global batch.

    Yields ``(x, y)`` with float32 ``x`` ``[B, C, H, W]`` and int64 ``y`` ``[B]`` on
    ``device``.
    """

    def __init__(
        self,
        split: ImageSet,
        batch_size: int,
        generator: torch.Generator | None = None,
        train: bool = False,
        *,
        mean: Tensor | None = None,
        std: Tensor | None = None,
        augment: bool | None = None,
        device: torch.device | str = "cpu",
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        """Configures the iterator.

        Args:
            split: Images and labels to iterate over.
            batch_size: Images per batch.
            generator: Random source for shuffling and augmentation; required when
                ``train`` is true.
            train: Shuffle, drop the last partial batch and (by default) augment.
            mean: Per-channel mean ``[C]`` in ``[0, 1]`` units; computed from ``split``
                when omitted. Pass the *training* statistics when ``split`` is a
                validation or test set.
            std: Per-channel standard deviation ``[C]``, likewise.
            augment: Apply :func:`random_crop_flip`. ``None`` means "when training on
                32x32 images" (the CIFAR recipe; flips would be wrong for digits).
            device: Where the yielded batches live.
            rank: Which shard of every batch to yield.
            world_size: Number of shards.

        Raises:
            ValueError: If ``batch_size`` is not positive or ``train`` is set without a
                generator.
        """
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if train and generator is None:
            raise ValueError("train=True needs a torch.Generator for shuffling")
        self.split = split
        self.batch_size = batch_size
        self.generator = generator
        self.train = train
        if mean is None or std is None:
            mean, std = channel_stats(split.x)
        self.mean, self.std = mean, std
        square32 = tuple(split.x.shape[2:]) == (32, 32)
        self.augment = (train and square32) if augment is None else augment
        self.device = torch.device(device)
        shard_rows(0, rank, world_size)  # validates the shard
        self.rank, self.world_size = rank, world_size

    def __len__(self) -> int:
        """Number of batches per epoch."""
        n = len(self.split)
        return n // self.batch_size if self.train else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        return self.batches()

    def draw_order(self) -> Tensor:
        """The order of one epoch: a fresh permutation when training (one draw)."""
        n = len(self.split)
        return torch.randperm(n, generator=self.generator) if self.train else torch.arange(n)

    def batches(
        self, order: Tensor | None = None, start: int = 0
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """One epoch in ``order`` (default: :meth:`draw_order`), from batch ``start`` on (a
        resumed run continues the epoch it was in; the augmentation draws follow the
        generator's state)."""
        if order is None:
            order = self.draw_order()
        for i in range(start, len(self)):
            idx = order[i * self.batch_size : (i + 1) * self.batch_size]  # [B]
            rows = shard_rows(len(idx), self.rank, self.world_size)
            x = self.split.x[idx[rows]]  # [b, C, H, W] uint8
            if self.augment:
                assert self.generator is not None  # checked in __init__ for train mode
                dy, dx, flip = crop_flip_draws(len(idx), self.generator)  # whole batch
                x = crop_flip(x, dy[rows], dx[rows], flip[rows])
            x = normalize(x.to(self.device), self.mean, self.std)  # [b, C, H, W] float32
            yield x, self.split.y[idx[rows]].to(self.device)


@torch.no_grad()
def count_correct(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    batch_size: int = 256,
    *,
    mean: Tensor | None = None,
    std: Tensor | None = None,
) -> int:
    """Number of images of ``(x, y)`` whose highest logit is the label, in evaluation mode
    (arguments as in :func:`evaluate_accuracy`); counts of disjoint shards add up."""
    if x.dtype == torch.uint8 and (mean is None or std is None):
        raise ValueError("uint8 images need the training mean and std for normalisation")
    if len(x) == 0:
        return 0
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    model.eval()
    correct = 0
    try:
        for xb, yb in zip(x.split(batch_size), y.split(batch_size), strict=True):
            xb = xb.to(device)
            if xb.dtype == torch.uint8:
                assert mean is not None and std is not None
                xb = normalize(xb, mean, std)
            pred = model(xb).argmax(dim=1)  # [B]
            correct += int((pred == yb.to(device)).sum())
    finally:
        model.train(was_training)
    return correct


def evaluate_accuracy(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    batch_size: int = 256,
    *,
    mean: Tensor | None = None,
    std: Tensor | None = None,
) -> float:
    """Top-1 accuracy of ``model`` on ``(x, y)``, in evaluation mode.

    The model is switched to ``eval()`` (BatchNorm uses running statistics) and its
    previous mode is restored afterwards.

    Args:
        model: Maps float images ``[B, C, H, W]`` to logits ``[B, K]``.
        x: Model-ready float images ``[N, C, H, W]``, or uint8 images together with
            ``mean`` and ``std`` (then normalised batch by batch, see :func:`normalize`).
        y: int64 labels ``[N]``.
        batch_size: Images per forward pass.
        mean: Per-channel training mean ``[C]``, for uint8 ``x``.
        std: Per-channel training standard deviation ``[C]``, for uint8 ``x``.

    Returns:
        The fraction of images whose highest logit is the label (0.0 for empty data).

    Raises:
        ValueError: If ``x`` is uint8 and ``mean`` / ``std`` are missing.
    """
    correct = count_correct(model, x, y, batch_size, mean=mean, std=std)
    return correct / len(x) if len(x) else 0.0
