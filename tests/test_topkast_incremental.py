"""Top-KAST's incremental refresh (alwayssparse.ranking) against the full exact top-k.

Long random runs with many ties: every refresh's A and B must equal the exact top-k of the current
theta (score, then lower position), per tensor and globally, unstructured and in blocks, on the
masked and the sparse backend; and a run with the incremental refresh must match, bit for bit,
one whose storages hide their reservoir token (so that every refresh ranks the whole grid).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from alwayssparse import Sparsity
from alwayssparse.backends.sparse import SparseLinear
from alwayssparse.masks import block_norms, count_for_density, global_topk_masks, topk_mask
from alwayssparse.methods import TopKAST
from alwayssparse.ranking import RankedReservoir, key_positions, rank_keys
from alwayssparse.sparse_tensor import TensorsKey, UnitStorage, write_units

# -- the ranking alone ---------------------------------------------------------------------------


def _top(keys: np.ndarray, k: int) -> set[int]:
    return set(np.sort(keys)[::-1][:k].tolist())


def test_rank_keys_order_is_score_then_lower_position() -> None:
    scores = torch.tensor([0.5, 0.25, 0.5, 0.0, -0.0, 1.0])
    keys = rank_keys(scores, np.arange(6))
    assert keys is not None
    assert list(np.argsort(keys)[::-1]) == [5, 0, 2, 1, 3, 4]
    assert list(key_positions(keys)) == list(range(6))
    assert rank_keys(torch.tensor([float("nan")]), np.arange(1)) is None
    assert rank_keys(torch.tensor([1.0], dtype=torch.float64), np.arange(1)) is None


def test_ranked_reservoir_matches_brute_force_over_long_random_runs() -> None:
    rng = np.random.default_rng(0)
    incremental = 0
    for _ in range(12):
        n = int(rng.integers(30, 2000))
        count_b = int(rng.integers(1, n))
        count_a = int(rng.integers(1, count_b + 1))
        levels = int(rng.integers(2, 40))  # few distinct scores: many ties
        scores = (rng.integers(0, levels, n) / levels).astype(np.float32)
        positions = np.arange(n)
        keys = rank_keys(torch.from_numpy(scores), positions)
        assert keys is not None
        b, a = _top(keys, count_b), _top(keys, count_a)
        in_b = np.isin(keys, list(b))
        size = int(rng.integers(1, n - count_b + 1))
        ranking = RankedReservoir.build(keys[~in_b], size)
        for _ in range(100):
            where = np.flatnonzero(in_b)  # only B's scores move
            moved = scores[where] + rng.normal(0, 0.05, where.size).astype(np.float32)
            scores[where] = np.maximum(0, np.round(moved * levels) / levels)
            keys = rank_keys(torch.from_numpy(scores), positions)
            assert keys is not None
            in_a = np.isin(keys, list(a))
            if rng.random() < 0.05:  # the counts may change (exploration stops, or restarts)
                count_b = int(rng.integers(1, n))
                count_a = int(rng.integers(1, count_b + 1))
            selection = ranking.select(keys[where], in_a[where], count_b, count_a)
            b, a = _top(keys, count_b), _top(keys, count_a)
            if selection is None:  # not decidable from the frontier: rank in full
                in_b = np.isin(keys, list(b))
                ranking = RankedReservoir.build(keys[~in_b], size)
                continue
            incremental += 1
            kept = keys[where][selection.keep]
            assert set(kept.tolist()) | set(selection.entering.tolist()) == b
            new_a = set(kept[selection.keep_in_a].tolist())
            new_a |= set(selection.entering[selection.entering_in_a].tolist())
            assert new_a == a
            in_b = np.isin(keys, list(b))
            reservoir = np.sort(keys[~in_b])[::-1]
            frontier = ranking.frontier
            assert np.array_equal(reservoir[: frontier.size], frontier)  # a prefix of C's order
            if ranking.floor >= 0:
                assert (reservoir[frontier.size :] < ranking.floor).all()
    assert incremental > 600


@pytest.mark.parametrize(
    ("runs", "steps", "sizes", "distinct", "noise", "least"),
    [(10, 80, (30, 1500), False, 0.05, 500), (3, 30, (8000, 20000), True, 0.3, 30)],
    ids=["small-with-ties", "large-continuous"],
)
def test_compiled_selection_equals_the_numpy_one_over_long_random_runs(
    runs: int, steps: int, sizes: tuple[int, int], distinct: bool, noise: float, least: int
) -> None:
    """RankedReservoir.select_compiled (kernels.topkast_select) decides exactly when select
    does, selects the same B and A, reports the same crossings and leaves the same frontier.
    Small grids with few score levels (ties everywhere, one histogram bucket holding most
    keys); large ones with scores over many octaves, where thousands of units cross B's
    boundary per refresh (the radix-sorted lists)."""
    from alwayssparse import kernels

    if kernels.available_backend() != "cpp":
        pytest.skip("needs the compiled kernels")
    rng = np.random.default_rng(1)
    compared = 0
    crossed: list[int] = []
    for _ in range(runs):
        n = int(rng.integers(*sizes))
        count_b = int(rng.integers(1, n))
        count_a = int(rng.integers(1, count_b + 1))
        levels = 2**20 if distinct else int(rng.integers(2, 40))
        if distinct:
            scores = rng.lognormal(-3.0, 2.0, n).astype(np.float32)
        else:
            scores = (rng.integers(0, levels, n) / levels).astype(np.float32)
        positions = np.arange(n) * 3 + 5  # not 0 .. n-1: positions are what keys encode
        keys = rank_keys(torch.from_numpy(scores), positions)
        assert keys is not None
        in_b = np.isin(keys, list(_top(keys, count_b)))
        in_a = np.isin(keys, list(_top(keys, count_a)))
        size = int(rng.integers(1, n - count_b + 1))
        reference = RankedReservoir.build(keys[~in_b], size)
        compiled = RankedReservoir.build(keys[~in_b], size)
        for _ in range(steps):
            where = np.flatnonzero(in_b)
            if distinct:  # relative moves: units near B's boundary cross it
                moved = scores[where] * np.exp(rng.normal(0, noise, where.size))
                scores[where] = moved.astype(np.float32)
            else:
                moved = scores[where] + rng.normal(0, noise, where.size).astype(np.float32)
                scores[where] = np.maximum(0, np.round(moved * levels) / levels)
            keys = rank_keys(torch.from_numpy(scores), positions)
            assert keys is not None
            if rng.random() < 0.05:
                count_b = int(rng.integers(1, n))
                count_a = int(rng.integers(1, count_b + 1))
            selection = reference.select(keys[where], in_a[where], count_b, count_a)
            refresh = compiled.select_compiled(
                torch.from_numpy(scores[where]), torch.from_numpy(positions[where]),
                torch.from_numpy(in_a[where]), count_b, count_a,
            )  # fmt: skip
            assert (selection is None) == (refresh is None)
            if selection is None or refresh is None:
                in_b = np.isin(keys, list(_top(keys, count_b)))
                in_a = np.isin(keys, list(_top(keys, count_a)))
                reference = RankedReservoir.build(keys[~in_b], size)
                compiled = RankedReservoir.build(keys[~in_b], size)
                continue
            compared += 1
            assert np.array_equal(compiled.frontier, reference.frontier)
            new_b = np.isin(keys, list(_top(keys, count_b)))
            new_a = np.isin(keys, list(_top(keys, count_a)))
            assert np.array_equal(refresh.units, positions[new_b])
            assert np.array_equal(refresh.in_a, new_a[new_b])
            assert np.array_equal(refresh.entered, positions[new_b & ~in_b])
            assert np.array_equal(refresh.left, positions[in_b & ~new_b])
            assert np.array_equal(refresh.entered_a, positions[new_a & ~in_a])
            assert np.array_equal(refresh.left_a, positions[in_a & ~new_a])
            crossed.append(int(refresh.entered.size))
            in_b, in_a = new_b, new_a
    assert compared > least
    if distinct:
        assert max(crossed) > 1000  # the radix sorts' path (from 512 entries) was taken
    # Scores without keys: the caller ranks in full.
    ranking = RankedReservoir.build(np.zeros(0, dtype=np.int64), 0)
    one = torch.ones(1, dtype=torch.bool)
    for bad in (float("nan"), -1.0):
        assert ranking.select_compiled(torch.tensor([bad]), torch.zeros(1, dtype=torch.long),
                                       one, 1, 1) is None  # fmt: skip
    with pytest.raises(RuntimeError, match="strictly ascending"):
        ranking.select_compiled(torch.ones(2), torch.tensor([3, 1]), one.repeat(2), 1, 1)


# -- through Sparsity, both backends --------------------------------------------------------------


def make_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 48), nn.ReLU(),
                          nn.Linear(48, 16))  # fmt: skip
    with torch.no_grad():  # few distinct magnitudes: ties everywhere, also inside the reservoir
        for p in model.parameters():
            p.copy_(torch.round(p * 16) / 16)
    return model


def dense_theta(t: Any) -> Tensor:
    """Theta of the whole tensor, read without writing anything (no reservoir sync)."""
    layer = t.module
    if isinstance(layer, SparseLinear):
        theta = layer.reservoir.clone()
        slots = layer.unit_slots()
        write_units(theta, layer.units[slots].long(), layer.block, layer.tiles().detach()[slots])
        return theta
    return t.weight.detach().clone()


def expected_masks(sp: Sparsity, explore: bool) -> dict[str, tuple[Tensor, Tensor]]:
    """The full exact top-k of the current theta (on the block grid)."""
    tensors = sp.tensors
    scores = [block_norms(dense_theta(t), t.block, t.block_norm) for t in tensors]
    forward = [t.forward_count for t in tensors]
    backward = [t.backward_count if explore else t.forward_count for t in tensors]
    if sp.method.selection == "global":
        a, b = global_topk_masks(scores, sum(forward)), global_topk_masks(scores, sum(backward))
    else:
        a = [topk_mask(s, k) for s, k in zip(scores, forward, strict=True)]
        b = [topk_mask(s, k) for s, k in zip(scores, backward, strict=True)]
    return {t.name: (t.expand(x), t.expand(y)) for t, x, y in zip(tensors, a, b, strict=True)}


def run(
    backend: str, steps: int, full: bool = False, check: bool = True, **options: Any
) -> dict[str, Any]:
    model = make_model()
    block = options.pop("block_size", 1)
    sp = Sparsity(model, method="topkast", sparsity=0.8, backward_sparsity=0.6,
                  backend=backend, block_size=block, exploration_coefficient=1e-2,
                  seed=3, **options)  # fmt: skip
    method = sp.method
    assert isinstance(method, TopKAST)
    if full:  # hide the reservoir tokens: every refresh ranks the whole grid
        for t in sp.tensors:
            t.storage.reservoir_token = lambda: None  # type: ignore[method-assign]
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-2, weight_decay=0.05)
    generator = torch.Generator().manual_seed(4)
    losses, masks, changes = [], [], 0
    for step in range(steps):
        x = torch.randn(32, 32, generator=generator)
        y = torch.randn(32, 16, generator=generator)
        loss = F.mse_loss(model(x), y) + sp.regularizer()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():  # keep magnitudes on a coarse grid: ties between B and C
            for t in sp.tensors:
                t.weight.copy_(torch.round(t.weight * 64) / 64)
        before = {n: (a.clone(), b.clone()) for n, (a, b) in sp.masks().items()}
        sp.step(step, optimizer)
        after = {n: (a.clone(), b.clone()) for n, (a, b) in sp.masks().items()}
        changes += sum(not torch.equal(after[n][1], before[n][1]) for n in after)
        if check and (step + 1) % method.refresh_interval == 0:  # a refresh (not a stop)
            expected = expected_masks(sp, method.exploring(step + 1))
            for name, (a, b) in after.items():
                assert torch.equal(a, expected[name][0]), (step, name, "A")
                if not method.random_exploration:  # else B\A is drawn at random
                    assert torch.equal(b, expected[name][1]), (step, name, "B")
        for t in sp.tensors:  # the regulariser's coefficients, patched at changed units only
            cached = method._coefficient_cache.get(t.name)
            if cached is not None and cached[1].shape == t.shape and method.updates_at(step):
                a, b = t.forward_mask, t.grad_mask
                fresh = a.to(t.weight.dtype) + (b & ~a).to(t.weight.dtype) / t.density
                assert cached[0] == TensorsKey((a, b)), "patched, not rebuilt"
                assert torch.equal(cached[1], fresh), (step, t.name)
        losses.append(loss.item())
        masks.append(after)
    return {"losses": losses, "masks": masks, "method": method, "changes": changes}


CASES = [
    ("masked", {"refresh_interval": 1}),
    ("masked", {"refresh_interval": 3, "selection": "global"}),
    ("masked", {"refresh_interval": 1, "block_size": 4, "block_norm": "l2"}),
    ("masked", {"refresh_interval": 2, "block_size": 4, "selection": "global"}),
    ("sparse", {"refresh_interval": 1}),
    ("sparse", {"refresh_interval": 1, "block_size": 4}),
    ("sparse", {"refresh_interval": 4, "block_size": 8, "block_norm": "linf"}),
]


NUMPY_CASES = [CASES[0], CASES[3], CASES[5]]


@pytest.mark.parametrize(
    ("backend", "options", "compiled"),
    [(*case, True) for case in CASES] + [(*case, False) for case in NUMPY_CASES],
)
def test_incremental_refresh_is_the_exact_top_k(
    backend: str, options: dict[str, Any], compiled: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the compiled selection (where the kernels are built) and through numpy."""
    import alwayssparse.methods.topkast as topkast_module

    if compiled and not topkast_module.compiled_selection():
        pytest.skip("needs the compiled kernels")
    if not compiled:
        monkeypatch.setattr(topkast_module, "compiled_selection", lambda: False)
    result = run(backend, steps=150, **options)
    method = result["method"]
    assert result["changes"] > 20  # the topology really moved
    assert method.refresh_counts["incremental"] > 4 * method.refresh_counts["full"]


