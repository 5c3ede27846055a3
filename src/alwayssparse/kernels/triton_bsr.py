r"""Block-sparse Linear layer on GPUs: Triton kernels and their autograd function.

The weight ``W`` (``out x in``) exists only at square ``b x b`` blocks, ``b`` in 16, 32, 64, on
the block grid ``(out / b, in / b)``. A layer keeps, as the CPU sparse backend
(:mod:`alwayssparse.backends.sparse`) does, one tensor of block values ``V`` with a slot per
block of the gradient set B (``(capacity, b, b)`` or its ``(capacity * b, b)`` view) and the
sorted flat block indices ``units`` (row-major on the grid). A :class:`BsrLayout` indexes one set
of blocks (A, the forward set, or B ⊇ A) into those slots:

==========  ================  ==========================================================
row_ptr     (out/b + 1,)      blocks of block row ``r`` are ``row_ptr[r] .. row_ptr[r+1]-1``
cols        (nnz,)            their block columns (ascending within a row)
rows        (nnz,)            their block rows (for the one-program-per-block SDDMM)
slots       (nnz,)            their positions in ``V``
col_ptr     (in/b + 1,)       transposed index: blocks of block column ``c`` are
t_rows      (nnz,)            ``col_ptr[c] .. col_ptr[c+1]-1``, with block rows ``t_rows``
t_slots     (nnz,)            and positions ``t_slots`` in ``V`` (ascending rows in a column)
n_slots     int               ``max(slots) + 1``: ``V`` must hold at least this many blocks
==========  ================  ==========================================================

All index arrays are int32 (4 bytes per stored block). The values are never gathered or
transposed in memory: the kernels read ``V[slot]`` in place, so A's values are B's slots
``layout_a.slots`` and a mask update only has to rebuild the layouts (see
:func:`layouts_from_storage`, the counterpart of ``SparseLinear.patterns``).

Products (fp32 accumulation; inputs fp32, bf16 or fp16; results in the input's dtype, weight
gradients in the values' dtype; the values are cast to the activations' dtype before ``tl.dot``
so fp32 master values with bf16 activations work)::

    forward          Y[:, r]  = sum_{k in row r}    X[:, cols[k]]  @ V[slots[k]]^T    (N, out)
    input gradient   dX[:, c] = sum_{k in column c} dY[:, t_rows[k]] @ V[t_slots[k]]   (N, in)
    weight gradient  dV[slots[k]] = dY[:, rows[k]]^T @ X[:, cols[k]]   for every block k of B

where ``Z[:, j]`` is the j-th block column ``Z[:, j*b:(j+1)*b]``. Slots of ``V`` outside the
layout get a zero gradient.

Kernel design (:mod:`alwayssparse.kernels._triton_bsr_jit`):

- ``dense_bsr_kernel`` computes both dense x sparse products. One program owns a
  ``BLOCK_M x b`` output tile: ``BLOCK_M`` rows of X (or dY) and one block row (forward) or block
  column (input gradient, through the transposed index) of W. It loops over that row's/column's
  stored blocks: per block one ``BLOCK_M x b`` tile of the dense operand (b contiguous elements
  per row) and the contiguous ``b x b`` block of V (transposed in registers for the forward, not
  by a strided load), ``acc = tl.dot(a, w, acc)`` on the tensor cores, then one masked store.
  Empty rows/columns store zeros, so outputs need no zero fill (an empty layout launches
  nothing and returns zeros). The 1-D grid
  ``cdiv(N, BLOCK_M) * groups`` runs the group index fastest, so programs in flight share the
  same rows of X (L2 reuse) while W, the small operand, stays in L2.
- ``sampled_grad_kernel`` (SDDMM) runs one program per stored block of B, reducing over N in
  ``BLOCK_N`` chunks: ``acc += dY_chunk^T @ X_chunk`` (b x BLOCK_N times BLOCK_N x b). When B has
  few blocks and N is long it also splits N (grid ``(nnz, split)``) into float32 partial sums
  that the host adds up (deterministic, no atomics), so the GPU stays full.
- Rows of X/dY beyond N are masked (loaded as 0, not stored); all row offsets are 64-bit.
  Block pointers were removed in Triton 3.9 and tensor descriptors (TMA) need 16-byte-aligned
  strides and a device allocator, so the loads are plain pointer tiles.
- Open for tuning on the GPU: with b = 16 each ``tl.dot`` has K = 16 and an output tile only 16
  columns wide; a program could own several block rows (or unroll two blocks per step), loads
  could use TMA descriptors, and the tables below could become ``triton.autotune`` configs.

Launch configuration (fixed tables below, chosen for H100/H200-class GPUs with bf16 inputs and
not yet measured: no GPU was available when they were written): dense x sparse ``BLOCK_M`` 128
(64 for fp32 with b >= 32), 4 warps, 3-4 pipeline stages (the indirect block loads pipeline
like a K loop); SDDMM ``BLOCK_N`` 128 (64 for b = 64) with 2 warps for b = 16, 4 otherwise.
``BLOCK_M``/``BLOCK_N`` shrink to the next power of two >= N (minimum 16) for short inputs.
fp32 inputs use ``input_precision="ieee"`` unless ``torch.set_float32_matmul_precision`` allows
TF32 (then ``"tf32"``), like ``torch.matmul``. ``benchmarks/triton_bsr_compile.py`` compiles every
variant for sm_90 without a GPU: bf16/fp16 run on ``wgmma`` (``mma`` for the SDDMM with b <= 32),
and every block loop is software-pipelined (asynchronous copies to shared memory).

Triton is optional: this module imports without it and raises an ``ImportError`` naming the fix
when a kernel is called. Kernels take CUDA tensors. With ``TRITON_INTERPRET=1`` set when the
kernel module is first imported (on the first kernel call) and while kernels run, they run,
slowly, on CPU tensors in Triton's interpreter (the tests do this); there the ``tl.dot``
operands of bf16 kernels are cast to fp32 first, as the interpreter cannot multiply bf16.
"""

