"""Tests for the dynamic methods: SET, RigL, DynSparse (prune and regrow) and GMP.

Hand-worked cases first (16-entry tensors whose weights, masks and gradients are written out),
then invariants over every registered method (exact counts, block alignment, A within B), the
optimizer-state reset, reproducibility, explored degrees of freedom and the defaults of
dynsparse-bert.md appendix A.1 / Evci et al. 2020.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from alwayssparse import Sparsity
from alwayssparse.masks import block_norms, collapse_blocks, expand_blocks
from alwayssparse.methods import METHODS
from alwayssparse.schedules import UpdateSchedule
from alwayssparse.sparse_tensor import SparseTensor, set_masks

# -- helpers ------------------------------------------------------------------------------------


def indices(mask: Tensor) -> set[int]:
    """Flat indices of the true entries."""
    return set(mask.reshape(-1).nonzero().flatten().tolist())


def mask_of(flat_indices: set[int], shape: tuple[int, ...]) -> Tensor:
    mask = torch.zeros(math.prod(shape), dtype=torch.bool)
    mask[sorted(flat_indices)] = True
    return mask.view(shape)


def top_indices(scores: Tensor, candidates: Tensor, k: int) -> set[int]:
    """Independent top-k: largest score first, ties by lower flat index, candidates only."""
    flat, allowed = scores.reshape(-1).tolist(), candidates.reshape(-1).tolist()
    order = sorted((i for i in range(len(flat)) if allowed[i]), key=lambda i: (-flat[i], i))
    return set(order[:k])


def square_model(weight: Tensor) -> nn.Sequential:
    """A Linear without bias whose weight is ``weight`` (set before Sparsity is attached)."""
    out_features, in_features = weight.shape
    model = nn.Sequential(nn.Linear(in_features, out_features, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(weight)
    return model


def install_mask(t: SparseTensor, active: set[int]) -> None:
    mask = mask_of(active, tuple(t.weight.shape))
    set_masks(t, mask, mask.clone())


# A 4 x 4 weight (flat index = 4 * row + col) with distinct magnitudes and mixed signs:
#   idx: 0    1    2     3    4    5     6    7    8    9    10   11    12    13    14    15
#   w:   9   -1   14     2   -3  -0.5   4   -7    6    5   -8   0.75  10  -1.5  -2.5   12
W16 = torch.tensor(
    [
        [9.0, -1.0, 14.0, 2.0],
        [-3.0, -0.5, 4.0, -7.0],
        [6.0, 5.0, -8.0, 0.75],
        [10.0, -1.5, -2.5, 12.0],
    ]
)
# Hand-chosen initial A = B: 8 of 16 (sparsity 0.5). Active magnitudes:
#   0:9  2:14  5:0.5  7:7  8:6  11:0.75  13:1.5  14:2.5
# With drop fraction 0.25: n_drop = round(0.25 * 8) = 2, the smallest active magnitudes are
# idx 5 (0.5) and idx 11 (0.75); inactive idx 1 (1.0) and 3 (2.0) are smaller than active 13 and
# 14 but must not matter (only active units are ranked for pruning).
ACTIVE16 = {0, 2, 5, 7, 8, 11, 13, 14}
DROPPED16 = {5, 11}
KEPT16 = ACTIVE16 - DROPPED16
INACTIVE16 = set(range(16)) - ACTIVE16  # {1, 3, 4, 6, 9, 10, 12, 15}

HAND_OPTIONS: dict[str, Any] = {
    "sparsity": 0.5,
    "drop_fraction": 0.25,
    "drop_schedule": "constant",
    "update_interval": 1,
    "total_steps": 10,
}


def one_step(
    model: nn.Module, sp: Sparsity, x: Tensor, c: Tensor, lr: float = 0.0
) -> torch.optim.Optimizer:
    """Optimizer step 0 with loss sum(y * c) (so dL/dy = c), then sp.step(0)."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    loss = (model(x) * c).sum() + sp.regularizer()
    loss.backward()
    opt.step()
    opt.zero_grad()
    sp.step(0, opt)
    return opt


# -- SET, hand-worked ---------------------------------------------------------------------------


def test_set_hand_worked_update() -> None:
    model = square_model(W16)
    sp = Sparsity(model, method="set", seed=3, **HAND_OPTIONS)
    t = sp.tensors[0]
    install_mask(t, ACTIVE16)
    one_step(model, sp, torch.ones(2, 4), torch.ones(2, 4))  # lr = 0: theta unchanged

    new = indices(t.forward_mask)
    assert torch.equal(t.forward_mask, t.grad_mask)
    assert len(new) == 8  # count unchanged
    assert ACTIVE16 - new == DROPPED16  # exactly the two smallest active magnitudes
    grown = new - ACTIVE16
    assert len(grown) == 2
    assert grown <= INACTIVE16  # only positions inactive before the update
    assert not grown & DROPPED16
    assert new & ACTIVE16 == KEPT16
    flat = t.weight.detach().reshape(-1)
    for i in DROPPED16 | grown:
        assert flat[i].item() == 0.0, i
    # Everything else keeps its value, active or not.
    for i in set(range(16)) - DROPPED16 - grown:
        assert flat[i].item() == W16.reshape(-1)[i].item(), i


