"""WikiText-103 word-level data and the Transformer-XL ordered segment iterator.

WikiText-103 (Merity et al., 2016) ships as three tokenised UTF-8 text files,
``wiki.train.tokens``, ``wiki.valid.tokens`` and ``wiki.test.tokens``: one paragraph or
``= Heading =`` per line, tokens separated by spaces, rare words already replaced by
``<unk>``. As in the Transformer-XL reference pipeline every line (blank ones included)
becomes its whitespace-separated tokens followed by ``<eos>``, and the vocabulary is
every token of the training split, ordered by decreasing frequency so that adaptive
softmax cutoffs select the frequent words (267,735 types for the real data).

:class:`OrderedSegments` and :func:`evaluate_segments` work on any 1-D token stream
(word ids here, or the raw bytes of :func:`alwayssparse.data.bytes.load_enwik8`).
"""

from __future__ import annotations

import math
import os
from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Protocol

import torch
from torch import Tensor, nn

from alwayssparse.data.bytes import Splits

__all__ = [
    "EOS",
    "UNK",
    "WIKITEXT103_FILES",
    "OrderedSegments",
    "SegmentModel",
    "TokenSplits",
    "Vocab",
    "evaluate_segments",
    "load_wikitext103",
    "read_token_lines",
    "segment_nll_sums",
]

EOS = "<eos>"
"""End-of-line token appended to every line."""

UNK = "<unk>"
"""Out-of-vocabulary token (already present in WikiText-103's own files)."""

WIKITEXT103_FILES: dict[str, str] = {
    "train": "wiki.train.tokens",
    "valid": "wiki.valid.tokens",
    "test": "wiki.test.tokens",
}
"""Split name -> file name inside the WikiText-103 directory."""


# --------------------------------------------------------------------------- reading


