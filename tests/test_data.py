"""Tests for alwayssparse.data (byte corpora, batching and bits-per-character)."""

from __future__ import annotations

import io
import math
import struct
import zipfile
from pathlib import Path

import pytest
import torch
from torch import Tensor

from alwayssparse.data import (
    ENWIK8_SPLIT,
    ByteSplits,
    default_corpus,
    eval_batches,
    evaluate_bpc,
    load_default_corpus,
    load_enwik8,
    load_text_files,
    random_batch,
)

SMALL_SPLIT = (900, 50, 50)


def _fake_enwik8(n: int = 1000) -> bytes:
    """Bytes whose value encodes the position, so boundaries can be checked exactly."""
    return bytes(i % 251 for i in range(n))


def _as_bytes(t: Tensor) -> bytes:
    return bytes(t.tolist())


# --------------------------------------------------------------------------- enwik8


def test_enwik8_split_constant() -> None:
    assert ENWIK8_SPLIT == (90_000_000, 5_000_000, 5_000_000)
    assert sum(ENWIK8_SPLIT) == 100_000_000


def _check_small_splits(splits: ByteSplits, raw: bytes) -> None:
    for split in (splits.train, splits.valid, splits.test):
        assert split.dtype == torch.uint8
        assert split.dim() == 1
    assert _as_bytes(splits.train) == raw[:900]
    assert _as_bytes(splits.valid) == raw[900:950]
    assert _as_bytes(splits.test) == raw[950:1000]
    assert "900" in splits.describe() and "50" in splits.describe()


def test_load_enwik8_raw_file(tmp_path: Path) -> None:
    raw = _fake_enwik8()
    path = tmp_path / "enwik8"
    path.write_bytes(raw)
    _check_small_splits(load_enwik8(path, SMALL_SPLIT), raw)


def test_load_enwik8_zip(tmp_path: Path) -> None:
    raw = _fake_enwik8()
    path = tmp_path / "enwik8.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("enwik8", raw)
    _check_small_splits(load_enwik8(str(path), SMALL_SPLIT), raw)


def test_load_enwik8_zip_single_member_with_other_name(tmp_path: Path) -> None:
    raw = _fake_enwik8()
    path = tmp_path / "data.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("something.txt", raw)
    _check_small_splits(load_enwik8(path, SMALL_SPLIT), raw)


def test_load_enwik8_ignores_excess(tmp_path: Path) -> None:
    raw = _fake_enwik8(1200)
    path = tmp_path / "enwik8"
    path.write_bytes(raw)
    splits = load_enwik8(path, SMALL_SPLIT)
    _check_small_splits(splits, raw)
    assert splits.test.numel() == 50


def test_load_enwik8_too_short(tmp_path: Path) -> None:
    path = tmp_path / "enwik8"
    path.write_bytes(_fake_enwik8(999))
    with pytest.raises(ValueError, match=r"999.*1,000"):
        load_enwik8(path, SMALL_SPLIT)


def test_load_enwik8_zip_wrong_members(tmp_path: Path) -> None:
    path = tmp_path / "enwik8.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("a.txt", b"x" * 600)
        archive.writestr("b.txt", b"y" * 600)
    with pytest.raises(ValueError, match=r"a\.txt.*b\.txt"):
        load_enwik8(path, SMALL_SPLIT)


def _enwik8_zip(compression: int = zipfile.ZIP_DEFLATED) -> tuple[bytes, bytes, int]:
    """A small enwik8 zip: (archive bytes, member bytes, offset of the member's data)."""
    raw = bytes(torch.randint(0, 64, (3000,), generator=torch.Generator().manual_seed(0)).tolist())
    path_like = io.BytesIO()
    with zipfile.ZipFile(path_like, "w", compression=compression) as archive:
        archive.writestr("enwik8", raw)
    data = path_like.getvalue()
    name_len, extra_len = struct.unpack("<HH", data[26:30])  # local file header fields
    return data, raw, 30 + name_len + extra_len


TINY_SPLIT = (20, 5, 5)  # small enough that the old code "loaded" a damaged zip's own bytes