from __future__ import annotations

import importlib.util
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, fields
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "BLOCK_SIZES",
    "BlockSparseLinearFunction",
    "BsrLayout",
    "bsr_layout",
    "bsr_matmul",
    "bsr_matmul_t",
    "bsr_sampled_grad",
    "bsr_to_dense",
    "layouts_from_storage",
    "triton_available",
]

BLOCK_SIZES = (16, 32, 64)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# (BLOCK_M, num_warps, num_stages) of dense_bsr_kernel by (b, bytes per input element).
_DENSE_CONFIG = {
    (16, 2): (128, 4, 4),
    (32, 2): (128, 4, 4),
    (64, 2): (128, 4, 3),
    (16, 4): (128, 4, 3),
    (32, 4): (64, 4, 3),
    (64, 4): (64, 4, 3),
}
# (BLOCK_N, num_warps, num_stages) of sampled_grad_kernel by b.
_SAMPLED_CONFIG = {16: (128, 2, 4), 32: (128, 4, 4), 64: (64, 4, 3)}
# The SDDMM splits N when B has fewer blocks than this (and N is long enough).
_SPLIT_TARGET = 1024


def triton_available() -> bool:
    """Whether Triton is installed (the kernels also need a CUDA GPU or the interpreter)."""
    return importlib.util.find_spec("triton") is not None


def _jit() -> ModuleType:
    try:
        from alwayssparse.kernels import _triton_bsr_jit
    except ImportError as err:
        raise ImportError(
            "alwayssparse.kernels.triton_bsr needs Triton for its GPU kernels "
            f"({err}); install it with `pip install triton` (CUDA builds of PyTorch ship it) "
            "or use the CPU backend 'sparse'"
        ) from err
    return _triton_bsr_jit


