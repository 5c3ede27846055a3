"""The sparse backend against the masked backend, and its storage guarantees."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from alwayssparse import Sparsity
from alwayssparse.backends.sparse import CompactStorage, SparseLinear
from alwayssparse.methods import TopKAST
from alwayssparse.methods import topkast as topkast_module

STEPS = 50
# Per method: options giving several topology changes within STEPS. DynSparse uses 10 updates:
# with one every step, Adam moves every regrown weight by ~lr, their magnitudes tie to within
# rounding, and float32 rounding differences between the two backends flip which one is pruned.
METHODS: dict[str, dict[str, Any]] = {
    "static": {},
    "topkast": {"backward_sparsity": 0.5, "exploration_coefficient": 1e-3},
    "set": {"update_interval": 5},
    "rigl": {"update_interval": 5},
    "dynsparse": {"num_updates": 10},
    "gmp": {"stop_step": 30, "update_interval": 5},
}


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32))


def train(backend: str, method: str, block: int, steps: int = STEPS, **extra: Any) -> dict:
    model = make_model()
    options = {**METHODS[method], **extra}
    sp = Sparsity(model, method=method, sparsity=0.75, block_size=block, backend=backend,
                  total_steps=steps, seed=1, **options)  # fmt: skip
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
    batches = torch.Generator().manual_seed(2)
    losses = []
    for step in range(steps):
        x, y = torch.randn(64, 32, generator=batches), torch.randn(64, 32, generator=batches)
        loss = F.mse_loss(model(x), y) + sp.regularizer()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        sp.step(step, optimizer)
        losses.append(loss.item())
    return {"losses": losses, "sp": sp, "model": model, "optimizer": optimizer}


def effective_weights(run: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per sparse tensor: (theta on A, theta on B), dense, whatever the backend."""
    sp: Sparsity = run["sp"]
    out = {}
    for t in sp.tensors:
        a, b = sp.masks()[t.name]
        if isinstance(t.module, SparseLinear):
            out[t.name] = (t.module.dense_weight(), t.module.dense_weight(only_a=False))
        else:
            theta = t.weight.detach()
            out[t.name] = (torch.where(a, theta, 0.0), torch.where(b, theta, 0.0))
    return out


