"""Training any task (model family), dense or sparse, with a run directory.

The loop in :func:`train` reads top to bottom: data, model, sparsity, optimizer, then steps. The
three sparsity lines are marked. A run directory holds:

    config.json     the resolved configuration
    layout.txt      which parameters are sparse or dense, and why
    metrics.jsonl   one JSON object per logged training step or evaluation
    checkpoint.pt   model (with masks), optimizer, sparsity and RNG state; resumes the run
    summary.json    final validation/test metrics, densities, FLOPs, parameter counts
    flops.txt       training FLOPs per layer: forward, input gradient, weight gradient
    dynamics.jsonl  mask dynamics at recorded points (changed fraction, reservoir entered A,
                    explored degrees of freedom, per-layer density); pattern.npy: the
                    accumulated forward pattern of one layer (sparse runs)
    report.md       a one-page report, with its plots in plots/ (``train.report``)
    events.*        TensorBoard event files (``train.tensorboard``)
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize
from tqdm import tqdm

from alwayssparse import distributed
from alwayssparse.backends import SparseLinear
from alwayssparse.config import from_dict, to_dict
from alwayssparse.dynamics import MaskDynamics
from alwayssparse.flops import FlopLedger
from alwayssparse.methods import METHODS
from alwayssparse.metrics import TensorBoardLogger
from alwayssparse.models import TransformerLMConfig, bert_config
from alwayssparse.models.resnet import ResNetConfig
from alwayssparse.models.transformer_xl import (
    enwik8_large,
    enwik8_small,
    enwik8_tiny,
    wikitext103_large,
)
from alwayssparse.report import write_run_report
from alwayssparse.schedules import sparse_learning_rate
from alwayssparse.sparsity import Sparsity, SparsityConfig
from alwayssparse.tasks import TASKS, BertTaskConfig, ImageTaskConfig, LMConfig, Task, XLConfig

OPTIMIZERS = ("adamw", "adam", "sgd")
LR_SCHEDULES = ("cosine", "linear", "step", "constant")
DENSE = "dense"  # the method name of an ordinary dense run (no Sparsity object)
CHECKPOINT_FORMAT = 1


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


@dataclass
class RunConfig:
    """A whole run: the task and its section (model and data), optimizer, loop, and sparsity
    (``sparsity.method="dense"`` trains the ordinary dense model)."""

    task: str = "lm"
    lm: LMConfig = field(default_factory=LMConfig)
    xl: XLConfig = field(default_factory=XLConfig)
    bert: BertTaskConfig = field(default_factory=BertTaskConfig)
    image: ImageTaskConfig = field(default_factory=ImageTaskConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: LoopConfig = field(default_factory=LoopConfig)
    sparsity: SparsityConfig = field(default_factory=SparsityConfig)

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
        if self.sparsity.method != DENSE:
            if self.sparsity.method not in METHODS:
                choices = sorted([*METHODS, DENSE])
                raise ValueError(
                    f"sparsity.method must be one of {choices}, got {self.sparsity.method!r}"
                )
            self.sparsity.validate()


# -- presets: code, not files ------------------------------------------------------------------


def _quickstart() -> RunConfig:
    """Top-KAST (90% forward, 80% backward sparsity) on the standard-library corpus; ~2 min."""
    config = RunConfig()
    config.lm.model = TransformerLMConfig(n_layer=2, n_head=4, d_model=128, d_ff=512, context=128)
    config.sparsity.method = "topkast"
    config.sparsity.sparsity = 0.9
    config.sparsity.topkast.backward_sparsity = 0.8
    return config


def _tiny() -> RunConfig:
    """A seconds-long run for smoke tests."""
    config = _quickstart()
    config.lm.model = TransformerLMConfig(n_layer=1, n_head=2, d_model=32, d_ff=64, context=32)
    config.lm.data.max_bytes = 200_000
    config.train = LoopConfig(
        steps=30, batch_size=8, eval_interval=15, eval_batches=4, final_eval_batches=8,
        log_interval=5, checkpoint_interval=15,
    )  # fmt: skip
    config.optim.warmup_steps = 5
    return config


def _xl(model_config: Any, steps: int, batch: int, data: str = "enwik8") -> RunConfig:
    """Transformer-XL with the optimiser of topkast.md appendix A: Adam, warm-up over 4000 steps
    from 1e-7 to 2e-4, cosine decay, gradient clipping by global norm 0.25; Top-KAST (80%, 0%)."""
    config = RunConfig(task="xl")
    config.xl.model = model_config
    if data == "enwik8":
        config.xl.data.name = "enwik8"
    config.optim = OptimConfig(name="adam", lr=2e-4, beta2=0.999, warmup_steps=4000,
                               warmup_initial_lr=1e-7, schedule="cosine", min_lr_ratio=0.0,
                               grad_clip=0.25)  # fmt: skip
    config.train = LoopConfig(steps=steps, batch_size=batch, eval_interval=4000, eval_batches=50,
                              final_eval_batches=0, checkpoint_interval=4000)  # fmt: skip
    config.sparsity.method, config.sparsity.sparsity = "topkast", 0.8
    config.sparsity.topkast.backward_sparsity = 0.0
    return config


def _enwik8_large() -> RunConfig:
    """Transformer-XL 24L d1024 on enwik8 (Table 4, 277M); needs --enwik8 PATH."""
    return _xl(enwik8_large(), steps=400_000, batch=22)


def _enwik8_small() -> RunConfig:
    """Transformer-XL d512 on enwik8 (Table 5, 69M); needs --enwik8 PATH."""
    return _xl(enwik8_small(), steps=400_000, batch=22)


def _wikitext103_large() -> RunConfig:
    """Transformer-XL 18L d1024 on WikiText-103 (Table 4, 285M); needs xl.wikitext103=DIR."""
    return _xl(wikitext103_large(), steps=200_000, batch=60, data="wikitext103")


def _xl_tiny() -> RunConfig:
    """A tiny Transformer-XL on the default corpus, Top-KAST (80%, 0%); ~1 min here."""
    config = _xl(enwik8_tiny(), steps=300, batch=8, data="pystdlib")
    config.xl.data.max_bytes = 1_000_000
    config.optim.warmup_steps, config.optim.lr = 30, 1e-3
    config.train.eval_interval, config.train.checkpoint_interval = 100, 100
    config.train.final_eval_batches = 50
    return config


def _bert(size: str, steps: int = 100_000) -> RunConfig:
    """BERT pre-training with dynsparse-bert.md appendix A: Adam (0.9, 0.999, eps 1e-6), weight
    decay 0.01, linear warm-up over 10000 steps then linear decay, sequence length 128,
    DynSparse at sparsity 0.9 on all non-embedding weights."""
    config = RunConfig(task="bert")
    config.bert.model = bert_config(size)
    lr = {"medium": 2e-4, "base": 1e-4}.get(size, 4e-4)
    config.optim = OptimConfig(name="adamw", lr=lr, beta2=0.999, eps=1e-6, weight_decay=0.01,
                               warmup_steps=10_000, schedule="linear", min_lr_ratio=0.0,
                               sparsity_lr_scaling=True)  # fmt: skip
    config.train = LoopConfig(steps=steps, batch_size=256, eval_interval=5000,
                              checkpoint_interval=5000, final_eval_batches=0,
                              flop_scope=["layers"])  # fmt: skip
    config.sparsity.method, config.sparsity.sparsity = "dynsparse", 0.9
    config.sparsity.dynsparse.init_std = 0.02
    return config


def _bert_tiny_here() -> RunConfig:
    """BERT-Tiny shape (vocab 2000, seq 64) on standard-library text; seconds here."""
    config = _bert("tiny", steps=100)
    config.bert.model = bert_config("tiny", vocab_size=2000)
    config.bert.max_seq_len = 64
    config.optim.warmup_steps = 10
    config.train = LoopConfig(steps=100, batch_size=16, eval_interval=50, eval_batches=4,
                              final_eval_batches=8, checkpoint_interval=50,
                              flop_scope=["layers"])  # fmt: skip
    return config


def _resnet50() -> RunConfig:
    """ResNet-50 (topkast.md supplementary B): SGD momentum 0.9, lr 1.6 x batch/4096 with a 5%
    warm-up, x0.1 at 30/70/90% of the run, weight decay 1e-4, first/last layers dense,
    Top-KAST (80%, 50%); needs image.path=DIR with image.format=folder."""
    config = RunConfig(task="image")
    config.image.model = ResNetConfig(arch="resnet50", num_classes=1000, in_channels=3)
    config.image.format, config.image.image_size = "folder", 224
    batch, steps = 256, 32_000 * 4096 // 256
    config.optim = OptimConfig(name="sgd", lr=1.6 * batch / 4096, beta1=0.9,
                               weight_decay=1e-4, warmup_steps=steps // 20, schedule="step",
                               grad_clip=0.0)  # fmt: skip
    config.train = LoopConfig(steps=steps, batch_size=batch, eval_interval=5000,
                              checkpoint_interval=5000, final_eval_batches=0)  # fmt: skip
    config.sparsity.method, config.sparsity.sparsity = "topkast", 0.8
    config.sparsity.topkast.backward_sparsity = 0.5
    config.sparsity.layout.dense_first_last = True
    return config


def _fashion_mnist() -> RunConfig:
    """CIFAR-style ResNet-20 on Fashion-MNIST IDX files (image.path=DIR), Top-KAST (80%, 50%)."""
    config = _resnet50()
    config.image.model = ResNetConfig(arch="cifar_resnet20", num_classes=10, in_channels=1)
    config.image.format = "idx"
    config.optim.lr, config.optim.warmup_steps = 0.1, 50
    config.train = LoopConfig(steps=1000, batch_size=128, eval_interval=250, eval_batches=20,
                              checkpoint_interval=250, final_eval_batches=0)  # fmt: skip
    return config


PRESETS: dict[str, Callable[[], RunConfig]] = {
    "quickstart": _quickstart,
    "tiny": _tiny,
    "enwik8-xl-large": _enwik8_large,
    "enwik8-xl-small": _enwik8_small,
    "wikitext103-xl-large": _wikitext103_large,
    "xl-tiny": _xl_tiny,
    **{
        f"bert-{size}": functools.partial(_bert, size)
        for size in ("tiny", "mini", "small", "medium", "base")
    },
    "bert-tiny-here": _bert_tiny_here,
    "resnet50-imagenet": _resnet50,
    "resnet20-fashion-mnist": _fashion_mnist,
}


def preset(name: str) -> RunConfig:
    """A fresh copy of the named preset's configuration."""
    try:
        return PRESETS[name]()
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; available: {sorted(PRESETS)}") from None