# ----------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class BsrLayout:
    """Index of one set of ``b x b`` blocks of an ``(out, in)`` weight into a values tensor.

    Build it with :func:`bsr_layout` or :func:`layouts_from_storage`; fields as in the module
    docstring (int32, on the device of the values).
    """

    block: int
    grid: tuple[int, int]
    row_ptr: Tensor
    cols: Tensor
    rows: Tensor
    slots: Tensor
    col_ptr: Tensor
    t_rows: Tensor
    t_slots: Tensor
    n_slots: int  # max(slots) + 1 (0 when empty): values need at least this many blocks

    @property
    def nnz(self) -> int:
        return self.cols.numel()

    @property
    def shape(self) -> tuple[int, int]:
        """``(out_features, in_features)`` of the weight."""
        return self.grid[0] * self.block, self.grid[1] * self.block

    @property
    def device(self) -> torch.device:
        return self.cols.device

    def to(self, device: torch.device | str) -> BsrLayout:
        moved = {
            f.name: getattr(self, f.name).to(device)
            for f in fields(self)
            if isinstance(getattr(self, f.name), Tensor)
        }
        return BsrLayout(block=self.block, grid=self.grid, n_slots=self.n_slots, **moved)


def _ptr(counts: Tensor) -> Tensor:
    ptr = torch.zeros(counts.numel() + 1, dtype=torch.int64)
    ptr[1:] = torch.cumsum(counts, 0)
    return ptr


def _checked_units(units: Tensor, nbr: int, nbc: int) -> Tensor:
    """``units`` as int64 on the CPU, checked sorted, distinct and inside the grid."""
    units = units.detach().to("cpu", torch.int64)
    nnz = units.numel()
    if nnz >= 2**31:
        raise ValueError(f"{nnz} blocks exceed the int32 index range")
    if nnz:
        if int(units[0]) < 0 or int(units[-1]) >= nbr * nbc:
            raise ValueError(f"units must lie in [0, {nbr * nbc}) for the grid {(nbr, nbc)}")
        if bool((units[1:] <= units[:-1]).any()):
            raise ValueError("units must be strictly increasing (sorted, no duplicates)")
    return units


def _checked_slots(slots: Tensor, nnz: int) -> Tensor:
    """``slots`` as int64 on the CPU, checked: one per unit, distinct, non-negative, int32."""
    if not isinstance(slots, Tensor) or slots.dim() != 1 or slots.is_floating_point():
        raise TypeError("slots must be a 1-D integer tensor")
    slots = slots.detach().to("cpu", torch.int64)
    if slots.numel() != nnz:
        raise ValueError(f"slots has {slots.numel()} entries for {nnz} units")
    if nnz and (int(slots.min()) < 0 or torch.unique(slots).numel() != nnz):
        raise ValueError("slots must be distinct and non-negative")
    if nnz and int(slots.max()) >= 2**31:
        raise ValueError("slots exceed the int32 index range")
    return slots


def bsr_layout(
    units: Tensor,
    grid: tuple[int, int],
    block: int,
    slots: Tensor | None = None,
    device: torch.device | str | None = None,
) -> BsrLayout:
    """The layout of the blocks ``units`` (sorted flat indices, row-major on ``grid``).

    Args:
        units: Strictly increasing block indices in ``[0, grid[0] * grid[1])``.
        grid: ``(out // block, in // block)``.
        block: Block edge b, one of 16, 32, 64.
        slots: Position of each unit's block in the values tensor (distinct, >= 0); default
            ``0 .. len(units) - 1``.
        device: Where the index arrays live (default: the device of ``units``).
    """
    if block not in BLOCK_SIZES:
        raise ValueError(f"block size must be one of {BLOCK_SIZES}, got {block}")
    nbr, nbc = (int(g) for g in grid)
    if nbr < 0 or nbc < 0:
        raise ValueError(f"grid must be non-negative, got {grid}")
    if not isinstance(units, Tensor) or units.dim() != 1 or units.is_floating_point():
        raise TypeError("units must be a 1-D integer tensor")
    device = units.device if device is None else torch.device(device)
    units = _checked_units(units, nbr, nbc)
    nnz = units.numel()
    slots = torch.arange(nnz, dtype=torch.int64) if slots is None else _checked_slots(slots, nnz)
    rows = torch.div(units, nbc, rounding_mode="floor") if nbc else units
    cols = units - rows * nbc
    # Block-column order, ascending rows within a column (stable sort of row-major units).
    order = torch.sort(cols, stable=True).indices

    def i32(t: Tensor) -> Tensor:
        return t.to(device, torch.int32)

    return BsrLayout(
        block=block,
        grid=(nbr, nbc),
        row_ptr=i32(_ptr(torch.bincount(rows, minlength=nbr))),
        cols=i32(cols),
        rows=i32(rows),
        slots=i32(slots),
        col_ptr=i32(_ptr(torch.bincount(cols, minlength=nbc))),
        t_rows=i32(rows[order]),
        t_slots=i32(slots[order]),
        n_slots=int(slots.max()) + 1 if nnz else 0,
    )


