"""BERT pre-training data: WordPiece tokenizer, sentence pairs for NSP, whole-word masking.

Follows the data pipeline of Devlin et al. (2018), "BERT: Pre-training of Deep Bidirectional
Transformers for Language Understanding" (section 3.1, appendix A.1, and the
``create_pretraining_data.py`` of the reference implementation, including its whole word
masking variant), in the single phase with sequence length 128 that Dietrich et al. (2021),
"Towards Structured Dynamic Sparse Pre-Training of BERT" (``dynsparse-bert.md`` section 2), use:

* **Tokenizer.** :func:`train_wordpiece` trains an uncased (by default) WordPiece vocabulary with
  the Hugging Face ``tokenizers`` library from the user's own text files (no download), with the
  special tokens ``[PAD] [UNK] [CLS] [SEP] [MASK]``, saved to and loaded from one JSON file.
* **Corpus format.** Plain text files; documents are separated by one or more blank lines. The
  lines of a document are joined with spaces and split into sentences by a deliberately simple
  rule (:func:`split_sentences`): a sentence ends at ``.``, ``!`` or ``?`` (optionally followed
  by closing quotes or brackets) followed by whitespace. Abbreviations such as "e.g." therefore
  end a sentence too; for NSP that only makes some segments shorter.
* **Sentence pairs (NSP).** Segment A is a run of consecutive sentences of a document; with
  probability 0.5 segment B is the run that actually follows it (label 0, *IsNext*), otherwise
  a run from a uniformly chosen *other* document (label 1, *NotNext*). This is the label
  convention of the original ``next_sentence_labels`` (1 = random next). The pair is truncated,
  one token at a time from the longer segment, randomly from its front or back, to
  ``max_seq_len`` tokens including ``[CLS] A [SEP] B [SEP]``.
* **Whole word masking.** 15% of the *words* of a sequence are chosen (a word is a wordpiece
  together with the ``##`` continuation pieces that follow it); every piece of a chosen word is
  predicted, and independently replaced by ``[MASK]`` (80%), a random non-special token (10%) or
  left unchanged (10%). Special tokens are never chosen; labels are ``-100`` elsewhere.

Examples are sampled online from a seeded ``torch.Generator``, so a run is reproducible from
its seed, and the documents are split into training and held-out sets so that the MLM and NSP
losses can be measured on documents never trained on (:func:`evaluate_pretraining`).
"""

from __future__ import annotations

import bisect
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import (
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from torch import Tensor, nn

__all__ = [
    "IGNORE_INDEX",
    "SPECIAL_TOKENS",
    "BertBatch",
    "BertEvalResult",
    "BertPretrainingData",
    "BertVocab",
    "SentencePair",
    "TokenizedDocuments",
    "eval_result",
    "evaluate_pretraining",
    "load_tokenizer",
    "pretraining_sums",
    "collate_pairs",
    "read_documents",
    "sample_pair",
    "split_sentences",
    "tokenize_documents",
    "train_wordpiece",
    "whole_word_mask",
]

StrPath = str | PathLike[str]

# Labels with this value are ignored by the losses (the ``F.cross_entropy`` default).
IGNORE_INDEX = -100

# Special tokens of the original BERT vocabulary, in the order they get ids 0..4 here.
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")

_SINGLE_DOCUMENT = (
    "the {what} has a single document; next sentence prediction needs at least two documents "
    "(separated by a blank line) to draw a random next segment from another document"
)

# End of a sentence: whitespace after ".", "!" or "?", or after one of them followed by one
# closing quote or bracket. Two fixed-width lookbehinds because ``re`` has no variable-width
# lookbehind; keeping the split in lookbehinds leaves the punctuation in the sentence.
_SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"'\u201d\u2019)\]]))\s+")


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------


def _bert_pipeline(lowercase: bool, vocab: dict[str, int] | None = None) -> Tokenizer:
    """A WordPiece tokenizer with BERT's normaliser, pre-tokeniser and decoder.

    Args:
        lowercase: Lowercase and strip accents.
        vocab: Token -> id of a trained model; None: an empty model to train.
    """
    model = (
        models.WordPiece(vocab, unk_token="[UNK]", continuing_subword_prefix="##")
        if vocab is not None
        else models.WordPiece(unk_token="[UNK]", continuing_subword_prefix="##")
    )
    tokenizer = Tokenizer(model)
    tokenizer.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=lowercase, lowercase=lowercase
    )
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    return tokenizer


def _trained_vocab(
    paths: Sequence[Path],
    vocab_size: int,
    lowercase: bool,
    min_frequency: int,
    pinned: Sequence[str],
) -> dict[str, int]:
    """Runs the ``tokenizers`` WordPiece trainer; returns the model's token -> id.

    ``pinned`` tokens are passed as the trainer's special tokens: they get ids ``0, 1, ...`` in
    the given order, before the alphabet and the merges.
    """
    tokenizer = _bert_pipeline(lowercase)
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(pinned),
        continuing_subword_prefix="##",
        show_progress=False,
    )
    tokenizer.train([str(p) for p in paths], trainer)
    return tokenizer.get_vocab(with_added_tokens=False)