@pytest.mark.parametrize("block", [1, 4])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_sparse_backend_matches_masked(method: str, block: int) -> None:
    masked = train("masked", method, block)
    sparse = train("sparse", method, block)
    # Tolerances: float32 rounding of different summation orders (observed <= 1.2e-7).
    torch.testing.assert_close(sparse["losses"], masked["losses"], rtol=1e-5, atol=1e-5)
    masks_m, masks_s = masked["sp"].masks(), sparse["sp"].masks()
    for name in masks_m:
        assert torch.equal(masks_m[name][0], masks_s[name][0]), name
        assert torch.equal(masks_m[name][1], masks_s[name][1]), name
    weights_m, weights_s = effective_weights(masked), effective_weights(sparse)
    for name in weights_m:
        torch.testing.assert_close(weights_s[name][0], weights_m[name][0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(weights_s[name][1], weights_m[name][1], rtol=1e-4, atol=1e-5)
    assert sparse["sp"].explored_dof() == masked["sp"].explored_dof()


# Options that take other branches of the unit-space updates: regrown weights drawn from a
# truncated normal (written unit by unit), random Top-KAST exploration, exploration that
# stops between refreshes, the group-lasso step on compact values.
VARIANTS: list[tuple[str, int, dict[str, Any]]] = [
    ("set", 4, {"regrow_std": 0.05}),
    ("dynsparse", 1, {"init_std": 0.02, "regrow_std": 0.02}),
    ("topkast", 4, {"random_exploration": True}),
    ("topkast", 1, {"refresh_interval": 4, "exploration_stop_step": 22}),
    ("dynsparse", 4, {"group_lasso": 0.5}),
    ("rigl", 4, {"gradient_chunk_elements": 200}),
]


@pytest.mark.parametrize(("method", "block", "options"), VARIANTS)
def test_sparse_backend_matches_masked_variants(
    method: str, block: int, options: dict[str, Any]
) -> None:
    masked = train("masked", method, block, steps=30, **options)
    sparse = train("sparse", method, block, steps=30, **options)
    torch.testing.assert_close(sparse["losses"], masked["losses"], rtol=1e-5, atol=1e-5)
    masks_m, masks_s = masked["sp"].masks(), sparse["sp"].masks()
    for name in masks_m:
        assert torch.equal(masks_m[name][0], masks_s[name][0]), name
        assert torch.equal(masks_m[name][1], masks_s[name][1]), name
    weights_m, weights_s = effective_weights(masked), effective_weights(sparse)
    for name in weights_m:
        torch.testing.assert_close(weights_s[name][1], weights_m[name][1], rtol=1e-4, atol=1e-5)
    assert sparse["sp"].explored_dof() == masked["sp"].explored_dof()


# -- no dense intermediate on update steps ---------------------------------------------------


class _LargeAllocations(TorchDispatchMode):
    """Records every tensor an op creates with at least ``limit`` elements.

    Views and in-place results share an input's storage and are not allocations. ``inside``
    marks the records made while Top-KAST ranks its reservoir (the allowed exception).
    """

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.inside = False
        self.records: list[tuple[str, tuple[int, ...], bool]] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage().data_ptr()
            for t in pytree.tree_leaves((args, kwargs))
            if isinstance(t, Tensor)
        }
        for t in pytree.tree_leaves(out):
            if (
                isinstance(t, Tensor)
                and t.numel() >= self.limit
                and t.untyped_storage().data_ptr() not in inputs
            ):
                self.records.append((str(func), tuple(t.shape), self.inside))
        return out


@contextmanager
def _ranking(log: _LargeAllocations) -> Iterator[None]:
    log.inside = True
    try:
        yield
    finally:
        log.inside = False


UPDATE_EVERY_STEP: dict[str, dict[str, Any]] = {
    "set": {"update_interval": 1, "drop_schedule": "constant"},
    "dynsparse": {"update_interval": 1, "drop_schedule": "constant", "regrow_std": 0.02},
    "rigl": {"update_interval": 1, "drop_schedule": "constant",
             "gradient_chunk_elements": 256 * 512 // 8},
    "gmp": {"update_interval": 1, "initial_sparsity": 0.5, "stop_step": 6},
    "topkast": {"refresh_interval": 1},
}  # fmt: skip


@pytest.mark.parametrize("block", [1, 16])
@pytest.mark.parametrize("method", sorted(UPDATE_EVERY_STEP))
def test_updates_allocate_nothing_of_the_weight_size(
    method: str, block: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 256))
    sp = Sparsity(model, method=method, sparsity=0.9, block_size=block, backend="sparse",
                  total_steps=20, **UPDATE_EVERY_STEP[method])  # fmt: skip
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    log = _LargeAllocations(limit=256 * 512)
    # Top-KAST ranks theta of the whole tensor on the host (its grid scores and top-k).
    grid_scores, select = CompactStorage.grid_scores, TopKAST._select

    def ranked_scores(self: CompactStorage) -> Tensor:
        with _ranking(log):
            return grid_scores(self)

    def ranked_select(self: TopKAST, scores: list[Tensor], counts: list[int]) -> list[Tensor]:
        with _ranking(log):
            return select(self, scores, counts)

    rank_reservoir = topkast_module._rank_reservoir

    def ranked_reservoir(*args: Any) -> Any:
        with _ranking(log):
            return rank_reservoir(*args)

    monkeypatch.setattr(CompactStorage, "grid_scores", ranked_scores)
    monkeypatch.setattr(TopKAST, "_select", ranked_select)
    monkeypatch.setattr(topkast_module, "_rank_reservoir", ranked_reservoir)
    # The allocation log (a dispatch mode) sees only the calling thread: refresh on it (with
    # several threads the same code runs, on other threads; how many depends on torch's count).
    monkeypatch.setattr(topkast_module, "_refresh_workers", lambda groups: 1)
    changed = 0
    for step in range(6):
        x = torch.randn(32, 256)
        F.mse_loss(model(x), x).backward()
        optimizer.step()
        optimizer.zero_grad()
        before = {name: b.clone() for name, (_, b) in sp.masks().items()}
        assert sp.method.updates_at(step)
        with log:
            sp.step(step, optimizer)
        changed += sum(not torch.equal(b, sp.masks()[name][1]) for name, b in before.items())
    assert changed > 0  # the updates really did change the topology
    outside = [r for r in log.records if not r[2]]
    assert outside == [], outside
    ranked = [r for r in log.records if r[2]]
    if method == "topkast":
        # Only the first refresh ranks the whole grid (|theta| of the reservoir, and the
        # reservoir's mask when its best units are ranked); every later one is incremental.
        # (Also in full: the initial masks, on the dense view, before the layers compact.)
        assert sp.method.refresh_counts == {"full": 2 + 2, "incremental": 2 * 5}
        kinds = sorted(r[0] for r in ranked)
        assert kinds.count("aten.abs.default") == 2, ranked
        assert set(kinds) <= {"aten.abs.default", "aten.bitwise_not.default"}, ranked
    else:
        assert ranked == []


@pytest.mark.parametrize("block", [1, 16])
def test_storage_scales_with_density(block: int) -> None:
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 256))
    sp = Sparsity(model, method="set", sparsity=0.9, block_size=block, backend="sparse",
                  total_steps=100)  # fmt: skip
    layers = [m for m in model if isinstance(m, SparseLinear)]
    assert len(layers) == 2
    stored = sum(layer.values.numel() for layer in layers)
    dense = 256 * 512 * 2
    assert stored == pytest.approx(0.1 * dense, rel=0.02)
    # No parameter or buffer of the model has the dense weight's size.
    for tensor in [*model.parameters(), *model.buffers()]:
        assert tensor.numel() < 256 * 512 // 4
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(8, 256)).sum().backward()
    optimizer.step()
    sp.step(0, optimizer)
    for layer in layers:
        assert layer.values.grad is not None and layer.values.grad.shape == layer.values.shape
        state = optimizer.state[layer.values]
        assert state["exp_avg"].shape == layer.values.shape == state["exp_avg_sq"].shape


