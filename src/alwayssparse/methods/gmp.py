"""Gradual magnitude pruning: dense to sparse, the papers' pruning baseline.

Reference: Zhu & Gupta, "To prune, or not to prune: exploring the efficacy of pruning for model
compression", 2017 (eq. 1); the "Pruning" rows of topkast.md Figure 2 and Table 5.

Every ``update_interval`` steps between ``start_step`` and ``stop_step`` (and exactly at
``stop_step``), each tensor keeps its largest-magnitude units (block norms with blocks) at the
density of the cubic schedule, per tensor:

    d_t = d_f + (d_i - d_f) * (1 - (t - t0) / (t_end - t0))^3

with d_i = 1 - ``initial_sparsity`` and d_f the tensor's target density from the layout. Pruned
weights are set to zero and never return (A = B shrinks monotonically). Updates rank only the
stored units (unit space, :class:`alwayssparse.methods.base.UnitStorage`); the initial pruning
ranks the whole dense tensor.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from alwayssparse.masks import count_for_density, topk_mask
from alwayssparse.methods.base import Method, register
from alwayssparse.schedules import cubic_sparsity
from alwayssparse.sparse_tensor import SparseTensor, TopologyChange, UnitDelta, set_masks


@register
@dataclass
class GMP(Method):
    """Gradual magnitude pruning (Zhu & Gupta): dense to sparse on a cubic schedule.

    Attributes:
        initial_sparsity: s_i, the sparsity before pruning starts (0: dense).
        update_interval: Delta t, steps between pruning steps.
        start_step: t0, the first pruning step.
        stop_step: t_end, when the final sparsity is reached; ``None``: ``stop_fraction`` of
            the run.
        stop_fraction: t_end as a fraction of the run's total steps.
    """

    name = "gmp"

    initial_sparsity: float = 0.0
    update_interval: int = 100
    start_step: int = 0
    stop_step: int | None = None
    stop_fraction: float = 0.75

    def validate(self, sparsity: float) -> None:
        if not 0.0 <= self.initial_sparsity <= sparsity:
            raise ValueError(
                f"gmp.initial_sparsity must be in [0, sparsity={sparsity}], "
                f"got {self.initial_sparsity}"
            )
        if self.update_interval < 1:
            raise ValueError(f"gmp.update_interval must be >= 1, got {self.update_interval}")
        if self.start_step < 0:
            raise ValueError(f"gmp.start_step must be >= 0, got {self.start_step}")
        if self.stop_step is not None and self.stop_step <= self.start_step:
            raise ValueError(f"gmp.stop_step must be > start_step, got {self.stop_step}")
        if not 0.0 < self.stop_fraction <= 1.0:
            raise ValueError(f"gmp.stop_fraction must be in (0, 1], got {self.stop_fraction}")

    def setup(self, total_steps: int | None, block: int) -> None:
        if self.stop_step is not None:
            self.stop = self.stop_step
        elif total_steps is None:
            raise ValueError("gmp needs the run length: pass total_steps or set gmp.stop_step")
        else:
            self.stop = max(self.start_step + 1, round(self.stop_fraction * total_steps))

    def capacity_sparsity_for(self, sparsity: float) -> float:
        """B = A is at its largest before pruning starts (``initial_sparsity``)."""
        return self.initial_sparsity

    def updates_at(self, step: int) -> bool:
        return self.is_update(step + 1)

    def density_at(self, t: SparseTensor, upcoming: int) -> float:
        """Target density of tensor ``t`` at step ``upcoming`` (the cubic schedule)."""
        final = 1.0 - t.density
        # ERK may give a small tensor a density above 1 - s_i: it then starts at its final density.
        initial = min(self.initial_sparsity, final)
        sparsity = cubic_sparsity(upcoming, initial, final, self.start_step, self.stop)
        return 1.0 - sparsity

    def is_update(self, upcoming: int) -> bool:
        """Pruning steps: every interval inside (t0, t_end), and t_end itself."""
        inside = self.start_step < upcoming < self.stop
        return upcoming == self.stop or (
            inside and (upcoming - self.start_step) % self.update_interval == 0
        )

    def init_masks(self, tensors: Sequence[SparseTensor], generator: torch.Generator) -> None:
        for t in tensors:
            self._prune_initial(t, self.density_at(t, 0))

    def update(
        self, step: int, tensors: Sequence[SparseTensor], generator: torch.Generator
    ) -> dict[str, TopologyChange]:
        upcoming = step + 1
        if not self.is_update(upcoming):
            return {}
        return {t.name: self._prune_stored(t, self.density_at(t, upcoming)) for t in tensors}

    def _prune_stored(self, t: SparseTensor, density: float) -> TopologyChange:
        """Keep the largest-magnitude active units at ``density`` (never more than are active);
        the others are set to zero and leave A = B."""
        storage = t.storage
        units, in_a = storage.units()
        active = units[in_a]
        count = min(count_for_density(t.num_blocks, density), active.numel())
        keep = topk_mask(storage.unit_scores()[in_a], count)  # ties: lower unit index
        kept, pruned = active[keep], active[~keep]
        flags = torch.ones_like(kept, dtype=torch.bool)
        if not bool(in_a.all()):
            return storage.assign(kept, flags, zeroed=pruned)
        none = pruned[:0]  # B = A before and after: only pruned units leave
        delta = UnitDelta(entered=none, left=pruned, entered_a=none, left_a=pruned)
        return storage.assign_delta(kept, flags, delta, zeroed=pruned)

    def _prune_initial(self, t: SparseTensor, density: float) -> Tensor:
        """Initial masks: the largest-magnitude units of the whole dense tensor."""
        keep = t.expand(topk_mask(t.scores(), count_for_density(t.num_blocks, density)))
        with torch.no_grad():
            t.weight.masked_fill_(~keep, 0.0)
        return set_masks(t, keep, keep)
