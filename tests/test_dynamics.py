"""Mask dynamics: the measures on hand-made mask sequences, the tracker, resume, a real Sparsity."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from alwayssparse.dynamics import (
    DYNAMICS_FILE,
    PATTERN_FILE,
    MaskDynamics,
    density,
    largest_tensor,
    layer_summary,
    mask_change_fraction,
    reservoir_entered_fraction,
)
from alwayssparse.sparsity import Sparsity


def _m(*rows: str) -> Tensor:
    """A bool mask from strings of 0/1, one per row."""
    return torch.tensor([[c == "1" for c in row] for row in rows])


def test_change_fraction_counts_flips_both_ways() -> None:
    previous, current = _m("11000000"), _m("10100000")
    assert mask_change_fraction(previous, current) == 2 / 8  # one left A, one entered
    assert mask_change_fraction(current, current) == 0.0
    assert mask_change_fraction(_m("1111"), _m("0000")) == 1.0
    with pytest.raises(ValueError, match="shapes differ"):
        mask_change_fraction(_m("11"), _m("110"))
    with pytest.raises(TypeError, match="bool"):
        mask_change_fraction(torch.ones(2), torch.ones(2))


def test_reservoir_fraction_and_density() -> None:
    reservoir = _m("00111100")  # C_0: four positions outside B at initialisation
    ever = _m("11010001")  # one of them, position 3, has been in A
    assert reservoir_entered_fraction(reservoir, ever) == 1 / 4
    assert reservoir_entered_fraction(_m("0000"), _m("1111")) is None  # no reservoir: undefined
    assert density(ever) == 4 / 8
    assert layer_summary({"a": 0.25, "b": 0.5, "c": 0.0}) == {"min": 0.0, "mean": 0.25, "max": 0.5}
    assert layer_summary({}) == {"min": None, "mean": None, "max": None}
    shapes = {"x": torch.Size([2, 4]), "y": torch.Size([3, 3]), "z": torch.Size([9])}
    assert largest_tensor(shapes) == "y"  # 9 elements; the first of the tied ones


class _Sequence:
    """A mask source replaying hand-made (A, B) masks; ``index`` picks the current ones."""

    def __init__(self, frames: list[dict[str, tuple[Tensor, Tensor]]]) -> None:
        self.frames, self.index = frames, 0

    def masks(self) -> dict[str, tuple[Tensor, Tensor]]:
        return self.frames[self.index]


def _frames() -> list[dict[str, tuple[Tensor, Tensor]]]:
    """Layer ``a`` (2x4) is Top-KAST-like (B\\A = position (0, 2) at first); ``b`` has B = A."""
    b_only = _m("0010", "0000")
    a0, a1, a2 = _m("1100", "0000"), _m("1010", "0000"), _m("1000", "0001")
    return [
        {"a": (a0, a0 | b_only), "b": (_m("1000"), _m("1000"))},
        {"a": (a1, a1 | _m("0100", "0000")), "b": (_m("0100"), _m("0100"))},
        {"a": (a2, a2), "b": (_m("0100"), _m("0100"))},
    ]


def _replay(tracker: MaskDynamics, source: _Sequence, steps: list[int]) -> list[dict]:
    records = []
    for index, step in enumerate(steps):
        source.index = index
        records.append(tracker.record(step))
    return records


def test_tracker_on_a_hand_made_sequence() -> None:
    source = _Sequence(_frames())
    tracker = MaskDynamics(source, interval=10)
    assert tracker.pattern_layer == "a"  # the largest tensor
    assert tracker.due(0) and not tracker.due(5) and tracker.due(10)
    first, second, third = _replay(tracker, source, [0, 10, 20])
    assert not tracker.due(20) and tracker.due(30)

    assert first["previous_step"] is None and first["change_fraction"] == {}
    assert first["change_fraction_mean"] is None and first["change_fraction_total"] is None
    assert first["reservoir_entered"] == {"a": 0.0, "b": 0.0}
    assert first["explored_dof"] == {"a": 2 / 8, "b": 1 / 4}

    # 0 -> 10: a swaps (0,1) for (0,2): 2 of 8 flip; b swaps 0 for 1: 2 of 4.
    assert second["previous_step"] == 0
    assert second["change_fraction"] == {"a": 0.25, "b": 0.5}
    assert (second["change_fraction_min"], second["change_fraction_max"]) == (0.25, 0.5)
    assert second["change_fraction_mean"] == pytest.approx(0.375)
    assert second["change_fraction_total"] == pytest.approx(4 / 12)  # pooled over positions
    # (0, 2) was in B\A at initialisation, so it is not part of the reservoir C_0 of ``a``.
    assert second["reservoir_entered"] == {"a": 0.0, "b": 1 / 3}

    # 10 -> 20: a drops (0,2) and takes (1,3), a position of C_0; b unchanged.
    assert third["change_fraction"] == {"a": 0.25, "b": 0.0}
    assert third["change_fraction_min"] == 0.0 and third["change_fraction_mean"] == 0.125
    assert third["reservoir_entered"] == {"a": 1 / 5, "b": 1 / 3}
    assert third["reservoir_entered_total"] == pytest.approx(2 / 8)
    assert third["explored_dof"] == {"a": 4 / 8, "b": 2 / 4}
    assert third["explored_dof_total"] == pytest.approx(6 / 12)
    assert third["forward_density"] == {"a": 2 / 8, "b": 1 / 4}
    assert third["backward_density"] == {"a": 2 / 8, "b": 1 / 4}
    assert third["pattern_points"] == 3 and third["pattern_layer"] == "a"
    expected = torch.tensor([[3, 1, 1, 0], [0, 0, 0, 1]], dtype=torch.int32)
    assert torch.equal(tracker.pattern, expected)
    json.dumps(third, allow_nan=False)  # records are plain JSON

    with pytest.raises(ValueError, match="must increase"):
        tracker.record(20)


def test_write_to_appends_records_and_saves_the_pattern(tmp_path: Path) -> None:
    source = _Sequence(_frames())
    tracker = MaskDynamics(source, interval=10, pattern_layer="b")
    _replay(tracker, source, [0, 10])
    tracker.write_to(tmp_path)
    source.index = 2
    tracker.record(20)
    tracker.write_to(tmp_path)
    lines = (tmp_path / DYNAMICS_FILE).read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [0, 10, 20]
    pattern = np.load(tmp_path / PATTERN_FILE)
    assert pattern.tolist() == [[1, 2, 0, 0]]  # layer b, as a (1, 4) matrix


def test_resume_continues_exactly() -> None:
    full_source = _Sequence(_frames())
    full = MaskDynamics(full_source, interval=10)
    expected = _replay(full, full_source, [0, 10, 20])[-1]

    source = _Sequence(_frames())
    part = MaskDynamics(source, interval=10)
    _replay(part, source, [0, 10])
    state = part.state_dict()
    source.frames[0]["a"][0][0, 0] = False  # the saved state must not alias the source's masks
    resumed = MaskDynamics(source, interval=10)
    resumed.load_state_dict(state)
    source.index = 2
    assert resumed.record(20) == expected
    assert torch.equal(resumed.pattern, full.pattern)

    with pytest.raises(ValueError, match="interval"):
        MaskDynamics(source, interval=5).load_state_dict(state)
    with pytest.raises(ValueError, match="pattern_layer"):
        MaskDynamics(source, interval=10, pattern_layer="b").load_state_dict(state)


def test_invalid_arguments() -> None:
    source = _Sequence(_frames())
    with pytest.raises(ValueError, match="interval must be >= 1"):
        MaskDynamics(source, interval=0)
    with pytest.raises(ValueError, match="'c' is not a sparse tensor"):
        MaskDynamics(source, interval=1, pattern_layer="c")


def test_real_sparsity_matches_its_own_bookkeeping() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(),
                          nn.Linear(16, 4))  # fmt: skip
    sparsity = Sparsity(model, method="topkast", sparsity=0.8, backward_sparsity=0.6)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    tracker = MaskDynamics(sparsity, interval=3)
    tracker.record(0)
    previous = {name: a.clone() for name, (a, _) in sparsity.masks().items()}
    x, y = torch.randn(64, 16), torch.randn(64, 4)
    for step in range(6):
        loss = nn.functional.mse_loss(model(x), y) + sparsity.regularizer()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        sparsity.step(step, optimizer)
        if tracker.due(step + 1):
            record = tracker.record(step + 1)
            if step + 1 == 3:
                at_three = {name: a.clone() for name, (a, _) in sparsity.masks().items()}
    masks = sparsity.masks()
    assert record["step"] == 6 and record["previous_step"] == 3
    assert record["change_fraction"] == pytest.approx(
        {n: (at_three[n] ^ a).sum().item() / a.numel() for n, (a, _) in masks.items()}
    )
    assert record["explored_dof"] == pytest.approx(
        {k: v for k, v in sparsity.explored_dof().items() if k != "total"}
    )
    assert record["explored_dof_total"] == pytest.approx(sparsity.explored_dof()["total"])
    densities = sparsity.densities()
    assert record["forward_density"] == pytest.approx({k: d[0] for k, d in densities.items()})
    assert record["backward_density"] == pytest.approx({k: d[1] for k, d in densities.items()})
    assert max(record["backward_density"].values()) > max(record["forward_density"].values())
    # The masks moved under a large learning rate, and the tracker's snapshot did not alias them.
    changed = sum(int((previous[n] ^ a).sum()) for n, (a, _) in masks.items())
    assert changed > 0 and record["explored_dof_total"] > record["forward_density_total"]
    assert tracker.pattern_layer == "0.weight"  # 16x32 = 32x16 elements, the first one wins
