"""Byte-level language modelling with the small decoder-only Transformer (the quickstart)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

# The run config holds this task's section: imported as a module, read when a preset is built.
from alwayssparse import runconfig
from alwayssparse.data import ByteDataConfig, load_byte_corpus
from alwayssparse.data.bytes import nll_sums, random_batch
from alwayssparse.models import TransformerLM, TransformerLMConfig, lm_loss
from alwayssparse.presets import register_preset
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
    config_class = LMConfig
    unit = "tokens"
    metric = "bpc"

    @classmethod
    def size_label(cls, section: Mapping[str, Any]) -> str:
        """``L2/d128``: layers and width."""
        return transformer_size(section)

    @classmethod
    def use_data(cls, section: LMConfig, corpus: str, paths: list[str]) -> None:
        """``--text`` files or directories, or the ``--enwik8`` file."""
        section.data.name, section.data.paths = corpus, list(paths)

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


def transformer_size(section: Mapping[str, Any]) -> str:
    """``L{n_layer}/d{d_model}`` of ``section["model"]``: the size label of the language-model
    tasks."""
    model = section.get("model", {})
    if "n_layer" in model and "d_model" in model:
        return f"L{model['n_layer']}/d{model['d_model']}"
    return "?"


# -- presets ------------------------------------------------------------------------------------


@register_preset("quickstart")
def quickstart() -> runconfig.RunConfig:
    """Top-KAST (90% forward, 80% backward sparsity) on the standard-library corpus; ~2 min."""
    config = runconfig.RunConfig()
    config.lm.model = TransformerLMConfig(n_layer=2, n_head=4, d_model=128, d_ff=512, context=128)
    config.sparsity.method = "topkast"
    config.sparsity.sparsity = 0.9
    config.sparsity.topkast.backward_sparsity = 0.8
    return config


@register_preset("tiny")
def tiny() -> runconfig.RunConfig:
    """A seconds-long run for smoke tests."""
    config = quickstart()
    config.lm.model = TransformerLMConfig(n_layer=1, n_head=2, d_model=32, d_ff=64, context=32)
    config.lm.data.max_bytes = 200_000
    config.train = runconfig.LoopConfig(
        steps=30, batch_size=8, eval_interval=15, eval_batches=4, final_eval_batches=8,
        log_interval=5, checkpoint_interval=15,
    )  # fmt: skip
    config.optim.warmup_steps = 5
    return config
