"""Global RNG capture and restore (alwayssparse.rng)."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from alwayssparse.rng import capture_rng_state, restore_rng_state


def _draw() -> list[object]:
    """One draw from every global generator, including NumPy's and random's cached Gaussians."""
    draws: list[object] = [
        torch.rand(5).tolist(),
        torch.randint(0, 1000, (3,)).tolist(),
        np.random.rand(4).tolist(),
        float(np.random.standard_normal()),  # leaves a cached Gaussian in NumPy's state
        random.random(),
        random.gauss(0.0, 1.0),  # leaves random.gauss_next set
    ]
    if torch.cuda.is_available():
        for device in range(torch.cuda.device_count()):
            draws.append(torch.rand(3, device=f"cuda:{device}").tolist())
    return draws


def test_round_trip_replays_the_same_draws() -> None:
    _draw()
    state = capture_rng_state()
    first = _draw()
    assert _draw() != first  # the generators moved on
    restore_rng_state(state)
    assert _draw() == first


def test_state_survives_torch_save_weights_only(tmp_path: Path) -> None:
    _draw()
    path = tmp_path / "rng.pt"
    torch.save({"rng": capture_rng_state()}, path)
    first = _draw()
    loaded = torch.load(path, weights_only=True)["rng"]
    restore_rng_state(loaded)
    assert _draw() == first


def test_capture_does_not_alias_live_state() -> None:
    state = capture_rng_state()
    saved = state["torch"].clone()
    torch.rand(10)
    assert torch.equal(state["torch"], saved)


def test_invalid_state_raises() -> None:
    with pytest.raises(ValueError, match="lacks"):
        restore_rng_state({"torch": torch.get_rng_state()})
    state = capture_rng_state()
    state["format"] = 99
    with pytest.raises(ValueError, match="format 99"):
        restore_rng_state(state)
    with pytest.raises(ValueError, match="must be a dict"):
        restore_rng_state([])  # type: ignore[arg-type]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_device_count_mismatch_raises() -> None:
    state = capture_rng_state()
    state["cuda"] = state["cuda"] * 2
    with pytest.raises(ValueError, match="CUDA device"):
        restore_rng_state(state)


def test_seed_everything_makes_processes_agree() -> None:
    import random

    import numpy as np

    from alwayssparse.rng import seed_everything

    draws = []
    for _ in range(2):
        seed_everything(7)
        draws.append((torch.rand(3).tolist(), np.random.rand(3).tolist(), random.random()))
    assert draws[0] == draws[1]
