"""Byte-level language modelling with the small decoder-only Transformer (the quickstart)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from alwayssparse.data import ByteDataConfig, load_byte_corpus
from alwayssparse.data.bytes import nll_sums, random_batch
from alwayssparse.models import TransformerLM, TransformerLMConfig, lm_loss
from alwayssparse.tasks.base import Task, register_task


@dataclass
class LMConfig:
    """Byte-level LM: the model and the corpus.

    Attributes:
        model: The decoder-only Transformer.
        data: The byte corpus (default: the Python standard-library sources, no download).
    """

    model: TransformerLMConfig = field(default_factory=TransformerLMConfig)
    data: ByteDataConfig = field(default_factory=ByteDataConfig)

    def validate(self) -> None:
        self.model.validate()
        self.data.validate()


@register_task
class ByteLMTask(Task):
    """Next-byte prediction on random windows; evaluation in bits per character."""

    name = "lm"
    unit = "tokens"
    metric = "bpc"

    def __init__(
        self,
        config: LMConfig,
        batch_size: int,
        device: torch.device,
        *,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        super().__init__(config, batch_size, device, rank=rank, world_size=world_size)
        self.splits = load_byte_corpus(config.data)

    def describe_data(self) -> str:
        return f"{self.config.data.name}: {self.splits.describe()}"

    def build_model(self) -> nn.Module:
        return TransformerLM(self.config.model)

    def train_batch(self, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        x, y = random_batch(
            self.splits.train, self.batch_size, self.config.model.context, generator
        )  # the global batch: every rank makes the same draws
        rows = self.local_rows
        return x[rows].to(self.device), y[rows].to(self.device)

    def loss(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        # Every shard has as many tokens: the mean over ranks of shard means is the global mean.
        x, y = batch
        return lm_loss(model(x), y)

    def units(self, batch: tuple[Tensor, Tensor]) -> int:
        return batch[0].numel()

    def evaluate(self, model: nn.Module, split: str, max_batches: int | None) -> dict[str, float]:
        data = self.splits.valid if split == "valid" else self.splits.test
        nats, count = nll_sums(model, data, self.batch_size, self.config.model.context,
                               max_batches=max_batches, device=self.device, rank=self.rank,
                               world_size=self.world_size)  # fmt: skip
        total_nats, total = self.reduce_sum(torch.tensor([nats, count], dtype=torch.float64))
        if total == 0:
            raise ValueError(f"nothing to evaluate on {split} with max_batches={max_batches}")
        nll = float(total_nats / total)
        return {"bpc": nll / math.log(2), "nll": nll}