def test_topkast_reservoir_keeps_theta_outside_b() -> None:
    run = train("sparse", "topkast", 1, steps=12)
    sp: Sparsity = run["sp"]
    reference = train("masked", "topkast", 1, steps=12)
    for t, ref in zip(sp.tensors, reference["sp"].tensors, strict=True):
        layer = t.module
        assert isinstance(layer, SparseLinear) and layer.reservoir is not None
        outside = ~reference["sp"].masks()[t.name][1]
        torch.testing.assert_close(layer.reservoir[outside], ref.weight.detach()[outside])


def test_grown_entries_start_with_zero_optimizer_state() -> None:
    run = train("sparse", "set", 1, steps=5, stop_step=100)  # update after step 4 regrows
    sp, optimizer = run["sp"], run["optimizer"]
    for t in sp.tensors:
        layer = t.module
        assert isinstance(layer, SparseLinear)
        state = optimizer.state[layer.values]
        grown = layer.values.detach() == 0  # SET regrows at zero; survivors are nonzero
        assert int(grown.sum()) > 0
        assert bool((state["exp_avg"][grown] == 0).all())
        assert bool((state["exp_avg_sq"][grown] == 0).all())
        assert bool((state["exp_avg"][~grown] != 0).any())


def test_checkpoint_round_trip_and_resume(tmp_path: Path) -> None:
    full = train("sparse", "topkast", 1, steps=20, random_exploration=True)
    first = train("sparse", "topkast", 1, steps=10, random_exploration=True)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": first["model"].state_dict(), "sparsity": first["sp"].state_dict(),
                "optimizer": first["optimizer"].state_dict()}, path)  # fmt: skip
    state = torch.load(path, weights_only=True)
    model = make_model()
    sp = Sparsity(model, method="topkast", sparsity=0.75, backend="sparse", seed=1,
                  random_exploration=True, **METHODS["topkast"])  # fmt: skip
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
    model.load_state_dict(state["model"])
    sp.load_state_dict(state["sparsity"])
    optimizer.load_state_dict(state["optimizer"])
    batches = torch.Generator().manual_seed(2)
    for step in range(20):
        x, y = torch.randn(64, 32, generator=batches), torch.randn(64, 32, generator=batches)
        if step < 10:
            continue  # the first ten batches were consumed before the checkpoint
        loss = F.mse_loss(model(x), y) + sp.regularizer()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        sp.step(step, optimizer)
    for name, (a, b) in full["sp"].masks().items():
        assert torch.equal(sp.masks()[name][0], a) and torch.equal(sp.masks()[name][1], b)
    for p, q in zip(model.parameters(), full["model"].parameters(), strict=True):
        assert torch.equal(p, q)


def test_export_gives_plain_linear_layers() -> None:
    run = train("sparse", "static", 4, steps=3)
    model, sp = run["model"], run["sp"]
    expected = [t.module.dense_weight() for t in sp.tensors]
    x = torch.randn(5, 32)
    before = model(x)
    sp.export()
    assert all(type(m) is nn.Linear for m in (model[0], model[2]))
    for layer, weight in zip((model[0], model[2]), expected, strict=True):
        assert torch.equal(layer.weight, weight)
    torch.testing.assert_close(model(x), before)


def test_errors_are_clear() -> None:
    conv = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8, 4))
    with pytest.raises(ValueError, match="supports nn.Linear"):
        Sparsity(conv, method="static", backend="sparse")
    with pytest.raises(ValueError, match="Wrap it"):
        Sparsity(nn.Linear(8, 8), method="static", backend="sparse")
    with pytest.raises(ValueError, match="block_size in"):
        Sparsity(make_model(), method="static", backend="sparse", block_size=2)
    with pytest.raises(ValueError, match="selection='layer'"):
        Sparsity(make_model(), method="topkast", backend="sparse", selection="global")
    model = make_model()
    early = torch.optim.SGD(model.parameters(), lr=0.1)  # holds the dense weights
    sp = Sparsity(model, method="static", backend="sparse")
    model(torch.randn(2, 32)).sum().backward()
    with pytest.raises(ValueError, match="build the optimizer after Sparsity"):
        sp.step(0, early)


def test_build_optimizer_decays_stored_values() -> None:
    from alwayssparse.train import OptimConfig, build_optimizer

    model = make_model()
    sp = Sparsity(model, method="static", backend="sparse")
    optimizer = build_optimizer(model, OptimConfig(weight_decay=0.1), sp.weight_parameters())
    decayed = {id(p) for p in optimizer.param_groups[0]["params"]}
    assert {id(m.values) for m in model if isinstance(m, SparseLinear)} <= decayed
    assert all(id(m.bias) not in decayed for m in model if isinstance(m, SparseLinear))
