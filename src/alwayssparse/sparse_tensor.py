"""What a method sees of one sparse parameter: :class:`SparseTensor` and its :class:`UnitStorage`.

This is the half of the backend contract that methods use (the other half, what
:class:`alwayssparse.Sparsity` uses, is :class:`alwayssparse.backends.base.Backend`). A method
never knows which backend stores a tensor: it reads the trainable tensor and the masks, and it
changes the sets A and B through the storage, in *unit space* (flat indices on the block grid).

Every backend gives each sparse parameter one :class:`UnitStorage`. Its three views are read
from the backend on every access, so there is nothing to refresh after ``model.to(...)``, a
checkpoint load or a mask update:

    weight          the trainable tensor the optimizer holds (dense theta, or stored values)
    forward_mask    A as a bool tensor of ``weight``'s shape (in place of entries or slots)
    grad_mask       B, a superset of A, likewise

A mask update is ``storage.assign(units, in_a)``: B becomes the sorted ``units`` and A the flagged
ones. It returns a :class:`TopologyChange`, which :class:`~alwayssparse.Sparsity` hands to
``storage.carry_state(optimizer, change)`` so that the optimizer state follows the entries (and
starts at zero for entries that entered B). A method calls ``assign`` at most once per tensor
and update and returns the changes by tensor name.

Optional parts of the contract (each with a default that works for any storage, at O(n)):

    reservoir_token()    an opaque value that stays equal while neither B nor theta outside B
                         changed other than by training B; lets a method keep a ranking of the
                         reservoir C between its own assigns (Top-KAST,
                         :mod:`alwayssparse.ranking`). Default ``None``: unknown, rank the whole
                         grid every time.
    mark_forward(mask, change)
                         ``mask |= A``; given the :class:`TopologyChange` that led to this A, a
                         storage may mark only the units that entered A (``mask`` already holds
                         the old A).

and :class:`TopologyChange` may describe the change in unit space (``entered_units``,
``left_units``, ``entered_a_units``) instead of, or besides, a dense ``entered`` mask, so that
bookkeeping touches only what changed.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from alwayssparse.masks import (
    block_norms,
    collapse_blocks,
    count_for_density,
    expand_blocks,
    gather_units,
    tile_norms,
    write_units,
)
from alwayssparse.optim_state import zero_state

# Row chunks of the dense weight gradient, (first row, rows) (see alwayssparse.capture).
GradientRows = Callable[[str, int], Iterator[tuple[int, Tensor]]]


class TensorsKey:
    """Identifies the contents of some tensors for a cache: the same objects (held here, so
    their ids cannot be reused) at the same in-place version counters."""

    def __init__(self, tensors: Sequence[Tensor]) -> None:
        self.tensors = tuple(tensors)
        self.versions = tuple(t._version for t in self.tensors)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, TensorsKey)
            and len(other.tensors) == len(self.tensors)
            and all(a is b for a, b in zip(self.tensors, other.tensors, strict=True))
            and self.versions == other.versions
        )

    __hash__ = None  # type: ignore[assignment]


@dataclass
class TopologyChange:
    """What one ``assign`` did, for the optimizer state.

    Attributes:
        entered: Bool tensor of ``weight``'s shape: entries (or slots) that entered B; their
            optimizer state starts at zero. ``None`` when the change is given in unit space
            (``entered_units``): :meth:`entered_mask` builds it on demand.
        moved: For storage whose entries change slots (compact storage): the (old slots, new
            slots) of the units kept in B; their optimizer state moves with them. ``None``:
            entries keep their place.
        entered_units: Sorted units (block-grid indices) that entered B, or ``None``.
        left_units: Sorted units that left B, or ``None``.
        entered_a_units: Sorted units that entered A, or ``None`` (unknown).
        left_a_units: Sorted units that left A (into B \\ A or out of B), or ``None``.
        reset_slots: For compact storage patched in place: the slots whose optimizer state
            starts at zero (units entered or left them); every other slot's state stays.
    """

    entered: Tensor | None = None
    moved: tuple[Tensor, Tensor] | None = None
    entered_units: Tensor | None = None
    left_units: Tensor | None = None
    entered_a_units: Tensor | None = None
    left_a_units: Tensor | None = None
    reset_slots: Tensor | None = None

    def entered_mask(self, storage: UnitStorage) -> Tensor:
        """``entered`` as a bool tensor of the storage's ``weight`` shape (dense storage)."""
        if self.entered is not None:
            return self.entered
        if self.entered_units is None:
            raise ValueError("a TopologyChange needs entered or entered_units")
        weight = storage.weight
        mask = torch.zeros(weight.shape, dtype=torch.bool, device=weight.device)
        write_units(mask, self.entered_units.to(weight.device), storage.tensor.block, True)
        return mask


