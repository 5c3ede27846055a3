"""The process-wide random number generators, captured and restored for exact resumes.

A checkpoint that restores the model and optimizer but not the global generators resumes with
different dropout masks, different NumPy draws and different ``random`` choices than the run it
continues. :func:`capture_rng_state` records every global generator that training code may
draw from:

* ``torch``: the CPU generator (``torch.get_rng_state``);
* ``cuda``: one state per CUDA device, when CUDA is available (an empty list otherwise);
* ``numpy``: NumPy's legacy global generator (``np.random.get_state``);
* ``python``: the ``random`` module's generator.

The result holds only tensors, ints, floats, strings, lists and dicts, so it can be stored with
``torch.save`` and read back with ``torch.load(..., weights_only=True)``. Explicit
``torch.Generator`` objects (the batch generator of the training loop) are separate and saved
with their owners.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

__all__ = ["capture_rng_state", "restore_rng_state", "seed_everything"]

_FORMAT = 1
_KEYS = ("format", "torch", "cuda", "numpy", "python")


def seed_everything(seed: int) -> None:
    """Seed every global generator (torch CPU and CUDA, NumPy, ``random``) from ``seed``, so
    that two processes given one seed draw the same numbers (NumPy's is otherwise seeded from
    the operating system)."""
    torch.manual_seed(seed)  # CPU and every CUDA device
    np.random.seed(seed % 2**32)
    random.seed(seed)


def _numpy_state() -> dict[str, Any]:
    """NumPy's global state as a dict of a tensor and plain numbers."""
    name, key, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    return {
        "bit_generator": str(name),
        "key": torch.from_numpy(np.asarray(key, dtype=np.int64)),  # uint32 values fit int64
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached_gaussian),
    }


def _set_numpy_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`_numpy_state`."""
    key = np.asarray(torch.as_tensor(state["key"]).numpy(), dtype=np.uint32)
    np.random.set_state(
        (
            state["bit_generator"],
            key,
            int(state["pos"]),
            int(state["has_gauss"]),
            float(state["cached_gaussian"]),
        )
    )


def _python_state() -> dict[str, Any]:
    """``random``'s state (a version, 625 ints, a cached Gaussian or None) as a dict."""
    version, internal, gauss_next = random.getstate()
    return {"version": int(version), "internal": list(internal), "gauss_next": gauss_next}


def _set_python_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`_python_state`."""
    random.setstate((state["version"], tuple(state["internal"]), state["gauss_next"]))


def capture_rng_state() -> dict[str, Any]:
    """The states of the global generators (torch CPU, every CUDA device, NumPy, ``random``).

    Returns:
        A dict that ``torch.save`` stores and ``torch.load(weights_only=True)`` reads back.
    """
    cuda = [s.clone() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else []
    return {
        "format": _FORMAT,
        "torch": torch.get_rng_state().clone(),
        "cuda": cuda,
        "numpy": _numpy_state(),
        "python": _python_state(),
    }


def _check_state(state: dict[str, Any]) -> None:
    """Raises ValueError unless ``state`` looks like :func:`capture_rng_state`'s result."""
    if not isinstance(state, dict):
        raise ValueError(f"RNG state must be a dict, got {type(state).__name__}")
    missing = [key for key in _KEYS if key not in state]
    if missing:
        raise ValueError(f"RNG state lacks {missing}; it was not made by capture_rng_state")
    if state["format"] != _FORMAT:
        raise ValueError(f"RNG state has format {state['format']!r}, expected {_FORMAT}")


def _restore_cuda(states: list[torch.Tensor]) -> None:
    """Restores per-device CUDA states; ignored without CUDA (nothing can draw from them).

    Raises:
        ValueError: If CUDA is available with a different number of devices than were saved.
    """
    if not states or not torch.cuda.is_available():
        return
    count = torch.cuda.device_count()
    if len(states) != count:
        raise ValueError(
            f"RNG state holds {len(states)} CUDA device state(s) but this process sees {count} "
            "CUDA device(s); resume with the same devices (CUDA_VISIBLE_DEVICES)"
        )
    torch.cuda.set_rng_state_all(states)


def restore_rng_state(state: dict[str, Any]) -> None:
    """Restores the global generators from :func:`capture_rng_state`'s result.

    CUDA states are ignored when CUDA is not available; states captured without CUDA leave the
    CUDA generators as they are.

    Raises:
        ValueError: If ``state`` is not such a result, or the CUDA device count differs.
    """
    _check_state(state)
    _restore_cuda(list(state["cuda"]))
    torch.set_rng_state(torch.as_tensor(state["torch"], dtype=torch.uint8))
    _set_numpy_state(state["numpy"])
    _set_python_state(state["python"])
