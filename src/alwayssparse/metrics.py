"""What a run measures (evaluations, densities, FLOPs) and where its records go: ``metrics.jsonl``,
TensorBoard, and the closing lines of the log."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from alwayssparse import distributed
from alwayssparse.flops import FlopLedger
from alwayssparse.jsonio import dumps_strict, write_text_atomic
from alwayssparse.runconfig import is_sparse_method
from alwayssparse.rundir import flatten, is_number
from alwayssparse.sparsity import Sparsity
from alwayssparse.tasks import Task


@torch.no_grad()
def evaluate(task: Task, model: nn.Module, split: str, batches: int) -> dict[str, float]:
    """The task's metrics on ``split`` over ``batches`` batches (0: the whole split), keyed
    ``{split}_{metric}``; every rank must call it."""
    # Every rank evaluates its share of the split (the task all-reduces the sums), with
    # rank 0's BatchNorm statistics, as DDP's convention has it.
    distributed.broadcast_batchnorm_stats(model)
    model.eval()
    # Cache alpha = theta * A once per evaluation instead of once per forward call.
    with parametrize.cached():
        metrics = task.evaluate(model, split, batches or None)
    model.train()
    return {f"{split}_{key}": value for key, value in metrics.items()}


def density_report(sparsity: Sparsity) -> dict[str, float]:
    """Forward and backward density actually used over the sparse tensors, and the explored
    degrees of freedom (fraction of sparse positions ever active); all 1.0 when nothing is
    sparse (dense)."""
    counts = sparsity.parameter_counts()
    sparse = counts["sparse"]
    if not sparse:
        return {"forward_density": 1.0, "backward_density": 1.0, "explored_dof": 1.0}
    return {
        "forward_density": (counts["forward"] - counts["dense"]) / sparse,
        "backward_density": (counts["backward"] - counts["dense"]) / sparse,
        "explored_dof": sparsity.explored_dof()["total"],
    }


def flop_report(ledger: FlopLedger, world_size: int = 1) -> dict[str, float]:
    """Training FLOPs so far and of the last step, over all processes (each process counts its
    own shard; the shards are equal), and the inference FLOPs of one example."""
    metrics = ledger.metrics()
    for key in ("train_flops", "step_flops"):
        if key in metrics:
            metrics[key] *= world_size
    return metrics


def format_summary(summary: dict[str, Any]) -> str:
    """The human-readable closing lines of a run."""
    params = summary["parameters"]
    metric = summary["metric"]
    lines = [
        f"method {summary['method']}: {summary['steps']} steps in {summary['train_seconds']:.1f} s",
        f"  valid {metric} {summary[f'valid_{metric}']:.4f}   "
        f"test {metric} {summary[f'test_{metric}']:.4f}",
        f"  FLOPs: {summary['train_flops']:.3e} training, "
        f"{summary['inference_flops']:.3e} inference per example",
        f"  density used: forward {summary['forward_density']:.4f}, "
        f"backward {summary['backward_density']:.4f} (over sparse tensors); "
        f"explored {summary['explored_dof']:.4f} of sparse positions",
    ]
    if "forward" in params and is_sparse_method(summary["method"]):
        lines.append(
            f"  parameters: {params['total']:,} total ({params['dense']:,} dense), "
            f"{params['forward']:,} used forward, {params['backward']:,} receive gradient"
        )
    else:
        lines.append(f"  parameters: {params['total']:,} (dense model)")
    return "\n".join(lines)


class MetricsLog:
    """Appends one JSON object per line to ``metrics.jsonl`` (when ``enabled``: on rank 0)."""

    def __init__(self, path: Path, enabled: bool = True) -> None:
        self.path = path
        self.enabled = enabled

    def write(self, record: dict[str, Any]) -> None:
        """Append ``record`` as strict JSON (a non-finite number is written as ``null``)."""
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(dumps_strict(record, nan_to_null=True) + "\n")

    def truncate_after(self, step: int) -> None:
        """Drop the records of steps after ``step`` (written by a run killed after its last
        checkpoint, which a resumed run writes again)."""
        if self.enabled:
            truncate_jsonl(self.path, step)


def truncate_jsonl(path: Path, step: int) -> None:
    """Keep the lines of a JSON-lines file whose ``step`` is at most ``step`` (atomically)."""
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
    if len(kept) != len(lines):
        write_text_atomic(path, "".join(line + "\n" for line in kept))


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
