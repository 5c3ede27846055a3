"""Sparse Linear kernels (alwayssparse.kernels) against dense PyTorch references."""

from __future__ import annotations

import pytest
import torch

from alwayssparse import kernels as K
from alwayssparse.kernels import _build
from alwayssparse.kernels import _torch_ref as R

ATOL = 1e-4
RTOL = 1e-5


@pytest.fixture(scope="module")
def backend() -> str:
    return K.available_backend()


@pytest.fixture
def torch_backend():
    """Force the pure-PyTorch fallback for the duration of a test."""
    saved = dict(_build._state)
    _build._state.update(loaded=True, module=None)
    yield
    _build._state.clear()
    _build._state.update(saved)


def _close(a, b, rtol=RTOL, atol=ATOL):
    assert a.shape == b.shape, (a.shape, b.shape)
    assert a.dtype == torch.float32
    scale = max(1.0, float(b.abs().max())) if b.numel() else 1.0
    err = float((a - b).abs().max()) if a.numel() else 0.0
    assert err <= atol * scale + rtol * scale, f"max abs error {err} (scale {scale})"


def _mask(out_f, in_f, density, gen):
    m = torch.rand(out_f, in_f, generator=gen) < density
    if out_f > 3:
        m[1] = False  # empty row
        m[2] = True  # fully dense row
    return m


# (batch, in, out, density): ragged batches (not multiples of 16 / 64), tiny and empty shapes.
CSR_CASES = [
    (1, 5, 3, 0.5),
    (17, 40, 24, 0.3),
    (70, 33, 19, 0.2),
    (129, 257, 130, 0.05),
    (300, 1024, 64, 0.1),
    (64, 16, 48, 0.0),  # nnz = 0
    (0, 16, 8, 0.5),  # empty batch
]


@pytest.mark.parametrize("index", [torch.int64, torch.int32])
@pytest.mark.parametrize("n,fin,fout,d", CSR_CASES)
def test_csr_kernels_match_dense(n, fin, fout, d, index, backend):
    gen = torch.Generator().manual_seed(n * 1000 + fin)
    w = torch.randn(fout, fin, generator=gen)
    mask = _mask(fout, fin, d, gen)
    if d == 0.0:
        mask[:] = False
    rp, ci, v = K.dense_to_csr(w, mask)
    ci = ci.to(index)
    wd = K.csr_to_dense(rp, ci, v, fin)
    assert torch.equal(wd, w * mask)
    col_ptr, row_idx, perm = K.csr_transpose(rp, ci, fin)
    assert row_idx.dtype == perm.dtype == index  # the transpose keeps the index width
    x = torch.randn(n, fin, generator=gen)
    gy = torch.randn(n, fout, generator=gen)
    _close(K.csr_matmul(rp, ci, v, x, fout), x @ wd.T)
    _close(K.csr_matmul_t(rp, ci, v, gy, fin), gy @ wd)
    _close(K.csr_matmul_t(rp, ci, v, gy, fin, transpose=K.csr_transpose(rp, ci, fin)), gy @ wd)
    _close(K.csr_sampled_grad(rp, ci, gy, x), (gy.T @ x)[mask])


@pytest.mark.parametrize("nt", [16, 32, 64, 128])
def test_csr_products_at_every_batch_tile(nt: int, backend: str) -> None:
    """The extension's products for every batch tile NT (the defaults pick 32 for the SpMM and
    64 for the SDDMM; the others stay reachable through the extension's ``nt``), on a ragged
    batch."""
    if backend != "cpp":
        pytest.skip("the C++ extension is not available")
    gen = torch.Generator().manual_seed(nt)
    n, fin, fout = 203, 70, 45
    w = torch.randn(fout, fin, generator=gen)
    mask = _mask(fout, fin, 0.2, gen)
    rp, ci, v = K.dense_to_csr(w, mask)
    x, gy = torch.randn(n, fin, generator=gen), torch.randn(n, fout, generator=gen)
    ext = K._ext()
    _close(ext.csr_spmm(rp, ci, v, x, fout, nt), x @ (w * mask).T)
    _close(ext.csr_sddmm(rp, ci, gy, x, nt), (gy.T @ x)[mask])


