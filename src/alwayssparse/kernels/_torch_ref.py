"""Pure-PyTorch implementations of the sparse kernels (fallback and test reference).

Inputs are assumed validated by :mod:`alwayssparse.kernels`. Column indices may be int32; torch's
sparse tensors want them in the dtype of the row pointers (int64), so they are widened here.
"""

from __future__ import annotations

import warnings

import torch

# Limit on the temporary gathered activations of the chunked kernels (elements).
_CHUNK_ELEMS = 1 << 24


def _quiet(fn):
    """Silence torch's 'sparse support is in beta' warnings."""

    def wrapper(*args):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*[Ss]parse.*")
            return fn(*args)

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


@_quiet
def csr_matmul(row_ptr, col_idx, values, x, out_features):
    col_idx = col_idx.long()
    n, k = x.shape
    if values.numel() == 0 or n == 0:
        return x.new_zeros(n, out_features)
    w = torch.sparse_csr_tensor(row_ptr, col_idx, values, (out_features, k))
    return (w @ x.t()).t().contiguous()


@_quiet
def csr_matmul_t(row_ptr, col_idx, values, grad_y, in_features):
    col_idx = col_idx.long()
    n, m = grad_y.shape
    if values.numel() == 0 or n == 0:
        return grad_y.new_zeros(n, in_features)
    # W^T in CSC layout has exactly the CSR arrays of W.
    wt = torch.sparse_csc_tensor(row_ptr, col_idx, values, (in_features, m))
    return (wt @ grad_y.t()).t().contiguous()


@_quiet
def csr_sampled_grad(row_ptr, col_idx, grad_y, x):
    col_idx = col_idx.long()
    nnz = col_idx.numel()
    n, k = x.shape
    m = grad_y.shape[1]
    if nnz == 0 or n == 0:
        return x.new_zeros(nnz)
    pattern = torch.sparse_csr_tensor(row_ptr, col_idx, x.new_zeros(nnz), (m, k))
    out = torch.sparse.sampled_addmm(pattern, grad_y.t(), x, beta=0.0, alpha=1.0)
    return out.values().contiguous()


def _bsc_perm(block_row_ptr, block_col, n_block_cols):
    """Block-CSC of the pattern: (col_ptr, block_row, perm)."""
    block_col = block_col.long()
    nbr = block_row_ptr.numel() - 1
    counts = block_row_ptr[1:] - block_row_ptr[:-1]
    rows = torch.repeat_interleave(torch.arange(nbr, dtype=torch.int64), counts)
    key = block_col * max(nbr, 1) + rows
    perm = torch.argsort(key, stable=True)
    col_counts = torch.bincount(block_col, minlength=n_block_cols)
    col_ptr = torch.zeros(n_block_cols + 1, dtype=torch.int64)
    col_ptr[1:] = torch.cumsum(col_counts, 0)
    return col_ptr, rows[perm].contiguous(), perm


@_quiet
def bsr_matmul(block_row_ptr, block_col, blocks, x, out_features):
    block_col = block_col.long()
    n, k = x.shape
    if blocks.shape[0] == 0 or n == 0:
        return x.new_zeros(n, out_features)
    w = torch.sparse_bsr_tensor(block_row_ptr, block_col, blocks, (out_features, k))
    return (w @ x.t()).t().contiguous()


@_quiet
def bsr_matmul_t(block_row_ptr, block_col, blocks, grad_y, in_features):
    block_col = block_col.long()
    n, m = grad_y.shape
    b = blocks.shape[1]
    if blocks.shape[0] == 0 or n == 0:
        return grad_y.new_zeros(n, in_features)
    col_ptr, rows, perm = _bsc_perm(block_row_ptr, block_col, in_features // b)
    wt = torch.sparse_bsr_tensor(
        col_ptr, rows, blocks[perm].transpose(1, 2).contiguous(), (in_features, m)
    )
    return (wt @ grad_y.t()).t().contiguous()


def bsr_sampled_grad(block_row_ptr, block_col, grad_y, x, b):
    block_col = block_col.long()
    nb = block_col.numel()
    n, k = x.shape
    m = grad_y.shape[1]
    out = x.new_zeros(nb, b, b)
    if nb == 0 or n == 0:
        return out
    nbr = block_row_ptr.numel() - 1
    counts = block_row_ptr[1:] - block_row_ptr[:-1]
    rows = torch.repeat_interleave(torch.arange(nbr, dtype=torch.int64), counts)
    gyb = grad_y.t().reshape(m // b, b, n)  # (block row, p, n)
    xb = x.t().reshape(k // b, b, n)  # (block col, q, n)
    chunk = max(1, _CHUNK_ELEMS // max(1, 2 * b * n))
    for s in range(0, nb, chunk):
        e = min(nb, s + chunk)
        out[s:e] = torch.bmm(gyb[rows[s:e]], xb[block_col[s:e]].transpose(1, 2))
    return out
