"""Prune and regrow: the family SET, RigL and DynSparse share.

Every update step u (see :class:`alwayssparse.schedules.UpdateSchedule`), for each sparse tensor
with n active units (entries, or b x b blocks):

    n_drop = min(round(f(u) * n), units inactive before the update)
    keep   = the n - n_drop active units of largest magnitude (block L^p norm)
    grow   = n_drop units chosen by ``select_grown`` among those inactive *before* the update
             (so a unit dropped now is never regrown by the same update)
    A = B  = keep | grow;  dropped and grown weights are set to zero (or drawn from a truncated
             normal with ``regrow_std``), and grown units' optimizer state is reset.

The number of active units is unchanged by construction. Methods differ only in
``select_grown``: uniformly at random (SET, DynSparse) or by dense-gradient magnitude (RigL).

Updates run in unit space (:class:`alwayssparse.methods.base.UnitStorage`): the n active units
as sorted indices, their magnitudes, a top-k over those n scores, grown units drawn as indices
(:func:`alwayssparse.masks.sample_outside`, O(n_drop) memory), so on the sparse backend no
tensor of the weight's size exists during an update. Regrown weights drawn from the truncated
normal are assigned unit by unit (row-major within a block).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from alwayssparse.masks import random_mask, sample_outside, topk_mask
from alwayssparse.methods.base import Method, register
from alwayssparse.schedules import DROP_SCHEDULES, UpdateSchedule
from alwayssparse.sparse_tensor import SparseTensor, TopologyChange, UnitDelta, set_masks


def init_random_masks(tensors: Sequence[SparseTensor], generator: torch.Generator) -> None:
    """A = B = a uniformly random set of exactly ``forward_count`` units per tensor."""
    for t in tensors:
        blocks = random_mask(t.block_shape, t.forward_count, generator).to(t.weight.device)
        mask = t.expand(blocks)
        set_masks(t, mask, mask)


def truncated_normal(n: int, std: float, generator: torch.Generator) -> Tensor:
    """``n`` draws of N(0, std^2) truncated to [-2 std, 2 std] (float32, CPU)."""
    draws = torch.empty(n)
    torch.nn.init.trunc_normal_(draws, std=std, a=-2 * std, b=2 * std, generator=generator)
    return draws


def truncated_normal_(values: Tensor, mask: Tensor, std: float, generator: torch.Generator) -> None:
    """Overwrite ``values`` where ``mask`` with N(0, std^2) truncated to [-2 std, 2 std]."""
    draws = truncated_normal(int(torch.count_nonzero(mask)), std, generator)
    with torch.no_grad():
        values[mask] = draws.to(device=values.device, dtype=values.dtype)


@dataclass
class PruneRegrow(Method):
    """Options shared by SET, RigL and DynSparse (not registered itself).

    Attributes:
        update_interval: Delta T, steps between updates. Give this or ``num_updates``; with
            neither, the method's default applies (100 for SET and RigL).
        num_updates: n, spread the updates evenly: interval = total_steps // n.
        start_step: No updates before this step.
        stop_step: No updates from this step on; ``None`` means ``stop_fraction`` of the run.
        stop_fraction: T_end as a fraction of the run's total steps.
        drop_fraction: alpha (RigL) or p_r (DynSparse), the initial fraction dropped per update.
        drop_schedule: ``"cosine"`` (decays to 0 at the stop step), ``"constant"`` or ``"linear"``.
        regrow_std: 0 regrows at zero; > 0 draws regrown weights from a truncated normal.
    """

    default_update_interval: ClassVar[int] = 100

    update_interval: int | None = None
    num_updates: int | None = None
    start_step: int = 0
    stop_step: int | None = None
    stop_fraction: float = 0.75
    drop_fraction: float = 0.3
    drop_schedule: str = "cosine"
    regrow_std: float = 0.0

    def validate(self, sparsity: float) -> None:
        p = f"{self.name}."
        if self.update_interval is not None and self.num_updates is not None:
            raise ValueError(f"give {p}update_interval or {p}num_updates, not both")
        if self.update_interval is not None and self.update_interval < 1:
            raise ValueError(f"{p}update_interval must be >= 1, got {self.update_interval}")
        if self.num_updates is not None and self.num_updates < 1:
            raise ValueError(f"{p}num_updates must be >= 1, got {self.num_updates}")
        if not 0.0 <= self.drop_fraction <= 1.0:
            raise ValueError(f"{p}drop_fraction must be in [0, 1], got {self.drop_fraction}")
        if self.drop_schedule not in DROP_SCHEDULES:
            raise ValueError(
                f"{p}drop_schedule must be one of {list(DROP_SCHEDULES)}, "
                f"got {self.drop_schedule!r}"
            )
        if not 0.0 < self.stop_fraction <= 1.0:
            raise ValueError(f"{p}stop_fraction must be in (0, 1], got {self.stop_fraction}")
        if self.start_step < 0:
            raise ValueError(f"{p}start_step must be >= 0, got {self.start_step}")
        if self.stop_step is not None and self.stop_step < self.start_step:
            raise ValueError(f"{p}stop_step must be >= start_step, got {self.stop_step}")
        if self.regrow_std < 0:
            raise ValueError(f"{p}regrow_std must be >= 0, got {self.regrow_std}")

    def default_num_updates(self, block: int) -> int | None:
        """The number of updates used when neither interval nor count is given."""
        return None

    def setup(self, total_steps: int | None, block: int) -> None:
        num_updates = self.num_updates
        if self.update_interval is None and num_updates is None:
            num_updates = self.default_num_updates(block)
        needs_total = self.stop_step is None or num_updates is not None
        if needs_total and total_steps is None:
            raise ValueError(
                f"{self.name} needs the run length: pass total_steps to Sparsity "
                f"(or set {self.name}.stop_step and {self.name}.update_interval)"
            )
        if num_updates is not None:
            assert total_steps is not None
            interval = max(1, total_steps // num_updates)
        else:
            interval = self.update_interval or self.default_update_interval
        stop = self.stop_step
        if stop is None:
            assert total_steps is not None
            stop = round(self.stop_fraction * total_steps)
        self.schedule = UpdateSchedule(
            interval=interval,
            start=self.start_step,
            stop=stop,
            drop_fraction=self.drop_fraction,
            decay=self.drop_schedule,
        )

    def init_masks(self, tensors: Sequence[SparseTensor], generator: torch.Generator) -> None:
        init_random_masks(tensors, generator)

    def updates_at(self, step: int) -> bool:
        return self.schedule.is_update(step + 1)

    def update(
        self, step: int, tensors: Sequence[SparseTensor], generator: torch.Generator
    ) -> dict[str, TopologyChange]:
        upcoming = step + 1
        if not self.schedule.is_update(upcoming):
            return {}
        fraction = self.schedule.fraction(upcoming)
        entered = {}
        for t in tensors:
            grown = self._prune_regrow(t, fraction, generator)
            if grown is not None:
                entered[t.name] = grown
        return entered

    def select_grown(
        self, t: SparseTensor, active: Tensor, count: int, generator: torch.Generator
    ) -> Tensor:
        """``count`` units to grow, as sorted block-grid indices outside the sorted ``active``
        (the units active before the update): uniformly at random."""
        return sample_outside(active, t.num_blocks, count, generator)

    def _prune_regrow(
        self, t: SparseTensor, fraction: float, generator: torch.Generator
    ) -> TopologyChange | None:
        storage = t.storage
        units, in_a = storage.units()
        active = units[in_a]
        n_active = active.numel()
        n_drop = min(round(fraction * n_active), t.num_blocks - n_active)
        if n_drop <= 0:
            return None
        # Ties break by lower unit index: ``active`` is sorted.
        keep = topk_mask(storage.unit_scores()[in_a], n_active - n_drop)
        grown = self.select_grown(t, active, n_drop, generator).to(active.device)
        kept_and_grown, _ = torch.sort(torch.cat([active[keep], grown]))
        dropped = active[~keep]
        # Dropped and grown weights are set to zero; A = B = kept | grown.
        flags = torch.ones_like(kept_and_grown, dtype=torch.bool)
        zeroed = torch.cat([dropped, grown])
        if bool(in_a.all()):  # B = A before: the change is known, the storage need not find it
            delta = UnitDelta(entered=grown, left=dropped, entered_a=grown, left_a=dropped)
            change = storage.assign_delta(kept_and_grown, flags, delta, zeroed=zeroed)
        else:
            change = storage.assign(kept_and_grown, flags, zeroed=zeroed)
        if self.regrow_std > 0:
            block_entries = t.block * t.block
            storage.write(grown, truncated_normal(grown.numel() * block_entries,
                                                  self.regrow_std, generator))  # fmt: skip
        return change


@register
@dataclass
class SET(PruneRegrow):
    """Sparse Evolutionary Training: magnitude prune, random regrow.

    Reference: Mocanu et al., "Scalable training of artificial neural networks with adaptive
    sparse connectivity inspired by network science", Nature Communications 2018; defaults
    (Delta T = 100, alpha = 0.3, cosine decay, T_end = 0.75 T) as in Evci et al. 2020.
    """

    name = "set"


@register
@dataclass
class DynSparse(PruneRegrow):
    """Structured DynSparse (dynsparse-bert.md Algorithm 1, section 2.1-2.2, appendix A.1).

    Random initial block pattern at uniform sparsity; n updates evenly spaced over the run
    (n = 160 for 1x1 blocks, 80 for larger blocks); each prunes a fraction p_r(t) of the blocks
    with the smallest L^p norm (eq. 1; ``block_norm`` of the sparsity config), with p_r cosine
    decayed from 0.5 over the run, and re-allocates as many blocks at random; re-allocated
    weights and their Adam moments start at zero. ``init_std`` re-initialises the sparse weights
    from a truncated normal (the paper: 0.02).

    Reference: Dietrich et al., "Towards Structured Dynamic Sparse Pre-Training of BERT", 2021.
    """

    name = "dynsparse"

    stop_fraction: float = 1.0
    drop_fraction: float = 0.5
    init_std: float | None = None

    def validate(self, sparsity: float) -> None:
        super().validate(sparsity)
        if self.init_std is not None and self.init_std <= 0:
            raise ValueError(f"dynsparse.init_std must be > 0 or None, got {self.init_std}")

    def default_num_updates(self, block: int) -> int | None:
        return 160 if block == 1 else 80  # appendix A.1: optimum for 1x1 and for 16x16

    def init_masks(self, tensors: Sequence[SparseTensor], generator: torch.Generator) -> None:
        if self.init_std is not None:
            for t in tensors:
                everywhere = torch.ones_like(t.weight, dtype=torch.bool)
                truncated_normal_(t.weight, everywhere, self.init_std, generator)
        init_random_masks(tensors, generator)