def layouts_from_storage(
    units: Tensor, in_a: Tensor, grid: tuple[int, int], block: int
) -> tuple[BsrLayout, BsrLayout]:
    """(A's layout, B's layout) of a ``SparseLinear``-style storage.

    ``units`` holds B's sorted flat block indices in the first slots and -1 in unused ones,
    ``in_a`` flags the slots of the forward set A (as ``SparseLinear.units``/``in_a``); B's
    slots are ``0 .. n-1`` and A's are its flagged ones. When A = B both layouts are the same
    object. Index arrays go to the device of ``units``.
    """
    if units.shape != in_a.shape or units.dim() != 1:
        raise ValueError("units and in_a must be 1-D tensors of the same length (the capacity)")
    device = units.device
    units_cpu, in_a_cpu = units.detach().cpu().long(), in_a.detach().cpu().bool()
    n = int(torch.count_nonzero(units_cpu >= 0))
    if bool((units_cpu[n:] >= 0).any()):
        raise ValueError("used slots (units >= 0) must come first")
    live = torch.arange(n)
    layout_b = bsr_layout(units_cpu[:n], grid, block, device=device)
    a_slots = live[in_a_cpu[:n]]
    if a_slots.numel() == n:
        return layout_b, layout_b
    layout_a = bsr_layout(units_cpu[a_slots], grid, block, slots=a_slots, device=device)
    return layout_a, layout_b


def bsr_to_dense(values: Tensor, layout: BsrLayout) -> Tensor:
    """Dense ``(out, in)`` weight of the layout's blocks (zero elsewhere); PyTorch only."""
    b = layout.block
    tiles = values.reshape(-1, b, b)
    nbr, nbc = layout.grid
    dense = tiles.new_zeros(nbr, nbc, b, b)
    dense[layout.rows.long(), layout.cols.long()] = tiles[layout.slots.long()]
    return dense.permute(0, 2, 1, 3).reshape(nbr * b, nbc * b)


# ----------------------------------------------------------------------------- checks


def _check_layout(layout: BsrLayout) -> None:
    if not isinstance(layout, BsrLayout):
        raise TypeError(f"layout must be a BsrLayout, got {type(layout).__name__}")


def _check_act(t: Tensor, name: str, cols: int, layout: BsrLayout, jit: ModuleType) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")
    if t.dim() != 2 or t.shape[1] != cols:
        raise ValueError(f"{name} must have shape (N, {cols}), got {tuple(t.shape)}")
    if t.device != layout.device:
        raise ValueError(f"{name} is on {t.device} but the layout on {layout.device}")
    if t.device.type != "cuda" and not jit.INTERPRETED:
        raise ValueError(
            f"the Triton kernels need CUDA tensors, {name} is on {t.device} (for CPU tensors "
            "set TRITON_INTERPRET=1 before triton is first imported)"
        )
    return t.contiguous()


def _check_values(values: Tensor, layout: BsrLayout) -> Tensor:
    b = layout.block
    if not isinstance(values, Tensor) or values.dtype not in DTYPES:
        raise TypeError("values must be a float32, bfloat16 or float16 tensor")
    shape = tuple(values.shape)
    blocks = len(shape) == 3 and shape[1:] == (b, b)
    rows = len(shape) == 2 and shape[1] == b and shape[0] % b == 0
    if not (blocks or rows):
        raise ValueError(
            f"values must have shape (capacity, {b}, {b}) or (capacity * {b}, {b}), got {shape}"
        )
    if values.device != layout.device:
        raise ValueError(f"values are on {values.device} but the layout on {layout.device}")
    tiles = values.detach().contiguous().view(-1, b, b)
    if tiles.shape[0] < layout.n_slots:
        raise ValueError(
            f"values hold {tiles.shape[0]} blocks but the layout uses slots up to "
            f"{layout.n_slots - 1}"
        )
    return tiles


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