def test_set_grown_positions_vary_with_seed_but_never_hit_dropped() -> None:
    grown_sets = set()
    for seed in range(8):
        model = square_model(W16)
        sp = Sparsity(model, method="set", seed=seed, **HAND_OPTIONS)
        t = sp.tensors[0]
        install_mask(t, ACTIVE16)
        one_step(model, sp, torch.ones(2, 4), torch.ones(2, 4))
        grown = indices(t.forward_mask) - ACTIVE16
        assert len(grown) == 2 and grown <= INACTIVE16
        grown_sets.add(frozenset(grown))
    assert len(grown_sets) > 1  # random regrowth, not a fixed rule


# -- RigL, hand-worked --------------------------------------------------------------------------

# Batch x = [1, -2, 3, 0.5] and loss sum(y * c) with c = [3, -4, 2.5, 2]: dL/dW_ij = c_i x_j, so
#   |dL/dW| = row 0:   3    6    9   1.5        (idx 0..3)
#             row 1:   4    8   12   2          (idx 4..7)
#             row 2: 2.5    5  7.5   1.25       (idx 8..11)
#             row 3:   2    4    6   1          (idx 12..15)
# Among the previously inactive {1:6, 3:1.5, 4:4, 6:12, 9:5, 10:7.5, 12:2, 15:1} the top two are
# idx 6 (12) and idx 10 (7.5). Traps: active idx 2 (9) and just-dropped idx 5 (8) beat idx 10.
RIGL_X = torch.tensor([[1.0, -2.0, 3.0, 0.5]])
RIGL_C = torch.tensor([[3.0, -4.0, 2.5, 2.0]])
RIGL_ABS_GRAD = torch.tensor(
    [[3.0, 6.0, 9.0, 1.5], [4.0, 8.0, 12.0, 2.0], [2.5, 5.0, 7.5, 1.25], [2.0, 4.0, 6.0, 1.0]]
)
RIGL_GROWN = {6, 10}


def dense_reference_gradient(weight: Tensor, active: set[int], x: Tensor, c: Tensor) -> Tensor:
    """dL/dW of a plain Linear holding the masked weights (an independent autograd reference)."""
    ref = nn.Linear(4, 4, bias=False)
    with torch.no_grad():
        ref.weight.copy_(weight * mask_of(active, (4, 4)))
    (ref(x) * c).sum().backward()
    assert ref.weight.grad is not None
    return ref.weight.grad


@pytest.mark.parametrize("chunk", [1 << 20, 4, 8])
def test_rigl_hand_worked_grows_top_dense_gradient(chunk: int) -> None:
    reference = dense_reference_gradient(W16, ACTIVE16, RIGL_X, RIGL_C)
    assert torch.equal(reference.abs(), RIGL_ABS_GRAD)
    assert top_indices(reference.abs(), mask_of(INACTIVE16, (4, 4)), 2) == RIGL_GROWN

    model = square_model(W16)
    sp = Sparsity(model, method="rigl", gradient_chunk_elements=chunk, **HAND_OPTIONS)
    t = sp.tensors[0]
    install_mask(t, ACTIVE16)
    one_step(model, sp, RIGL_X, RIGL_C)

    new = indices(t.forward_mask)
    assert torch.equal(t.forward_mask, t.grad_mask)
    assert ACTIVE16 - new == DROPPED16
    assert new - ACTIVE16 == RIGL_GROWN
    flat = t.weight.detach().reshape(-1)
    assert all(flat[i].item() == 0.0 for i in DROPPED16 | RIGL_GROWN)


@pytest.mark.parametrize("chunk", [1 << 20, 4, 8])
def test_rigl_ties_break_by_lower_index(chunk: int) -> None:
    # x = c = ones: every |dL/dW_ij| = 1, so the two lowest inactive indices win: 1 and 3.
    model = square_model(W16)
    sp = Sparsity(model, method="rigl", gradient_chunk_elements=chunk, **HAND_OPTIONS)
    t = sp.tensors[0]
    install_mask(t, ACTIVE16)
    one_step(model, sp, torch.ones(1, 4), torch.ones(1, 4))
    assert indices(t.forward_mask) == KEPT16 | {1, 3}


# -- DynSparse block norms, hand-worked -----------------------------------------------------------

