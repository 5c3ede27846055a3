"""Tests for alwayssparse.data.wikitext (WikiText-103 loading and ordered segments)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from alwayssparse.data.bytes import load_enwik8
from alwayssparse.data.wikitext import (
    EOS,
    UNK,
    OrderedSegments,
    TokenSplits,
    Vocab,
    evaluate_segments,
    load_wikitext103,
    read_token_lines,
)
from alwayssparse.models.transformer_xl import TransformerXL, enwik8_tiny, wikitext103_tiny

# The real files: a leading space, space-separated tokens, " \n" blank lines, headings.
TRAIN = (
    " \n"
    " = Valkyria Chronicles III = \n"
    " \n"
    " Senjō no Valkyria 3 : <unk> Chronicles ( Japanese : 戦場のヴァルキュリア3 , lit . \n"
    " The game began development in 2010 , carrying over a large portion of the work . \n"
    " \n"
    " = = Gameplay = = \n"
    " \n"
    " The game 's battle system , the <unk> system , is carried over . \n"
)
VALID = " \n = Tower Building = \n \n The tower is a Zürich landmark . \n"
TEST = " \n = Robert Boulter = \n \n Robert Boulter is an English actor . \n"


def _write(directory: Path, train: str = TRAIN, valid: str = VALID, test: str = TEST) -> Path:
    for name, text in (("train", train), ("valid", valid), ("test", test)):
        (directory / f"wiki.{name}.tokens").write_text(text, encoding="utf-8")
    return directory


# --------------------------------------------------------------------------- loading


def test_load_wikitext103_real_format(tmp_path: Path) -> None:
    vocab, splits = load_wikitext103(_write(tmp_path))
    assert isinstance(splits, TokenSplits)
    train_tokens = [tok for line in TRAIN.split("\n")[:-1] for tok in [*line.split(), EOS]]
    assert splits.train.dtype == torch.long and splits.train.numel() == len(train_tokens)
    assert vocab.decode(splits.train) == train_tokens
    assert len(vocab) == len(set(train_tokens))  # every train token; <unk> and <eos> included
    assert vocab.itos[0] == EOS and vocab.counts[0] == TRAIN.count("\n")
    assert vocab.counts[vocab.unk_id] == 2 and "戦場のヴァルキュリア3" in vocab
    counts = vocab.counts[1:]
    assert counts == sorted(counts, reverse=True)  # frequency order for adaptive cutoffs
    # Valid/test words unseen in train map to <unk>; seen ones keep their id.
    valid = vocab.decode(splits.valid)
    assert valid[:6] == [EOS, "=", UNK, UNK, "=", EOS]
    assert valid.count(UNK) == 5 and valid[-3:] == [UNK, ".", EOS]
    assert vocab.decode(splits.test).count(EOS) == 4
    assert "train" in splits.describe()


def test_vocab_encode_decode_save_load(tmp_path: Path) -> None:
    vocab = Vocab.build([["b", "a", "b", EOS], ["c", "a", "b", EOS]])
    assert vocab.itos == [EOS, "b", "a", "c", UNK]  # ties keep first appearance; <unk> last
    assert vocab.counts == [2, 3, 2, 1, 0]
    ids = vocab.encode(["a", "zzz", EOS])
    assert ids.dtype == torch.long and ids.tolist() == [2, vocab.unk_id, 0]
    assert vocab.decode(ids) == ["a", UNK, EOS]
    path = tmp_path / "vocab.txt"
    vocab.save(path)
    loaded = Vocab.load(path)
    assert loaded.itos == vocab.itos and loaded.counts == vocab.counts
    path.write_text("a 1\n", encoding="utf-8")
    with pytest.raises(ValueError, match="token<TAB>count"):
        Vocab.load(path)
    with pytest.raises(ValueError, match="<unk>"):
        Vocab([EOS, "a"], [1, 1])


def test_missing_file_raises(tmp_path: Path) -> None:
    _write(tmp_path)
    (tmp_path / "wiki.valid.tokens").unlink()
    with pytest.raises(FileNotFoundError, match="wiki.valid.tokens"):
        load_wikitext103(tmp_path)
    with pytest.raises(FileNotFoundError, match="directory"):
        load_wikitext103(tmp_path / "nowhere")


def test_empty_file_raises(tmp_path: Path) -> None:
    _write(tmp_path, test="")
    with pytest.raises(ValueError, match=r"empty: .*wiki\.test\.tokens"):
        load_wikitext103(tmp_path)


def test_bad_utf8_raises(tmp_path: Path) -> None:
    _write(tmp_path)
    (tmp_path / "wiki.train.tokens").write_bytes(b" = Title = \n caf\xe9 au lait \n")
    with pytest.raises(ValueError, match=r"wiki\.train\.tokens is not UTF-8 text: line 2"):
        load_wikitext103(tmp_path)
    with pytest.raises(FileNotFoundError):
        read_token_lines(tmp_path / "missing.tokens")  # checked eagerly, not on iteration


# --------------------------------------------------------------------------- segments


@pytest.mark.parametrize(("n", "batch", "tgt_len"), [(103, 4, 5), (100, 5, 19), (40, 1, 7)])
def test_ordered_segments_cover_the_stream_in_order(n: int, batch: int, tgt_len: int) -> None:
    data = torch.arange(n)
    segments = OrderedSegments(data, batch, tgt_len)
    windows = list(segments)
    assert len(windows) == len(segments)
    steps = n // batch
    streams = data[: steps * batch].view(batch, steps)
    xs = torch.cat([x for x, _ in windows], dim=1)
    ys = torch.cat([y for _, y in windows], dim=1)
    assert torch.equal(xs, streams[:, :-1]) and torch.equal(ys, streams[:, 1:])
    assert all(x.shape[1] == tgt_len for x, _ in windows[:-1])
    for (x0, y0), (x1, _) in zip(windows[:-1], windows[1:], strict=True):
        assert torch.equal(x1[:, 0], x0[:, -1] + 1) and torch.equal(y0[:, -1], x1[:, 0])
    assert segments.n_targets == ys.numel()


def test_ordered_segments_accept_bytes_and_reject_bad_input() -> None:
    data = torch.arange(50, dtype=torch.uint8)
    x, y = next(iter(OrderedSegments(data, 2, 4)))
    assert x.dtype == torch.long and x.tolist() == [[0, 1, 2, 3], [25, 26, 27, 28]]
    with pytest.raises(ValueError, match="batch_size"):
        OrderedSegments(data, 0, 4)
    with pytest.raises(ValueError, match="too few"):
        OrderedSegments(data, 30, 4)
    with pytest.raises(ValueError, match="1-D"):
        OrderedSegments(data.view(5, 10), 2, 4)


def test_evaluate_segments_matches_a_manual_loop(tmp_path: Path) -> None:
    vocab, splits = load_wikitext103(_write(tmp_path, train=TRAIN * 3))
    torch.manual_seed(0)
    model = TransformerXL(wikitext103_tiny(len(vocab)))
    nll = evaluate_segments(model, splits.train, batch_size=2, tgt_len=6, mem_len=12)
    assert model.training  # mode restored
    model.eval()
    total, count, mems = 0.0, 0, None
    for x, y in OrderedSegments(splits.train, 2, 6):
        out, mems = model(x, y, mems, mem_len=12)
        total, count = total + out.sum().item(), count + y.numel()
    assert nll == pytest.approx(total / count, rel=1e-6)
    no_memory = evaluate_segments(model, splits.train, batch_size=2, tgt_len=6, mem_len=0)
    assert no_memory != pytest.approx(nll, rel=1e-6)
    assert 0 < nll < math.log(len(vocab)) + 1.0  # near-uniform at initialisation


def test_evaluate_segments_on_enwik8_bytes(tmp_path: Path) -> None:
    path = tmp_path / "enwik8"
    path.write_bytes(b"<page><title>Anarchism</title> anarchism is a political philosophy " * 8)
    splits = load_enwik8(path, split_sizes=(400, 60, 60))
    torch.manual_seed(0)
    model = TransformerXL(enwik8_tiny())
    nll = evaluate_segments(model, splits.test, batch_size=3, tgt_len=8, mem_len=16)
    bpc = nll / math.log(2)
    assert 6.0 < bpc < 10.0  # ~8 bits for an untrained byte model