def _continuation_characters(vocab: dict[str, int]) -> list[str]:
    """The single-character continuation pieces (``##c``) of ``vocab``, sorted."""
    return sorted(t for t in vocab if len(t) == 3 and t.startswith("##"))


def train_wordpiece(
    files: Sequence[StrPath],
    vocab_size: int,
    path: StrPath | None = None,
    lowercase: bool = True,
    min_frequency: int = 2,
) -> Tokenizer:
    """Trains a BERT WordPiece tokenizer on local text files, the same in every process.

    The pipeline is that of the original BERT (Devlin et al., 2018, section 3): the BERT
    normaliser (clean control characters, split CJK characters, lowercase and strip accents
    when ``lowercase``), the BERT pre-tokeniser (whitespace and punctuation), a WordPiece model
    with ``##`` continuation prefix and ``[UNK]``, and a post-processor that wraps single
    sequences as ``[CLS] A [SEP]`` and pairs as ``[CLS] A [SEP] B [SEP]`` with segment ids 0/1.

    **Determinism.** The ``tokenizers`` trainer numbers the single-character continuation
    pieces (``##c``) in the iteration order of a randomly seeded hash map, and breaks ties
    between equally frequent merges by those numbers; two processes therefore learn different
    vocabularies from the same files (different ids, and different tokens at the size limit).
    Here a first pass without merges collects those pieces, and the real pass pins them, sorted,
    right after the special tokens, so that nothing depends on hash order: the same files and
    arguments give the same vocabulary (ids included) in every process. This reads the files
    twice.

    Args:
        files: Text files to learn the vocabulary from.
        vocab_size: Target vocabulary size, special tokens and the alphabet included.
        path: If given, the tokenizer is also saved there as JSON (see :func:`load_tokenizer`).
        lowercase: Uncased model (lowercase and strip accents), as BERT-Base uncased.
        min_frequency: Minimum count for a merge to enter the vocabulary.

    Returns:
        The trained ``tokenizers.Tokenizer``; ``[PAD] [UNK] [CLS] [SEP] [MASK]`` have ids 0..4.

    Raises:
        ValueError: If ``files`` is empty, ``vocab_size`` is too small, or the files contain no
            text.
        FileNotFoundError: If a file does not exist.
    """
    paths = _existing_files(files)
    if vocab_size <= len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must exceed {len(SPECIAL_TOKENS)}, got {vocab_size}")
    # Pass 1, no merges: the special tokens, the alphabet and its continuation pieces.
    alphabet = _trained_vocab(paths, len(SPECIAL_TOKENS) + 1, lowercase, min_frequency,
                              SPECIAL_TOKENS)  # fmt: skip
    if len(alphabet) <= len(SPECIAL_TOKENS):
        raise ValueError(f"no text to train a tokenizer on in {[str(p) for p in paths]}")
    pinned = [*SPECIAL_TOKENS, *_continuation_characters(alphabet)]
    vocab = _trained_vocab(paths, vocab_size, lowercase, min_frequency, pinned)
    tokenizer = _bert_pipeline(lowercase, vocab)
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tokenizer.save(str(path))
    return tokenizer


