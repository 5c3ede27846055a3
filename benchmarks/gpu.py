"""Training-step time and memory on one GPU: dense (cuBLAS), masked and block-sparse ("gpu").

Each row trains, from the same initial weights, the dense model (plain ``nn.Linear`` layers,
cuBLAS), ``Sparsity(..., backend="masked")`` (dense theta times masks) and
``Sparsity(..., backend="gpu")`` (Triton block-sparse kernels, :mod:`alwayssparse.backends.gpu`),
all with AdamW and the loop ``loss + sparsity.regularizer()``, ``backward``, ``optimizer.step``,
``zero_grad(set_to_none=True)``, ``sparsity.step``. Precision: float32 master weights with bf16
autocast (default; the dense layers then run cuBLAS bf16 GEMMs and the block-sparse ones bf16
Triton kernels), or ``--pure-bf16`` (bf16 weights, no autocast). Workloads, 16k tokens each:

- single Linear layers 4096 x 4096 and 4096 -> 16384 on 16384 tokens, ``method="static"`` (the
  pure training step): densities 0.2, 0.1, 0.05 and blocks 16, 32, 64. The loss hands a fixed
  bf16 gradient to the output at no cost and the input requires grad, so a step is forward +
  input gradient + weight gradient (sampled at B's blocks for "gpu") + AdamW;
- a GPT-2-small-shaped TransformerLM (:mod:`alwayssparse.models`: 12 layers, d_model 768, 12
  heads, d_ff 3072, context 1024, batch 16, vocabulary ``--vocab``, default 50304 as GPT-2's
  padded one; embeddings tied with the head and kept dense, as are LayerNorms and biases) with
  Top-KAST (backward density 2 x density) refreshed every step or every 100 steps. Its
  reservoir (theta of the whole tensor) lives in host memory by default on "gpu"
  (``--device-reservoir``: GPU memory); with refresh 100 the timed steps fall between refreshes,
  so the refresh-1 rows show what a refresh costs (amortised over 100 steps: a hundredth).

Per row, per backend: median milliseconds of a training step over ``--repeats`` steps after
``--warmup`` steps (each step timed between ``torch.cuda.synchronize()`` calls, so host work in
``sparsity.step`` counts), the speed-ups of "gpu" over dense and over masked (ratios against the
dense model measured in the same run), GPU memory held between steps (parameters, optimizer
state, masks, indices; gradients are freed by ``set_to_none``) and the peak during the timed
steps, both net of what the process held before the model was built. The backends are measured
one after another, each freed before the next.

Run (about 5 minutes on an H100/H200; every row is printed when measured; rows stop when
``--budget`` seconds are spent, so a run stays under 8 minutes):

    python3 benchmarks/gpu.py
    python3 benchmarks/gpu.py --quick        # density 0.1, block 32, fewer steps (~1 minute)
    python3 benchmarks/gpu.py --skip-model --densities 0.05 --blocks 64

Needs a CUDA GPU and Triton; without them it exits with a message (``--help`` works anywhere).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from alwayssparse import Sparsity
from alwayssparse.backends.gpu import GpuBackend
from alwayssparse.kernels import triton_bsr
from alwayssparse.models import TransformerLM, TransformerLMConfig, lm_loss

TOKENS = 16384
SHAPES = [(4096, 4096), (4096, 16384)]  # in x out
DENSITIES = (0.2, 0.1, 0.05)
BLOCKS = (16, 32, 64)
REFRESHES = (1, 100)
LM_BATCH = 16
BACKENDS = ("dense", "masked", "gpu")
MIB = 2**20
DEVICE = "cuda"  # a module constant so that a CPU dry run can replace it


def gpt2_small(vocab: int) -> TransformerLMConfig:
    return TransformerLMConfig(
        vocab_size=vocab, n_layer=12, n_head=12, d_model=768, d_ff=3072, context=1024
    )


# -- workloads ------------------------------------------------------------------------------------


class _FixedGradient(torch.autograd.Function):
    """A scalar 0 whose gradient with respect to ``y`` is ``grad``: a loss that costs nothing."""

    @staticmethod
    def forward(ctx: Any, y: Tensor, grad: Tensor) -> Tensor:
        ctx.save_for_backward(grad)
        return y.new_zeros((), dtype=torch.float32)

    @staticmethod
    def backward(ctx: Any, _: Tensor) -> tuple[Tensor, None]:
        (grad,) = ctx.saved_tensors
        return grad, None


@dataclass
class Workload:
    """What to train: a model factory (on the GPU) and the loss of one batch."""

    name: str
    make_model: Callable[[], nn.Module]
    loss: Callable[[nn.Module], Tensor]


def linear_workload(tokens: int, in_features: int, out_features: int) -> Workload:
    generator = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(tokens, in_features, device=DEVICE, dtype=torch.bfloat16, generator=generator)
    x.requires_grad_()
    grad_y = torch.randn(
        tokens, out_features, device=DEVICE, dtype=torch.bfloat16, generator=generator
    )

    def loss(model: nn.Module) -> Tensor:
        x.grad = None  # the input gradient is computed afresh, never accumulated
        return _FixedGradient.apply(model(x), grad_y)

    def make_model() -> nn.Module:
        # Inside a container: Sparsity swaps the Linear for its layer in the parent module.
        return nn.Sequential(nn.Linear(in_features, out_features)).to(DEVICE)

    return Workload(f"Linear {in_features}x{out_features} N{tokens}", make_model, loss)


def lm_workload(config: TransformerLMConfig, batch: int) -> Workload:
    generator = torch.Generator(device=DEVICE).manual_seed(0)
    tokens = torch.randint(0, config.vocab_size, (batch, config.context + 1), device=DEVICE,
                           generator=generator)  # fmt: skip
    inputs, targets = tokens[:, :-1], tokens[:, 1:]  # [B, T] each

    def loss(model: nn.Module) -> Tensor:
        return lm_loss(model(inputs), targets)

    name = f"GPT2s {config.n_layer}x{config.d_model} V{config.vocab_size} N{batch * config.context}"
    return Workload(name, lambda: TransformerLM(config).to(DEVICE), loss)


# -- training -------------------------------------------------------------------------------------


@dataclass
class Setup:
    """How one backend trains a workload."""

    backend: str
    density: float = 1.0
    block: int = 16
    method: str = "static"
    options: dict[str, Any] = field(default_factory=dict)


class Trainer:
    """A model on the GPU, its AdamW optimizer and its Sparsity (none when dense)."""

    def __init__(self, workload: Workload, setup: Setup, pure_bf16: bool) -> None:
        torch.manual_seed(0)  # the same initial weights for every backend
        self.model = workload.make_model()
        if pure_bf16:
            self.model.bfloat16()
        self.autocast = not pure_bf16
        self.loss = workload.loss
        self.sparsity: Sparsity | None = None
        if setup.backend != "dense":
            self.sparsity = Sparsity(
                self.model, method=setup.method, density=setup.density, backend=setup.backend,
                block_size=setup.block, total_steps=1_000_000, **setup.options,
            )  # fmt: skip
        # After Sparsity: with backend "gpu" the trainable tensors are new ``values``.
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4, weight_decay=0.01)
        self.steps = 0

    def step(self) -> None:
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=self.autocast):
            loss = self.loss(self.model)
        if self.sparsity is not None:
            loss = loss + self.sparsity.regularizer()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.sparsity is not None:
            self.sparsity.step(self.steps, self.optimizer)
        self.steps += 1


@dataclass
class Result:
    ms: float  # median step
    held: float  # MiB held between steps
    peak: float  # MiB peak during the timed steps


def _free() -> None:
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


def measure(workload: Workload, setup: Setup, pure_bf16: bool, warmup: int, repeats: int) -> Result:
    """Build, warm up and time one trainer; free it again."""
    _free()
    base = torch.cuda.memory_allocated()
    trainer = Trainer(workload, setup, pure_bf16)
    for _ in range(warmup):  # Triton compiles and cuBLAS picks its kernels here
        trainer.step()
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated() - base
    torch.cuda.reset_peak_memory_stats()
    samples = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        trainer.step()
        torch.cuda.synchronize()
        samples.append((time.perf_counter() - start) * 1e3)
    peak = torch.cuda.max_memory_allocated() - base
    del trainer
    _free()
    return Result(statistics.median(samples), held / MIB, peak / MIB)


# -- the table ------------------------------------------------------------------------------------

HEADER = (
    f"{'':36} {'':3} {'':5} {'':4} | {'step ms':^23} | {'speed-up':^11} | "
    f"{'held MiB':^23} | {'peak MiB':^23} | {'gpu/dense':^11}\n"
    f"{'workload':36} {'blk':>3} {'dens':>5} {'rfsh':>4} | "
    f"{'dense':>7} {'masked':>7} {'gpu':>7} | {'x d':>5} {'x m':>5} | "
    f"{'dense':>7} {'masked':>7} {'gpu':>7} | {'dense':>7} {'masked':>7} {'gpu':>7} | "
    f"{'held':>5} {'peak':>5}"
)

LEGEND = """\
step ms: median training step (forward, input and weight gradients, AdamW, sparsity.step).
speed-up: x d = dense ms / gpu ms, x m = masked ms / gpu ms (same run).
held: GPU memory between steps (parameters, AdamW state, masks, indices); peak: during the timed
steps (adds activations and gradients). gpu/dense: ratios of held and of peak memory.
rfsh: Top-KAST refresh interval (model rows); '-': static."""


def _ratio(a: float, b: float) -> str:
    return f"{a / b:5.2f}" if b > 0 else f"{'-':>5}"


def format_row(
    name: str, block: int, density: float, refresh: int | None, results: dict[str, Result]
) -> str:
    d, m, g = (results[b] for b in BACKENDS)
    return (
        f"{name:36} {block:3d} {density:5.2f} {refresh if refresh else '-':>4} | "
        f"{d.ms:7.2f} {m.ms:7.2f} {g.ms:7.2f} | {_ratio(d.ms, g.ms)} {_ratio(m.ms, g.ms)} | "
        f"{d.held:7.0f} {m.held:7.0f} {g.held:7.0f} | {d.peak:7.0f} {m.peak:7.0f} {g.peak:7.0f} | "
        f"{_ratio(g.held, d.held)} {_ratio(g.peak, d.peak)}"
    )


class Budget:
    """Stops the run after ``seconds`` (rows already started finish)."""

    def __init__(self, seconds: float) -> None:
        self.start, self.seconds, self.skipped = time.perf_counter(), seconds, 0

    def spent(self) -> bool:
        if time.perf_counter() - self.start > self.seconds:
            self.skipped += 1
            return True
        return False


def run_linear(args: argparse.Namespace, budget: Budget) -> None:
    for in_features, out_features in args.shapes:
        if budget.spent():
            continue
        workload = linear_workload(args.tokens, in_features, out_features)
        dense = measure(workload, Setup("dense"), args.pure_bf16, args.warmup, args.repeats)
        for block in args.blocks:
            for density in args.densities:
                if budget.spent():
                    continue
                results = {"dense": dense}
                for backend in ("masked", "gpu"):
                    setup = Setup(backend, density, block)
                    results[backend] = measure(
                        workload, setup, args.pure_bf16, args.warmup, args.repeats
                    )
                print(format_row(workload.name, block, density, None, results), flush=True)
        del workload
        _free()


def run_model(args: argparse.Namespace, budget: Budget) -> None:
    if budget.spent():
        return
    workload = lm_workload(gpt2_small(args.vocab), args.lm_batch)
    repeats = args.model_repeats
    dense = measure(workload, Setup("dense"), args.pure_bf16, args.warmup, repeats)
    for refresh in args.refreshes:
        for block in args.blocks:
            for density in args.densities:
                if budget.spent():
                    continue
                options = {
                    "backward_sparsity": max(0.0, 1.0 - 2.0 * density),
                    "refresh_interval": refresh,
                }
                results = {"dense": dense}
                for backend in ("masked", "gpu"):
                    setup = Setup(backend, density, block, "topkast", options)
                    results[backend] = measure(
                        workload, setup, args.pure_bf16, args.warmup, repeats
                    )
                print(format_row(workload.name, block, density, refresh, results), flush=True)


def parse_shape(text: str) -> tuple[int, int]:
    in_features, out_features = (int(v) for v in text.lower().split("x"))
    return in_features, out_features


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").splitlines()[0],
        epilog="Needs a CUDA GPU and Triton (exits with a message without them).",
    )
    parser.add_argument("--shapes", type=parse_shape, nargs="*", help="in x out (default "
                        "4096x4096 4096x16384; none: skip the Linear rows)")  # fmt: skip
    parser.add_argument("--tokens", type=int, default=TOKENS, help="rows of the Linear inputs")
    parser.add_argument("--densities", type=float, nargs="+", help=f"default {DENSITIES}")
    parser.add_argument("--blocks", type=int, nargs="+", help=f"default {BLOCKS}")
    parser.add_argument("--refreshes", type=int, nargs="+", help=f"default {REFRESHES}")
    parser.add_argument("--vocab", type=int, default=50304, help="model vocabulary")
    parser.add_argument("--lm-batch", type=int, default=LM_BATCH, help="sequences of 1024")
    parser.add_argument("--skip-model", action="store_true", help="Linear rows only")
    parser.add_argument("--warmup", type=int, help="untimed steps per trainer (default 3)")
    parser.add_argument("--repeats", type=int, help="timed Linear steps (default 10)")
    parser.add_argument("--model-repeats", type=int, help="timed model steps (default 5)")
    parser.add_argument("--pure-bf16", action="store_true", help="bf16 weights, no autocast")
    parser.add_argument("--device-reservoir", action="store_true",
                        help="Top-KAST's reservoir in GPU memory (default: host)")  # fmt: skip
    parser.add_argument("--budget", type=float, default=420.0,
                        help="seconds after which no new row starts (default 420)")  # fmt: skip
    parser.add_argument("--quick", action="store_true",
                        help="density 0.1, block 32, 1 warm-up and 3 timed steps")  # fmt: skip
    args = parser.parse_args(argv)
    quick = args.quick
    if args.shapes is None:
        args.shapes = SHAPES
    args.densities = args.densities or ((0.1,) if quick else DENSITIES)
    args.blocks = args.blocks or ((32,) if quick else BLOCKS)
    args.refreshes = args.refreshes or REFRESHES
    args.warmup = args.warmup if args.warmup is not None else (1 if quick else 3)
    args.repeats = args.repeats or (3 if quick else 10)
    args.model_repeats = args.model_repeats or (3 if quick else 5)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit(
            "benchmarks/gpu.py needs a CUDA GPU: torch.cuda.is_available() is False "
            f"(torch {torch.__version__}). Run benchmarks/sparse_backend.py for the CPU backend."
        )
    if not triton_bsr.triton_available():
        sys.exit("benchmarks/gpu.py needs Triton for backend 'gpu': pip install triton")
    if args.device_reservoir:
        GpuBackend.reservoir_on_host = False
    budget = Budget(args.budget)
    precision = "bf16 weights" if args.pure_bf16 else "fp32 master weights, bf16 autocast"
    print(
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {precision}, AdamW; "
        f"median of {args.repeats} (Linear) / {args.model_repeats} (model) steps after "
        f"{args.warmup} warm-up; Top-KAST reservoir on "
        f"{'host' if GpuBackend.reservoir_on_host else 'device'}\n"
    )
    print(HEADER)
    print("-" * len(HEADER.splitlines()[1]))
    run_linear(args, budget)
    if not args.skip_model:
        run_model(args, budget)
    skipped = ", stopped early by --budget: rows missing" if budget.skipped else ""
    print(f"\n{LEGEND}\ntotal {time.perf_counter() - budget.start:.0f} s{skipped}")


if __name__ == "__main__":
    main()