@dataclass
class UnitDelta:
    """What a mask update changes, when the caller knows it: sorted int64 units.

    Attributes:
        entered: Units that enter B.
        left: Units that leave B.
        entered_a: Units that enter A.
        left_a: Units that leave A (staying in B or not).
    """

    entered: Tensor
    left: Tensor
    entered_a: Tensor
    left_a: Tensor


class UnitStorage(ABC):
    """One sparse parameter's storage: the trainable tensor, A and B, and their updates.

    Subclasses implement the views and the unit-space operations; ``tensor`` (the
    :class:`SparseTensor` it serves, for the block geometry) is set when that is built.
    """

    tensor: SparseTensor

    def bind(self, tensor: SparseTensor) -> None:
        """Called once by the :class:`SparseTensor` this storage serves."""
        self.tensor = tensor

    # -- views -----------------------------------------------------------------------------------

    @property
    @abstractmethod
    def weight(self) -> Tensor:
        """The trainable tensor (the one the optimizer holds)."""

    @property
    @abstractmethod
    def forward_mask(self) -> Tensor:
        """A, bool, of ``weight``'s shape."""

    @property
    @abstractmethod
    def grad_mask(self) -> Tensor:
        """B ⊇ A, bool, of ``weight``'s shape."""

    @abstractmethod
    def dense_masks(self) -> tuple[Tensor, Tensor]:
        """(A, B) as dense bool tensors of the parameter's shape (inspection, export)."""

    # -- unit space --------------------------------------------------------------------------------

    @abstractmethod
    def units(self) -> tuple[Tensor, Tensor]:
        """(units of B, sorted int64; bool per unit: whether it is in A)."""

    @abstractmethod
    def unit_scores(self) -> Tensor:
        """Block importance of theta at each unit of ``units()`` (same order), float."""

    @abstractmethod
    def grid_scores(self) -> Tensor:
        """Block importance of theta at every unit of the grid (shape ``block_shape``); needs
        theta of the whole tensor (Top-KAST's reservoir)."""

    @abstractmethod
    def assign(self, units: Tensor, in_a: Tensor, zeroed: Tensor | None = None) -> TopologyChange:
        """Make B = ``units`` (sorted) and A = ``units[in_a]``; set theta to 0 at ``zeroed``."""

    @abstractmethod
    def write(self, units: Tensor, values: Tensor) -> None:
        """Set theta at ``units`` (a subset of B) to ``values``: b*b per unit, row-major."""

    # -- bookkeeping with defaults ---------------------------------------------------------------

    def assign_delta(
        self, units: Tensor, in_a: Tensor, delta: UnitDelta, zeroed: Tensor | None = None
    ) -> TopologyChange:
        """``assign(units, in_a, zeroed)`` for a caller that also knows what changes
        (``delta``, consistent with the sets before and after): a storage may then skip
        finding it, and touch only the changed units. Default: ``assign``."""
        return self.assign(units, in_a, zeroed)

    def reservoir_token(self) -> object | None:
        """An opaque value, equal (``==``) between two calls while B and theta outside B changed
        only by training B (the optimizer and ``write`` on B). A method that ranked the
        reservoir C may then reuse that ranking: theta on C, and on the units that left B at
        its own last ``assign`` (with the values it scored them by), is what it was.

        Anything else (another ``assign``, a checkpoint load, a move to another device) must
        change it. Default ``None``: the storage cannot tell; rank the whole grid every time.
        """
        return None

    def carry_state(self, optimizer: torch.optim.Optimizer, change: TopologyChange) -> None:
        """Optimizer state after ``change``: zero outside B and for entries that entered B."""
        zero_state(optimizer, self.weight, ~self.grad_mask | change.entered_mask(self))

    def mark_forward(self, mask: Tensor, change: TopologyChange | None = None) -> None:
        """``mask |= A`` in place, for a dense bool ``mask`` of the parameter's shape.

        With the ``change`` that produced this A and ``mask`` already holding the A before it,
        only the units that entered A (``change.entered_a_units``) need marking.
        """
        if change is not None and change.entered_a_units is not None:
            write_units(mask, change.entered_a_units.to(mask.device), self.tensor.block, True)
            return
        units, in_a = self.units()
        write_units(mask, units[in_a], self.tensor.block, True)

    def counts(self) -> tuple[int, int]:
        """(entries in A, entries in B), recounted only when the sets changed."""
        key = TensorsKey(self._set_tensors())
        if self._counts is None or self._counts[0] != key:
            self._counts = (key, self._count())
        return self._counts[1]

    _counts: tuple[TensorsKey, tuple[int, int]] | None = None

    def _count(self) -> tuple[int, int]:
        units, in_a = self.units()
        unit = self.tensor.block**2
        return int(torch.count_nonzero(in_a)) * unit, units.numel() * unit

    def _set_tensors(self) -> tuple[Tensor, ...]:
        """The tensors that hold A and B (their versions key the cached counts)."""
        return (self.forward_mask, self.grad_mask)


