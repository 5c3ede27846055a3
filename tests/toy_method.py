"""A method in one file, to show (and test) that registering is all a new method needs.

"lottery": keep the D largest |theta| of the initial weights (A = B), then, every
``update_interval`` steps, swap the ``swap`` smallest kept units for the largest |theta| among
the units never kept so far (theta outside B never moves, so that is their initial magnitude).
Its options become the config section ``lottery`` without any edit elsewhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from alwayssparse.masks import topk_mask
from alwayssparse.methods import Method, register
from alwayssparse.sparse_tensor import SparseTensor, TopologyChange, set_masks


@register
@dataclass
class Lottery(Method):
    """Initial magnitude mask, with a few swaps by magnitude (a test method).

    Attributes:
        update_interval: Steps between swaps.
        swap: Units swapped per tensor and update.
    """

    name = "lottery"
    keeps_reservoir = True  # the swaps read theta outside B

    update_interval: int = 5
    swap: int = 2

    def validate(self, sparsity: float) -> None:
        if self.update_interval < 1 or self.swap < 0:
            raise ValueError("lottery.update_interval must be >= 1 and lottery.swap >= 0")

    def init_masks(self, tensors: Sequence[SparseTensor], generator: torch.Generator) -> None:
        for t in tensors:
            keep = t.expand(topk_mask(t.scores(), t.forward_count))
            set_masks(t, keep, keep.clone())

    def updates_at(self, step: int) -> bool:
        return (step + 1) % self.update_interval == 0

    def update(
        self, step: int, tensors: Sequence[SparseTensor], generator: torch.Generator
    ) -> dict[str, TopologyChange]:
        if not self.updates_at(step):
            return {}
        return {t.name: self._swap(t) for t in tensors}

    def _swap(self, t: SparseTensor) -> TopologyChange:
        storage = t.storage
        units, _ = storage.units()
        swap = min(self.swap, units.numel(), t.num_blocks - units.numel())
        keep = topk_mask(storage.unit_scores(), units.numel() - swap)
        outside = storage.grid_scores().reshape(-1).clone()
        outside[units] = float("-inf")
        grown = torch.nonzero(topk_mask(outside, swap)).squeeze(1)
        new, _ = torch.sort(torch.cat([units[keep], grown]))
        return storage.assign(new, torch.ones_like(new, dtype=torch.bool))
