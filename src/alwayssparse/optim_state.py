"""Per-entry optimizer state handling for the supported optimizers.

When an entry leaves or (re-)enters the set that receives gradients, its optimizer state must not
carry stale history: SGD's momentum buffer and Adam/AdamW's first and second moments (and AMSGrad's
running maximum) are set to zero for those entries. Only optimizers whose state layout we know are
accepted; any other raises, so that an unknown optimizer is never silently left un-reset.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from alwayssparse import kernels

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


def elementwise_state(optimizer: torch.optim.Optimizer, param: Tensor) -> list[Tensor]:
    """The element-wise optimizer state tensors of ``param`` (those of its shape; none before
    its first step)."""
    state = optimizer.state.get(param) or {}
    values = (state.get(key) for key in ELEMENTWISE_STATE)
    return [v for v in values if isinstance(v, Tensor) and v.shape == param.shape]


def zero_state(optimizer: torch.optim.Optimizer, param: Tensor, mask: Tensor) -> None:
    """Set the element-wise optimizer state of ``param`` to zero where ``mask`` is true."""
    for value in elementwise_state(optimizer, param):
        value.masked_fill_(mask, 0)


def keep_state_where(optimizer: torch.optim.Optimizer, param: Tensor, keep: Tensor) -> None:
    """Set the element-wise optimizer state of ``param`` to zero where ``keep`` is false (in
    place: no complement mask, no temporary of the parameter's size)."""
    for value in elementwise_state(optimizer, param):
        kernels.masked_where(keep, value, out=value)


def zero_state_at(
    optimizer: torch.optim.Optimizer, param: Tensor, write: Callable[[Tensor], None]
) -> None:
    """Zero the element-wise optimizer state of ``param`` through ``write(state_tensor)``,
    which sets the entries it knows about (e.g. a few units) to zero."""
    for value in elementwise_state(optimizer, param):
        write(value)


# -- what a step does where the gradient is zero ---------------------------------------------------
#
# Let an entry receive a zero gradient (+0 or -0) and hold zero optimizer state before the step.
# Then, for the supported optimizers (torch's single-tensor, foreach and fused variants compute the
# same):
#
#   SGD    d = g + wd * theta; buf = momentum * buf + (1 - dampening) * d (buf = d on the first
#          step); theta -= lr * (d + momentum * buf if nesterov else buf), or lr * d without
#          momentum. With wd = 0: d = +-0, buf = +-0, theta - lr * (+-0) = theta (as a value; a
#          -0.0 may become +0.0). With wd != 0: theta moves and buf becomes nonzero.
#   Adam   g' = g + wd * theta (L2, unless decoupled); m = lerp(m, g', 1 - beta1) = +-0,
#          v = beta2 * v + (1 - beta2) * g'^2 = 0 (amsgrad: max(0, 0) = 0); theta -= lr * m_hat /
#          (sqrt(v_hat) + eps) = theta - (+-0). With L2 wd != 0: theta moves and m, v become
#          nonzero.
#   AdamW  (Adam with decoupled weight decay) theta *= 1 - lr * wd first: theta moves when
#          wd != 0, but m and v stay zero (they see only g).
#
# So with a zero gradient, a step moves theta only through weight decay, and creates state only
# through L2 weight decay. Whether the gradient really was zero shows in the first-moment state
# (Adam's m: (1 - beta1) * g, or 0 only when g is too small to move theta; SGD's buf = g when
# dampening = 0): the *witness*. SGD without momentum keeps no state and has no witness.


def zero_gradient_effects(optimizer: torch.optim.Optimizer, param: Tensor) -> tuple[bool, bool]:
    """(moves, creates_state): whether an optimizer step can move ``param``'s entries that get a
    zero gradient and hold zero state, and whether it can make their state nonzero."""
    group = _group_of(optimizer, param)
    decays = group.get("weight_decay", 0.0) != 0.0
    if isinstance(optimizer, torch.optim.SGD):
        return decays, decays and group.get("momentum", 0.0) != 0.0
    decoupled = isinstance(optimizer, torch.optim.AdamW) or group.get(
        "decoupled_weight_decay", False
    )
    return decays, decays and not decoupled


def gradient_witness(optimizer: torch.optim.Optimizer, param: Tensor) -> Tensor | None:
    """A state tensor of ``param`` that is nonzero wherever a step got a gradient able to move
    an entry (while its state was zero), or ``None`` if the optimizer keeps none (then any
    entry may have moved). An empty tensor when no step has touched ``param`` yet."""
    state = optimizer.state.get(param)
    if not state:
        return param.new_empty(0)
    group = _group_of(optimizer, param)
    if isinstance(optimizer, torch.optim.SGD):
        exact = group.get("dampening", 0.0) == 0.0
        buf = state.get("momentum_buffer")
        return buf if exact and isinstance(buf, Tensor) and buf.shape == param.shape else None
    m = state.get("exp_avg")
    return m if isinstance(m, Tensor) and m.shape == param.shape else None


def _group_of(optimizer: torch.optim.Optimizer, param: Tensor) -> dict:
    for group in optimizer.param_groups:
        if any(p is param for p in group["params"]):
            return group
    raise ValueError("the optimizer does not hold this parameter")
