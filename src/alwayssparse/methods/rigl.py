"""RigL: magnitude prune, regrow where the dense gradient is largest.

Reference: Evci, Gale, Menick, Castro, Elsen. "Rigging the Lottery: Making All Tickets Winners",
ICML 2020. Defaults: Delta T = 100, alpha = 0.3 with cosine decay, T_end = 0.75 T.

Grow scores are |dL/dW| (block L^p norm with blocks) at the inactive positions, from the batch of
the update step. Following topkast.md appendix C, the dense gradient is never held whole: its
rows are computed chunk by chunk (:mod:`alwayssparse.capture`), each chunk is scored, and only a
running top-k of (score, index) pairs survives from one chunk to the next. Memory: one chunk of
``gradient_chunk_elements`` floats plus 2k candidates, instead of the full gradient; the grown
units come back as k sorted indices, never as a dense mask.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from alwayssparse.masks import block_norms, topk_mask
from alwayssparse.methods.base import register
from alwayssparse.methods.prune_regrow import PruneRegrow
from alwayssparse.sparse_tensor import SparseTensor


@register
@dataclass
class RigL(PruneRegrow):
    """RigL: magnitude prune, regrow where the dense gradient is largest.

    Options: those of SET plus the gradient chunk size.

    Attributes:
        gradient_chunk_elements: Upper bound on the gradient elements computed at once.
    """

    name = "rigl"
    uses_dense_gradient: ClassVar[bool] = True

    gradient_chunk_elements: int = 1 << 20

    def validate(self, sparsity: float) -> None:
        super().validate(sparsity)
        if self.gradient_chunk_elements < 1:
            raise ValueError(
                f"rigl.gradient_chunk_elements must be >= 1, got {self.gradient_chunk_elements}"
            )

    def needs_dense_gradient(self, step: int) -> bool:
        return self.schedule.is_update(step + 1)

    def select_grown(
        self, t: SparseTensor, active: Tensor, count: int, generator: torch.Generator
    ) -> Tensor:
        """The ``count`` units outside the sorted ``active`` with the largest dense-gradient
        block norm, sorted; the gradient is computed one chunk of rows at a time."""
        cols = math.prod(t.shape) // t.shape[0]  # of the matrix view (out, in * kh * kw)
        grid_cols = cols // t.block
        rows_per_chunk = max(1, self.gradient_chunk_elements // cols // t.block) * t.block
        best_scores = torch.empty(0, device=active.device)
        best_index = torch.empty(0, dtype=torch.long, device=active.device)
        for first_row, grad_rows in t.dense_gradient_rows(rows_per_chunk):
            scores = block_norms(grad_rows, t.block, t.block_norm).reshape(-1).to(active.device)
            offset = (first_row // t.block) * grid_cols
            # Candidates: the chunk's units that were not active (active ones score -inf).
            lo = int(torch.searchsorted(active, offset))
            hi = int(torch.searchsorted(active, offset + scores.numel()))
            scores[active[lo:hi] - offset] = float("-inf")
            local = topk_mask(scores, min(count, scores.numel()))
            # Indices grow from chunk to chunk, so concatenation keeps index order and the
            # exact-count top-k breaks ties by lower index, as everywhere else.
            merged_scores = torch.cat([best_scores, scores[local]])
            merged_index = torch.cat([best_index, local.nonzero().squeeze(1) + offset])
            keep = topk_mask(merged_scores, min(count, merged_scores.numel()))
            best_scores, best_index = merged_scores[keep], merged_index[keep]
        return best_index
