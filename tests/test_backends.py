"""Every registered backend against the masked backend, for every registered method.

Parametrised over the registries: a new backend (or method) is tested by registering it
(``tests/toy_backend.py`` and ``tests/toy_method.py`` are, through ``conftest.py``).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from alwayssparse import Sparsity
from alwayssparse.backends import BACKENDS
from alwayssparse.methods import METHODS

STEPS = 30
# Per method: options giving several topology changes within STEPS (others: the defaults).
OPTIONS: dict[str, dict[str, Any]] = {
    "topkast": {"backward_sparsity": 0.5, "exploration_coefficient": 1e-3},
    "set": {"update_interval": 5},
    "rigl": {"update_interval": 5},
    "dynsparse": {"num_updates": 6},
    "gmp": {"stop_step": 20, "update_interval": 5},
}
SPARSE_METHODS = sorted(name for name, cls in METHODS.items() if cls.sparse)


def _cases() -> list[Any]:
    cases = []
    for backend in sorted(BACKENDS):
        cls = BACKENDS[backend]
        if backend == "masked" or (cls.devices is not None and "cpu" not in cls.devices):
            continue  # the reference itself; devices the test machine lacks
        blocks = [b for b in (1, 4) if cls.supported_blocks is None or b in cls.supported_blocks]
        cases += [(backend, m, b) for m in SPARSE_METHODS for b in blocks]
    return cases


def train(backend: str, method: str, block: int) -> dict[str, Any]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))
    sp = Sparsity(model, method=method, sparsity=0.75, block_size=block, backend=backend,
                  total_steps=STEPS, seed=1, **OPTIONS.get(method, {}))  # fmt: skip
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
    batches = torch.Generator().manual_seed(2)
    losses = []
    for step in range(STEPS):
        x, y = torch.randn(32, 16, generator=batches), torch.randn(32, 16, generator=batches)
        loss = F.mse_loss(model(x), y) + sp.regularizer()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        sp.step(step, optimizer)
        losses.append(loss.item())
    masks = {name: (a.clone(), b.clone()) for name, (a, b) in sp.masks().items()}
    summary = {"dof": sp.explored_dof(), "counts": sp.parameter_counts()}
    sp.export()
    return {"losses": losses, "masks": masks, "state": model.state_dict(), **summary}


@pytest.mark.parametrize(("backend", "method", "block"), _cases())
def test_backend_matches_masked(backend: str, method: str, block: int) -> None:
    reference, run = train("masked", method, block), train(backend, method, block)
    # Tolerances: float32 rounding of different summation orders.
    torch.testing.assert_close(run["losses"], reference["losses"], rtol=1e-5, atol=1e-5)
    for name, (a, b) in reference["masks"].items():
        assert torch.equal(run["masks"][name][0], a), f"{name}: A differs"
        assert torch.equal(run["masks"][name][1], b), f"{name}: B differs"
    torch.testing.assert_close(run["state"], reference["state"], rtol=1e-4, atol=1e-5)
    assert run["dof"] == reference["dof"] and run["counts"] == reference["counts"]


def test_the_toys_are_registered() -> None:
    """conftest.py registers the one-file toy backend and method: the cases above cover them."""
    assert "toy-where" in BACKENDS and "lottery" in METHODS
    assert ("toy-where", "lottery", 1) in _cases()
