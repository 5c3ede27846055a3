"""The sparse backend: only the stored entries exist, and they are multiplied sparsely.

Each sparse ``nn.Linear`` is replaced by a :class:`SparseLinear` that holds

- ``values``: one trainable ``nn.Parameter`` with a slot per unit of the gradient set B (entries,
  or b x b blocks), in CSR/BSR order; its size (the *capacity*) is fixed for the whole run, so the
  optimizer keeps the same parameter object and its state (momentum, Adam moments) exists only for
  stored entries;
- ``units``: the sorted flat indices of the stored units on the block grid (-1 for unused slots,
  which only gradual magnitude pruning leaves as it shrinks);
- ``in_a``: which slots belong to the forward set A;
- ``reservoir`` (Top-KAST only): theta of the whole tensor on the host (paper section 2.4: the
  top-k can be computed off the accelerator). Only the entries outside B are read from it.

Training step (kernels in :mod:`alwayssparse.kernels`, no dense weight or weight gradient):

    forward         y  = x @ W_A^T             sparse x dense over A's pattern
    input gradient  gx = grad_y @ W_A          transposed sparse product
    weight gradient gv = (grad_y^T @ x)[B]     sampled dense-dense product at B's positions

Mask updates: methods run their hooks on a host-side dense view of theta and the masks that is
built only on update steps (:meth:`SparseBackend.before_update`) and compacted back afterwards,
carrying each surviving entry's value and optimizer state to its new slot; entries that enter B
start with zero optimizer state. Between updates no dense tensor exists.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from alwayssparse import kernels
from alwayssparse.layout import ParamInfo
from alwayssparse.masks import collapse_blocks, count_for_density, expand_blocks
from alwayssparse.methods.base import SparseTensor
from alwayssparse.optim_state import ELEMENTWISE_STATE

SUPPORTED_BLOCKS = (1, *kernels.BLOCK_SIZES)


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


class SparseLinear(nn.Module):
    """A Linear layer whose weight exists only at its stored units.

    Args:
        linear: The dense layer it replaces (its bias parameter object is kept).
        block: Unit edge b (1: CSR; 4, 8, 16: BSR).
        capacity: Number of stored units (slots), fixed for the run.
        reservoir: Keep theta of the whole tensor on the host (Top-KAST's set C).
    """

    linear_like = True  # RigL's gradient capture treats it as a Linear layer
    values: Tensor
    units: Tensor
    in_a: Tensor

    def __init__(self, linear: nn.Linear, block: int, capacity: int, reservoir: bool) -> None:
        super().__init__()
        self.in_features, self.out_features, self.block = (
            linear.in_features,
            linear.out_features,
            block,
        )
        self.grid = (linear.out_features // block, linear.in_features // block)
        weight = linear.weight.detach()
        shape = (capacity,) if block == 1 else (capacity, block, block)
        self.values = nn.Parameter(weight.new_zeros(shape))
        self.bias = linear.bias
        self.register_buffer("units", torch.full((capacity,), -1, dtype=torch.long))
        self.register_buffer("in_a", torch.zeros(capacity, dtype=torch.bool))
        self.reservoir: Tensor | None
        self.register_buffer("reservoir", weight.to("cpu", copy=True) if reservoir else None)
        self._patterns: tuple[_Pattern, _Pattern] | None = None
        self.register_load_state_dict_post_hook(lambda module, _: module.invalidate())

    def invalidate(self) -> None:
        """Forget the cached index structures (after the units change)."""
        self._patterns = None

    def patterns(self) -> tuple[_Pattern, _Pattern]:
        """(A's pattern, B's pattern), built once per topology."""
        if self._patterns is None:
            live = torch.nonzero(self.units >= 0).squeeze(1)
            in_a = live[self.in_a[live]]
            a_ptr, a_cols = _compress(self.units[in_a], *self.grid)
            b_ptr, b_cols = _compress(self.units[live], *self.grid)
            if self.block == 1:
                a_t = kernels.csr_transpose(a_ptr, a_cols, self.in_features)
            else:
                a_t = kernels.bsr_transpose(a_ptr, a_cols, self.in_features, self.block)
            self._patterns = (_Pattern(in_a, a_ptr, a_cols, a_t), _Pattern(live, b_ptr, b_cols))
        return self._patterns

    def forward(self, x: Tensor) -> Tensor:
        x2 = x.reshape(-1, self.in_features)  # [N, in]
        y = _SparseLinearFunction.apply(x2, self.values, self)  # [N, out]
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def dense_weight(self, only_a: bool = True) -> Tensor:
        """theta on A (or on every stored unit) as a dense (out, in) tensor (for export/tests)."""
        return self.scatter(self.patterns()[0 if only_a else 1].slots)

    def scatter(self, slots: Tensor, base: Tensor | None = None) -> Tensor:
        """A dense (out, in) copy of ``base`` (default zeros) with ``slots``' values written in."""
        b = self.block
        if base is None:
            units = self.values.new_zeros(self.grid[0] * self.grid[1], b, b)
        else:
            units = _to_units(base, self.grid, b).clone()
        units[self.units[slots]] = self.values.detach()[slots].reshape(-1, b, b)
        return _from_units(units, self.grid, b).contiguous()

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"block={self.block}, capacity={self.units.numel()}"
        )


