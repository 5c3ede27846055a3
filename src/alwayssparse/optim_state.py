"""Per-entry optimizer state handling for the supported optimizers.

When an entry leaves or (re-)enters the set that receives gradients, its optimizer state must not
carry stale history: SGD's momentum buffer and Adam/AdamW's first and second moments (and AMSGrad's
running maximum) are set to zero for those entries. Only optimizers whose state layout we know are
accepted; any other raises, so that an unknown optimizer is never silently left un-reset.
"""

from __future__ import annotations

import torch
from torch import Tensor

SUPPORTED_OPTIMIZERS: tuple[type[torch.optim.Optimizer], ...] = (
    torch.optim.SGD,
    torch.optim.Adam,
    torch.optim.AdamW,
)
# Per-element state tensors of the supported optimizers ("step" is a per-tensor counter).
ELEMENTWISE_STATE = ("momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def check_optimizer(optimizer: torch.optim.Optimizer) -> None:
    """Raise ``TypeError`` unless ``optimizer`` is one whose state we know how to reset."""
    if type(optimizer) not in SUPPORTED_OPTIMIZERS:
        names = ", ".join(f"torch.optim.{c.__name__}" for c in SUPPORTED_OPTIMIZERS)
        raise TypeError(
            f"optimizer {type(optimizer).__name__} is not supported; supported: {names}. "
            "Its per-entry state could not be reset when the sparsity pattern changes."
        )


def zero_state(optimizer: torch.optim.Optimizer, param: Tensor, mask: Tensor) -> None:
    """Set the element-wise optimizer state of ``param`` to zero where ``mask`` is true."""
    state = optimizer.state.get(param)
    if not state:
        return  # no step taken yet: nothing to reset
    for key in ELEMENTWISE_STATE:
        value = state.get(key)
        if isinstance(value, Tensor) and value.shape == param.shape:
            value.masked_fill_(mask, 0)
