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

The pieces live by role: :mod:`~alwayssparse.runconfig` (the configuration),
:mod:`~alwayssparse.presets` (named configurations, registered by the tasks),
:mod:`~alwayssparse.optim` (optimizer, learning rate), :mod:`~alwayssparse.checkpoints`,
:mod:`~alwayssparse.metrics` (evaluation, densities, FLOPs, metrics records).
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from alwayssparse import distributed, host_memory
from alwayssparse.checkpoints import load_checkpoint, save_checkpoint, write_json
from alwayssparse.config import to_dict
from alwayssparse.dynamics import DYNAMICS_FILE, MaskDynamics
from alwayssparse.flops import FlopLedger
from alwayssparse.metrics import (
    MetricsLog,
    TensorBoardLogger,
    density_report,
    evaluate,
    flop_report,
    format_summary,
    truncate_jsonl,
)
from alwayssparse.optim import base_learning_rate, build_optimizer, learning_rate
from alwayssparse.presets import PRESETS, preset
from alwayssparse.report import write_run_report
from alwayssparse.rng import capture_rng_state, seed_everything
from alwayssparse.runconfig import LoopConfig, OptimConfig, RunConfig, load_run_config
from alwayssparse.sparsity import Sparsity
from alwayssparse.tasks import TASKS, Task

__all__ = [
    "PRESETS",
    "LoopConfig",
    "OptimConfig",
    "RunConfig",
    "TrainingDiverged",
    "base_learning_rate",
    "build_optimizer",
    "learning_rate",
    "load_run_config",
    "preset",
    "train",
]