def _on_device(t: Tensor) -> AbstractContextManager[Any]:
    """Launch on ``t``'s GPU (Triton launches on the current CUDA device)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else nullcontext()


def _upcast(dtype: torch.dtype, jit: ModuleType) -> bool:
    # The interpreter's tl.dot cannot multiply bfloat16 (see _triton_bsr_jit).
    return bool(jit.INTERPRETED) and dtype == torch.bfloat16


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2_tile(n: int, cap: int) -> int:
    return max(16, min(cap, 1 << max(0, n - 1).bit_length()))


# ----------------------------------------------------------------------------- products


def _dense_bsr(
    a: Tensor, tiles: Tensor, layout: BsrLayout, forward: bool, jit: ModuleType
) -> Tensor:
    b = layout.block
    m = a.shape[0]
    groups = layout.grid[0] if forward else layout.grid[1]
    if layout.nnz == 0 or m == 0:
        # Nothing to launch (and CUDA launches reject the null pointers of empty index arrays).
        return a.new_zeros(m, groups * b)
    out = a.new_empty(m, groups * b)
    cap, warps, stages = _DENSE_CONFIG[(b, 4 if a.dtype == torch.float32 else 2)]
    block_m = _pow2_tile(m, cap)
    seg, idx, slots = (
        (layout.row_ptr, layout.cols, layout.slots)
        if forward
        else (layout.col_ptr, layout.t_rows, layout.t_slots)
    )
    grid = (_cdiv(m, block_m) * groups,)
    with _on_device(a):
        jit.dense_bsr_kernel[grid](
            a, tiles, out, seg, idx, slots, m, groups, a.stride(0), out.stride(0),
            B=b, BLOCK_M=block_m, TRANS_W=forward, PRECISION=_precision(a.dtype),
            UPCAST=_upcast(a.dtype, jit), num_warps=warps, num_stages=stages,
        )  # fmt: skip
    return out


def bsr_matmul(x: Tensor, values: Tensor, layout: BsrLayout) -> Tensor:
    """Forward ``Y = X @ W^T`` over the layout's blocks; X (N, in) -> Y (N, out), X's dtype."""
    jit = _jit()
    _check_layout(layout)
    x = _check_act(x, "x", layout.shape[1], layout, jit)
    return _dense_bsr(x, _check_values(values, layout), layout, True, jit)


def bsr_matmul_t(grad_y: Tensor, values: Tensor, layout: BsrLayout) -> Tensor:
    """Input gradient ``dX = dY @ W`` over the layout's blocks; dY (N, out) -> dX (N, in)."""
    jit = _jit()
    _check_layout(layout)
    grad_y = _check_act(grad_y, "grad_y", layout.shape[0], layout, jit)
    return _dense_bsr(grad_y, _check_values(values, layout), layout, False, jit)