@pytest.mark.parametrize("keep", [4, 30, 100, 0.5, 0.9, -22, -1])
def test_load_enwik8_truncated_zip_is_refused(tmp_path: Path, keep: float) -> None:
    data, _, _ = _enwik8_zip()
    cut = int(len(data) * keep) if isinstance(keep, float) else keep % len(data)
    path = tmp_path / "enwik8.zip"
    path.write_bytes(data[:cut])
    with pytest.raises(ValueError, match=r"enwik8\.zip: damaged or truncated zip") as info:
        load_enwik8(path, TINY_SPLIT)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("compression", [zipfile.ZIP_DEFLATED, zipfile.ZIP_STORED])
@pytest.mark.parametrize("where", [0.0, 0.5, 0.99])
def test_load_enwik8_corrupted_zip_data_is_refused(
    tmp_path: Path, compression: int, where: float
) -> None:
    data, _, start = _enwik8_zip(compression)
    end = len(data) - 22 - (46 + len("enwik8"))  # before the central directory and end record
    damaged = bytearray(data)
    damaged[start + int((end - start) * where)] ^= 0x5A
    path = tmp_path / "enwik8.zip"
    path.write_bytes(bytes(damaged))
    with pytest.raises(ValueError, match=r"damaged or truncated zip.*(CRC|error|Error)"):
        load_enwik8(path, TINY_SPLIT)


def test_load_enwik8_intact_zip_of_the_helper_loads(tmp_path: Path) -> None:
    data, raw, _ = _enwik8_zip()
    path = tmp_path / "enwik8.zip"
    path.write_bytes(data)
    assert _as_bytes(load_enwik8(path, TINY_SPLIT).train) == raw[:20]


def test_load_enwik8_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_enwik8(tmp_path / "nope", SMALL_SPLIT)


# --------------------------------------------------------------------------- text files


