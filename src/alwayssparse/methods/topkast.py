"""Top-KAST: Top-K Always Sparse Training.

Reference: Jayakumar, Pascanu, Rae, Osindero, Elsen. "Top-KAST: Top-K Always Sparse Training",
NeurIPS 2020 (../shared/papers/topkast.md, sections 2.1-2.4, appendix C and D, Table 1).

With theta the dense parameterisation of one tensor and D its forward density (section 2.1-2.2):

    A = TopK(|theta|, D)          forward set: alpha_i = theta_i if i in A else 0
    B = TopK(|theta|, D + M)      backward set, B ⊇ A: only theta_i, i in B, receive gradient
    C = the rest                  reservoir: neither used nor updated

Exploration regulariser (section 2.3 and Algorithm 1), an L2 penalty with coefficient lambda:

    R = lambda/2 * ( sum_{i in A} theta_i^2  +  (1/D) * sum_{i in B\\A} theta_i^2 ),   C unpenalised

so its gradient is lambda*theta on A and lambda*theta/D on B\\A (``exploration_norm="l1"`` uses
|theta_i| instead of theta_i^2/2, the literal case table of section 2.3). Masks are recomputed
from |theta| every ``refresh_interval`` steps (N = 1 or 100, Table 6), per tensor (the paper's
choice) or over all sparse tensors at once (``selection="global"``).

Ablations of Table 1: ``random_exploration`` draws B\\A uniformly from outside A instead of by
magnitude; ``exploration_stop_step`` = t makes B = A from step t on (no more updates to B\\A).

A refresh costs what changed, not the dense size (DESIGN.md, "A step costs what changed"): theta
outside B never changes between refreshes, so the reservoir's best units are kept ranked
(:class:`alwayssparse.ranking.RankedReservoir`, per selection group: a tensor, or all of them with
``selection="global"``) and the new B and A are selected from B's current scores (the stored units'
block norms, ``UnitStorage.unit_scores``) merged with that ranking: O(|B|) plus the units that
cross a boundary, with the same result and tie rule as the exact top-k over the grid (score, then
lower index; per tensor, or over the concatenation); with the compiled kernels the whole selection
is one call (:meth:`RankedReservoir.select_compiled`), else numpy (:func:`compiled_selection` tells
which), and the selection groups of a refresh run on one thread per core torch uses (they are
independent, and the compiled calls release the GIL). The storage is told what changed
(``UnitStorage.assign_delta``), so it touches only those units. The whole grid is ranked
(``UnitStorage.grid_scores``; on the sparse backend the reservoir with the stored values written
in, paper section 2.4) only when that ranking is missing or stale (the first refresh; after a
checkpoint load or any assign not made here, which change the storage's ``reservoir_token``; a
storage without a token) or cannot decide (the units that would enter lie beyond the ranked part of
the reservoir), and always with ``random_exploration`` (B\\A is drawn afresh each refresh, so
nothing carries over). Allocated per group and refresh: O(|B|) index and key arrays, and the ranked
reservoir (one int64 key per unit, up to |B| of them); a full ranking adds the grid scores (one
float per unit), numpy's partition copy and the selection masks (one bool per unit each).
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from alwayssparse import kernels
from alwayssparse.masks import global_topk_masks, scores_extending, topk_mask, write_units
from alwayssparse.methods.base import Method, register
from alwayssparse.ranking import (
    KEYED_DTYPES,
    MAX_POSITIONS,
    RankedReservoir,
    key_positions,
    rank_keys,
)
from alwayssparse.sparse_tensor import SparseTensor, TensorsKey, TopologyChange, UnitDelta

SELECTIONS = ("layer", "global")
EXPLORATION_NORMS = ("l2", "l1")


@register
@dataclass
class TopKAST(Method):
    """Top-KAST: forward with the top-D weights, gradients to the top-(D+M), exploration loss.

    Attributes:
        backward_sparsity: Sparsity of B, i.e. 1 - (D + M). ``None`` means backward density
            min(1, 2D), the pairing of most of the paper's runs ((90%, 80%), (95%, 90%),
            (80%, 60%)). Must not exceed the forward sparsity.
        refresh_interval: N, recompute A and B from |theta| every N optimizer steps.
        exploration_coefficient: lambda of the exploration regulariser (0 disables it). The
            paper's ImageNet runs use 1e-4 (topkast.md appendix B).
        exploration_norm: ``"l2"`` (Algorithm 1, default) or ``"l1"``.
        random_exploration: Draw B\\A at random outside A (Table 1, "Top-KAST (Random)").
        exploration_stop_step: From this step on B = A (Table 1, "Top-KAST (t = ...)");
            ``None`` never stops, 0 never explores.
        selection: ``"layer"`` top-k per tensor (the paper's choice) or ``"global"``.
    """

    name = "topkast"
    keeps_reservoir = True

    backward_sparsity: float | None = None
    refresh_interval: int = 1
    exploration_coefficient: float = 1e-4
    exploration_norm: str = "l2"
    random_exploration: bool = False
    exploration_stop_step: int | None = None
    selection: str = "layer"

    def validate(self, sparsity: float) -> None:
        prefix = "topkast."
        if self.backward_sparsity is not None:
            if self.backward_sparsity < 0.0:
                raise ValueError(
                    f"{prefix}backward_sparsity must be >= 0 (backward density D + M <= 1), "
                    f"got {self.backward_sparsity}"
                )
            if self.backward_sparsity > sparsity:
                raise ValueError(
                    f"{prefix}backward_sparsity ({self.backward_sparsity}) must not exceed the "
                    f"forward sparsity ({sparsity}): B must contain A"
                )
        if self.refresh_interval < 1:
            raise ValueError(f"{prefix}refresh_interval must be >= 1, got {self.refresh_interval}")
        if self.exploration_coefficient < 0:
            raise ValueError(
                f"{prefix}exploration_coefficient must be >= 0, got {self.exploration_coefficient}"
            )
        if self.exploration_norm not in EXPLORATION_NORMS:
            raise ValueError(
                f"{prefix}exploration_norm must be one of {list(EXPLORATION_NORMS)}, "
                f"got {self.exploration_norm!r}"
            )
        if self.selection not in SELECTIONS:
            raise ValueError(
                f"{prefix}selection must be one of {list(SELECTIONS)}, got {self.selection!r}"
            )
        if self.exploration_stop_step is not None and self.exploration_stop_step < 0:
            raise ValueError(
                f"{prefix}exploration_stop_step must be >= 0 or None, "
                f"got {self.exploration_stop_step}"
            )

    def __post_init__(self) -> None:
        self._coefficient_cache: dict[str, tuple[TensorsKey, Tensor]] = {}
        # Per selection group (tensor names): the ranked reservoir of its last refresh.
        self._rankings: dict[tuple[str, ...], RankedReservoir] = {}
        # Refreshes of a selection group by the ranked reservoir, and by ranking the whole grid.
        self.refresh_counts = {"incremental": 0, "full": 0}

    @property
    def fixed_layer_counts(self) -> bool:
        """Global selection moves units between tensors."""
        return self.selection == "layer"

    def backward_sparsity_for(self, sparsity: float) -> float:
        """The backward sparsity 1 - (D + M) that applies at forward ``sparsity``."""
        if self.backward_sparsity is not None:
            return self.backward_sparsity
        return 1.0 - min(1.0, 2.0 * (1.0 - sparsity))

    def exploring(self, step: int) -> bool:
        """Whether B\\A receives updates at optimizer step ``step``."""
        return self.exploration_stop_step is None or step < self.exploration_stop_step

    def updates_at(self, step: int) -> bool:
        upcoming = step + 1
        return upcoming % self.refresh_interval == 0 or upcoming == self.exploration_stop_step

    def init_masks(self, tensors: Sequence[SparseTensor], generator: torch.Generator) -> None:
        self._refresh(tensors, generator, explore=self.exploring(0))

    def update(
        self, step: int, tensors: Sequence[SparseTensor], generator: torch.Generator
    ) -> dict[str, TopologyChange]:
        upcoming = step + 1  # masks written now are used by the next optimizer step
        if upcoming % self.refresh_interval == 0:
            return self._refresh(tensors, generator, explore=self.exploring(upcoming))
        if upcoming == self.exploration_stop_step:
            # Exploration stops between refreshes: drop B\A now, keep A as it is.
            return {t.name: self._keep_only_a(t) for t in tensors}
        return {}

    def regularizer(self, tensors: Sequence[SparseTensor]) -> Tensor | None:
        if self.exploration_coefficient == 0.0:
            return None
        terms = [
            _WeightedNorm.apply(t.weight, self._coefficients(t), self.exploration_norm)
            for t in tensors
        ]
        scale = self.exploration_coefficient / (2.0 if self.exploration_norm == "l2" else 1.0)
        return scale * torch.stack(terms).sum()

    def _coefficients(self, t: SparseTensor) -> Tensor:
        """c = 1 on A, 1/D on B\\A, 0 on C; cached until either mask is written again."""
        # In-place writes bump a tensor's _version; a new mask tensor is another object.
        key = TensorsKey((t.forward_mask, t.grad_mask))
        cached = self._coefficient_cache.get(t.name)
        if cached is None or cached[0] != key:
            coefficients = kernels.topkast_coefficients(
                t.forward_mask, t.grad_mask, t.density, t.weight.dtype
            )
            cached = (key, coefficients)
            self._coefficient_cache[t.name] = cached
        return cached[1]

    def _select(self, scores: list[Tensor], counts: list[int]) -> list[Tensor]:
        if self.selection == "global":
            return global_topk_masks(scores, sum(counts))
        return [topk_mask(s, k) for s, k in zip(scores, counts, strict=True)]

    def _refresh(
        self, tensors: Sequence[SparseTensor], generator: torch.Generator, explore: bool
    ) -> dict[str, TopologyChange]:
        if explore and self.random_exploration:
            # B\A is drawn afresh every refresh: nothing carries over, rank the whole grid.
            self.refresh_counts["full"] += 1
            return self._refresh_full(tensors, generator, explore)
        groups = [list(tensors)] if self.selection == "global" else [[t] for t in tensors]
        workers = _refresh_workers(groups)
        if workers > 1:
            # Groups are independent and the compiled selection and topology merge release the
            # GIL: refresh them on the cores the training step uses (idle between steps).
            with ThreadPoolExecutor(max_workers=workers) as pool:
                done = list(pool.map(lambda g: self._refresh_group(g, explore), groups))
        else:
            done = [self._refresh_group(group, explore) for group in groups]
        changes: dict[str, TopologyChange] = {}
        for group_changes, kind in done:
            changes.update(group_changes)
            self.refresh_counts[kind] += 1
        return changes

    def _refresh_group(
        self, group: list[SparseTensor], explore: bool
    ) -> tuple[dict[str, TopologyChange], str]:
        """One selection group (a tensor, or all with global selection): incrementally from
        its ranked reservoir when that is still valid and decides exactly, else in full.
        Returns the changes and how (``"incremental"`` or ``"full"``); touches only this
        group's tensors and ranking (groups may be refreshed concurrently)."""
        key = tuple(t.name for t in group)
        ranking = self._rankings.pop(key, None)
        tokens = [t.storage.reservoir_token() for t in group]
        if ranking is not None and None not in tokens and ranking.tokens == tokens:
            changes = self._refresh_incremental(group, ranking, explore)
            if changes is not None:
                ranking.tokens = [t.storage.reservoir_token() for t in group]
                self._rankings[key] = ranking
                return changes, "incremental"
        changes, ranking = self._refresh_full_group(group, explore)
        if ranking is not None:
            ranking.tokens = [t.storage.reservoir_token() for t in group]
            if None not in ranking.tokens:
                self._rankings[key] = ranking
        return changes, "full"

    def _counts(self, group: list[SparseTensor], explore: bool) -> tuple[int, int]:
        count_a = sum(t.forward_count for t in group)
        count_b = sum(t.backward_count for t in group) if explore else count_a
        return count_b, count_a

    def _refresh_incremental(
        self, group: list[SparseTensor], ranking: RankedReservoir, explore: bool
    ) -> dict[str, TopologyChange] | None:
        """B and A from B's current scores and the ranked reservoir: O(|B|) plus the units that
        cross a boundary. ``None`` when the ranking cannot decide exactly (nothing assigned)."""
        offsets = _offsets(group)
        if compiled_selection():
            return self._refresh_compiled(group, ranking, explore, offsets)
        keys, flags, devices = [], [], []
        for t, offset in zip(group, offsets, strict=False):
            b_units, b_in_a = t.storage.units()
            unit_keys = rank_keys(t.storage.unit_scores(), b_units.cpu().numpy() + offset)
            if unit_keys is None:
                return None
            keys.append(unit_keys)
            flags.append(b_in_a.cpu().numpy())
            devices.append(b_units.device)
        all_keys = np.concatenate(keys)
        count_b, count_a = self._counts(group, explore)
        selection = ranking.select(all_keys, np.concatenate(flags), count_b, count_a)
        if selection is None:
            return None
        # Kept units are in position order; entering ones are few: sort them and merge.
        kept = key_positions(all_keys[selection.keep])
        entering = key_positions(selection.entering)
        order = np.argsort(entering)
        entering, entering_in_a = entering[order], selection.entering_in_a[order]
        changes = {}
        start = 0
        for i, t in enumerate(group):
            lo, hi = offsets[i], offsets[i + 1]
            old_units, old_in_a = key_positions(keys[i]) - lo, flags[i]
            keep = selection.keep[start : start + old_units.size]
            start += old_units.size
            k0, k1 = np.searchsorted(kept, [lo, hi])
            e0, e1 = np.searchsorted(entering, [lo, hi])
            kept_units, kept_in_a = kept[k0:k1] - lo, selection.keep_in_a[k0:k1]
            new_units, new_in_a = entering[e0:e1] - lo, entering_in_a[e0:e1]
            places = np.searchsorted(kept_units, new_units)
            units = np.insert(kept_units, places, new_units)
            in_a = np.insert(kept_in_a, places, new_in_a)
            # What changed, from the selection itself (no search against the old units).
            a_after = np.zeros(old_units.size, dtype=bool)
            a_after[keep] = kept_in_a
            was_in_a = old_in_a[keep]
            entered_a = np.concatenate([kept_units[kept_in_a & ~was_in_a], new_units[new_in_a]])
            delta = UnitDelta(
                entered=_tensor(new_units, devices[i]),
                left=_tensor(old_units[~keep], devices[i]),
                entered_a=_tensor(np.sort(entered_a), devices[i]),
                left_a=_tensor(old_units[old_in_a & ~a_after], devices[i]),
            )
            changes[t.name] = self._assign(
                t, _tensor(units, devices[i]), torch.from_numpy(in_a).to(devices[i]), delta
            )
        return changes

    def _refresh_compiled(
        self,
        group: list[SparseTensor],
        ranking: RankedReservoir,
        explore: bool,
        offsets: list[int],
    ) -> dict[str, TopologyChange] | None:
        """:meth:`_refresh_incremental` through the compiled selection
        (:meth:`RankedReservoir.select_compiled`): the same sets, in a few passes over B."""
        scores, positions, flags, devices = [], [], [], []
        for t, offset in zip(group, offsets, strict=False):
            b_units, b_in_a = t.storage.units()
            unit_scores = t.storage.unit_scores().detach()
            if unit_scores.dtype not in KEYED_DTYPES:
                return None
            scores.append(unit_scores.reshape(-1).to("cpu", torch.float32))
            positions.append(b_units.to("cpu", torch.long) + offset)
            flags.append(b_in_a.to("cpu", torch.bool))
            devices.append(b_units.device)
        count_b, count_a = self._counts(group, explore)
        one = len(group) == 1
        refresh = ranking.select_compiled(
            scores[0].contiguous() if one else torch.cat(scores),
            positions[0].contiguous() if one else torch.cat(positions),
            flags[0].contiguous() if one else torch.cat(flags),
            count_b, count_a,
        )  # fmt: skip
        if refresh is None:
            return None
        changes = {}
        crossed = [refresh.entered, refresh.left, refresh.entered_a, refresh.left_a]
        for i, t in enumerate(group):
            if one:  # positions are the tensor's units
                units, in_a, crossings = refresh.units, refresh.in_a, crossed
            else:  # the tensor's part of each ascending array, as its own units
                lo, hi = offsets[i], offsets[i + 1]
                span = _span(refresh.units, lo, hi)
                units, in_a = refresh.units[span] - lo, refresh.in_a[span]
                crossings = [c[_span(c, lo, hi)] - lo for c in crossed]
            device = devices[i]
            delta = UnitDelta(*(_tensor(c, device) for c in crossings))
            changes[t.name] = self._assign(
                t, _tensor(units, device), torch.from_numpy(in_a).to(device), delta
            )
        return changes

    def _keep_only_a(self, t: SparseTensor) -> TopologyChange:
        """B = A (exploration stops), through the tensor's unit storage."""
        units, in_a = t.storage.units()
        a_units = units[in_a]
        return self._assign(t, a_units, torch.ones_like(a_units, dtype=torch.bool))

    def _coefficients_current(self, t: SparseTensor) -> bool:
        cached = self._coefficient_cache.get(t.name)
        return cached is not None and cached[0] == TensorsKey((t.forward_mask, t.grad_mask))

    def _assign(
        self, t: SparseTensor, units: Tensor, in_a: Tensor, delta: UnitDelta | None = None
    ) -> TopologyChange:
        """Give ``t`` B's ``units`` and A's flags (through ``assign_delta`` when the units that
        changed are known), keeping the regulariser's coefficients current."""
        current = self._coefficients_current(t)
        if delta is None:
            change = t.storage.assign(units, in_a)
        else:
            change = t.storage.assign_delta(units, in_a, delta)
        if current:
            self._patch_coefficients(t, change)
        return change

    def _patch_coefficients(self, t: SparseTensor, change: TopologyChange) -> None:
        """Keep the regulariser's cached coefficients (1 on A, 1/D on B\\A, 0 on C) through a
        change given in units, writing only the changed units (dense storage only)."""
        cached = self._coefficient_cache.get(t.name)
        left_a, entered_a = change.left_a_units, change.entered_a_units
        if (
            cached is None
            or left_a is None
            or entered_a is None
            or change.entered_units is None
            or change.left_units is None
            or change.moved is not None  # entries (slots) moved: a compact storage
            or change.reset_slots is not None
            or cached[1].shape != t.shape
        ):
            return
        coefficients = cached[1]
        inverse = torch.ones(1, dtype=coefficients.dtype, device=coefficients.device) / t.density
        block = t.block
        write_units(coefficients, left_a, block, inverse.expand(left_a.numel(), block, block))
        entered = change.entered_units
        write_units(coefficients, entered, block, inverse.expand(entered.numel(), block, block))
        write_units(coefficients, change.left_units, block, 0.0)
        write_units(coefficients, entered_a, block, 1.0)
        self._coefficient_cache[t.name] = (TensorsKey((t.forward_mask, t.grad_mask)), coefficients)

    def _refresh_full_group(
        self, group: list[SparseTensor], explore: bool
    ) -> tuple[dict[str, TopologyChange], RankedReservoir | None]:
        """Rank the whole grid of every tensor of the group (O(n)); also rank its reservoir for
        the next refreshes (``None`` when the scores cannot be keyed)."""
        storages = [t.storage for t in group]
        scores = [s.grid_scores() for s in storages]  # |theta|, or block norms with blocks
        count_b, count_a = self._counts(group, explore)
        counts_b = [t.backward_count if explore else t.forward_count for t in group]
        backward = self._select(scores, counts_b)
        units = [torch.nonzero(b.reshape(-1)).squeeze(1) for b in backward]
        if not explore:
            in_a = [torch.ones_like(u, dtype=torch.bool) for u in units]
        else:
            # A = top-D among B's units: the same set as top-D over the grid.
            gathered = [s.reshape(-1)[u] for s, u in zip(scores, units, strict=True)]
            in_a = self._select(gathered, [t.forward_count for t in group])
        ranking = _rank_reservoir(scores, backward, _offsets(group), count_b)
        del scores, backward
        assigned = zip(group, units, in_a, strict=True)
        return {t.name: self._assign(t, u, a) for t, u, a in assigned}, ranking

    def _refresh_full(
        self, tensors: Sequence[SparseTensor], generator: torch.Generator, explore: bool
    ) -> dict[str, TopologyChange]:
        storages = [t.storage for t in tensors]
        scores = [s.grid_scores() for s in storages]  # |theta|, or block norms with blocks
        forward_counts = [t.forward_count for t in tensors]
        if not explore:
            backward = self._select(scores, forward_counts)
        elif self.random_exploration:
            # Top-k over these keeps A and draws B\A at random (per tensor or globally).
            forward = self._select(scores, forward_counts)
            randomised = [scores_extending(a, generator) for a in forward]
            backward = self._select(randomised, [t.backward_count for t in tensors])
        else:
            backward = self._select(scores, [t.backward_count for t in tensors])
        units = [torch.nonzero(b.reshape(-1)).squeeze(1) for b in backward]
        in_a: list[Tensor]
        if not explore:
            in_a = [torch.ones_like(u, dtype=torch.bool) for u in units]
        elif self.random_exploration:
            in_a = [a.reshape(-1)[u] for a, u in zip(forward, units, strict=True)]
        else:
            # A = top-D among B's units: the same set as top-D over the grid.
            gathered = [s.reshape(-1)[u] for s, u in zip(scores, units, strict=True)]
            in_a = self._select(gathered, forward_counts)
        del scores, backward
        return {t.name: self._assign(t, u, a) for t, u, a in zip(tensors, units, in_a, strict=True)}


def _refresh_workers(groups: list[list[SparseTensor]]) -> int:
    """Threads for a refresh: one per core torch uses (at most one per group) when the
    selection is compiled and every tensor lives on the CPU (host-side work only), else 1."""
    if len(groups) < 2 or not compiled_selection():
        return 1
    if any(t.storage.weight.device.type != "cpu" for g in groups for t in g):
        return 1
    return min(len(groups), torch.get_num_threads())


def compiled_selection() -> bool:
    """Whether incremental refreshes select through the compiled kernels
    (:meth:`RankedReservoir.select_compiled`); else through numpy (:meth:`RankedReservoir.select`),
    with the same result."""
    return kernels.available_backend() == "cpp"


def _span(values: np.ndarray, lo: int, hi: int) -> slice:
    """Where ascending ``values`` lie in [lo, hi)."""
    start, stop = np.searchsorted(values, [lo, hi])
    return slice(int(start), int(stop))


def _tensor(values: np.ndarray, device: torch.device) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.int64)).to(device)