# A 4 x 8 weight on a 2 x 4 grid of 2 x 2 blocks (sparsity 0.5: 4 of 8 blocks active).
# Active blocks [a b; c d] and their norms:
#   M at (0,1): [1.5 -1; 0.5 -0.5]   L1 3.5  L2 sqrt(3.75) = 1.936  Linf 1.5
#   Q at (0,3): [-3 0; 0 0]          L1 3    L2 3                   Linf 3
#   P at (1,0): [1.25 -1.25; -1.25 1.25]  L1 5  L2 2.5              Linf 1.25
#   K at (1,2): [4 -4; 4 4]          L1 16   L2 8                   Linf 4
# Dropping one block (drop fraction 0.25 of 4): L1 drops Q, L2 drops M, Linf drops P.
# The inactive blocks (0,0), (0,2), (1,1), (1,3) hold small values (smaller than every active
# block, so ranking them by mistake would change the answer).
W48 = torch.tensor(
    [
        [0.1, 0.2, 1.5, -1.0, 0.2, 0.0, -3.0, 0.0],
        [-0.1, 0.3, 0.5, -0.5, 0.0, 0.1, 0.0, 0.0],
        [1.25, -1.25, -0.3, 0.1, 4.0, -4.0, 0.05, 0.0],
        [-1.25, 1.25, 0.0, 0.0, 4.0, 4.0, 0.0, -0.2],
    ]
)
ACTIVE_BLOCKS = {(0, 1), (0, 3), (1, 0), (1, 2)}
INACTIVE_BLOCKS = {(0, 0), (0, 2), (1, 1), (1, 3)}
DROPPED_BLOCK = {"l1": (0, 3), "l2": (0, 1), "linf": (1, 0)}


def block_set(grid: Tensor) -> set[tuple[int, int]]:
    return {(int(r), int(c)) for r, c in grid.nonzero().tolist()}


@pytest.mark.parametrize("norm", ["l1", "l2", "linf"])
def test_dynsparse_block_norm_picks_the_pruned_block(norm: str) -> None:
    grid = torch.zeros(2, 4, dtype=torch.bool)
    for r, c in ACTIVE_BLOCKS:
        grid[r, c] = True
    model = square_model(W48)
    sp = Sparsity(model, method="dynsparse", block_size=2, block_norm=norm, seed=1,
                  **HAND_OPTIONS)  # fmt: skip
    t = sp.tensors[0]
    assert t.block_shape == (2, 4) and t.forward_count == 4
    full = expand_blocks(grid, 2, (4, 8))
    set_masks(t, full, full.clone())
    one_step(model, sp, torch.ones(2, 8), torch.ones(2, 4))

    new = block_set(collapse_blocks(t.forward_mask, 2))
    assert torch.equal(t.forward_mask, t.grad_mask)
    assert torch.equal(expand_blocks(collapse_blocks(t.forward_mask, 2), 2, (4, 8)), t.forward_mask)
    assert ACTIVE_BLOCKS - new == {DROPPED_BLOCK[norm]}
    grown = new - ACTIVE_BLOCKS
    assert len(grown) == 1 and grown <= INACTIVE_BLOCKS
    weight = t.weight.detach()
    for r, c in {DROPPED_BLOCK[norm]} | grown:
        assert bool((weight[2 * r : 2 * r + 2, 2 * c : 2 * c + 2] == 0).all()), (r, c)
    for r, c in (ACTIVE_BLOCKS | INACTIVE_BLOCKS) - {DROPPED_BLOCK[norm]} - grown:
        tile = (slice(2 * r, 2 * r + 2), slice(2 * c, 2 * c + 2))
        assert torch.equal(weight[tile], W48[tile]), (r, c)


# -- GMP, hand-worked ---------------------------------------------------------------------------

# Magnitudes 1..16 in a scrambled order (flat index -> |w|):
#   0:7 1:16 2:2 3:11 4:5 5:14 6:1 7:9 8:13 9:4 10:10 11:3 12:15 13:8 14:12 15:6
W_GMP = torch.tensor(
    [
        [7.0, -16.0, 2.0, 11.0],
        [-5.0, 14.0, -1.0, 9.0],
        [13.0, -4.0, 10.0, -3.0],
        [-15.0, 8.0, 12.0, -6.0],
    ]
)
# Final sparsity 0.75 (d_f = 0.25), t0 = 0, t_end = 4, interval 1. Density at update u:
#   d_u = 0.25 + 0.75 * (1 - u/4)^3
#   u=1: 0.25 + 0.75 * 27/64 = 0.56640625 -> 16 * d = 9.0625 -> 9
#   u=2: 0.25 + 0.75 * 1/8   = 0.34375    -> 5.5 -> round-half-even 6
#   u=3: 0.25 + 0.75 * 1/64  = 0.26171875 -> 4.1875 -> 4
#   u=4: 0.25                              -> 4, and no update afterwards.
# Kept sets (largest magnitudes): 9 -> |w| >= 8, 6 -> |w| >= 11, 4 -> |w| >= 13.
GMP_EXPECTED = [
    {1, 12, 5, 8, 14, 3, 10, 7, 13},  # after step 0 (u = 1)
    {1, 12, 5, 8, 14, 3},  # u = 2
    {1, 12, 5, 8},  # u = 3
    {1, 12, 5, 8},  # u = 4 (= t_end)
    {1, 12, 5, 8},  # u = 5: past t_end
    {1, 12, 5, 8},
]


