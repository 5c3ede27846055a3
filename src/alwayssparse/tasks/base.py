"""A task: one model family with its data, training loss and evaluation.

The training loop (:func:`alwayssparse.train.train`) is the same for every task; a task supplies
the pieces that differ. Each task has a config dataclass (:attr:`Task.config_class`: the run
config's section named after the task), builds its model and data once, and is asked for batches,
losses and evaluations by name. A task is one module: its class (registered with
:func:`register_task`), its config section and its presets
(:func:`alwayssparse.presets.register_preset`); registering it is all it takes for the run config,
the command line and the reports to know it.

Under several processes (:mod:`alwayssparse.distributed`) a task is one rank's *shard*:
``batch_size`` stays the global batch, every rank draws the same global batch from the shared
generator and :meth:`Task.train_batch` returns this rank's rows (:attr:`Task.local_rows`);
:meth:`Task.loss` is scaled so that its mean over ranks (DDP averages gradients) is the loss of
the global batch; :meth:`Task.evaluate` evaluates a share of the split on each rank and returns
metrics reduced over all ranks (every rank must call it).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from alwayssparse.distributed import all_reduce_sum


class Task:
    """Base class of tasks.

    Attributes:
        name: Registry name (``lm``, ``bert``, ``image``), also the name of its config section.
        config_class: The task's config dataclass (with a ``validate()`` method); the run
            config holds a default instance as the section ``name``.
        unit: What throughput is counted in (``"tokens"``, ``"images"``).
        metric: The headline evaluation metric (lower is better unless it is ``accuracy``).
    """

    name: ClassVar[str] = ""
    config_class: ClassVar[type[Any]]
    unit: ClassVar[str] = "examples"
    metric: ClassVar[str] = "loss"

    @classmethod
    def size_label(cls, section: Mapping[str, Any]) -> str:
        """A short model-size label for reports, from the task's section of a run's
        ``config.json`` (``"?"`` when the task has no rule or the section lacks what it reads)."""
        return "?"

    @classmethod
    def use_data(cls, section: Any, corpus: str, paths: list[str]) -> None:
        """Point the task's config ``section`` at data named on the command line.

        Args:
            section: The task's config section (an instance of :attr:`config_class`).
            corpus: ``"text"`` (``--text``: files or directories) or ``"enwik8"``
                (``--enwik8``: one file).
            paths: The paths given.

        Raises:
            ValueError: If the task cannot read that data; the message names what it reads.
        """
        raise ValueError(f"task {cls.name} does not read --{corpus} data")

    def __init__(
        self,
        config: Any,
        batch_size: int,
        device: torch.device,
        *,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        """Set the task up for one rank (``rank=0, world_size=1``: the whole batch).

        Args:
            config: The task's config section.
            batch_size: The global batch (all ranks together).
            device: Where batches go.
            rank: This process's rank.
            world_size: Number of processes; must divide ``batch_size``.

        Raises:
            ValueError: If the ranks cannot split the batch evenly.
        """
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        if batch_size % world_size:
            raise ValueError(
                f"train.batch_size ({batch_size}) is the global batch and must be divisible by "
                f"the number of processes ({world_size})"
            )
        self.config = config
        self.batch_size = batch_size
        self.device = device
        self.rank, self.world_size = rank, world_size

    @property
    def local_batch_size(self) -> int:
        """Rows of the global batch this rank trains on."""
        return self.batch_size // self.world_size

    @property
    def local_rows(self) -> slice:
        """This rank's rows of the global batch: ``[rank * b, (rank + 1) * b)``."""
        b = self.local_batch_size
        return slice(self.rank * b, (self.rank + 1) * b)

    def reduce_sum(self, values: Tensor) -> Tensor:
        """``values`` summed over the ranks of this task (itself on one rank)."""
        return all_reduce_sum(values) if self.world_size > 1 else values

    def describe_data(self) -> str:
        """One line about the data (sizes of the splits)."""
        return ""

    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def train_batch(self, generator: torch.Generator) -> Any:
        """This rank's rows of the next global batch, on the task's device (every rank makes
        the same draws from ``generator``)."""
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: Any) -> Tensor:
        """Scalar training loss of ``batch`` (the sparsity regulariser is added by the loop),
        scaled so that its mean over ranks is the loss of the global batch."""
        raise NotImplementedError

    def units(self, batch: Any) -> int:
        """Number of throughput units (tokens, images) in ``batch``."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module, split: str, max_batches: int | None) -> dict[str, float]:
        """Metrics on ``split`` (``"valid"`` or ``"test"``); keys include :attr:`metric`.

        The same on every rank: each evaluates a share and the sums are all-reduced."""
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
