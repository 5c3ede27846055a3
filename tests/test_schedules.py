"""Tests for alwayssparse.schedules and the learning-rate rule of dynsparse-bert.md eq. 3."""

from __future__ import annotations

import math
from typing import Any

import pytest

from alwayssparse.schedules import UpdateSchedule, cubic_sparsity, sparse_learning_rate
from alwayssparse.train import RunConfig, base_learning_rate

# -- update steps -------------------------------------------------------------------------------


def test_update_steps_interval_10_from_0() -> None:
    schedule = UpdateSchedule(interval=10, start=0, stop=50, drop_fraction=0.3)
    assert schedule.update_steps() == [10, 20, 30, 40]
    # u = 0 is never an update (nothing has been trained yet); u = stop is excluded.
    for u, expected in [(0, False), (1, False), (9, False), (10, True), (11, False),
                        (40, True), (49, False), (50, False), (60, False)]:  # fmt: skip
        assert schedule.is_update(u) is expected, u


def test_update_steps_with_start_15() -> None:
    schedule = UpdateSchedule(interval=10, start=15, stop=50, drop_fraction=0.3)
    assert schedule.update_steps() == [15, 25, 35, 45]
    for u, expected in [(5, False), (10, False), (14, False), (15, True), (20, False),
                        (25, True), (45, True), (50, False), (55, False)]:  # fmt: skip
        assert schedule.is_update(u) is expected, u


def test_update_steps_interval_1_and_empty_range() -> None:
    assert UpdateSchedule(1, 0, 4, 0.3).update_steps() == [1, 2, 3]
    assert UpdateSchedule(3, 7, 7, 0.3).update_steps() == []


# -- drop fraction ------------------------------------------------------------------------------


def test_cosine_fraction_at_start_middle_stop() -> None:
    schedule = UpdateSchedule(interval=10, start=20, stop=120, drop_fraction=0.3, decay="cosine")
    assert schedule.fraction(20) == pytest.approx(0.3, abs=1e-15)
    assert schedule.fraction(70) == pytest.approx(0.15, abs=1e-15)
    assert schedule.fraction(120) == pytest.approx(0.0, abs=1e-15)
    # 25 % of the way: alpha / 2 * (1 + cos(pi / 4)) = 0.15 * (1 + 0.70710678...) = 0.25606602
    assert schedule.fraction(45) == pytest.approx(0.15 * (1 + math.sqrt(2) / 2), abs=1e-12)
    assert schedule.fraction(45) == pytest.approx(0.2560660171779821, abs=1e-12)
    # 75 %: 0.15 * (1 - 0.70710678) = 0.04393398
    assert schedule.fraction(95) == pytest.approx(0.04393398282201788, abs=1e-12)
    # Outside [start, stop] the progress is clamped.
    assert schedule.fraction(0) == pytest.approx(0.3, abs=1e-15)
    assert schedule.fraction(500) == pytest.approx(0.0, abs=1e-15)


def test_linear_fraction() -> None:
    schedule = UpdateSchedule(interval=1, start=0, stop=100, drop_fraction=0.4, decay="linear")
    assert schedule.fraction(0) == pytest.approx(0.4)
    assert schedule.fraction(25) == pytest.approx(0.3)
    assert schedule.fraction(50) == pytest.approx(0.2)
    assert schedule.fraction(100) == pytest.approx(0.0)
    assert schedule.fraction(150) == pytest.approx(0.0)


def test_constant_fraction() -> None:
    schedule = UpdateSchedule(interval=5, start=10, stop=20, drop_fraction=0.25, decay="constant")
    assert [schedule.fraction(u) for u in (0, 10, 15, 19, 20, 1000)] == [0.25] * 6


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"interval": 0}, "interval"),
        ({"interval": -3}, "interval"),
        ({"start": -1}, "start"),
        ({"start": 10, "stop": 5}, "start"),
        ({"drop_fraction": 1.5}, "drop_fraction"),
        ({"drop_fraction": -0.1}, "drop_fraction"),
        ({"decay": "exponential"}, "exponential"),
    ],
)
def test_invalid_schedule_arguments_raise(kwargs: dict[str, Any], match: str) -> None:
    arguments: dict[str, Any] = {
        "interval": 10, "start": 0, "stop": 50, "drop_fraction": 0.3, "decay": "cosine",
    }  # fmt: skip
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=match):
        UpdateSchedule(**arguments)


