"""Tests for block structure: block norms (dynsparse-bert.md eq. 1), expand/collapse, shapes."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from alwayssparse import Sparsity
from alwayssparse.masks import block_norms, check_block_shape, collapse_blocks, expand_blocks

# A hand-worked 4 x 8 matrix. Its 2 x 2 tiles, row-major on the (2, 4) block grid, are
#   (0,0): 1 -2 / -2  2      (0,1): 0  3 / 1 -1      (0,2): -1 1 / 0 2    (0,3): 4 0 / -2 0
#   (1,0): 0  0 /  3 -4      (1,1): 5 -1 / 0  2      (1,2):  1 1 / -1 -1  (1,3): 1 1 / 1 -1
W = torch.tensor(
    [
        [1.0, -2.0, 0.0, 3.0, -1.0, 1.0, 4.0, 0.0],
        [-2.0, 2.0, 1.0, -1.0, 0.0, 2.0, -2.0, 0.0],
        [0.0, 0.0, 5.0, -1.0, 1.0, 1.0, 1.0, 1.0],
        [3.0, -4.0, 0.0, 2.0, -1.0, -1.0, 1.0, -1.0],
    ]
)

# L1 = sum |w|:       (0,0) 1+2+2+2 = 7, (0,1) 0+3+1+1 = 5, (0,2) 1+1+0+2 = 4, (0,3) 4+0+2+0 = 6
#                     (1,0) 0+0+3+4 = 7, (1,1) 5+1+0+2 = 8, (1,2) 4,           (1,3) 4
L1_BLOCK2 = [[7.0, 5.0, 4.0, 6.0], [7.0, 8.0, 4.0, 4.0]]
# L2 = sqrt(sum w^2): (0,0) sqrt(1+4+4+4) = sqrt 13, (0,1) sqrt(0+9+1+1) = sqrt 11,
#                     (0,2) sqrt(1+1+0+4) = sqrt 6,  (0,3) sqrt(16+0+4+0) = sqrt 20,
#                     (1,0) sqrt(0+0+9+16) = 5,      (1,1) sqrt(25+1+0+4) = sqrt 30,
#                     (1,2) sqrt(1+1+1+1) = 2,       (1,3) 2
L2_BLOCK2 = [
    [math.sqrt(13), math.sqrt(11), math.sqrt(6), math.sqrt(20)],
    [5.0, math.sqrt(30), 2.0, 2.0],
]
# Linf = max |w|
LINF_BLOCK2 = [[2.0, 3.0, 2.0, 4.0], [4.0, 5.0, 1.0, 1.0]]
# 4 x 4 tiles (grid 1 x 2): left half and right half.
#   left:  L1 = 7+5+7+8 = 27,  sum w^2 = 13+11+25+30 = 79, max 5
#   right: L1 = 4+6+4+4 = 18,  sum w^2 = 6+20+4+4 = 34,    max 4
L1_BLOCK4 = [[27.0, 18.0]]
L2_BLOCK4 = [[math.sqrt(79), math.sqrt(34)]]
LINF_BLOCK4 = [[5.0, 4.0]]


@pytest.mark.parametrize(
    ("block", "norm", "expected"),
    [
        (2, "l1", L1_BLOCK2),
        (2, "l2", L2_BLOCK2),
        (2, "linf", LINF_BLOCK2),
        (4, "l1", L1_BLOCK4),
        (4, "l2", L2_BLOCK4),
        (4, "linf", LINF_BLOCK4),
    ],
)
def test_block_norms_hand_worked(block: int, norm: str, expected: list[list[float]]) -> None:
    result = block_norms(W, block, norm)
    assert result.shape == (4 // block, 8 // block)
    torch.testing.assert_close(result, torch.tensor(expected), rtol=1e-6, atol=0.0)


def test_block_norms_ignore_sign_and_do_not_modify_input() -> None:
    before = W.clone()
    assert torch.equal(block_norms(-W, 2, "l1"), block_norms(W, 2, "l1"))
    assert torch.equal(W, before)


@pytest.mark.parametrize("norm", ["l1", "l2", "linf"])
def test_block_1_is_absolute_value_for_every_norm(norm: str) -> None:
    result = block_norms(W, 1, norm)
    assert result.shape == W.shape
    assert torch.equal(result, W.abs())
    conv = torch.randn(3, 2, 3, 3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(block_norms(conv, 1, norm), conv.abs())


def test_unknown_block_norm_raises() -> None:
    with pytest.raises(ValueError, match="l3"):
        block_norms(W, 2, "l3")


def test_expand_hand_worked_and_collapse_round_trip() -> None:
    blocks = torch.tensor([[True, False, False, True], [False, True, False, False]])
    full = expand_blocks(blocks, 2, (4, 8))
    expected = torch.tensor(
        [
            [1, 1, 0, 0, 0, 0, 1, 1],
            [1, 1, 0, 0, 0, 0, 1, 1],
            [0, 0, 1, 1, 0, 0, 0, 0],
            [0, 0, 1, 1, 0, 0, 0, 0],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(full, expected)
    assert torch.equal(collapse_blocks(full, 2), blocks)
    # Block 1: both are the identity (up to shape).
    assert torch.equal(expand_blocks(expected, 1, (4, 8)), expected)
    assert torch.equal(collapse_blocks(expected, 1), expected)


def test_collapse_marks_a_tile_if_any_entry_is_set() -> None:
    mask = torch.zeros(4, 8, dtype=torch.bool)
    mask[3, 5] = True  # inside tile (1, 2) of the 2 x 2 grid and tile (0, 1) of the 4 x 4 grid
    assert collapse_blocks(mask, 2).nonzero().tolist() == [[1, 2]]
    assert collapse_blocks(mask, 4).tolist() == [[False, True]]


@pytest.mark.parametrize("block", [2, 4, 8])
def test_random_round_trips(block: int) -> None:
    gen = torch.Generator().manual_seed(block)
    grid = torch.rand(16 // block, 32 // block, generator=gen) < 0.4
    full = expand_blocks(grid, block, (16, 32))
    assert int(full.sum()) == int(grid.sum()) * block * block
    assert torch.equal(collapse_blocks(full, block), grid)
    assert torch.equal(expand_blocks(collapse_blocks(full, block), block, (16, 32)), full)


def test_conv_weight_uses_matrix_view() -> None:
    gen = torch.Generator().manual_seed(1)
    conv = torch.randn(8, 4, 2, 2, generator=gen)
    matrix = conv.reshape(8, 16)
    check_block_shape(conv.shape, 4, "conv.weight")  # 8 x 16 tiles into 4 x 4
    for norm in ("l1", "l2", "linf"):
        result = block_norms(conv, 4, norm)
        assert result.shape == (2, 4)
        assert torch.equal(result, block_norms(matrix, 4, norm))
    # Tile (1, 2) covers output channels 4..7 and matrix columns 8..11 (input channels 2).
    expected_l1 = matrix[4:8, 8:12].abs().sum()
    torch.testing.assert_close(block_norms(conv, 4, "l1")[1, 2], expected_l1)
    grid = torch.zeros(2, 4, dtype=torch.bool)
    grid[1, 2] = True
    full = expand_blocks(grid, 4, conv.shape)
    assert full.shape == conv.shape
    assert bool(full[4:8, 2].all())
    assert int(full.sum()) == 16
    assert torch.equal(collapse_blocks(full, 4), grid)


@pytest.mark.parametrize(
    ("shape", "block"),
    [((30, 16), 4), ((16, 30), 4), ((32, 30), 16), ((8, 3, 3, 3), 4), ((16,), 2), ((4,), 4)],
)
def test_check_block_shape_errors_name_the_tensor(shape: tuple[int, ...], block: int) -> None:
    with pytest.raises(ValueError, match="layers.3.attn.weight") as info:
        check_block_shape(shape, block, "layers.3.attn.weight")
    assert str(tuple(shape)) in str(info.value)


@pytest.mark.parametrize(
    ("shape", "block"), [((30, 16), 1), ((16,), 1), ((32, 16), 16), ((8, 4, 2, 2), 4)]
)
def test_check_block_shape_accepts_tiling_shapes(shape: tuple[int, ...], block: int) -> None:
    check_block_shape(shape, block, "w")


def test_sparsity_rejects_untileable_layer_at_construction() -> None:
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(30, 32))
    with pytest.raises(ValueError, match=r"2\.weight") as info:
        Sparsity(model, method="static", sparsity=0.5, block_size=16)
    assert "(32, 30)" in str(info.value)
    # Nothing was attached: the model still has plain parameters and can be sparsified later.
    sp = Sparsity(model, method="static", sparsity=0.5, block_size=2)
    assert [t.name for t in sp.tensors] == ["0.weight", "2.weight"]
