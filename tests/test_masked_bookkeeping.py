"""The masked backend's per-step bookkeeping does only what the optimizer step can have undone,
with the same results as restoring theta and zeroing the state outside B on every step."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from alwayssparse import Sparsity
from alwayssparse.backends import masked
from alwayssparse.optim_state import zero_state
from alwayssparse.sparse_tensor import UnitStorage

OPTIMIZERS: dict[str, Callable[[Any], torch.optim.Optimizer]] = {
    "adamw-wd": lambda p: torch.optim.AdamW(p, lr=2e-2, weight_decay=0.1),
    "adamw": lambda p: torch.optim.AdamW(p, lr=2e-2, weight_decay=0.0),
    "adam": lambda p: torch.optim.Adam(p, lr=2e-2),
    "adam-l2": lambda p: torch.optim.Adam(p, lr=2e-2, weight_decay=0.1, amsgrad=True),
    "sgd-momentum": lambda p: torch.optim.SGD(p, lr=5e-2, momentum=0.9),
    "sgd-nesterov-wd": lambda p: torch.optim.SGD(
        p, lr=5e-2, momentum=0.9, nesterov=True, weight_decay=0.1
    ),
    "sgd": lambda p: torch.optim.SGD(p, lr=5e-2),
    "sgd-dampening": lambda p: torch.optim.SGD(p, lr=5e-2, momentum=0.9, dampening=0.5),
}


@contextmanager
def every_step_bookkeeping() -> Iterator[None]:
    """The backend as it was: restore theta, zero the state outside B and copy theta on every
    step; zero the state outside B and where B was entered on every mask update."""
    backend = masked.MaskedBackend

    def before_update(self: Any, tensors: Any, optimizer: torch.optim.Optimizer) -> None:
        for t in tensors:
            m = t.storage.masked
            with torch.no_grad():
                t.weight.copy_(torch.where(m.grad_mask, t.weight, m.frozen_values))
            zero_state(optimizer, t.weight, ~t.grad_mask)

    def after_update(self: Any, tensors: Any) -> None:
        for t in tensors:
            t.storage.masked.snapshot(t.weight)

    def carry_state(self: Any, optimizer: torch.optim.Optimizer, change: Any) -> None:
        UnitStorage.carry_state(self, optimizer, change)

    saved = (backend.before_update, backend.after_update, masked._MaskedStorage.carry_state)
    backend.before_update = before_update  # type: ignore[method-assign]
    backend.after_update = after_update  # type: ignore[method-assign]
    masked._MaskedStorage.carry_state = carry_state  # type: ignore[method-assign]
    try:
        yield
    finally:
        backend.before_update, backend.after_update = saved[0], saved[1]  # type: ignore[method-assign]
        masked._MaskedStorage.carry_state = saved[2]  # type: ignore[method-assign]


def train(
    optimizer_name: str, method: str, steps: int, leak: str | None = None, **options: Any
) -> list[dict[str, Tensor]]:
    """Per step: theta, masks and every optimizer state tensor of the sparse parameters."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    sp = Sparsity(model, method=method, sparsity=0.75, seed=1, total_steps=steps, **options)
    optimizer = OPTIMIZERS[optimizer_name](model.parameters())
    generator = torch.Generator().manual_seed(2)
    records = []
    for step in range(steps):
        x, y = torch.randn(16, 16, generator=generator), torch.randn(16, 8, generator=generator)
        loss = F.mse_loss(model(x), y) + sp.regularizer()
        if leak == "loss" and step % 7 == 3:  # a loss on the raw parameters reaches C
            loss = loss + 1e-2 * sum(t.weight.square().sum() for t in sp.tensors)
        loss.backward()
        if leak == "grad" and step % 5 == 2:  # an edited gradient reaches C
            for t in sp.tensors:
                assert t.weight.grad is not None
                t.weight.grad.add_(t.weight.detach(), alpha=1e-2)
        optimizer.step()
        optimizer.zero_grad()
        sp.step(step, optimizer)
        record = {}
        for t in sp.tensors:
            record[f"{t.name}.theta"] = t.weight.detach().clone()
            a, b = sp.masks()[t.name]
            record[f"{t.name}.A"], record[f"{t.name}.B"] = a.clone(), b.clone()
            for key, value in optimizer.state.get(t.weight, {}).items():
                if isinstance(value, Tensor) and value.shape == t.weight.shape:
                    record[f"{t.name}.{key}"] = value.clone()
        records.append(record)
    return records


CASES = [
    ("topkast", {"backward_sparsity": 0.5, "exploration_coefficient": 1e-2}),
    ("topkast", {"backward_sparsity": 0.5, "refresh_interval": 4, "block_size": 4}),
    ("set", {"update_interval": 3}),
    ("static", {}),
]


@pytest.mark.parametrize("optimizer_name", sorted(OPTIMIZERS))
@pytest.mark.parametrize(("method", "options"), CASES)
def test_same_as_restoring_and_zeroing_every_step(
    optimizer_name: str, method: str, options: dict[str, Any]
) -> None:
    steps = 40
    with every_step_bookkeeping():
        expected = train(optimizer_name, method, steps, **options)
    got = train(optimizer_name, method, steps, **options)
    for step, (e, g) in enumerate(zip(expected, got, strict=True)):
        assert e.keys() == g.keys()
        for key in e:
            assert torch.equal(e[key], g[key]), (step, key)  # equal values (+0.0 == -0.0)


@pytest.mark.parametrize("leak", ["loss", "grad"])
@pytest.mark.parametrize("optimizer_name", ["adam", "sgd-momentum", "adamw-wd"])
def test_a_gradient_outside_b_is_still_undone(optimizer_name: str, leak: str) -> None:
    options = CASES[0][1]
    with every_step_bookkeeping():
        expected = train(optimizer_name, "topkast", 30, leak=leak, **options)
    got = train(optimizer_name, "topkast", 30, leak=leak, **options)
    for step, (e, g) in enumerate(zip(expected, got, strict=True)):
        for key in e:
            assert torch.equal(e[key], g[key]), (step, key)


def test_without_weight_decay_nothing_is_restored_or_zeroed(monkeypatch: Any) -> None:
    """Adam without weight decay: no restore and no state zeroing on any step (a count only)."""
    calls: list[str] = []
    monkeypatch.setattr(masked.MaskedWeight, "restore", lambda *a: calls.append("restore"))
    monkeypatch.setattr(masked, "keep_state_where", lambda *a: calls.append("zero"))
    snapshots: list[int] = []
    original = masked.MaskedWeight.snapshot
    monkeypatch.setattr(
        masked.MaskedWeight, "snapshot", lambda self, w: (snapshots.append(1), original(self, w))
    )
    records = train("adam", "topkast", 12, **CASES[0][1])
    assert calls == []
    assert len(snapshots) == 2  # once per sparse tensor at the start, never again
    assert any(not torch.equal(records[0][k], records[-1][k]) for k in records[0] if ".B" in k)