def load_tokenizer(path: StrPath) -> Tokenizer:
    """Loads a tokenizer saved by :func:`train_wordpiece` (or any ``tokenizers`` JSON file).

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: If the tokenizer lacks one of the BERT special tokens.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"tokenizer file {path} does not exist")
    tokenizer = Tokenizer.from_file(str(path))
    BertVocab.from_tokenizer(tokenizer)  # Fails early, naming the missing special token.
    return tokenizer


@dataclass(frozen=True)
class BertVocab:
    """What masking and batching need to know about a WordPiece vocabulary.

    Attributes:
        size: Number of ids ``V``.
        pad_id, unk_id, cls_id, sep_id, mask_id: Ids of the special tokens.
        is_special: ``[V]`` bool, true for the five special tokens (never masked).
        is_continuation: ``[V]`` bool, true for ``##`` pieces that continue the previous word.
        random_ids: ``[R]`` ids a masked piece may be replaced by: every non-special token.
    """

    size: int
    pad_id: int
    unk_id: int
    cls_id: int
    sep_id: int
    mask_id: int
    is_special: Tensor
    is_continuation: Tensor
    random_ids: Tensor

    @classmethod
    def from_tokenizer(cls, tokenizer: Tokenizer, prefix: str = "##") -> BertVocab:
        """Builds the lookup tables from a WordPiece ``tokenizer``.

        Raises:
            ValueError: If a special token of :data:`SPECIAL_TOKENS` is missing.
        """
        ids: dict[str, int] = {}
        for token in SPECIAL_TOKENS:
            idx = tokenizer.token_to_id(token)
            if idx is None:
                raise ValueError(f"tokenizer has no {token} token; train it with train_wordpiece")
            ids[token] = idx
        vocab = tokenizer.get_vocab()  # token -> id
        size = max(vocab.values()) + 1
        is_special = torch.zeros(size, dtype=torch.bool)
        is_special[list(ids.values())] = True
        is_continuation = torch.zeros(size, dtype=torch.bool)
        continuation = [i for tok, i in vocab.items() if tok.startswith(prefix) and len(tok) > 2]
        is_continuation[continuation] = True
        return cls(
            size=size,
            pad_id=ids["[PAD]"],
            unk_id=ids["[UNK]"],
            cls_id=ids["[CLS]"],
            sep_id=ids["[SEP]"],
            mask_id=ids["[MASK]"],
            is_special=is_special,
            is_continuation=is_continuation,
            random_ids=(~is_special).nonzero().flatten(),
        )


# --------------------------------------------------------------------------------------------
# Corpus: documents and sentences
# --------------------------------------------------------------------------------------------


def split_sentences(text: str) -> list[str]:
    """Splits ``text`` at whitespace after ``.``/``!``/``?`` (or after one plus a closing quote).

    A simple rule rather than a trained splitter: abbreviations ("e.g. this") also end a
    sentence, and text without terminal punctuation is one sentence. Empty pieces are dropped.
    """
    return [s.strip() for s in _SENTENCE_END.split(text) if s.strip()]


def read_documents(files: Sequence[StrPath]) -> list[list[str]]:
    """Reads documents (lists of sentences) from text files.

    Documents are separated by blank (empty or whitespace-only) lines and never span files;
    the lines of a document are joined with spaces and split by :func:`split_sentences`, so
    both one-sentence-per-line files (the original BERT format) and wrapped prose work.

    Raises:
        ValueError: If ``files`` is empty or contains no text at all.
        FileNotFoundError: If a file does not exist.
    """
    documents: list[list[str]] = []
    for path in _existing_files(files):
        text = path.read_text(encoding="utf-8", errors="replace")
        for block in re.split(r"\n[ \t\r\f\v]*\n", text):
            sentences = split_sentences(" ".join(block.split("\n")))
            if sentences:
                documents.append(sentences)
    if not documents:
        raise ValueError(f"the corpus {[str(f) for f in files]} is empty: it contains no text")
    return documents


@dataclass(frozen=True)
class TokenizedDocuments:
    """Documents as one flat array of wordpiece ids plus sentence and document boundaries.

    One ``int32`` tensor (instead of nested Python lists) keeps a large corpus compact; a run of
    consecutive sentences ``[i, j)`` is the slice ``tokens[sentence_starts[i]:
    sentence_starts[j]]``.

    Attributes:
        tokens: ``[N]`` int32 wordpiece ids of all sentences, no special tokens.
        sentence_starts: ``S + 1`` offsets into ``tokens``; sentence ``i`` is
            ``tokens[sentence_starts[i]:sentence_starts[i + 1]]``.
        document_starts: ``D + 1`` offsets into the sentences; document ``d`` has sentences
            ``document_starts[d]`` to ``document_starts[d + 1] - 1``.
    """

    tokens: Tensor
    sentence_starts: list[int]
    document_starts: list[int]

    @property
    def num_documents(self) -> int:
        """Number of documents ``D``."""
        return len(self.document_starts) - 1

    @property
    def num_sentences(self) -> int:
        """Number of sentences ``S``."""
        return len(self.sentence_starts) - 1

    def run(self, first: int, end: int) -> Tensor:
        """Token ids of sentences ``first`` to ``end - 1`` concatenated, shape ``[n]``."""
        return self.tokens[self.sentence_starts[first] : self.sentence_starts[end]]

    def num_tokens(self, first: int, end: int) -> int:
        """Number of tokens of sentences ``first`` to ``end - 1``."""
        return self.sentence_starts[end] - self.sentence_starts[first]

    def document_of(self, sentence: int) -> int:
        """Index of the document that contains sentence ``sentence``."""
        return bisect.bisect_right(self.document_starts, sentence) - 1


def tokenize_documents(
    documents: Sequence[Sequence[str]], tokenizer: Tokenizer
) -> TokenizedDocuments:
    """Tokenizes documents of sentences (no special tokens) into :class:`TokenizedDocuments`.

    Sentences that tokenize to nothing and documents left without sentences are dropped.
    """
    flat = [s for doc in documents for s in doc]
    # encode_batch runs in parallel in Rust; far faster than encoding sentence by sentence.
    encodings = tokenizer.encode_batch(flat, add_special_tokens=False) if flat else []
    pieces: list[list[int]] = []
    sentence_starts, document_starts = [0], [0]
    k = 0
    for doc in documents:
        kept = 0
        for _ in doc:
            ids = encodings[k].ids
            k += 1
            if ids:
                pieces.append(ids)
                sentence_starts.append(sentence_starts[-1] + len(ids))
                kept += 1
        if kept:
            document_starts.append(document_starts[-1] + kept)
    tokens = torch.tensor([i for ids in pieces for i in ids], dtype=torch.int32)
    return TokenizedDocuments(tokens, sentence_starts, document_starts)


# --------------------------------------------------------------------------------------------
# Sentence pairs for next sentence prediction
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SentencePair:
    """One NSP example before masking.

    Attributes:
        a: ``[La]`` ids of segment A (no special tokens).
        b: ``[Lb]`` ids of segment B.
        is_random: ``nsp_label`` is 1 (B from another document) if true, else 0 (B follows A).
        doc_a: Index of the document A comes from (within its split).
        doc_b: Index of the document B comes from (``!= doc_a`` exactly when ``is_random``).
    """

    a: Tensor
    b: Tensor
    is_random: bool
    doc_a: int
    doc_b: int

    @property
    def nsp_label(self) -> int:
        """1 if B is a random segment (*NotNext*), 0 if it is the actual next one (*IsNext*)."""
        return int(self.is_random)


def _randint(high: int, generator: torch.Generator) -> int:
    """Uniform integer in ``[0, high)`` from ``generator``."""
    return int(torch.randint(high, (), generator=generator))


def _uniform(generator: torch.Generator) -> float:
    """Uniform float in ``[0, 1)`` from ``generator``."""
    return float(torch.rand((), generator=generator))


def _grow_run(
    docs: TokenizedDocuments, first: int, end_limit: int, min_end: int, target: int
) -> int:
    """End (exclusive) of a run of sentences starting at ``first``.

    The run reaches at least ``min_end``, then grows sentence by sentence while it has fewer
    than ``target`` tokens and stays before ``end_limit`` (the end of the document).
    """
    end = min_end
    while end < end_limit and docs.num_tokens(first, end) < target:
        end += 1
    return end


def _truncate_pair(
    a: Tensor, b: Tensor, budget: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Truncates A and B to at most ``budget`` tokens together, like BERT's ``truncate_seq_pair``.

    The reference removes one token at a time from the longer segment, from its front or back
    with probability 1/2 each. The final lengths of that process are deterministic, and the
    number of front removals of a segment is Binomial(removed, 1/2), so both are drawn directly.
    """
    la, lb = len(a), len(b)
    if la + lb <= budget:
        return a, b
    long_is_a = la > lb
    short = min(la, lb)
    keep_long = max(budget - short, math.ceil(budget / 2))
    keep_short = budget - keep_long
    keep_a, keep_b = (keep_long, keep_short) if long_is_a else (keep_short, keep_long)
    return _trim(a, keep_a, generator), _trim(b, keep_b, generator)


