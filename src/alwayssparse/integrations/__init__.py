"""Sparsity in the trainers people use, one line each.

- PyTorch Lightning: ``pl.Trainer(callbacks=[SparsityCallback(method="rigl", sparsity=0.9)])``
  (:mod:`alwayssparse.integrations.lightning`);
- Hugging Face ``Trainer``: ``Trainer(..., callbacks=[SparsityTrainerCallback(method="topkast",
  sparsity=0.9)])`` (:mod:`alwayssparse.integrations.hf`).

Both do what the three sparsity lines of a hand-written loop do, without a change to the user's
training step:

1. ``Sparsity(model, ...)`` before the trainer builds its optimizer (the sparse backend replaces
   parameters);
2. the method's regulariser R (Top-KAST's exploration loss): its gradient is added once per
   optimizer step, just before the step, which is the gradient of ``loss + R`` whatever the
   trainer does to the loss (gradient accumulation, token-count normalisation, scaling);
3. ``sparsity.step(step, optimizer)`` right after every optimizer step that actually ran (a hook
   on the optimizer: a step skipped by a mixed-precision scaler is no step).

Checkpoints need nothing: the model's state dict carries the masks and the sparsity state
(:mod:`alwayssparse.state_dicts`), so the trainers' own checkpoints resume exactly.

The classes are imported on first use, so importing this package needs neither library.
"""

from __future__ import annotations

from typing import Any

__all__ = ["SparsityCallback", "SparsityTrainerCallback"]


def __getattr__(name: str) -> Any:
    if name == "SparsityCallback":
        from alwayssparse.integrations.lightning import SparsityCallback

        return SparsityCallback
    if name == "SparsityTrainerCallback":
        from alwayssparse.integrations.hf import SparsityTrainerCallback

        return SparsityTrainerCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
