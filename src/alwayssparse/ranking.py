"""Exact top-k selections kept up to date in O(|B|): Top-KAST's ranked reservoir.

Top-KAST selects B = top-kB and A = top-kA (kA <= kB) of the units of one tensor (or of several,
with global selection) by score, ties broken by the lower position. Between two refreshes theta
outside B (the reservoir C) never changes, so neither does its ranking; only B's scores move.
The next B is therefore the top-kB of (B's current scores) merged with (the top of C), and only
C's best units can enter it. :class:`RankedReservoir` keeps that top of C, the *frontier*, and
selects in time proportional to |B| and to the units that cross a boundary:

    frontier    C's best units in rank order; every unit of C outside it ranks below ``floor``
    tau         the best unit of C (the frontier's first, or ``floor`` when it is empty)
    B's units ranking above tau stay in B; the others (S) compete with the frontier for the
    remaining places: sort S with the first few frontier units, take the best.
    A           the top-kA of the new B, likewise: A's old units that rank above every other
                unit of the new B stay in A; the few below compete with the best outsiders.
    afterwards  the frontier loses the units that entered B and gains those that left it (those
                ranking below ``floor`` are forgotten: nothing is known between them and it).

When the selection would need a unit below ``floor`` (the frontier ran dry), it is not exact and
:meth:`RankedReservoir.select` returns ``None``: the caller ranks the whole grid again and builds
a new frontier from it (:meth:`RankedReservoir.build`, O(n), rare).

Ranks are compared as one int64 *key* per unit (:func:`rank_keys`): the float32 score's bits
(non-negative floats order like their bit patterns) above the bit-inverted position, so that
``key_a > key_b`` exactly when a has the larger score, or the same score and the lower position:
the order of :func:`alwayssparse.masks.topk_mask` and
:func:`alwayssparse.masks.global_topk_masks`. The keys are distinct, so every selection is a
plain integer comparison, partition or sort, on the host: in numpy (:meth:`RankedReservoir.select`)
or, with the same result, in one call to the compiled kernels that also builds the keys and the
lists of units crossing a boundary (:meth:`RankedReservoir.select_compiled`,
:func:`alwayssparse.kernels.topkast_select`: a few branch-free passes over B, and the frontier
updated in place).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from alwayssparse import kernels

_POSITION_BITS = 32
_POSITION_MASK = (1 << _POSITION_BITS) - 1
MAX_POSITIONS = 1 << _POSITION_BITS
# Scores whose float32 values order like the originals (float64 would round: ties could appear).
KEYED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def rank_keys(scores: Tensor, positions: np.ndarray) -> np.ndarray | None:
    """int64 keys of units with ``scores`` (>= 0) at ``positions`` (< 2^32): larger key = better.

    ``None`` when keys cannot represent the order exactly: scores of another dtype, NaN or
    negative scores (the full top-k then decides, and raises on NaN).
    """
    if scores.dtype not in KEYED_DTYPES:
        return None
    values = scores.detach().reshape(-1).to("cpu", torch.float32).numpy()
    if values.size and not bool(values.min() >= 0.0):  # NaN fails the comparison too
        return None
    bits = (values + np.float32(0.0)).view(np.int32).astype(np.int64)  # -0.0 + 0.0 is +0.0
    return (bits << _POSITION_BITS) | (_POSITION_MASK - positions.astype(np.int64))


def key_positions(keys: np.ndarray) -> np.ndarray:
    """The positions encoded in ``keys`` (int64)."""
    return _POSITION_MASK - (keys & _POSITION_MASK)


def top_keys(keys: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` largest of distinct ``keys``, in descending order."""
    if k <= 0:
        return keys[:0].copy()
    if k < keys.size:
        keys = np.partition(keys, keys.size - k)[keys.size - k :]
    return np.sort(keys)[::-1].copy()


def _top_mask(keys: np.ndarray, k: int) -> np.ndarray:
    """Bool mask of the ``k`` largest of distinct ``keys``."""
    if k >= keys.size:
        return np.ones(keys.size, dtype=bool)
    if k <= 0:
        return np.zeros(keys.size, dtype=bool)
    kth = np.partition(keys, keys.size - k)[keys.size - k]
    return keys >= kth