def test_load_text_files_split(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_bytes(b"a" * 600)
    (tmp_path / "b.txt").write_bytes(b"b" * 400)
    splits = load_text_files([tmp_path / "a.txt", tmp_path / "b.txt"], 0.1, 0.2)
    assert splits.train.numel() == 700
    assert splits.valid.numel() == 100
    assert splits.test.numel() == 200
    joined = _as_bytes(torch.cat([splits.train, splits.valid, splits.test]))
    assert joined == b"a" * 600 + b"b" * 400


def test_load_text_files_given_order_and_directory_sorted(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    # Created out of order: the directory must still be read in sorted relative-path order.
    (corpus / "sub" / "c.txt").write_bytes(b"C" * 10)
    (corpus / "b.txt").write_bytes(b"B" * 10)
    (corpus / "a.txt").write_bytes(b"A" * 10)
    extra = tmp_path / "z.txt"
    extra.write_bytes(b"Z" * 10)
    splits = load_text_files([extra, corpus], valid_fraction=0.0, test_fraction=0.0)
    assert _as_bytes(splits.train) == b"Z" * 10 + b"A" * 10 + b"B" * 10 + b"C" * 10
    assert splits.valid.numel() == 0 and splits.test.numel() == 0


def test_load_text_files_errors(tmp_path: Path) -> None:
    good = tmp_path / "good.txt"
    good.write_bytes(b"x" * 100)
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    with pytest.raises(FileNotFoundError):
        load_text_files([tmp_path / "missing.txt"])
    with pytest.raises(ValueError, match="empty"):
        load_text_files([empty])
    with pytest.raises(ValueError, match="valid_fraction"):
        load_text_files([good], valid_fraction=1.0)
    with pytest.raises(ValueError, match="test_fraction"):
        load_text_files([good], test_fraction=-0.1)
    with pytest.raises(ValueError, match="< 1"):
        load_text_files([good], valid_fraction=0.5, test_fraction=0.5)
    with pytest.raises(ValueError, match="valid split would be empty"):
        load_text_files([good], valid_fraction=0.001)
    with pytest.raises(ValueError):
        load_text_files([])


# --------------------------------------------------------------------------- default corpus


def test_default_corpus_deterministic_and_capped() -> None:
    first = default_corpus(max_bytes=200_000)
    second = default_corpus(max_bytes=200_000)
    assert len(first) == 200_000
    assert first == second
    assert b"def " in first and b"import" in first
    small = default_corpus(max_bytes=1000)
    assert small == first[:1000]


def test_load_default_corpus_splits() -> None:
    splits = load_default_corpus(max_bytes=200_000, valid_fraction=0.1, test_fraction=0.05)
    assert splits.train.numel() == 170_000
    assert splits.valid.numel() == 20_000
    assert splits.test.numel() == 10_000
    assert _as_bytes(splits.train[:1000]) == default_corpus(1000)


# --------------------------------------------------------------------------- batching


def test_random_batch_shapes_shift_and_reproducibility() -> None:
    data = torch.arange(200, dtype=torch.uint8)
    x, y = random_batch(data, 8, 16, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (8, 16)
    assert x.dtype == y.dtype == torch.long
    # Data is 0..199, so each row must be consecutive and y = x + 1.
    assert torch.equal(y, x + 1)
    assert torch.equal(x[:, 1:], x[:, :-1] + 1)
    assert int(y.max()) <= 199
    x2, y2 = random_batch(data, 8, 16, torch.Generator().manual_seed(0))
    assert torch.equal(x, x2) and torch.equal(y, y2)


def test_random_batch_reaches_both_ends_and_rejects_short_data() -> None:
    data = torch.arange(10, dtype=torch.uint8)
    x, y = random_batch(data, 64, 9, torch.Generator().manual_seed(1))  # only one window
    assert torch.equal(x, torch.arange(9).expand(64, 9))
    assert torch.equal(y, torch.arange(1, 10).expand(64, 9))
    with pytest.raises(ValueError, match="context"):
        random_batch(data, 1, 10, torch.Generator())


@pytest.mark.parametrize("n", [2, 17, 64, 65, 100, 161])
def test_eval_batches_covers_every_byte_once(n: int) -> None:
    data = (torch.arange(n) % 256).to(torch.uint8)
    batches = list(eval_batches(data, batch_size=3, context=16))
    ys = torch.cat([y.reshape(-1) for _, y in batches])
    assert torch.equal(ys, data[1:].long())
    for x, y in batches:
        assert x.shape == y.shape
        assert x.shape[0] <= 3 and x.shape[1] <= 16
        # Within each window, y is x shifted by one.
        assert torch.equal(x[:, 1:], y[:, :-1])


def test_eval_batches_max_batches() -> None:
    data = torch.zeros(1000, dtype=torch.uint8)
    batches = list(eval_batches(data, batch_size=2, context=10, max_batches=3))
    assert len(batches) == 3
    assert all(x.shape == (2, 10) for x, _ in batches)


def test_evaluate_bpc_uniform_is_eight_bits() -> None:
    data = torch.randint(0, 256, (1001,), dtype=torch.uint8, generator=torch.Generator())

    def uniform(x: Tensor) -> Tensor:
        return torch.zeros(*x.shape, 256)

    assert evaluate_bpc(uniform, data, batch_size=4, context=32) == pytest.approx(8.0)


def test_evaluate_bpc_certain_and_right_is_zero() -> None:
    # Data 0, 1, 2, ...: the next byte is always x + 1 (mod 256).
    data = (torch.arange(500) % 256).to(torch.uint8)

    def oracle(x: Tensor) -> Tensor:
        return 100.0 * torch.nn.functional.one_hot((x + 1) % 256, 256).float()

    bpc = evaluate_bpc(oracle, data, batch_size=4, context=32)
    # Hand check: each byte costs log(1 + 255 * e^-100) nats, i.e. ~255 e^-100 / ln 2 bits.
    expected = math.log1p(255 * math.exp(-100.0)) / math.log(2)
    assert bpc == pytest.approx(expected, abs=1e-12)
    assert bpc < 1e-6


def test_evaluate_bpc_half_right() -> None:
    # Two equally likely candidates, one of them right: exactly 1 bit per byte.
    data = (torch.arange(300) % 256).to(torch.uint8)

    def two_way(x: Tensor) -> Tensor:
        logits = torch.full((*x.shape, 256), -1e9)
        logits.scatter_(-1, ((x + 1) % 256)[..., None], 0.0)
        logits.scatter_(-1, ((x + 2) % 256)[..., None], 0.0)
        return logits

    assert evaluate_bpc(two_way, data, batch_size=5, context=20) == pytest.approx(1.0)
