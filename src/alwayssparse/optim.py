"""The optimizer of a run and its learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from alwayssparse.runconfig import OptimConfig, RunConfig, is_sparse_method
from alwayssparse.schedules import sparse_learning_rate


def build_optimizer(
    model: nn.Module, config: OptimConfig, weights: Sequence[torch.Tensor] = ()
) -> torch.optim.Optimizer:
    """The optimizer over all parameters, with weight decay on weight matrices only (as in
    GPT-2): not on biases and norms. ``weights`` are weights whatever their shape: a sparse
    layer's stored values (``Sparsity.weight_parameters()``), even a 1-D list of entries."""
    stored = {id(w) for w in weights}
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
    fused = True if config.fused and fused_supported(params) else None  # None: torch's loop
    betas = (config.beta1, config.beta2)
    return cls(groups, lr=config.lr, betas=betas, eps=config.eps, fused=fused)


def fused_supported(params: Sequence[torch.Tensor]) -> bool:
    """Whether torch's fused Adam/AdamW kernel takes these parameters: floating point, all on
    the CPU (torch >= 2.4) or all on one CUDA device, none sparse."""
    if not params:
        return False
    devices = {p.device.type for p in params}
    if len(devices) != 1 or not devices <= {"cpu", "cuda"}:
        return False
    floating = all(p.is_floating_point() and not p.is_sparse for p in params)
    if devices == {"cpu"}:
        major, minor = (int(part) for part in torch.__version__.split(".")[:2])
        return floating and (major, minor) >= (2, 4)
    return floating


def base_learning_rate(config: RunConfig) -> float:
    """The peak learning rate: ``optim.lr``, scaled by eq. 3 of the BERT paper if asked (and the
    method makes anything sparse)."""
    if not config.optim.sparsity_lr_scaling or not is_sparse_method(config.sparsity.method):
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