@dataclass
class Selection:
    """One incremental selection over the units of B before it (in their order) plus the units
    that enter from the reservoir.

    Attributes:
        keep: Bool per unit of the old B: whether it stays in B.
        entering: Keys of the units that enter B from the reservoir (any order).
        keep_in_a: Bool per kept unit (in order): whether it is in the new A.
        entering_in_a: Bool per entering unit: whether it is in the new A.
    """

    keep: np.ndarray
    entering: np.ndarray
    keep_in_a: np.ndarray
    entering_in_a: np.ndarray


@dataclass
class Refresh:
    """One incremental selection as positions (ascending int64 arrays).

    Attributes:
        units, in_a: B after the selection, and whether each of its units is in A.
        entered, left: Units that enter and leave B.
        entered_a, left_a: Units that enter and leave A.
    """

    units: np.ndarray
    in_a: np.ndarray
    entered: np.ndarray
    left: np.ndarray
    entered_a: np.ndarray
    left_a: np.ndarray


class RankedReservoir:
    """The ranked top of the reservoir C of one selection group (see the module docstring).

    Attributes:
        frontier: Keys of C's best units, descending.
        floor: Every unit of C not in ``frontier`` has a key below it; -1 when there is none.
        size: How many units a rebuilt frontier holds (at most all of C).
        tokens: The storages' reservoir tokens after the last assign (the frontier is only
            valid while they are unchanged).
    """

    def __init__(self, frontier: np.ndarray, floor: int, size: int) -> None:
        # Kept ascending (the best last): units enter B from the end, and leaving ones are
        # inserted with one search, without reversed copies.
        self._ascending = np.ascontiguousarray(frontier[::-1])
        self._buffer: np.ndarray | None = None  # room for in-place updates (select_compiled)
        self.floor = floor
        self.size = size
        self.tokens: list[object] | None = None

    @property
    def frontier(self) -> np.ndarray:
        """Keys of C's best units, descending (a view)."""
        return self._ascending[::-1]

    @classmethod
    def build(cls, reservoir_keys: np.ndarray, size: int) -> RankedReservoir:
        """From the keys of every unit of C (a full ranking): keep the best ``size``."""
        frontier = top_keys(reservoir_keys, size)
        floor = int(frontier[-1]) if frontier.size < reservoir_keys.size else -1
        return cls(frontier, floor, size)

    def select(
        self, keys: np.ndarray, in_a: np.ndarray, count_b: int, count_a: int
    ) -> Selection | None:
        """New B = top-``count_b`` of (B's units with ``keys`` ∪ C), new A = top-``count_a`` of it.

        ``keys`` and ``in_a`` describe the current B (any order); the frontier is updated for
        the new selection. ``None`` (frontier unchanged) when the known part of C does not
        decide it exactly.
        """
        frontier, floor = self.frontier, self.floor
        tau = int(frontier[0]) if frontier.size else floor
        above = keys > tau  # these outrank every unit of C
        q = int(np.count_nonzero(above))
        if q >= count_b:
            keep = above if q == count_b else above & _top_mask(np.where(above, keys, -1), count_b)
            entering = frontier[:0]
            dropped = np.sort(keys[~keep])[::-1]
            taken = 0
        else:
            rest = np.flatnonzero(~above)  # S: B's units that rank below tau
            places = count_b - q
            candidates = np.concatenate([keys[rest], frontier[:places]])
            order = np.argsort(candidates)[::-1]
            if order.size < places:
                return None  # fewer known candidates than places: unknown units would enter
            chosen = order[:places]
            last = int(candidates[chosen[-1]]) if places else tau
            if floor >= 0 and last <= floor:
                return None  # a unit below the floor might outrank the last one chosen
            from_b = chosen[chosen < rest.size]
            keep = above.copy()
            keep[rest[from_b]] = True
            taken = places - from_b.size  # a prefix of the frontier (it is in rank order)
            entering = frontier[:taken]
            not_chosen = order[places:]
            dropped = candidates[not_chosen[not_chosen < rest.size]]  # descending
        self._update_frontier(taken, dropped)
        keep_in_a, entering_in_a = _select_a(keys[keep], in_a[keep], entering, count_a)
        return Selection(keep, entering, keep_in_a, entering_in_a)

    def select_compiled(
        self, scores: Tensor, positions: Tensor, in_a: Tensor, count_b: int, count_a: int
    ) -> Refresh | None:
        """:meth:`select`, with the keys of :func:`rank_keys` and the units that cross a
        boundary, in one call to the compiled kernels (a few sequential passes over B).

        ``scores`` (float32), ``positions`` (int64, strictly ascending) and ``in_a`` describe
        the current B. ``None`` (frontier unchanged) when the known part of C does not decide
        the selection or a score cannot be keyed (negative, NaN). Raises ``NotImplementedError``
        without the compiled kernels (use :meth:`select`).
        """
        length = self._ascending.size
        buffer = self._buffer
        if buffer is None or buffer.ctypes.data != self._ascending.ctypes.data:
            # A buffer with room: the kernel merges the units leaving B in place.
            self._buffer = np.empty(length + length // 4 + 1024, dtype=np.int64)
            self._buffer[:length] = self._ascending
        result = kernels.topkast_select(
            scores, positions, in_a, torch.from_numpy(self._buffer), length, self.floor,
            count_b, count_a,
        )  # fmt: skip
        if result is None:
            raise NotImplementedError("the compiled kernels are not available")
        if int(result[0]) != 0:
            return None
        self._buffer = result[1].numpy()
        self._ascending = self._buffer[: int(result[8])]
        return Refresh(*(r.numpy() for r in result[2:8]))

    def _update_frontier(self, taken: int, dropped: np.ndarray) -> None:
        """Remove the ``taken`` best units (they entered B); add ``dropped`` (descending: they
        left it), those above the floor."""
        remaining = self._ascending[: self._ascending.size - taken]
        if self.floor >= 0:
            dropped = dropped[dropped > self.floor]
        if dropped.size:
            dropped = dropped[::-1]
            remaining = np.insert(remaining, np.searchsorted(remaining, dropped), dropped)
        self._ascending = remaining


def _select_a(
    keys: np.ndarray, in_a: np.ndarray, entering: np.ndarray, count_a: int
) -> tuple[np.ndarray, np.ndarray]:
    """A = top-``count_a`` of the new B = (kept units with ``keys``, old A flags ``in_a``) ∪
    ``entering``; returns the A flags of both parts."""
    total = keys.size + entering.size
    if count_a >= total:
        return np.ones(keys.size, dtype=bool), np.ones(entering.size, dtype=bool)
    outsiders = np.concatenate([keys[~in_a], entering])  # the new B's units not in the old A
    best_outsider = int(outsiders.max()) if outsiders.size else -1
    stays = in_a & (keys > best_outsider)  # outrank every unit of the new B outside old A
    p = int(np.count_nonzero(stays))
    if p >= count_a:
        keep_in_a = stays if p == count_a else stays & _top_mask(np.where(stays, keys, -1), count_a)
        return keep_in_a, np.zeros(entering.size, dtype=bool)
    places = count_a - p
    # R: the old A's units below the best outsider; they and the outsiders compete.
    r_index = np.flatnonzero(in_a & ~stays)
    r_keys = keys[r_index]
    if r_keys.size >= places:
        # The places-th best of R bounds the winners from below: only outsiders above it count.
        bound = int(np.partition(r_keys, r_keys.size - places)[r_keys.size - places])
        contenders = np.flatnonzero(outsiders >= bound)
    else:
        contenders = np.arange(outsiders.size)
    pool = np.concatenate([r_keys, outsiders[contenders]])
    winners = np.flatnonzero(_top_mask(pool, places))
    keep_in_a = stays.copy()
    keep_in_a[r_index[winners[winners < r_keys.size]]] = True
    won = contenders[winners[winners >= r_keys.size] - r_keys.size]
    outsider_in_a = np.zeros(outsiders.size, dtype=bool)
    outsider_in_a[won] = True
    not_a = np.flatnonzero(~in_a)
    keep_in_a[not_a[outsider_in_a[: not_a.size]]] = True
    return keep_in_a, outsider_in_a[not_a.size :]