def _from_units(units: Tensor, grid: tuple[int, int], block: int) -> Tensor:
    """(rows*cols, b, b) unit tensor -> (rows*b, cols*b) matrix."""
    rows, cols = grid
    return (
        units.reshape(rows, cols, block, block).transpose(1, 2).reshape(rows * block, cols * block)
    )


def _to_units(matrix: Tensor, grid: tuple[int, int], block: int) -> Tensor:
    """(rows*b, cols*b) matrix -> (rows*cols, b, b) unit tensor."""
    rows, cols = grid
    return matrix.reshape(rows, block, cols, block).transpose(1, 2).reshape(-1, block, block)


class _SparseLinearFunction(torch.autograd.Function):
    """y = x @ W_A^T with W given by ``values``; gradients: x by the transposed product over A,
    ``values`` by the sampled product at every stored (B) slot."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, values: Tensor, layer: SparseLinear) -> Tensor:
        pattern_a, pattern_b = layer.patterns()
        a_values = values[pattern_a.slots]
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
            grad_values = torch.zeros_like(layer.values)
            grad_values[pattern_b.slots] = sampled
        return grad_x, grad_values, None


@dataclass
class _Entry:
    parent: nn.Module
    attr: str
    layer: SparseLinear
    dense_view: bool = False  # whether the SparseTensor currently holds host-side dense views


class SparseBackend:
    """Stored entries only, sparse kernels; ``nn.Linear`` layers on the CPU."""

    name = "sparse"

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}

    def attach(
        self,
        model: nn.Module,
        infos: Sequence[ParamInfo],
        densities: dict[str, float],
        backward_densities: dict[str, float],
        block: int = 1,
        reservoir: bool = False,
    ) -> list[SparseTensor]:
        """Replace every sparse ``nn.Linear`` by a :class:`SparseLinear`; return dense host views
        (the method's ``init_masks`` writes them; :meth:`after_update` compacts them)."""
        if block not in SUPPORTED_BLOCKS:
            raise ValueError(
                f"backend 'sparse' supports block_size in {list(SUPPORTED_BLOCKS)}, got {block}"
            )
        tensors = []
        for info in infos:
            if not info.sparse:
                continue
            linear = model.get_submodule(info.module_name)
            if not info.module_name:
                raise ValueError(
                    "backend 'sparse' replaces sparse layers inside a model; the model itself is "
                    f"a {type(linear).__name__}. Wrap it, e.g. nn.Sequential(layer)"
                )
            if type(linear) is not nn.Linear or info.attr != "weight":
                raise ValueError(
                    f"backend 'sparse' supports nn.Linear weights; {info.name} belongs to "
                    f"{type(linear).__name__}. Keep it dense (layout.dense_patterns) or use "
                    "backend 'masked'"
                )
            if linear.weight.device.type != "cpu" or linear.weight.dtype != torch.float32:
                raise ValueError(
                    f"backend 'sparse' kernels run on CPU float32; {info.name} is "
                    f"{linear.weight.dtype} on {linear.weight.device}. Use backend 'masked'"
                )
            units = linear.weight.numel() // (block * block)
            capacity = count_for_density(units, backward_densities[info.name])
            layer = SparseLinear(linear, block, capacity, reservoir)
            parent_name, _, attr = info.module_name.rpartition(".")
            parent = model.get_submodule(parent_name)
            setattr(parent, attr, layer)
            weight = linear.weight.detach().clone()
            full = torch.ones_like(weight, dtype=torch.bool)
            self._entries[info.name] = _Entry(parent, attr, layer, dense_view=True)
            tensors.append(
                SparseTensor(
                    name=info.name, weight=weight, density=densities[info.name],
                    backward_density=backward_densities[info.name], forward_mask=full,
                    grad_mask=full.clone(), block=block, module=layer,
                )
            )  # fmt: skip
        return tensors

    # -- views ---------------------------------------------------------------------------------

    def refresh_views(self, tensors: Sequence[SparseTensor]) -> None:
        """Compact views: ``weight`` is the ``values`` parameter, masks are per slot."""
        for t in tensors:
            entry = self._entries[t.name]
            if entry.dense_view:
                continue
            layer = entry.layer
            shape = layer.values.shape
            t.weight = layer.values
            t.forward_mask = _per_slot(layer.in_a, shape)
            t.grad_mask = _per_slot(layer.units >= 0, shape)

    def dense_masks(self, t: SparseTensor) -> tuple[Tensor, Tensor]:
        """(A, B) as dense bool tensors of the weight's shape."""
        entry = self._entries[t.name]
        if entry.dense_view:
            return t.forward_mask, t.grad_mask
        layer = entry.layer
        pattern_a, pattern_b = layer.patterns()
        return self._unit_mask(layer, pattern_a.slots), self._unit_mask(layer, pattern_b.slots)

    def _unit_mask(self, layer: SparseLinear, slots: Tensor) -> Tensor:
        grid = torch.zeros(layer.grid[0] * layer.grid[1], dtype=torch.bool)
        grid[layer.units[slots]] = True
        return expand_blocks(
            grid.view(layer.grid), layer.block, (layer.out_features, layer.in_features)
        )

    def parameter(self, t: SparseTensor) -> Tensor:
        """The trainable tensor the optimizer holds for ``t``."""
        return self._entries[t.name].layer.values

    def check_optimizer(
        self, tensors: Sequence[SparseTensor], optimizer: torch.optim.Optimizer
    ) -> None:
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        for t in tensors:
            if id(self._entries[t.name].layer.values) not in held:
                raise ValueError(
                    f"the optimizer does not hold the stored values of {t.name}: with backend "
                    "'sparse', build the optimizer after Sparsity(model, ...)"
                )

    # -- updates -------------------------------------------------------------------------------

    def before_update(
        self, tensors: Sequence[SparseTensor], optimizer: torch.optim.Optimizer, changing: bool
    ) -> None:
        """On update steps, give the method dense host views of theta, A and B."""
        if not changing:
            return
        for t in tensors:
            entry = self._entries[t.name]
            layer = entry.layer
            # Top-KAST: theta outside B comes from the reservoir; other methods have none there.
            t.weight = layer.scatter(layer.patterns()[1].slots, layer.reservoir)
            t.forward_mask, t.grad_mask = self.dense_masks(t)
            entry.dense_view = True

    def after_update(
        self, tensors: Sequence[SparseTensor], optimizer: torch.optim.Optimizer | None = None
    ) -> None:
        """Compact the dense views back into the stored slots, carrying optimizer state."""
        for t in tensors:
            entry = self._entries[t.name]
            if entry.dense_view:
                self._compact(t, entry.layer, optimizer)
                entry.dense_view = False
        self.refresh_views(tensors)

    def _compact(
        self, t: SparseTensor, layer: SparseLinear, optimizer: torch.optim.Optimizer | None
    ) -> None:
        grad_units = collapse_blocks(t.grad_mask, layer.block).reshape(-1)
        new_units = torch.nonzero(grad_units).squeeze(1)  # sorted
        capacity = layer.units.numel()
        if new_units.numel() > capacity:
            raise RuntimeError(
                f"{t.name}: {new_units.numel()} units in B exceed capacity {capacity}"
            )
        n = new_units.numel()
        in_a = collapse_blocks(t.forward_mask, layer.block).reshape(-1)[new_units]
        theta_units = _to_units(t.weight.detach(), layer.grid, layer.block)
        new_values = torch.zeros_like(layer.values)
        new_values[:n] = theta_units[new_units].reshape(new_values[:n].shape)
        source, target = self._survivors(layer, new_units)
        with torch.no_grad():
            if optimizer is not None:
                # Survivors carry their optimizer state to their new slot; new units start at 0.
                state = optimizer.state.get(layer.values, {})
                for key in ELEMENTWISE_STATE:
                    value = state.get(key)
                    if isinstance(value, Tensor) and value.shape == layer.values.shape:
                        carried = torch.zeros_like(value)
                        carried[target] = value[source]
                        value.copy_(carried)
            layer.values.copy_(new_values)
            layer.units.fill_(-1)
            layer.units[:n] = new_units
            layer.in_a.zero_()
            layer.in_a[:n] = in_a
            if layer.reservoir is not None:
                layer.reservoir.copy_(t.weight.detach())
        layer.invalidate()

    @staticmethod
    def _survivors(layer: SparseLinear, new_units: Tensor) -> tuple[Tensor, Tensor]:
        """(old slots, new slots) of the units stored both before and after an update."""
        old_slots = torch.nonzero(layer.units >= 0).squeeze(1)
        old_units = layer.units[old_slots]  # sorted
        if old_units.numel() == 0 or new_units.numel() == 0:
            empty = torch.empty(0, dtype=torch.long)
            return empty, empty
        position = torch.searchsorted(old_units, new_units).clamp(max=old_units.numel() - 1)
        found = old_units[position] == new_units
        return old_slots[position[found]], torch.nonzero(found).squeeze(1)

    def export(self, model: nn.Module) -> None:
        """Put plain ``nn.Linear`` layers back, with weight = theta on A and zero elsewhere."""
        for entry in self._entries.values():
            layer = entry.layer
            linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
            with torch.no_grad():
                linear.weight.copy_(layer.dense_weight())
            if layer.bias is not None:
                linear.bias = layer.bias
            setattr(entry.parent, entry.attr, linear)
        self._entries.clear()


def _per_slot(mask: Tensor, shape: torch.Size) -> Tensor:
    """A per-slot bool broadcast to the shape of ``values`` ((cap,) or (cap, b, b))."""
    return mask.view(-1, *([1] * (len(shape) - 1))).expand(shape)