def _trim(x: Tensor, keep: int, generator: torch.Generator) -> Tensor:
    """Keeps ``keep`` tokens of ``x``, dropping a Binomial(n, 1/2) share of the rest in front."""
    removed = len(x) - keep
    if removed <= 0:
        return x
    count = torch.tensor(float(removed))
    front = int(torch.binomial(count, torch.tensor(0.5), generator=generator))
    return x[front : front + keep]


def sample_pair(
    docs: TokenizedDocuments,
    generator: torch.Generator,
    max_seq_len: int = 128,
    short_seq_prob: float = 0.1,
    eligible: Tensor | None = None,
) -> SentencePair:
    """Samples one NSP sentence pair (see the module docstring for the procedure).

    As in the reference ``create_instances_from_document``, a chunk of consecutive sentences
    filling the token budget (``max_seq_len - 3``, or with probability ``short_seq_prob`` a
    random shorter target) is split at a random sentence boundary into A and the actual next
    segment; with probability 1/2 the latter is replaced by a run of sentences starting at a
    random sentence of a random *other* document. The start sentence is uniform over all
    sentences that have a successor in their document, so long documents are sampled more.

    Args:
        docs: The tokenized documents; at least two, one with at least two sentences.
        generator: Source of all randomness.
        max_seq_len: Length limit including ``[CLS]``, ``[SEP]`` and ``[SEP]``.
        short_seq_prob: Probability of a shorter target length.
        eligible: Precomputed :func:`_eligible_starts` of ``docs`` (recomputed if None).

    Returns:
        A :class:`SentencePair` with ``len(a) + len(b) <= max_seq_len - 3``, both non-empty.
    """
    budget = max_seq_len - 3
    if eligible is None:
        eligible = _eligible_starts(docs)
    target = budget
    if _uniform(generator) < short_seq_prob:
        target = 2 + _randint(budget - 1, generator)  # uniform in [2, budget]
    first = int(eligible[_randint(len(eligible), generator)])
    doc = docs.document_of(first)
    doc_end = docs.document_starts[doc + 1]
    end = _grow_run(docs, first, doc_end, first + 2, target)
    split = first + 1 + _randint(end - first - 1, generator)  # A is [first, split)
    a = docs.run(first, split)
    if _uniform(generator) < 0.5:
        other = _randint(docs.num_documents - 1, generator)
        other += int(other >= doc)  # uniform over the documents other than `doc`
        lo, hi = docs.document_starts[other], docs.document_starts[other + 1]
        start = lo + _randint(hi - lo, generator)
        stop = _grow_run(docs, start, hi, start + 1, target - len(a))
        b, is_random, doc_b = docs.run(start, stop), True, other
    else:
        b, is_random, doc_b = docs.run(split, end), False, doc
    a, b = _truncate_pair(a, b, budget, generator)
    return SentencePair(a, b, is_random, doc, doc_b)


