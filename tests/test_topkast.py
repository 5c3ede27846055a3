"""Tests for the Top-KAST method (topkast.md sections 2.1-2.4, Table 1) through ``Sparsity``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from alwayssparse import Sparsity
from alwayssparse.masks import count_for_density, global_topk_masks, topk_mask
from alwayssparse.methods import TopKAST

# Sparse weights of the test MLP, their sizes, and the exact counts at forward sparsity 0.8
# (D = 0.2) and backward sparsity 0.5 (D + M = 0.5): round(0.2 * n) and round(0.5 * n).
NAMES = ["0.weight", "2.weight", "4.weight"]
SIZES = [32 * 16, 24 * 32, 8 * 24]  # 512, 768, 192
FORWARD = [102, 154, 38]  # 102.4, 153.6, 38.4
BACKWARD = [256, 384, 96]


def make_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 8)
    )


def batch(step: int) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    return torch.randn(16, 16, generator=gen), torch.randn(16, 8, generator=gen)


def setup(
    seed: int = 0, opt: str = "adamw", **options: Any
) -> tuple[nn.Sequential, Sparsity, torch.optim.Optimizer]:
    model = make_model()
    kwargs: dict[str, Any] = {"sparsity": 0.8, "backward_sparsity": 0.5}
    kwargs.update(options)
    sp = Sparsity(model, method="topkast", seed=seed, **kwargs)
    return model, sp, OPTIMIZERS[opt](model.parameters())


OPTIMIZERS: dict[str, Callable[[Any], torch.optim.Optimizer]] = {
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.05, weight_decay=0.1),
    "adam": lambda p: torch.optim.Adam(p, lr=0.05, weight_decay=0.1),
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.1),
}


def loss_of(model: nn.Module, sp: Sparsity, step: int) -> Tensor:
    x, y = batch(step)
    return F.mse_loss(model(x), y) + sp.regularizer()


def train_step(model: nn.Module, sp: Sparsity, opt: torch.optim.Optimizer, step: int) -> None:
    opt.zero_grad()
    loss_of(model, sp, step).backward()
    opt.step()
    sp.step(step, opt)


def snapshot_masks(sp: Sparsity) -> dict[str, tuple[Tensor, Tensor]]:
    return {n: (a.clone(), b.clone()) for n, (a, b) in sp.masks().items()}


def thetas(sp: Sparsity) -> list[Tensor]:
    return [t.weight for t in sp.tensors]


def count(mask: Tensor) -> int:
    return int(mask.sum())


# -- exact counts ---------------------------------------------------------------------------


@pytest.mark.parametrize("random_exploration", [False, True])
@pytest.mark.parametrize("selection", ["layer", "global"])
@pytest.mark.parametrize("refresh_interval", [1, 3])
def test_exact_counts_every_step(
    refresh_interval: int, selection: str, random_exploration: bool
) -> None:
    model, sp, opt = setup(
        refresh_interval=refresh_interval,
        selection=selection,
        random_exploration=random_exploration,
    )
    assert [t.name for t in sp.tensors] == NAMES
    for t, n, f, b in zip(sp.tensors, SIZES, FORWARD, BACKWARD, strict=True):
        assert t.weight.numel() == n
        assert t.forward_count == count_for_density(n, sp.target_densities[t.name]) == f
        assert t.backward_count == count_for_density(n, sp.target_backward_densities[t.name]) == b
    initial = snapshot_masks(sp)
    changed = False
    for step in range(31):
        masks = sp.masks()
        forward = [count(masks[n][0]) for n in NAMES]
        backward = [count(masks[n][1]) for n in NAMES]
        if selection == "layer":
            assert forward == FORWARD, step
            assert backward == BACKWARD, step
        else:
            assert sum(forward) == sum(FORWARD), step
            assert sum(backward) == sum(BACKWARD), step
        for a, b in masks.values():
            assert not bool((a & ~b).any()), f"A not inside B at step {step}"
        changed |= any(not torch.equal(masks[n][0], initial[n][0]) for n in NAMES)
        if step < 30:
            train_step(model, sp, opt, step)
    assert changed, "masks never changed: the test would not exercise mask updates"


@pytest.mark.parametrize("selection", ["layer", "global"])
def test_masks_are_topk_of_current_weights_after_refresh(selection: str) -> None:
    model, sp, opt = setup(selection=selection)

    def expected() -> tuple[list[Tensor], list[Tensor]]:
        scores = [w.detach().abs() for w in thetas(sp)]
        if selection == "layer":
            a = [topk_mask(s, k) for s, k in zip(scores, FORWARD, strict=True)]
            b = [topk_mask(s, k) for s, k in zip(scores, BACKWARD, strict=True)]
            return a, b
        return global_topk_masks(scores, sum(FORWARD)), global_topk_masks(scores, sum(BACKWARD))

    for step in range(8):
        a_exp, b_exp = expected()
        for t, a, b in zip(sp.tensors, a_exp, b_exp, strict=True):
            assert torch.equal(t.forward_mask, a), (step, t.name)
            assert torch.equal(t.grad_mask, b), (step, t.name)
        train_step(model, sp, opt, step)


# -- forward and backward passes ---------------------------------------------------------------


def test_forward_uses_theta_times_a_and_gradient_is_zero_outside_b() -> None:
    lam = 0.05
    model, sp, opt = setup(exploration_coefficient=lam)
    for step in range(3):
        train_step(model, sp, opt, step)
    opt.zero_grad()
    masks = snapshot_masks(sp)
    alphas = []
    for idx, t in zip([0, 2, 4], sp.tensors, strict=True):
        a, _ = masks[t.name]
        alpha = torch.where(a, t.weight.detach(), 0.0)
        assert torch.equal(model[idx].weight, alpha)
        alphas.append(alpha.clone().requires_grad_())
    loss_of(model, sp, 3).backward()

    # Reference: the dense gradient of the loss with respect to alpha, computed by hand.
    x, y = batch(3)
    biases = [model[i].bias.detach() for i in (0, 2, 4)]
    h = F.relu(F.linear(x, alphas[0], biases[0]))
    h = F.relu(F.linear(h, alphas[1], biases[1]))
    dense = torch.autograd.grad(F.mse_loss(F.linear(h, alphas[2], biases[2]), y), alphas)
    for t, g in zip(sp.tensors, dense, strict=True):
        a, b = masks[t.name]
        theta = t.weight.detach()
        grad = t.weight.grad
        assert grad is not None
        assert bool((grad[~b] == 0).all()), t.name
        assert bool((g[~b] != 0).any()), "dense gradient outside B should be non-zero"
        d = sp.target_densities[t.name]
        reg = torch.where(a, lam * theta, 0.0) + torch.where(b & ~a, lam * theta / d, 0.0)
        torch.testing.assert_close(grad, torch.where(b, g, 0.0) + reg, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("opt_name", ["adamw", "adam", "sgd"])
def test_entries_outside_b_are_bit_identical_and_state_zero(opt_name: str) -> None:
    model, sp, opt = setup(opt=opt_name, exploration_coefficient=1e-3)
    keys = {"adamw": ["exp_avg", "exp_avg_sq"], "adam": ["exp_avg", "exp_avg_sq"]}
    keys["sgd"] = ["momentum_buffer"]
    moved_inside = False
    for step in range(10):
        before = [w.detach().clone() for w in thetas(sp)]
        old = snapshot_masks(sp)
        opt.zero_grad()
        loss_of(model, sp, step).backward()
        opt.step()
        # The optimizer really moved entries outside B (weight decay, momentum) ...
        if step > 0:
            outside_moved = any(
                not torch.equal(w.detach()[~old[t.name][1]], w0[~old[t.name][1]])
                for t, w, w0 in zip(sp.tensors, thetas(sp), before, strict=True)
            )
            assert outside_moved, "weight decay should have moved entries outside B"
        sp.step(step, opt)
        # ... and sparsity.step put them back bit for bit.
        for t, w, w0 in zip(sp.tensors, thetas(sp), before, strict=True):
            outside = ~old[t.name][1]
            assert torch.equal(w.detach()[outside], w0[outside]), (step, t.name)
            moved_inside |= not torch.equal(w.detach()[~outside], w0[~outside])
            state = opt.state[w]
            entered = t.grad_mask & ~old[t.name][1]
            for key in keys[opt_name]:
                assert bool((state[key][outside] == 0).all()), (step, t.name, key)
                assert bool((state[key][entered] == 0).all()), (step, t.name, key)
                # Entries that just left B keep no stale history either.
                assert bool((state[key][~t.grad_mask] == 0).all()), (step, t.name, key)
                assert bool((state[key][~outside] != 0).any()), (step, t.name, key)
    assert moved_inside


def test_unsupported_optimizer_raises() -> None:
    model = make_model()
    sp = Sparsity(model, method="topkast", sparsity=0.8, backward_sparsity=0.5)
    opt = torch.optim.RMSprop(model.parameters(), lr=0.01)
    opt.zero_grad()
    loss_of(model, sp, 0).backward()
    opt.step()
    with pytest.raises(TypeError, match="RMSprop") as info:
        sp.step(0, opt)
    for name in ["torch.optim.SGD", "torch.optim.Adam", "torch.optim.AdamW"]:
        assert name in str(info.value)


# -- exploration regulariser --------------------------------------------------------------------

THETA = [0.1, -0.8, 0.3, 0.5, -0.05, 0.2, -0.6, 0.4]


def _single(norm: str, lam: float) -> tuple[nn.Module, Sparsity]:
    model = nn.Sequential(nn.Linear(8, 1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([THETA]))
    sp = Sparsity(
        model,
        method="topkast",
        sparsity=0.75,
        backward_sparsity=0.5,
        exploration_coefficient=lam,
        exploration_norm=norm,
    )
    return model, sp


def test_regularizer_l2_hand_worked() -> None:
    lam = 0.1
    model, sp = _single("l2", lam)
    # D = 0.25 -> A = 2 largest |theta| = {-0.8 (i=1), -0.6 (i=6)};
    # D + M = 0.5 -> B = 4 largest = A + {0.5 (i=3), 0.4 (i=7)}; C = the rest.
    a, b = sp.masks()["0.weight"]
    assert a.tolist() == [[False, True, False, False, False, False, True, False]]
    assert b.tolist() == [[False, True, False, True, False, False, True, True]]
    # R = lam/2 * (0.8^2 + 0.6^2 + (0.5^2 + 0.4^2) / 0.25) = 0.05 * (1.0 + 1.64) = 0.132
    reg = sp.regularizer()
    assert reg.shape == ()
    assert reg.item() == pytest.approx(lam / 2 * (0.64 + 0.36 + (0.25 + 0.16) / 0.25), rel=1e-6)
    assert reg.item() == pytest.approx(0.132, rel=1e-6)
    reg.backward()
    # dR/dtheta = lam*theta on A, lam*theta/D on B\A, 0 on C.
    expected = [0.0, lam * -0.8, 0.0, lam * 0.5 / 0.25, 0.0, 0.0, lam * -0.6, lam * 0.4 / 0.25]
    grad = sp.tensors[0].weight.grad
    assert grad is not None
    assert grad[0].tolist() == pytest.approx(expected, abs=1e-7)
    assert grad[0, [0, 2, 4, 5]].tolist() == [0.0, 0.0, 0.0, 0.0]


def test_regularizer_l1_hand_worked() -> None:
    lam = 0.1
    model, sp = _single("l1", lam)
    # R = lam * (0.8 + 0.6 + (0.5 + 0.4) / 0.25) = 0.1 * 5.0 = 0.5
    reg = sp.regularizer()
    assert reg.item() == pytest.approx(lam * (0.8 + 0.6 + (0.5 + 0.4) / 0.25), rel=1e-6)
    assert reg.item() == pytest.approx(0.5, rel=1e-6)
    reg.backward()
    # dR/dtheta = lam*sign(theta) on A, lam*sign(theta)/D on B\A, 0 on C.
    expected = [0.0, -lam, 0.0, lam / 0.25, 0.0, 0.0, -lam, lam / 0.25]
    grad = sp.tensors[0].weight.grad
    assert grad is not None
    assert grad[0].tolist() == pytest.approx(expected, abs=1e-7)


def test_regularizer_zero_coefficient_is_zero() -> None:
    _, sp = _single("l2", 0.0)
    reg = sp.regularizer()
    assert reg.shape == () and reg.item() == 0.0


# -- refresh interval ------------------------------------------------------------------------------


def test_refresh_every_n_steps() -> None:
    model, sp, opt = setup(refresh_interval=4)
    stale_seen = False
    refreshed_changed = False
    for step in range(12):
        before = snapshot_masks(sp)
        w_before = [w.detach().clone() for w in thetas(sp)]
        train_step(model, sp, opt, step)
        assert all(
            not torch.equal(w.detach(), w0) for w, w0 in zip(thetas(sp), w_before, strict=True)
        )
        after = sp.masks()
        for t, f, b in zip(sp.tensors, FORWARD, BACKWARD, strict=True):
            top_a = topk_mask(t.weight.detach().abs(), f)
            top_b = topk_mask(t.weight.detach().abs(), b)
            if (step + 1) % 4 != 0:
                assert torch.equal(after[t.name][0], before[t.name][0]), (step, t.name)
                assert torch.equal(after[t.name][1], before[t.name][1]), (step, t.name)
                stale_seen |= not torch.equal(after[t.name][0], top_a)
            else:
                assert torch.equal(after[t.name][0], top_a), (step, t.name)
                assert torch.equal(after[t.name][1], top_b), (step, t.name)
                refreshed_changed |= not torch.equal(after[t.name][0], before[t.name][0])
    assert stale_seen, "weights never moved enough for the top-k to differ between refreshes"
    assert refreshed_changed


# -- Table 1 ablations ----------------------------------------------------------------------------


def test_random_exploration() -> None:
    model, sp, opt = setup(random_exploration=True, seed=0)
    not_magnitude = 0
    for step in range(5):
        for t, f, b in zip(sp.tensors, FORWARD, BACKWARD, strict=True):
            scores = t.weight.detach().abs()
            a_mask, b_mask = t.forward_mask, t.grad_mask
            assert torch.equal(a_mask, topk_mask(scores, f)), (step, t.name)
            assert count(b_mask) == b
            assert not bool((a_mask & ~b_mask).any())
            not_magnitude += not torch.equal(b_mask, topk_mask(scores, b))
        train_step(model, sp, opt, step)
    assert not_magnitude >= 10  # B\A is essentially never the next-largest by magnitude

    def run(seed: int) -> dict[str, tuple[Tensor, Tensor]]:
        m, s, o = setup(random_exploration=True, seed=seed)
        for step in range(3):
            train_step(m, s, o, step)
        return snapshot_masks(s)

    first, again, other = run(7), run(7), run(8)
    for n in NAMES:
        assert torch.equal(first[n][0], again[n][0])
        assert torch.equal(first[n][1], again[n][1])
    assert any(not torch.equal(first[n][1], other[n][1]) for n in NAMES)


def test_magnitude_exploration_ignores_seed() -> None:
    _, sp0, _ = setup(seed=0)
    _, sp1, _ = setup(seed=1)
    for n in NAMES:
        assert torch.equal(sp0.masks()[n][1], sp1.masks()[n][1])


@pytest.mark.parametrize("refresh_interval", [1, 4])
def test_exploration_stop_step(refresh_interval: int) -> None:
    stop = 5
    model, sp, opt = setup(exploration_stop_step=stop, refresh_interval=refresh_interval)
    for step in range(13):
        masks = sp.masks()
        for n, f, b in zip(NAMES, FORWARD, BACKWARD, strict=True):
            a_mask, b_mask = masks[n]
            assert count(a_mask) == f
            if step < stop:
                assert count(b_mask) == b, (step, n)
                assert not bool((a_mask & ~b_mask).any())
            else:
                assert torch.equal(a_mask, b_mask), (step, n)
        if step >= stop and step % refresh_interval == 0:
            # Masks just refreshed: A is still the top-D of the current weights.
            for t, f in zip(sp.tensors, FORWARD, strict=True):
                assert torch.equal(t.forward_mask, topk_mask(t.weight.detach().abs(), f))
        train_step(model, sp, opt, step)


def test_exploration_stop_step_zero_never_explores() -> None:
    model, sp, opt = setup(exploration_stop_step=0)
    for step in range(6):
        for t, f in zip(sp.tensors, FORWARD, strict=True):
            assert torch.equal(t.forward_mask, t.grad_mask)
            assert count(t.forward_mask) == f
            assert torch.equal(t.forward_mask, topk_mask(t.weight.detach().abs(), f))
        train_step(model, sp, opt, step)


# -- configuration ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "pattern"),
    [
        ({"sparsity": 1.0}, r"sparsity must be in \[0, 1\)"),
        ({"sparsity": -0.1}, r"sparsity must be in \[0, 1\)"),
        ({"backward_sparsity": -0.1}, r"topkast\.backward_sparsity must be >= 0"),
        ({"sparsity": 0.8, "backward_sparsity": 0.9}, r"topkast\.backward_sparsity.*exceed"),
        ({"refresh_interval": 0}, r"topkast\.refresh_interval"),
        ({"method": "bogus"}, r"method must be one of.*'bogus'"),
        ({"selection": "bogus"}, r"topkast\.selection.*'bogus'"),
        ({"exploration_norm": "l3"}, r"topkast\.exploration_norm"),
        ({"exploration_coefficient": -1.0}, r"topkast\.exploration_coefficient"),
        ({"exploration_stop_step": -1}, r"topkast\.exploration_stop_step"),
        ({"distribution": "bogus"}, r"layout\.distribution"),
        ({"backend": "bogus"}, r"backend must be one of"),
    ],
)
def test_invalid_config_raises(options: dict[str, Any], pattern: str) -> None:
    kwargs: dict[str, Any] = {"method": "topkast"}
    kwargs.update(options)
    with pytest.raises(ValueError, match=pattern):
        Sparsity(make_model(), **kwargs)


def test_unknown_option_raises_type_error() -> None:
    with pytest.raises(TypeError, match="bogus_option") as info:
        Sparsity(make_model(), method="topkast", bogus_option=1)
    message = str(info.value)
    for valid in ["sparsity", "density", "refresh_interval", "backward_sparsity", "distribution"]:
        assert repr(valid) in message
    with pytest.raises(TypeError, match="refresh_interval"):
        Sparsity(make_model(), method="static", refresh_interval=2)
    with pytest.raises(TypeError, match="either sparsity or density"):
        Sparsity(make_model(), sparsity=0.8, density=0.2)


def test_density_option_is_one_minus_sparsity() -> None:
    sp = Sparsity(make_model(), method="topkast", density=0.2, backward_sparsity=0.5)
    assert sp.config.sparsity == pytest.approx(0.8)
    assert [count(a) for a, _ in sp.masks().values()] == FORWARD
    assert [count(b) for _, b in sp.masks().values()] == BACKWARD


def test_default_backward_density_is_twice_forward() -> None:
    assert TopKAST().backward_sparsity_for(0.9) == pytest.approx(0.8)
    assert TopKAST().backward_sparsity_for(0.95) == pytest.approx(0.9)
    assert TopKAST().backward_sparsity_for(0.3) == 0.0
    sp = Sparsity(make_model(), method="topkast", sparsity=0.9)
    assert sp.config.topkast.backward_sparsity is None
    # D = 0.1 -> B density 0.2: round(0.1 n) forward, round(0.2 n) backward.
    assert [t.forward_count for t in sp.tensors] == [51, 77, 19]  # 51.2, 76.8, 19.2
    assert [count(b) for _, b in sp.masks().values()] == [102, 154, 38]
    for d in sp.target_backward_densities.values():
        assert d == pytest.approx(0.2)
    dense_b = Sparsity(make_model(), method="topkast", sparsity=0.3)
    for t in dense_b.tensors:
        assert bool(t.grad_mask.all())
        assert count(t.forward_mask) == count_for_density(t.weight.numel(), 0.7)