class DenseStorage(UnitStorage):
    """:class:`UnitStorage` over a dense theta and dense bool masks.

    The masked backend subclasses it to read its buffers on every access; built with tensors it
    serves them as they are (tests, the sparse backend's initial dense view).
    """

    def __init__(
        self,
        weight: Tensor | None = None,
        forward_mask: Tensor | None = None,
        grad_mask: Tensor | None = None,
    ) -> None:
        self._weight, self._forward, self._grad = weight, forward_mask, grad_mask

    @property
    def weight(self) -> Tensor:
        assert self._weight is not None
        return self._weight

    @property
    def forward_mask(self) -> Tensor:
        assert self._forward is not None
        return self._forward

    @property
    def grad_mask(self) -> Tensor:
        assert self._grad is not None
        return self._grad

    def dense_masks(self) -> tuple[Tensor, Tensor]:
        return self.forward_mask, self.grad_mask

    _units_cache: tuple[TensorsKey, Tensor, Tensor] | None = None

    def units(self) -> tuple[Tensor, Tensor]:
        """B's units and A's flags: read from the masks once per change (O(n)), kept until the
        masks are written again (``assign`` leaves them here for the next call). The returned
        tensors are shared: do not modify them."""
        key = TensorsKey((self.forward_mask, self.grad_mask))
        cached = self._units_cache
        if cached is not None and cached[0] == key:
            return cached[1], cached[2]
        t = self.tensor
        units = torch.nonzero(t.collapse(self.grad_mask).reshape(-1)).squeeze(1)
        in_a = t.collapse(self.forward_mask).reshape(-1)[units]
        self._units_cache = (key, units, in_a)
        return units, in_a

    def unit_scores(self) -> Tensor:
        t = self.tensor
        tiles = gather_units(self.weight.detach(), self.units()[0], t.block)
        return tile_norms(tiles, t.block_norm)

    def grid_scores(self) -> Tensor:
        return self.tensor.scores()

    def assign(self, units: Tensor, in_a: Tensor, zeroed: Tensor | None = None) -> TopologyChange:
        """Write only the units that enter or leave A and B into the masks: O(|B| log |B|) to
        find them (against the cached old units), O(changed) to write them."""
        device = self.grad_mask.device
        old_units, old_in_a = self.units()
        units = units.to(device=device, dtype=torch.long)
        in_a = in_a.to(device=device, dtype=torch.bool)
        new_a, old_a = units[in_a], old_units[old_in_a]
        delta = UnitDelta(
            entered=difference(units, old_units), left=difference(old_units, units),
            entered_a=difference(new_a, old_a), left_a=difference(old_a, new_a),
        )  # fmt: skip
        return self._apply(units, in_a, delta, zeroed)

    def assign_delta(
        self, units: Tensor, in_a: Tensor, delta: UnitDelta, zeroed: Tensor | None = None
    ) -> TopologyChange:
        device = self.grad_mask.device
        units = units.to(device=device, dtype=torch.long)
        in_a = in_a.to(device=device, dtype=torch.bool)
        moved = UnitDelta(*(d.to(device=device, dtype=torch.long) for d in vars(delta).values()))
        return self._apply(units, in_a, moved, zeroed)

    def _apply(
        self, units: Tensor, in_a: Tensor, delta: UnitDelta, zeroed: Tensor | None
    ) -> TopologyChange:
        t = self.tensor
        grad_mask, forward_mask = self.grad_mask, self.forward_mask
        if zeroed is not None and zeroed.numel():
            with torch.no_grad():
                write_units(self.weight, zeroed.to(grad_mask.device), t.block, 0.0)
        writes = ((grad_mask, delta.entered, delta.left), (forward_mask, delta.entered_a,
                                                           delta.left_a))  # fmt: skip
        for mask, on, off in writes:
            if on.numel():
                write_units(mask, on, t.block, True)
            if off.numel():
                write_units(mask, off, t.block, False)
        self._units_cache = (TensorsKey((forward_mask, grad_mask)), units, in_a)
        return TopologyChange(
            entered_units=delta.entered, left_units=delta.left,
            entered_a_units=delta.entered_a, left_a_units=delta.left_a,
        )  # fmt: skip

    def write(self, units: Tensor, values: Tensor) -> None:
        t = self.tensor
        tiles = values.to(self.weight).reshape(-1, t.block, t.block)
        with torch.no_grad():
            write_units(self.weight, units, t.block, tiles)

    def mark_forward(self, mask: Tensor, change: TopologyChange | None = None) -> None:
        if change is not None and change.entered_a_units is not None:
            super().mark_forward(mask, change)
            return
        mask.logical_or_(self.forward_mask.to(mask.device))

    def _count(self) -> tuple[int, int]:
        a, b = self.forward_mask, self.grad_mask
        return int(torch.count_nonzero(a)), int(torch.count_nonzero(b))


