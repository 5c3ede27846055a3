"""Decoupled structured regularisation applied after the optimizer step.

Group lasso (dynsparse-bert.md eq. 2), decoupled from Adam like AdamW's weight decay: every
entry (i, j) of a weight in the gradient set B moves by

    Delta W_ij -= eta(t) * lambda_group * w_std * sqrt(|block|) * W_ij / sqrt(sum_{block} W^2 + eps)

where the sum runs over the b x b block that holds (i, j), |block| = b^2 is the number of entries
in it (so sqrt(|block|) = b), eta(t) is the current learning rate and eps = 1e-6. The prefactors
w_std * sqrt(|block|) make lambda_group comparable with a weight-decay coefficient. With 1x1
blocks it shrinks every weight by eta * lambda * w_std towards zero (an L1-like pull).
"""

from __future__ import annotations

import torch

from alwayssparse import kernels
from alwayssparse.masks import block_norms, matrix_view
from alwayssparse.sparse_tensor import SparseTensor

GROUP_LASSO_EPS = 1e-6


def group_lasso_step(
    weight: torch.Tensor, block: int, learning_rate: float, coefficient: float,
    weight_std: float, eps: float = GROUP_LASSO_EPS,
) -> torch.Tensor:  # fmt: skip
    """The eq. 2 update term (same shape as ``weight``), to be subtracted from it."""
    squares = block_norms(weight.detach().square(), block, "l1")  # sum of W^2 per block
    scale = learning_rate * coefficient * weight_std * block
    per_block = scale / (squares + eps).sqrt()
    if block > 1:
        per_block = per_block.repeat_interleave(block, 0).repeat_interleave(block, 1)
    return weight.detach() * per_block.reshape(matrix_view(weight).shape).reshape(weight.shape)


def apply_group_lasso(
    t: SparseTensor, learning_rate: float, coefficient: float, weight_std: float
) -> None:
    """Apply the group-lasso update to the entries of ``t`` in its gradient set B."""
    if coefficient == 0.0 or learning_rate == 0.0:
        return
    step = group_lasso_step(t.weight, t.block, learning_rate, coefficient, weight_std)
    with torch.no_grad():
        t.weight.sub_(kernels.masked_where(t.grad_mask, step))