def _offsets(group: list[SparseTensor]) -> list[int]:
    """Position of each tensor's first unit in the group's concatenation, and the total."""
    offsets = [0]
    for t in group:
        offsets.append(offsets[-1] + t.num_blocks)
    return offsets


def _rank_reservoir(
    scores: list[Tensor], backward: list[Tensor], offsets: list[int], size: int
) -> RankedReservoir | None:
    """The best ``size`` units of the reservoir C = not B over the group (see
    :mod:`alwayssparse.ranking`); ``None`` if their scores cannot be keyed exactly."""
    if offsets[-1] > MAX_POSITIONS:
        return None
    reservoir_scores, positions = [], []
    for s, b, offset in zip(scores, backward, offsets, strict=False):
        if s.dtype not in KEYED_DTYPES:
            return None
        outside = ~b.reshape(-1)
        reservoir_scores.append(s.reshape(-1)[outside].to("cpu", torch.float32).numpy())
        positions.append(torch.nonzero(outside).squeeze(1).cpu().numpy() + offset)
    values, where = np.concatenate(reservoir_scores), np.concatenate(positions)
    reservoir_size = values.size
    if values.size > size:
        # Units scoring at least the size-th best score (ties may add a few): key only those.
        threshold = np.partition(values, values.size - size)[values.size - size]
        best = values >= threshold
        values, where = values[best], where[best]
    keys = rank_keys(torch.from_numpy(values), where)
    if keys is None:
        return None
    ranking = RankedReservoir.build(keys, size)
    if ranking.floor < 0 and keys.size < reservoir_size:
        # Units below the threshold were never keyed: they rank below the frontier's last.
        ranking.floor = int(ranking.frontier[-1])
    return ranking


class _WeightedNorm(torch.autograd.Function):
    """sum(c * theta^2) ("l2") or sum(c * |theta|) ("l1") with a hand-written backward.

    One fused pass each way (:func:`alwayssparse.kernels.weighted_norm` and
    :func:`~alwayssparse.kernels.weighted_norm_grad`): composing square, mask products and sums
    through autograd is ~10x slower on CPU (62 ms against 6 ms forward+backward on a 1024 x
    4096 weight), torch's ``dot(w * c, w)`` and ``(2g * c) * w`` ~4x.
    """

    @staticmethod
    def forward(ctx: Any, weight: Tensor, coefficient: Tensor, norm: str) -> Tensor:
        ctx.save_for_backward(weight, coefficient)
        ctx.norm = norm
        return kernels.weighted_norm(weight, coefficient, norm)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        weight, coefficient = ctx.saved_tensors
        scale: Tensor | float = 2.0 * grad if ctx.norm == "l2" else grad
        if grad.device.type == "cpu":
            scale = float(scale)  # a Python float: one fused pass on the CPU
        return kernels.weighted_norm_grad(weight, coefficient, scale, ctx.norm), None, None
