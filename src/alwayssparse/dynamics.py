"""Mask dynamics: how the sparsity pattern moves during training.

Every measure is taken on the forward mask A (m_i = 1 if weight i is used in the forward pass)
at *recorded points*, steps ``interval`` apart, and never needs a history of masks:

- **Change fraction** between consecutive recorded points t0 < t1, per sparse tensor,
  ``sum_i (m_i^t0 - m_i^t1)^2 / |theta|``, summarised by min, mean and max across layers
  (topkast.md section 4.1, Figure 3a, where points are 5,000 steps apart).
- **Reservoir entered**: C_0, the positions in neither A nor B at initialisation (for methods
  whose B equals A: the positions outside A), and the fraction of C_0 that has ever been in A
  (topkast.md section 4.1, Figure 3b: "only about 5% of these units are ever used").
- **Explored degrees of freedom**: the fraction of positions ever in A (dynsparse-bert.md
  section 3.3, Figure 5 and Figure 11 left; Liu et al.'s "in-time over-parametrisation").
- **Density** of A and B per tensor over time.
- **Accumulated pattern** of one tensor: per position, the number of recorded points at which it
  was in A (dynsparse-bert.md Figure 11 right, where black marks "non-zero at any point").

When the tracker is fed by a :class:`~alwayssparse.sparsity.Sparsity`, "ever in A" also merges
``Sparsity.ever_active``, which the method updates at *every* mask update, so explored DOF and the
reservoir fraction are exact even when A changes between recorded points.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from alwayssparse.jsonio import dumps_strict
from alwayssparse.masks import matrix_view
from alwayssparse.sparsity import Sparsity

DYNAMICS_FILE = "dynamics.jsonl"
PATTERN_FILE = "pattern.npy"


class MaskSource(Protocol):
    """Anything with the current masks: ``{name: (forward mask A, gradient mask B)}``."""

    def masks(self) -> dict[str, tuple[Tensor, Tensor]]: ...


# -- pure measures ------------------------------------------------------------------------------


def _check_pair(first: Tensor, second: Tensor, what: str) -> None:
    if first.shape != second.shape:
        raise ValueError(f"{what}: shapes differ, {tuple(first.shape)} vs {tuple(second.shape)}")
    if first.dtype != torch.bool or second.dtype != torch.bool:
        raise TypeError(f"{what}: masks must be bool, got {first.dtype} and {second.dtype}")


def mask_change_fraction(previous: Tensor, current: Tensor) -> float:
    """Fraction of positions whose A-membership flipped: ``sum (m^t0 - m^t1)^2 / numel``.

    topkast.md section 4.1 / Figure 3a. Both masks are bool tensors of one shape.
    """
    _check_pair(previous, current, "mask_change_fraction")
    return int(torch.count_nonzero(previous ^ current)) / previous.numel()


def reservoir_entered_fraction(initial_reservoir: Tensor, ever_active: Tensor) -> float | None:
    """Fraction of the initial reservoir C_0 that has ever been in A (topkast.md Figure 3b).

    Returns ``None`` when C_0 is empty (a dense layer, or GMP, which starts dense): the
    fraction of nothing is undefined, not 0.
    """
    _check_pair(initial_reservoir, ever_active, "reservoir_entered_fraction")
    size = int(torch.count_nonzero(initial_reservoir))
    if size == 0:
        return None
    return int(torch.count_nonzero(initial_reservoir & ever_active)) / size


def density(mask: Tensor) -> float:
    """Fraction of true entries; on an ever-in-A mask, the explored DOF (dynsparse-bert Fig. 5)."""
    if mask.dtype != torch.bool:
        raise TypeError(f"density: mask must be bool, got {mask.dtype}")
    return int(torch.count_nonzero(mask)) / mask.numel()


def layer_summary(values: Mapping[str, float]) -> dict[str, float | None]:
    """``min``, ``mean`` and ``max`` over layers (unweighted, as in topkast.md Figure 3a)."""
    if not values:
        return {"min": None, "mean": None, "max": None}
    numbers = list(values.values())
    return {"min": min(numbers), "mean": sum(numbers) / len(numbers), "max": max(numbers)}


def largest_tensor(shapes: Mapping[str, torch.Size]) -> str:
    """The name of the tensor with the most elements (the first one on ties)."""
    if not shapes:
        raise ValueError("no sparse tensors to choose a pattern layer from")
    return max(shapes, key=lambda name: shapes[name].numel())


def _pooled(counts: Mapping[str, tuple[int, int]]) -> float | None:
    """sum(numerators) / sum(denominators): a fraction over all tensors' positions together."""
    total = sum(d for _, d in counts.values())
    return sum(n for n, _ in counts.values()) / total if total else None