def bsr_sampled_grad(
    grad_y: Tensor,
    x: Tensor,
    layout: BsrLayout,
    capacity: int | None = None,
    dtype: torch.dtype | None = None,
    split: int | None = None,
) -> Tensor:
    """Weight gradient at the layout's blocks: ``G[slots[k]] = dY[:, rows_k]^T @ X[:, cols_k]``.

    Returns ``(capacity, b, b)`` (default capacity: ``max(slots) + 1``) in ``dtype`` (default:
    X's), zero at slots outside the layout. ``split`` (default: automatic) is the number of
    ranges N is cut into for parallelism when the layout has few blocks.
    """
    jit = _jit()
    _check_layout(layout)
    x = _check_act(x, "x", layout.shape[1], layout, jit)
    grad_y = _check_act(grad_y, "grad_y", layout.shape[0], layout, jit)
    if grad_y.shape[0] != x.shape[0]:
        raise ValueError(f"grad_y has {grad_y.shape[0]} rows and x {x.shape[0]}")
    b, nnz, m = layout.block, layout.nnz, x.shape[0]
    dtype = x.dtype if dtype is None else dtype
    if dtype not in DTYPES:
        raise TypeError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
    capacity = layout.n_slots if capacity is None else capacity
    if isinstance(capacity, bool) or not isinstance(capacity, int):
        raise TypeError(f"capacity must be an int, got {capacity!r}")
    if capacity < layout.n_slots:
        raise ValueError(f"capacity {capacity} is below the largest slot + 1 = {layout.n_slots}")
    if nnz == 0 or m == 0:
        return x.new_zeros(capacity, b, b, dtype=dtype)
    cap, warps, stages = _SAMPLED_CONFIG[b]
    block_n = _pow2_tile(m, cap)
    chunks = _cdiv(m, block_n)
    if split is None:
        split = 1 if nnz >= _SPLIT_TARGET else min(_cdiv(_SPLIT_TARGET, nnz), chunks // 8)
    split = max(1, min(int(split), chunks))
    per_split = _cdiv(chunks, split)
    split = _cdiv(chunks, per_split)  # no empty ranges
    partial = split > 1
    # Every slot is written when the layout covers them all (A = B = full capacity).
    full = nnz == capacity
    if partial:
        out = x.new_empty(split, nnz, b, b, dtype=torch.float32)
    elif full:
        out = x.new_empty(capacity, b, b, dtype=dtype)
    else:
        out = x.new_zeros(capacity, b, b, dtype=dtype)
    with _on_device(x):
        jit.sampled_grad_kernel[(nnz, split)](
            grad_y, x, out, layout.rows, layout.cols, layout.slots, m, nnz, per_split,
            grad_y.stride(0), x.stride(0),
            B=b, BLOCK_N=block_n, PARTIAL=partial, PRECISION=_precision(grad_y.dtype),
            UPCAST=_upcast(grad_y.dtype, jit), num_warps=warps, num_stages=stages,
        )  # fmt: skip
    if not partial:
        return out
    grad = x.new_zeros(capacity, b, b, dtype=dtype)
    grad[layout.slots.long()] = out.sum(0).to(dtype)
    return grad


# ----------------------------------------------------------------------------- autograd


class BlockSparseLinearFunction(torch.autograd.Function):
    """``y = x @ W_A^T`` with W's blocks in ``values``; gradients: x over A, values at B.

    ``apply(x, values, layout_a, layout_b)``: ``x`` (N, in); ``values`` the trainable blocks,
    ``(capacity, b, b)`` or ``(capacity * b, b)``; ``layout_a`` the forward set A, whose slots
    index ``values``; ``layout_b`` the set B ⊇ A that receives weight gradients (every other
    slot gets zero). The gradient of ``values`` has its shape and dtype. Mirrors the CPU
    backend's ``_SparseLinearFunction`` (same slots, units and A flags; see
    :func:`layouts_from_storage`).
    """

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, values: Tensor, layout_a: BsrLayout, layout_b: BsrLayout
    ) -> Tensor:
        if layout_a.block != layout_b.block or layout_a.grid != layout_b.grid:
            raise ValueError("layout_a and layout_b must have the same block size and grid")
        ctx.save_for_backward(x, values)
        ctx.layouts = (layout_a, layout_b)
        return bsr_matmul(x, values, layout_a)

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:
        x, values = ctx.saved_tensors
        layout_a, layout_b = ctx.layouts
        grad_x = grad_values = None
        if ctx.needs_input_grad[0]:
            grad_x = bsr_matmul_t(grad_y.to(x.dtype), values, layout_a)
        if ctx.needs_input_grad[1]:
            b = layout_b.block
            sampled = bsr_sampled_grad(
                grad_y.to(x.dtype), x, layout_b, capacity=values.numel() // (b * b),
                dtype=values.dtype,
            )  # fmt: skip
            grad_values = sampled.view(values.shape)
        return grad_x, grad_values, None, None
