"""A task in one file: its class, its config section, its size rule and a preset.

Loading this module is all it takes for a run config to hold a ``toy`` section, for
``alwayssparse train --preset toy toy.width=8`` to train it, and for reports to label its size:
nothing in ``alwayssparse`` is edited. (The tests load it with a fresh registry each time; see
``tests/test_tasks.py``.)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from alwayssparse.presets import register_preset
from alwayssparse.runconfig import LoopConfig, RunConfig
from alwayssparse.tasks import Task, register_task

INPUTS = 8


@dataclass
class ToyConfig:
    """Regression of a fixed random linear map.

    Attributes:
        width: Hidden units of the two-layer MLP.
        examples: Examples per split.
    """

    width: int = 16
    examples: int = 256

    def validate(self) -> None:
        if self.width < 1 or self.examples < 1:
            raise ValueError(f"toy.width and toy.examples must be >= 1, got {self}")


@register_task
class ToyTask(Task):
    """Mean squared error of an MLP on a random linear map; evaluation: MSE."""

    name = "toy"
    config_class = ToyConfig
    unit = "examples"
    metric = "mse"

    @classmethod
    def size_label(cls, section: Mapping[str, Any]) -> str:
        return f"w{section['width']}" if "width" in section else "?"

    def __init__(
        self,
        config: ToyConfig,
        batch_size: int,
        device: torch.device,
        *,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        super().__init__(config, batch_size, device, rank=rank, world_size=world_size)
        generator = torch.Generator().manual_seed(0)
        target = torch.randn(INPUTS, 1, generator=generator)
        self.splits: dict[str, tuple[Tensor, Tensor]] = {}
        for split in ("train", "valid", "test"):
            x = torch.randn(config.examples, INPUTS, generator=generator)
            self.splits[split] = (x.to(device), (x @ target).to(device))

    def build_model(self) -> nn.Module:
        width = self.config.width
        return nn.Sequential(nn.Linear(INPUTS, width), nn.ReLU(), nn.Linear(width, 1))

    def train_batch(self, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        x, y = self.splits["train"]
        rows = torch.randint(0, len(x), (self.batch_size,), generator=generator)[self.local_rows]
        return x[rows], y[rows]

    def loss(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        return nn.functional.mse_loss(model(x), y)

    def units(self, batch: tuple[Tensor, Tensor]) -> int:
        return len(batch[0])

    def evaluate(self, model: nn.Module, split: str, max_batches: int | None) -> dict[str, float]:
        x, y = self.splits[split]
        return {"mse": float(nn.functional.mse_loss(model(x), y))}


@register_preset("toy")
def toy() -> RunConfig:
    """A toy regression in a second: static sparsity 0.5 on a two-layer MLP."""
    config = RunConfig(task="toy")
    config.train = LoopConfig(steps=20, batch_size=16, eval_interval=10, eval_batches=1,
                              final_eval_batches=1, log_interval=5, checkpoint_interval=10,
                              report=False)  # fmt: skip
    config.optim.warmup_steps = 2
    config.sparsity.method, config.sparsity.sparsity = "static", 0.5
    return config