def read_token_lines(path: str | os.PathLike[str]) -> Iterator[list[str]]:
    """Yields the tokens of each line of a tokenised UTF-8 file, each followed by ``<eos>``.

    Lines end at ``\\n``; each is split on Unicode whitespace (``str.split()``, which also
    drops a ``\\r``), so a blank line yields just ``[EOS]``. The file is streamed, which
    keeps the 540 MB training file cheap. The path is checked when this is called, the
    encoding while iterating.

    Args:
        path: A text file.

    Returns:
        An iterator over ``tokens + [EOS]`` for every line.

    Raises:
        FileNotFoundError: If ``path`` is not a file.
        ValueError: If the file is empty or (while iterating) a line is not valid UTF-8;
            the message names the file and the line.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"token file not found: {path}")
    if path.stat().st_size == 0:
        raise ValueError(f"token file is empty: {path}")
    return _iter_token_lines(path)


def _iter_token_lines(path: Path) -> Iterator[list[str]]:
    """Generator behind :func:`read_token_lines`.

    Bytes are decoded line by line (not by the text layer's 8 kB chunks) so that a
    decoding error can name its exact line.
    """
    with path.open("rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise ValueError(
                    f"{path} is not UTF-8 text: line {line_no} has an invalid byte at "
                    f"column {error.start + 1} ({error.reason})"
                ) from error
            yield [*line.split(), EOS]


# --------------------------------------------------------------------------- vocabulary


class Vocab:
    """Token <-> id mapping with training-set counts.

    Ids are ordered as in the Transformer-XL reference: ``<eos>`` is 0, then tokens by
    decreasing count (ties in order of first appearance); ``<unk>`` has its natural place
    if it occurs in the training data (it does in WikiText-103) and is last otherwise.

    Attributes:
        itos: Id -> token.
        stoi: Token -> id.
        counts: Id -> number of occurrences in the data the vocabulary was built from.
    """

    def __init__(self, tokens: Sequence[str], counts: Sequence[int]) -> None:
        """Creates a vocabulary with exactly this order (use :meth:`build` from data).

        Raises:
            ValueError: If lengths differ, a token repeats or is not a non-empty
                whitespace-free string, a count is negative, or ``<eos>``/``<unk>`` is missing.
        """
        if len(tokens) != len(counts):
            raise ValueError(f"{len(tokens)} tokens but {len(counts)} counts")
        self.itos: list[str] = list(tokens)
        self.counts: list[int] = [int(c) for c in counts]
        self.stoi: dict[str, int] = {tok: i for i, tok in enumerate(self.itos)}
        if len(self.stoi) != len(self.itos):
            raise ValueError("vocabulary tokens must be unique")
        for tok in self.itos:
            if not tok or tok.split() != [tok]:
                raise ValueError(f"vocabulary token {tok!r} is empty or contains whitespace")
        if any(c < 0 for c in self.counts):
            raise ValueError("vocabulary counts must be non-negative")
        for special in (EOS, UNK):
            if special not in self.stoi:
                raise ValueError(f"vocabulary lacks the special token {special!r}")
        self.eos_id, self.unk_id = self.stoi[EOS], self.stoi[UNK]

    @classmethod
    def build(cls, lines: Iterable[Sequence[str]]) -> Vocab:
        """Builds the vocabulary of every token in ``lines`` (e.g. :func:`read_token_lines`)."""
        counter: dict[str, int] = {}  # dicts keep first-appearance order for the tie-break
        for line in lines:
            for tok in line:
                counter[tok] = counter.get(tok, 0) + 1
        return cls.from_counts(counter)

    @classmethod
    def from_counts(cls, counter: dict[str, int]) -> Vocab:
        """Orders ``token -> count`` (in first-appearance order) into a vocabulary."""
        counter = dict(counter)
        eos_count = counter.pop(EOS, 0)
        ranked = sorted(counter.items(), key=lambda item: -item[1])  # stable: ties keep order
        if UNK not in counter:
            ranked.append((UNK, 0))
        tokens = [EOS] + [tok for tok, _ in ranked]
        return cls(tokens, [eos_count] + [count for _, count in ranked])

    def __len__(self) -> int:
        return len(self.itos)

    def __contains__(self, token: object) -> bool:
        return token in self.stoi

    def encode(self, tokens: Iterable[str]) -> Tensor:
        """Maps tokens to a 1-D long tensor of ids; unknown tokens become ``<unk>``."""
        get, unk = self.stoi.get, self.unk_id
        return torch.tensor(array("q", (get(tok, unk) for tok in tokens)), dtype=torch.long)

    def decode(self, ids: Tensor | Iterable[int]) -> list[str]:
        """Maps ids (a tensor or any iterable of ints) back to tokens."""
        values = ids.reshape(-1).tolist() if isinstance(ids, Tensor) else list(ids)
        return [self.itos[i] for i in values]

    def save(self, path: str | os.PathLike[str]) -> None:
        """Writes one ``token<TAB>count`` line per id, in id order, as UTF-8."""
        text = "".join(
            f"{tok}\t{count}\n" for tok, count in zip(self.itos, self.counts, strict=True)
        )
        Path(path).write_text(text, encoding="utf-8")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Vocab:
        """Reads a file written by :meth:`save`.

        Raises:
            FileNotFoundError: If the file does not exist.
            ValueError: If a line is not ``token<TAB>count`` or the vocabulary is invalid.
        """
        tokens, counts = [], []
        for line_no, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
            parts = line.split("\t")
            if len(parts) != 2 or not (parts[1].isascii() and parts[1].isdigit()):
                raise ValueError(f"{path}:{line_no}: expected 'token<TAB>count', got {line!r}")
            tokens.append(parts[0])
            counts.append(int(parts[1]))
        return cls(tokens, counts)


# --------------------------------------------------------------------------- WikiText-103


@dataclass(frozen=True)
class TokenSplits(Splits):
    """Train / validation / test token-id streams (1-D ``torch.long`` tensors)."""

    dtype: ClassVar[torch.dtype] = torch.long
    unit: ClassVar[str] = "tokens"


def _encode_file(path: Path, vocab: Vocab) -> Tensor:
    """Encodes every line of ``path`` (plus ``<eos>``) without materialising its tokens."""
    get, unk = vocab.stoi.get, vocab.unk_id
    ids = array("q")  # int64 buffer: ~8 bytes per token instead of a Python list of ints
    for line in read_token_lines(path):
        ids.extend(get(tok, unk) for tok in line)
    if not ids:
        return torch.empty(0, dtype=torch.long)
    return torch.frombuffer(ids, dtype=torch.long).clone()  # clone: own memory, not the array


def load_wikitext103(directory: str | os.PathLike[str]) -> tuple[Vocab, TokenSplits]:
    """Loads WikiText-103 (or any directory with the same three files).

    Args:
        directory: Folder holding ``wiki.train.tokens``, ``wiki.valid.tokens`` and
            ``wiki.test.tokens`` (the ``wikitext-103`` folder of the official archive).

    Returns:
        ``(vocab, splits)``: the vocabulary of the training split and the three splits as
        id streams. Valid/test tokens missing from the vocabulary map to ``<unk>``.

    Raises:
        FileNotFoundError: If the directory or one of the files is missing.
        ValueError: If a file is empty or not UTF-8 text.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"WikiText-103 directory not found: {directory}")
    paths = {split: directory / name for split, name in WIKITEXT103_FILES.items()}
    for path in paths.values():
        if not path.is_file():
            raise FileNotFoundError(f"WikiText-103 file not found: {path}")
    # Two passes over train (count, then encode) keep memory at one id per token.
    vocab = Vocab.build(read_token_lines(paths["train"]))
    encoded = {split: _encode_file(path, vocab) for split, path in paths.items()}
    return vocab, TokenSplits(**encoded)