def test_gmp_hand_worked_cubic_schedule() -> None:
    model = square_model(W_GMP)
    sp = Sparsity(model, method="gmp", sparsity=0.75, update_interval=1, start_step=0,
                  stop_step=4)  # fmt: skip
    t = sp.tensors[0]
    assert bool(t.forward_mask.all())  # starts dense (initial_sparsity 0)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    x = torch.ones(2, 4)
    for step, expected in enumerate(GMP_EXPECTED):
        model(x).sum().backward()
        opt.step()
        opt.zero_grad()
        sp.step(step, opt)
        assert indices(t.forward_mask) == expected, step
        assert torch.equal(t.forward_mask, t.grad_mask)
        flat = t.weight.detach().reshape(-1)
        for i in range(16):
            assert flat[i].item() == (W_GMP.reshape(-1)[i].item() if i in expected else 0.0)


@pytest.mark.parametrize("block", [1, 2])
def test_gmp_keeps_largest_among_previously_kept(block: int) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    sp = Sparsity(model, method="gmp", sparsity=0.8, block_size=block, update_interval=1,
                  stop_step=5)  # fmt: skip
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    gen = torch.Generator().manual_seed(0)
    previous = {t.name: collapse_blocks(t.forward_mask, block).clone() for t in sp.tensors}
    for step in range(7):
        x, y = torch.randn(8, 8, generator=gen), torch.randn(8, 4, generator=gen)
        F.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        scores = {t.name: block_norms(t.weight, block, "l1").clone() for t in sp.tensors}
        sp.step(step, opt)
        for t in sp.tensors:
            grid = collapse_blocks(t.forward_mask, block)
            u = step + 1
            density = 0.2 + 0.8 * (1 - min(u, 5) / 5) ** 3
            count = max(1, round(density * t.num_blocks))
            assert int(grid.sum()) == count, (step, t.name)
            assert indices(grid) == top_indices(scores[t.name], previous[t.name], count)
            assert indices(grid) <= indices(previous[t.name])
            assert bool((t.weight.detach()[~t.forward_mask] == 0).all())
            previous[t.name] = grid.clone()


# -- invariants over every method -----------------------------------------------------------------

TOTAL_STEPS = 12
METHOD_OPTIONS: dict[str, dict[str, Any]] = {
    "set": {"update_interval": 2},
    "rigl": {"update_interval": 2},
    "dynsparse": {"num_updates": 6},
    "gmp": {"stop_step": 6, "update_interval": 2},
}


