"""Tests for alwayssparse.layout: parameter classification and density distributions."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from alwayssparse.layout import (
    LayoutConfig,
    classify,
    erk_densities,
    layer_densities,
    summary_table,
    uniform_densities,
)


class Zoo(nn.Module):
    """One of every kind of parameter the layout distinguishes."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 6)
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc1 = nn.Linear(6, 8)
        self.ln = nn.LayerNorm(8)
        self.fc2 = nn.Linear(8, 5, bias=False)
        self.scale = nn.Parameter(torch.ones(5))


ZOO_DEFAULT = {
    "scale": (False, "other"),
    "emb.weight": (False, "embedding"),
    "conv.weight": (True, "conv2d"),
    "conv.bias": (False, "bias"),
    "bn.weight": (False, "norm"),
    "bn.bias": (False, "norm"),
    "fc1.weight": (True, "linear"),
    "fc1.bias": (False, "bias"),
    "ln.weight": (False, "norm"),
    "ln.bias": (False, "norm"),
    "fc2.weight": (True, "linear"),
}


def _classes(infos: list) -> dict[str, tuple[bool, str]]:
    return {i.name: (i.sparse, i.reason) for i in infos}


def test_default_classification() -> None:
    model = Zoo()
    infos = classify(model, LayoutConfig())
    assert _classes(infos) == ZOO_DEFAULT
    # Every parameter exactly once, in named_parameters() order.
    assert [i.name for i in infos] == [n for n, _ in model.named_parameters()]
    by_name = {i.name: i for i in infos}
    assert by_name["conv.weight"].shape == (4, 3, 3, 3)
    assert by_name["conv.weight"].numel == 108
    assert (by_name["conv.weight"].module_name, by_name["conv.weight"].attr) == ("conv", "weight")
    assert (by_name["scale"].module_name, by_name["scale"].attr) == ("", "scale")


def test_dense_first_last() -> None:
    infos = classify(Zoo(), LayoutConfig(dense_first_last=True))
    expected = dict(ZOO_DEFAULT)
    expected["conv.weight"] = (False, "first/last layer")
    expected["fc2.weight"] = (False, "first/last layer")
    assert _classes(infos) == expected


def test_patterns_win_over_dense_first_last() -> None:
    config = LayoutConfig(dense_first_last=True, sparse_patterns=["fc2.weight"])
    classes = _classes(classify(Zoo(), config))
    assert classes["fc2.weight"] == (True, "sparse_patterns")
    assert classes["conv.weight"] == (False, "first/last layer")


def test_sparse_embeddings() -> None:
    infos = classify(Zoo(), LayoutConfig(sparse_embeddings=True))
    expected = dict(ZOO_DEFAULT)
    expected["emb.weight"] = (True, "embedding (sparse_embeddings)")
    assert _classes(infos) == expected


def test_dense_and_sparse_patterns() -> None:
    config = LayoutConfig(dense_patterns=["fc1.*"], sparse_patterns=["scale", "bn.weight"])
    infos = classify(Zoo(), config)
    expected = dict(ZOO_DEFAULT)
    expected["fc1.weight"] = (False, "dense_patterns")
    expected["fc1.bias"] = (False, "dense_patterns")
    expected["scale"] = (True, "sparse_patterns")
    expected["bn.weight"] = (True, "sparse_patterns")
    assert _classes(infos) == expected
    # sparse_patterns are applied after dense_patterns.
    both = classify(Zoo(), LayoutConfig(dense_patterns=["fc*"], sparse_patterns=["fc2.weight"]))
    assert _classes(both)["fc2.weight"] == (True, "sparse_patterns")
    assert _classes(both)["fc1.weight"] == (False, "dense_patterns")


@pytest.mark.parametrize("field", ["dense_patterns", "sparse_patterns"])
def test_unmatched_pattern_raises(field: str) -> None:
    config = LayoutConfig(**{field: ["fc1.weight", "nothing.here*"]})
    with pytest.raises(ValueError, match=rf"layout\.{field}.*'nothing\.here\*'"):
        classify(Zoo(), config)


class TiedLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.hidden = nn.Linear(4, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.emb.weight


def test_tied_embedding_weight_is_dense() -> None:
    infos = classify(TiedLM(), LayoutConfig())
    assert _classes(infos) == {
        "emb.weight": (False, "embedding"),
        "hidden.weight": (True, "linear"),
        "hidden.bias": (False, "bias"),
    }
    # Making the tied table sparse would make a shared weight sparse: refused.
    with pytest.raises(ValueError, match="tied weights cannot be sparse"):
        classify(TiedLM(), LayoutConfig(sparse_embeddings=True))


def test_sparse_weight_shared_by_two_linears_raises() -> None:
    a, b = nn.Linear(4, 4), nn.Linear(4, 4)
    b.weight = a.weight
    model = nn.Sequential(a, nn.ReLU(), b)
    with pytest.raises(ValueError, match=r"'0\.weight' is shared by 0\.weight, 2\.weight"):
        classify(model, LayoutConfig())
    # Forcing it dense is the documented way out.
    infos = classify(model, LayoutConfig(dense_patterns=["0.weight"], sparse_patterns=["0.bias"]))
    assert _classes(infos)["0.weight"] == (False, "dense_patterns")


def test_nothing_sparse_raises() -> None:
    with pytest.raises(ValueError, match="no parameter sparse"):
        classify(nn.Sequential(nn.LayerNorm(4), nn.Embedding(3, 4)), LayoutConfig())
    with pytest.raises(ValueError, match="no parameter sparse"):
        classify(nn.Sequential(nn.Linear(3, 3)), LayoutConfig(dense_patterns=["*weight"]))


def test_invalid_distribution_raises() -> None:
    with pytest.raises(ValueError, match=r"layout\.distribution.*'bogus'"):
        classify(Zoo(), LayoutConfig(distribution="bogus"))
    infos = classify(Zoo(), LayoutConfig())
    with pytest.raises(ValueError, match=r"layout\.distribution"):
        layer_densities(infos, 0.5, "bogus")


def test_erk_hand_computed_with_saturation() -> None:
    # Linear weights (out, in): sizes n = 200, 400, 80 (sum 680); density 0.5 -> budget 340.
    # raw = (out + in) / (out * in) = 30/200 = 0.15, 40/400 = 0.1, 24/80 = 0.3
    # raw * n = 30, 40, 24 (sum 94) -> eps = 340 / 94 = 3.617...
    # eps * raw = 0.543, 0.362, 1.085 -> the third layer exceeds 1 and is made dense.
    # Re-solve: remaining = 340 - 80 = 260 over raw * n = 30 + 40 = 70 -> eps = 26/7
    # d = 0.15 * 26/7 = 39/70, 0.1 * 26/7 = 13/35, 1.0
    shapes = [(10, 20), (20, 20), (4, 20)]
    densities = erk_densities(shapes, 0.5)
    assert densities == pytest.approx([39 / 70, 13 / 35, 1.0], abs=1e-9)
    sizes = [math.prod(s) for s in shapes]
    assert sum(d * n for d, n in zip(densities, sizes, strict=True)) == pytest.approx(340, abs=1e-9)


def test_erk_hand_computed_with_conv_kernel() -> None:
    # Adds a conv weight (out, in, kh, kw) = (8, 4, 3, 3): n = 288, raw = (8+4+3+3)/288 = 0.0625.
    # sizes 200, 400, 80, 288 (sum 968); density 0.5 -> budget 484.
    # raw * n = 30, 40, 24, 18 (sum 112) -> eps = 484/112 = 4.321...; layer 3: 0.3 * eps > 1.
    # Re-solve: remaining 484 - 80 = 404 over 30 + 40 + 18 = 88 -> eps = 404/88 = 4.5909...
    # d = 0.15 * 404/88, 0.1 * 404/88, 1.0, 0.0625 * 404/88 (all other values < 1).
    shapes = [(10, 20), (20, 20), (4, 20), (8, 4, 3, 3)]
    densities = erk_densities(shapes, 0.5)
    eps = 404 / 88
    assert densities == pytest.approx([0.15 * eps, 0.1 * eps, 1.0, 0.0625 * eps], abs=1e-9)
    assert densities[0] == pytest.approx(0.6886363636363636, abs=1e-9)
    assert densities[3] == pytest.approx(0.2869318181818182, abs=1e-9)
    sizes = [math.prod(s) for s in shapes]
    kept = sum(d * n for d, n in zip(densities, sizes, strict=True))
    assert kept == pytest.approx(0.5 * sum(sizes), abs=1e-9)


def test_erk_cascading_saturation() -> None:
    # (1, 8): n=8, raw=9/8; (4, 8): n=32, raw=12/32=0.375; (32, 32): n=1024, raw=64/1024=0.0625.
    # density 0.2 -> budget 0.2 * 1064 = 212.8; raw * n = 9, 12, 64 (sum 85).
    # Round 1: eps = 212.8/85 = 2.5035 -> 1.125 * eps = 2.82 > 1 (dense); 0.375 * eps = 0.939.
    # Round 2: eps = (212.8 - 8)/76 = 2.6947 -> 0.375 * eps = 1.0105 > 1: now dense too.
    # Round 3: eps = (212.8 - 8 - 32)/64 = 2.7 -> d = 0.0625 * 2.7 = 0.16875.
    shapes = [(1, 8), (4, 8), (32, 32)]
    densities = erk_densities(shapes, 0.2)
    assert densities == pytest.approx([1.0, 1.0, 0.16875], abs=1e-9)
    kept = sum(d * math.prod(s) for d, s in zip(densities, shapes, strict=True))
    assert kept == pytest.approx(212.8, abs=1e-9)


def test_erk_without_saturation_and_at_full_density() -> None:
    # Square shapes (4,4) and (16,16): raw = 0.5 and 0.125, raw * n = 8 and 32; density 0.25 ->
    # budget 0.25 * 272 = 68, eps = 68/40 = 1.7 -> d = 0.85, 0.2125.
    assert erk_densities([(4, 4), (16, 16)], 0.25) == pytest.approx([0.85, 0.2125], abs=1e-9)
    assert erk_densities([(4, 4), (16, 16), (3, 5, 2)], 1.0) == pytest.approx([1.0, 1.0, 1.0])


@pytest.mark.parametrize("density", [0.0, -0.5, 1.5])
def test_densities_reject_out_of_range(density: float) -> None:
    with pytest.raises(ValueError, match="density"):
        erk_densities([(4, 4)], density)
    with pytest.raises(ValueError, match="density"):
        uniform_densities([(4, 4)], density)


def test_uniform_densities_and_layer_densities() -> None:
    assert uniform_densities([(2, 3), (4, 5, 6), (7,)], 0.3) == [0.3, 0.3, 0.3]
    infos = classify(Zoo(), LayoutConfig())
    assert layer_densities(infos, 0.3, "uniform") == {
        "conv.weight": 0.3,
        "fc1.weight": 0.3,
        "fc2.weight": 0.3,
    }
    erk = layer_densities(infos, 0.3, "erk")
    assert list(erk) == ["conv.weight", "fc1.weight", "fc2.weight"]
    assert list(erk.values()) == erk_densities([(4, 3, 3, 3), (8, 6), (5, 8)], 0.3)


def test_summary_table_lists_every_parameter() -> None:
    model = Zoo()
    infos = classify(model, LayoutConfig())
    table = summary_table(infos, layer_densities(infos, 0.5, "uniform"))
    lines = table.splitlines()
    assert lines[0].split() == ["parameter", "shape", "numel", "class", "reason", "density"]
    rows = {line.split()[0]: line.split() for line in lines[2:]}
    for name, param in model.named_parameters():
        sparse, reason = ZOO_DEFAULT[name]
        row = rows[name]
        assert row[1] == "x".join(map(str, param.shape))
        assert row[2] == str(param.numel())
        assert row[3] == ("sparse" if sparse else "dense")
        assert row[4] == reason
        assert row[5] == ("0.5000" if sparse else "1.0000")
    total = sum(p.numel() for p in model.parameters())
    sparse_n = 108 + 48 + 40
    assert rows["total"][1] == str(total)
    assert rows["total"][2] == f"{(total - sparse_n * 0.5) / total:.4f}"
