"""A task: one model family with its data, training loss and evaluation.

The training loop (:func:`alwayssparse.train.train`) is the same for every task; a task supplies
the pieces that differ. Each task has a config dataclass (a section of the run config), builds
its model and data once, and is asked for batches, losses and evaluations by name.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn


class Task:
    """Base class of tasks.

    Attributes:
        name: Registry name (``lm``, ``bert``, ``image``).
        unit: What throughput is counted in (``"tokens"``, ``"images"``).
        metric: The headline evaluation metric (lower is better unless it is ``accuracy``).
    """

    name: ClassVar[str] = ""
    unit: ClassVar[str] = "examples"
    metric: ClassVar[str] = "loss"

    def __init__(self, config: Any, batch_size: int, device: torch.device) -> None:
        self.config = config
        self.batch_size = batch_size
        self.device = device

    def describe_data(self) -> str:
        """One line about the data (sizes of the splits)."""
        return ""

    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def train_batch(self, generator: torch.Generator) -> Any:
        """The next training batch, on the task's device."""
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: Any) -> Tensor:
        """Scalar training loss of ``batch`` (the sparsity regulariser is added by the loop)."""
        raise NotImplementedError

    def units(self, batch: Any) -> int:
        """Number of throughput units (tokens, images) in ``batch``."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module, split: str, max_batches: int | None) -> dict[str, float]:
        """Metrics on ``split`` (``"valid"`` or ``"test"``); keys include :attr:`metric`."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """Task state a checkpoint must hold to resume exactly (e.g. a data position)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""


TASKS: dict[str, type[Task]] = {}


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator adding a task to the registry."""
    TASKS[cls.name] = cls
    return cls
