"""Choosing a byte-level corpus from a config."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from alwayssparse.data.bytes import (
    ENWIK8_SPLIT,
    ByteSplits,
    load_default_corpus,
    load_enwik8,
    load_text_files,
)

CORPORA = ("pystdlib", "text", "enwik8")


@dataclass
class ByteDataConfig:
    """Which byte corpus to train on.

    Attributes:
        name: ``"pystdlib"`` (the default corpus: this Python's standard-library sources, present
            on every machine, no download), ``"text"`` (any files or directories in ``paths``),
            or ``"enwik8"`` (``paths[0]`` is the raw ``enwik8`` file or ``enwik8.zip``).
        paths: Input files for ``text`` and ``enwik8``.
        max_bytes: Size cap of the ``pystdlib`` corpus.
        valid_fraction: Validation share for ``pystdlib`` and ``text`` (contiguous split).
        test_fraction: Test share for ``pystdlib`` and ``text``.
        enwik8_split: Byte sizes of train/valid/test for ``enwik8`` (standard: 90M/5M/5M).
    """

    name: str = "pystdlib"
    paths: list[str] = field(default_factory=list)
    max_bytes: int = 4_000_000
    valid_fraction: float = 0.05
    test_fraction: float = 0.05
    enwik8_split: list[int] = field(default_factory=lambda: list(ENWIK8_SPLIT))

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field if the configuration is invalid."""
        if self.name not in CORPORA:
            raise ValueError(f"data.name must be one of {list(CORPORA)}, got {self.name!r}")
        if self.name in ("text", "enwik8") and not self.paths:
            raise ValueError(f"data.paths is required for data.name={self.name!r}")
        if self.name == "enwik8" and len(self.paths) != 1:
            raise ValueError(f"data.paths must name one enwik8 file, got {self.paths}")
        if len(self.enwik8_split) != 3 or min(self.enwik8_split) <= 0:
            raise ValueError(
                f"data.enwik8_split must be three positive sizes, got {self.enwik8_split}"
            )
        for path in self.paths:
            if not Path(path).exists():
                raise ValueError(f"data.paths: {path} does not exist")


def load_byte_corpus(config: ByteDataConfig) -> ByteSplits:
    """Load the train/valid/test byte splits that ``config`` names."""
    config.validate()
    if config.name == "enwik8":
        a, b, c = config.enwik8_split
        return load_enwik8(config.paths[0], split_sizes=(a, b, c))
    if config.name == "text":
        return load_text_files(config.paths, config.valid_fraction, config.test_fraction)
    return load_default_corpus(config.max_bytes, config.valid_fraction, config.test_fraction)
