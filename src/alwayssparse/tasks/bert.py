"""BERT pre-training: masked language modelling + next sentence prediction (dynsparse-bert.md).

Sentence pairs are drawn on the fly from the training documents with whole-word masking; the
WordPiece vocabulary is trained locally on the same corpus with ``tokenizers`` (or loaded from
``tokenizer``). Evaluation reports MLM and NSP loss on held-out documents.
"""

from __future__ import annotations

import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from alwayssparse.data.bert import (
    BertBatch,
    BertPretrainingData,
    evaluate_pretraining,
    load_tokenizer,
    read_documents,
    train_wordpiece,
)
from alwayssparse.models.bert import BertConfig, BertForPreTraining, bert_config
from alwayssparse.tasks.base import Task, register_task


def _tiny_bert() -> BertConfig:
    return bert_config("tiny", vocab_size=2000)


def _default_corpus_files(limit: int = 40) -> list[str]:
    """Text that exists on every machine: the first standard-library modules' sources."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return [str(p) for p in sorted(root.glob("*.py"))[:limit]]


@dataclass
class BertTaskConfig:
    """BERT pre-training task.

    Attributes:
        model: Encoder size (``bert_config("tiny" | "mini" | "small" | "medium" | "base")``).
        files: Text files (documents separated by blank lines); empty: the first 40 Python
            standard-library sources, so a run works with no data at hand.
        tokenizer: A saved WordPiece tokenizer (JSON); empty: train one on ``files``.
        max_seq_len: Sequence length (the paper: 128).
        heldout_fraction: Share of documents held out for evaluation.
        eval_batches: Held-out batches per evaluation.
    """

    model: BertConfig = field(default_factory=_tiny_bert)
    files: list[str] = field(default_factory=list)
    tokenizer: str = ""
    max_seq_len: int = 128
    heldout_fraction: float = 0.05
    eval_batches: int = 8

    def validate(self) -> None:
        self.model.validate()
        for path in [*self.files, *([self.tokenizer] if self.tokenizer else [])]:
            if not Path(path).exists():
                raise ValueError(f"bert: {path} does not exist")
        if not 5 <= self.max_seq_len <= self.model.max_position:
            raise ValueError(f"bert.max_seq_len must be in [5, {self.model.max_position}]")


@register_task
class BertTask(Task):
    """MLM + NSP loss; evaluation: held-out MLM and NSP loss."""

    name = "bert"
    unit = "sequences"
    metric = "mlm_loss"

    def __init__(self, config: BertTaskConfig, batch_size: int, device: torch.device) -> None:
        super().__init__(config, batch_size, device)
        files = config.files or _default_corpus_files()
        if config.tokenizer:
            tokenizer = load_tokenizer(config.tokenizer)
        else:
            tokenizer = train_wordpiece(files, vocab_size=config.model.vocab_size)
        if tokenizer.get_vocab_size() > config.model.vocab_size:
            raise ValueError(
                f"bert.model.vocab_size ({config.model.vocab_size}) is smaller than the "
                f"tokenizer's vocabulary ({tokenizer.get_vocab_size()})"
            )
        self.data = BertPretrainingData(read_documents(files), tokenizer,
                                        max_seq_len=config.max_seq_len,
                                        heldout_fraction=config.heldout_fraction)  # fmt: skip

    def describe_data(self) -> str:
        documents = len(self.data.train.document_starts) - 1
        return f"{documents} train documents (BERT sentence pairs)"

    def build_model(self) -> nn.Module:
        return BertForPreTraining(self.config.model)

    def train_batch(self, generator: torch.Generator) -> BertBatch:
        return self.data.batch(self.batch_size, generator).to(self.device)

    def loss(self, model: nn.Module, batch: BertBatch) -> Tensor:
        return model(**batch.as_kwargs()).loss

    def units(self, batch: BertBatch) -> int:
        return int(batch.input_ids.shape[0])

    def evaluate(self, model: nn.Module, split: str, max_batches: int | None) -> dict[str, float]:
        # One held-out set; "valid" and "test" use different draws of pairs from it.
        seed = 0 if split == "valid" else 1
        count = max_batches or self.config.eval_batches
        batches = [
            b.to(self.device) for b in self.data.heldout_batches(self.batch_size, count, seed)
        ]
        result = evaluate_pretraining(model, batches)
        return {
            "mlm_loss": result.mlm_loss,
            "nsp_loss": result.nsp_loss,
            "mlm_accuracy": result.mlm_accuracy,
            "nsp_accuracy": result.nsp_accuracy,
        }

    def state_dict(self) -> dict[str, Any]:
        return {}