# --------------------------------------------------------------------------- segments


class OrderedSegments:
    """The Transformer-XL ordered iterator (``LMOrderedIterator``) over a 1-D stream.

    The stream is cut into ``B`` equal contiguous parts of ``S = len(data) // B`` tokens
    (the last ``len(data) mod B`` tokens are dropped); row ``b`` is part ``b``. Window
    ``w`` holds columns ``[w T, w T + t)`` with ``t = min(T, S - 1 - w T)``::

        x = streams[:, wT : wT + t]        y = streams[:, wT + 1 : wT + 1 + t]

    so windows are consecutive in every row and the memory of window ``w`` is exactly the
    history of window ``w + 1``. Each row predicts all of its tokens but the first.

    Args:
        data: 1-D tensor of token ids (any integer dtype; e.g. ``torch.uint8`` bytes).
        batch_size: Number of parallel streams ``B``.
        tgt_len: Window length ``T``.

    Raises:
        ValueError: If ``data`` is not 1-D, a size is not positive, or the data is too
            short to give each stream two tokens.
    """

    def __init__(self, data: Tensor, batch_size: int, tgt_len: int) -> None:
        if data.dim() != 1:
            raise ValueError(f"data must be 1-D, got shape {tuple(data.shape)}")
        if data.is_floating_point() or data.is_complex():
            raise ValueError(f"data must hold integer token ids, got {data.dtype}")
        for name, value in (("batch_size", batch_size), ("tgt_len", tgt_len)):
            if value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        self.batch_size, self.tgt_len = batch_size, tgt_len
        self.n_step = data.numel() // batch_size  # tokens per stream, S
        if self.n_step < 2:
            raise ValueError(
                f"data has {data.numel()} tokens: too few for {batch_size} streams of >= 2"
            )
        # A view, not a copy: windows are converted to long one at a time.
        self.streams = data[: self.n_step * batch_size].view(batch_size, self.n_step)  # [B, S]

    def __len__(self) -> int:
        return math.ceil((self.n_step - 1) / self.tgt_len)

    @property
    def n_targets(self) -> int:
        """Number of predicted tokens over all windows: ``B (S - 1)``."""
        return self.batch_size * (self.n_step - 1)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        """Yields ``(x, y)`` long tensors of shape ``[B, t]``, ``t <= T``, in stream order."""
        for start in range(0, self.n_step - 1, self.tgt_len):
            end = min(start + self.tgt_len, self.n_step - 1)
            x = self.streams[:, start:end].long()  # [B, t]
            y = self.streams[:, start + 1 : end + 1].long()  # [B, t]
            yield x, y


