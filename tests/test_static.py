"""Tests for the static method: a fixed random mask of exact size."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from alwayssparse import Sparsity
from alwayssparse.masks import topk_mask

NAMES = ["0.weight", "2.weight", "4.weight"]
FORWARD = [102, 154, 38]  # round(0.2 * n) for n = 512, 768, 192


def make_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 8)
    )


def batch(step: int) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(2000 + step)
    return torch.randn(16, 16, generator=gen), torch.randn(16, 8, generator=gen)


def masks_of(seed: int, model_seed: int = 0) -> dict[str, Tensor]:
    sp = Sparsity(make_model(model_seed), method="static", sparsity=0.8, seed=seed)
    return {n: a.clone() for n, (a, _) in sp.masks().items()}


def test_static_counts_and_a_equals_b() -> None:
    sp = Sparsity(make_model(), method="static", sparsity=0.8, seed=0)
    masks = sp.masks()
    assert list(masks) == NAMES
    for (a, b), k in zip(masks.values(), FORWARD, strict=True):
        assert int(a.sum()) == k
        assert torch.equal(a, b)
    assert sp.regularizer().item() == 0.0
    assert sp.densities()["0.weight"] == (102 / 512, 102 / 512)


def test_static_masks_are_not_magnitude_based() -> None:
    sp = Sparsity(make_model(), method="static", sparsity=0.8, seed=0)
    for t, k in zip(sp.tensors, FORWARD, strict=True):
        assert not torch.equal(t.forward_mask, topk_mask(t.weight.detach().abs(), k))


def test_static_masks_never_change_and_outside_entries_frozen() -> None:
    model = make_model()
    sp = Sparsity(model, method="static", sparsity=0.8, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    initial = {n: a.clone() for n, (a, _) in sp.masks().items()}
    theta0 = [t.weight.detach().clone() for t in sp.tensors]
    for step in range(20):
        x, y = batch(step)
        opt.zero_grad()
        (F.mse_loss(model(x), y) + sp.regularizer()).backward()
        opt.step()
        sp.step(step, opt)
        for t in sp.tensors:
            assert torch.equal(t.forward_mask, initial[t.name]), (step, t.name)
            assert torch.equal(t.grad_mask, initial[t.name]), (step, t.name)
    for t, w0 in zip(sp.tensors, theta0, strict=True):
        mask = initial[t.name]
        w = t.weight.detach()
        assert torch.equal(w[~mask], w0[~mask]), t.name  # bit-identical despite weight decay
        assert not torch.equal(w[mask], w0[mask])  # the kept entries did train
        state = opt.state[t.weight]
        assert bool((state["exp_avg"][~mask] == 0).all())
        assert bool((state["exp_avg_sq"][~mask] == 0).all())
    for idx, t in zip([0, 2, 4], sp.tensors, strict=True):
        assert torch.equal(model[idx].weight, torch.where(initial[t.name], t.weight, 0.0))


def test_static_seed_reproducibility() -> None:
    first, again, other = masks_of(0), masks_of(0), masks_of(1)
    for n in NAMES:
        assert torch.equal(first[n], again[n])
    assert all(not torch.equal(first[n], other[n]) for n in NAMES)
    # The mask depends on the seed only, not on the weights.
    different_weights = masks_of(0, model_seed=5)
    for n in NAMES:
        assert torch.equal(first[n], different_weights[n])


def test_static_rejects_topkast_options() -> None:
    with pytest.raises(TypeError, match="backward_sparsity"):
        Sparsity(make_model(), method="static", sparsity=0.8, backward_sparsity=0.5)
