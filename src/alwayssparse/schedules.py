"""Schedules: pure functions of the training step, shared by every method.

Step convention: ``Sparsity.step(step, ...)`` runs after optimizer step ``step`` (0-based), and
the masks it writes are used from step ``step + 1`` on. Schedules are therefore asked about the
*upcoming* step u = step + 1.

Update steps (RigL's Delta T, DynSparse's T / n):

    update at u  iff  start <= u < stop  and  (u - start) % interval == 0,  u > 0

Drop fraction at u, from the initial fraction alpha over [start, stop]:

    constant: alpha
    cosine:   alpha / 2 * (1 + cos(pi * (u - start) / (stop - start)))    (Evci et al. 2020, eq. 1)
    linear:   alpha * (1 - (u - start) / (stop - start))

Sparsity learning-rate rule (dynsparse-bert.md eq. 3):

    eta(s) = eta(s = 0) * exp(1.969 s^2 + 0.2905 s)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

DROP_SCHEDULES = ("cosine", "constant", "linear")


@dataclass(frozen=True)
class UpdateSchedule:
    """When masks are updated and what fraction is dropped.

    Attributes:
        interval: Steps between updates (> 0).
        start: First step at which updates may happen.
        stop: No updates at or after this step.
        drop_fraction: Initial fraction alpha of active units dropped per update.
        decay: ``"cosine"``, ``"constant"`` or ``"linear"``.
    """

    interval: int
    start: int
    stop: int
    drop_fraction: float
    decay: str = "cosine"

    def __post_init__(self) -> None:
        if self.interval < 1:
            raise ValueError(f"update interval must be >= 1, got {self.interval}")
        if self.start < 0 or self.stop < self.start:
            raise ValueError(f"need 0 <= start <= stop, got start={self.start} stop={self.stop}")
        if not 0.0 <= self.drop_fraction <= 1.0:
            raise ValueError(f"drop_fraction must be in [0, 1], got {self.drop_fraction}")
        if self.decay not in DROP_SCHEDULES:
            raise ValueError(
                f"drop schedule must be one of {list(DROP_SCHEDULES)}, got {self.decay!r}"
            )

    def is_update(self, upcoming: int) -> bool:
        """Whether masks change before optimizer step ``upcoming``."""
        return (
            upcoming > 0
            and self.start <= upcoming < self.stop
            and (upcoming - self.start) % self.interval == 0
        )

    def fraction(self, upcoming: int) -> float:
        """Drop fraction at step ``upcoming``."""
        if self.decay == "constant":
            return self.drop_fraction
        span = max(1, self.stop - self.start)
        progress = min(1.0, max(0.0, (upcoming - self.start) / span))
        if self.decay == "cosine":
            return self.drop_fraction / 2.0 * (1.0 + math.cos(math.pi * progress))
        return self.drop_fraction * (1.0 - progress)

    def update_steps(self) -> list[int]:
        """Every step at which masks are updated (for plots and tests)."""
        return [u for u in range(max(1, self.start), self.stop) if self.is_update(u)]


def cubic_sparsity(upcoming: int, initial: float, final: float, start: int, stop: int) -> float:
    """Gradual magnitude pruning's sparsity at step ``upcoming`` (Zhu & Gupta 2017, eq. 1).

    ``s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (t_end - t0))^3`` for t0 <= t <= t_end,
    ``s_i`` before t0 and ``s_f`` after t_end.
    """
    if upcoming <= start:
        return initial
    if upcoming >= stop:
        return final
    progress = (upcoming - start) / (stop - start)
    return final + (initial - final) * (1.0 - progress) ** 3


def sparse_learning_rate(dense_lr: float, sparsity: float) -> float:
    """The BERT paper's learning-rate rule for sparse models (dynsparse-bert.md eq. 3).

    ``eta(s) = eta(0) * exp(1.969 s^2 + 0.2905 s)``; e.g. x 6.40 at s = 0.9.
    """
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    return dense_lr * math.exp(1.969 * sparsity**2 + 0.2905 * sparsity)
