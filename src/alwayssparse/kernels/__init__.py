"""Fast CPU kernels for a truly sparse Linear layer ``y = x @ W^T``.

Only the active entries of ``W`` (``out x in``, float32) are stored, either unstructured in CSR
over the rows (output features) of ``W`` or as square ``b x b`` blocks (``b`` in 4, 8, 16) in BSR
over block rows.  For a training step the layer needs three products, all provided here:

===========================  ===========================================================
forward                      ``y  (N, out) = x @ W^T``           :func:`csr_matmul`
input gradient               ``gx (N, in)  = grad_y @ W``        :func:`csr_matmul_t`
weight gradient (SDDMM)      ``gv[k] = (grad_y^T @ x)[row(k), col(k)]`` :func:`csr_sampled_grad`
===========================  ===========================================================

(and the ``bsr_*`` counterparts).  No function ever materialises a dense weight or weight
gradient.  The extension also holds the host-side bookkeeping of mask updates, each with a
numpy or torch path in its caller: :func:`topkast_select` (Top-KAST's incremental selection),
:func:`topology_update` (a sparse layer's index structures after B changes) and
:func:`any_nonzero_outside` (the masked backend's check of the optimizer state outside B); and
element-wise passes that torch's CPU kernels make several of, or branch in: the masked
backend's select :func:`masked_where`, and Top-KAST's regulariser (:func:`weighted_norm`,
:func:`weighted_norm_grad`, :func:`topkast_coefficients`).
Row pointers are int64; column indices may be int32 (half the index memory) or
int64, and a pattern's transpose keeps the dtype of its column indices.  Results do not depend
on the backend beyond float32 rounding (~1e-6 relative).

Backends (see :func:`available_backend`): a C++ extension compiled just in time on first use
(needs ``ninja`` and a C++17 compiler; cached per user), or a pure-PyTorch fallback selected with
``ALWAYSSPARSE_KERNELS=torch`` or automatically, with a one-time warning, when the build fails.
The C++ kernels run on torch's intra-op thread pool (``torch.set_num_threads``).
"""

from __future__ import annotations

import torch

from alwayssparse.kernels import _build
from alwayssparse.kernels import _torch_ref as _ref

__all__ = [
    "any_nonzero_outside",
    "available_backend",
    "bsr_matmul",
    "bsr_matmul_t",
    "bsr_sampled_grad",
    "bsr_to_dense",
    "bsr_transpose",
    "csr_matmul",
    "csr_matmul_t",
    "csr_sampled_grad",
    "csr_to_dense",
    "csr_transpose",
    "dense_to_bsr",
    "dense_to_csr",
    "masked_where",
    "topkast_coefficients",
    "topkast_select",
    "topology_update",
    "weighted_norm",
    "weighted_norm_grad",
]

BLOCK_SIZES = (4, 8, 16)
INDEX_DTYPES = (torch.int32, torch.int64)  # column indices; row pointers are int64


def _ext():
    return _build.get_module()


def available_backend() -> str:
    """``"cpp"`` when the compiled kernels are in use, else ``"torch"`` (builds on first call)."""
    return "cpp" if _ext() is not None else "torch"


# ----------------------------------------------------------------------------- validation


def _tensor(t, name: str, dtype: torch.dtype | tuple[torch.dtype, ...], dim: int) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    allowed = dtype if isinstance(dtype, tuple) else (dtype,)
    if t.dtype not in allowed:
        names = " or ".join(str(d) for d in allowed)
        raise TypeError(f"{name} must have dtype {names}, got {t.dtype}")
    if t.device.type != "cpu":
        raise ValueError(f"{name} must be a CPU tensor, got device {t.device}")
    if t.layout != torch.strided:
        raise ValueError(f"{name} must be a strided (dense) tensor, got {t.layout}")
    if t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")
    return t.detach().contiguous()


