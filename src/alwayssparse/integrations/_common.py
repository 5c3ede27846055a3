"""What the trainer integrations share: attaching, the regulariser, stepping after the optimizer."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from alwayssparse.sparsity import Sparsity, SparsityConfig


class SparsityDriver:
    """Owns one :class:`~alwayssparse.Sparsity` inside a trainer's loop.

    Args:
        config: A :class:`~alwayssparse.SparsityConfig` (or ``None``).
        seed: The seed of the method's random choices.
        total_steps: The run length in optimizer steps (methods with schedules need it); default:
            what the trainer says.
        **options: Keyword options of :class:`~alwayssparse.Sparsity` (``method``, ``sparsity``...).
    """

    def __init__(
        self,
        config: SparsityConfig | None = None,
        *,
        seed: int = 0,
        total_steps: int | None = None,
        **options: Any,
    ) -> None:
        self.config, self.seed, self.total_steps, self.options = config, seed, total_steps, options
        self.sparsity: Sparsity | None = None
        self._handle: RemovableHandle | None = None

    def attach(self, model: nn.Module, total_steps: int | None) -> Sparsity:
        """``Sparsity(model, ...)``, once."""
        if self.sparsity is None:
            steps = self.total_steps if self.total_steps is not None else total_steps
            self.sparsity = Sparsity(model, self.config, seed=self.seed, total_steps=steps,
                                     **self.options)  # fmt: skip
        return self.sparsity

    def add_regularizer_gradient(self) -> None:
        """Add dR/dtheta to the gradients (once per optimizer step, before it)."""
        if self.sparsity is None:
            return
        regularizer = self.sparsity.regularizer()
        if regularizer.requires_grad:
            regularizer.backward()

    def hook_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Call ``sparsity.step`` after every step of ``optimizer`` (the one holding the sparse
        weights; unwrapped from a trainer's wrapper)."""
        self.unhook()
        self._handle = optimizer.register_step_post_hook(self._after_step)

    def _after_step(self, optimizer: torch.optim.Optimizer, _args: Any, _kwargs: Any) -> None:
        if self.sparsity is not None:
            self.sparsity.step(self.sparsity.upcoming_step, optimizer)

    def unhook(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def holding_optimizer(self, optimizers: list[Any]) -> torch.optim.Optimizer:
        """The one optimizer among ``optimizers`` (wrappers unwrapped) that holds the sparse
        weights."""
        assert self.sparsity is not None
        wanted = {id(t.weight) for t in self.sparsity.tensors}
        found = []
        for optimizer in optimizers:
            raw = unwrap_optimizer(optimizer)
            held = {id(p) for group in raw.param_groups for p in group["params"]}
            if wanted & held:
                found.append(raw)
        if len(found) != 1:
            raise ValueError(
                f"{len(found)} optimizers hold the sparse weights; alwayssparse steps exactly one "
                "(build it after the model is sparse: the sparse backend replaces parameters)"
            )
        return found[0]


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside a trainer's wrapper (accelerate's, Lightning's)."""
    seen = 0
    while not type(optimizer).__module__.startswith("torch.optim") and seen < 8:
        inner = getattr(optimizer, "optimizer", None) or getattr(optimizer, "_optimizer", None)
        if inner is None:
            break
        optimizer, seen = inner, seen + 1
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"not a torch optimizer: {type(optimizer).__name__}")
    return optimizer