class SegmentModel(Protocol):
    """What :func:`evaluate_segments` needs: Transformer-XL's recurrent call signature."""

    def __call__(
        self, tokens: Tensor, targets: Tensor, mems: list[Tensor] | None, mem_len: int
    ) -> tuple[Tensor, list[Tensor]]: ...


@torch.no_grad()
def segment_nll_sums(
    model: SegmentModel,
    data: Tensor,
    batch_size: int,
    tgt_len: int,
    mem_len: int,
    device: str | torch.device | None = None,
    *,
    rank: int = 0,
    world_size: int = 1,
) -> tuple[float, int]:
    """Summed negative log-likelihood (nats) and number of predicted tokens over some streams.

    The ``batch_size`` streams of :class:`OrderedSegments` are split into ``world_size``
    contiguous groups as evenly as possible; this call evaluates group ``rank`` (all streams by
    default), with memory, as :func:`evaluate_segments` does. Streams are independent, so the
    sums of all ranks add up to the sums over all streams.

    Returns:
        ``(total_nats, count)``; ``(0.0, 0)`` for a rank without streams.
    """
    if mem_len < 0:
        raise ValueError(f"mem_len must be non-negative, got {mem_len}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    segments = OrderedSegments(data, batch_size, tgt_len)
    rows = slice(rank * batch_size // world_size, (rank + 1) * batch_size // world_size)
    n_rows = rows.stop - rows.start
    if n_rows == 0:
        return 0.0, 0
    was_training = model.training if isinstance(model, nn.Module) else False
    if device is None:
        first = next(model.parameters(), None) if isinstance(model, nn.Module) else None
        device = first.device if first is not None else torch.device("cpu")
    if isinstance(model, nn.Module):
        model.eval()  # dropout off: evaluation must be deterministic
    try:
        total, mems = 0.0, None
        for x, y in segments:
            x, y = x[rows].to(device), y[rows].to(device)  # [rows, t]
            nll, mems = model(x, y, mems, mem_len=mem_len)
            total += nll.double().sum().item()  # float64: millions of terms are summed
    finally:
        if isinstance(model, nn.Module):
            model.train(was_training)
    return total, n_rows * (segments.n_step - 1)


def evaluate_segments(
    model: SegmentModel,
    data: Tensor,
    batch_size: int,
    tgt_len: int,
    mem_len: int,
    device: str | torch.device | None = None,
) -> float:
    """Mean negative log-likelihood (nats per token) over a whole split, with memory.

    Runs :class:`OrderedSegments` windows in order, feeding each window the memory left
    by the previous one (the standard Transformer-XL evaluation)::

        nll = sum_{windows} sum_{b, t} nll[b, t] / (B (S - 1))

    Report ``nll / ln 2`` as bits per character for bytes and ``exp(nll)`` as perplexity
    for words. An ``nn.Module`` is put in eval mode for the duration and restored.

    Args:
        model: E.g. a ``TransformerXL``: ``model(x, y, mems, mem_len=...) -> (nll [B, T], mems)``.
        data: 1-D token stream.
        batch_size: Number of parallel streams.
        tgt_len: Window length.
        mem_len: Memory length (typically ``config.eval_mem_len``).
        device: Where windows are sent; defaults to the model's parameters' device (CPU for
            a parameterless callable).

    Returns:
        Mean nll in nats per predicted token.
    """
    total, count = segment_nll_sums(model, data, batch_size, tgt_len, mem_len, device)
    return total / count
