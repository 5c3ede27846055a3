"""Byte-level corpora, batching and bits-per-character evaluation.

Every corpus is held as a 1-D ``torch.uint8`` tensor of raw bytes: no tokenizer and no
text decoding, so the vocabulary is always the 256 possible byte values. Three sources
are supported:

* **enwik8** (:func:`load_enwik8`): the first 100 MB of an English Wikipedia XML dump,
  the standard byte-level language-modelling benchmark, with its standard 90M / 5M / 5M
  split.
* **Arbitrary files** (:func:`load_text_files`): any files or directories, concatenated
  and split contiguously.
* **The default corpus** (:func:`load_default_corpus`): the ``.py`` sources of the
  running interpreter's standard library. It needs no download and exists wherever
  Python is installed, which makes it the quickstart corpus.
"""

from __future__ import annotations

import io
import lzma
import math
import os
import sysconfig
import zipfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "DEFAULT_CORPUS_EXCLUDED_DIRS",
    "ENWIK8_SPLIT",
    "ByteSplits",
    "default_corpus",
    "eval_batches",
    "evaluate_bpc",
    "load_default_corpus",
    "load_enwik8",
    "load_text_files",
    "random_batch",
]

ENWIK8_SPLIT: tuple[int, int, int] = (90_000_000, 5_000_000, 5_000_000)
"""Standard enwik8 split sizes in bytes: first 90M train, next 5M valid, last 5M test."""

DEFAULT_CORPUS_EXCLUDED_DIRS: frozenset[str] = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idlelib"}
)
"""Directory names skipped by :func:`default_corpus`.

Third-party packages (``site-packages``, and Debian's ``dist-packages``) differ from
machine to machine, and the test suites and IDLE are large, atypical code that would
dominate a small corpus.
"""

_MIN_DEFAULT_CORPUS_BYTES = 100_000


@dataclass(frozen=True)
class Splits:
    """Train / validation / test splits of a 1-D stream (bytes or token ids).

    Subclasses fix the element type (``dtype``) and what an element is called (``unit``).

    Attributes:
        train: 1-D tensor of training elements.
        valid: 1-D tensor of validation elements.
        test: 1-D tensor of test elements.
    """

    dtype: ClassVar[torch.dtype] = torch.uint8
    unit: ClassVar[str] = "bytes"

    train: Tensor
    valid: Tensor
    test: Tensor

    def __post_init__(self) -> None:
        for name in ("train", "valid", "test"):
            split = getattr(self, name)
            if split.dtype != self.dtype or split.dim() != 1:
                raise ValueError(
                    f"{name} must be a 1-D {self.dtype} tensor, "
                    f"got dtype={split.dtype} shape={tuple(split.shape)}"
                )

    def describe(self) -> str:
        """Returns a one-line human-readable summary of the split sizes."""
        sizes = (self.train.numel(), self.valid.numel(), self.test.numel())
        u = self.unit
        return (
            f"train: {sizes[0]:,} {u} | valid: {sizes[1]:,} {u} | "
            f"test: {sizes[2]:,} {u} | total: {sum(sizes):,} {u}"
        )


@dataclass(frozen=True)
class ByteSplits(Splits):
    """Train / validation / test splits of a byte corpus (1-D ``torch.uint8`` tensors)."""


# --------------------------------------------------------------------------- helpers


def _bytes_to_tensor(data: bytes | bytearray) -> Tensor:
    """Converts raw bytes to a 1-D ``torch.uint8`` tensor that owns its memory."""
    if len(data) == 0:
        return torch.empty(0, dtype=torch.uint8)
    # frombuffer shares memory; a bytearray keeps it writable (frombuffer warns on
    # read-only bytes) and the tensor keeps the buffer alive.
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def _split_contiguous(data: Tensor, sizes: tuple[int, int, int]) -> ByteSplits:
    """Cuts ``data`` into consecutive train / valid / test pieces of the given sizes.

    The pieces are cloned so that each owns exactly its bytes; otherwise e.g.
    ``torch.save(splits.valid)`` would serialise the whole underlying corpus.
    """
    n_train, n_valid, n_test = sizes
    train = data[:n_train].clone()
    valid = data[n_train : n_train + n_valid].clone()
    test = data[n_train + n_valid : n_train + n_valid + n_test].clone()
    return ByteSplits(train=train, valid=valid, test=test)


