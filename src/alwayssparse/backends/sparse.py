"""The sparse backend: only the stored entries exist, and they are multiplied sparsely.

Each sparse ``nn.Linear`` is replaced by a :class:`SparseLinear` that holds

- ``values``: one trainable ``nn.Parameter`` with a slot per unit of the gradient set B: shape
  (capacity,) for entries, (capacity * b, b) for b x b blocks (slot s is rows s*b .. s*b + b - 1,
  one block, so block norms and the group-lasso step of the dense code apply to it unchanged).
  Its size (the *capacity*) is fixed for the whole run, so the optimizer keeps the same
  parameter object and its state (momentum, Adam moments) exists only for stored entries;
- ``units``: the flat index on the block grid of the unit each slot holds, -1 for a free slot;
  int32 (int64 only for grids of 2^31 units or more), as are the cached kernel indices (column
  indices, transposes, slots; CSR row pointers stay int64), so indices cost 4 bytes per stored
  unit. Slot order: after a rebuild (compaction, ``CompactStorage.assign``) the used slots come
  first, in unit order, which the GPU layer's layouts require; :class:`SparseLinear` then keeps
  every surviving unit in its slot through patched updates (``CompactStorage.assign_delta``),
  so its slots are in no particular order and its index structures map positions to slots
  (:meth:`CompactLinear.unit_slots` gives B's slots in unit order for either). A free slot
  holds zero and zero optimizer state;
- ``in_a``: which slots belong to the forward set A;
- ``reservoir`` (Top-KAST only): theta of the whole tensor on the host (paper section 2.4: the
  top-k can be computed off the accelerator). Only the entries outside B are read from it.

Training step (kernels in :mod:`alwayssparse.kernels`, no dense weight or weight gradient):

    forward         y  = x @ W_A^T             sparse x dense over A's pattern
    input gradient  gx = grad_y @ W_A          transposed sparse product
    weight gradient gv = (grad_y^T @ x)[B]     sampled dense-dense product at B's positions

Mask updates run in unit space (:class:`alwayssparse.sparse_tensor.UnitStorage`): the methods read
B's sorted unit indices, A's flags and the block norms of the stored values, and hand back the
new sorted units, with what changed (:class:`~alwayssparse.sparse_tensor.UnitDelta`) when they
know it (Top-KAST's incremental refresh, prune/regrow, GMP). Given the change,
:class:`SparseLinear` touches only the changed units: leaving units free their slots (their values
go to the reservoir, if any), entering ones take the lowest free slots (theta from the reservoir,
or zero without one) with zero optimizer state, survivors keep slot, value and state, and B's
CSR, A's CSR and A's CSC transpose follow without a sort: built in one merge of the old and the
new sorted units by the compiled kernels (:func:`alwayssparse.kernels.topology_update`, a few
sequential passes over B), or patched with numpy searches, deletes and inserts without them.
Without it :class:`CompactStorage` rebuilds the slots in unit order, carrying each surviving
unit's value and optimizer state to its new slot. Updates allocate O(capacity) memory, nothing of
the weight's size; only a Top-KAST refresh that cannot be decided from its ranked reservoir (the
first one, and rare ones after) writes the stored values into the reservoir and ranks all of it
(see :mod:`alwayssparse.methods.topkast`). Only the initial masks are chosen on a dense host view
of the layer (while the dense ``nn.Linear`` still exists), and only
:meth:`SparseBackend.dense_masks` and :meth:`SparseLinear.dense_weight` (inspection, export)
build dense tensors afterwards.

The storage is shared with the GPU backend (:mod:`alwayssparse.backends.gpu`): the layer's
slots, units, flags and reservoir are :class:`CompactLinear`, of which :class:`SparseLinear` is
the subclass with the CPU kernels; :class:`CompactStorage` serves any :class:`CompactLinear` on
its device; :class:`CompactBackend` attaches, compacts and exports any of them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from alwayssparse import kernels
from alwayssparse.backends.base import Backend, TensorSpec, register_backend, require_held
from alwayssparse.layout import ParamInfo, is_hf_conv1d
from alwayssparse.masks import (
    block_norms,
    count_for_density,
    expand_blocks,
    gather_units,
    tile_norms,
    write_units,
)
from alwayssparse.optim_state import elementwise_state
from alwayssparse.sparse_tensor import (
    DenseStorage,
    SparseTensor,
    TensorsKey,
    TopologyChange,
    UnitDelta,
    UnitStorage,
)
from alwayssparse.state_dicts import register_weight_hooks

SUPPORTED_BLOCKS = (1, *kernels.BLOCK_SIZES)
_STORED_KEYS = ("values", "units", "in_a", "reservoir")  # SparseLinear's state, values first


def index_dtype(size: int) -> torch.dtype:
    """The narrowest supported index dtype for indices below ``size``."""
    return torch.int32 if size < 2**31 else torch.int64


@dataclass
class _Pattern:
    """Compressed rows of one set of slots: ``slots`` index ``values``; CSR over block rows."""

    slots: Tensor
    row_ptr: Tensor
    cols: Tensor
    transpose: tuple[Tensor, Tensor, Tensor] | None = None


def _compress(units: Tensor, grid_rows: int, grid_cols: int) -> tuple[Tensor, Tensor]:
    rows = torch.div(units, grid_cols, rounding_mode="floor")
    counts = torch.bincount(rows, minlength=grid_rows)
    row_ptr = torch.zeros(grid_rows + 1, dtype=torch.long)
    row_ptr[1:] = torch.cumsum(counts, 0)
    return row_ptr, units - rows * grid_cols


class CompactLinear(nn.Module):
    """A Linear layer whose weight exists only at its stored units: the storage, without the
    product.

    Shared by the backends that store units compactly (this module's CPU :class:`SparseLinear`,
    the GPU layer of :mod:`alwayssparse.backends.gpu`); :class:`CompactStorage` serves any of
    them. A subclass supplies the product (:meth:`product`) and its index structures, built once
    per topology and dropped by :meth:`invalidate`. Index tensors, values and slot masks live on
    the layer's device; the reservoir where it was created (a subclass may pin it to the host).

    It answers what code reads from the layer it replaced: ``in_features``, ``out_features``,
    ``bias`` (the same parameter object) and ``weight``, a *dense copy* of theta on A built on
    every access (detached; right ``shape``, ``dtype`` and ``device``; costs a weight-sized
    tensor, so read it for inspection, not in a loop), and for a Hugging Face ``Conv1D`` also
    ``nx`` and ``nf``.

    Args:
        linear: The dense layer it replaces (its bias parameter object is kept): an
            ``nn.Linear``, or a Hugging Face ``Conv1D`` (y = x W + b with W stored (in, out)).
            A Conv1D's W is stored as it is, over its (in, out) rows, so that the block grid,
            the unit indices and hence every mask are those of the masked backend; the products
            swap roles (forward by the transposed kernel, input gradient by the plain one).
        block: Unit edge b.
        capacity: Number of stored units (slots), fixed for the run.
        reservoir: Keep theta of the whole tensor (Top-KAST's set C).
        reservoir_device: Where the reservoir lives (default: the host).

    Attributes:
        transposed: Whether W is stored (in, out) (a replaced Conv1D); ``weight`` then has that
            shape too.
        shape: The stored matrix: (out, in), or (in, out) when ``transposed``.
    """

    values: Tensor
    units: Tensor
    in_a: Tensor

    def __init__(
        self,
        linear: nn.Module,
        block: int,
        capacity: int,
        reservoir: bool,
        reservoir_device: torch.device | str = "cpu",
    ) -> None:
        super().__init__()
        self.transposed = is_hf_conv1d(linear)
        if self.transposed:
            in_features, out_features = int(linear.nx), int(linear.nf)  # type: ignore[arg-type]
            self.nx, self.nf = in_features, out_features
            self.shape = (in_features, out_features)
        else:
            in_features = int(linear.in_features)  # type: ignore[arg-type]
            out_features = int(linear.out_features)  # type: ignore[arg-type]
            self.shape = (out_features, in_features)
        self.in_features, self.out_features, self.block = in_features, out_features, block
        self.grid = (self.shape[0] // block, self.shape[1] // block)
        weight, bias = linear.weight, linear.bias
        assert isinstance(weight, Tensor) and (bias is None or isinstance(bias, nn.Parameter))
        weight = weight.detach()
        shape = (capacity,) if block == 1 else (capacity * block, block)
        self.values = nn.Parameter(weight.new_zeros(shape))
        self.bias = bias
        self.index_dtype = index_dtype(max(self.grid[0] * self.grid[1], capacity))
        device = weight.device
        self.register_buffer(
            "units", torch.full((capacity,), -1, dtype=self.index_dtype, device=device)
        )
        self.register_buffer("in_a", torch.zeros(capacity, dtype=torch.bool, device=device))
        self.reservoir: Tensor | None
        kept = weight.to(reservoir_device, copy=True) if reservoir else None
        self.register_buffer("reservoir", kept)
        self._slot_masks: tuple[Tensor, Tensor] | None = None
        self.register_load_state_dict_post_hook(lambda module, _: module.invalidate())

    @property
    def capacity(self) -> int:
        return self.units.numel()

    def invalidate(self) -> None:
        """Forget the cached index structures (after the units change)."""
        self._slot_masks = None

    def _apply(self, fn: Any, recurse: bool = True) -> CompactLinear:
        # .to()/.cuda()/.half(): the cached indices and slot masks belong to the old tensors.
        super()._apply(fn, recurse)
        self.invalidate()
        return self

    def stored(self) -> int:
        """Number of used slots."""
        return int(torch.count_nonzero(self.units >= 0))

    def unit_slots(self) -> Tensor:
        """The slots of B in unit order (int64, on the layer's device). Here the used slots come
        first, in unit order (what :meth:`CompactStorage.assign` writes and the GPU layouts
        need): ``0 .. n-1``. :class:`SparseLinear` keeps survivors in their slots instead."""
        return torch.arange(self.stored(), device=self.units.device)

    def sorted_units(self) -> tuple[Tensor, Tensor]:
        """(B's units ascending, int64; A's flag of each), on the layer's device."""
        slots = self.unit_slots()
        return self.units[slots].long(), self.in_a[slots]

    def stored_slots(self, only_a: bool = True) -> Tensor:
        """Slots of A (or of every stored unit, B), in unit order, on the layer's device."""
        slots = self.unit_slots()
        return slots[self.in_a[slots]] if only_a else slots

    # Whether the layer patches its slots and index structures through small changes
    # (:meth:`SparseLinear.apply_delta`) instead of being rebuilt in unit order.
    patches_slots = False

    def tiles(self) -> Tensor:
        """``values`` as (capacity, b, b) blocks (a view; (capacity, 1, 1) for entries)."""
        return self.values.view(self.capacity, self.block, self.block)

    def slot_masks(self) -> tuple[Tensor, Tensor]:
        """(A, B) per slot, broadcast to the shape of ``values``; cached per topology."""
        if self._slot_masks is None:
            self._slot_masks = (self._per_slot(self.in_a), self._per_slot(self.units >= 0))
        return self._slot_masks

    def _per_slot(self, mask: Tensor) -> Tensor:
        rows = mask.repeat_interleave(self.block) if self.block > 1 else mask
        return rows.view(-1, *([1] * (self.values.dim() - 1))).expand(self.values.shape)

    def product(self, x: Tensor) -> Tensor:
        """``x @ W_A^T`` for ``x`` of shape (N, in), through the subclass's kernels."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        x2 = x.reshape(-1, self.in_features)  # [N, in]
        y = self.product(x2)  # [N, out]
        if self.bias is not None:
            y = y.add_(self.bias)  # in place: the kernel's output is fresh and not saved
        return y.reshape(*x.shape[:-1], self.out_features)

    @property
    def weight(self) -> Tensor:
        """theta on A as a dense tensor of the replaced layer's weight shape: a new detached
        copy on every access (what ``nn.Linear`` code reads: ``weight.dtype``, ``.shape``...)."""
        return self.dense_weight()

    def dense_weight(self, only_a: bool = True) -> Tensor:
        """theta on A (or on every stored unit) as a dense tensor of shape ``self.shape``
        ((out, in); (in, out) for a replaced Conv1D) (for export/tests)."""
        slots = self.stored_slots(only_a)
        weight = self.values.new_zeros(self.shape)
        write_units(weight, self.units[slots], self.block, self.tiles().detach()[slots])
        return weight

    def sync_reservoir(self) -> Tensor:
        """Write the stored values into the reservoir (in place): it then holds all of theta."""
        if self.reservoir is None:
            raise RuntimeError(
                "this layer keeps no reservoir: only theta at its stored units exists "
                "(methods that rank the whole tensor set keeps_reservoir)"
            )
        slots, device = self.unit_slots(), self.reservoir.device
        tiles = self.tiles().detach()[slots].to(device)
        write_units(self.reservoir, self.units[slots].to(device), self.block, tiles)
        return self.reservoir

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"block={self.block}, capacity={self.capacity}"
            + (", transposed=True" if self.transposed else "")
        )


class SparseLinear(CompactLinear):
    """:class:`CompactLinear` multiplied by the CPU kernels of :mod:`alwayssparse.kernels`.

    Slots are stable: a unit keeps its slot while it stays in B, a unit entering B takes the
    lowest free slot, and a topology change given as a :class:`~alwayssparse.sparse_tensor.
    UnitDelta` patches the index structures (:class:`_Topology`: B's CSR, A's CSR and its CSC
    transpose, each with the slot of every position) instead of rebuilding them. So slots are
    in unit order only after a rebuild (:meth:`CompactStorage.assign`, :meth:`compact`, a
    load), and the product reads values through the slot arrays: A's values are gathered for
    the forward and the transposed product, and the sampled weight gradient (computed in B's
    CSR order) is scattered to its slots; while the slots are ``0 .. n-1`` in unit order and
    A = B, the forward reads ``values[:n]`` as a view and the gradient needs no scatter.

    Args:
        linear: The dense layer it replaces (its bias parameter object is kept).
        block: Unit edge b (1: CSR; 4, 8, 16: BSR).
        capacity: Number of stored units (slots), fixed for the run.
        reservoir: Keep theta of the whole tensor on the host (Top-KAST's set C).
    """

    patches_slots = True

    def __init__(self, linear: nn.Module, block: int, capacity: int, reservoir: bool) -> None:
        super().__init__(linear, block, capacity, reservoir)
        self._topology: _Topology | None = None

    def invalidate(self) -> None:
        super().invalidate()
        self._topology = None

    def topology(self) -> _Topology:
        """The index structures of the current topology (built from the buffers if needed)."""
        if self._topology is None:
            self._topology = _Topology.build(self.units, self.in_a, self.grid)
        return self._topology

    def unit_slots(self) -> Tensor:
        return self.topology().torch.order

    def sorted_units(self) -> tuple[Tensor, Tensor]:
        topology = self.topology()
        return torch.from_numpy(topology.units), self.in_a[topology.torch.order]

    def patterns(self) -> tuple[_Pattern, _Pattern]:
        """(A's pattern, B's pattern) with slot arrays; A's transpose is (col_ptr, row_idx,
        slot of each CSC position)."""
        t = self.topology().torch
        pattern_a = _Pattern(t.a_slots, t.a_ptr, t.a_cols, (t.t_ptr, t.t_rows, t.t_slots))
        return pattern_a, _Pattern(t.order, t.b_ptr, t.b_cols)

    def apply_delta(
        self,
        delta: UnitDelta,
        zeroed: Tensor | None,
        units: Tensor | None = None,
        in_a: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Move the layer to the topology after ``delta``: units leaving B free their slots
        (their values go to the reservoir, if any, and the slots to zero), units entering B
        take the lowest free slots (values from the reservoir, else zero), A's flags follow,
        theta at ``zeroed`` becomes zero; the index structures are patched. Returns the
        (entered, left) slots, whose optimizer state must start at zero.

        Given B after the change too (``units`` ascending, ``in_a``), the compiled kernels
        rebuild every index structure in one merge of the old and new units
        (:func:`alwayssparse.kernels.topology_update`, O(|B|) sequential passes); without them
        the structures are patched with searches per changed unit (numpy)."""
        topology = self.topology()
        if units is not None and in_a is not None:
            merged = self._merge_topology(topology, units, in_a, zeroed)
            if merged is not None:
                return merged
        entered, left = delta.entered.cpu().numpy(), delta.left.cpu().numpy()
        entered_a, left_a = delta.entered_a.cpu().numpy(), delta.left_a.cpu().numpy()
        slot_units = self.units.numpy()
        left_slots = topology.slots_of(left)
        free = np.flatnonzero(slot_units < 0)
        if free.size + left_slots.size < entered.size:
            raise RuntimeError(
                f"{entered.size} units enter B but only {free.size + left_slots.size} slots are "
                f"free (capacity {self.capacity})"
            )
        slot_units[left_slots] = -1
        entered_slots = np.flatnonzero(slot_units < 0)[: entered.size]
        slots_t, left_t = torch.from_numpy(entered_slots), torch.from_numpy(left_slots)
        self._move_values(torch.from_numpy(entered), slots_t, delta.left.cpu(), left_t)
        with torch.no_grad():
            slot_units[entered_slots] = entered
            self.in_a[left_t] = False
            topology.patch(entered, left, entered_slots, left_slots, entered_a, left_a)
            self.in_a[torch.from_numpy(topology.slots_of(left_a, missing_ok=True))] = False
            self.in_a[torch.from_numpy(topology.slots_of(entered_a))] = True
        self._zero_units(topology, zeroed)
        # Written through numpy: bump the versions that counts, tokens and caches key on.
        _bump_version(self.units)
        self._slot_masks = None
        return slots_t, left_t

    def _merge_topology(
        self, topology: _Topology, units: Tensor, in_a: Tensor, zeroed: Tensor | None
    ) -> tuple[Tensor, Tensor] | None:
        """:meth:`apply_delta` through the compiled merge; ``None`` without the extension."""
        new_units = units.detach().to("cpu", torch.long).contiguous()
        if new_units.data_ptr() == units.data_ptr():
            new_units = new_units.clone()  # the topology keeps it: not the caller's tensor
        result = kernels.topology_update(
            torch.from_numpy(topology.units), torch.from_numpy(topology.order), new_units,
            in_a.detach().to("cpu", torch.bool).contiguous(), self.units, self.in_a, self.grid,
        )  # fmt: skip
        if result is None:
            return None
        entered, entered_slots, left, left_slots = result[10:]
        self._move_values(entered, entered_slots, left, left_slots)
        topology.replace(new_units.numpy(), result[:10])
        self._zero_units(topology, zeroed)
        # The slot buffers were written by the extension: bump what counts and tokens key on.
        _bump_version(self.units)
        _bump_version(self.in_a)
        self._slot_masks = None
        return entered_slots, left_slots

    def _move_values(
        self, entered: Tensor, entered_slots: Tensor, left: Tensor, left_slots: Tensor
    ) -> None:
        """Values of a topology change: units leaving B write theta to the reservoir (if any)
        and their slots become zero, then the entering units' slots (possibly just freed ones)
        take theta from the reservoir, or zero without one."""
        tiles = self.tiles().detach()
        with torch.no_grad():
            if self.reservoir is not None and left.numel():
                write_units(self.reservoir, left, self.block, tiles[left_slots])
            tiles[left_slots] = 0.0
            if self.reservoir is not None and entered.numel():
                tiles[entered_slots] = gather_units(self.reservoir, entered, self.block)
            else:
                tiles[entered_slots] = 0.0

    def _zero_units(self, topology: _Topology, zeroed: Tensor | None) -> None:
        """Theta becomes zero at the units ``zeroed`` (those stored, and in the reservoir)."""
        if zeroed is None or not zeroed.numel():
            return
        slots = topology.slots_of(zeroed.cpu().numpy(), missing_ok=True)
        with torch.no_grad():
            self.tiles().detach()[torch.from_numpy(slots)] = 0.0
            if self.reservoir is not None:
                write_units(self.reservoir, zeroed.cpu(), self.block, 0.0)

    def product(self, x: Tensor) -> Tensor:
        return _SparseLinearFunction.apply(x, self.values, None, self)

    def forward(self, x: Tensor) -> Tensor:
        """The bias is added inside the kernel, to the finished sums (no extra pass over y)."""
        x2 = x.reshape(-1, self.in_features)  # [N, in]
        bias = self.bias
        if bias is not None and bias.dtype != torch.float32:
            y = _SparseLinearFunction.apply(x2, self.values, None, self).add_(bias)
        else:
            y = _SparseLinearFunction.apply(x2, self.values, bias, self)
        return y.reshape(*x.shape[:-1], self.out_features)


def _bump_version(tensor: Tensor) -> None:
    """Mark ``tensor`` as written in place (it was, through numpy)."""
    increment = getattr(torch.autograd.graph, "increment_version", None)
    if increment is not None:
        increment(tensor)
    else:  # older torch: a no-op in-place op bumps it too
        tensor.add_(0)


@dataclass
class _TorchTopology:
    """Torch views of a :class:`_Topology`'s arrays, for the kernels."""

    order: Tensor
    b_ptr: Tensor
    b_cols: Tensor
    a_slots: Tensor
    a_ptr: Tensor
    a_cols: Tensor
    t_ptr: Tensor
    t_rows: Tensor
    t_slots: Tensor


class _Topology:
    """A :class:`SparseLinear`'s index structures, patched through small changes (numpy).

    Attributes:
        units, order: B's units in ascending order and their slots (B's CSR order).
        b_ptr, b_cols: B's CSR over block rows (row pointers int64, columns ``cols_dtype``).
        same: A = B (then the ``a_*`` arrays equal the ``b_*`` ones).
        a_units, a_slots, a_ptr, a_cols: A's units, slots and CSR.
        t_keys, t_ptr, t_rows, t_slots: A's CSC: keys ``col * grid_rows + row`` ascending
            (``None`` after :meth:`replace`, derived when the numpy patch needs them),
            column pointers, rows and slots in that order.
        identity: B's slots are ``0 .. n-1`` in unit order.
    """

    units: np.ndarray
    order: np.ndarray
    b_ptr: np.ndarray
    b_cols: np.ndarray
    same: bool
    a_units: np.ndarray
    a_slots: np.ndarray
    a_ptr: np.ndarray
    a_cols: np.ndarray
    t_keys: np.ndarray | None
    t_ptr: np.ndarray
    t_rows: np.ndarray
    t_slots: np.ndarray
    identity: bool

    def __init__(self, grid: tuple[int, int], cols_dtype: np.dtype) -> None:
        self.grid = grid
        self.cols_dtype = cols_dtype
        self._torch: _TorchTopology | None = None

    @classmethod
    def build(cls, units: Tensor, in_a: Tensor, grid: tuple[int, int]) -> _Topology:
        top = cls(grid, units.numpy().dtype)
        all_units = units.cpu().numpy().astype(np.int64)
        used = np.flatnonzero(all_units >= 0)
        order = np.argsort(all_units[used], kind="stable")
        top.order = used[order]
        top.units = all_units[top.order]
        flags = in_a.cpu().numpy()[top.order]
        top.b_ptr, top.b_cols = top._csr(top.units)
        top.same = bool(flags.all())
        if top.same:
            top.a_units, top.a_slots, top.a_ptr, top.a_cols = (
                top.units,
                top.order,
                top.b_ptr,
                top.b_cols,
            )
        else:
            top.a_units, top.a_slots = top.units[flags], top.order[flags]
            top.a_ptr, top.a_cols = top._csr(top.a_units)
        keys = top._t_keys(top.a_units)
        by_key = np.argsort(keys, kind="stable")
        top.t_keys, top.t_slots = keys[by_key], top.a_slots[by_key]
        top.t_rows = (top.t_keys % grid[0]).astype(top.cols_dtype)
        top.t_ptr = top._ptr(top.t_keys // grid[0], grid[1])
        top.identity = bool(np.array_equal(top.order, np.arange(top.order.size)))
        return top

    # -- helpers ---------------------------------------------------------------------------------

    @staticmethod
    def _ptr(rows: np.ndarray, size: int) -> np.ndarray:
        ptr = np.zeros(size + 1, dtype=np.int64)
        np.cumsum(np.bincount(rows, minlength=size), out=ptr[1:])
        return ptr

    def _csr(self, units: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rows, cols = np.divmod(units, self.grid[1])
        return self._ptr(rows, self.grid[0]), cols.astype(self.cols_dtype)

    def _t_keys(self, units: np.ndarray) -> np.ndarray:
        rows, cols = np.divmod(units, self.grid[1])
        return cols * self.grid[0] + rows

    def _shift_ptr(self, ptr: np.ndarray, added: np.ndarray, removed: np.ndarray) -> np.ndarray:
        size = ptr.size - 1
        change = np.bincount(added, minlength=size) - np.bincount(removed, minlength=size)
        out = ptr.copy()
        out[1:] += np.cumsum(change)
        return out

    def slots_of(self, units: np.ndarray, missing_ok: bool = False) -> np.ndarray:
        """The slots of ``units`` (in B; with ``missing_ok``, those not in B are skipped)."""
        if units.size == 0 or self.units.size == 0:
            return np.zeros(0, dtype=np.int64)
        position = np.searchsorted(self.units, units).clip(max=self.units.size - 1)
        found = self.units[position] == units
        if not missing_ok and not found.all():
            raise ValueError("units are not stored in B")
        return self.order[position[found]]

    # -- patching ----------------------------------------------------------------------------------

    def patch(
        self,
        entered: np.ndarray,
        left: np.ndarray,
        entered_slots: np.ndarray,
        left_slots: np.ndarray,
        entered_a: np.ndarray,
        left_a: np.ndarray,
    ) -> None:
        """B loses ``left`` and gains ``entered`` (at ``entered_slots``); A loses ``left_a``
        and gains ``entered_a`` (all sorted units). O(|B|) memory moves, no sort of B."""
        grid_cols = self.grid[1]
        same_after = (
            self.same and np.array_equal(entered_a, entered) and np.array_equal(left_a, left)
        )
        # A's arrays before the change (numpy's delete/insert make new arrays: these stay).
        old_a = (self.a_units, self.a_slots, self.a_ptr, self.a_cols)
        gone = np.searchsorted(self.units, left)
        units, order = np.delete(self.units, gone), np.delete(self.order, gone)
        cols = np.delete(self.b_cols, gone)
        at = np.searchsorted(units, entered)
        self.units = np.insert(units, at, entered)
        self.order = np.insert(order, at, entered_slots)
        self.b_cols = np.insert(cols, at, (entered % grid_cols).astype(self.cols_dtype))
        self.b_ptr = self._shift_ptr(self.b_ptr, entered // grid_cols, left // grid_cols)
        if same_after:
            self.a_units, self.a_slots, self.a_ptr, self.a_cols = (
                self.units,
                self.order,
                self.b_ptr,
                self.b_cols,
            )
        else:
            a_units, a_slots, a_ptr, a_cols = old_a
            gone_a = np.searchsorted(a_units, left_a)
            a_units, a_slots = np.delete(a_units, gone_a), np.delete(a_slots, gone_a)
            a_cols = np.delete(a_cols, gone_a)
            at_a = np.searchsorted(a_units, entered_a)
            self.a_units = np.insert(a_units, at_a, entered_a)
            self.a_slots = np.insert(a_slots, at_a, self.slots_of(entered_a))
            self.a_cols = np.insert(a_cols, at_a, (entered_a % grid_cols).astype(self.cols_dtype))
            self.a_ptr = self._shift_ptr(a_ptr, entered_a // grid_cols, left_a // grid_cols)
        self.same = same_after
        # A's transpose: remove the keys of left_a, insert those of entered_a.
        t_keys = self._transpose_keys()
        gone_t = np.searchsorted(t_keys, self._t_keys(left_a))
        t_keys, t_slots = np.delete(t_keys, gone_t), np.delete(self.t_slots, gone_t)
        new_keys = self._t_keys(entered_a)
        by_key = np.argsort(new_keys, kind="stable")
        new_keys, new_t_slots = new_keys[by_key], self.slots_of(entered_a)[by_key]
        at_t = np.searchsorted(t_keys, new_keys)
        self.t_keys = np.insert(t_keys, at_t, new_keys)
        self.t_slots = np.insert(t_slots, at_t, new_t_slots)
        new_rows = (new_keys % self.grid[0]).astype(self.cols_dtype)
        self.t_rows = np.insert(np.delete(self.t_rows, gone_t), at_t, new_rows)
        self.t_ptr = self._shift_ptr(self.t_ptr, entered_a % grid_cols, left_a % grid_cols)
        if entered.size or left.size:
            self.identity = False
        self._torch = None

    def replace(self, units: np.ndarray, arrays: Sequence[Tensor]) -> None:
        """Take the structures built by :func:`alwayssparse.kernels.topology_update` (its first
        ten results) for B's new ``units`` (ascending)."""
        order, b_ptr, b_cols, a_units, a_slots, a_ptr, a_cols, t_ptr, t_rows, t_slots = arrays
        self._torch = _TorchTopology(
            order=order, b_ptr=b_ptr, b_cols=b_cols, a_slots=a_slots, a_ptr=a_ptr, a_cols=a_cols,
            t_ptr=t_ptr, t_rows=t_rows, t_slots=t_slots,
        )  # fmt: skip
        self.units, self.order = units, order.numpy()
        self.b_ptr, self.b_cols = b_ptr.numpy(), b_cols.numpy()
        self.a_units, self.a_slots = a_units.numpy(), a_slots.numpy()
        self.a_ptr, self.a_cols = a_ptr.numpy(), a_cols.numpy()
        self.t_ptr, self.t_rows, self.t_slots = t_ptr.numpy(), t_rows.numpy(), t_slots.numpy()
        self.t_keys = None  # derived again if the numpy patch needs it
        self.same = self.a_units.size == self.units.size
        n = self.order.size
        self.identity = bool(n == 0 or (self.order[0] == 0 and self.order[-1] == n - 1
                                        and np.array_equal(self.order, np.arange(n))))  # fmt: skip

    def _transpose_keys(self) -> np.ndarray:
        """A's CSC keys ``col * grid_rows + row`` (ascending), derived when not kept."""
        if self.t_keys is None:
            counts = np.diff(self.t_ptr)
            cols = np.repeat(np.arange(self.grid[1], dtype=np.int64), counts)
            self.t_keys = cols * self.grid[0] + self.t_rows.astype(np.int64)
        return self.t_keys

    @property
    def torch(self) -> _TorchTopology:
        if self._torch is None:
            t = torch.from_numpy
            self._torch = _TorchTopology(
                order=t(self.order), b_ptr=t(self.b_ptr), b_cols=t(self.b_cols),
                a_slots=t(self.a_slots), a_ptr=t(self.a_ptr), a_cols=t(self.a_cols),
                t_ptr=t(self.t_ptr), t_rows=t(self.t_rows), t_slots=t(self.t_slots),
            )  # fmt: skip
        return self._torch


class _SparseLinearFunction(torch.autograd.Function):
    """y = x @ W_A^T with W given by ``values``; gradients: x by the transposed product over A,
    ``values`` by the sampled product at every stored (B) slot (see :class:`SparseLinear` for
    how slots map to the patterns' positions). For W stored (in, out) (``layer.transposed``, a
    Conv1D): y = x @ W_A through A's CSC, x's gradient through A's CSR, and W's gradient
    x^T grad_y sampled at B; the bias is then added after the product."""

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, values: Tensor, bias: Tensor | None, layer: SparseLinear
    ) -> Tensor:
        topology = layer.topology()
        t = topology.torch
        block = layer.block
        flat = values if block == 1 else values.view(-1, block, block)
        x = x.contiguous()
        ctx.save_for_backward(x, values)
        ctx.layer, ctx.topology = layer, topology
        b = None if bias is None else bias.detach().contiguous()
        if layer.transposed:
            y = _csc_product(layer, t, flat.index_select(0, t.t_slots), x)
            return y if b is None else y.add_(b)
        return _csr_product(layer, t, _a_values(topology, flat), x, b)

    @staticmethod
    def backward(
        ctx: Any, grad_y: Tensor
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None, None]:
        x, values = ctx.saved_tensors
        layer: SparseLinear = ctx.layer
        topology: _Topology = ctx.topology
        t = topology.torch
        block = layer.block
        grad_y = grad_y.contiguous()
        grad_x = grad_values = None
        flat = values.detach() if block == 1 else values.detach().view(-1, block, block)
        if ctx.needs_input_grad[0]:
            if layer.transposed:
                grad_x = _csr_product(layer, t, _a_values(topology, flat), grad_y)
            else:
                grad_x = _csc_product(layer, t, flat.index_select(0, t.t_slots), grad_y)
        if ctx.needs_input_grad[1]:
            # Sampled (rows side)^T @ (columns side) of the stored matrix at B's positions.
            left, right = (x, grad_y) if layer.transposed else (grad_y, x)
            if block == 1:
                sampled = kernels.sddmm_trusted(t.b_ptr, t.b_cols, left, right)
            else:
                sampled = kernels.bsr_sddmm_trusted(t.b_ptr, t.b_cols, left, right, block)
            if topology.identity and sampled.numel() == values.numel():
                grad_values = sampled.view_as(values)
            elif topology.identity:
                grad_values = torch.zeros_like(values)
                grad_values.view(-1)[: sampled.numel()] = sampled.view(-1)
            else:  # B's CSR order -> slots
                grad_values = torch.zeros_like(values)
                rows = grad_values.view(layer.capacity, -1)
                rows.index_copy_(0, t.order, sampled.view(t.order.numel(), -1))
        grad_bias = grad_y.sum(0) if ctx.needs_input_grad[2] else None
        return grad_x, grad_values, grad_bias, None


def _a_values(topology: _Topology, flat: Tensor) -> Tensor:
    """A's values in its CSR order (a view when slots are 0 .. n-1 in unit order and A = B)."""
    t = topology.torch
    if topology.same and topology.identity:
        return flat[: t.order.numel()]
    return flat.index_select(0, t.a_slots)


def _csr_product(
    layer: SparseLinear, t: _TorchTopology, values: Tensor, x: Tensor, bias: Tensor | None = None
) -> Tensor:
    """x @ M_A^T for the stored matrix M (rows x cols) through A's CSR: (N, rows) (+ bias)."""
    if layer.block == 1:
        return kernels.spmm_trusted(t.a_ptr, t.a_cols, values, x, layer.shape[0], bias)
    return kernels.bsr_spmm_trusted(t.a_ptr, t.a_cols, values, x, layer.shape[0], bias)


def _csc_product(layer: SparseLinear, t: _TorchTopology, values: Tensor, x: Tensor) -> Tensor:
    """x @ M_A for the stored matrix M (rows x cols) through A's CSC (``values`` in its order):
    (N, cols)."""
    if layer.block == 1:
        return kernels.spmm_trusted(t.t_ptr, t.t_rows, values, x, layer.shape[1])
    return kernels.bsr_spmm_t_trusted(t.t_ptr, t.t_rows, values, x, layer.shape[1])


class CompactStorage(UnitStorage):
    """:class:`~alwayssparse.sparse_tensor.UnitStorage` of a :class:`CompactLinear` (the CPU
    :class:`SparseLinear` or the GPU backend's layer): mask updates read and rebuild the stored
    slots directly, on the layer's device (the reservoir on its own).

    Until :meth:`compact` it serves a dense view of the layer (``initial``, on the layer's
    device: the host for :class:`SparseLinear`), which the method's ``init_masks`` writes.
    Memory of an update: O(capacity) (new values, one carried copy per optimizer state tensor,
    index arrays); :meth:`grid_scores` alone ranks the whole tensor (Top-KAST's reservoir).
    """

    def __init__(self, layer: CompactLinear, initial: DenseStorage) -> None:
        self.layer = layer
        self.initial: DenseStorage | None = initial

    def bind(self, tensor: SparseTensor) -> None:
        super().bind(tensor)
        if self.initial is not None:
            self.initial.bind(tensor)

    # -- views -----------------------------------------------------------------------------------

    @property
    def weight(self) -> Tensor:
        return self.initial.weight if self.initial is not None else self.layer.values

    @property
    def forward_mask(self) -> Tensor:
        if self.initial is not None:
            return self.initial.forward_mask
        return self.layer.slot_masks()[0]

    @property
    def grad_mask(self) -> Tensor:
        if self.initial is not None:
            return self.initial.grad_mask
        return self.layer.slot_masks()[1]

    def dense_masks(self) -> tuple[Tensor, Tensor]:
        if self.initial is not None:
            return self.initial.dense_masks()
        layer = self.layer
        return _unit_mask(layer, layer.stored_slots(True)), _unit_mask(
            layer, layer.stored_slots(False)
        )

    def _set_tensors(self) -> tuple[Tensor, ...]:
        return (self.layer.units, self.layer.in_a)

    def reservoir_token(self) -> object | None:
        """The reservoir is written only by ``assign`` (units leaving B), ``compact`` and
        checkpoint loads: its version and the slots' versions tell."""
        layer = self.layer
        if self.initial is not None or layer.reservoir is None:
            return None
        return TensorsKey((layer.units, layer.in_a, layer.reservoir))

    def counts(self) -> tuple[int, int]:
        if self.initial is not None:
            return self.initial.counts()
        return super().counts()

    # -- unit space --------------------------------------------------------------------------------

    def units(self) -> tuple[Tensor, Tensor]:
        if self.initial is not None:
            return self.initial.units()
        return self.layer.sorted_units()

    def unit_scores(self) -> Tensor:
        if self.initial is not None:
            return self.initial.unit_scores()
        tiles = self.layer.tiles().detach()[self.layer.unit_slots()]
        return tile_norms(tiles, self.tensor.block_norm)

    def grid_scores(self) -> Tensor:
        if self.initial is not None:
            return self.initial.grid_scores()
        layer = self.layer
        return block_norms(layer.sync_reservoir(), layer.block, self.tensor.block_norm)

    def assign(self, units: Tensor, in_a: Tensor, zeroed: Tensor | None = None) -> TopologyChange:
        if self.initial is not None:
            return self.initial.assign(units, in_a, zeroed)
        layer = self.layer
        n = units.numel()
        if n > layer.capacity:
            raise RuntimeError(
                f"{self.tensor.name}: {n} units in B exceed the capacity {layer.capacity} "
                "fixed when the layer was built"
            )
        device = layer.units.device
        units, in_a = units.to(device, torch.long), in_a.to(device, torch.bool)
        old_slots = layer.unit_slots()
        source, target = _survivors(layer.units[old_slots].long(), units)
        source = old_slots[source]
        tiles = layer.tiles().detach()
        new_tiles = torch.zeros_like(tiles)
        if layer.reservoir is not None:
            # Units entering B take theta from the reservoir (survivors' values included).
            layer.sync_reservoir()
            host = layer.reservoir.device
            if zeroed is not None and zeroed.numel():
                write_units(layer.reservoir, zeroed.to(host), layer.block, 0.0)
            new_tiles[:n] = gather_units(layer.reservoir, units.to(host), layer.block).to(device)
        else:
            new_tiles[target] = tiles[source]  # new units start at zero
            if zeroed is not None and zeroed.numel():
                hit, where = _lookup(units, zeroed.to(device, torch.long))
                new_tiles[where[hit]] = 0.0
        with torch.no_grad():
            tiles.copy_(new_tiles)
            layer.units.fill_(-1)
            layer.units[:n] = units
            layer.in_a.zero_()
            layer.in_a[:n] = in_a
        layer.invalidate()
        entered = torch.zeros(layer.capacity, dtype=torch.bool, device=device)
        entered[:n] = True
        entered[target] = False
        return TopologyChange(layer._per_slot(entered), moved=(source, target))

    def assign_delta(
        self, units: Tensor, in_a: Tensor, delta: UnitDelta, zeroed: Tensor | None = None
    ) -> TopologyChange:
        """A layer that patches its slots (:class:`SparseLinear`) moves only the changed units:
        survivors keep their slots, values and optimizer state; any other is rebuilt."""
        if self.initial is not None:
            return self.initial.assign_delta(units, in_a, delta, zeroed)
        layer = self.layer
        if not isinstance(layer, SparseLinear):
            return self.assign(units, in_a, zeroed)
        entered_slots, left_slots = layer.apply_delta(delta, zeroed, units, in_a)
        return TopologyChange(
            reset_slots=torch.cat([entered_slots, left_slots]),
            entered_units=delta.entered, left_units=delta.left,
            entered_a_units=delta.entered_a, left_a_units=delta.left_a,
        )  # fmt: skip

    def write(self, units: Tensor, values: Tensor) -> None:
        if self.initial is not None:
            self.initial.write(units, values)
            return
        layer = self.layer
        query = units.to(layer.units.device, torch.long)
        old_slots = layer.unit_slots()
        found, position = _lookup(layer.units[old_slots].long(), query)
        slots = old_slots[position]
        if not bool(found.all()):
            raise ValueError(f"{self.tensor.name}: can only write units that are stored")
        with torch.no_grad():
            layer.tiles()[slots] = values.to(layer.values).view(-1, layer.block, layer.block)

    # -- bookkeeping -------------------------------------------------------------------------------

    def carry_state(self, optimizer: torch.optim.Optimizer, change: TopologyChange) -> None:
        """Optimizer state follows the survivors to their new slots; every other slot is 0.
        A patched change (``reset_slots``) moves nothing: only the slots that units entered or
        left start at zero (a free slot's state is zero already: its gradient is)."""
        if change.reset_slots is not None:
            slots = change.reset_slots
            if slots.numel():
                for value in elementwise_state(optimizer, self.layer.values):
                    value.view(self.layer.capacity, -1)[slots] = 0.0
            return
        if change.moved is not None:
            source, target = change.moved
            for value in elementwise_state(optimizer, self.layer.values):
                tiles = value.view(self.layer.tiles().shape)
                carried = torch.zeros_like(tiles)
                carried[target] = tiles[source]
                tiles.copy_(carried)
        super().carry_state(optimizer, change)

    def compact(self) -> None:
        """Fill the slots from the initial dense host view (no optimizer yet) and drop it."""
        initial, layer = self.initial, self.layer
        if initial is None:
            return
        new_units, in_a = initial.units()  # sorted
        n = new_units.numel()
        if n > layer.capacity:
            raise RuntimeError(
                f"{self.tensor.name}: {n} units in B exceed capacity {layer.capacity}"
            )
        tiles = gather_units(initial.weight.detach(), new_units, layer.block)
        with torch.no_grad():
            layer.values.zero_()
            layer.tiles()[:n] = tiles.to(layer.values)
            layer.units.fill_(-1)
            layer.units[:n] = new_units.to(layer.units.device)
            layer.in_a.zero_()
            layer.in_a[:n] = in_a.to(layer.in_a.device)
            if layer.reservoir is not None:
                layer.reservoir.copy_(initial.weight.detach())
        layer.invalidate()
        self.initial = None


def _unit_mask(layer: CompactLinear, slots: Tensor) -> Tensor:
    grid = torch.zeros(layer.grid[0] * layer.grid[1], dtype=torch.bool, device=layer.units.device)
    grid[layer.units[slots]] = True
    return expand_blocks(grid.view(layer.grid), layer.block, layer.shape)


def _lookup(sorted_units: Tensor, query: Tensor) -> tuple[Tensor, Tensor]:
    """(found, position): where each of ``query`` sits in the sorted ``sorted_units``."""
    if sorted_units.numel() == 0:
        return torch.zeros_like(query, dtype=torch.bool), torch.zeros_like(query)
    position = torch.searchsorted(sorted_units, query).clamp(max=sorted_units.numel() - 1)
    return sorted_units[position] == query, position


def _survivors(old_units: Tensor, new_units: Tensor) -> tuple[Tensor, Tensor]:
    """(old slots, new slots) of the units stored both before and after an update."""
    found, position = _lookup(old_units, new_units)
    return position[found], torch.nonzero(found).squeeze(1)


class CompactBackend(Backend):
    """Base of the backends that replace sparse ``nn.Linear`` layers by a :class:`CompactLinear`
    served by a :class:`CompactStorage` (not registered itself).

    A subclass names itself, sets the class attributes of :class:`Backend`, builds its layer
    (:meth:`make_layer`) and says what it supports (:meth:`check_layer`, :meth:`check_block`,
    ``conv1d``: whether it takes Hugging Face ``Conv1D`` layers too).
    """

    conv1d: ClassVar[bool] = False

    fixed_capacity = True

    def __init__(self) -> None:
        self._swapped: list[tuple[nn.Module, str, CompactLinear]] = []
        self._originals: list[nn.Module] = []

    def make_layer(
        self, linear: nn.Module, block: int, capacity: int, reservoir: bool
    ) -> CompactLinear:
        """The layer replacing ``linear`` (with ``capacity`` slots of ``block`` x ``block``)."""
        raise NotImplementedError

    def check_block(self, block: int) -> None:
        """Raise ``ValueError`` unless the backend stores ``block`` x ``block`` units."""
        blocks = self.supported_blocks
        if blocks is not None and block not in blocks:
            raise ValueError(
                f"backend {self.name!r} supports block_size in {list(blocks)}, got {block}"
            )

    def check_layer(self, model: nn.Module, info: ParamInfo) -> nn.Module:
        """Raise ``ValueError`` unless ``info`` is the weight of a plain ``nn.Linear`` (or, with
        ``conv1d``, a Hugging Face ``Conv1D``) inside ``model``; return that layer (subclasses
        add device and dtype checks)."""
        linear = model.get_submodule(info.module_name)
        if not info.module_name:
            raise ValueError(
                f"backend {self.name!r} replaces sparse layers inside a model; the model itself "
                f"is a {type(linear).__name__}. Wrap it, e.g. nn.Sequential(layer)"
            )
        supported = type(linear) is nn.Linear or (self.conv1d and is_hf_conv1d(linear))
        if not supported or info.attr != "weight":
            kinds = "nn.Linear and Hugging Face Conv1D" if self.conv1d else "nn.Linear"
            raise ValueError(
                f"backend {self.name!r} supports {kinds} weights; {info.name} belongs to "
                f"{type(linear).__name__}. Keep it dense (layout.dense_patterns) or use "
                "backend 'masked'"
            )
        return linear

    def attach(
        self,
        model: nn.Module,
        specs: Sequence[TensorSpec],
        *,
        block: int,
        block_norm: str,
        reservoir: bool,
    ) -> list[SparseTensor]:
        """Replace every sparse ``nn.Linear`` (or HF ``Conv1D``) by the backend's layer; the
        tensors serve dense views until :meth:`finish_init` compacts what the method's
        ``init_masks`` wrote."""
        self.check_block(block)
        for spec in specs:  # every check before the model changes
            self.check_layer(model, spec.info)
        return [self._attach_one(model, spec, block, block_norm, reservoir) for spec in specs]

    def _attach_one(
        self, model: nn.Module, spec: TensorSpec, block: int, block_norm: str, reservoir: bool
    ) -> SparseTensor:
        info = spec.info
        linear = model.get_submodule(info.module_name)
        capacity = count_for_density(math.prod(info.shape) // (block * block),
                                     spec.capacity_density)  # fmt: skip
        layer = self.make_layer(linear, block, capacity, reservoir)
        # state_dict() also holds the plain key (weight = theta * A); see alwayssparse.state_dicts.
        register_weight_hooks(layer, "weight", layer.dense_weight, _STORED_KEYS,
                              f"backend {self.name}: stored values")  # fmt: skip
        parent_name, _, attr = info.module_name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, attr, layer)
        self._swapped.append((parent, attr, layer))
        self._originals.append(linear)
        dense = linear.weight
        assert isinstance(dense, Tensor)
        weight = dense.detach().clone()
        full = torch.ones_like(weight, dtype=torch.bool)
        storage = CompactStorage(layer, DenseStorage(weight, full, full.clone()))
        return SparseTensor(
            name=info.name, shape=info.shape, density=spec.density,
            backward_density=spec.backward_density, storage=storage, block=block,
            block_norm=block_norm, module=layer, op="linear_t" if layer.transposed else "linear",
        )  # fmt: skip

    def finish_init(self, tensors: Sequence[SparseTensor]) -> None:
        """Compact the initial dense views into the stored slots."""
        for t in tensors:
            storage = t.storage
            assert isinstance(storage, CompactStorage)
            storage.compact()

    def check_optimizer(
        self, tensors: Sequence[SparseTensor], optimizer: torch.optim.Optimizer
    ) -> None:
        require_held(tensors, optimizer)

    def weight_parameters(self, model: nn.Module) -> list[Tensor]:
        """The stored values of every :class:`CompactLinear` (1-D for unstructured layers)."""
        return [m.values for m in model.modules() if isinstance(m, CompactLinear)]

    def export(self, model: nn.Module) -> None:
        """Put plain ``nn.Linear`` layers back, with weight = theta on A and zero elsewhere
        (on the layer's device, in its values' dtype; a replaced Conv1D: the original module
        object, holding a new weight)."""
        for (parent, attr, layer), original in zip(self._swapped, self._originals, strict=True):
            values = layer.values
            if layer.transposed:
                original.weight = nn.Parameter(layer.dense_weight())
                original.bias = layer.bias
                setattr(parent, attr, original)
                continue
            linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                               device=values.device, dtype=values.dtype)  # fmt: skip
            with torch.no_grad():
                linear.weight.copy_(layer.dense_weight())
            if layer.bias is not None:
                linear.bias = layer.bias
            setattr(parent, attr, linear)
        self._swapped.clear()
        self._originals.clear()

    def detach(self, model: nn.Module) -> None:
        """Put the original ``nn.Linear`` objects back (their weights were never changed)."""
        for (parent, attr, _), linear in zip(self._swapped, self._originals, strict=True):
            setattr(parent, attr, linear)
        self._swapped.clear()
        self._originals.clear()


@register_backend
class SparseBackend(CompactBackend):
    """Stored entries only, sparse kernels; ``nn.Linear`` and Hugging Face ``Conv1D`` layers on
    the CPU."""

    name = "sparse"
    supported_blocks = SUPPORTED_BLOCKS
    devices = ("cpu",)
    conv1d = True

    def make_layer(
        self, linear: nn.Module, block: int, capacity: int, reservoir: bool
    ) -> CompactLinear:
        return SparseLinear(linear, block, capacity, reservoir)

    def check_layer(self, model: nn.Module, info: ParamInfo) -> nn.Module:
        linear = super().check_layer(model, info)
        weight = linear.weight
        assert isinstance(weight, Tensor)
        if weight.device.type != "cpu" or weight.dtype != torch.float32:
            raise ValueError(
                f"backend 'sparse' kernels run on CPU float32; {info.name} is "
                f"{weight.dtype} on {weight.device}. Use backend 'masked'"
            )
        return linear