def tile_model(seed: int = 0) -> nn.Sequential:
    """Two sparse layers that tile into 16 x 16 blocks: weights (64, 32) and (32, 64)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32))


def tile_batch(step: int) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(500 + step)
    return torch.randn(8, 32, generator=gen), torch.randn(8, 32, generator=gen)


def train_step(model: nn.Module, sp: Sparsity, opt: torch.optim.Optimizer, step: int) -> None:
    x, y = tile_batch(step)
    (F.mse_loss(model(x), y) + sp.regularizer()).backward()
    opt.step()
    opt.zero_grad()
    sp.step(step, opt)


def expected_blocks(method: str, sparsity: float, num_blocks: int, upcoming: int) -> int:
    """Forward blocks held for optimizer step ``upcoming`` (gmp: updates at 2, 4 and t_end 6)."""
    density = 1.0 - sparsity
    if method == "gmp":
        done = [u for u in (2, 4, 6) if u <= upcoming]
        if not done:
            return num_blocks
        density = (1 - sparsity) + sparsity * (1 - max(done) / 6) ** 3
    return max(1, round(density * num_blocks))


@pytest.mark.parametrize("block", [1, 4, 16])
@pytest.mark.parametrize("sparsity", [0.5, 0.9])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_exact_counts_alignment_and_a_within_b(method: str, sparsity: float, block: int) -> None:
    model = tile_model()
    sp = Sparsity(model, method=method, sparsity=sparsity, block_size=block,
                  total_steps=TOTAL_STEPS, **METHOD_OPTIONS.get(method, {}))  # fmt: skip
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    changed = 0
    for step in range(TOTAL_STEPS):
        before = [t.forward_mask.clone() for t in sp.tensors]
        train_step(model, sp, opt, step)
        for t, old in zip(sp.tensors, before, strict=True):
            a, b = t.forward_mask, t.grad_mask
            num_blocks = a.numel() // (block * block)
            target = expected_blocks(method, sparsity, num_blocks, step + 1)
            assert int(torch.count_nonzero(a)) == target * block * block, (step, t.name)
            grid = collapse_blocks(a, block)
            assert torch.equal(expand_blocks(grid, block, a.shape), a), (step, t.name)
            assert torch.equal(expand_blocks(collapse_blocks(b, block), block, b.shape), b)
            assert bool((a & ~b).sum() == 0), (step, t.name)
            if method == "topkast":
                backward = max(1, round(min(1.0, 2 * (1 - sparsity)) * num_blocks))
                assert int(torch.count_nonzero(b)) == backward * block * block
            else:
                assert torch.equal(a, b)
            changed += int(not torch.equal(a, old))
    if method in ("set", "rigl", "dynsparse", "gmp") and block < 16:
        assert changed > 0  # the schedule really did update the masks


# -- a dropped unit is never regrown by the same update ------------------------------------------

PRUNE_REGROW = ["set", "rigl", "dynsparse"]


@pytest.mark.parametrize("block", [1, 4])
@pytest.mark.parametrize("method", PRUNE_REGROW)
def test_update_drops_and_grows_exactly_n_drop_disjoint_units(method: str, block: int) -> None:
    model = tile_model()
    sp = Sparsity(model, method=method, sparsity=0.5, block_size=block, total_steps=TOTAL_STEPS,
                  update_interval=2, drop_fraction=0.3, drop_schedule="constant")  # fmt: skip
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    updates = 0
    for step in range(TOTAL_STEPS):
        x, y = tile_batch(step)
        F.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        old = {t.name: collapse_blocks(t.forward_mask, block).clone() for t in sp.tensors}
        scores = {t.name: block_norms(t.weight, block, "l1").clone() for t in sp.tensors}
        sp.step(step, opt)
        if not sp.method.schedule.is_update(step + 1):
            for t in sp.tensors:
                assert torch.equal(collapse_blocks(t.forward_mask, block), old[t.name])
            continue
        updates += 1
        for t in sp.tensors:
            new = collapse_blocks(t.forward_mask, block)
            was = old[t.name]
            dropped, grown = was & ~new, new & ~was
            n_active = int(was.sum())
            n_drop = min(round(0.3 * n_active), was.numel() - n_active)
            assert n_drop > 0
            # A unit dropped and regrown by the same update would vanish from both differences.
            assert int(dropped.sum()) == n_drop, (step, t.name)
            assert int(grown.sum()) == n_drop, (step, t.name)
            assert not bool((dropped & grown).any())
            assert not bool((grown & was).any())
            # The survivors are the n_active - n_drop largest block norms of the active units.
            kept = top_indices(scores[t.name], was, n_active - n_drop)
            assert indices(new & was) == kept, (step, t.name)
            changed = expand_blocks(dropped | grown, block, t.weight.shape)
            assert bool((t.weight.detach()[changed] == 0).all())
    assert updates == len([u for u in range(1, TOTAL_STEPS + 1) if sp.method.schedule.is_update(u)])
    assert updates >= 4


# -- RigL grows where the dense gradient is largest (random case, chunked) -----------------------


@pytest.mark.parametrize(("block", "chunk"), [(1, 1 << 20), (1, 64), (4, 1 << 20), (4, 100)])
def test_rigl_grows_top_dense_gradient_against_autograd_reference(block: int, chunk: int) -> None:
    model = tile_model().double()
    sp = Sparsity(model, method="rigl", sparsity=0.8, block_size=block, total_steps=TOTAL_STEPS,
                  update_interval=2, drop_fraction=0.3, drop_schedule="constant",
                  gradient_chunk_elements=chunk)  # fmt: skip
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    checked = 0
    for step in range(8):
        x, y = (v.double() for v in tile_batch(step))
        due = sp.method.schedule.is_update(step + 1)
        if due:
            # Independent reference: plain Linears holding theta * A; dense dL/d(theta * A).
            reference = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32)).double()
            with torch.no_grad():
                for i, t in zip((0, 2), sp.tensors, strict=True):
                    reference[i].weight.copy_(t.weight * t.forward_mask)
                    reference[i].bias.copy_(model[i].bias)
            F.mse_loss(reference(x), y).backward()
            dense = {
                t.name: reference[i].weight.grad for i, t in zip((0, 2), sp.tensors, strict=True)
            }
        F.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        old = {t.name: collapse_blocks(t.forward_mask, block).clone() for t in sp.tensors}
        sp.step(step, opt)
        if not due:
            continue
        for t in sp.tensors:
            was = old[t.name]
            grown = collapse_blocks(t.forward_mask, block) & ~was
            n_drop = min(round(0.3 * int(was.sum())), was.numel() - int(was.sum()))
            grad = dense[t.name]
            assert grad is not None
            expected = top_indices(block_norms(grad, block, "l1"), ~was, n_drop)
            assert indices(grown) == expected, (step, t.name)
            checked += 1
    assert checked == 8  # updates at u = 2, 4, 6, 8 (stop = 0.75 * 12 = 9), both layers


def conv_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, stride=2)
    ).double()


def test_rigl_on_conv_layers_grows_top_dense_gradient() -> None:
    """RigL supports Conv1d/2d/3d (capture.py); through Sparsity the layers are parametrized."""
    model = conv_model()
    sp = Sparsity(model, method="rigl", sparsity=0.5, total_steps=10, update_interval=1,
                  drop_fraction=0.3, drop_schedule="constant",
                  gradient_chunk_elements=64)  # fmt: skip
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(0)
    for step in range(3):
        x = torch.randn(2, 3, 6, 6, generator=gen, dtype=torch.float64)
        reference = conv_model()
        with torch.no_grad():
            for i, t in zip((0, 2), sp.tensors, strict=True):
                reference[i].weight.copy_(t.weight * t.forward_mask)
                reference[i].bias.copy_(model[i].bias)
        reference(x).square().mean().backward()
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
        old = [t.forward_mask.clone() for t in sp.tensors]
        sp.step(step, opt)
        for i, t, was in zip((0, 2), sp.tensors, old, strict=True):
            grad = reference[i].weight.grad
            assert grad is not None
            n_active = int(was.sum())
            n_drop = min(round(0.3 * n_active), was.numel() - n_active)
            grown = t.forward_mask & ~was
            assert indices(grown) == top_indices(grad.abs(), ~was, n_drop), (step, t.name)
            assert int(t.forward_mask.sum()) == n_active


# -- optimizer state reset ---------------------------------------------------------------------

STATE_KEYS = {"sgd": ["momentum_buffer"], "adam": ["exp_avg", "exp_avg_sq"],
              "adamw": ["exp_avg", "exp_avg_sq"]}  # fmt: skip


def make_optimizer(name: str, model: nn.Module) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=1e-2)
    return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)


@pytest.mark.parametrize("regrow_std", [0.0, 0.01])
@pytest.mark.parametrize("opt_name", ["sgd", "adam", "adamw"])
@pytest.mark.parametrize("method", PRUNE_REGROW)
def test_optimizer_state_reset_at_grown_and_dropped(
    method: str, opt_name: str, regrow_std: float
) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    sp = Sparsity(model, method=method, sparsity=0.5, total_steps=20, update_interval=2,
                  drop_fraction=0.3, drop_schedule="constant", regrow_std=regrow_std)  # fmt: skip
    opt = make_optimizer(opt_name, model)
    gen = torch.Generator().manual_seed(0)
    updates = 0
    for step in range(4):
        x, y = torch.randn(8, 16, generator=gen), torch.randn(8, 8, generator=gen)
        F.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        old = [t.forward_mask.clone() for t in sp.tensors]
        sp.step(step, opt)
        if not sp.method.schedule.is_update(step + 1):
            continue
        updates += 1
        for t, was in zip(sp.tensors, old, strict=True):
            grown = t.forward_mask & ~was
            dropped = was & ~t.forward_mask
            assert bool(grown.any()) and bool(dropped.any())
            state = opt.state[t.weight]
            for key in STATE_KEYS[opt_name]:
                assert bool((state[key][grown] == 0).all()), (step, t.name, key)
                assert bool((state[key][dropped] == 0).all()), (step, t.name, key)
                assert bool((state[key][~t.grad_mask] == 0).all()), (step, t.name, key)
                assert bool((state[key][t.grad_mask & was] != 0).any()), (step, t.name, key)
            weight = t.weight.detach()
            assert bool((weight[dropped] == 0).all())
            if regrow_std == 0.0:
                assert bool((weight[grown] == 0).all())
            else:
                assert bool((weight[grown] != 0).all())
                assert float(weight[grown].abs().max()) <= 2 * regrow_std
    assert updates == 2


@pytest.mark.parametrize("method", PRUNE_REGROW)
def test_adam_moments_start_fresh_at_grown_entries(method: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    sp = Sparsity(model, method=method, sparsity=0.5, total_steps=20, update_interval=2,
                  drop_fraction=0.3, drop_schedule="constant")  # fmt: skip
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.9, 0.999))
    gen = torch.Generator().manual_seed(0)
    grown: list[Tensor] = []
    grads: list[Tensor] = []
    for step in range(3):
        x, y = torch.randn(8, 16, generator=gen), torch.randn(8, 8, generator=gen)
        F.mse_loss(model(x), y).backward()
        if step == 2:  # the first step after the update at u = 2
            grads = [t.weight.grad.clone() for t in sp.tensors]  # type: ignore[union-attr]
        opt.step()
        opt.zero_grad()
        old = [t.forward_mask.clone() for t in sp.tensors]
        if step == 2:
            for t, g, entered in zip(sp.tensors, grads, grown, strict=True):
                state = opt.state[t.weight]
                torch.testing.assert_close(state["exp_avg"][entered], 0.1 * g[entered])
                torch.testing.assert_close(state["exp_avg_sq"][entered], 0.001 * g[entered] ** 2)
        sp.step(step, opt)
        if step == 1:
            grown = [t.forward_mask & ~w for t, w in zip(sp.tensors, old, strict=True)]
    assert all(bool(g.any()) for g in grown)


def test_unsupported_optimizer_raises_naming_supported_ones() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    sp = Sparsity(model, method="set", sparsity=0.5, total_steps=20, update_interval=1)
    opt = torch.optim.RMSprop(model.parameters(), lr=0.01)
    F.mse_loss(model(torch.randn(4, 16)), torch.randn(4, 8)).backward()
    opt.step()
    with pytest.raises(TypeError, match="RMSprop") as info:
        sp.step(0, opt)
    for name in ("torch.optim.SGD", "torch.optim.Adam", "torch.optim.AdamW"):
        assert name in str(info.value)


# -- reproducibility ---------------------------------------------------------------------------


def run(method: str, seed: int, steps: int = 8) -> tuple[list[Tensor], list[Tensor]]:
    model = tile_model(seed=0)
    sp = Sparsity(model, method=method, sparsity=0.75, seed=seed, total_steps=TOTAL_STEPS,
                  update_interval=2, drop_schedule="constant")  # fmt: skip
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
    for step in range(steps):
        train_step(model, sp, opt, step)
    return ([t.forward_mask.clone() for t in sp.tensors],
            [t.weight.detach().clone() for t in sp.tensors])  # fmt: skip


@pytest.mark.parametrize("method", PRUNE_REGROW)
def test_same_seed_same_masks_and_weights(method: str) -> None:
    masks1, weights1 = run(method, seed=7)
    masks2, weights2 = run(method, seed=7)
    assert all(torch.equal(a, b) for a, b in zip(masks1, masks2, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(weights1, weights2, strict=True))


@pytest.mark.parametrize("method", ["set", "dynsparse"])
def test_different_seed_different_masks(method: str) -> None:
    masks1, _ = run(method, seed=7)
    masks2, _ = run(method, seed=8)
    assert all(not torch.equal(a, b) for a, b in zip(masks1, masks2, strict=True))


# -- explored degrees of freedom ----------------------------------------------------------------


def explore(method: str, **options: Any) -> tuple[Sparsity, dict[str, Tensor]]:
    model = tile_model()
    sp = Sparsity(model, method=method, sparsity=0.5, total_steps=TOTAL_STEPS, **options)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    ever = {t.name: t.forward_mask.clone() for t in sp.tensors}
    for step in range(TOTAL_STEPS):
        train_step(model, sp, opt, step)
        for t in sp.tensors:
            ever[t.name] |= t.forward_mask
    return sp, ever


EXPLORE_OPTIONS: dict[str, dict[str, Any]] = {
    "static": {},
    "topkast": {},
    "set": {"update_interval": 2, "drop_schedule": "constant"},
    "rigl": {"update_interval": 2, "drop_schedule": "constant"},
    "dynsparse": {"update_interval": 2},
    "gmp": {"update_interval": 2, "stop_step": 6},
}


def test_static_explores_exactly_its_density() -> None:
    sp, _ = explore("static")
    dof = sp.explored_dof()
    assert dof == {"0.weight": 0.5, "2.weight": 0.5, "total": 0.5}


@pytest.mark.parametrize("method", ["set", "dynsparse"])
def test_random_regrowth_increases_explored_dof(method: str) -> None:
    sp, _ = explore(method, **EXPLORE_OPTIONS[method])
    dof = sp.explored_dof()
    assert dof["total"] > 0.6
    assert all(dof[t.name] > 0.6 for t in sp.tensors)


@pytest.mark.parametrize("method", sorted(EXPLORE_OPTIONS))
def test_explored_dof_equals_union_of_recorded_masks(method: str) -> None:
    sp, ever = explore(method, **EXPLORE_OPTIONS[method])
    dof = sp.explored_dof()
    ever_count = sum(int(m.sum()) for m in ever.values())
    total = sum(m.numel() for m in ever.values())
    assert dof["total"] == pytest.approx(ever_count / total, abs=1e-12)
    for name, mask in ever.items():
        assert dof[name] == pytest.approx(int(mask.sum()) / mask.numel(), abs=1e-12)


# -- defaults and option errors -------------------------------------------------------------------


@pytest.mark.parametrize(("block", "n"), [(1, 160), (16, 80)])
def test_dynsparse_default_number_of_updates(block: int, n: int) -> None:
    sp = Sparsity(tile_model(), method="dynsparse", sparsity=0.9, block_size=block,
                  total_steps=1600)  # fmt: skip
    schedule = sp.method.schedule
    assert schedule == UpdateSchedule(interval=1600 // n, start=0, stop=1600, drop_fraction=0.5,
                                      decay="cosine")  # fmt: skip
    # Algorithm 1: n training phases of T / n steps, n - 1 sparsity updates inside the run.
    assert len(schedule.update_steps()) == n - 1
    assert schedule.update_steps()[:2] == [1600 // n, 2 * (1600 // n)]


@pytest.mark.parametrize("method", ["set", "rigl"])
def test_set_and_rigl_defaults(method: str) -> None:
    sp = Sparsity(tile_model(), method=method, sparsity=0.9, total_steps=1000)
    assert sp.method.schedule == UpdateSchedule(interval=100, start=0, stop=750,
                                                drop_fraction=0.3, decay="cosine")  # fmt: skip
    assert sp.method.schedule.update_steps() == [100, 200, 300, 400, 500, 600, 700]
    assert sp.method.regrow_std == 0.0


@pytest.mark.parametrize("method", ["set", "rigl", "dynsparse", "gmp"])
def test_missing_total_steps_raises(method: str) -> None:
    model = tile_model()
    with pytest.raises(ValueError, match="total_steps"):
        Sparsity(model, method=method, sparsity=0.9)
    # The failed construction left the model untouched.
    Sparsity(model, method=method, sparsity=0.9, total_steps=100)


def test_explicit_stop_and_interval_need_no_total_steps() -> None:
    sp = Sparsity(tile_model(), method="set", sparsity=0.9, stop_step=50, update_interval=10)
    assert sp.method.schedule.update_steps() == [10, 20, 30, 40]
    sp = Sparsity(tile_model(), method="dynsparse", sparsity=0.9, stop_step=30, update_interval=5)
    assert sp.method.schedule.update_steps() == [5, 10, 15, 20, 25]
    sp = Sparsity(tile_model(), method="gmp", sparsity=0.9, stop_step=30)
    assert sp.method.stop == 30


@pytest.mark.parametrize("method", PRUNE_REGROW)
def test_update_interval_and_num_updates_together_raise(method: str) -> None:
    with pytest.raises(ValueError, match="not both"):
        Sparsity(tile_model(), method=method, sparsity=0.9, total_steps=100, update_interval=5,
                 num_updates=10)  # fmt: skip


@pytest.mark.parametrize("method", ["set", "rigl"])
def test_num_updates_alone(method: str) -> None:
    sp = Sparsity(tile_model(), method=method, sparsity=0.9, total_steps=100, num_updates=10)
    assert sp.method.schedule.interval == 10
    assert sp.method.schedule.stop == 75
    default = Sparsity(tile_model(), method=method, sparsity=0.9, total_steps=1000)
    assert default.method.schedule.interval == 100


# -- DynSparse truncated-normal initialisation --------------------------------------------------


def test_dynsparse_init_std_truncated_normal() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256))
    bias = model[0].bias.detach().clone()
    sp = Sparsity(model, method="dynsparse", sparsity=0.5, total_steps=100, init_std=0.02)
    t = sp.tensors[0]
    theta = t.weight.detach()
    assert float(theta.abs().max()) <= 0.04
    active = theta[t.forward_mask]
    assert active.numel() == 32768
    # Std of N(0, s^2) truncated to [-2s, 2s]: s * sqrt(1 - 2 * 2 phi(2) / (2 Phi(2) - 1)).
    phi2 = math.exp(-2.0) / math.sqrt(2 * math.pi)
    factor = math.sqrt(1 - 4 * phi2 / math.erf(2 / math.sqrt(2)))
    assert factor == pytest.approx(0.8796, abs=1e-4)
    assert float(active.std()) == pytest.approx(0.02 * factor, rel=0.02)
    assert float(theta.std()) == pytest.approx(0.02 * factor, rel=0.02)
    assert abs(float(active.mean())) < 1e-3
    assert torch.equal(model[0].bias.detach(), bias)  # only the sparse weight is redrawn