@pytest.mark.parametrize("backend", ["masked", "sparse"])
@pytest.mark.parametrize(
    "options",
    [
        {"refresh_interval": 1, "exploration_stop_step": 40},
        {"refresh_interval": 3, "exploration_stop_step": 20},
        {"refresh_interval": 1, "random_exploration": True},
    ],
)
def test_incremental_run_matches_a_full_ranking_run(backend: str, options: dict[str, Any]) -> None:
    incremental = run(backend, steps=80, **options)
    full = run(backend, steps=80, full=True, check=False, **options)
    assert incremental["losses"] == full["losses"]
    for step, (a, b) in enumerate(zip(incremental["masks"], full["masks"], strict=True)):
        for name in a:
            assert torch.equal(a[name][0], b[name][0]), (step, name)
            assert torch.equal(a[name][1], b[name][1]), (step, name)
    counts = incremental["method"].refresh_counts
    if options.get("random_exploration"):
        assert counts["incremental"] == 0  # drawn afresh every refresh: always in full
    else:
        assert counts["incremental"] > counts["full"]


def test_external_writes_outside_b_force_a_full_ranking() -> None:
    """A checkpoint load changes theta outside B: the reservoir ranking must not be reused."""
    model = make_model()
    sp = Sparsity(model, method="topkast", sparsity=0.8, backward_sparsity=0.6, seed=3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-2)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(8, 32)
    for step in range(3):
        F.mse_loss(model(x), torch.zeros(8, 16)).backward()
        optimizer.step()
        optimizer.zero_grad()
        sp.step(step, optimizer)
    full = sp.method.refresh_counts["full"]
    original = next(t for t in sp.tensors)
    storage: UnitStorage = original.storage
    token = storage.reservoir_token()
    model.load_state_dict(state)
    assert storage.reservoir_token() != token
    F.mse_loss(model(x), torch.zeros(8, 16)).backward()
    optimizer.step()
    optimizer.zero_grad()
    sp.step(3, optimizer)
    assert sp.method.refresh_counts["full"] == full + len(sp.tensors)
    expected = expected_masks(sp, True)
    for name, (a, b) in sp.masks().items():
        assert torch.equal(a, expected[name][0]) and torch.equal(b, expected[name][1])


