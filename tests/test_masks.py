"""Tests for alwayssparse.masks: exact-count top-k selection and its tie rule."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from alwayssparse.masks import (
    _topk_flat_numpy,
    _topk_flat_torch,
    count_for_density,
    extend_mask_randomly,
    global_topk_masks,
    random_mask,
    topk_mask,
)

SHAPES = [(1,), (7,), (5, 3), (4, 4), (2, 3, 5), (3, 2, 3, 3), (1000,)]


def _cases() -> list[tuple[tuple[int, ...], int]]:
    cases = []
    for shape in SHAPES:
        n = math.prod(shape)
        for k in sorted({0, 1, n // 3, n // 2, n - 1, n}):
            if 0 <= k <= n:
                cases.append((shape, k))
    return cases


@pytest.mark.parametrize(("shape", "k"), _cases())
def test_topk_mask_exact_count_and_shape(shape: tuple[int, ...], k: int) -> None:
    gen = torch.Generator().manual_seed(1)
    # Values drawn from only five levels so that most thresholds are ties.
    scores = torch.randint(0, 5, shape, generator=gen).float()
    mask = topk_mask(scores, k)
    assert mask.dtype == torch.bool
    assert mask.shape == scores.shape
    assert int(mask.sum()) == k
    if 0 < k < scores.numel():
        # Every kept entry is >= every dropped one.
        assert scores[mask].min() >= scores[~mask].max()


@pytest.mark.parametrize(("shape", "k"), _cases())
def test_topk_mask_matches_torch_topk_on_distinct_values(shape: tuple[int, ...], k: int) -> None:
    n = math.prod(shape)
    gen = torch.Generator().manual_seed(2)
    scores = torch.randperm(n, generator=gen).float().reshape(shape) * 0.5 - 3.0
    expected = torch.zeros(n, dtype=torch.bool)
    expected[torch.topk(scores.reshape(-1), k).indices] = True
    assert torch.equal(topk_mask(scores, k), expected.reshape(shape))


def test_tie_break_lowest_flat_index() -> None:
    scores = torch.tensor([1.0, 2.0, 2.0, 2.0, 0.0])
    assert topk_mask(scores, 2).tolist() == [False, True, True, False, False]
    assert topk_mask(scores, 3).tolist() == [False, True, True, True, False]
    assert topk_mask(scores, 4).tolist() == [True, True, True, True, False]
    # Strictly larger values always win over ties; ties fill in index order.
    scores = torch.tensor([3.0, 1.0, 5.0, 1.0, 1.0, 1.0])
    assert topk_mask(scores, 3).tolist() == [True, True, True, False, False, False]
    # Multi-dimensional: flat (row-major) index order decides.
    scores = torch.tensor([[0.5, 0.5], [0.5, 0.5]])
    assert topk_mask(scores, 3).tolist() == [[True, True], [True, False]]


def test_all_equal_keeps_lowest_indices() -> None:
    mask = topk_mask(torch.zeros(10), 4)
    assert mask.tolist() == [True] * 4 + [False] * 6


def test_float64_gives_identical_masks() -> None:
    gen = torch.Generator().manual_seed(3)
    scores = torch.randint(0, 7, (12, 9), generator=gen).float()  # exact in both dtypes
    for k in range(scores.numel() + 1):
        assert torch.equal(topk_mask(scores, k), topk_mask(scores.double(), k))


def test_torch_path_matches_numpy_path_with_ties() -> None:
    gen = torch.Generator().manual_seed(4)
    flat = torch.randint(0, 6, (500,), generator=gen).float()
    for k in [1, 2, 50, 83, 84, 250, 417, 499]:
        from_numpy = torch.from_numpy(_topk_flat_numpy(flat.numpy(), k))
        from_torch = _topk_flat_torch(flat.clone(), k)
        assert int(from_torch.sum()) == k
        assert torch.equal(from_torch, from_numpy), k


def test_half_precision_uses_torch_path_and_same_rule() -> None:
    # float16 on CPU is not handled by the numpy path; the result must still follow the rule.
    scores = torch.tensor([1.0, 2.0, 2.0, 2.0, 0.0], dtype=torch.float16)
    assert topk_mask(scores, 2).tolist() == [False, True, True, False, False]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_nan_raises(dtype: torch.dtype, k: int) -> None:
    scores = torch.tensor([1.0, float("nan"), 2.0, 3.0], dtype=dtype)
    with pytest.raises(ValueError, match="NaN"):
        topk_mask(scores, k)


@pytest.mark.parametrize("k", [-1, 6, 100])
def test_k_out_of_range_raises(k: int) -> None:
    with pytest.raises(ValueError, match="k must be in"):
        topk_mask(torch.arange(5.0), k)


def test_random_mask_count_and_reproducibility() -> None:
    masks = [random_mask((6, 7), 11, torch.Generator().manual_seed(5)) for _ in range(2)]
    assert masks[0].shape == (6, 7)
    assert int(masks[0].sum()) == 11
    assert torch.equal(masks[0], masks[1])
    other = random_mask((6, 7), 11, torch.Generator().manual_seed(6))
    assert int(other.sum()) == 11
    assert not torch.equal(masks[0], other)
    # Successive draws from one generator differ.
    gen = torch.Generator().manual_seed(5)
    first, second = random_mask((6, 7), 11, gen), random_mask((6, 7), 11, gen)
    assert torch.equal(first, masks[0])
    assert not torch.equal(first, second)


def test_extend_mask_randomly() -> None:
    base = torch.zeros(8, 5, dtype=torch.bool)
    base[0, :] = True
    base[3, 2] = True  # 6 entries
    for k in [6, 7, 20, 40]:
        extended = extend_mask_randomly(base, k, torch.Generator().manual_seed(7))
        assert int(extended.sum()) == k
        assert bool(extended[base].all())
        assert int((extended & ~base).sum()) == k - 6
    a = extend_mask_randomly(base, 20, torch.Generator().manual_seed(7))
    b = extend_mask_randomly(base, 20, torch.Generator().manual_seed(7))
    c = extend_mask_randomly(base, 20, torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_global_topk_masks_count_and_ties_across_tensors() -> None:
    scores = [torch.tensor([1.0, 3.0]), torch.tensor([[3.0, 0.0], [2.0, 3.0]])]
    masks = global_topk_masks(scores, 1)
    assert masks[0].tolist() == [False, True]
    assert masks[1].tolist() == [[False, False], [False, False]]
    masks = global_topk_masks(scores, 2)
    assert masks[0].tolist() == [False, True]
    assert masks[1].tolist() == [[True, False], [False, False]]
    masks = global_topk_masks(scores, 4)
    assert masks[0].tolist() == [False, True]
    assert masks[1].tolist() == [[True, False], [True, True]]
    assert [m.shape for m in masks] == [(2,), (2, 2)]

    gen = torch.Generator().manual_seed(9)
    rand = [torch.randint(0, 4, s, generator=gen).float() for s in [(3, 4), (5,), (2, 2, 2)]]
    for k in range(26):
        masks = global_topk_masks(rand, k)
        assert sum(int(m.sum()) for m in masks) == k
        flat = topk_mask(torch.cat([r.reshape(-1) for r in rand]), k)
        assert torch.equal(torch.cat([m.reshape(-1) for m in masks]), flat)


@pytest.mark.parametrize(
    ("numel", "density", "expected"),
    [
        (100, 0.1, 10),
        (100, 1.0, 100),
        (512, 1 - 0.8, 102),  # 102.4 -> 102
        (768, 0.2, 154),  # 153.6 -> 154
        (8, 0.25, 2),
        (10, 0.01, 1),  # rounds to 0, clamped to at least one
        (3, 0.999, 3),
        (7, 0.5, 4),  # 3.5 -> 4 (round half to even)
        (5, 0.5, 2),  # 2.5 -> 2 (round half to even)
    ],
)
def test_count_for_density(numel: int, density: float, expected: int) -> None:
    assert count_for_density(numel, density) == expected


@pytest.mark.parametrize("density", [0.0, -0.1, 1.0001, 2.0, float("nan")])
def test_count_for_density_rejects_out_of_range(density: float) -> None:
    with pytest.raises(ValueError, match="density"):
        count_for_density(10, density)


def test_numpy_path_does_not_modify_input() -> None:
    values = np.array([3.0, 1.0, 2.0, 2.0], dtype=np.float32)
    before = values.copy()
    _topk_flat_numpy(values, 2)
    assert np.array_equal(values, before)
