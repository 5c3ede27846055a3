"""Static sparsity: a random mask at the layout's densities that never changes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from alwayssparse.masks import random_mask
from alwayssparse.methods.base import Method, register
from alwayssparse.sparse_tensor import SparseTensor, set_masks


@register
@dataclass
class Static(Method):
    """Static sparsity: a fixed random topology (A = B), chosen once.

    The mask is a uniformly random subset of exact size, of entries or of b x b blocks.

    Reference: the "Static" baseline of Evci et al. (2020) and topkast.md, Figure 2.
    """

    name = "static"

    def init_masks(self, tensors: Sequence[SparseTensor], generator: torch.Generator) -> None:
        for t in tensors:
            blocks = random_mask(t.block_shape, t.forward_count, generator)
            mask = t.expand(blocks.to(t.weight.device))
            set_masks(t, mask, mask)