def _eligible_starts(docs: TokenizedDocuments) -> Tensor:
    """``[E]`` indices of the sentences that are followed by another in the same document."""
    starts = [
        s
        for d in range(docs.num_documents)
        for s in range(docs.document_starts[d], docs.document_starts[d + 1] - 1)
    ]
    return torch.tensor(starts, dtype=torch.long)


def _check_pairable(docs: TokenizedDocuments, what: str) -> None:
    """Raises ``ValueError`` unless NSP pairs (both kinds) can be drawn from ``docs``."""
    if docs.num_documents == 0:
        raise ValueError(f"the {what} is empty: it contains no tokens")
    if docs.num_documents < 2:
        raise ValueError(_SINGLE_DOCUMENT.format(what=what))
    if docs.num_sentences == docs.num_documents:
        raise ValueError(
            f"no document of the {what} has two sentences, so no actual next sentence exists"
        )


# --------------------------------------------------------------------------------------------
# Batching and whole word masking
# --------------------------------------------------------------------------------------------


@dataclass
class BertBatch:
    """A padded batch for :class:`~alwayssparse.models.bert.BertForPreTraining`.

    Attributes:
        input_ids: ``[B, T]`` ids after masking, padded with ``[PAD]``.
        token_type_ids: ``[B, T]`` 0 for ``[CLS] A [SEP]`` and padding, 1 for ``B [SEP]``.
        attention_mask: ``[B, T]`` 1 for real tokens, 0 for padding.
        mlm_labels: ``[B, T]`` original ids at the chosen positions, ``-100`` elsewhere.
        nsp_labels: ``[B]`` 0 = B follows A, 1 = B is random.
    """

    input_ids: Tensor
    token_type_ids: Tensor
    attention_mask: Tensor
    mlm_labels: Tensor
    nsp_labels: Tensor

    def to(self, device: torch.device | str) -> BertBatch:
        """Returns a copy with every tensor on ``device``."""
        return BertBatch(
            self.input_ids.to(device),
            self.token_type_ids.to(device),
            self.attention_mask.to(device),
            self.mlm_labels.to(device),
            self.nsp_labels.to(device),
        )

    def as_kwargs(self) -> dict[str, Tensor]:
        """The batch as keyword arguments of ``BertForPreTraining.forward``."""
        return {
            "input_ids": self.input_ids,
            "token_type_ids": self.token_type_ids,
            "attention_mask": self.attention_mask,
            "mlm_labels": self.mlm_labels,
            "nsp_labels": self.nsp_labels,
        }