def _check_compressed(ptr, idx, n_rows: int, n_cols: int, ptr_name: str, idx_name: str):
    ptr = _tensor(ptr, ptr_name, torch.int64, 1)
    idx = _tensor(idx, idx_name, INDEX_DTYPES, 1)
    if ptr.numel() != n_rows + 1:
        raise ValueError(f"{ptr_name} must have {n_rows + 1} entries, got {ptr.numel()}")
    nnz = idx.numel()
    if int(ptr[0]) != 0 or int(ptr[-1]) != nnz:
        raise ValueError(
            f"{ptr_name} must start at 0 and end at len({idx_name}) = {nnz}, "
            f"got {int(ptr[0])} .. {int(ptr[-1])}"
        )
    if n_rows > 0 and bool((ptr[1:] < ptr[:-1]).any()):
        raise ValueError(f"{ptr_name} must be non-decreasing")
    if nnz > 0:
        lo, hi = torch.aminmax(idx)
        if int(lo) < 0 or int(hi) >= n_cols:
            raise ValueError(
                f"{idx_name} entries must lie in [0, {n_cols}), got {int(lo)}..{int(hi)}"
            )
    return ptr, idx


def _check_int(v, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise TypeError(f"{name} must be a non-negative int, got {v!r}")
    return v


def _check_dense(t, name: str, cols: int | None = None, rows: int | None = None):
    t = _tensor(t, name, torch.float32, 2)
    if cols is not None and t.shape[1] != cols:
        raise ValueError(f"{name} must have {cols} columns, got shape {tuple(t.shape)}")
    if rows is not None and t.shape[0] != rows:
        raise ValueError(f"{name} must have {rows} rows, got shape {tuple(t.shape)}")
    return t


# ----------------------------------------------------------------------------- unstructured


def csr_matmul(row_ptr, col_idx, values, x, out_features: int) -> torch.Tensor:
    """Forward ``y = x @ W^T`` for CSR ``W`` (out_features x x.shape[1]); returns (N, out)."""
    out_features = _check_int(out_features, "out_features")
    x = _check_dense(x, "x")
    row_ptr, col_idx = _check_compressed(
        row_ptr, col_idx, out_features, x.shape[1], "row_ptr", "col_idx"
    )
    values = _tensor(values, "values", torch.float32, 1)
    if values.numel() != col_idx.numel():
        raise ValueError(
            f"values ({values.numel()}) and col_idx ({col_idx.numel()}) differ in length"
        )
    ext = _ext()
    if ext is None:
        return _ref.csr_matmul(row_ptr, col_idx, values, x, out_features)
    return ext.csr_spmm(row_ptr, col_idx, values, x, out_features, 0)


def _compressed_transpose(ptr, idx, n_cols: int):
    """``(col_ptr, row_idx, perm)`` of a validated compressed pattern (CSR or block-CSR)."""
    ext = _ext()
    if ext is not None:
        col_ptr, row_idx, perm = ext.compressed_transpose(ptr, idx, n_cols)
        return col_ptr, row_idx, perm
    return _ref._bsc_perm(ptr, idx, n_cols)


def _checked_transpose(ptr, idx, n_cols: int, transpose, maker: str):
    """The caller's cached ``transpose`` after a size check, or a freshly computed one."""
    if transpose is None:
        return _compressed_transpose(ptr, idx, n_cols)
    col_ptr, row_idx, perm = transpose
    if perm.numel() != idx.numel() or col_ptr.numel() != n_cols + 1:
        raise ValueError(f"transpose does not match this pattern (use {maker})")
    return col_ptr, row_idx, perm


def csr_transpose(row_ptr, col_idx, in_features: int):
    """CSC copy of the pattern: ``(col_ptr, row_idx, perm)``, the CSR of ``W^T``.

    ``values[perm]`` are the values of ``W^T`` in that order, so
    ``csr_matmul(col_ptr, row_idx, values[perm], grad_y, in_features)`` equals
    :func:`csr_matmul_t`.  Cache it while the pattern does not change.
    """
    in_features = _check_int(in_features, "in_features")
    row_ptr = _tensor(row_ptr, "row_ptr", torch.int64, 1)
    row_ptr, col_idx = _check_compressed(
        row_ptr, col_idx, row_ptr.numel() - 1, in_features, "row_ptr", "col_idx"
    )
    return _compressed_transpose(row_ptr, col_idx, in_features)


def csr_matmul_t(
    row_ptr, col_idx, values, grad_y, in_features: int, transpose=None
) -> torch.Tensor:
    """Input gradient ``gx = grad_y @ W`` for CSR ``W``; returns (N, in_features).

    ``transpose`` may be the (cached) result of :func:`csr_transpose` for this pattern.
    """
    in_features = _check_int(in_features, "in_features")
    row_ptr = _tensor(row_ptr, "row_ptr", torch.int64, 1)
    out_features = row_ptr.numel() - 1
    grad_y = _check_dense(grad_y, "grad_y", cols=out_features)
    row_ptr, col_idx = _check_compressed(
        row_ptr, col_idx, out_features, in_features, "row_ptr", "col_idx"
    )
    values = _tensor(values, "values", torch.float32, 1)
    if values.numel() != col_idx.numel():
        raise ValueError(
            f"values ({values.numel()}) and col_idx ({col_idx.numel()}) differ in length"
        )
    ext = _ext()
    if ext is None:
        return _ref.csr_matmul_t(row_ptr, col_idx, values, grad_y, in_features)
    col_ptr, row_idx, perm = _checked_transpose(
        row_ptr, col_idx, in_features, transpose, "csr_transpose"
    )
    return ext.csr_spmm(col_ptr, row_idx, values[perm], grad_y, in_features, 0)


def csr_sampled_grad(row_ptr, col_idx, grad_y, x) -> torch.Tensor:
    """Weight gradient at the stored positions: ``gv[k] = sum_n grad_y[n, row(k)] x[n, col(k)]``."""
    row_ptr = _tensor(row_ptr, "row_ptr", torch.int64, 1)
    out_features = row_ptr.numel() - 1
    x = _check_dense(x, "x")
    grad_y = _check_dense(grad_y, "grad_y", cols=out_features, rows=x.shape[0])
    row_ptr, col_idx = _check_compressed(
        row_ptr, col_idx, out_features, x.shape[1], "row_ptr", "col_idx"
    )
    ext = _ext()
    if ext is None:
        return _ref.csr_sampled_grad(row_ptr, col_idx, grad_y, x)
    return ext.csr_sddmm(row_ptr, col_idx, grad_y, x, 0)


# ----------------------------------------------------------------------------- block-sparse


def _check_blocks(blocks, nblocks: int) -> torch.Tensor:
    blocks = _tensor(blocks, "blocks", torch.float32, 3)
    b = blocks.shape[1]
    if blocks.shape[2] != b or b not in BLOCK_SIZES:
        raise ValueError(
            f"blocks must have shape (nblocks, b, b) with b in {BLOCK_SIZES}, "
            f"got {tuple(blocks.shape)}"
        )
    if blocks.shape[0] != nblocks:
        raise ValueError(f"blocks has {blocks.shape[0]} blocks but block_col has {nblocks}")
    return blocks


def _check_features(n: int, b: int, name: str) -> int:
    if n % b != 0:
        raise ValueError(f"{name} = {n} must be a multiple of the block size {b}")
    return n // b


def bsr_matmul(block_row_ptr, block_col, blocks, x, out_features: int) -> torch.Tensor:
    """Forward ``y = x @ W^T`` for BSR ``W``; returns (N, out_features)."""
    out_features = _check_int(out_features, "out_features")
    x = _check_dense(x, "x")
    block_col = _tensor(block_col, "block_col", INDEX_DTYPES, 1)
    blocks = _check_blocks(blocks, block_col.numel())
    b = blocks.shape[1]
    nbr = _check_features(out_features, b, "out_features")
    nbc = _check_features(x.shape[1], b, "x.shape[1] (in_features)")
    block_row_ptr, block_col = _check_compressed(
        block_row_ptr, block_col, nbr, nbc, "block_row_ptr", "block_col"
    )
    ext = _ext()
    if ext is None:
        return _ref.bsr_matmul(block_row_ptr, block_col, blocks, x, out_features)
    return ext.bsr_spmm(
        block_row_ptr, block_col, blocks.transpose(1, 2).contiguous(), x, out_features
    )


def bsr_transpose(block_row_ptr, block_col, in_features: int, block_size: int):
    """Block-CSC copy of the pattern ``(block_col_ptr, block_row, perm)`` (the BSR of ``W^T``;
    its blocks are ``blocks[perm].transpose(1, 2)``)."""
    nbc = _check_features(_check_int(in_features, "in_features"), block_size, "in_features")
    block_row_ptr = _tensor(block_row_ptr, "block_row_ptr", torch.int64, 1)
    block_row_ptr, block_col = _check_compressed(
        block_row_ptr, block_col, block_row_ptr.numel() - 1, nbc, "block_row_ptr", "block_col"
    )
    return _compressed_transpose(block_row_ptr, block_col, nbc)


def bsr_matmul_t(
    block_row_ptr, block_col, blocks, grad_y, in_features: int, transpose=None
) -> torch.Tensor:
    """Input gradient ``gx = grad_y @ W`` for BSR ``W``; returns (N, in_features).

    ``transpose`` may be the (cached) result of :func:`bsr_transpose` for this pattern.
    """
    in_features = _check_int(in_features, "in_features")
    block_col = _tensor(block_col, "block_col", INDEX_DTYPES, 1)
    blocks = _check_blocks(blocks, block_col.numel())
    b = blocks.shape[1]
    block_row_ptr = _tensor(block_row_ptr, "block_row_ptr", torch.int64, 1)
    nbr = block_row_ptr.numel() - 1
    grad_y = _check_dense(grad_y, "grad_y", cols=nbr * b)
    nbc = _check_features(in_features, b, "in_features")
    block_row_ptr, block_col = _check_compressed(
        block_row_ptr, block_col, nbr, nbc, "block_row_ptr", "block_col"
    )
    ext = _ext()
    if ext is None:
        return _ref.bsr_matmul_t(block_row_ptr, block_col, blocks, grad_y, in_features)
    col_ptr, rows, perm = _checked_transpose(
        block_row_ptr, block_col, nbc, transpose, "bsr_transpose"
    )
    # Kernel wants the blocks of W^T transposed, i.e. the blocks of W in block-CSC order.
    return ext.bsr_spmm(col_ptr, rows, blocks[perm], grad_y, in_features)


def bsr_sampled_grad(
    block_row_ptr, block_col, grad_y, x, block_size: int | None = None
) -> torch.Tensor:
    """Block weight gradient ``G[k] = grad_y[:, rows(k)]^T @ x[:, cols(k)]``; (nblocks, b, b).

    ``block_size`` defaults to ``grad_y.shape[1] // (len(block_row_ptr) - 1)``.
    """
    block_row_ptr = _tensor(block_row_ptr, "block_row_ptr", torch.int64, 1)
    nbr = block_row_ptr.numel() - 1
    x = _check_dense(x, "x")
    grad_y = _check_dense(grad_y, "grad_y", rows=x.shape[0])
    if block_size is None:
        if nbr == 0:
            raise ValueError("block_size is required when there are no block rows")
        block_size = grad_y.shape[1] // nbr
    if block_size not in BLOCK_SIZES:
        raise ValueError(f"block size must be one of {BLOCK_SIZES}, got {block_size}")
    b = block_size
    if grad_y.shape[1] != nbr * b:
        raise ValueError(f"grad_y must have {nbr * b} columns, got shape {tuple(grad_y.shape)}")
    nbc = _check_features(x.shape[1], b, "x.shape[1] (in_features)")
    block_row_ptr, block_col = _check_compressed(
        block_row_ptr, block_col, nbr, nbc, "block_row_ptr", "block_col"
    )
    ext = _ext()
    if ext is None:
        return _ref.bsr_sampled_grad(block_row_ptr, block_col, grad_y, x, b)
    return ext.bsr_sddmm(block_row_ptr, block_col, grad_y, x, b)


# ----------------------------------------------------------------------------- trusted patterns
#
# The same products for a caller that builds its patterns itself and keeps them valid (the sparse
# backend's layers): no per-call validation, which costs O(nnz) index checks (an ``aminmax`` of
# the column indices, a scan of the row pointers) on every call. Arguments must be what the
# checked functions would accept: int64 pointers, int32/int64 indices, contiguous float32.


def spmm_trusted(ptr, idx, values, x, rows: int, bias=None) -> torch.Tensor:
    """``x @ S^T (+ bias)`` for CSR ``S`` (``rows`` x ``x.shape[1]``) with 1-D ``values`` in
    CSR order; the bias (``rows`` floats) is added to the finished sums, as ``y + bias``.

    With the CSC pattern of ``W`` (``col_ptr, row_idx``), ``values`` in CSC order and
    ``x = grad_y`` this is the input gradient ``grad_y @ W``."""
    ext = _ext()
    if ext is None:
        y = _ref.csr_matmul(ptr, idx, values, x, rows)
        return y if bias is None else y.add_(bias)
    return ext.csr_spmm(ptr, idx, values, x, rows, 0, bias)


def sddmm_trusted(ptr, idx, grad_y, x) -> torch.Tensor:
    """:func:`csr_sampled_grad` without the checks."""
    ext = _ext()
    if ext is None:
        return _ref.csr_sampled_grad(ptr, idx, grad_y, x)
    return ext.csr_sddmm(ptr, idx, grad_y, x, 0)


def topology_update(old_units, old_order, new_units, new_in_a, slot_units, slot_in_a, grid):
    """A sparse layer's index structures after its stored units change, in one merge of the
    old and the new sorted units (C++ only: ``None`` without the extension; the caller then
    patches them itself). See ``topology_update`` in ``csrc/sparse_kernels.cpp`` for the
    arguments and the 14 returned tensors; ``slot_units`` and ``slot_in_a`` are updated in place.
    """
    ext = _ext()
    if ext is None:
        return None
    return ext.topology_update(
        old_units, old_order, new_units, new_in_a, slot_units, slot_in_a, grid[0], grid[1]
    )


def any_nonzero_outside(values: torch.Tensor, mask: torch.Tensor) -> bool:
    """Whether ``values`` is nonzero anywhere ``mask`` (bool, the same shape) is false: one
    pass that stops early (compiled, float32 on the CPU), else through torch."""
    if values.shape != mask.shape:
        raise ValueError(f"values {tuple(values.shape)} and mask {tuple(mask.shape)} differ")
    ext = _ext() if values.device.type == "cpu" and values.dtype == torch.float32 else None
    if ext is None:
        return bool(torch.any(torch.where(mask, 0, values) != 0))
    return bool(ext.any_nonzero_outside(values.contiguous(), mask.contiguous()))


def masked_where(
    mask: torch.Tensor,
    x: torch.Tensor,
    other: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``torch.where(mask, x, other)`` (``other`` defaults to 0) into ``out`` (a new tensor if
    ``None``; it may be ``x`` or ``other``), for a bool ``mask`` and tensors of its shape.

    Compiled for contiguous float32 CPU tensors: branch-free on the bits, so a random mask costs
    what a copy does (torch's CPU ``where`` mispredicts a branch per entry: about 14x slower on
    a 2048 x 512 weight at 10% density). Anything else goes through ``torch.where``, with the
    same result bit for bit (``+0.0`` outside the mask without ``other``).
    """
    for name, t in (("x", x), ("other", other), ("out", out)):
        if t is not None and t.shape != mask.shape:
            raise ValueError(f"{name} {tuple(t.shape)} and mask {tuple(mask.shape)} differ")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor, got {mask.dtype}")
    ext = _ext_for(mask, *(t for t in (x, other, out) if t is not None))
    if ext is None:
        fill = other if other is not None else x.new_zeros(())
        if out is None:
            return torch.where(mask, x, fill)
        return torch.where(mask, x, fill, out=out)
    if out is None:
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
    ext.masked_where(mask, x, other, out)
    return out


def weighted_norm(weight: torch.Tensor, coefficient: torch.Tensor, norm: str) -> torch.Tensor:
    """``sum(c * w^2)`` (``norm="l2"``) or ``sum(c * |w|)`` (``"l1"``) as a 0-dim tensor of
    ``weight``'s dtype: one compiled pass accumulated in float64 (contiguous float32 on the CPU,
    the same value for any number of threads), else through torch."""
    _check_norm(weight, coefficient, norm)
    ext = _ext_for(weight, coefficient)
    if ext is None:
        flat_w, flat_c = weight.reshape(-1), coefficient.reshape(-1)
        if norm == "l2":
            return torch.dot(flat_w * flat_c, flat_w)
        return torch.dot(flat_w.abs(), flat_c)
    return weight.new_tensor(ext.weighted_norm(weight, coefficient, norm == "l1"))


def weighted_norm_grad(
    weight: torch.Tensor, coefficient: torch.Tensor, scale: float | torch.Tensor, norm: str
) -> torch.Tensor:
    """``(scale * c) * w`` (``"l2"``) or ``(scale * c) * sign(w)`` (``"l1"``): the gradient of
    ``scale / 2 * sum(c * w^2)`` or ``scale * sum(c * |w|)``, one compiled pass (contiguous
    float32 on the CPU; the same bits as torch's two products), else through torch."""
    _check_norm(weight, coefficient, norm)
    ext = _ext_for(weight, coefficient)
    if ext is None:
        direction = weight if norm == "l2" else weight.sign()
        return (scale * coefficient) * direction
    return ext.weighted_norm_grad(weight, coefficient, float(scale), norm == "l1")


def topkast_coefficients(
    forward_mask: torch.Tensor, grad_mask: torch.Tensor, density: float, dtype: torch.dtype
) -> torch.Tensor:
    """Top-KAST's regulariser coefficients, ``dtype``, of the masks' shape: 1 on A
    (``forward_mask``), ``1 / density`` on B \\ A, 0 elsewhere. One compiled pass for contiguous
    CPU masks and float32 (the same bits as the torch expression used otherwise)."""
    if forward_mask.shape != grad_mask.shape:
        raise ValueError(
            f"forward mask {tuple(forward_mask.shape)} and gradient mask "
            f"{tuple(grad_mask.shape)} differ"
        )
    if not density > 0.0:
        raise ValueError(f"density must be positive, got {density}")
    bool_masks = forward_mask.dtype == grad_mask.dtype == torch.bool
    compiled = dtype == torch.float32 and bool_masks
    ext = _ext_for(forward_mask, grad_mask) if compiled else None
    if ext is None:
        only_b = (grad_mask & ~forward_mask).to(dtype) / density
        return forward_mask.to(dtype) + only_b
    return ext.topkast_coefficients(forward_mask, grad_mask, float(density))


def _check_norm(weight: torch.Tensor, coefficient: torch.Tensor, norm: str) -> None:
    if weight.shape != coefficient.shape:
        raise ValueError(
            f"weight {tuple(weight.shape)} and coefficients {tuple(coefficient.shape)} differ"
        )
    if norm not in ("l1", "l2"):
        raise ValueError(f"norm must be 'l1' or 'l2', got {norm!r}")


def _ext_for(*tensors: torch.Tensor):
    """The extension for an element-wise pass over ``tensors``, when it is built and every one
    is a contiguous CPU tensor of float32 (or a bool mask) that autograd need not track; else
    ``None`` (the caller goes through torch)."""
    plain = all(
        t.device.type == "cpu"
        and t.dtype in (torch.float32, torch.bool)
        and t.is_contiguous()
        and not (t.requires_grad and torch.is_grad_enabled())
        for t in tensors
    )
    return _ext() if plain else None


def topkast_select(
    scores, positions, in_a, frontier, length: int, floor: int, count_b: int, count_a: int
):
    """Top-KAST's incremental selection of B and A (see :mod:`alwayssparse.ranking`) in one
    compiled call; ``None`` without the extension (the caller then selects with numpy). The
    frontier is the first ``length`` keys of the buffer ``frontier``, updated in place when it
    has room. See ``topkast_select`` in ``csrc/sparse_kernels.cpp`` for the results."""
    ext = _ext()
    if ext is None:
        return None
    return ext.topkast_select(scores, positions, in_a, frontier, length, floor, count_b, count_a)


def bsr_spmm_trusted(ptr, idx, blocks, x, rows: int, bias=None) -> torch.Tensor:
    """``x @ W^T (+ bias)`` for BSR ``W`` with ``blocks`` (nnz, b, b) in block-CSR order."""
    ext = _ext()
    if ext is None:
        y = _ref.bsr_matmul(ptr, idx, blocks, x, rows)
        return y if bias is None else y.add_(bias)
    return ext.bsr_spmm(ptr, idx, blocks.transpose(1, 2).contiguous(), x, rows, bias)


def bsr_spmm_t_trusted(col_ptr, row_idx, blocks, grad_y, cols: int) -> torch.Tensor:
    """``grad_y @ W`` for BSR ``W`` given its block-CSC pattern and its ``blocks`` (the blocks
    of ``W``, not transposed) in block-CSC order."""
    ext = _ext()
    if ext is None:
        return _ref.bsr_matmul(col_ptr, row_idx, blocks.transpose(1, 2), grad_y, cols)
    return ext.bsr_spmm(col_ptr, row_idx, blocks.contiguous(), grad_y, cols)


def bsr_sddmm_trusted(ptr, idx, grad_y, x, block: int) -> torch.Tensor:
    """:func:`bsr_sampled_grad` without the checks; (nnz, b, b)."""
    ext = _ext()
    if ext is None:
        return _ref.bsr_sampled_grad(ptr, idx, grad_y, x, block)
    return ext.bsr_sddmm(ptr, idx, grad_y, x, block)


# ----------------------------------------------------------------------------- conversions


def dense_to_csr(weight, mask=None):
    """``(row_ptr, col_idx, values)`` of ``weight`` at ``mask`` (default: ``weight != 0``).

    Masked-in zeros are kept as stored entries.
    """
    weight = _check_dense(weight, "weight")
    if mask is None:
        mask = weight != 0
    if not isinstance(mask, torch.Tensor) or mask.shape != weight.shape:
        raise ValueError("mask must be a tensor with the shape of weight")
    mask = mask.detach().to(torch.bool)
    rows, cols = mask.nonzero(as_tuple=True)
    row_ptr = torch.zeros(weight.shape[0] + 1, dtype=torch.int64)
    row_ptr[1:] = torch.cumsum(mask.sum(1, dtype=torch.int64), 0)
    return row_ptr, cols.contiguous(), weight[rows, cols].contiguous()


def csr_to_dense(row_ptr, col_idx, values, in_features: int) -> torch.Tensor:
    """Dense ``(out, in)`` matrix of a CSR structure."""
    row_ptr = _tensor(row_ptr, "row_ptr", torch.int64, 1)
    out_features = row_ptr.numel() - 1
    row_ptr, col_idx = _check_compressed(
        row_ptr, col_idx, out_features, in_features, "row_ptr", "col_idx"
    )
    values = _tensor(values, "values", torch.float32, 1)
    rows = torch.repeat_interleave(torch.arange(out_features), row_ptr[1:] - row_ptr[:-1])
    w = torch.zeros(out_features, in_features, dtype=torch.float32)
    w[rows, col_idx] = values
    return w


def dense_to_bsr(weight, block_mask, b: int):
    """``(block_row_ptr, block_col, blocks)`` of ``weight`` at the active blocks of ``block_mask``
    (shape ``(out // b, in // b)``)."""
    weight = _check_dense(weight, "weight")
    if b not in BLOCK_SIZES:
        raise ValueError(f"block size must be one of {BLOCK_SIZES}, got {b}")
    out_f, in_f = weight.shape
    nbr = _check_features(out_f, b, "out_features")
    nbc = _check_features(in_f, b, "in_features")
    if not isinstance(block_mask, torch.Tensor) or tuple(block_mask.shape) != (nbr, nbc):
        raise ValueError(f"block_mask must have shape {(nbr, nbc)}")
    block_mask = block_mask.detach().to(torch.bool)
    bi, bj = block_mask.nonzero(as_tuple=True)
    block_row_ptr = torch.zeros(nbr + 1, dtype=torch.int64)
    block_row_ptr[1:] = torch.cumsum(block_mask.sum(1, dtype=torch.int64), 0)
    wb = weight.reshape(nbr, b, nbc, b).permute(0, 2, 1, 3)
    return block_row_ptr, bj.contiguous(), wb[bi, bj].contiguous()


def bsr_to_dense(block_row_ptr, block_col, blocks, in_features: int) -> torch.Tensor:
    """Dense ``(out, in)`` matrix of a BSR structure."""
    block_col = _tensor(block_col, "block_col", INDEX_DTYPES, 1)
    blocks = _check_blocks(blocks, block_col.numel())
    b = blocks.shape[1]
    nbc = _check_features(in_features, b, "in_features")
    block_row_ptr = _tensor(block_row_ptr, "block_row_ptr", torch.int64, 1)
    nbr = block_row_ptr.numel() - 1
    block_row_ptr, block_col = _check_compressed(
        block_row_ptr, block_col, nbr, nbc, "block_row_ptr", "block_col"
    )
    rows = torch.repeat_interleave(torch.arange(nbr), block_row_ptr[1:] - block_row_ptr[:-1])
    wb = torch.zeros(nbr, nbc, b, b, dtype=torch.float32)
    wb[rows, block_col] = blocks
    return wb.permute(0, 2, 1, 3).reshape(nbr * b, in_features)
