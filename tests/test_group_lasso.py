"""Tests for the decoupled group-lasso update (dynsparse-bert.md eq. 2)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from alwayssparse import Sparsity
from alwayssparse.masks import expand_blocks
from alwayssparse.regularizers import apply_group_lasso, group_lasso_step
from alwayssparse.sparse_tensor import SparseTensor

# A hand-worked 4 x 4 weight; its 2 x 2 blocks and sum of squares:
#   (0,0) [1 -2; 2 1]        1 + 4 + 4 + 1      = 10
#   (0,1) [0 0.5; 3 -1]      0 + 0.25 + 9 + 1   = 10.25
#   (1,0) [0 0; 0 0]         0
#   (1,1) [0.1 0.2; -0.3 0]  0.01 + 0.04 + 0.09 = 0.14
W = torch.tensor(
    [
        [1.0, -2.0, 0.0, 0.5],
        [2.0, 1.0, 3.0, -1.0],
        [0.0, 0.0, 0.1, 0.2],
        [0.0, 0.0, -0.3, 0.0],
    ],
    dtype=torch.float64,
)
LR, LAMBDA, W_STD = 0.1, 0.5, 0.02
# lr * lambda * w_std * sqrt(|block|) = 0.1 * 0.5 * 0.02 * 2 = 0.002, divided per block by
# sqrt(sum W^2 + 1e-6):
F00 = 0.002 / math.sqrt(10.0 + 1e-6)  # 6.3245550e-4
F01 = 0.002 / math.sqrt(10.25 + 1e-6)  # 6.2469503e-4
F10 = 0.002 / math.sqrt(0.0 + 1e-6)  # 2.0 (times zero weights: no change)
F11 = 0.002 / math.sqrt(0.14 + 1e-6)  # 5.3452058e-3
FACTORS = torch.tensor(
    [[F00, F00, F01, F01], [F00, F00, F01, F01], [F10, F10, F11, F11], [F10, F10, F11, F11]],
    dtype=torch.float64,
)
STEP = W * FACTORS


def test_hand_computed_factors() -> None:
    assert math.isclose(F00, 6.324555e-4, rel_tol=1e-6)
    assert math.isclose(F01, 6.246950e-4, rel_tol=1e-6)
    assert math.isclose(F10, 2.0, rel_tol=1e-12)
    assert math.isclose(F11, 5.345206e-3, rel_tol=1e-6)
    # e.g. W[1, 2] = 3 moves by 3 * 6.2469503e-4 = 1.8740851e-3
    assert float(STEP[1, 2]) == pytest.approx(1.874085e-3, rel=1e-6)


def test_group_lasso_step_hand_worked() -> None:
    step = group_lasso_step(W, block=2, learning_rate=LR, coefficient=LAMBDA, weight_std=W_STD)
    torch.testing.assert_close(step, STEP, rtol=1e-12, atol=0.0)
    assert torch.equal(step[2:, :2], torch.zeros(2, 2, dtype=torch.float64))


def test_group_lasso_step_block_1_is_an_l1_like_pull() -> None:
    weight = torch.tensor([[3.0, -0.5], [0.0, 2e-3]], dtype=torch.float64)
    step = group_lasso_step(weight, 1, learning_rate=0.1, coefficient=0.5, weight_std=0.02)
    scale = 0.1 * 0.5 * 0.02  # sqrt(|block|) = 1
    expected = torch.tensor(
        [
            [scale * 3.0 / math.sqrt(9.0 + 1e-6), scale * -0.5 / math.sqrt(0.25 + 1e-6)],
            [0.0, scale * 2e-3 / math.sqrt(4e-6 + 1e-6)],
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(step, expected, rtol=1e-12, atol=0.0)
    assert float(step[0, 0]) == pytest.approx(scale, rel=1e-6)  # ~ lr * lambda * w_std * sign


def sparse_tensor(weight: Tensor, grad_blocks: Tensor) -> SparseTensor:
    grad_mask = expand_blocks(grad_blocks, 2, weight.shape)
    return SparseTensor.dense("w", weight, grad_mask.clone(), grad_mask, block=2)


def test_apply_group_lasso_changes_only_entries_in_b() -> None:
    weight = W.clone()
    blocks = torch.tensor([[True, False], [True, True]])
    t = sparse_tensor(weight, blocks)
    apply_group_lasso(t, LR, LAMBDA, W_STD)
    inside = t.grad_mask
    torch.testing.assert_close(weight[inside], (W - STEP)[inside], rtol=1e-12, atol=0.0)
    assert torch.equal(weight[~inside], W[~inside])  # block (0,1) is outside B: untouched
    assert float(weight[0, 0]) == pytest.approx(1.0 - F00)
    assert float(weight[3, 2]) == pytest.approx(-0.3 + 0.3 * F11)


@pytest.mark.parametrize(("lr", "coefficient"), [(0.1, 0.0), (0.0, 0.5)])
def test_zero_coefficient_or_learning_rate_changes_nothing(lr: float, coefficient: float) -> None:
    weight = W.clone()
    t = sparse_tensor(weight, torch.ones(2, 2, dtype=torch.bool))
    apply_group_lasso(t, lr, coefficient, W_STD)
    assert torch.equal(weight, W)


# -- through Sparsity ---------------------------------------------------------------------------


def eq2_update(theta: Tensor, block: int, lr: float, lam: float, w_std: float) -> Tensor:
    """An independent, loop-based eq. 2: the term subtracted from theta."""
    out = torch.zeros_like(theta)
    for r in range(0, theta.shape[0], block):
        for c in range(0, theta.shape[1], block):
            tile = theta[r : r + block, c : c + block]
            norm = math.sqrt(float((tile**2).sum()) + 1e-6)
            out[r : r + block, c : c + block] = lr * lam * w_std * block * tile / norm
    return out


def make_model() -> nn.Sequential:
    model = nn.Sequential(nn.Linear(4, 4)).double()
    with torch.no_grad():
        model[0].weight.copy_(W + 0.05)  # no zero block: every block is pulled
        model[0].bias.fill_(0.1)
    return model


@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("static", {"sparsity": 0.5}),
        ("topkast", {"sparsity": 0.75, "backward_sparsity": 0.5,
                     "exploration_coefficient": 1e-2}),
    ],
)  # fmt: skip
def test_group_lasso_through_sparsity_after_the_optimizer_step(
    method: str, options: dict[str, float]
) -> None:
    model = make_model()
    sp = Sparsity(model, method=method, block_size=2, group_lasso=LAMBDA, **options)
    t = sp.tensors[0]
    # The weight's group has its own lr (0.1, then 0.05); the bias's group another one.
    opt = torch.optim.SGD(
        [{"params": [model[0].parametrizations.weight.original], "lr": 0.1},
         {"params": [model[0].bias], "lr": 0.7}],
        lr=0.3,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    for step, lr in enumerate([0.1, 0.05]):
        opt.param_groups[0]["lr"] = lr
        x = torch.randn(3, 4, generator=gen, dtype=torch.float64)
        y = torch.randn(3, 4, generator=gen, dtype=torch.float64)
        (F.mse_loss(model(x), y) + sp.regularizer()).backward()
        theta0 = t.weight.detach().clone()
        grad = t.weight.grad
        assert grad is not None
        b = t.grad_mask.clone()
        assert not bool(b.all())  # some entries are outside B
        opt.step()
        opt.zero_grad()
        sp.step(step, opt)
        theta1 = theta0 - lr * grad  # plain SGD (the gradient is already zero outside B)
        expected = torch.where(b, theta1 - eq2_update(theta1, 2, lr, LAMBDA, 0.02), theta0)
        torch.testing.assert_close(t.weight.detach(), expected, rtol=1e-12, atol=1e-15)
        assert torch.equal(t.weight.detach()[~b], theta0[~b])


def test_group_lasso_zero_coefficient_is_plain_sgd() -> None:
    model = make_model()
    sp = Sparsity(model, method="static", sparsity=0.5, block_size=2, group_lasso=0.0)
    t = sp.tensors[0]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.ones(2, 4, dtype=torch.float64)
    model(x).sum().backward()
    theta0, grad = t.weight.detach().clone(), t.weight.grad.clone()  # type: ignore[union-attr]
    opt.step()
    sp.step(0, opt)
    torch.testing.assert_close(t.weight.detach(), theta0 - 0.1 * grad, rtol=1e-12, atol=0.0)


def test_group_lasso_shrinks_blocks_over_training() -> None:
    # With no data gradient (lr from the group, loss independent of the weight), each step
    # scales every active block by (1 - lr * lambda * w_std * b / ||block||): norms decrease.
    model = make_model()
    sp = Sparsity(model, method="static", sparsity=0.5, block_size=2, group_lasso=5.0)
    t = sp.tensors[0]
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    norms = []
    for step in range(3):
        norms.append(float(t.weight.detach()[t.grad_mask].norm()))
        (model(torch.zeros(1, 4, dtype=torch.float64)).sum() * 0.0).backward()
        opt.step()
        opt.zero_grad()
        sp.step(step, opt)
    norms.append(float(t.weight.detach()[t.grad_mask].norm()))
    assert norms[0] > norms[1] > norms[2] > norms[3]