def _check_fractions(valid_fraction: float, test_fraction: float) -> None:
    """Raises ValueError unless both fractions are in [0, 1) and sum to less than 1."""
    for name, value in (("valid_fraction", valid_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    if valid_fraction + test_fraction >= 1.0:
        raise ValueError(
            f"valid_fraction + test_fraction must be < 1 so that training data remains, "
            f"got {valid_fraction} + {test_fraction}"
        )


def _split_by_fractions(data: Tensor, valid_fraction: float, test_fraction: float) -> ByteSplits:
    """Splits ``data`` contiguously (train, then valid, then test) by fractions.

    Split sizes are rounded to the nearest byte; train takes the remainder. A split whose
    fraction is 0 is allowed to be empty, but a positive fraction that rounds to zero
    bytes (or an empty train split) is an error.
    """
    _check_fractions(valid_fraction, test_fraction)
    n = data.numel()
    if n == 0:
        raise ValueError("the corpus is empty (0 bytes)")
    # round() rather than int(): e.g. int(100 * 0.29) == 28 because of float error.
    n_valid = round(n * valid_fraction)
    n_test = round(n * test_fraction)
    n_train = n - n_valid - n_test
    for name, size, fraction in (
        ("train", n_train, 1.0),
        ("valid", n_valid, valid_fraction),
        ("test", n_test, test_fraction),
    ):
        if fraction > 0 and size <= 0:
            raise ValueError(
                f"the {name} split would be empty: corpus has only {n} bytes "
                f"(valid_fraction={valid_fraction}, test_fraction={test_fraction})"
            )
    return _split_contiguous(data, (n_train, n_valid, n_test))


# --------------------------------------------------------------------------- enwik8


_ZIP_SIGNATURES = (b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08")
"""Signatures a zip archive starts with: a local file header, an empty archive's end record,
or a split archive's marker."""

# What zipfile and its decompressors raise on a damaged archive: a missing or mangled central
# directory or header (BadZipFile, negative seeks as ValueError, flags as NotImplementedError or
# RuntimeError "encrypted"), corrupted compressed data (zlib.error, lzma.LZMAError, OSError from
# bz2, EOFError for a stream cut short) or a bad CRC (BadZipFile).
_DAMAGED_ZIP_ERRORS: tuple[type[Exception], ...] = (
    zipfile.BadZipFile,
    zlib.error,
    lzma.LZMAError,
    EOFError,
    OSError,
    ValueError,
    NotImplementedError,
    RuntimeError,
)


def _is_zip(raw: bytes) -> bool:
    """Whether ``raw`` is a zip archive, judged by content: a zip signature at offset 0 (also
    when the archive is truncated and has no central directory), or an end-of-central-directory
    record (e.g. an archive with a prefix)."""
    return raw[:4] in _ZIP_SIGNATURES or zipfile.is_zipfile(io.BytesIO(raw))


def _zip_member_name(archive: zipfile.ZipFile, path: Path) -> str:
    """The enwik8 member: the one named ``enwik8``, or the only file member."""
    members = [info.filename for info in archive.infolist() if not info.is_dir()]
    if "enwik8" in members:
        return "enwik8"
    if len(members) == 1:
        return members[0]
    raise ValueError(
        f"{path}: expected a zip with a single member or one named 'enwik8', "
        f"found members {members}"
    )


def _read_zip_member(path: Path, raw: bytes) -> bytes:
    """Reads the enwik8 member of the zip archive ``raw`` (the content of ``path``).

    The official ``enwik8.zip`` holds a single member named ``enwik8``; any archive with a
    member of that name, or with exactly one file member, is accepted. The member's CRC-32 is
    checked.

    Raises:
        ValueError: If the archive has an unexpected set of members, or is damaged or
            truncated (a partial download): the message names ``path``.
    """
    try:
        archive = zipfile.ZipFile(io.BytesIO(raw))  # reads the central directory
    except _DAMAGED_ZIP_ERRORS as exc:
        raise _damaged_zip(path, raw, exc) from exc
    with archive:
        name = _zip_member_name(archive, path)
        try:
            return archive.read(name)  # decompresses and checks the CRC-32
        except _DAMAGED_ZIP_ERRORS as exc:
            raise _damaged_zip(path, raw, exc) from exc


def _damaged_zip(path: Path, raw: bytes, exc: Exception) -> ValueError:
    """The error for a zip archive that cannot be read."""
    detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return ValueError(
        f"{path}: damaged or truncated zip archive ({len(raw):,} bytes; {detail}); "
        "download it again, or give the raw enwik8 file"
    )


def load_enwik8(
    path: str | os.PathLike[str], split_sizes: tuple[int, int, int] = ENWIK8_SPLIT
) -> ByteSplits:
    """Loads enwik8 with the standard contiguous split.

    Args:
        path: The raw ``enwik8`` file or ``enwik8.zip`` (detected by content, not by name).
        split_sizes: ``(train, valid, test)`` sizes in bytes, taken contiguously from the
            start of the file. Defaults to :data:`ENWIK8_SPLIT` (90M / 5M / 5M).

    Returns:
        The three splits as ``torch.uint8`` tensors. Bytes beyond ``sum(split_sizes)``
        are ignored (the real file is exactly 100,000,000 bytes).

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: If the zip has an unexpected set of members or is damaged or
            truncated (bad CRC, corrupted compressed data, missing central directory), a
            split size is negative, or the data is shorter than ``sum(split_sizes)``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"enwik8 file not found: {path}")
    if len(split_sizes) != 3 or any(size < 0 for size in split_sizes):
        raise ValueError(f"split_sizes must be three non-negative ints, got {split_sizes!r}")
    raw = path.read_bytes()
    if _is_zip(raw):
        raw = _read_zip_member(path, raw)
    needed = sum(split_sizes)
    if len(raw) < needed:
        raise ValueError(
            f"{path}: found {len(raw):,} bytes but the split {split_sizes} needs {needed:,}"
        )
    return _split_contiguous(_bytes_to_tensor(raw), split_sizes)


# --------------------------------------------------------------------------- text files


def _expand_paths(paths: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Expands directories into their files (recursively, sorted by relative path)."""
    files: list[Path] = []
    for entry in paths:
        path = Path(entry)
        if path.is_dir():
            found = (p for p in path.rglob("*") if p.is_file())
            files.extend(sorted(found, key=lambda p: p.relative_to(path).as_posix()))
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"no such file or directory: {path}")
    return files


def load_text_files(
    paths: Sequence[str | os.PathLike[str]],
    valid_fraction: float = 0.05,
    test_fraction: float = 0.05,
) -> ByteSplits:
    """Loads and splits the bytes of arbitrary files.

    The files' bytes are concatenated in the given order, with no separator and no
    decoding. A directory stands for all files below it, recursively, in sorted order of
    their relative paths. The result is split contiguously: train first, then valid,
    then test.

    Args:
        paths: Files and/or directories.
        valid_fraction: Fraction of bytes for validation, in ``[0, 1)``.
        test_fraction: Fraction of bytes for test, in ``[0, 1)``.

    Returns:
        The three splits as ``torch.uint8`` tensors.

    Raises:
        FileNotFoundError: If a path does not exist.
        ValueError: If no paths are given, the data is empty, the fractions are invalid,
            or a split with a positive fraction would be empty.
    """
    if isinstance(paths, str | os.PathLike):
        # A bare string is a Sequence too; iterating it would treat each character as a path.
        raise TypeError("paths must be a sequence of paths, not a single path")
    if len(paths) == 0:
        raise ValueError("paths is empty: give at least one file or directory")
    _check_fractions(valid_fraction, test_fraction)
    files = _expand_paths(paths)
    data = b"".join(f.read_bytes() for f in files)
    if not data:
        raise ValueError(f"no data: the {len(files)} file(s) under {list(paths)} are empty")
    return _split_by_fractions(_bytes_to_tensor(data), valid_fraction, test_fraction)


# --------------------------------------------------------------------------- default corpus


def _stdlib_source_files(root: Path) -> list[Path]:
    """Lists the standard library's ``.py`` files, minus excluded directories.

    Sorted by path relative to ``root`` so that the order does not depend on the
    file system's directory enumeration order.
    """
    files: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Pruning dirnames in place stops os.walk from descending into excluded trees.
        dirnames[:] = [d for d in dirnames if d not in DEFAULT_CORPUS_EXCLUDED_DIRS]
        for filename in filenames:
            if filename.endswith(".py"):
                full = Path(dirpath) / filename
                files.append((full.relative_to(root).as_posix(), full))
    files.sort(key=lambda item: item[0])
    return [full for _, full in files]


def default_corpus(max_bytes: int = 4_000_000) -> bytes:
    """Returns the quickstart corpus: Python standard-library source code.

    The corpus is the concatenation of the ``.py`` files of the running interpreter's
    standard library (the ``stdlib`` directory of :func:`sysconfig.get_paths`), skipping
    :data:`DEFAULT_CORPUS_EXCLUDED_DIRS`, in sorted order of relative path, truncated to
    ``max_bytes``. It is mostly English docstrings and comments plus Python code, needs no
    download, and is present wherever CPython is installed. It is deterministic for a
    given Python installation; different Python versions give different corpora.

    Args:
        max_bytes: Maximum corpus size in bytes; the last file is cut to fit.

    Returns:
        The corpus as raw bytes.

    Raises:
        ValueError: If ``max_bytes`` is not positive.
        FileNotFoundError: If the standard library sources cannot be found or hold fewer
            than ``min(max_bytes, 100 kB)`` (e.g. an embedded Python that ships only
            ``.pyc`` files in a zip).
    """
    if max_bytes <= 0:
        raise ValueError(f"max_bytes must be positive, got {max_bytes}")
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks: list[bytes] = []
    total = 0
    for file in _stdlib_source_files(root) if root.is_dir() else []:
        chunk = file.read_bytes()[: max_bytes - total]
        chunks.append(chunk)
        total += len(chunk)
        if total >= max_bytes:
            break
    needed = min(max_bytes, _MIN_DEFAULT_CORPUS_BYTES)
    if total < needed:
        raise FileNotFoundError(
            f"the default corpus needs at least {needed:,} bytes of Python standard-library "
            f"sources, but only {total:,} were found under {root}; use load_text_files() "
            f"or load_enwik8() instead"
        )
    return b"".join(chunks)


def load_default_corpus(
    max_bytes: int = 4_000_000,
    valid_fraction: float = 0.05,
    test_fraction: float = 0.05,
) -> ByteSplits:
    """Loads :func:`default_corpus` and splits it contiguously (train, valid, test).

    Args:
        max_bytes: Maximum corpus size in bytes.
        valid_fraction: Fraction of bytes for validation, in ``[0, 1)``.
        test_fraction: Fraction of bytes for test, in ``[0, 1)``.

    Returns:
        The three splits as ``torch.uint8`` tensors.

    Raises:
        ValueError: For invalid fractions or ``max_bytes``.
        FileNotFoundError: If the standard library sources are missing.
    """
    _check_fractions(valid_fraction, test_fraction)
    data = _bytes_to_tensor(default_corpus(max_bytes))
    return _split_by_fractions(data, valid_fraction, test_fraction)


# --------------------------------------------------------------------------- batching


def _check_batch_args(data: Tensor, batch_size: int, context: int) -> None:
    """Validates the common arguments of the batching functions."""
    if data.dim() != 1:
        raise ValueError(f"data must be 1-D, got shape {tuple(data.shape)}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if context <= 0:
        raise ValueError(f"context must be positive, got {context}")


def random_batch(
    data: Tensor, batch_size: int, context: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Samples random training windows.

    Each row is a window of ``context + 1`` consecutive bytes starting at a uniformly
    random offset; ``x`` is its first ``context`` bytes and ``y`` the same shifted by one.

    Args:
        data: 1-D byte tensor (``torch.uint8``).
        batch_size: Number of windows ``B``.
        context: Sequence length ``T``.
        generator: A CPU ``torch.Generator``; seeding it makes batches reproducible.

    Returns:
        ``(x, y)``, both ``torch.long`` of shape ``[B, T]`` on ``data.device``, with
        ``y[:, t] == x[:, t + 1]`` for ``t < T - 1``.

    Raises:
        ValueError: If ``data`` is shorter than ``context + 1`` or an argument is invalid.
    """
    _check_batch_args(data, batch_size, context)
    n = data.numel()
    if n < context + 1:
        raise ValueError(f"data has {n} bytes, fewer than context + 1 = {context + 1}")
    # Largest valid start is n - context - 1 (randint's high is exclusive).
    starts = torch.randint(0, n - context, (batch_size,), generator=generator)  # [B]
    offsets = torch.arange(context + 1)  # [T + 1]
    index = (starts[:, None] + offsets[None, :]).to(data.device)  # [B, T + 1]
    windows = data[index].long()  # [B, T + 1]
    return windows[:, :-1], windows[:, 1:]


def eval_batches(
    data: Tensor, batch_size: int, context: int, max_batches: int | None = None
) -> Iterator[tuple[Tensor, Tensor]]:
    """Yields contiguous, non-overlapping evaluation windows covering ``data``.

    Window ``i`` is ``data[i*T : i*T + T + 1]`` (``x`` its first ``T`` bytes, ``y`` the
    same shifted by one), so every byte after the first is predicted exactly once. Full
    windows are grouped into batches of ``batch_size`` (the last may be smaller); if
    ``len(data) - 1`` is not a multiple of ``T``, a final batch holds a single shorter
    window with the remaining bytes. Each window starts with an empty context, as in the
    usual non-overlapping evaluation.

    Args:
        data: 1-D byte tensor (``torch.uint8``).
        batch_size: Maximum number of windows per batch.
        context: Window length ``T``.
        max_batches: If given, stop after this many batches (from the start of ``data``).

    Yields:
        ``(x, y)`` pairs of ``torch.long`` tensors of shape ``[b, t]`` with
        ``b <= batch_size`` and ``t <= context``.
    """
    _check_batch_args(data, batch_size, context)
    if max_batches is not None and max_batches < 0:
        raise ValueError(f"max_batches must be non-negative, got {max_batches}")
    n_targets = max(data.numel() - 1, 0)
    n_full = n_targets // context
    yielded = 0
    for first in range(0, n_full, batch_size):
        if max_batches is not None and yielded >= max_batches:
            return
        rows = min(batch_size, n_full - first)
        # Non-overlapping windows of T + 1 bytes sharing their boundary byte: [rows, T + 1].
        span = data[first * context : (first + rows) * context + 1].long()
        x = span[:-1].view(rows, context)  # [rows, T]
        y = span[1:].reshape(rows, context)  # [rows, T]
        yield x, y
        yielded += 1
    remainder = n_targets - n_full * context
    if remainder > 0 and (max_batches is None or yielded < max_batches):
        tail = data[n_full * context :].long()  # [remainder + 1]
        yield tail[None, :-1], tail[None, 1:]  # [1, remainder] each


@torch.no_grad()
def nll_sums(
    model_fn: Callable[[Tensor], Tensor],
    data: Tensor,
    batch_size: int,
    context: int,
    max_batches: int | None = None,
    device: str | torch.device = "cpu",
    *,
    rank: int = 0,
    world_size: int = 1,
) -> tuple[float, int]:
    """Summed cross-entropy (nats) and number of predicted bytes over :func:`eval_batches`.

    With ``world_size > 1`` only batches ``rank, rank + world_size, ...`` are evaluated: the
    sums of all ranks add up to the sums of the whole run of batches (a sharded evaluation).

    Args:
        model_fn: Maps ``x`` (``torch.long`` ``[B, T]`` on ``device``) to logits
            ``[B, T, 256]``.
        data: 1-D byte tensor (``torch.uint8``).
        batch_size: Windows per batch.
        context: Window length ``T``.
        max_batches: If given, only the first ``max_batches`` batches (over all ranks).
        device: Device the batches are moved to before calling ``model_fn``.
        rank: This process's share of the batches.
        world_size: Number of shares.

    Returns:
        ``(total_nats, count)``.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    total_nats = 0.0
    count = 0
    for i, (x, y) in enumerate(eval_batches(data, batch_size, context, max_batches)):
        if i % world_size != rank:
            continue
        x, y = x.to(device), y.to(device)
        logits = model_fn(x)  # [B, T, V]
        # float() so that half-precision logits do not lose accuracy in the log-softmax.
        loss = F.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum"
        )
        total_nats += loss.item()
        count += y.numel()
    return total_nats, count


@torch.no_grad()
def evaluate_bpc(
    model_fn: Callable[[Tensor], Tensor],
    data: Tensor,
    batch_size: int,
    context: int,
    max_batches: int | None = None,
    device: str | torch.device = "cpu",
) -> float:
    """Computes bits per character (byte) of a model on ``data``.

    ``bpc = sum of cross-entropy in nats over every predicted byte / number of predicted
    bytes / ln 2``, over the windows of :func:`eval_batches`. The caller is responsible
    for putting the model in eval mode.

    Args:
        model_fn: Maps ``x`` (``torch.long`` ``[B, T]`` on ``device``) to logits
            ``[B, T, 256]``.
        data: 1-D byte tensor (``torch.uint8``).
        batch_size: Windows per batch.
        context: Window length ``T``.
        max_batches: If given, evaluate only the first ``max_batches`` batches.
        device: Device the batches are moved to before calling ``model_fn``.

    Returns:
        Bits per character as a Python float.

    Raises:
        ValueError: If no byte would be predicted (``data`` shorter than 2 bytes or
            ``max_batches == 0``).
    """
    total_nats, count = nll_sums(model_fn, data, batch_size, context, max_batches, device)
    if count == 0:
        raise ValueError(
            f"nothing to evaluate: data has {data.numel()} bytes and max_batches={max_batches}"
        )
    return total_nats / count / math.log(2)
