"""A run's configuration: the task's section, optimizer, loop and sparsity, in one dataclass.

The task sections come from the task registry: :class:`RunConfig` holds one section per
registered task, named by it (``config.lm``, ``config.xl``...), an instance of the task's
``config_class``. A new task adds its section by registering
(:func:`alwayssparse.tasks.register_task`), with no edit here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alwayssparse import distributed
from alwayssparse.config import from_dict, registry_sections
from alwayssparse.methods import METHODS
from alwayssparse.sparsity import SparsityConfig
from alwayssparse.tasks import TASKS

OPTIMIZERS = ("adamw", "adam", "sgd")
LR_SCHEDULES = ("cosine", "linear", "step", "constant")


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule.

    Attributes:
        name: ``"adamw"``, ``"adam"`` or ``"sgd"`` (with momentum).
        lr: Peak learning rate.
        weight_decay: Decoupled (AdamW) or L2 (Adam, SGD) decay on matrices only (not on
            biases, norms); Top-KAST's own penalty is ``sparsity.topkast.exploration_coefficient``.
        beta1: Adam beta1, or SGD momentum.
        beta2: Adam beta2.
        eps: Adam epsilon.
        warmup_steps: Linear warm-up from ``warmup_initial_lr`` to ``lr``.
        warmup_initial_lr: Where the warm-up starts (Transformer-XL: 1e-7).
        schedule: After warm-up: ``"cosine"`` decay to ``min_lr_ratio * lr`` at the last step
            (Transformer-XL), ``"linear"`` decay to ``min_lr_ratio * lr`` (BERT), ``"step"``
            drops by ``drop_factor`` at the fractions ``drop_at`` of the run (ResNet-50: x0.1 at
            epochs 30, 70, 90 of ~100), or ``"constant"``.
        min_lr_ratio: Final learning rate as a fraction of ``lr`` (cosine, linear).
        drop_at: Fractions of the run where ``"step"`` multiplies the rate by ``drop_factor``.
        drop_factor: The factor of each drop.
        grad_clip: Clip the global gradient norm to this (0 disables).
        sparsity_lr_scaling: Multiply ``lr`` by exp(1.969 s^2 + 0.2905 s) for sparsity s, the
            BERT paper's rule for the learning rate of sparse models (dynsparse-bert.md eq. 3).
        fused: Adam/AdamW through torch's fused kernel (one pass per tensor) where torch has
            one for the parameters' device and dtype, else the plain loop. On CPU it is about
            twice as fast, and the plain loop's ``sqrt`` is several times slower on zeros, which
            fill the optimizer state outside B of a masked model
            (``benchmarks/whole_model.py --optimizer``).
    """

    name: str = "adamw"
    lr: float = 2e-3
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.99
    eps: float = 1e-8
    warmup_steps: int = 50
    warmup_initial_lr: float = 0.0
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    drop_at: list[float] = field(default_factory=lambda: [0.3, 0.7, 0.9])
    drop_factor: float = 0.1
    grad_clip: float = 1.0
    sparsity_lr_scaling: bool = False
    fused: bool = True

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field if the configuration is invalid."""
        if self.name not in OPTIMIZERS:
            raise ValueError(f"optim.name must be one of {list(OPTIMIZERS)}, got {self.name!r}")
        if self.schedule not in LR_SCHEDULES:
            raise ValueError(
                f"optim.schedule must be one of {list(LR_SCHEDULES)}, got {self.schedule!r}"
            )
        for key in ("lr", "eps"):
            if getattr(self, key) <= 0:
                raise ValueError(f"optim.{key} must be > 0, got {getattr(self, key)}")
        for key in ("weight_decay", "warmup_steps", "grad_clip"):
            if getattr(self, key) < 0:
                raise ValueError(f"optim.{key} must be >= 0, got {getattr(self, key)}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


@dataclass
class LoopConfig:
    """Length, batching, evaluation and bookkeeping of a run.

    Attributes:
        steps: Optimizer steps.
        batch_size: Sequences per step (each ``model.context`` bytes).
        eval_interval: Validate every this many steps (and at the end).
        eval_batches: Validation batches per evaluation during training.
        final_eval_batches: Batches for the final validation and test BPC (0: whole split).
        log_interval: Write a metrics line every this many steps.
        checkpoint_interval: Save a checkpoint every this many steps (and at the end).
        seed: Seeds the model init, the batches and the sparsity method's generator.
        device: ``"auto"`` (CUDA if available), ``"cpu"``, ``"cuda"``, ``"cuda:1"``... Under
            several processes (torchrun) ``"auto"`` and ``"cuda"`` mean ``cuda:LOCAL_RANK``.
        threads: CPU threads for PyTorch (0 leaves PyTorch's default).
        reuse_host_memory: Make glibc's malloc keep freed memory for reuse, so CPU steps do not
            page-fault on the activations they allocate again
            (:func:`alwayssparse.host_memory.reuse_freed_memory`; a setting of the process,
            nothing elsewhere than glibc).
        dist_timeout: Seconds a collective waits for the other processes before the run fails
            (a dead or stuck rank then stops the job instead of hanging it).
        dist_check_interval: Under several processes, check every this many steps that all
            ranks hold bit-identical parameters, masks and sparsity state (0: only when a
            checkpoint is written, which always checks).
        sync_batchnorm: Under several processes, BatchNorm uses the statistics of the global
            batch (SyncBatchNorm, CUDA only; on CPU set it to false: per-process statistics).
        dynamics_interval: Record mask dynamics every this many steps (``None``: 50 points
            over the run; 0: off). Sparse runs only.
        pattern_layer: The sparse tensor whose accumulated mask pattern is kept (default: the
            largest).
        flop_scope: Count FLOPs only inside modules whose name matches one of these ``fnmatch``
            patterns (empty: the whole model). The BERT presets use ``["layers"]``, the
            encoder, which is what the BERT paper's FLOP figures count.
        report: Write ``report.md`` and its plots into the run directory at the end.
        tensorboard: Also write every metrics record as TensorBoard scalars (needs the
            ``tensorboard`` extra).
    """

    steps: int = 1000
    batch_size: int = 32
    eval_interval: int = 250
    eval_batches: int = 20
    final_eval_batches: int = 100
    log_interval: int = 10
    checkpoint_interval: int = 250
    seed: int = 0
    device: str = "auto"
    threads: int = 0
    reuse_host_memory: bool = True
    dist_timeout: float = distributed.DEFAULT_TIMEOUT
    dist_check_interval: int = 0
    sync_batchnorm: bool = True
    dynamics_interval: int | None = None
    pattern_layer: str | None = None
    flop_scope: list[str] = field(default_factory=list)
    report: bool = True
    tensorboard: bool = False

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field if the configuration is invalid."""
        for key in ("steps", "batch_size", "eval_interval", "log_interval"):
            if getattr(self, key) < 1:
                raise ValueError(f"train.{key} must be >= 1, got {getattr(self, key)}")
        for key in ("eval_batches", "final_eval_batches", "checkpoint_interval", "threads",
                    "dist_check_interval"):  # fmt: skip
            if getattr(self, key) < 0:
                raise ValueError(f"train.{key} must be >= 0, got {getattr(self, key)}")
        if self.dynamics_interval is not None and self.dynamics_interval < 0:
            raise ValueError(
                f"train.dynamics_interval must be >= 0 or None, got {self.dynamics_interval}"
            )
        if self.dist_timeout <= 0:
            raise ValueError(f"train.dist_timeout must be > 0 seconds, got {self.dist_timeout}")


@registry_sections(TASKS, lambda task: task.config_class)
@dataclass
class RunConfig:
    """A whole run: the task, optimizer, loop, and sparsity (``sparsity.method="dense"`` trains
    the ordinary dense model); besides these fields, one section per registered task (``lm``,
    ``xl``, ``bert``, ``image``...), of which ``task`` selects the one trained."""

    task: str = "lm"
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: LoopConfig = field(default_factory=LoopConfig)
    sparsity: SparsityConfig = field(default_factory=SparsityConfig)

    if TYPE_CHECKING:

        def __getattr__(self, name: str) -> Any: ...  # the task sections

    def task_config(self) -> Any:
        """The section of the selected task."""
        if self.task not in TASKS or not hasattr(self, self.task):
            raise ValueError(f"task must be one of {sorted(TASKS)}, got {self.task!r}")
        return getattr(self, self.task)

    def validate(self) -> None:
        """Check every section before anything is built; errors name the field."""
        self.task_config().validate()
        self.optim.validate()
        self.train.validate()
        if self.sparsity.method not in METHODS:
            raise ValueError(
                f"sparsity.method must be one of {sorted(METHODS)}, got {self.sparsity.method!r}"
            )
        self.sparsity.validate()


def is_sparse_method(name: str) -> bool:
    """Whether the method ``name`` makes anything sparse (``False`` for ``"dense"``), asked of
    the method registry; a name it does not know counts as sparse (validation rejects it)."""
    method = METHODS.get(name)
    return method is None or method.sparse


def load_run_config(run_dir: str | Path) -> RunConfig:
    """The resolved configuration saved in a run directory."""
    path = Path(run_dir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: not a run directory")
    return from_dict(RunConfig, json.loads(path.read_text()))
