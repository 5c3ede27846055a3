"""Where a run's metrics records go besides ``metrics.jsonl``: TensorBoard."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from alwayssparse.rundir import flatten, is_number


class TensorBoardLogger:
    """Writes metrics records as TensorBoard scalars into ``run_dir`` (optional dependency).

    Every numeric field of a record becomes a scalar tagged ``{kind}/{field}`` (nested dicts,
    like the per-layer fields of dynamics records, as ``{kind}/{field}/{name}``) at the record's
    ``step`` (``steps`` for the final record).

    Args:
        run_dir: Where the event files go (the run directory).

    Raises:
        ImportError: If TensorBoard is not installed.
    """

    def __init__(self, run_dir: str | Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as error:
            raise ImportError(
                "TensorBoard logging needs the tensorboard package: "
                "pip install 'alwayssparse[tensorboard]'"
            ) from error
        self._writer = SummaryWriter(log_dir=str(run_dir))

    def log(self, record: Mapping[str, Any], kind: str | None = None) -> None:
        """Write every numeric field of ``record`` at its step; ``kind`` (default the record's
        ``kind`` field, else ``"dynamics"``) prefixes the tags."""
        step = record.get("step", record.get("steps"))
        if not isinstance(step, int) or isinstance(step, bool):
            raise ValueError(f"a record needs an integer 'step', got {step!r}")
        prefix = kind or str(record.get("kind", "dynamics"))
        fields = {k: v for k, v in record.items() if k not in ("step", "steps", "kind")}
        for tag, value in flatten(fields).items():
            if is_number(value):
                self._writer.add_scalar(f"{prefix}/{tag.replace('.', '/')}", value, step)

    def flush(self) -> None:
        """Push pending events to disk."""
        self._writer.flush()

    def close(self) -> None:
        """Flush and close the event file."""
        self._writer.close()