# -- building blocks ---------------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    """``"auto"`` means CUDA when available, else CPU (one process; under several, each takes
    ``cuda:LOCAL_RANK``, see :func:`alwayssparse.distributed.process_device`)."""
    return distributed.process_device(name, local_rank=0, world_size=1)


def build_optimizer(model: nn.Module, config: OptimConfig) -> torch.optim.Optimizer:
    """The optimizer over all parameters, with weight decay on weight matrices only (as in
    GPT-2): not on biases and norms. A sparse layer's stored values are weights too, even when
    they are held as a 1-D list of entries."""
    stored = {id(m.values) for m in model.modules() if isinstance(m, SparseLinear)}
    params = [p for p in model.parameters() if p.requires_grad]
    decays = [p for p in params if p.dim() >= 2 or id(p) in stored]
    decay_ids = {id(p) for p in decays}
    groups = [
        {"params": decays, "weight_decay": config.weight_decay},
        {"params": [p for p in params if id(p) not in decay_ids], "weight_decay": 0.0},
    ]
    if config.name == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.beta1)
    cls = torch.optim.AdamW if config.name == "adamw" else torch.optim.Adam
    return cls(groups, lr=config.lr, betas=(config.beta1, config.beta2), eps=config.eps)


def base_learning_rate(config: RunConfig) -> float:
    """The peak learning rate: ``optim.lr``, scaled by eq. 3 of the BERT paper if asked."""
    if not config.optim.sparsity_lr_scaling or config.sparsity.method == DENSE:
        return config.optim.lr
    return sparse_learning_rate(config.optim.lr, config.sparsity.sparsity)


def learning_rate(step: int, total: int, config: OptimConfig, peak: float | None = None) -> float:
    """The learning rate at optimizer step ``step`` of ``total``.

    Linear warm-up over ``warmup_steps`` from ``warmup_initial_lr`` to ``peak`` (default
    ``config.lr``), then the ``schedule``: cosine or linear decay to ``min_lr_ratio * peak``,
    step drops, or constant.
    """
    peak = config.lr if peak is None else peak
    if step < config.warmup_steps:
        start = config.warmup_initial_lr
        return start + (peak - start) * (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return peak
    if config.schedule == "step":
        drops = sum(step >= fraction * total for fraction in config.drop_at)
        return peak * config.drop_factor**drops
    progress = min(1.0, (step - config.warmup_steps) / max(1, total - config.warmup_steps))
    shape = (
        0.5 * (1.0 + math.cos(math.pi * progress)) if config.schedule == "cosine" else 1 - progress
    )
    return peak * (config.min_lr_ratio + (1.0 - config.min_lr_ratio) * shape)


def density_report(sparsity: Sparsity | None) -> dict[str, float]:
    """Forward and backward density actually used over the sparse tensors, and the explored
    degrees of freedom (fraction of sparse positions ever active); all 1.0 when dense."""
    if sparsity is None:
        return {"forward_density": 1.0, "backward_density": 1.0, "explored_dof": 1.0}
    counts = sparsity.parameter_counts()
    sparse = counts["sparse"]
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


class MetricsLog:
    """Appends one JSON object per line to ``metrics.jsonl`` (when ``enabled``: on rank 0)."""

    def __init__(self, path: Path, enabled: bool = True) -> None:
        self.path = path
        self.enabled = enabled

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def _atomic_save(obj: Any, path: Path) -> None:
    """Write to a temporary file and rename, so a crash never leaves a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _write_json(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def load_run_config(run_dir: str | Path) -> RunConfig:
    """The resolved configuration saved in a run directory."""
    path = Path(run_dir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: not a run directory")
    return from_dict(RunConfig, json.loads(path.read_text()))


@torch.no_grad()
def _evaluate(task: Task, model: nn.Module, split: str, batches: int) -> dict[str, float]:
    # Every rank evaluates its share of the split (the task all-reduces the sums), with
    # rank 0's BatchNorm statistics, as DDP's convention has it.
    distributed.broadcast_batchnorm_stats(model)
    model.eval()
    # Cache alpha = theta * A once per evaluation instead of once per forward call.
    with parametrize.cached():
        metrics = task.evaluate(model, split, batches or None)
    model.train()
    return {f"{split}_{key}": value for key, value in metrics.items()}


# -- the loop ----------------------------------------------------------------------------------


def train(
    config: RunConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train ``config`` into ``run_dir``; return the final summary.

    Under ``torchrun`` (or inside an initialized process group) the run is data parallel:
    ``train.batch_size`` is the global batch, split evenly over the processes, the model is
    wrapped in DistributedDataParallel, every rank returns the same summary, and only rank 0
    writes to ``run_dir`` and logs (see :mod:`alwayssparse.distributed`).

    Args:
        config: The run configuration (validated before anything is built).
        run_dir: Output directory. Created if missing; with ``resume`` it must hold a checkpoint.
        resume: Continue from ``run_dir/checkpoint.pt``.
        progress: Show a progress bar.
        log: Where human-readable lines go.
    """
    config.validate()
    with distributed.session(config.train.device, config.train.dist_timeout) as context:
        if not context.is_main:
            progress, log = False, _silent
        try:
            # Rank 0's directory everywhere (a default name holds each process's timestamp).
            run_dir = distributed.broadcast_object(str(run_dir))
            return _train(config, Path(run_dir), context, resume=resume, progress=progress,
                          log=log)  # fmt: skip
        except Exception as error:
            if context.distributed and hasattr(error, "add_note"):  # Python >= 3.11
                error.add_note(distributed.failure_note(context, config.train.dist_timeout))
            raise


def _silent(_: str) -> None:
    pass


def _train(
    config: RunConfig,
    run_dir: Path,
    context: distributed.DistContext,
    *,
    resume: bool,
    progress: bool,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """The body of :func:`train`, for one process of ``context``."""
    checkpoint_path = run_dir / "checkpoint.pt"
    if resume and not checkpoint_path.exists():
        raise FileNotFoundError(f"cannot resume: {checkpoint_path} does not exist")
    if not resume and checkpoint_path.exists():
        raise FileExistsError(f"{run_dir} already holds a run; resume it or choose another")
    if context.is_main:  # only rank 0 writes
        run_dir.mkdir(parents=True, exist_ok=True)
    device = context.device
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    peak_lr = base_learning_rate(config)
    torch.manual_seed(config.train.seed)

    # Task: data and model.
    task = TASKS[config.task](config.task_config(), config.train.batch_size, device,
                              rank=context.rank, world_size=context.world_size)  # fmt: skip
    log(f"task {config.task}, data {task.describe_data()}")
    model = task.build_model()
    model = distributed.prepare_batchnorm(model, context, config.train.sync_batchnorm).to(device)

    # Sparsity line 1 of 3: make the model sparse (the layout table says what and why).
    sparsity = None
    if config.sparsity.method != DENSE:
        sparsity = Sparsity(
            model, config.sparsity, seed=config.train.seed, total_steps=config.train.steps
        )
        layout = sparsity.summary()
        if context.is_main:
            (run_dir / "layout.txt").write_text(layout + "\n")
        log(layout)
    optimizer = build_optimizer(model, config.optim)
    # FLOPs actually spent, per layer and step (dynsparse-bert.md appendix A.2).
    ledger = FlopLedger(model, sparsity, scope=config.train.flop_scope or None)
    batch_generator = torch.Generator().manual_seed(config.train.seed)
    # Mask dynamics, recorded on rank 0 only (every rank holds the same masks).
    dynamics = _mask_dynamics(config.train, sparsity) if context.is_main else None

    start = 0
    if resume:
        start = _load_checkpoint(
            checkpoint_path, model, optimizer, sparsity, batch_generator, task,
            extras={"dynamics": dynamics, "flops": ledger},
        )  # fmt: skip
        log(f"resumed from {checkpoint_path} at step {start}")

    # Several processes: masks are never sent, so every rank must start from the same state;
    # DDP gets the model after Sparsity has attached (its gradient hooks see the final params).
    def check_ranks(step: int) -> None:
        distributed.broadcast_batchnorm_stats(model)  # the only state allowed to differ
        state = distributed.training_state(model, sparsity)
        distributed.assert_same_across_ranks(state, f"the training state at step {step}")

    check_ranks(start)
    train_model = distributed.wrap_model(model, context)
    if context.distributed:
        torch.manual_seed(config.train.seed + context.rank)  # independent dropout per rank
    if context.is_main:
        _write_json(to_dict(config), run_dir / "config.json")
    metrics = MetricsLog(run_dir / "metrics.jsonl", enabled=context.is_main)
    board = TensorBoardLogger(run_dir) if config.train.tensorboard and context.is_main else None

    def write(record: dict[str, Any], kind: str | None = None) -> None:
        if kind is None:
            metrics.write(record)
        if board is not None:
            board.log(record, kind)

    def record_dynamics(step: int) -> None:
        if dynamics is not None and (step == 0 or dynamics.due(step)):
            write(dynamics.record(step), kind="dynamics")
            dynamics.write_to(run_dir)

    if not resume:
        record_dynamics(0)

    def save(step: int) -> None:
        check_ranks(step)
        if not context.is_main:
            return
        state = {
            "format": CHECKPOINT_FORMAT,
            "step": step,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "sparsity": sparsity.state_dict() if sparsity is not None else None,
            "batch_generator": batch_generator.get_state(),
            "task": task.state_dict(),
            "dynamics": dynamics.state_dict() if dynamics is not None else None,
            "flops": ledger.state_dict(),
            "config": to_dict(config),
        }
        _atomic_save(state, checkpoint_path)

    steps = config.train.steps
    units_done = 0
    bar = tqdm(range(start, steps), disable=not progress, initial=start, total=steps)
    started = time.perf_counter()
    last_time = started
    model.train()
    for step in bar:
        lr = learning_rate(step, steps, config.optim, peak_lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = task.train_batch(batch_generator)
        units_done += task.units(batch)
        loss = task.loss(train_model, batch)
        # Sparsity line 2 of 3: the method's regulariser (Top-KAST's exploration loss).
        regularizer = sparsity.regularizer() if sparsity is not None else torch.zeros(())
        total_loss = loss + regularizer
        total_loss.backward()
        if config.optim.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        # Sparsity line 3 of 3: refresh masks, keep entries outside B untouched.
        if sparsity is not None:
            sparsity.step(step, optimizer)

        ledger.record(step)
        done = step + 1
        record_dynamics(done)
        if config.train.dist_check_interval and done % config.train.dist_check_interval == 0:
            check_ranks(done)
        if done % config.train.log_interval == 0 or done == steps:
            now = time.perf_counter()
            # Loss averaged and throughput summed over ranks (identical to the global batch's).
            shared = distributed.all_reduce_mean({"loss": loss.item(), "units": units_done})
            throughput = shared["units"] * context.world_size / max(now - last_time, 1e-9)
            last_time, units_done = now, 0
            record = {
                "kind": "train", "step": done, "loss": shared["loss"],
                "regularizer": regularizer.detach().item(), "lr": lr,
                f"{task.unit}_per_second": throughput, **density_report(sparsity),
                **flop_report(ledger, context.world_size),
            }  # fmt: skip
            if task.metric == "bpc":
                record["bpc"] = shared["loss"] / math.log(2)
            write(record)
            bar.set_postfix(loss=f"{record['loss']:.3f}", per_s=f"{throughput:,.0f}")
        if done % config.train.eval_interval == 0 and done != steps:
            valid = _evaluate(task, model, "valid", config.train.eval_batches)
            write({"kind": "eval", "step": done, **valid})
            log(f"step {done}: " + ", ".join(f"{k} {v:.4f}" for k, v in valid.items()))
        if config.train.checkpoint_interval and done % config.train.checkpoint_interval == 0:
            save(done)
    bar.close()
    wall = time.perf_counter() - started

    save(steps)
    final = config.train.final_eval_batches
    summary: dict[str, Any] = {
        "steps": steps,
        "task": config.task,
        "metric": task.metric,
        "method": config.sparsity.method,
        **_evaluate(task, model, "valid", final),
        **_evaluate(task, model, "test", final),
        "train_seconds": wall,
        **density_report(sparsity),
        **flop_report(ledger, context.world_size),
        "parameters": sparsity.parameter_counts() if sparsity is not None else {
            "total": sum(p.numel() for p in model.parameters()),
        },
    }  # fmt: skip
    write({"kind": "final", **summary})
    if board is not None:
        board.close()
    if context.is_main:
        _write_json(summary, run_dir / "summary.json")
        (run_dir / "flops.txt").write_text(ledger.table(cumulative=True) + "\n")
    log(format_summary(summary))
    if config.train.report and context.is_main:
        try:
            log(f"report: {write_run_report(run_dir)}")
        except Exception as error:  # the run itself is saved; do not lose it to a plot
            log(f"warning: writing the report failed ({error!r}); rerun: alwayssparse report DIR")
    return summary


def _mask_dynamics(loop: LoopConfig, sparsity: Sparsity | None) -> MaskDynamics | None:
    """The mask-dynamics tracker of a sparse run (``None`` for dense runs or when off)."""
    if sparsity is None or loop.dynamics_interval == 0:
        return None
    interval = loop.dynamics_interval or max(1, loop.steps // 50)
    return MaskDynamics(sparsity, interval, loop.pattern_layer)


def _load_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    sparsity: Sparsity | None,
    batch_generator: torch.Generator,
    task: Task,
    extras: dict[str, Any] | None = None,
) -> int:
    """Restore a checkpoint; ``extras`` are further objects with ``load_state_dict`` (or
    ``None``), restored from the entry of the same name when the checkpoint has one."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: unsupported checkpoint format {state.get('format')}")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if sparsity is not None:
        sparsity.load_state_dict(state["sparsity"])
    batch_generator.set_state(state["batch_generator"])
    task.load_state_dict(state["task"])
    for key, target in (extras or {}).items():
        if target is not None and state.get(key) is not None:
            target.load_state_dict(state[key])
    return int(state["step"])


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
    if "forward" in params:
        lines.append(
            f"  parameters: {params['total']:,} total ({params['dense']:,} dense), "
            f"{params['forward']:,} used forward, {params['backward']:,} receive gradient"
        )
    else:
        lines.append(f"  parameters: {params['total']:,} (dense model)")
    return "\n".join(lines)
