"""Checkpoints of a run, and files written atomically (a crash never leaves half a file).

A checkpoint holds everything that affects how training continues: the model (masks included),
the optimizer, the sparsity state, the batch generator, the task's data position (and
Transformer-XL's recurrence memories), every random state of every rank (torch, CUDA, numpy,
Python: dropout included), the mask-dynamics and FLOP records and the resolved config. Resuming
from it gives the run an uninterrupted one would have given, bit for bit.

Loading refuses anything that is not such a checkpoint with a :class:`CheckpointError` naming
the file and what is wrong (damaged, not a checkpoint, of another run), and never unpickles
anything but tensors and plain values (``weights_only=True``).
"""

from __future__ import annotations

import pickle
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from alwayssparse.jsonio import atomic_write, write_json_atomic
from alwayssparse.rng import capture_rng_state, restore_rng_state
from alwayssparse.sparsity import Sparsity
from alwayssparse.tasks import Task

CHECKPOINT_FORMAT = 1
REQUIRED_KEYS = ("format", "step", "model", "optimizer", "sparsity", "batch_generator", "task")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: the message names the file and the problem."""


class Stateful(Protocol):
    """An object whose state a checkpoint holds (mask dynamics, the FLOP ledger...)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` through :func:`atomic_write`."""
    atomic_write(path, lambda f: torch.save(obj, f))


def write_json(obj: Any, path: Path) -> None:
    """Write ``obj`` as indented strict JSON (non-finite numbers as ``null``), atomically."""
    write_json_atomic(obj, path, nan_to_null=True)


def save_checkpoint(
    path: Path,
    step: int,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    sparsity: Sparsity,
    batch_generator: torch.Generator,
    task: Task,
    config: dict[str, Any],
    extras: Mapping[str, Stateful | None],
    per_rank: list[dict[str, Any]] | None = None,
) -> None:
    """Write the checkpoint of ``step`` atomically; ``extras`` are further objects saved under
    their names (``None`` saved as ``None``), ``config`` the run's resolved configuration,
    ``per_rank`` each process's ``{"rng": ..., "task": ...}`` (default: this process's)."""
    if per_rank is None:
        per_rank = [{"rng": capture_rng_state(), "task": task.state_dict()}]
    state = {
        "format": CHECKPOINT_FORMAT,
        "step": step,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "sparsity": sparsity.state_dict(),
        "batch_generator": batch_generator.get_state(),
        "task": task.state_dict(),
        **{key: None if value is None else value.state_dict() for key, value in extras.items()},
        "config": config,
        "per_rank": per_rank,
    }
    atomic_save(state, path)


def load_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    sparsity: Sparsity,
    batch_generator: torch.Generator,
    task: Task,
    extras: Mapping[str, Stateful | None] | None = None,
    *,
    rank: int = 0,
    world_size: int = 1,
) -> int:
    """Restore a checkpoint; return its step. ``extras`` are further objects with
    ``load_state_dict`` (or ``None``), restored from the entry of the same name when the
    checkpoint has one. A dense run's checkpoint from before dense was a method has no sparsity
    state (``None``); there is nothing to restore then."""
    state = read_checkpoint(path)
    _load_model(path, model, state["model"])
    try:
        optimizer.load_state_dict(state["optimizer"])
    except (ValueError, KeyError, RuntimeError) as error:
        raise CheckpointError(
            f"{path}: its optimizer state does not fit this run ({error})"
        ) from None
    if state["sparsity"] is not None:
        sparsity.load_state_dict(state["sparsity"])
    batch_generator.set_state(state["batch_generator"])
    per_rank = state.get("per_rank")
    if per_rank is not None and len(per_rank) == world_size:
        task.load_state_dict(per_rank[rank]["task"])
        restore_rng_state(per_rank[rank]["rng"])
    else:
        task.load_state_dict(state["task"])
        if per_rank is not None:
            warnings.warn(
                f"{path} was written by {len(per_rank)} processes, this run has {world_size}: "
                "random states (dropout) and per-rank task state start afresh, so the resumed "
                "run is not bit-identical to an uninterrupted one",
                RuntimeWarning,
                stacklevel=2,
            )
    for key, target in (extras or {}).items():
        if target is not None and state.get(key) is not None:
            target.load_state_dict(state[key])
    return int(state["step"])


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The contents of a checkpoint file, checked to be one (:class:`CheckpointError` if not)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except pickle.UnpicklingError as error:
        if "weights_only" in str(error) or "Unsupported global" in str(error):
            raise CheckpointError(
                f"{path} holds Python objects other than tensors and plain values; it was not "
                "written by alwayssparse and is refused (loading it could run arbitrary code)"
            ) from None
        raise CheckpointError(f"{path} is damaged or not a checkpoint ({error})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, IndexError, ValueError, KeyError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CheckpointError(
            f"{path} is damaged (truncated or corrupt) or not a checkpoint: {reason}"
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(
            f"{path} is not an alwayssparse checkpoint (a {type(state).__name__})"
        )
    missing = [key for key in REQUIRED_KEYS if key not in state]
    if missing:
        raise CheckpointError(f"{path} is not a complete checkpoint: it lacks {missing}")
    if state["format"] != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path}: unsupported checkpoint format {state['format']!r} "
            f"(this version reads format {CHECKPOINT_FORMAT})"
        )
    return state


def _load_model(path: Path, model: nn.Module, state: Any) -> None:
    """``model.load_state_dict`` with a one-line message when the keys or shapes differ."""
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: its model entry is not a state dict")
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        k for k in own
        if k in state and isinstance(state[k], torch.Tensor) and state[k].shape != own[k].shape
    ]  # fmt: skip
    if missing or unexpected or shapes:
        details = [
            f"{len(items)} {what} (e.g. {items[0]})"
            for what, items in (
                ("missing", missing),
                ("unexpected", unexpected),
                ("of another shape", shapes),
            )  # fmt: skip
            if items
        ]
        raise CheckpointError(
            f"{path} does not fit this run's model: {', '.join(details)} parameters; was it "
            "written by a run of another task, model or sparsity config?"
        )
    model.load_state_dict(state)
