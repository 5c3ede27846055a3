"""The method interface: a small dataclass of options plus a few hooks.

A method decides *which* entries of each sparse tensor are used in the forward pass (set A, the
forward mask) and which receive gradient (set B, the gradient mask, a superset of A), and how both
change over training. It never touches the optimizer or a backend: it sees each sparse parameter
as a :class:`~alwayssparse.sparse_tensor.SparseTensor` and changes A and B through its storage,
in unit space (:class:`~alwayssparse.sparse_tensor.UnitStorage`); :class:`alwayssparse.Sparsity`
owns the loop. Each hook receives what it needs explicitly, including the training step.

Hooks:
    validate(sparsity): reject invalid options before training starts.
    setup(total_steps, block): resolve schedules once the run length is known.
    updates_at(step): whether update() after optimizer step ``step`` may change anything.
    needs_dense_gradient(step): RigL asks for the inputs and output gradients of its layers.
    backward_sparsity_for(sparsity): global sparsity of B (Top-KAST: 1 - (D + M); others: S).
    capacity_sparsity_for(sparsity): the lowest sparsity B ever has (sizes a backend's storage).
    init_masks(tensors, generator): write the initial A and B into every tensor, in place.
    update(step, tensors, generator): after optimizer step ``step``, change masks if due; return,
        per tensor name, the :class:`~alwayssparse.sparse_tensor.TopologyChange` of its storage.
    regularizer(tensors): an extra loss term, or ``None``.

Class attributes say what a method needs: ``sparse`` (False only for the dense method),
``keeps_reservoir`` (theta outside B matters later) and ``uses_dense_gradient`` (the dense weight
gradient is captured on update steps). A new method is one file: a dataclass subclass decorated
with :func:`register`; its options become the config section named after it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from alwayssparse.sparse_tensor import SparseTensor, TopologyChange


@dataclass
class Method:
    """Base class of sparse-training methods. Subclasses are dataclasses of their options."""

    name: ClassVar[str] = ""
    sparse: ClassVar[bool] = True  # False: the dense pseudo-method, nothing is made sparse
    keeps_reservoir: ClassVar[bool] = False  # theta outside B matters later (Top-KAST's set C)
    uses_dense_gradient: ClassVar[bool] = False  # RigL: grow by the dense gradient

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

    def capacity_sparsity_for(self, sparsity: float) -> float:
        """The lowest sparsity B reaches during the run (a backend that stores B sizes its
        storage by it); the backward sparsity by default."""
        return self.backward_sparsity_for(sparsity)

    def init_masks(self, tensors: Sequence[SparseTensor], generator: torch.Generator) -> None:
        """Write the initial masks."""
        raise NotImplementedError

    def update(
        self, step: int, tensors: Sequence[SparseTensor], generator: torch.Generator
    ) -> dict[str, TopologyChange]:
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