def collate_pairs(
    pairs: Sequence[SentencePair], vocab: BertVocab, pad_to: int | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Packs pairs as ``[CLS] A [SEP] B [SEP]`` and pads them (no masking yet).

    Args:
        pairs: The examples.
        vocab: Provides the special token ids.
        pad_to: Pad to this length (e.g. ``max_seq_len`` for static shapes); by default to the
            longest sequence of the batch.

    Returns:
        ``input_ids``, ``token_type_ids`` and ``attention_mask``, each ``[B, T]`` int64.
    """
    lengths = [len(p.a) + len(p.b) + 3 for p in pairs]
    t = max(lengths) if pad_to is None else pad_to
    if max(lengths) > t:
        raise ValueError(f"a pair of length {max(lengths)} does not fit pad_to={t}")
    input_ids = torch.full((len(pairs), t), vocab.pad_id, dtype=torch.long)
    token_type_ids = torch.zeros((len(pairs), t), dtype=torch.long)
    attention_mask = torch.zeros((len(pairs), t), dtype=torch.long)
    cls_, sep = torch.tensor([vocab.cls_id]), torch.tensor([vocab.sep_id])
    for row, (pair, n) in enumerate(zip(pairs, lengths, strict=True)):
        seq = torch.cat([cls_, pair.a.long(), sep, pair.b.long(), sep])  # [n]
        input_ids[row, :n] = seq
        token_type_ids[row, len(pair.a) + 2 : n] = 1  # B and its closing [SEP]
        attention_mask[row, :n] = 1
    return input_ids, token_type_ids, attention_mask


def _word_ids(input_ids: Tensor, vocab: BertVocab) -> tuple[Tensor, Tensor, Tensor]:
    """Groups wordpieces into words.

    A word starts at every non-special piece that is not a ``##`` continuation, or that follows
    a special token (a stray continuation piece at a segment start is its own word).

    Returns:
        ``maskable`` ``[B, T]`` bool (non-special pieces), ``word_id`` ``[B, T]`` long (index of
        the word of each piece within its row; meaningless where not maskable) and
        ``num_words`` ``[B]``.
    """
    special = vocab.is_special.to(input_ids.device)[input_ids]  # [B, T]
    continuation = vocab.is_continuation.to(input_ids.device)[input_ids]  # [B, T]
    prev_special = F.pad(special, (1, 0), value=True)[:, :-1]  # [B, T], shifted right
    starts = ~special & (~continuation | prev_special)  # [B, T]
    word_id = starts.long().cumsum(dim=1) - 1  # [B, T]
    return ~special, word_id.clamp(min=0), starts.sum(dim=1)


def whole_word_mask(
    input_ids: Tensor,
    vocab: BertVocab,
    generator: torch.Generator,
    mask_prob: float = 0.15,
    replace_prob: float = 0.8,
    random_prob: float = 0.1,
) -> tuple[Tensor, Tensor]:
    """Whole word masking (reference BERT ``create_masked_lm_predictions``, WWM variant).

    In each row, ``max(1, round(mask_prob * num_words))`` words are chosen uniformly without
    replacement (the reference counts in tokens; counting words is what "15% of words" means
    here). Every piece of a chosen word gets a label and, independently per piece as in the
    reference, becomes ``[MASK]`` with probability ``replace_prob``, a uniformly random
    non-special token with probability ``random_prob``, and stays unchanged otherwise.

    Args:
        input_ids: ``[B, T]`` ids including ``[CLS]``/``[SEP]``/``[PAD]`` (never chosen).
        vocab: Special-token and continuation tables.
        generator: Source of randomness (on the device of ``input_ids``).
        mask_prob: Fraction of words to predict.
        replace_prob: Probability that a chosen piece becomes ``[MASK]``.
        random_prob: Probability that a chosen piece becomes a random token.

    Returns:
        ``(masked_ids, labels)``, both ``[B, T]``: the corrupted input and the original ids at
        the chosen pieces with ``-100`` elsewhere.
    """
    maskable, word_id, num_words = _word_ids(input_ids, vocab)
    b, t = input_ids.shape
    device = input_ids.device
    # Rank words by random scores; slots beyond a row's word count score 2 (> any rand) so
    # they rank last and are never chosen.
    scores = torch.rand((b, t), generator=generator, device=device)  # [B, W=T]
    slots = torch.arange(t, device=device)  # [W]
    scores = scores.masked_fill(slots[None, :] >= num_words[:, None], 2.0)
    rank = scores.argsort(dim=1).argsort(dim=1)  # [B, W], 0 = lowest score
    k = (num_words.double() * mask_prob).round().long().clamp(min=1)  # [B]
    chosen_word = rank < k[:, None]  # [B, W]
    chosen = chosen_word.gather(1, word_id) & maskable  # [B, T]
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    u = torch.rand((b, t), generator=generator, device=device)  # [B, T]
    to_mask = chosen & (u < replace_prob)
    to_random = chosen & (u >= replace_prob) & (u < replace_prob + random_prob)
    random_ids = vocab.random_ids.to(device)
    pick = torch.randint(len(random_ids), (b, t), generator=generator, device=device)
    masked = torch.where(to_mask, torch.full_like(input_ids, vocab.mask_id), input_ids)
    masked = torch.where(to_random, random_ids[pick], masked)
    return masked, labels


# --------------------------------------------------------------------------------------------
# The data set
# --------------------------------------------------------------------------------------------


class BertPretrainingData:
    """MLM + NSP batches from a text corpus, with a held-out split of whole documents.

    Documents are shuffled with ``split_seed`` and the last ``heldout_fraction`` of them (at
    least two, so that random next segments exist) form the held-out split. Random next
    segments are drawn from the same split, so held-out examples never contain training text.

    Example:
        >>> tok = train_wordpiece(["corpus.txt"], vocab_size=8000, path="wp.json")
        >>> data = BertPretrainingData.from_files(["corpus.txt"], tok)
        >>> gen = torch.Generator().manual_seed(0)
        >>> batch = data.batch(32, gen)  # BertBatch, T <= 128
        >>> out = model(**batch.as_kwargs())

    Attributes:
        vocab: The :class:`BertVocab` of the tokenizer.
        train: Tokenized training documents.
        heldout: Tokenized held-out documents, or None when ``heldout_fraction`` is 0.
        max_seq_len: Sequence length including ``[CLS]``/``[SEP]``/``[SEP]`` (128 in the paper).
    """

    def __init__(
        self,
        documents: Sequence[Sequence[str]],
        tokenizer: Tokenizer,
        max_seq_len: int = 128,
        heldout_fraction: float = 0.05,
        mask_prob: float = 0.15,
        short_seq_prob: float = 0.1,
        split_seed: int = 0,
    ) -> None:
        """Tokenizes and splits the documents.

        Args:
            documents: Documents as lists of sentences (see :func:`read_documents`).
            tokenizer: A WordPiece tokenizer from :func:`train_wordpiece`/:func:`load_tokenizer`.
            max_seq_len: Length limit including the three special tokens; at least 5.
            heldout_fraction: Share of documents held out, in ``[0, 1)``.
            mask_prob: Fraction of words chosen for MLM.
            short_seq_prob: Probability of a shorter target length (reference default 0.1).
            split_seed: Seed of the document shuffle that defines the split.

        Raises:
            ValueError: If an argument is out of range, the corpus is empty, has a single
                document, or a split cannot provide both kinds of NSP pair.
        """
        if max_seq_len < 5:
            raise ValueError(f"max_seq_len must be at least 5, got {max_seq_len}")
        if not 0.0 <= heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
        if not 0.0 < mask_prob <= 1.0:
            raise ValueError(f"mask_prob must be in (0, 1], got {mask_prob}")
        self.vocab = BertVocab.from_tokenizer(tokenizer)
        self.max_seq_len = max_seq_len
        self.mask_prob = mask_prob
        self.short_seq_prob = short_seq_prob
        docs = [d for d in documents if any(s.strip() for s in d)]
        # Checked on the raw documents first so that the error names the corpus, not a split.
        if not docs:
            raise ValueError("the corpus is empty: it contains no text")
        if len(docs) == 1:
            raise ValueError(_SINGLE_DOCUMENT.format(what="corpus"))
        train_docs, heldout_docs = _split_documents(docs, heldout_fraction, split_seed)
        self.train = tokenize_documents(train_docs, tokenizer)
        _check_pairable(self.train, "training split")
        self.heldout = tokenize_documents(heldout_docs, tokenizer) if heldout_docs else None
        if self.heldout is not None:
            _check_pairable(self.heldout, "held-out split")
        self._eligible = {"train": _eligible_starts(self.train)}
        if self.heldout is not None:
            self._eligible["heldout"] = _eligible_starts(self.heldout)

    @classmethod
    def from_files(
        cls, files: Sequence[StrPath], tokenizer: Tokenizer, **kwargs: object
    ) -> BertPretrainingData:
        """Reads documents with :func:`read_documents`; ``kwargs`` go to the constructor.

        Raises:
            FileNotFoundError: If a file does not exist.
            ValueError: As :func:`read_documents` and the constructor.
        """
        return cls(read_documents(files), tokenizer, **kwargs)  # type: ignore[arg-type]

    def split(self, name: str) -> TokenizedDocuments:
        """The ``"train"`` or ``"heldout"`` documents.

        Raises:
            ValueError: For another name, or ``"heldout"`` when nothing was held out.
        """
        if name == "train":
            return self.train
        if name == "heldout":
            if self.heldout is None:
                raise ValueError("no held-out split: heldout_fraction was 0")
            return self.heldout
        raise ValueError(f"split must be 'train' or 'heldout', got {name!r}")

    def sample_pairs(
        self, n: int, generator: torch.Generator, split: str = "train"
    ) -> list[SentencePair]:
        """Draws ``n`` NSP sentence pairs from ``split`` (see :func:`sample_pair`)."""
        docs = self.split(split)
        eligible = self._eligible[split]
        return [
            sample_pair(docs, generator, self.max_seq_len, self.short_seq_prob, eligible)
            for _ in range(n)
        ]

    def batch(
        self,
        batch_size: int,
        generator: torch.Generator,
        split: str = "train",
        pad_to_max: bool = False,
    ) -> BertBatch:
        """Draws a masked, padded batch of ``batch_size`` examples from ``split``.

        Args:
            batch_size: Number of sequences ``B``.
            generator: CPU generator; the batch is a deterministic function of its state.
            split: ``"train"`` or ``"heldout"``.
            pad_to_max: Pad to ``max_seq_len`` (static shapes) instead of the longest sequence.
        """
        pairs = self.sample_pairs(batch_size, generator, split)
        pad_to = self.max_seq_len if pad_to_max else None
        input_ids, token_type_ids, attention_mask = collate_pairs(pairs, self.vocab, pad_to)
        masked, labels = whole_word_mask(input_ids, self.vocab, generator, self.mask_prob)
        nsp = torch.tensor([p.nsp_label for p in pairs], dtype=torch.long)
        return BertBatch(masked, token_type_ids, attention_mask, labels, nsp)

    def heldout_batches(self, batch_size: int, num_batches: int, seed: int = 0) -> list[BertBatch]:
        """A fixed list of held-out batches: the same for the same ``seed``, for evaluation."""
        generator = torch.Generator().manual_seed(seed)
        return [self.batch(batch_size, generator, "heldout") for _ in range(num_batches)]


def _split_documents(
    documents: Sequence[Sequence[str]], heldout_fraction: float, seed: int
) -> tuple[list[Sequence[str]], list[Sequence[str]]]:
    """Shuffles documents with ``seed``; returns (train, held-out), held-out at least 2 if any."""
    if heldout_fraction == 0.0:
        return list(documents), []
    order = torch.randperm(len(documents), generator=torch.Generator().manual_seed(seed))
    n_heldout = max(2, round(heldout_fraction * len(documents)))
    if len(documents) - n_heldout < 2:
        raise ValueError(
            f"{len(documents)} documents are too few for a held-out split of {heldout_fraction}: "
            "each split needs at least two documents; add documents or set heldout_fraction=0"
        )
    shuffled = [documents[i] for i in order.tolist()]
    return shuffled[n_heldout:], shuffled[:n_heldout]


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BertEvalResult:
    """Held-out pre-training metrics (the MLM and NSP losses reported in dynsparse-bert.md).

    Attributes:
        mlm_loss: Cross-entropy per predicted token, averaged over all labelled tokens.
        nsp_loss: Cross-entropy per example.
        mlm_accuracy: Fraction of labelled tokens predicted exactly.
        nsp_accuracy: Fraction of examples whose NSP class is right.
    """

    mlm_loss: float
    nsp_loss: float
    mlm_accuracy: float
    nsp_accuracy: float


@torch.no_grad()
def pretraining_sums(model: nn.Module, batches: Iterable[BertBatch]) -> Tensor:
    """Summed held-out statistics of a :class:`~alwayssparse.models.bert.BertForPreTraining`.

    Returns:
        A float64 ``[6]`` tensor: MLM loss, MLM hits, NSP loss, NSP hits (all summed), labelled
        tokens, labelled examples. Sums over disjoint sets of batches add up, so shards of an
        evaluation can be summed across processes before :func:`eval_result` divides.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    sums = torch.zeros(6, dtype=torch.float64)
    try:
        for batch in batches:
            batch = batch.to(device)
            out = model(batch.input_ids, batch.token_type_ids, batch.attention_mask)
            sums[:4] += _eval_sums(
                out.mlm_logits, batch.mlm_labels, out.nsp_logits, batch.nsp_labels
            )
            sums[4] += int((batch.mlm_labels != IGNORE_INDEX).sum())
            sums[5] += int((batch.nsp_labels != IGNORE_INDEX).sum())
    finally:
        model.train(was_training)
    return sums


def eval_result(sums: Tensor) -> BertEvalResult:
    """The metrics of :func:`pretraining_sums` (possibly summed over processes).

    Raises:
        ValueError: If the sums cover no labelled token or no example.
    """
    mlm_loss, mlm_correct, nsp_loss, nsp_correct, tokens, examples = sums.tolist()
    if tokens == 0 or examples == 0:
        raise ValueError("no labelled tokens or examples to evaluate on")
    return BertEvalResult(
        mlm_loss / tokens, nsp_loss / examples, mlm_correct / tokens, nsp_correct / examples
    )


def evaluate_pretraining(model: nn.Module, batches: Iterable[BertBatch]) -> BertEvalResult:
    """Evaluates a :class:`~alwayssparse.models.bert.BertForPreTraining` on fixed batches.

    Token- and example-weighted over all batches (not a mean of batch means), in eval mode;
    the previous train/eval mode is restored afterwards.

    Raises:
        ValueError: If the batches contain no labelled token or no example.
    """
    return eval_result(pretraining_sums(model, batches))


def _eval_sums(
    mlm_logits: Tensor, mlm_labels: Tensor, nsp_logits: Tensor, nsp_labels: Tensor
) -> Tensor:
    """Summed MLM loss, MLM hits, NSP loss and NSP hits of one batch, as a ``[4]`` tensor."""
    v = mlm_logits.shape[-1]
    logits, labels = mlm_logits.reshape(-1, v).float(), mlm_labels.reshape(-1)  # [N, V], [N]
    keep = labels != IGNORE_INDEX
    mlm = F.cross_entropy(logits[keep], labels[keep], reduction="sum")
    mlm_hits = (logits[keep].argmax(-1) == labels[keep]).sum()
    nsp_keep = nsp_labels != IGNORE_INDEX
    nsp = F.cross_entropy(nsp_logits[nsp_keep].float(), nsp_labels[nsp_keep], reduction="sum")
    nsp_hits = (nsp_logits[nsp_keep].argmax(-1) == nsp_labels[nsp_keep]).sum()
    return torch.stack([mlm, mlm_hits, nsp, nsp_hits]).double().cpu()


def _existing_files(files: Sequence[StrPath]) -> list[Path]:
    """Checks that ``files`` is non-empty and that every file exists; returns them as Paths."""
    if isinstance(files, str | PathLike):
        files = [files]  # A single path is a common slip; accept it rather than iterate chars.
    if not files:
        raise ValueError("no corpus files given")
    paths = [Path(f) for f in files]
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"corpus file {path} does not exist")
    return paths