@pytest.mark.parametrize("index", [torch.int64, torch.int32])
@pytest.mark.parametrize("b", [4, 8, 16])
@pytest.mark.parametrize(
    "n,nbi,nbo,d", [(1, 2, 3, 0.5), (37, 5, 4, 0.4), (200, 16, 9, 0.3), (13, 3, 2, 0.0)]
)
def test_bsr_kernels_match_dense(b, n, nbi, nbo, d, index, backend):
    gen = torch.Generator().manual_seed(b * 100 + n)
    fin, fout = nbi * b, nbo * b
    w = torch.randn(fout, fin, generator=gen)
    bm = torch.rand(nbo, nbi, generator=gen) < d
    if d > 0 and nbo > 1:
        bm[0] = True  # full block row
        bm[1] = False  # empty block row
    bp, bc, bl = K.dense_to_bsr(w, bm, b)
    bc = bc.to(index)
    wd = K.bsr_to_dense(bp, bc, bl, fin)
    full = bm.repeat_interleave(b, 0).repeat_interleave(b, 1)
    assert torch.equal(wd, w * full)
    x = torch.randn(n, fin, generator=gen)
    gy = torch.randn(n, fout, generator=gen)
    _close(K.bsr_matmul(bp, bc, bl, x, fout), x @ wd.T)
    _close(K.bsr_matmul_t(bp, bc, bl, gy, fin), gy @ wd)
    g = K.bsr_sampled_grad(bp, bc, gy, x)
    assert g.shape == bl.shape
    _close(K.bsr_to_dense(bp, bc, g, fin), (gy.T @ x) * full)