def test_counts_are_exact_for_the_expected_sizes() -> None:
    sp = Sparsity(make_model(), method="topkast", sparsity=0.8, backward_sparsity=0.6)
    for t in sp.tensors:
        n = t.num_blocks
        assert t.forward_count == count_for_density(n, 0.2)
        assert t.backward_count == count_for_density(n, 0.4)


# -- the sparse layer's index structures: compiled merge against the numpy patch ---------------


@pytest.mark.parametrize("block_size", [1, 4])
def test_compiled_merge_and_numpy_patch_build_the_same_layers(
    block_size: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The compiled one-merge rebuild of a sparse layer's index structures
    (kernels.topology_update) and the numpy patch give the same slots, values and products."""
    from alwayssparse import kernels

    if kernels.available_backend() != "cpp":
        pytest.skip("needs the compiled kernels")
    calls = []
    merge = kernels.topology_update
    monkeypatch.setattr(kernels, "topology_update", lambda *a: calls.append(1) or merge(*a))
    compiled = run("sparse", steps=40, refresh_interval=1, block_size=block_size)
    assert calls  # the merge ran
    monkeypatch.setattr(kernels, "topology_update", lambda *a: None)
    patched = run("sparse", steps=40, refresh_interval=1, block_size=block_size)
    assert compiled["changes"] > 10
    assert compiled["losses"] == patched["losses"]
    for a, b in zip(compiled["masks"], patched["masks"], strict=True):
        for name in a:
            assert torch.equal(a[name][0], b[name][0]) and torch.equal(a[name][1], b[name][1])


def test_topology_update_rejects_bad_units_and_writes_nothing() -> None:
    from alwayssparse import kernels

    if kernels.available_backend() != "cpp":
        pytest.skip("needs the compiled kernels")
    old = torch.tensor([1, 4, 6], dtype=torch.long)
    order = torch.tensor([0, 1, 2], dtype=torch.long)
    slot_units = torch.tensor([1, 4, 6, -1], dtype=torch.int32)
    slot_in_a = torch.tensor([True, False, True, False])
    bad = {
        "strictly ascending": torch.tensor([4, 1], dtype=torch.long),
        "in the grid": torch.tensor([1, 12], dtype=torch.long),
        "exceed the capacity": torch.tensor([0, 1, 2, 3, 4], dtype=torch.long),
    }
    for message, new in bad.items():
        flags = torch.ones_like(new, dtype=torch.bool)
        before = slot_units.clone(), slot_in_a.clone()
        with pytest.raises(RuntimeError, match=message):
            kernels.topology_update(old, order, new, flags, slot_units, slot_in_a, (3, 4))
        assert torch.equal(slot_units, before[0]) and torch.equal(slot_in_a, before[1])
    # A hand-worked change: 4 leaves (slot 1 frees), 0 and 9 enter (slots 1 and 3), 6 leaves A.
    new = torch.tensor([0, 1, 6, 9], dtype=torch.long)
    flags = torch.tensor([True, True, False, True])
    out = kernels.topology_update(old, order, new, flags, slot_units, slot_in_a, (3, 4))
    order_new, b_ptr, b_cols, a_units, a_slots, a_ptr, a_cols, t_ptr, t_rows, t_slots = out[:10]
    assert order_new.tolist() == [1, 0, 2, 3]
    assert slot_units.tolist() == [1, 0, 6, 9] and slot_in_a.tolist() == [True, True, False, True]
    assert b_ptr.tolist() == [0, 2, 3, 4] and b_cols.tolist() == [0, 1, 2, 1]
    assert a_units.tolist() == [0, 1, 9] and a_slots.tolist() == [1, 0, 3]
    assert a_ptr.tolist() == [0, 2, 2, 3] and a_cols.tolist() == [0, 1, 1]
    assert t_ptr.tolist() == [0, 1, 3, 3, 3] and t_rows.tolist() == [0, 0, 2]
    assert t_slots.tolist() == [1, 0, 3]
    entered, entered_slots, left, left_slots = out[10:]
    assert entered.tolist() == [0, 9] and entered_slots.tolist() == [1, 3]
    assert left.tolist() == [4] and left_slots.tolist() == [1]


@pytest.mark.parametrize("backend", ["masked", "sparse"])
def test_refresh_on_several_threads_equals_one_thread(
    backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Groups are refreshed concurrently (one thread per core): the same masks and losses."""
    import alwayssparse.methods.topkast as topkast_module

    if not topkast_module.compiled_selection():
        pytest.skip("needs the compiled kernels")
    workers = []
    chosen = topkast_module._refresh_workers
    monkeypatch.setattr(
        topkast_module,
        "_refresh_workers",
        lambda groups: workers.append(1) or max(3, chosen(groups)),
    )
    threaded = run(backend, steps=30, refresh_interval=1)
    assert workers
    monkeypatch.setattr(topkast_module, "_refresh_workers", lambda groups: 1)
    single = run(backend, steps=30, refresh_interval=1)
    assert threaded["losses"] == single["losses"]
    for a, b in zip(threaded["masks"], single["masks"], strict=True):
        for name in a:
            assert torch.equal(a[name][0], b[name][0]) and torch.equal(a[name][1], b[name][1])
    counts = threaded["method"].refresh_counts
    assert counts == single["method"].refresh_counts and counts["incremental"] > 0


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_topology_update_matches_a_reference_on_random_changes(index_dtype: torch.dtype) -> None:
    """Random changes of B on grids with spare slots scattered through the buffer (the free-slot
    search skips 16 occupied slots at a time) and rows left empty: survivors keep their slots,
    entering units take the lowest free ones in position order, and every structure equals one
    built from scratch."""
    from alwayssparse import kernels

    if kernels.available_backend() != "cpp":
        pytest.skip("needs the compiled kernels")
    rng = np.random.default_rng(7)
    for _ in range(20):
        rows, cols = int(rng.integers(1, 40)), int(rng.integers(1, 70))
        grid = rows * cols
        old = np.sort(rng.choice(grid, int(rng.integers(0, grid + 1)), replace=False))
        cap = old.size + int(rng.integers(0, 50))
        slots = np.sort(rng.choice(cap, old.size, replace=False))  # holes anywhere
        order = rng.permutation(slots)
        slot_units = torch.full((cap,), -1, dtype=index_dtype)
        slot_units[torch.from_numpy(order)] = torch.from_numpy(old).to(index_dtype)
        slot_in_a = torch.zeros(cap, dtype=torch.bool)
        slot_in_a[torch.from_numpy(order)] = torch.from_numpy(rng.random(old.size) < 0.5)
        keep = old[rng.random(old.size) < rng.random()]
        outside = np.setdiff1d(np.arange(grid), old)
        room = min(outside.size, cap - keep.size)
        new = np.union1d(keep, rng.choice(outside, int(rng.integers(0, room + 1)), replace=False))
        in_a = rng.random(new.size) < 0.5
        out = kernels.topology_update(
            torch.from_numpy(old), torch.from_numpy(order), torch.from_numpy(new),
            torch.from_numpy(in_a), slot_units, slot_in_a, (rows, cols),
        )  # fmt: skip
        # Reference: survivors keep their slots; entering units fill the lowest free slots.
        old_slot = dict(zip(old.tolist(), order.tolist(), strict=True))
        slot_of = dict(old_slot)
        free = sorted(set(range(cap)) - {slot_of[u] for u in keep.tolist()})
        entering = [u for u in new.tolist() if u not in slot_of]
        slot_of.update(zip(entering, free, strict=False))
        expected_order = [slot_of[u] for u in new.tolist()]
        assert out[0].tolist() == expected_order
        expected_units = np.full(cap, -1)
        expected_units[expected_order] = new
        assert slot_units.tolist() == expected_units.tolist()
        expected_in_a = np.zeros(cap, dtype=bool)
        expected_in_a[expected_order] = in_a
        assert slot_in_a.tolist() == expected_in_a.tolist()
        b_ptr, b_cols, a_units, a_slots, a_ptr, a_cols, t_ptr, t_rows, t_slots = out[1:10]
        assert b_ptr.tolist() == np.searchsorted(new, np.arange(rows + 1) * cols).tolist()
        assert b_cols.tolist() == (new % cols).tolist()
        a = new[in_a]
        assert a_units.tolist() == a.tolist()
        assert a_slots.tolist() == np.asarray(expected_order)[in_a].tolist()
        assert a_ptr.tolist() == np.searchsorted(a, np.arange(rows + 1) * cols).tolist()
        assert a_cols.tolist() == (a % cols).tolist()
        by_column = np.lexsort((a // cols, a % cols))
        assert t_ptr.tolist() == np.searchsorted(np.sort(a % cols), np.arange(cols + 1)).tolist()
        assert t_rows.tolist() == (a // cols)[by_column].tolist()
        assert t_slots.tolist() == np.asarray(expected_order)[in_a][by_column].tolist()
        entered, entered_slots, left, left_slots = out[10:]
        assert entered.tolist() == entering
        assert entered_slots.tolist() == [slot_of[u] for u in entering]
        gone = np.setdiff1d(old, keep)
        assert left.tolist() == gone.tolist()
        assert left_slots.tolist() == [old_slot[u] for u in gone.tolist()]
