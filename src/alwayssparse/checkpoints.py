"""Checkpoints of a run, and files written atomically (a crash never leaves half a file)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from alwayssparse.sparsity import Sparsity
from alwayssparse.tasks import Task

CHECKPOINT_FORMAT = 1


class Stateful(Protocol):
    """An object whose state a checkpoint holds (mask dynamics, the FLOP ledger...)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def atomic_save(obj: Any, path: Path) -> None:
    """Write to a temporary file and rename, so a crash never leaves a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def write_json(obj: Any, path: Path) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


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
) -> None:
    """Write the checkpoint of ``step`` atomically; ``extras`` are further objects saved under
    their names (``None`` saved as ``None``), ``config`` the run's resolved configuration."""
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
) -> int:
    """Restore a checkpoint; return its step. ``extras`` are further objects with
    ``load_state_dict`` (or ``None``), restored from the entry of the same name when the
    checkpoint has one. A dense run's checkpoint from before dense was a method has no sparsity
    state (``None``); there is nothing to restore then."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: unsupported checkpoint format {state.get('format')}")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if state["sparsity"] is not None:
        sparsity.load_state_dict(state["sparsity"])
    batch_generator.set_state(state["batch_generator"])
    task.load_state_dict(state["task"])
    for key, target in (extras or {}).items():
        if target is not None and state.get(key) is not None:
            target.load_state_dict(state[key])
    return int(state["step"])