@pytest.mark.parametrize("b", [4, 8, 16])
@pytest.mark.parametrize("d", [0.003, 0.15])
def test_bsr_sampled_grad_tiled(b, d):
    """Several (ragged) batch tiles, wide inputs (smaller tiles), sparse and empty block rows."""
    gen = torch.Generator().manual_seed(b + int(d * 1000))
    n, fin, fout = 531, 2048, 320
    bm = torch.rand(fout // b, fin // b, generator=gen) < d
    bm[: fout // b // 3] = False  # a run of empty block rows
    bm[-1, -1] = True
    bp, bc, bl = K.dense_to_bsr(torch.randn(fout, fin, generator=gen), bm, b)
    x = torch.randn(n, fin, generator=gen)
    gy = torch.randn(n, fout, generator=gen)
    full = bm.repeat_interleave(b, 0).repeat_interleave(b, 1)
    g = K.bsr_sampled_grad(bp, bc.int(), gy, x)
    _close(K.bsr_to_dense(bp, bc, g, fin), (gy.T @ x) * full)
    g0 = K.bsr_sampled_grad(bp, bc, gy[:0], x[:0])  # empty batch: zero gradient
    assert g0.shape == bl.shape and not g0.any()


def test_fast_path_matches_torch_fallback(backend):
    if backend == "torch":
        pytest.skip("compiled kernels not available")
    gen = torch.Generator().manual_seed(7)
    n, fin, fout = 333, 512, 384
    x = torch.randn(n, fin, generator=gen)
    gy = torch.randn(n, fout, generator=gen)
    w = torch.randn(fout, fin, generator=gen)
    rp, ci, v = K.dense_to_csr(w, _mask(fout, fin, 0.1, gen))
    pairs = [
        (K.csr_matmul(rp, ci, v, x, fout), R.csr_matmul(rp, ci, v, x, fout)),
        (K.csr_matmul_t(rp, ci, v, gy, fin), R.csr_matmul_t(rp, ci, v, gy, fin)),
        (K.csr_sampled_grad(rp, ci, gy, x), R.csr_sampled_grad(rp, ci, gy, x)),
    ]
    for b in (4, 8, 16):
        bp, bc, bl = K.dense_to_bsr(w, torch.rand(fout // b, fin // b, generator=gen) < 0.2, b)
        pairs += [
            (K.bsr_matmul(bp, bc, bl, x, fout), R.bsr_matmul(bp, bc, bl, x, fout)),
            (K.bsr_matmul_t(bp, bc, bl, gy, fin), R.bsr_matmul_t(bp, bc, bl, gy, fin)),
            (K.bsr_sampled_grad(bp, bc, gy, x), R.bsr_sampled_grad(bp, bc, gy, x, b)),
        ]
    for fast, ref in pairs:
        _close(fast, ref, rtol=1e-5, atol=1e-5)


def test_torch_fallback_matches_dense(torch_backend):
    assert K.available_backend() == "torch"
    gen = torch.Generator().manual_seed(3)
    n, fin, fout = 45, 64, 48
    x = torch.randn(n, fin, generator=gen)
    gy = torch.randn(n, fout, generator=gen)
    w = torch.randn(fout, fin, generator=gen)
    mask = _mask(fout, fin, 0.2, gen)
    rp, ci, v = K.dense_to_csr(w, mask)
    wd = w * mask
    _close(K.csr_matmul(rp, ci, v, x, fout), x @ wd.T)
    _close(K.csr_matmul(rp, ci.int(), v, x, fout), x @ wd.T)  # int32 columns are widened
    _close(K.csr_matmul_t(rp, ci, v, gy, fin), gy @ wd)
    _close(K.csr_sampled_grad(rp, ci, gy, x), (gy.T @ x)[mask])
    bp, bc, bl = K.dense_to_bsr(w, torch.rand(fout // 16, fin // 16, generator=gen) < 0.5, 16)
    wd = K.bsr_to_dense(bp, bc, bl, fin)
    _close(K.bsr_matmul(bp, bc, bl, x, fout), x @ wd.T)
    _close(K.bsr_matmul_t(bp, bc, bl, gy, fin), gy @ wd)


def test_validation_errors():
    w = torch.randn(8, 12)
    rp, ci, v = K.dense_to_csr(w, torch.rand(8, 12) < 0.5)
    x = torch.randn(4, 12)
    with pytest.raises(TypeError, match="float32"):
        K.csr_matmul(rp, ci, v, x.double(), 8)
    with pytest.raises(TypeError, match="int64"):
        K.csr_matmul(rp.int(), ci, v, x, 8)  # row pointers are always int64
    with pytest.raises(TypeError, match="torch.int32 or torch.int64"):
        K.csr_matmul(rp, ci.short(), v, x, 8)
    with pytest.raises(ValueError, match="entries"):
        K.csr_matmul(rp, ci, v, x, 7)  # row_ptr length
    with pytest.raises(ValueError, match="col_idx"):
        K.csr_matmul(rp, ci, v, torch.randn(4, 5), 8)  # column index out of range
    with pytest.raises(ValueError, match="differ"):
        K.csr_matmul(rp, ci, v[:-1], x, 8)
    with pytest.raises(ValueError, match="columns"):
        K.csr_matmul_t(rp, ci, v, torch.randn(4, 9), 12)
    with pytest.raises(ValueError, match="rows"):
        K.csr_sampled_grad(rp, ci, torch.randn(3, 8), x)
    with pytest.raises(ValueError, match="2-D"):
        K.csr_matmul(rp, ci, v, x[0], 8)
    bp, bc, bl = K.dense_to_bsr(torch.randn(16, 32), torch.ones(2, 4, dtype=torch.bool), 8)
    with pytest.raises(ValueError, match="block size"):
        K.dense_to_bsr(torch.randn(12, 12), torch.ones(2, 2, dtype=torch.bool), 6)
    with pytest.raises(ValueError, match="multiple"):
        K.bsr_matmul(bp, bc, bl, torch.randn(3, 30), 16)
    with pytest.raises(ValueError, match="shape"):
        K.bsr_matmul(bp, bc, bl[:, :, :4].contiguous(), torch.randn(3, 32), 16)
    with pytest.raises(TypeError, match="float32"):
        K.bsr_sampled_grad(bp, bc, torch.randn(3, 16).half(), torch.randn(3, 32))


def test_env_var_selects_torch(monkeypatch):
    monkeypatch.setenv("ALWAYSSPARSE_KERNELS", "torch")
    assert _build.mode() == "torch"
    monkeypatch.setenv("ALWAYSSPARSE_KERNELS", "bogus")
    with pytest.raises(ValueError):
        _build.mode()


def test_any_nonzero_outside_matches_torch() -> None:
    """The masked backend's check that no gradient reached theta outside B: compiled and torch
    answers agree, including a single nonzero in the last partial chunk."""
    generator = torch.Generator().manual_seed(0)
    for n in (1, 4095, 4096, 10_000):
        mask = torch.rand(n, generator=generator) < 0.3
        values = torch.where(mask, torch.randn(n, generator=generator), 0.0)
        assert not K.any_nonzero_outside(values, mask)
        outside = torch.nonzero(~mask).squeeze(1)
        if outside.numel():
            values[outside[-1]] = 1e-30  # tiny but nonzero, at the last place outside
            assert K.any_nonzero_outside(values, mask)
            values[outside[-1]] = -0.0  # negative zero is zero
            assert not K.any_nonzero_outside(values, mask)
    grid = torch.zeros(3, 5)
    grid[2, 4] = 1.0
    mask = torch.zeros(3, 5, dtype=torch.bool)
    assert K.any_nonzero_outside(grid, mask)
    assert K.any_nonzero_outside(grid.double(), mask)  # not float32: through torch
    mask[2, 4] = True
    assert not K.any_nonzero_outside(grid, mask)
    with pytest.raises(ValueError, match="differ"):
        K.any_nonzero_outside(grid, mask.t())


def _special(n: int, generator: torch.Generator) -> torch.Tensor:
    """Random floats with NaN, both infinities and both zeros mixed in."""
    values = torch.randn(n, generator=generator)
    specials = torch.tensor([float("nan"), float("inf"), float("-inf"), 0.0, -0.0])
    pick = torch.randint(0, 40, (n,), generator=generator)
    chosen = pick < specials.numel()
    values[chosen] = specials[pick[chosen]]
    return values


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "torch"])
def test_masked_where_is_torch_where_bit_for_bit(compiled: bool, request) -> None:
    """Both paths give torch.where's bits (NaN, infinities, -0.0 kept; +0.0 outside the mask
    without ``other``), into a new tensor or in place over ``x`` or ``other``, at sizes around
    the compiled kernel's 64 Ki chunks."""
    if not compiled:
        request.getfixturevalue("torch_backend")
    generator = torch.Generator().manual_seed(1)
    for n in (1, 7, 65_535, 65_536, 200_001):
        mask = torch.rand(n, generator=generator) < 0.3
        x, other = _special(n, generator), _special(n, generator)
        expected_zero = torch.where(mask, x, 0.0)
        expected = torch.where(mask, x, other)
        assert torch.equal(_bits(K.masked_where(mask, x)), _bits(expected_zero))
        assert torch.equal(_bits(K.masked_where(mask, x, other)), _bits(expected))
        into_x, into_other = x.clone(), other.clone()
        assert K.masked_where(mask, into_x, other, out=into_x) is into_x
        assert torch.equal(_bits(into_x), _bits(expected))
        K.masked_where(mask, x, into_other, out=into_other)
        assert torch.equal(_bits(into_other), _bits(expected))
    grid = torch.arange(12.0).reshape(3, 4)
    keep = grid.remainder(3) == 0
    assert K.masked_where(keep, grid).tolist() == [[0, 0, 0, 3], [0, 0, 6, 0], [0, 9, 0, 0]]


def test_masked_where_falls_back_to_torch(backend: str) -> None:
    """Non-contiguous, other dtypes and tensors autograd must track go through torch.where (same
    values; the gradient flows)."""
    generator = torch.Generator().manual_seed(2)
    mask = torch.rand(6, 5, generator=generator) < 0.5
    x = torch.randn(5, 6, generator=generator).t()  # not contiguous
    assert torch.equal(K.masked_where(mask, x), torch.where(mask, x, 0.0))
    assert torch.equal(K.masked_where(mask, x.double()), torch.where(mask, x.double(), 0.0))
    leaf = x.contiguous().requires_grad_()
    K.masked_where(mask, leaf).sum().backward()
    assert leaf.grad is not None and torch.equal(leaf.grad, mask.float())


def test_masked_where_rejects_bad_input_writing_nothing() -> None:
    mask = torch.zeros(3, 4, dtype=torch.bool)
    x, out = torch.randn(3, 4), torch.full((3, 4), 7.0)
    with pytest.raises(ValueError, match=r"other \(4, 3\) and mask \(3, 4\) differ"):
        K.masked_where(mask, x, torch.randn(4, 3), out=out)
    with pytest.raises(ValueError, match="out"):
        K.masked_where(mask, x, out=torch.empty(12))
    with pytest.raises(TypeError, match="mask must be a bool tensor"):
        K.masked_where(mask.float(), x, out=out)
    assert torch.equal(out, torch.full((3, 4), 7.0))


@pytest.mark.parametrize("norm", ["l2", "l1"])
def test_weighted_norm_compiled(norm: str, backend: str) -> None:
    """The float64 sum of c * w^2 (c * |w|) rounded once, the same bits for 1 and 2 threads,
    and the gradient bit for bit torch's (scale * c) * w (sign(w), 0 at 0)."""
    if backend != "cpp":
        pytest.skip("the C++ extension is not available")
    weight, coefficient, reference = _norm_case(norm)
    threads = torch.get_num_threads()
    try:
        values = []
        for count in (1, 2):
            torch.set_num_threads(count)
            values.append(K.weighted_norm(weight, coefficient, norm))
    finally:
        torch.set_num_threads(threads)
    assert values[0].dtype == torch.float32 and values[0].dim() == 0
    assert torch.equal(values[0], values[1])
    assert float(values[0]) == float(torch.tensor(reference, dtype=torch.float32))
    direction = weight if norm == "l2" else weight.sign()
    grad = K.weighted_norm_grad(weight, coefficient, 0.75, norm)
    assert torch.equal(_bits(grad), _bits((0.75 * coefficient) * direction))


@pytest.mark.parametrize("norm", ["l2", "l1"])
def test_weighted_norm_torch_fallback(norm: str, torch_backend) -> None:
    """Without the extension: the same values to float32 rounding; bad input is refused."""
    weight, coefficient, reference = _norm_case(norm)
    assert float(K.weighted_norm(weight, coefficient, norm)) == pytest.approx(reference, rel=1e-5)
    direction = weight if norm == "l2" else weight.sign()
    grad = K.weighted_norm_grad(weight, coefficient, torch.tensor(0.75), norm)
    assert torch.equal(grad, (0.75 * coefficient) * direction)
    with pytest.raises(ValueError, match="differ"):
        K.weighted_norm(weight, coefficient.t(), norm)
    with pytest.raises(ValueError, match="norm must be"):
        K.weighted_norm_grad(weight, coefficient, 1.0, "l3")


def _norm_case(norm: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    """A weight with a few zeros, coefficients, and sum(c * w^2) (c * |w|) in float64."""
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(513, 300, generator=generator)
    weight[0, :5] = 0.0
    coefficient = torch.rand(513, 300, generator=generator)
    term = weight.double().square() if norm == "l2" else weight.double().abs()
    return weight, coefficient, float((coefficient.double() * term).sum())


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "torch"])
def test_topkast_coefficients_bit_for_bit(compiled: bool, request) -> None:
    """1 on A, 1/D on B \\ A, 0 elsewhere: the same bits on both paths, for A inside B and not,
    float32 and (through torch) float64 and expanded masks."""
    if not compiled:
        request.getfixturevalue("torch_backend")
    generator = torch.Generator().manual_seed(5)
    grad = torch.rand(70_001, generator=generator) < 0.2
    forward = grad & (torch.rand(70_001, generator=generator) < 0.5)
    forward[:10] = True  # a few entries of A outside B
    for density in (0.1, 0.3, 0.07):
        expected = forward.float() + (grad & ~forward).float() / density
        got = K.topkast_coefficients(forward, grad, density, torch.float32)
        assert torch.equal(_bits(got), _bits(expected))
    hand = K.topkast_coefficients(torch.tensor([True, False, False, True]),
                                  torch.tensor([True, True, False, False]), 0.25,
                                  torch.float32)  # fmt: skip
    assert hand.tolist() == [1.0, 4.0, 0.0, 1.0]
    wide = K.topkast_coefficients(forward, grad, 0.1, torch.float64)
    assert wide.dtype == torch.float64 and float(wide[grad & ~forward][0]) == pytest.approx(10.0)
    expanded = forward[:40].view(-1, 1).expand(40, 3)  # not contiguous: through torch
    got = K.topkast_coefficients(expanded, grad[:40].view(-1, 1).expand(40, 3), 0.1,
                                 torch.float32)  # fmt: skip
    assert torch.equal(got, got[:, :1].expand(40, 3))
    with pytest.raises(ValueError, match="differ"):
        K.topkast_coefficients(forward, grad[:5], 0.1, torch.float32)
    with pytest.raises(ValueError, match="density must be positive"):
        K.topkast_coefficients(forward, grad, 0.0, torch.float32)
