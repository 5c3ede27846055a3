"""Triton block-sparse Linear kernels (alwayssparse.kernels.triton_bsr) against dense references.

Without a GPU the kernels run in Triton's CPU interpreter: a module-scoped fixture sets
TRITON_INTERPRET=1 for this module's tests only (before the kernel module is first imported)
and restores it afterwards, so the rest of the test session does not see it. Kernel tests skip
when triton is not installed; the layout tests need only PyTorch.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch

from alwayssparse.backends.sparse import _compress
from alwayssparse.kernels import _torch_ref
from alwayssparse.kernels import triton_bsr as tb

HAS_TRITON = importlib.util.find_spec("triton") is not None
ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1"
DEVICE = "cuda" if ON_GPU else "cpu"


_JIT_NAME = "alwayssparse.kernels._triton_bsr_jit"
_loaded = sys.modules.get(_JIT_NAME)
if not HAS_TRITON:
    _SKIP = "triton is not installed (pip install -e '.[dev]' installs it)"
elif not ON_GPU and _loaded is not None and not _loaded.INTERPRETED:
    _SKIP = "the Triton kernels were imported for the GPU earlier in this process; no GPU here"
else:
    _SKIP = ""


@pytest.fixture(scope="module", autouse=True)
def _interpreter():
    """TRITON_INTERPRET=1 while this module's tests run (without a GPU), restored afterwards.

    Set before the kernel module is first imported (its kernels are decorated then) and kept
    during the tests: Triton imports more of itself lazily on the first launch and reads the
    variable again then.
    """
    if ON_GPU or _SKIP:
        yield
        return
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        assert tb._jit().INTERPRETED
        yield
    finally:
        if saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = saved


needs_kernels = pytest.mark.skipif(bool(_SKIP), reason=_SKIP)

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
# Max error relative to max(1, max |reference|): fp32 tight, 16-bit results rounded once.
TOL = {F32: 2e-6, BF16: 1.6e-2, F16: 2e-3}


def _close(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert got.shape == ref.shape, (got.shape, ref.shape)
    got, ref = got.double().cpu(), ref.double().cpu()
    scale = max(1.0, float(ref.abs().max())) if ref.numel() else 1.0
    err = float((got - ref).abs().max()) if ref.numel() else 0.0
    assert err <= TOL[dtype] * scale, f"max abs error {err} (scale {scale}, {dtype})"


def _block_mask(grid, gen, density=0.5):
    """Random block mask with an empty block row and column (and a full row when there is room)."""
    m = torch.rand(grid, generator=gen) < density
    m[min(1, grid[0] - 1)] = False
    m[:, 0] = False
    if grid[0] > 2:
        m[-1, 1:] = True
    m[0, -1] = grid[1] > 1
    return m


def _units(mask):
    return mask.flatten().nonzero().squeeze(1)


def _dense_blocks(mat, b):
    """(out, in) -> (out/b, in/b, b, b) blocks."""
    out_f, in_f = mat.shape
    return mat.reshape(out_f // b, b, in_f // b, b).permute(0, 2, 1, 3)


# ----------------------------------------------------------------------------- layouts (no triton)


def test_layout_mirrors_cpu_compress_and_transpose():
    gen = torch.Generator().manual_seed(0)
    grid, b = (6, 5), 16
    mask = _block_mask(grid, gen)
    units = _units(mask)
    slots = torch.randperm(units.numel() + 4, generator=gen)[: units.numel()]
    lay = tb.bsr_layout(units, grid, b, slots=slots)
    row_ptr, cols = _compress(units, *grid)
    assert lay.shape == (96, 80) and lay.nnz == units.numel()
    for t in (lay.row_ptr, lay.cols, lay.rows, lay.slots, lay.col_ptr, lay.t_rows, lay.t_slots):
        assert t.dtype == torch.int32
    assert torch.equal(lay.row_ptr.long(), row_ptr) and torch.equal(lay.cols.long(), cols)
    assert torch.equal(lay.rows.long() * grid[1] + lay.cols.long(), units)
    col_ptr, t_rows, perm = _torch_ref._bsc_perm(row_ptr, cols, grid[1])
    assert torch.equal(lay.col_ptr.long(), col_ptr)
    assert torch.equal(lay.t_rows.long(), t_rows.long())
    assert torch.equal(lay.t_slots.long(), slots[perm])
    # bsr_to_dense puts slot s's block at its unit.
    values = torch.randn(units.numel() + 4, b, b, generator=gen)
    blocks = _dense_blocks(tb.bsr_to_dense(values, lay), b)
    assert torch.equal(blocks[mask], values[slots])
    assert not blocks[~mask].any()


def test_layouts_from_storage():
    grid, b = (4, 4), 32
    units = torch.tensor([1, 4, 6, 11, 15, -1, -1], dtype=torch.int32)
    in_a = torch.tensor([True, False, True, True, False, False, False])
    lay_a, lay_b = tb.layouts_from_storage(units, in_a, grid, b)
    assert lay_b.slots.tolist() == [0, 1, 2, 3, 4] and lay_b.cols.tolist() == [1, 0, 2, 3, 3]
    assert lay_a.slots.tolist() == [0, 2, 3] and lay_a.cols.tolist() == [1, 2, 3]
    assert lay_a.row_ptr.tolist() == [0, 1, 2, 3, 3]
    assert lay_a.col_ptr.tolist() == [0, 0, 1, 2, 3] and lay_a.t_slots.tolist() == [0, 2, 3]
    same_a, same_b = tb.layouts_from_storage(units, units >= 0, grid, b)
    assert same_a is same_b


def test_layout_rejects_bad_input():
    with pytest.raises(ValueError, match="block size"):
        tb.bsr_layout(torch.tensor([0]), (2, 2), 8)
    with pytest.raises(ValueError, match="strictly increasing"):
        tb.bsr_layout(torch.tensor([2, 1]), (2, 2), 16)
    with pytest.raises(ValueError, match="lie in"):
        tb.bsr_layout(torch.tensor([4]), (2, 2), 16)
    with pytest.raises(ValueError, match="distinct"):
        tb.bsr_layout(torch.tensor([0, 1]), (2, 2), 16, slots=torch.tensor([3, 3]))


def test_clear_error_without_triton(monkeypatch):
    import alwayssparse.kernels as kernels_pkg

    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` raises ImportError
    monkeypatch.delitem(sys.modules, "alwayssparse.kernels._triton_bsr_jit", raising=False)
    monkeypatch.delattr(kernels_pkg, "_triton_bsr_jit", raising=False)
    lay = tb.bsr_layout(torch.tensor([0]), (1, 1), 16)
    with pytest.raises(ImportError, match="needs Triton"):
        tb.bsr_matmul(torch.zeros(2, 16), torch.zeros(1, 16, 16), lay)


# ----------------------------------------------------------------------------- kernels

# (block, out, in, N, dtype): N below, at and above a tile, not multiples of 16.
CASES = [
    (16, 64, 64, 5, F32),
    (16, 64, 128, 37, F32),
    (32, 128, 64, 40, F32),
    (64, 128, 128, 9, F32),
    (16, 128, 64, 20, BF16),
    (32, 64, 128, 33, F16),
    (64, 128, 64, 26, BF16),
    (16, 64, 64, 130, BF16),  # two row tiles of 128
    (32, 64, 96, 150, F32),  # three row tiles of 64
]


def _problem(b, out_f, in_f, n, dtype, seed, spare=3):
    """Layout with empty block rows/columns and permuted slots, values, x, grad_y."""
    gen = torch.Generator().manual_seed(seed)
    grid = (out_f // b, in_f // b)
    units = _units(_block_mask(grid, gen))
    capacity = units.numel() + spare
    slots = torch.randperm(capacity, generator=gen)[: units.numel()]
    lay = tb.bsr_layout(units, grid, b, slots=slots, device=DEVICE)
    values = torch.randn(capacity, b, b, generator=gen).to(DEVICE, dtype)
    x = torch.randn(n, in_f, generator=gen).to(DEVICE, dtype)
    gy = torch.randn(n, out_f, generator=gen).to(DEVICE, dtype)
    return lay, values, x, gy


@needs_kernels
@pytest.mark.parametrize("b,out_f,in_f,n,dtype", CASES)
def test_kernels_match_dense(b, out_f, in_f, n, dtype):
    lay, values, x, gy = _problem(b, out_f, in_f, n, dtype, seed=b * 100 + n)
    w = tb.bsr_to_dense(values.double(), lay)
    y = tb.bsr_matmul(x, values, lay)
    assert y.dtype == dtype
    _close(y, x.double() @ w.T, dtype)
    gx = tb.bsr_matmul_t(gy, values, lay)
    assert gx.dtype == dtype
    _close(gx, gy.double() @ w, dtype)
    capacity = values.shape[0]
    g = tb.bsr_sampled_grad(gy, x, lay, capacity=capacity)
    assert g.shape == (capacity, b, b) and g.dtype == dtype
    ref = torch.zeros(capacity, b, b, dtype=torch.float64, device=DEVICE)
    full = _dense_blocks(gy.double().T @ x.double(), b)
    ref[lay.slots.long()] = full[lay.rows.long(), lay.cols.long()]
    _close(g, ref, dtype)


@needs_kernels
@pytest.mark.parametrize("split", [2, 3, None])
def test_sampled_grad_split_over_rows(split):
    # b = 64 with N = 1100: 18 chunks of 64 rows, few blocks, so the automatic split (None) also
    # cuts N; 2 and 3 leave a partly empty last range.
    b, dtype = (16, F32) if split else (64, BF16)
    n = 300 if split else 1100
    lay, values, x, gy = _problem(b, 64, 128, n, dtype, seed=7)
    ref = _dense_blocks(gy.double().T @ x.double(), b)[lay.rows.long(), lay.cols.long()]
    g = tb.bsr_sampled_grad(gy, x, lay, capacity=values.shape[0], split=split)
    _close(g[lay.slots.long()], ref, dtype)
    others = torch.ones(values.shape[0], dtype=torch.bool)
    others[lay.slots.long()] = False
    assert not g[others.to(DEVICE)].any()


@needs_kernels
def test_empty_layout_and_empty_batch():
    b = 32
    lay = tb.bsr_layout(torch.zeros(0, dtype=torch.long), (2, 3), b, device=DEVICE)
    values = torch.randn(2, b, b, device=DEVICE)
    x, gy = torch.randn(7, 96, device=DEVICE), torch.randn(7, 64, device=DEVICE)
    assert torch.equal(tb.bsr_matmul(x, values, lay), torch.zeros(7, 64, device=DEVICE))
    assert torch.equal(tb.bsr_matmul_t(gy, values, lay), torch.zeros(7, 96, device=DEVICE))
    g = tb.bsr_sampled_grad(gy, x, lay, capacity=2)
    assert g.shape == (2, b, b) and not g.any()
    lay2, values2, _, _ = _problem(b, 64, 96, 1, F32, seed=3)
    assert tb.bsr_matmul(x[:0], values2, lay2).shape == (0, 64)
    assert not tb.bsr_sampled_grad(gy[:0], x[:0], lay2).any()


@needs_kernels
def test_kernels_reject_bad_input():
    lay, values, x, gy = _problem(16, 64, 64, 5, F32, seed=1)
    with pytest.raises(ValueError, match="shape"):
        tb.bsr_matmul(x[:, :32], values, lay)
    with pytest.raises(TypeError, match="float32"):
        tb.bsr_matmul(x.double(), values, lay)
    with pytest.raises(ValueError, match="values"):
        tb.bsr_matmul(x, values[:, :8], lay)
    with pytest.raises(ValueError, match="capacity"):
        tb.bsr_sampled_grad(gy, x, lay, capacity=1)


# ----------------------------------------------------------------------------- autograd


def _storage(b, out_f, in_f, seed, a_equals_b=False, empty_a=False):
    """SparseLinear-style storage: B's sorted units first, -1 in spare slots, A flags."""
    gen = torch.Generator().manual_seed(seed)
    grid = (out_f // b, in_f // b)
    units = _units(_block_mask(grid, gen, density=0.6))
    n = units.numel()
    stored = torch.full((n + 2,), -1, dtype=torch.int32)
    stored[:n] = units
    in_a = torch.zeros(n + 2, dtype=torch.bool)
    in_a[:n] = True if a_equals_b else torch.rand(n, generator=gen) < 0.6
    if empty_a:
        in_a[:] = False
    return stored.to(DEVICE), in_a.to(DEVICE), grid, gen


@needs_kernels
@pytest.mark.parametrize(
    "b,x_dtype,v_dtype,n,variant",
    [
        (16, F32, F32, 23, "a_in_b"),
        (32, F32, F32, 8, "a_equals_b"),
        (16, BF16, BF16, 40, "a_in_b"),
        (32, F16, F16, 17, "a_in_b"),
        (16, BF16, F32, 12, "a_in_b"),  # fp32 master values, bf16 activations
        (16, F32, F32, 6, "empty_a"),
        (64, BF16, BF16, 19, "a_in_b"),
    ],
)
def test_autograd_function_matches_dense(b, x_dtype, v_dtype, n, variant):
    out_f, in_f = 64, 96
    out_f, in_f = (128, 192) if b == 64 else (out_f, in_f)
    units, in_a, grid, gen = _storage(
        b, out_f, in_f, seed=n, a_equals_b=variant == "a_equals_b", empty_a=variant == "empty_a"
    )
    lay_a, lay_b = tb.layouts_from_storage(units, in_a, grid, b)
    capacity = units.numel()
    values = torch.randn(capacity * b, b, generator=gen).to(DEVICE, v_dtype).requires_grad_()
    x = torch.randn(n, in_f, generator=gen).to(DEVICE, x_dtype).requires_grad_()
    gy = torch.randn(n, out_f, generator=gen).to(DEVICE, x_dtype)

    y = tb.BlockSparseLinearFunction.apply(x, values, lay_a, lay_b)
    assert y.dtype == x_dtype and y.shape == (n, out_f)
    y.backward(gy)
    assert x.grad.dtype == x_dtype and values.grad.dtype == v_dtype
    assert values.grad.shape == values.shape

    # Dense reference: W on A's blocks, the full weight gradient kept at B's blocks only.
    w_a = tb.bsr_to_dense(values.detach().to(x_dtype).double(), lay_a)
    xd, gyd = x.detach().double(), gy.double()
    _close(y.detach(), xd @ w_a.T, x_dtype)
    _close(x.grad, gyd @ w_a, x_dtype)
    ref = torch.zeros(capacity, b, b, dtype=torch.float64, device=DEVICE)
    full = _dense_blocks(gyd.T @ xd, b)
    ref[lay_b.slots.long()] = full[lay_b.rows.long(), lay_b.cols.long()]
    _close(values.grad.view(capacity, b, b), ref, x_dtype)


@needs_kernels
def test_autograd_values_only():
    units, in_a, grid, gen = _storage(16, 64, 64, seed=5)
    lay_a, lay_b = tb.layouts_from_storage(units, in_a, grid, 16)
    values = torch.randn(units.numel(), 16, 16, generator=gen).to(DEVICE).requires_grad_()
    x = torch.randn(9, 64, generator=gen).to(DEVICE)
    tb.BlockSparseLinearFunction.apply(x, values, lay_a, lay_b).sum().backward()
    assert values.grad is not None and x.grad is None
    ref = torch.zeros_like(values, dtype=torch.float64)
    full = _dense_blocks(torch.ones(9, 64, dtype=torch.float64).T @ x.double(), 16)
    ref[lay_b.slots.long()] = full[lay_b.rows.long(), lay_b.cols.long()]
    _close(values.grad, ref, F32)
