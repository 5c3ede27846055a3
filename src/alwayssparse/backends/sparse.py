"""The sparse backend: only the stored entries exist, and they are multiplied sparsely.

Each sparse ``nn.Linear`` is replaced by a :class:`SparseLinear` that holds

- ``values``: one trainable ``nn.Parameter`` with a slot per unit of the gradient set B, in
  CSR/BSR order: shape (capacity,) for entries, (capacity * b, b) for b x b blocks (slot s is
  rows s*b .. s*b + b - 1, one block, so block norms and the group-lasso step of the dense code
  apply to it unchanged). Its size (the *capacity*) is fixed for the whole run, so the optimizer
  keeps the same parameter object and its state (momentum, Adam moments) exists only for stored
  entries;
- ``units``: the sorted flat indices of the stored units on the block grid in the first slots,
  -1 for unused slots (which only gradual magnitude pruning leaves as it shrinks); int32 (int64
  only for grids of 2^31 units or more), as are the cached kernel indices (column indices,
  transposes, slots; CSR row pointers stay int64), so indices cost 4 bytes per stored unit;
- ``in_a``: which slots belong to the forward set A;
- ``reservoir`` (Top-KAST only): theta of the whole tensor on the host (paper section 2.4: the
  top-k can be computed off the accelerator). Only the entries outside B are read from it.

Training step (kernels in :mod:`alwayssparse.kernels`, no dense weight or weight gradient):

    forward         y  = x @ W_A^T             sparse x dense over A's pattern
    input gradient  gx = grad_y @ W_A          transposed sparse product
    weight gradient gv = (grad_y^T @ x)[B]     sampled dense-dense product at B's positions

Mask updates run in unit space (:class:`alwayssparse.sparse_tensor.UnitStorage`): the methods read
B's sorted unit indices, A's flags and the block norms of the stored values, and hand back the
new sorted units; :class:`CompactStorage` rebuilds the slots from them, carrying each surviving
unit's value and optimizer state to its new slot (units that enter B start with zero optimizer
state, and theta from the reservoir, or zero without one). Prune/regrow, RigL and GMP updates
allocate O(capacity) memory, nothing of the weight's size; a Top-KAST refresh writes the stored
values into the reservoir in place and ranks it (the grid scores and the top-k's temporaries, see
:mod:`alwayssparse.methods.topkast`). Only the initial masks are chosen on a dense host view of
the layer (while the dense ``nn.Linear`` still exists), and only :meth:`SparseBackend.dense_masks`
and :meth:`SparseLinear.dense_weight` (inspection, export) build dense tensors afterwards.

The storage is shared with the GPU backend (:mod:`alwayssparse.backends.gpu`): the layer's
slots, units, flags and reservoir are :class:`CompactLinear`, of which :class:`SparseLinear` is
the subclass with the CPU kernels; :class:`CompactStorage` serves any :class:`CompactLinear` on
its device; :class:`CompactBackend` attaches, compacts and exports any of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from alwayssparse import kernels
from alwayssparse.backends.base import Backend, TensorSpec, register_backend, require_held
from alwayssparse.layout import ParamInfo
from alwayssparse.masks import (
    block_norms,
    count_for_density,
    expand_blocks,
    gather_units,
    tile_norms,
    write_units,
)
from alwayssparse.optim_state import ELEMENTWISE_STATE
from alwayssparse.sparse_tensor import (
    DenseStorage,
    SparseTensor,
    TensorsKey,
    TopologyChange,
    UnitStorage,
)

SUPPORTED_BLOCKS = (1, *kernels.BLOCK_SIZES)


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

    Args:
        linear: The dense layer it replaces (its bias parameter object is kept).
        block: Unit edge b.
        capacity: Number of stored units (slots), fixed for the run.
        reservoir: Keep theta of the whole tensor (Top-KAST's set C).
        reservoir_device: Where the reservoir lives (default: the host).
    """

    values: Tensor
    units: Tensor
    in_a: Tensor

    def __init__(
        self,
        linear: nn.Linear,
        block: int,
        capacity: int,
        reservoir: bool,
        reservoir_device: torch.device | str = "cpu",
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.block = (
            linear.in_features,
            linear.out_features,
            block,
        )
        self.grid = (linear.out_features // block, linear.in_features // block)
        weight = linear.weight.detach()
        shape = (capacity,) if block == 1 else (capacity * block, block)
        self.values = nn.Parameter(weight.new_zeros(shape))
        self.bias = linear.bias
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
        """Number of used slots (they come first, in unit order)."""
        return int(torch.count_nonzero(self.units >= 0))

    def stored_slots(self, only_a: bool = True) -> Tensor:
        """Slots of A (or of every stored unit, B), ascending, on the layer's device."""
        n = self.stored()
        live = torch.arange(n, dtype=self.index_dtype, device=self.units.device)
        return live[self.in_a[:n]] if only_a else live

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

    def dense_weight(self, only_a: bool = True) -> Tensor:
        """theta on A (or on every stored unit) as a dense (out, in) tensor (for export/tests)."""
        slots = self.stored_slots(only_a)
        weight = self.values.new_zeros(self.out_features, self.in_features)
        write_units(weight, self.units[slots], self.block, self.tiles().detach()[slots])
        return weight

    def sync_reservoir(self) -> Tensor:
        """Write the stored values into the reservoir (in place): it then holds all of theta."""
        if self.reservoir is None:
            raise RuntimeError(
                "this layer keeps no reservoir: only theta at its stored units exists "
                "(methods that rank the whole tensor set keeps_reservoir)"
            )
        n, device = self.stored(), self.reservoir.device
        tiles = self.tiles().detach()[:n].to(device)
        write_units(self.reservoir, self.units[:n].to(device), self.block, tiles)
        return self.reservoir

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"block={self.block}, capacity={self.capacity}"
        )


class SparseLinear(CompactLinear):
    """:class:`CompactLinear` multiplied by the CPU kernels of :mod:`alwayssparse.kernels`.

    Args:
        linear: The dense layer it replaces (its bias parameter object is kept).
        block: Unit edge b (1: CSR; 4, 8, 16: BSR).
        capacity: Number of stored units (slots), fixed for the run.
        reservoir: Keep theta of the whole tensor on the host (Top-KAST's set C).
    """

    def __init__(self, linear: nn.Linear, block: int, capacity: int, reservoir: bool) -> None:
        super().__init__(linear, block, capacity, reservoir)
        self._patterns: tuple[_Pattern, _Pattern] | None = None

    def invalidate(self) -> None:
        super().invalidate()
        self._patterns = None

    def patterns(self) -> tuple[_Pattern, _Pattern]:
        """(A's pattern, B's pattern), built once per topology."""
        if self._patterns is None:
            live = torch.arange(self.stored(), dtype=self.index_dtype)
            in_a = live[self.in_a[: live.numel()]]
            a_ptr, a_cols = _compress(self.units[in_a], *self.grid)
            if self.block == 1:
                a_t = kernels.csr_transpose(a_ptr, a_cols, self.in_features)
            else:
                a_t = kernels.bsr_transpose(a_ptr, a_cols, self.in_features, self.block)
            pattern_a = _Pattern(in_a, a_ptr, a_cols, a_t)
            if in_a.numel() == live.numel():
                # A = B (every method but Top-KAST): one set of index arrays serves both.
                pattern_b = _Pattern(in_a, a_ptr, a_cols)
            else:
                pattern_b = _Pattern(live, *_compress(self.units[live], *self.grid))
            self._patterns = (pattern_a, pattern_b)
        return self._patterns

    def product(self, x: Tensor) -> Tensor:
        return _SparseLinearFunction.apply(x, self.values, self)


class _SparseLinearFunction(torch.autograd.Function):
    """y = x @ W_A^T with W given by ``values``; gradients: x by the transposed product over A,
    ``values`` by the sampled product at every stored (B) slot."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, values: Tensor, layer: SparseLinear) -> Tensor:
        pattern_a, pattern_b = layer.patterns()
        tiles = values if layer.block == 1 else values.view(-1, layer.block, layer.block)
        n_a = pattern_a.slots.numel()
        # A = B: A's slots are the first ones, so a view replaces the gather.
        same = n_a == pattern_b.slots.numel()
        a_values = tiles[:n_a] if same else tiles[pattern_a.slots]
        ctx.save_for_backward(x, a_values)
        ctx.layer, ctx.patterns = layer, (pattern_a, pattern_b)
        if layer.block == 1:
            return kernels.csr_matmul(pattern_a.row_ptr, pattern_a.cols, a_values, x,
                                      layer.out_features)  # fmt: skip
        return kernels.bsr_matmul(
            pattern_a.row_ptr, pattern_a.cols, a_values, x, layer.out_features
        )

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        x, a_values = ctx.saved_tensors
        layer: SparseLinear = ctx.layer
        pattern_a, pattern_b = ctx.patterns
        grad_y = grad_y.contiguous()
        grad_x = grad_values = None
        if ctx.needs_input_grad[0]:
            product = kernels.csr_matmul_t if layer.block == 1 else kernels.bsr_matmul_t
            grad_x = product(pattern_a.row_ptr, pattern_a.cols, a_values, grad_y,
                             layer.in_features, transpose=pattern_a.transpose)  # fmt: skip
        if ctx.needs_input_grad[1]:
            if layer.block == 1:
                sampled = kernels.csr_sampled_grad(pattern_b.row_ptr, pattern_b.cols, grad_y, x)
            else:
                sampled = kernels.bsr_sampled_grad(pattern_b.row_ptr, pattern_b.cols, grad_y, x,
                                                   block_size=layer.block)  # fmt: skip
            # Used slots come first in unit order, so B's slots are 0..n-1.
            if sampled.numel() == layer.values.numel():
                grad_values = sampled.view_as(layer.values)
            else:
                grad_values = torch.zeros_like(layer.values)
                grad_values.view(-1)[: sampled.numel()] = sampled.view(-1)
        return grad_x, grad_values, None


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
        n = self.layer.stored()
        return self.layer.units[:n].long(), self.layer.in_a[:n]

    def unit_scores(self) -> Tensor:
        if self.initial is not None:
            return self.initial.unit_scores()
        tiles = self.layer.tiles().detach()[: self.layer.stored()]
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
        old_n = layer.stored()
        source, target = _survivors(layer.units[:old_n].long(), units)
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

    def write(self, units: Tensor, values: Tensor) -> None:
        if self.initial is not None:
            self.initial.write(units, values)
            return
        layer = self.layer
        query = units.to(layer.units.device, torch.long)
        found, slots = _lookup(layer.units[: layer.stored()].long(), query)
        if not bool(found.all()):
            raise ValueError(f"{self.tensor.name}: can only write units that are stored")
        with torch.no_grad():
            layer.tiles()[slots] = values.to(layer.values).view(-1, layer.block, layer.block)

    # -- bookkeeping -------------------------------------------------------------------------------

    def carry_state(self, optimizer: torch.optim.Optimizer, change: TopologyChange) -> None:
        """Optimizer state follows the survivors to their new slots; every other slot is 0."""
        if change.moved is not None:
            source, target = change.moved
            state = optimizer.state.get(self.layer.values, {})
            for key in ELEMENTWISE_STATE:
                value = state.get(key)
                if isinstance(value, Tensor) and value.shape == self.layer.values.shape:
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
    return expand_blocks(
        grid.view(layer.grid), layer.block, (layer.out_features, layer.in_features)
    )


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
    (:meth:`make_layer`) and says what it supports (:meth:`check_layer`, :meth:`check_block`).
    """

    fixed_capacity = True

    def __init__(self) -> None:
        self._swapped: list[tuple[nn.Module, str, CompactLinear]] = []
        self._originals: list[nn.Linear] = []

    def make_layer(
        self, linear: nn.Linear, block: int, capacity: int, reservoir: bool
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

    def check_layer(self, model: nn.Module, info: ParamInfo) -> nn.Linear:
        """Raise ``ValueError`` unless ``info`` is the weight of a plain ``nn.Linear`` inside
        ``model``; return that layer (subclasses add device and dtype checks)."""
        linear = model.get_submodule(info.module_name)
        if not info.module_name:
            raise ValueError(
                f"backend {self.name!r} replaces sparse layers inside a model; the model itself "
                f"is a {type(linear).__name__}. Wrap it, e.g. nn.Sequential(layer)"
            )
        if type(linear) is not nn.Linear or info.attr != "weight":
            raise ValueError(
                f"backend {self.name!r} supports nn.Linear weights; {info.name} belongs to "
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
        """Replace every sparse ``nn.Linear`` by the backend's layer; the tensors serve dense
        views until :meth:`finish_init` compacts what the method's ``init_masks`` wrote."""
        self.check_block(block)
        for spec in specs:  # every check before the model changes
            self.check_layer(model, spec.info)
        return [self._attach_one(model, spec, block, block_norm, reservoir) for spec in specs]

    def _attach_one(
        self, model: nn.Module, spec: TensorSpec, block: int, block_norm: str, reservoir: bool
    ) -> SparseTensor:
        info = spec.info
        linear = model.get_submodule(info.module_name)
        assert isinstance(linear, nn.Linear)
        capacity = count_for_density(
            linear.weight.numel() // (block * block), spec.capacity_density
        )
        layer = self.make_layer(linear, block, capacity, reservoir)
        parent_name, _, attr = info.module_name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, attr, layer)
        self._swapped.append((parent, attr, layer))
        self._originals.append(linear)
        weight = linear.weight.detach().clone()
        full = torch.ones_like(weight, dtype=torch.bool)
        storage = CompactStorage(layer, DenseStorage(weight, full, full.clone()))
        return SparseTensor(
            name=info.name, shape=info.shape, density=spec.density,
            backward_density=spec.backward_density, storage=storage, block=block,
            block_norm=block_norm, module=layer, op="linear",
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
        (on the layer's device, in its values' dtype)."""
        for parent, attr, layer in self._swapped:
            values = layer.values
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
    """Stored entries only, sparse kernels; ``nn.Linear`` layers on the CPU."""

    name = "sparse"
    supported_blocks = SUPPORTED_BLOCKS
    devices = ("cpu",)

    def make_layer(
        self, linear: nn.Linear, block: int, capacity: int, reservoir: bool
    ) -> CompactLinear:
        return SparseLinear(linear, block, capacity, reservoir)

    def check_layer(self, model: nn.Module, info: ParamInfo) -> nn.Linear:
        linear = super().check_layer(model, info)
        if linear.weight.device.type != "cpu" or linear.weight.dtype != torch.float32:
            raise ValueError(
                f"backend 'sparse' kernels run on CPU float32; {info.name} is "
                f"{linear.weight.dtype} on {linear.weight.device}. Use backend 'masked'"
            )
        return linear
