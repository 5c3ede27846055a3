"""Reading run directories: metrics and dynamics records, summaries, and the results of finished
runs that a sweep compares (see :mod:`alwayssparse.train` for what a run directory holds)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alwayssparse.dynamics import DYNAMICS_FILE
from alwayssparse.runconfig import is_sparse_method
from alwayssparse.tasks import TASKS

# Settings that do not change what a run computes: runs differing only in these are seeds.
_NOT_CONFIG = ("train.seed", "train.device", "train.threads", "train.reuse_host_memory")


def _read_jsonl(path: Path, key: Any) -> list[dict[str, Any]]:
    """Records of a JSON-lines file; of records with equal ``key(record)``, the last wins (a
    resumed run repeats the steps it logged after its last checkpoint)."""
    if not path.exists():
        return []
    latest: dict[Any, dict[str, Any]] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: not a JSON record ({error})") from None
        latest.pop(key(record), None)
        latest[key(record)] = record
    return sorted(latest.values(), key=lambda r: r.get("step", math.inf))


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of ``metrics.jsonl`` (kinds ``train``, ``eval``, ``final``) by step; ``[]``
    when the file is missing."""
    return _read_jsonl(Path(run_dir) / "metrics.jsonl", lambda r: (r.get("kind"), r.get("step")))


def read_dynamics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of ``dynamics.jsonl`` (see :class:`~alwayssparse.dynamics.MaskDynamics`)."""
    return _read_jsonl(Path(run_dir) / DYNAMICS_FILE, lambda r: r.get("step"))


def read_json(path: Path) -> dict[str, Any]:
    """The JSON object in ``path`` (``summary.json``, ``config.json``) of a finished run."""
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: not a finished run directory")
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def higher_is_better(metric: str) -> bool:
    """Direction of a task metric: accuracies go up, losses, BPC and perplexities go down."""
    return metric.endswith("accuracy")


def model_size(config: Mapping[str, Any]) -> str:
    """A short model-size label from a run's ``config.json``, by the size rule of its task
    (:meth:`~alwayssparse.tasks.Task.size_label`): ``BERT-Mini`` (Turc et al.'s family),
    ``L2/d128`` (transformers), ``resnet50`` (ResNets); ``"?"`` for a task not registered."""
    task = config.get("task", "")
    section, rule = config.get(task), TASKS.get(task)
    return rule.size_label(section) if rule is not None and isinstance(section, dict) else "?"


def is_number(value: Any) -> bool:
    """Whether ``value`` is a finite int or float (not a bool)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested mapping as one level of dotted keys (``{"a": {"b": 1}}`` -> ``{"a.b": 1}``)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


@dataclass(frozen=True)
class RunResult:
    """One finished run of a sweep, read from its ``config.json`` and ``summary.json``.

    Attributes:
        path: The run directory.
        method: Method name (``"dense"`` for dense runs).
        sparsity: Forward sparsity (0 for dense runs).
        backward_sparsity: Sparsity of the gradient set B actually used (1 - backward density).
        size: Model-size label (:func:`model_size`).
        seed: ``train.seed``.
        task: Task name; ``metric`` its headline metric, ``value`` its validation value.
        train_flops: Training FLOPs of the whole run, ``None`` if not recorded.
        inference_flops: FLOPs of one inference forward pass, ``None`` if not recorded.
        parameters: Total parameter count.
        group_key: The configuration without seed and device: runs sharing it are seeds.
    """

    path: Path
    method: str
    sparsity: float
    backward_sparsity: float
    size: str
    seed: int
    task: str
    metric: str
    value: float
    train_flops: float | None
    inference_flops: float | None
    parameters: int
    group_key: str = field(repr=False)

    @property
    def dense(self) -> bool:
        """Whether the run's method made nothing sparse (the dense family of a sweep)."""
        return not is_sparse_method(self.method)


def read_run(run_dir: str | Path) -> RunResult:
    """The :class:`RunResult` of a finished run directory."""
    run_dir = Path(run_dir)
    summary = read_json(run_dir / "summary.json")
    config = read_json(run_dir / "config.json")
    metric = summary["metric"]
    if f"valid_{metric}" not in summary:
        raise ValueError(f"{run_dir}/summary.json lacks valid_{metric}")
    flat = {k: v for k, v in flatten(config).items() if k not in _NOT_CONFIG}
    dense = not is_sparse_method(summary["method"])
    return RunResult(
        path=run_dir,
        method=summary["method"],
        sparsity=0.0 if dense else float(config["sparsity"]["sparsity"]),
        backward_sparsity=round(1.0 - float(summary.get("backward_density", 1.0)), 6),
        size=model_size(config),
        seed=int(config.get("train", {}).get("seed", 0)),
        task=summary["task"],
        metric=metric,
        value=float(summary[f"valid_{metric}"]),
        train_flops=summary.get("train_flops"),
        inference_flops=summary.get("inference_flops"),
        parameters=int(summary.get("parameters", {}).get("total", 0)),
        group_key=json.dumps(flat, sort_keys=True),
    )


def collect_runs(sweep_dir: str | Path) -> list[RunResult]:
    """Every finished run (a subdirectory holding summary.json and config.json), by name."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"{sweep_dir} is not a directory")
    return [
        read_run(d)
        for d in sorted(sweep_dir.iterdir())
        if (d / "summary.json").exists() and (d / "config.json").exists()
    ]