def train(
    config: RunConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
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
        overwrite: Replace the run files of an earlier run in ``run_dir`` (only when the new
            run starts training; without it a directory holding any run file is refused).

    Raises:
        TrainingDiverged: The loss or the gradient became non-finite; the run stops before
            the optimizer step, and its last checkpoint is kept.
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
            return _train(config, Path(run_dir), context, resume=resume, overwrite=overwrite,
                          progress=progress, log=log)  # fmt: skip
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
    overwrite: bool,
    progress: bool,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """The body of :func:`train`, for one process of ``context``. Nothing is written into
    ``run_dir`` before the run is set up, so a run that fails before training leaves nothing."""
    checkpoint_path = _claim(run_dir, resume, overwrite)
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    if config.train.reuse_host_memory and host_memory.reuse_freed_memory():
        log("host memory: freed blocks kept for reuse (train.reuse_host_memory)")
    seed_everything(config.train.seed)

    # Task: data and model.
    task = TASKS[config.task](config.task_config(), config.train.batch_size, context.device,
                              rank=context.rank, world_size=context.world_size)  # fmt: skip
    log(f"task {config.task}, data {task.describe_data()}")
    model = task.build_model()
    model = distributed.prepare_batchnorm(model, context, config.train.sync_batchnorm)
    model = model.to(context.device)

    # Sparsity line 1 of 3: make the model sparse (the layout table says what and why).
    sparsity = Sparsity(
        model, config.sparsity, seed=config.train.seed, total_steps=config.train.steps
    )
    log(sparsity.summary())
    optimizer = build_optimizer(model, config.optim, sparsity.weight_parameters())
    run = _Run(config, run_dir, context, log, task, model, sparsity, optimizer)
    if context.distributed:
        seed_everything(config.train.seed + context.rank)  # independent dropout per rank

    start = 0
    if resume:
        start = run.load(checkpoint_path)
        log(f"resumed from {checkpoint_path} at step {start}")
    # Several processes: masks are never sent, so every rank must start from the same state;
    # DDP gets the model after Sparsity has attached (its gradient hooks see the final params).
    run.check_ranks(start)
    train_model = distributed.wrap_model(model, context)
    run.open_records(start, overwrite=overwrite and not resume)
    if not resume:
        run.record_dynamics(0)

    wall = _loop(run, train_model, start, progress)
    return _finish(run, wall)


RUN_FILES = ("config.json", "layout.txt", "metrics.jsonl", "checkpoint.pt", "summary.json",
             "flops.txt", "dynamics.jsonl", "pattern.npy", "report.md", "plots")  # fmt: skip


def run_files(run_dir: Path) -> list[Path]:
    """The files of a run that ``run_dir`` holds (TensorBoard event files included)."""
    if not run_dir.is_dir():
        return []
    found = [run_dir / name for name in RUN_FILES if (run_dir / name).exists()]
    return found + sorted(run_dir.glob("events.out.tfevents.*"))


def _claim(run_dir: Path, resume: bool, overwrite: bool) -> Path:
    """The checkpoint path of ``run_dir``, after checking that it holds a run exactly when
    resuming (or ``overwrite`` is given). Writes nothing."""
    checkpoint_path = run_dir / "checkpoint.pt"
    existing = run_files(run_dir)
    if resume and not checkpoint_path.exists():
        if existing:
            raise FileNotFoundError(
                f"cannot resume {run_dir}: its run stopped before its first checkpoint (no "
                "checkpoint.pt); start it again with `alwayssparse train --out "
                f"{run_dir} --overwrite` and the options it had (see its config.json)"
            )
        raise FileNotFoundError(f"cannot resume: {checkpoint_path} does not exist")
    if not resume and existing and not overwrite:
        names = ", ".join(p.name for p in existing[:4])
        raise FileExistsError(
            f"{run_dir} already holds a run ({names}); resume it (--resume {run_dir}), choose "
            "another --out, or replace it with --overwrite"
        )
    return checkpoint_path


def _loop(run: _Run, train_model: nn.Module, start: int, progress: bool) -> float:
    """Optimizer steps ``start`` to ``train.steps`` with their logging, evaluations and
    checkpoints; return the seconds they took."""
    loop = run.config.train
    steps = loop.steps
    peak_lr = base_learning_rate(run.config)
    units_done = 0
    bar = tqdm(range(start, steps), disable=not progress, initial=start, total=steps)
    started = time.perf_counter()
    last_time = started
    run.model.train()
    for step in bar:
        lr = learning_rate(step, steps, run.config.optim, peak_lr)
        loss, regularizer, units = _train_step(run, train_model, step, lr)
        if loss is None:  # a non-finite loss or gradient: nothing was changed by this step
            bar.close()
            values = [float(v) for v in regularizer]
            run.write({"kind": "diverged", "step": step, "loss": values[0],
                       "gradient_norm": values[1], "lr": lr})  # fmt: skip
            raise _diverged(run, step, regularizer, lr)
        units_done += units
        run.ledger.record(step)
        done = step + 1
        run.record_dynamics(done)
        if loop.dist_check_interval and done % loop.dist_check_interval == 0:
            run.check_ranks(done)
        if done % loop.log_interval == 0 or done == steps:
            now = time.perf_counter()
            record = _train_record(run, done, loss, regularizer, lr, units_done, now - last_time)
            last_time, units_done = now, 0
            run.write(record)
            throughput = record[f"{run.task.unit}_per_second"]
            bar.set_postfix(loss=f"{record['loss']:.3f}", per_s=f"{throughput:,.0f}")
        if done % loop.eval_interval == 0 and done != steps:
            valid = evaluate(run.task, run.model, "valid", loop.eval_batches)
            run.write({"kind": "eval", "step": done, **valid})
            run.log(f"step {done}: " + ", ".join(f"{k} {v:.4f}" for k, v in valid.items()))
        if loop.checkpoint_interval and done % loop.checkpoint_interval == 0:
            run.save(done)
    bar.close()
    return time.perf_counter() - started


def _train_step(
    run: _Run, train_model: nn.Module, step: int, lr: float
) -> tuple[Tensor | None, Tensor, int]:
    """One optimizer step at learning rate ``lr``; return the task's loss, the regulariser and
    the throughput units of the batch. A non-finite loss or gradient norm stops before the
    optimizer step: the loss is then ``None`` and the second value holds (loss, gradient norm).
    """
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    batch = run.task.train_batch(run.batch_generator)
    units = run.task.units(batch)
    loss = run.task.loss(train_model, batch)
    # Sparsity line 2 of 3: the method's regulariser (Top-KAST's exploration loss).
    regularizer = run.sparsity.regularizer()
    total_loss = loss + regularizer
    total_loss.backward()
    clip = run.config.optim.grad_clip
    params = [p for p in run.model.parameters() if p.grad is not None]
    if clip > 0:
        norm = nn.utils.clip_grad_norm_(params, clip)
    else:
        norm = nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    if not bool(torch.isfinite(total_loss.detach()) & torch.isfinite(norm)):
        run.optimizer.zero_grad(set_to_none=True)
        return None, torch.stack([total_loss.detach().float(), norm.float()]).cpu(), units
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    # Sparsity line 3 of 3: refresh masks, keep entries outside B untouched.
    run.sparsity.step(step, run.optimizer)
    return loss, regularizer, units


class TrainingDiverged(RuntimeError):
    """The loss or the gradient became non-finite: the run stopped (its message says where)."""


def _diverged(run: _Run, step: int, values: Tensor, lr: float) -> TrainingDiverged:
    """The error for a non-finite loss or gradient norm at ``step``, naming the likely cause."""
    loss, norm = (float(v) for v in values)
    optim = run.config.optim
    clip = f"clip gradients (optim.grad_clip, now {optim.grad_clip:g})"
    if optim.grad_clip > 0:
        clip = f"clip gradients harder (optim.grad_clip={optim.grad_clip:g})"
    last = run.last_checkpoint
    kept = f"checkpoint of step {last} is kept" if last is not None else "no checkpoint was written"
    return TrainingDiverged(
        f"training diverged at step {step}: loss {loss:.4g}, gradient norm {norm:.4g} at "
        f"learning rate {lr:.4g} (optim.lr={optim.lr:g}); lower the learning rate or {clip}. "
        f"Nothing of this step was applied; the {kept} in {run.run_dir}"
    )


def _train_record(
    run: _Run, done: int, loss: Tensor, regularizer: Tensor, lr: float, units: int, seconds: float
) -> dict[str, Any]:
    """The metrics record of step ``done``: loss averaged and throughput summed over ranks
    (identical to the global batch's), densities and FLOPs."""
    shared = distributed.all_reduce_mean({"loss": loss.item(), "units": units})
    throughput = shared["units"] * run.context.world_size / max(seconds, 1e-9)
    record = {
        "kind": "train", "step": done, "loss": shared["loss"],
        "regularizer": regularizer.detach().item(), "lr": lr,
        f"{run.task.unit}_per_second": throughput, **density_report(run.sparsity),
        **flop_report(run.ledger, run.context.world_size),
    }  # fmt: skip
    if run.task.metric == "bpc":
        record["bpc"] = shared["loss"] / math.log(2)
    return record


def _finish(run: _Run, wall: float) -> dict[str, Any]:
    """Save the last checkpoint, evaluate on the validation and test splits, write the summary,
    the FLOP table and the report; return the summary."""
    config, context = run.config, run.context
    steps, final = config.train.steps, config.train.final_eval_batches
    run.save(steps)
    summary: dict[str, Any] = {
        "steps": steps,
        "task": config.task,
        "metric": run.task.metric,
        "method": config.sparsity.method,
        **evaluate(run.task, run.model, "valid", final),
        **evaluate(run.task, run.model, "test", final),
        "train_seconds": wall,
        **density_report(run.sparsity),
        **flop_report(run.ledger, context.world_size),
        "parameters": run.sparsity.parameter_counts(),
    }
    run.write({"kind": "final", **summary})
    if run.board is not None:
        run.board.close()
    if context.is_main:
        write_json(summary, run.run_dir / "summary.json")
        (run.run_dir / "flops.txt").write_text(run.ledger.table(cumulative=True) + "\n")
    run.log(format_summary(summary))
    if config.train.report and context.is_main:
        try:
            run.log(f"report: {write_run_report(run.run_dir)}")
        except Exception as error:  # the run itself is saved; do not lose it to a plot
            run.log(
                f"warning: writing the report failed ({error!r}); rerun: alwayssparse report DIR"
            )
    return summary


@dataclass
class _Run:
    """What one process's run holds between steps, and its bookkeeping at a step: checks that
    the ranks agree, metrics records, mask-dynamics points and checkpoints.

    The FLOP ledger, the batch generator and the mask-dynamics tracker are built from the other
    fields; :meth:`open_records` opens ``metrics.jsonl`` and TensorBoard.
    """

    config: RunConfig
    run_dir: Path
    context: distributed.DistContext
    log: Callable[[str], None]
    task: Task
    model: nn.Module
    sparsity: Sparsity
    optimizer: torch.optim.Optimizer

    def __post_init__(self) -> None:
        # FLOPs actually spent, per layer and step (dynsparse-bert.md appendix A.2).
        self.ledger = FlopLedger(
            self.model, self.sparsity, scope=self.config.train.flop_scope or None
        )
        self.batch_generator = torch.Generator().manual_seed(self.config.train.seed)
        # Mask dynamics, recorded on rank 0 only (every rank holds the same masks).
        self.dynamics = (
            _mask_dynamics(self.config.train, self.sparsity) if self.context.is_main else None
        )
        self.metrics: MetricsLog | None = None
        self.board: TensorBoardLogger | None = None
        self.last_checkpoint: int | None = None

    def open_records(self, start: int, overwrite: bool) -> None:
        """Create the run directory, write ``layout.txt`` and ``config.json`` and open the
        metrics records (rank 0 writes them). ``overwrite``: remove an earlier run's files
        first; resuming at ``start``: drop records written after that checkpoint."""
        is_main = self.context.is_main
        if is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if overwrite:
                _remove(run_files(self.run_dir))
            (self.run_dir / "layout.txt").write_text(self.sparsity.summary() + "\n")
            write_json(to_dict(self.config), self.run_dir / "config.json")
            for name in ("metrics.jsonl", DYNAMICS_FILE):
                truncate_jsonl(self.run_dir / name, start)
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl", enabled=is_main)
        if self.config.train.tensorboard and is_main:
            self.board = TensorBoardLogger(self.run_dir)

    def write(self, record: dict[str, Any], kind: str | None = None) -> None:
        """A metrics record (``kind`` given: a record for TensorBoard only, e.g. dynamics)."""
        if kind is None and self.metrics is not None:
            self.metrics.write(record)
        if self.board is not None:
            self.board.log(record, kind)

    def record_dynamics(self, step: int) -> None:
        """Record a mask-dynamics point at ``step`` if one is due (and at step 0)."""
        if self.dynamics is not None and (step == 0 or self.dynamics.due(step)):
            self.write(self.dynamics.record(step), kind="dynamics")
            self.dynamics.write_to(self.run_dir)

    def check_ranks(self, step: int) -> None:
        """Under several processes, check that every rank holds the same training state."""
        distributed.broadcast_batchnorm_stats(self.model)  # the only state allowed to differ
        state = distributed.training_state(self.model, self.sparsity)
        distributed.assert_same_across_ranks(state, f"the training state at step {step}")

    def save(self, step: int) -> None:
        """Check the ranks agree, then write the checkpoint of ``step`` (rank 0), with every
        rank's random state and task state."""
        self.check_ranks(step)
        per_rank = distributed.all_gather_object(
            {"rng": capture_rng_state(), "task": self.task.state_dict()}
        )
        self.last_checkpoint = step
        if not self.context.is_main:
            return
        save_checkpoint(self.run_dir / "checkpoint.pt", step, model=self.model,
                        optimizer=self.optimizer, sparsity=self.sparsity,
                        batch_generator=self.batch_generator, task=self.task,
                        config=to_dict(self.config), per_rank=per_rank,
                        extras={"dynamics": self.dynamics, "flops": self.ledger})  # fmt: skip

    def load(self, path: Path) -> int:
        """Restore the checkpoint at ``path`` (this rank's random and task state when it was
        written by as many processes); return its step."""
        extras = {"dynamics": self.dynamics, "flops": self.ledger}
        step = load_checkpoint(path, self.model, self.optimizer, self.sparsity,
                               self.batch_generator, self.task, extras=extras,
                               rank=self.context.rank,
                               world_size=self.context.world_size)  # fmt: skip
        self.last_checkpoint = step
        return step


def _remove(paths: list[Path]) -> None:
    for path in paths:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


def _mask_dynamics(loop: LoopConfig, sparsity: Sparsity) -> MaskDynamics | None:
    """The mask-dynamics tracker of a run whose method makes anything sparse (``None`` for
    dense runs or when off)."""
    if not sparsity.method.sparse or loop.dynamics_interval == 0:
        return None
    interval = loop.dynamics_interval or max(1, loop.steps // 50)
    return MaskDynamics(sparsity, interval, loop.pattern_layer)
