"""Tests for alwayssparse.Sparsity: checkpoints, export, counts, ERK through the front door."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from alwayssparse import Sparsity
from alwayssparse.backends import BACKENDS
from alwayssparse.layout import erk_densities
from alwayssparse.masks import count_for_density
from alwayssparse.methods import METHODS

CONFIG: dict[str, Any] = {
    "method": "topkast",
    "sparsity": 0.8,
    "backward_sparsity": 0.5,
    "random_exploration": True,
    "exploration_coefficient": 1e-3,
}


def make_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 8)
    )


def batch(step: int) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(3000 + step)
    return torch.randn(16, 16, generator=gen), torch.randn(16, 8, generator=gen)


def make_run(model_seed: int = 0, seed: int = 0, **options: Any) -> tuple[nn.Module, Sparsity, Any]:
    model = make_model(model_seed)
    sp = Sparsity(model, seed=seed, **{**CONFIG, **options})
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    return model, sp, opt


def train(model: nn.Module, sp: Sparsity, opt: Any, steps: range) -> None:
    for step in steps:
        x, y = batch(step)
        opt.zero_grad()
        (F.mse_loss(model(x), y) + sp.regularizer()).backward()
        opt.step()
        sp.step(step, opt)


def masks_of(sp: Sparsity) -> dict[str, tuple[Tensor, Tensor]]:
    return {n: (a.clone(), b.clone()) for n, (a, b) in sp.masks().items()}


def assert_same(sp1: Sparsity, sp2: Sparsity) -> None:
    m1, m2 = sp1.masks(), sp2.masks()
    assert list(m1) == list(m2)
    for n in m1:
        assert torch.equal(m1[n][0], m2[n][0]), n
        assert torch.equal(m1[n][1], m2[n][1]), n
    for t1, t2 in zip(sp1.tensors, sp2.tensors, strict=True):
        assert torch.equal(t1.weight, t2.weight), t1.name


def test_checkpoint_round_trip_is_bit_identical(tmp_path: Path) -> None:
    model, sp, opt = make_run(seed=3)
    train(model, sp, opt, range(5))
    path = tmp_path / "ckpt.pt"
    torch.save(
        {"model": model.state_dict(), "sparsity": sp.state_dict(), "optim": opt.state_dict()},
        path,
    )
    train(model, sp, opt, range(5, 10))  # the uninterrupted reference run

    # Different initial weights and a different seed: everything must come from the checkpoint.
    fresh_model, fresh_sp, fresh_opt = make_run(model_seed=1, seed=99)
    ckpt = torch.load(path, weights_only=True)
    fresh_model.load_state_dict(ckpt["model"])
    fresh_sp.load_state_dict(ckpt["sparsity"])
    fresh_opt.load_state_dict(ckpt["optim"])
    saved = ckpt["model"]
    for t in fresh_sp.tensors:
        prefix = t.name.removesuffix(".weight") + ".parametrizations.weight."
        assert torch.equal(t.weight, saved[prefix + "original"])
        assert torch.equal(t.forward_mask, saved[prefix + "0.forward_mask"])
        assert torch.equal(t.grad_mask, saved[prefix + "0.grad_mask"])

    train(fresh_model, fresh_sp, fresh_opt, range(5, 10))
    assert_same(sp, fresh_sp)
    for p1, p2 in zip(model.parameters(), fresh_model.parameters(), strict=True):
        assert torch.equal(p1, p2)


def test_generator_state_matters_for_resume(tmp_path: Path) -> None:
    # Without the sparsity state the random B\A diverges: the test above is not vacuous.
    # model.state_dict() carries it (keys "_alwayssparse.*"); drop them to leave it out.
    model, sp, opt = make_run(seed=3)
    train(model, sp, opt, range(5))
    model_state = {k: v for k, v in model.state_dict().items() if "_alwayssparse." not in k}
    state = {"model": model_state, "optim": opt.state_dict()}
    torch.save(state, tmp_path / "ckpt.pt")
    train(model, sp, opt, range(5, 7))
    fresh_model, fresh_sp, fresh_opt = make_run(model_seed=1, seed=99)
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    fresh_model.load_state_dict(ckpt["model"])
    fresh_opt.load_state_dict(ckpt["optim"])
    train(fresh_model, fresh_sp, fresh_opt, range(5, 7))
    assert any(not torch.equal(sp.masks()[n][1], fresh_sp.masks()[n][1]) for n in sp.masks())


def test_model_state_dict_alone_resumes_exactly(tmp_path: Path) -> None:
    # The sparsity state travels inside model.state_dict(): what any trainer checkpoints.
    model, sp, opt = make_run(seed=3)
    train(model, sp, opt, range(5))
    torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, tmp_path / "ckpt.pt")
    train(model, sp, opt, range(5, 9))
    fresh_model, fresh_sp, fresh_opt = make_run(model_seed=1, seed=99)
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    fresh_model.load_state_dict(ckpt["model"])
    fresh_opt.load_state_dict(ckpt["optim"])
    assert fresh_sp.upcoming_step == 5
    train(fresh_model, fresh_sp, fresh_opt, range(5, 9))
    assert_same(sp, fresh_sp)


def test_model_load_state_dict_alone_is_not_undone(tmp_path: Path) -> None:
    model, sp, opt = make_run(seed=3)
    train(model, sp, opt, range(4))
    torch.save(model.state_dict(), tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=True)

    other_model, other_sp, other_opt = make_run(model_seed=1, seed=5)
    train(other_model, other_sp, other_opt, range(2))  # its own snapshot and optimizer state
    other_model.load_state_dict(loaded)
    # Loaded values outside B must survive the next step (the pre-load snapshot must not return).
    before = {t.name: (t.weight.detach().clone(), t.grad_mask.clone()) for t in other_sp.tensors}
    for t in other_sp.tensors:
        prefix = t.name.removesuffix(".weight") + ".parametrizations.weight."
        assert torch.equal(t.weight, loaded[prefix + "original"])
        assert torch.equal(t.grad_mask, loaded[prefix + "0.grad_mask"])
    train(other_model, other_sp, other_opt, range(2, 3))
    for t in other_sp.tensors:
        w0, b = before[t.name]
        assert torch.equal(t.weight.detach()[~b], w0[~b]), t.name


def test_load_state_dict_with_different_config_raises() -> None:
    _, sp, _ = make_run()
    state = sp.state_dict()
    _, other, _ = make_run(sparsity=0.9)
    with pytest.raises(ValueError, match="sparsity"):
        other.load_state_dict(state)
    _, other, _ = make_run(refresh_interval=5)
    with pytest.raises(ValueError, match="topkast"):
        other.load_state_dict(state)


def test_state_dict_contents() -> None:
    model, sp, opt = make_run(seed=3)
    train(model, sp, opt, range(5))
    state = sp.state_dict()
    assert set(state) == {"config", "generator", "ever_active", "upcoming_step"}
    assert state["upcoming_step"] == 5
    for name, (a, _) in sp.masks().items():
        assert bool((state["ever_active"][name] | ~a).all())  # A is always explored
    assert state["config"]["method"] == "topkast"
    assert state["config"]["topkast"]["random_exploration"] is True
    assert torch.equal(state["generator"], sp.generator.get_state())


def test_export_leaves_plain_linear_with_theta_times_a() -> None:
    model, sp, opt = make_run()
    train(model, sp, opt, range(3))
    expected = [torch.where(t.forward_mask, t.weight, 0.0).detach().clone() for t in sp.tensors]
    x, _ = batch(0)
    with torch.no_grad():
        out_before = model(x)
    sp.export()
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    for idx, w in zip([0, 2, 4], expected, strict=True):
        layer = model[idx]
        assert type(layer) is nn.Linear
        assert isinstance(layer.weight, nn.Parameter)
        assert torch.equal(layer.weight, w)
        assert int(torch.count_nonzero(layer.weight)) <= w.numel() // 5 + 1
    assert set(model.state_dict()) == {
        "0.weight",
        "0.bias",
        "2.weight",
        "2.bias",
        "4.weight",
        "4.bias",
    }
    with torch.no_grad():
        assert torch.equal(model(x), out_before)


def test_parameter_counts() -> None:
    model, sp, opt = make_run()
    train(model, sp, opt, range(2))
    counts = sp.parameter_counts()
    biases = 32 + 24 + 8
    assert counts["total"] == sum(p.numel() for p in model.parameters()) == 1472 + biases
    assert counts["dense"] == biases
    assert counts["sparse"] == 1472
    assert counts["forward"] == biases + 102 + 154 + 38
    assert counts["backward"] == biases + 256 + 384 + 96
    masks = sp.masks().values()
    assert counts["forward"] == biases + sum(int(a.sum()) for a, _ in masks)
    densities = sp.densities()
    assert densities["2.weight"] == (154 / 768, 384 / 768)


def test_erk_distribution_counts() -> None:
    model = make_model()
    sp = Sparsity(model, method="topkast", sparsity=0.8, backward_sparsity=0.5, distribution="erk")
    shapes = [(32, 16), (24, 32), (8, 24)]
    forward = erk_densities(shapes, 1.0 - 0.8)
    backward = erk_densities(shapes, 1.0 - 0.5)
    assert list(sp.target_densities.values()) == pytest.approx(forward)
    assert len(set(sp.target_densities.values())) == 3  # genuinely non-uniform
    for t, d, db in zip(sp.tensors, forward, backward, strict=True):
        n = t.weight.numel()
        assert int(t.forward_mask.sum()) == count_for_density(n, d)
        assert int(t.grad_mask.sum()) == max(count_for_density(n, d), count_for_density(n, db))
    # The kept total is the budget 0.2 * 1472 = 294.4, up to per-tensor rounding.
    total = sum(int(t.forward_mask.sum()) for t in sp.tensors)
    assert abs(total - 0.2 * 1472) <= 1.5


def test_summary_lists_all_parameters() -> None:
    _, sp, _ = make_run()
    table = sp.summary()
    for name in ["0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"]:
        row = next(line for line in table.splitlines() if line.split()[0] == name)
        assert ("sparse" if name.endswith("weight") else "dense") in row.split()


def test_attach_twice_raises() -> None:
    model = make_model()
    Sparsity(model, **CONFIG)
    with pytest.raises(ValueError, match="already parametrized"):
        Sparsity(model, **CONFIG)


def _snapshot(model: nn.Module) -> tuple[list[int], list[int], dict[str, torch.Tensor]]:
    modules = [id(m) for m in model.modules()]
    params = [id(p) for p in model.parameters()]
    return modules, params, {k: v.clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model: nn.Module, before: tuple) -> None:
    modules, params, state = _snapshot(model)
    assert modules == before[0] and params == before[1]
    assert state.keys() == before[2].keys()
    assert all(torch.equal(state[k], before[2][k]) for k in state)


def _transposed_conv_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8), nn.Unflatten(1, (8, 1, 1)),
                         nn.ConvTranspose2d(8, 8, 1), nn.Flatten(), nn.Linear(8, 8))  # fmt: skip


def test_failed_construction_names_the_cause_and_changes_nothing() -> None:
    """A transposed conv forced sparse under RigL fails after the other layers were attached: the
    message names ConvTranspose2d (not ParametrizedConvTranspose2d) and the model is as it was,
    so a retry works. (Grouped and depthwise convs are supported: tests/test_hf.py.)"""
    model = _transposed_conv_model()
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"3\.weight: .*not ConvTranspose2d"):
        Sparsity(model, method="rigl", total_steps=10, dense_first_last=False,
                 sparse_patterns=["3.weight"])  # fmt: skip
    _assert_unchanged(model, before)
    Sparsity(model, method="rigl", total_steps=10, dense_first_last=False)


@pytest.mark.parametrize(
    "backend", [b for b, cls in BACKENDS.items() if cls.devices is None or "cpu" in cls.devices]
)
def test_construction_is_all_or_nothing_on_every_backend(
    backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An error after the backend attached and the method wrote into the weights."""

    def failing_init(self: Any, tensors: Any, generator: Any) -> None:
        for t in tensors:
            with torch.no_grad():
                t.weight.mul_(0.0)
        raise RuntimeError("init failed")

    monkeypatch.setattr(METHODS["static"], "init_masks", failing_init)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.Linear(16, 16))
    before = _snapshot(model)
    with pytest.raises(RuntimeError, match="init failed"):
        Sparsity(model, method="static", backend=backend, block_size=4, dense_first_last=False)
    _assert_unchanged(model, before)


def test_swapped_step_arguments_are_named() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    sp = Sparsity(model, method="static", sparsity=0.5, dense_first_last=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="arguments are swapped"):
        sp.step(optimizer, 0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="step must be an int"):
        sp.step(1.5, optimizer)  # type: ignore[arg-type]
