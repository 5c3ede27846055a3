"""Byte-level corpora, batching and bits-per-character evaluation."""

from alwayssparse.data.bytes import (
    DEFAULT_CORPUS_EXCLUDED_DIRS,
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
from alwayssparse.data.corpus import CORPORA, ByteDataConfig, load_byte_corpus

__all__ = [
    "CORPORA",
    "ByteDataConfig",
    "load_byte_corpus",
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