def difference(a: Tensor, b: Tensor) -> Tensor:
    """The elements of sorted ``a`` that are not in sorted ``b`` (both int64, distinct)."""
    if a.numel() == 0 or b.numel() == 0:
        return a
    position = torch.searchsorted(b, a).clamp_(max=b.numel() - 1)
    return a[b[position] != a]


def set_masks(tensor: SparseTensor, forward: Tensor, grad: Tensor) -> Tensor:
    """Write new dense A and B in place (dense storage); return the entries that entered B."""
    entered = grad & ~tensor.grad_mask
    tensor.forward_mask.copy_(forward)
    tensor.grad_mask.copy_(grad)
    return entered


@dataclass(eq=False)
class SparseTensor:
    """One sparse parameter as a method sees it.

    Selection happens on the *block grid*: with ``block == 1`` that is the tensor itself; with
    ``block == b`` it is the (rows / b, cols / b) grid of b x b tiles of the tensor's matrix view
    (out, in * kh * kw). Counts are in blocks; masks are stored per element (or per slot).

    Attributes:
        name: Full parameter name in the user's model (e.g. ``"blocks.0.mlp.fc.weight"``).
        shape: The dense shape of the parameter.
        density: Target forward density D of this tensor (fraction of entries in A).
        backward_density: Target density of B (>= ``density``).
        storage: The backend's storage of this tensor (views and mask updates).
        block: Block edge length (1 = unstructured).
        block_norm: Block importance: ``"l1"``, ``"l2"`` or ``"linf"`` (dynsparse-bert eq. 1).
        module: The layer that computes with the weight (RigL's capture, the FLOP ledger).
        op: What that layer computes with it: ``"linear"`` (y = x W^T, incl. a sparse backend's
            layer), ``"linear_t"`` (y = x W with W stored (in, out), Hugging Face ``Conv1D``; its
            block grid and gradient rows are those of W as stored, rows = inputs) or
            ``"conv1d"``/``"conv2d"``/``"conv3d"`` (any ``groups``); ``None`` for anything else.
        gradient_rows: Where the dense weight gradient comes from, one chunk of rows at a time
            (set by :class:`~alwayssparse.Sparsity` for methods that rank by it; else ``None``).
    """

    name: str
    shape: tuple[int, ...]
    density: float
    backward_density: float
    storage: UnitStorage
    block: int = 1
    block_norm: str = "l1"
    module: nn.Module | None = None
    op: str | None = None
    gradient_rows: GradientRows | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.shape = tuple(self.shape)
        self.storage.bind(self)

    @classmethod
    def dense(
        cls, name: str, weight: Tensor, forward_mask: Tensor, grad_mask: Tensor, **kwargs: object
    ) -> SparseTensor:
        """A tensor over plain dense tensors (``density`` defaults to A's fraction)."""
        fraction = int(torch.count_nonzero(forward_mask)) / forward_mask.numel()
        options = {"density": fraction, "backward_density": fraction, **kwargs}
        storage = DenseStorage(weight, forward_mask, grad_mask)
        return cls(name=name, shape=tuple(weight.shape), storage=storage, **options)  # type: ignore[arg-type]

    # -- views (always the backend's current tensors) ----------------------------------------------

    @property
    def weight(self) -> Tensor:
        """The trainable tensor: dense theta, or a compact backend's stored values."""
        return self.storage.weight

    @property
    def forward_mask(self) -> Tensor:
        """A, bool, of ``weight``'s shape."""
        return self.storage.forward_mask

    @property
    def grad_mask(self) -> Tensor:
        """B, bool, of ``weight``'s shape."""
        return self.storage.grad_mask

    # -- block geometry ----------------------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        """Number of selectable units (entries, or b x b tiles)."""
        return math.prod(self.shape) // (self.block * self.block)

    @property
    def block_shape(self) -> tuple[int, ...]:
        """Shape of the block grid."""
        if self.block == 1:
            return self.shape
        rows = self.shape[0]
        return (rows // self.block, math.prod(self.shape) // rows // self.block)

    @property
    def forward_count(self) -> int:
        """Number of blocks A holds at the target density."""
        return count_for_density(self.num_blocks, self.density)

    @property
    def backward_count(self) -> int:
        """Number of blocks B holds at the target backward density."""
        backward = count_for_density(self.num_blocks, self.backward_density)
        return max(self.forward_count, backward)

    def scores(self, values: Tensor | None = None) -> Tensor:
        """Block importance of ``values`` (default theta): the magnitude score on the grid."""
        return block_norms(self.weight if values is None else values, self.block, self.block_norm)

    def expand(self, block_mask: Tensor) -> Tensor:
        """Element mask (the parameter's shape) of a block-grid mask."""
        return expand_blocks(block_mask, self.block, self.shape)

    def collapse(self, mask: Tensor) -> Tensor:
        """Block-grid mask of an element mask."""
        return collapse_blocks(mask, self.block)

    def dense_gradient_rows(self, rows_per_chunk: int) -> Iterator[tuple[int, Tensor]]:
        """Consecutive rows of dL/dW of the last step as (first row, rows), never all at once."""
        if self.gradient_rows is None:
            raise RuntimeError(
                f"{self.name}: no dense-gradient capture; methods that rank by the dense "
                "gradient set uses_dense_gradient = True"
            )
        return self.gradient_rows(self.name, rows_per_chunk)