# -- cubic sparsity (Zhu & Gupta) ---------------------------------------------------------------


def test_cubic_sparsity_hand_computed() -> None:
    s_i, s_f, t0, t_end = 0.2, 0.9, 10, 50
    assert cubic_sparsity(10, s_i, s_f, t0, t_end) == pytest.approx(0.2)
    assert cubic_sparsity(50, s_i, s_f, t0, t_end) == pytest.approx(0.9)
    # Midpoint: 0.9 + (0.2 - 0.9) * 0.5^3 = 0.9 - 0.0875 = 0.8125
    assert cubic_sparsity(30, s_i, s_f, t0, t_end) == pytest.approx(0.8125)
    # A quarter of the way: 0.9 - 0.7 * 0.75^3 = 0.9 - 0.2953125 = 0.6046875
    assert cubic_sparsity(20, s_i, s_f, t0, t_end) == pytest.approx(0.6046875)
    # Outside the range: s_i before t0, s_f after t_end.
    assert cubic_sparsity(0, s_i, s_f, t0, t_end) == pytest.approx(0.2)
    assert cubic_sparsity(5, s_i, s_f, t0, t_end) == pytest.approx(0.2)
    assert cubic_sparsity(51, s_i, s_f, t0, t_end) == pytest.approx(0.9)
    assert cubic_sparsity(10_000, s_i, s_f, t0, t_end) == pytest.approx(0.9)


def test_cubic_sparsity_from_dense_is_monotone() -> None:
    values = [cubic_sparsity(t, 0.0, 0.75, 0, 4) for t in range(6)]
    # 0.75 * (1 - (1 - t/4)^3): 0, 0.43359375, 0.65625, 0.73828125, 0.75, 0.75
    assert values == pytest.approx([0.0, 0.43359375, 0.65625, 0.73828125, 0.75, 0.75])


# -- learning-rate rule (eq. 3) -----------------------------------------------------------------


def test_sparse_learning_rate_eq3() -> None:
    expected = math.exp(1.969 * 0.81 + 0.2905 * 0.9)
    assert sparse_learning_rate(1.0, 0.9) == pytest.approx(expected, rel=1e-12)
    assert sparse_learning_rate(1.0, 0.9) == pytest.approx(6.4003, abs=1e-4)
    assert sparse_learning_rate(2e-4, 0.9) == pytest.approx(2e-4 * 6.400268867, rel=1e-9)
    # s = 0.5: exp(1.969 * 0.25 + 0.2905 * 0.5) = exp(0.63750) = 1.8919...
    assert sparse_learning_rate(1.0, 0.5) == pytest.approx(math.exp(0.6375), rel=1e-12)
    assert sparse_learning_rate(3e-3, 0.0) == 3e-3


@pytest.mark.parametrize("sparsity", [1.0, 1.5, -0.1])
def test_sparse_learning_rate_rejects_out_of_range(sparsity: float) -> None:
    with pytest.raises(ValueError, match="sparsity"):
        sparse_learning_rate(1e-3, sparsity)


def _run_config(method: str, scaling: bool) -> RunConfig:
    config = RunConfig()
    config.optim.lr = 1e-3
    config.optim.sparsity_lr_scaling = scaling
    config.sparsity.method = method
    config.sparsity.sparsity = 0.9
    return config


def test_base_learning_rate_scaling_on_off_and_dense() -> None:
    assert base_learning_rate(_run_config("dynsparse", True)) == pytest.approx(
        1e-3 * math.exp(1.969 * 0.81 + 0.2905 * 0.9), rel=1e-12
    )
    assert base_learning_rate(_run_config("static", True)) == pytest.approx(6.400269e-3, rel=1e-6)
    assert base_learning_rate(_run_config("dynsparse", False)) == 1e-3
    # A dense run has no sparsity: the rule never applies, whatever sparsity.sparsity says.
    assert base_learning_rate(_run_config("dense", True)) == 1e-3
    assert base_learning_rate(_run_config("dense", False)) == 1e-3
