"""The method interface: a small dataclass of options plus a few hooks.

A method decides *which* entries of each sparse tensor are used in the forward pass (set A, the
forward mask) and which receive gradient (set B, the gradient mask, a superset of A), and how both
change over training. It never touches the optimizer or the storage: the backend owns the storage,
:class:`alwayssparse.Sparsity` owns the loop. Each hook receives what it needs explicitly,
including the training step.

Hooks:
    validate(sparsity): reject invalid options before training starts.
    setup(total_steps, block): resolve schedules once the run length is known.
    updates_at(step): whether update() after optimizer step ``step`` may change anything.
    needs_dense_gradient(step): RigL asks for the inputs and output gradients of its layers.
    backward_sparsity_for(sparsity): global sparsity of B (Top-KAST: 1 - (D + M); others: S).
    init_masks(tensors, generator): write the initial A and B into every tensor, in place.
    update(step, tensors, generator): after optimizer step ``step``, change masks if due; return,
        per tensor name, the entries that entered B (their optimizer state is reset).
    regularizer(tensors): an extra loss term, or ``None``.

Mask updates work in *unit space*: each tensor's :class:`UnitStorage` (``SparseTensor.storage``)
hands out B as sorted flat indices on the block grid with a per-unit A flag, scores them, and
takes the new sets back. The masked backend's storage reads and writes its dense masks
(:class:`DenseStorage`); the sparse backend's reads and rebuilds its stored slots directly, so a
prune/regrow update there allocates nothing of the weight's size. Both run the same method code,
hence the same masks and the same random draws.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Protocol

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


class UnitStorage(Protocol):
    """One tensor's sets A and B in unit space (flat indices on the block grid).

    ``units()`` lists B sorted; every other call refers to units by that index.
    """

    def units(self) -> tuple[Tensor, Tensor]:
        """(units of B, sorted int64; bool per unit: whether it is in A)."""
        ...

    def unit_scores(self) -> Tensor:
        """Block importance of theta at each unit of ``units()`` (same order), float."""
        ...

    def grid_scores(self) -> Tensor:
        """Block importance of theta at every unit of the grid (shape ``block_shape``).

        Needs theta of the whole tensor: a dense host tensor of the grid's size (Top-KAST).
        """
        ...

    def assign(self, units: Tensor, in_a: Tensor, zeroed: Tensor | None = None) -> Tensor:
        """Make B = ``units`` (sorted) and A = ``units[in_a]``; set theta to 0 at ``zeroed``.

        Returns the entries that entered B, in the form ``zero_state`` takes for this tensor's
        ``weight`` (their optimizer state must start at zero).
        """
        ...

    def write(self, units: Tensor, values: Tensor) -> None:
        """Set theta at ``units`` (a subset of B) to ``values``: b*b per unit, row-major."""
        ...


@dataclass
class SparseTensor:
    """One sparse parameter as a method sees it.

    Selection happens on the *block grid*: with ``block == 1`` that is the tensor itself; with
    ``block == b`` it is the (rows / b, cols / b) grid of b x b tiles of the tensor's matrix view
    (out, in * kh * kw). Counts are in blocks; masks are stored per element.

    Attributes:
        name: Full parameter name in the user's model (e.g. ``"blocks.0.mlp.fc.weight"``).
        weight: The trainable tensor: dense theta, or on the sparse backend (after the initial
            masks) the stored values, with ``forward_mask``/``grad_mask`` per stored slot.
        density: Target forward density D of this tensor (fraction of entries in A).
        backward_density: Target density of B (>= ``density``).
        forward_mask: Bool tensor A, same shape as ``weight``; methods write it in place.
        grad_mask: Bool tensor B, a superset of A; methods write it in place.
        block: Block edge length (1 = unstructured).
        block_norm: Block importance: ``"l1"``, ``"l2"`` or ``"linf"`` (dynsparse-bert eq. 1).
        module: The module that owns the weight (for methods that need its inputs).
        compact: The backend's unit-space storage, when the tensor is stored compactly
            (``None``: dense, and ``storage`` works on the dense masks).
        shape: The dense shape of the weight (set at construction).
    """

    name: str
    weight: Tensor
    density: float
    backward_density: float
    forward_mask: Tensor
    grad_mask: Tensor
    block: int = 1
    block_norm: str = "l1"
    module: nn.Module | None = None
    compact: UnitStorage | None = None

    def __post_init__(self) -> None:
        # The dense shape, fixed at construction: a sparse backend's ``weight`` is compact later.
        self.shape: tuple[int, ...] = tuple(self.weight.shape)

    @property
    def storage(self) -> UnitStorage:
        """The unit-space view the methods update through (the backend's, or dense masks)."""
        return self.compact if self.compact is not None else DenseStorage(self)

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
        """Element mask (weight's shape) of a block-grid mask."""
        return expand_blocks(block_mask, self.block, self.shape)

    def collapse(self, mask: Tensor) -> Tensor:
        """Block-grid mask of an element mask."""
        return collapse_blocks(mask, self.block)


class DenseStorage:
    """:class:`UnitStorage` over a dense theta and dense bool masks (the masked backend)."""

    def __init__(self, tensor: SparseTensor) -> None:
        self.t = tensor

    def units(self) -> tuple[Tensor, Tensor]:
        t = self.t
        units = torch.nonzero(t.collapse(t.grad_mask).reshape(-1)).squeeze(1)
        return units, t.collapse(t.forward_mask).reshape(-1)[units]

    def unit_scores(self) -> Tensor:
        t = self.t
        tiles = gather_units(t.weight.detach(), self.units()[0], t.block)
        return tile_norms(tiles, t.block_norm)

    def grid_scores(self) -> Tensor:
        return self.t.scores()

    def assign(self, units: Tensor, in_a: Tensor, zeroed: Tensor | None = None) -> Tensor:
        t = self.t
        grad = torch.zeros(t.num_blocks, dtype=torch.bool, device=t.grad_mask.device)
        grad[units] = True
        forward = torch.zeros_like(grad)
        forward[units[in_a]] = True
        if zeroed is not None and zeroed.numel():
            with torch.no_grad():
                write_units(t.weight, zeroed, t.block, 0.0)
        return set_masks(t, t.expand(forward.view(t.block_shape)),
                         t.expand(grad.view(t.block_shape)))  # fmt: skip

    def write(self, units: Tensor, values: Tensor) -> None:
        t = self.t
        tiles = values.to(t.weight).reshape(-1, t.block, t.block)
        with torch.no_grad():
            write_units(t.weight, units, t.block, tiles)


def mark_forward(tensor: SparseTensor, mask: Tensor) -> None:
    """``mask |= A`` in place for a dense bool ``mask`` of the weight's shape (no temporary)."""
    if tensor.compact is None:
        mask.logical_or_(tensor.forward_mask)
        return
    units, in_a = tensor.compact.units()
    write_units(mask, units[in_a], tensor.block, True)


def set_masks(tensor: SparseTensor, forward: Tensor, grad: Tensor) -> Tensor:
    """Write new A and B in place; return the entries that entered B."""
    entered = grad & ~tensor.grad_mask
    tensor.forward_mask.copy_(forward)
    tensor.grad_mask.copy_(grad)
    return entered


@dataclass
class Method:
    """Base class of sparse-training methods. Subclasses are dataclasses of their options."""

    name: ClassVar[str] = ""
    sparse: ClassVar[bool] = True  # False: the dense pseudo-method, nothing is made sparse
    keeps_reservoir: ClassVar[bool] = False  # theta outside B matters later (Top-KAST's set C)

    @property
    def fixed_layer_counts(self) -> bool:
        """Whether each tensor's |B| stays within its own backward count (storage that is sized
        per layer, like the sparse backend's, needs it)."""
        return True

    def validate(self, sparsity: float) -> None:
        """Raise ``ValueError`` naming the option if the configuration is invalid."""

    def setup(self, total_steps: int | None, block: int) -> None:
        """Resolve step-dependent options (schedules) once the run length is known."""

    def updates_at(self, step: int) -> bool:
        """Whether ``update(step, ...)`` may change any mask or weight (False: it is skipped)."""
        return False

    def needs_dense_gradient(self, step: int) -> bool:
        """Whether the update after optimizer step ``step`` ranks by the dense gradient."""
        return False

    def backward_sparsity_for(self, sparsity: float) -> float:
        """Global sparsity of the gradient set B; equal to the forward sparsity by default."""
        return sparsity

    def init_masks(self, tensors: Sequence[SparseTensor], generator: torch.Generator) -> None:
        """Write the initial masks."""
        raise NotImplementedError

    def update(
        self, step: int, tensors: Sequence[SparseTensor], generator: torch.Generator
    ) -> dict[str, Tensor]:
        """Change the masks after optimizer step ``step`` if due (nothing by default)."""
        return {}

    def regularizer(self, tensors: Sequence[SparseTensor]) -> Tensor | None:
        """An extra loss term over the sparse tensors, or ``None`` (the default)."""
        return None


METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator adding a method to the registry under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in METHODS:
        raise ValueError(f"method {cls.name!r} is registered twice")
    METHODS[cls.name] = cls
    return cls


def get_method_class(name: str) -> type[Method]:
    """The registered method class called ``name``."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; available: {sorted(METHODS)}") from None