# -- the tracker --------------------------------------------------------------------------------


class MaskDynamics:
    """Tracks mask dynamics at recorded points, in O(one snapshot) memory.

    Call :meth:`record` right after ``sparsity.step(step, optimizer)`` with the number of optimizer
    steps done (the masks are then those of the next step), at step 0 before training and at every
    multiple of ``interval`` (:meth:`due` says when). In memory: the previous A of each tensor,
    the initial reservoir C_0, the ever-in-A masks, and the count image of one tensor (all on the
    CPU, so nothing dense is added to the accelerator). :meth:`write_to` appends the new records
    to ``dynamics.jsonl`` and saves the count image as ``pattern.npy``.

    Args:
        sparsity: The :class:`~alwayssparse.sparsity.Sparsity` (or any :class:`MaskSource`).
        interval: Steps between recorded points (topkast.md Figure 3a uses 5,000).
        pattern_layer: Tensor whose accumulated pattern is kept; default the largest.

    Record fields: ``step``; ``previous_step``; per-tensor dicts ``change_fraction``,
    ``reservoir_entered``, ``explored_dof``, ``forward_density``, ``backward_density``;
    ``change_fraction_{min,mean,max}`` across layers and ``*_total`` pooled over all positions;
    ``pattern_layer`` and ``pattern_points`` (recorded points accumulated in the image so far).
    Fractions that are undefined (no previous point, empty reservoir) are ``None``.
    """

    def __init__(
        self, sparsity: Sparsity | MaskSource, interval: int, pattern_layer: str | None = None
    ) -> None:
        if interval < 1:
            raise ValueError(f"interval must be >= 1, got {interval}")
        self.source = sparsity
        self.interval = interval
        shapes = {name: a.shape for name, (a, _) in sparsity.masks().items()}
        if pattern_layer is None:
            pattern_layer = largest_tensor(shapes)
        elif pattern_layer not in shapes:
            raise ValueError(
                f"pattern_layer {pattern_layer!r} is not a sparse tensor; one of {list(shapes)}"
            )
        self.pattern_layer = pattern_layer
        self.last_step: int | None = None
        self.previous: dict[str, Tensor] = {}
        self.initial_reservoir: dict[str, Tensor] = {}
        self.ever_active: dict[str, Tensor] = {}
        rows, cols = matrix_view(torch.empty(shapes[pattern_layer], device="meta")).shape
        self.pattern = torch.zeros(rows, cols, dtype=torch.int32)
        self.pattern_points = 0
        self._pending: list[dict[str, Any]] = []

    def due(self, step: int) -> bool:
        """Whether ``step`` (optimizer steps done) is a recorded point not yet recorded."""
        return step % self.interval == 0 and (self.last_step is None or step > self.last_step)

    def record(self, step: int) -> dict[str, Any]:
        """Measure the current masks as the point ``step``; return the record (also kept for
        :meth:`write_to`). The first recorded point fixes the initial reservoir C_0."""
        if self.last_step is not None and step <= self.last_step:
            raise ValueError(f"record steps must increase: got {step} after {self.last_step}")
        masks = {name: (_cpu(a), _cpu(b)) for name, (a, b) in self.source.masks().items()}
        if self.last_step is None:
            self.initial_reservoir = {name: ~(a | b) for name, (a, b) in masks.items()}
            self.ever_active = {name: a.clone() for name, (a, _) in masks.items()}
        exact = self.source.ever_active if isinstance(self.source, Sparsity) else {}
        for name, (a, _) in masks.items():
            self.ever_active[name] |= a
            if name in exact:
                self.ever_active[name] |= _cpu(exact[name])
        change = {
            name: mask_change_fraction(self.previous[name], a)
            for name, (a, _) in masks.items()
            if name in self.previous
        }
        sizes = {name: a.numel() for name, (a, _) in masks.items()}
        flips = {name: (round(f * sizes[name]), sizes[name]) for name, f in change.items()}
        summary = layer_summary(change)
        record: dict[str, Any] = {
            "step": step,
            "previous_step": self.last_step,
            "change_fraction": change,
            **{f"change_fraction_{key}": value for key, value in summary.items()},
            "change_fraction_total": _pooled(flips),
            **self._reservoir(),
            **_densities("explored_dof", self.ever_active),
            **_densities("forward_density", {n: a for n, (a, _) in masks.items()}),
            **_densities("backward_density", {n: b for n, (_, b) in masks.items()}),
        }
        self.pattern += matrix_view(masks[self.pattern_layer][0]).to(torch.int32)
        self.pattern_points += 1
        record["pattern_layer"] = self.pattern_layer
        record["pattern_points"] = self.pattern_points
        self.previous = {name: a for name, (a, _) in masks.items()}
        self.last_step = step
        self._pending.append(record)
        return record

    def _reservoir(self) -> dict[str, Any]:
        per_layer = {
            name: reservoir_entered_fraction(c, self.ever_active[name])
            for name, c in self.initial_reservoir.items()
        }
        counts = {
            name: (int(torch.count_nonzero(c & self.ever_active[name])), int(c.sum()))
            for name, c in self.initial_reservoir.items()
        }
        return {"reservoir_entered": per_layer, "reservoir_entered_total": _pooled(counts)}

    def write_to(self, run_dir: str | Path) -> None:
        """Append the records not yet written to ``run_dir/dynamics.jsonl``; save the count
        image (int32, the tensor's (out, in * kh * kw) matrix view) as ``run_dir/pattern.npy``."""
        run_dir = Path(run_dir)
        with (run_dir / DYNAMICS_FILE).open("a") as f:
            for record in self._pending:
                f.write(dumps_strict(record, nan_to_null=True) + "\n")
        self._pending.clear()
        tmp = run_dir / (PATTERN_FILE + ".tmp")
        with tmp.open("wb") as f:
            np.save(f, self.pattern.numpy())
        os.replace(tmp, run_dir / PATTERN_FILE)

    # -- checkpoints ------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything :meth:`record` needs to continue exactly after a resume."""
        return {
            "interval": self.interval,
            "pattern_layer": self.pattern_layer,
            "last_step": self.last_step,
            "previous": {n: m.clone() for n, m in self.previous.items()},
            "initial_reservoir": {n: m.clone() for n, m in self.initial_reservoir.items()},
            "ever_active": {n: m.clone() for n, m in self.ever_active.items()},
            "pattern": self.pattern.clone(),
            "pattern_points": self.pattern_points,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; the interval, pattern layer and tensor shapes must agree."""
        for key in ("interval", "pattern_layer"):
            if state[key] != getattr(self, key):
                raise ValueError(f"saved dynamics {key} {state[key]!r} != {getattr(self, key)!r}")
        shapes = {name: a.shape for name, (a, _) in self.source.masks().items()}
        for group in ("previous", "initial_reservoir", "ever_active"):
            saved = {name: m.shape for name, m in state[group].items()}
            if saved and saved != shapes:
                raise ValueError(f"saved dynamics {group!r} do not match the sparse tensors")
        if state["pattern"].shape != self.pattern.shape:
            raise ValueError("saved pattern image does not match the pattern layer's shape")
        self.last_step = state["last_step"]
        self.previous = {n: _cpu(m) for n, m in state["previous"].items()}
        self.initial_reservoir = {n: _cpu(m) for n, m in state["initial_reservoir"].items()}
        self.ever_active = {n: _cpu(m) for n, m in state["ever_active"].items()}
        self.pattern = state["pattern"].to("cpu", torch.int32, copy=True)
        self.pattern_points = int(state["pattern_points"])
        self._pending.clear()


def _cpu(mask: Tensor) -> Tensor:
    """A bool copy on the CPU (the masked backend hands out its live masks)."""
    return mask.detach().to("cpu", torch.bool, copy=True)


def _densities(key: str, masks: Mapping[str, Tensor]) -> dict[str, Any]:
    """``{key: per-tensor density, key_total: density over all positions}``."""
    counts = {name: (int(torch.count_nonzero(m)), m.numel()) for name, m in masks.items()}
    return {key: {name: density(m) for name, m in masks.items()}, f"{key}_total": _pooled(counts)}
