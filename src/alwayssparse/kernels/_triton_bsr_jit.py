"""Triton kernels of :mod:`alwayssparse.kernels.triton_bsr` (this module imports ``triton``).

Imported lazily by :mod:`alwayssparse.kernels.triton_bsr`; see its docstring for the equations,
the grids and the launch configurations. ``TRITON_INTERPRET=1`` must be set before this module is
first imported for the kernels to run in Triton's CPU interpreter (they are decorated here).
"""

from __future__ import annotations

import triton
import triton.language as tl

#: Whether the kernels were decorated for Triton's interpreter (CPU tensors) or compiled (CUDA).
INTERPRETED: bool = bool(triton.knobs.runtime.interpret)

# Kernel argument UPCAST: cast the tl.dot operands to float32 first. Only needed in the
# interpreter, whose tl.dot multiplies the raw uint16 bit patterns of bfloat16 tensors
# (triton-lang/triton#11584, unsupported there); bf16 x bf16 products are exact in float32, so
# the result matches the GPU's bf16 tensor-core dot up to the order of the fp32 additions.
#
# Accumulators start from tl.full(..., 0.0), not tl.zeros: tl.zeros is itself a @triton.jit
# function, decorated when triton is first imported. If that happened before TRITON_INTERPRET=1
# was set (any torch.optim step imports triton), it is a compiled JITFunction that the
# interpreter cannot call ("Cannot call @triton.jit'd outside of the scope of a kernel");
# tl.full is a builtin, which the interpreter patches. On the GPU both compile the same.


@triton.jit
def dense_bsr_kernel(
    a_ptr,  # dense left operand (M, K_dense): X (forward) or dY (input gradient)
    v_ptr,  # block values (capacity, B, B), row-major blocks of W
    out_ptr,  # dense result (M, n_groups * B)
    seg_ptr,  # (n_groups + 1,) int32: blocks of output group g are seg[g] .. seg[g+1]-1
    idx_ptr,  # (nnz,) int32: block index along the dense operand's columns
    slot_ptr,  # (nnz,) int32: position of the block in v_ptr
    M,
    n_groups,
    stride_a,
    stride_out,
    B: tl.constexpr,
    BLOCK_M: tl.constexpr,
    TRANS_W: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """out[m-tile, g*B:(g+1)*B] = sum_k a[m-tile, idx[k]*B:+B] @ op(V[slot[k]]), k in segment g.

    op(V) = V^T when TRANS_W (forward: g is a block row of W, idx its block columns) and V when
    not (input gradient: g is a block column of W, idx its block rows, from the transposed index).
    """
    pid = tl.program_id(0)
    # Output group fastest: programs launched together share the same rows of ``a`` (L2 reuse),
    # and each reads W's blocks of a single group.
    pid_m = pid // n_groups
    g = pid % n_groups
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < M
    rows64 = offs_m.to(tl.int64)
    offs_b = tl.arange(0, B)
    a_rows = a_ptr + rows64[:, None] * stride_a + offs_b[None, :]
    v_tile = offs_b[:, None] * B + offs_b[None, :]

    start = tl.load(seg_ptr + g)
    end = tl.load(seg_ptr + g + 1)
    acc = tl.full((BLOCK_M, B), 0.0, dtype=tl.float32)
    for k in range(start, end):
        col0 = tl.load(idx_ptr + k).to(tl.int64) * B
        slot = tl.load(slot_ptr + k).to(tl.int64)
        a = tl.load(a_rows + col0, mask=row_ok[:, None], other=0.0)
        # Contiguous (coalesced) load of the whole B x B block; the transpose is a register/
        # shared-memory layout change for tl.dot, not a strided global load.
        w = tl.load(v_ptr + slot * (B * B) + v_tile).to(a.dtype)
        if TRANS_W:
            w = tl.trans(w)
        if UPCAST:
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)

    out = out_ptr + rows64[:, None] * stride_out + (g.to(tl.int64) * B + offs_b)[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def sampled_grad_kernel(
    dy_ptr,  # (M, out) upstream gradient
    x_ptr,  # (M, in) layer input
    out_ptr,  # (capacity, B, B) gradient blocks, or (SPLIT, nnz, B, B) float32 partial sums
    rows_ptr,  # (nnz,) int32 block row of block k
    cols_ptr,  # (nnz,) int32 block column of block k
    slot_ptr,  # (nnz,) int32 position of block k in the values (ignored for partial sums)
    M,
    nnz,
    chunks_per_split,
    stride_dy,
    stride_x,
    B: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PARTIAL: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """G[k] = dY[n-range, rows[k]*B:+B]^T @ X[n-range, cols[k]*B:+B] for stored block k.

    Program (k, s) reduces the s-th range of ``chunks_per_split * BLOCK_N`` rows of dY and X;
    with one split it writes G[k] to out[slot[k]] in the output dtype, with several it writes the
    float32 partial sum to out[s, k] (summed on the host: deterministic, no atomics).
    """
    k = tl.program_id(0)
    s = tl.program_id(1)
    r0 = tl.load(rows_ptr + k).to(tl.int64) * B
    c0 = tl.load(cols_ptr + k).to(tl.int64) * B
    offs_b = tl.arange(0, B)
    offs_n = tl.arange(0, BLOCK_N)
    acc = tl.full((B, B), 0.0, dtype=tl.float32)
    n_start = s * chunks_per_split * BLOCK_N
    for step in range(chunks_per_split):
        n = n_start + step * BLOCK_N + offs_n
        n_ok = (n < M)[:, None]
        n64 = n.to(tl.int64)[:, None]
        dy = tl.load(dy_ptr + n64 * stride_dy + r0 + offs_b[None, :], mask=n_ok, other=0.0)
        x = tl.load(x_ptr + n64 * stride_x + c0 + offs_b[None, :], mask=n_ok, other=0.0)
        x = x.to(dy.dtype)
        if UPCAST:
            dy = dy.to(tl.float32)
            x = x.to(tl.float32)
        acc = tl.dot(tl.trans(dy), x, acc, input_precision=PRECISION)

    tile = offs_b[:, None] * B + offs_b[None, :]
    if PARTIAL:
        dest = out_ptr + (s.to(tl.int64) * nnz + k) * (B * B) + tile
    else:
        dest = out_ptr + tl.load(slot_ptr + k).to(tl.int64) * (B * B) + tile
    tl.store(dest, acc.to(out_ptr.dtype.element_ty))
