"""Training-step time and memory of the sparse backend, against dense and masked training.

Every row trains three copies of one model, from the same initial weights: dense,
``Sparsity(..., backend="masked")`` and ``Sparsity(..., backend="sparse")``, all with
``method="static"`` (the topology never changes, so this is the pure training step), AdamW, and
the loop ``loss + sparsity.regularizer()``, ``backward``, ``optimizer.step``,
``zero_grad(set_to_none=True)``, ``sparsity.step``. Workloads:

- single Linear layers, batch x in x out (default 2048 x 1024 x 4096 and 2048 x 4096 x 1024), at
  densities 0.5, 0.2, 0.1, 0.05, 0.01, unstructured (block 1) and in 16 x 16 blocks. The loss
  hands a fixed random gradient to the output at no cost and the input requires grad, so a step
  is forward + input gradient + weight gradient (sampled, for the sparse backend) + AdamW;
- a small byte-level TransformerLM (2 layers, d_model 256, d_ff 1024, context 128, batch 16, random
  bytes, ``lm_loss``) at densities 0.1 and 0.05. Its embeddings (tied with the head), LayerNorms
  and biases stay dense, so its memory does not shrink in proportion to the density.

Per row it prints:

- time: median ms of a training step over ``--repeats`` after a warm-up step, for dense, masked,
  sparse (the three are stepped in turn, repeat by repeat, so that a shared machine's drifts hit
  them alike), and the speed-up of sparse over dense (s/d) and over masked (s/m);
- memory: MiB of parameters + gradients + AdamW state (exp_avg, exp_avg_sq, step), summed as
  numel * element_size over the actual tensors in a separate, untimed step (gradients read just
  before ``zero_grad``); the ratio sparse/dense; the bound 1.5 x density x dense; and, apart, the
  index buffers of the SparseLinear layers (``units``, int32; ``in_a``; ``reservoir`` when
  present) and the index structures they cache for the kernels (int64 CSR/BSR row pointers; int32
  columns, slots and transpose).
  The masked backend's own buffers (two bool masks and a snapshot of theta) are not counted.

Run (about 4 minutes on 2 idle cores; each row is printed as soon as it is measured):

    python3 benchmarks/sparse_backend.py
    python3 benchmarks/sparse_backend.py --quick        # smoke run: density 0.1, 1 repeat
    python3 benchmarks/sparse_backend.py --shapes 2048x1024x4096 --densities 0.1 --blocks 16

Memory allocation: glibc returns large freed blocks (activations, gradients) to the system, so
every step page-faults its outputs in again; on a VM that costs ~25 ms per 32 MiB, the same for
every backend but a large share of a sparse step. Keeping freed memory in the process removes
it for dense and sparse alike (the header says which setting ran):

    MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=4294967296 \
        python3 benchmarks/sparse_backend.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from alwayssparse import Sparsity, kernels
from alwayssparse.backends.sparse import SparseLinear
from alwayssparse.models import TransformerLM, TransformerLMConfig, lm_loss

DENSITIES = (0.5, 0.2, 0.1, 0.05, 0.01)
LM_DENSITIES = (0.1, 0.05)
QUICK_DENSITIES = (0.1,)
SHAPES = [(2048, 1024, 4096), (2048, 4096, 1024)]  # batch x in x out
LM_CONFIG = TransformerLMConfig(n_layer=2, n_head=4, d_model=256, d_ff=1024, context=128)
SPARSE_BACKENDS = ("masked", "sparse")
MIB = 2**20


# -- workloads ------------------------------------------------------------------------------------


class _FixedGradient(torch.autograd.Function):
    """A scalar 0 whose gradient with respect to ``y`` is ``grad``: a loss that costs nothing."""

    @staticmethod
    def forward(ctx: Any, y: Tensor, grad: Tensor) -> Tensor:
        ctx.save_for_backward(grad)
        return y.new_zeros(())

    @staticmethod
    def backward(ctx: Any, _: Tensor) -> tuple[Tensor, None]:
        (grad,) = ctx.saved_tensors
        return grad, None


@dataclass
class Workload:
    """What to train: a model factory and the loss of one batch."""

    name: str
    make_model: Callable[[], nn.Module]
    loss: Callable[[nn.Module], Tensor]


def linear_workload(batch: int, in_features: int, out_features: int) -> Workload:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, in_features, generator=generator, requires_grad=True)
    grad_y = torch.randn(batch, out_features, generator=generator)

    def loss(model: nn.Module) -> Tensor:
        x.grad = None  # the input gradient is computed afresh, never accumulated
        return _FixedGradient.apply(model(x), grad_y)

    def make_model() -> nn.Module:
        # Inside a container: Sparsity swaps the Linear for a SparseLinear in its parent module.
        return nn.Sequential(nn.Linear(in_features, out_features))

    return Workload(f"Linear {batch}x{in_features}x{out_features}", make_model, loss)


def lm_workload(config: TransformerLMConfig, batch: int) -> Workload:
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, config.vocab_size, (batch, config.context + 1), generator=generator)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]  # [B, T] each

    def loss(model: nn.Module) -> Tensor:
        return lm_loss(model(inputs), targets)

    name = f"LM {config.n_layer}x{config.d_model} ff{config.d_ff} B{batch}"
    return Workload(name, lambda: TransformerLM(config), loss)


# -- memory ---------------------------------------------------------------------------------------


@dataclass
class Memory:
    """Bytes held by one trained model."""

    training: int  # parameters + gradients + optimizer state
    index: int = 0  # SparseLinear buffers: units, in_a, reservoir
    cache: int = 0  # SparseLinear's cached kernel index structures


def _nbytes(tensors: Iterable[Tensor]) -> int:
    unique = {id(t): t for t in tensors}
    return sum(t.numel() * t.element_size() for t in unique.values())


def _tensors_in(obj: object) -> Iterator[Tensor]:
    """Every tensor in ``obj``, looking into tuples, lists and the attributes of objects."""
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            yield from _tensors_in(item)
    elif hasattr(obj, "__dict__"):
        yield from _tensors_in(list(vars(obj).values()))


def memory_of(model: nn.Module, optimizer: torch.optim.Optimizer) -> Memory:
    """Count the bytes of ``model`` now (call it while the gradients exist)."""
    params = list(model.parameters())
    grads = [p.grad for p in params if p.grad is not None]
    state = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, Tensor)]
    layers = [m for m in model.modules() if isinstance(m, SparseLinear)]
    index = [b for m in layers for b in (m.units, m.in_a, m.reservoir) if b is not None]
    cache = [t for m in layers for t in _tensors_in(m.patterns())]
    return Memory(_nbytes(params + grads + state), _nbytes(index), _nbytes(cache))


# -- training -------------------------------------------------------------------------------------


class Trainer:
    """A model, its AdamW optimizer and its Sparsity (none when dense)."""

    def __init__(self, workload: Workload, backend: str, density: float, block: int) -> None:
        torch.manual_seed(0)  # the same initial weights for every backend
        self.model = workload.make_model()
        self.loss = workload.loss
        self.sparsity = None
        if backend != "dense":
            self.sparsity = Sparsity(
                self.model, method="static", density=density, backend=backend, block_size=block
            )
        # After Sparsity: with backend "sparse" the trainable tensors are new ``values``.
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-3, weight_decay=0.01)
        self.steps = 0

    def step(self, before_zero_grad: Callable[[], None] | None = None) -> None:
        loss = self.loss(self.model)
        if self.sparsity is not None:
            loss = loss + self.sparsity.regularizer()
        loss.backward()
        self.optimizer.step()
        if before_zero_grad is not None:
            before_zero_grad()
        self.optimizer.zero_grad(set_to_none=True)
        if self.sparsity is not None:
            self.sparsity.step(self.steps, self.optimizer)
        self.steps += 1

    def memory(self) -> Memory:
        """Take one untimed step and count the bytes held just before ``zero_grad``."""
        counted: list[Memory] = []
        self.step(lambda: counted.append(memory_of(self.model, self.optimizer)))
        return counted[0]


def time_in_turn(trainers: dict[str, Trainer], repeats: int) -> dict[str, float]:
    """Median ms per step of each trainer after one warm-up step, stepping them in turn."""
    for trainer in trainers.values():
        trainer.step()
    samples: dict[str, list[float]] = {name: [] for name in trainers}
    for _ in range(repeats):
        for name, trainer in trainers.items():
            start = time.perf_counter()
            trainer.step()
            samples[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(values) for name, values in samples.items()}


# -- the table ------------------------------------------------------------------------------------


@dataclass
class Row:
    workload: str
    block: int
    density: float
    ms: dict[str, float]
    memory: dict[str, Memory]


HEADER = (
    f"{'':27} {'':3} {'':5} | {'time ms':^23} | {'speed-up':^11} | "
    f"{'params+grads+AdamW MiB':^23} | {'sparse/dense':^14} | {'sparse idx MiB':^13}\n"
    f"{'workload':27} {'blk':>3} {'dens':>5} | {'dense':>7} {'masked':>7} {'sparse':>7} | "
    f"{'s/d':>5} {'s/m':>5} | {'dense':>7} {'masked':>7} {'sparse':>7} | "
    f"{'ratio':>6} {'bound':>7} | {'index':>6} {'cache':>6}"
)

LEGEND = """\
time: median training step (forward, input and weight gradients, AdamW, sparsity.step).
speed-up: s/d = dense ms / sparse ms, s/m = masked ms / sparse ms.
ratio: sparse / dense params+grads+AdamW memory; bound: the issue's 1.5 x density x dense, in MiB.
index: SparseLinear units + in_a (+ reservoir); cache: its cached CSR/BSR index structures."""


def format_row(row: Row) -> str:
    ms, mem = row.ms, {name: m.training / MIB for name, m in row.memory.items()}
    sparse = row.memory["sparse"]
    return (
        f"{row.workload:27} {row.block:3d} {row.density:5.2f} | "
        f"{ms['dense']:7.1f} {ms['masked']:7.1f} {ms['sparse']:7.1f} | "
        f"{ms['dense'] / ms['sparse']:5.2f} {ms['masked'] / ms['sparse']:5.2f} | "
        f"{mem['dense']:7.2f} {mem['masked']:7.2f} {mem['sparse']:7.2f} | "
        f"{mem['sparse'] / mem['dense']:6.3f} {1.5 * row.density * mem['dense']:7.2f} | "
        f"{sparse.index / MIB:6.2f} {sparse.cache / MIB:6.2f}"
    )


def benchmark(
    workload: Workload, densities: Iterable[float], blocks: Iterable[int], repeats: int
) -> None:
    """Print one row per (block, density): dense, masked and sparse trained side by side."""
    dense = Trainer(workload, "dense", 1.0, 1)
    dense_memory = dense.memory()
    for block in blocks:
        for density in densities:
            trainers = {"dense": dense}
            memory = {"dense": dense_memory}
            for backend in SPARSE_BACKENDS:
                trainers[backend] = Trainer(workload, backend, density, block)
                memory[backend] = trainers[backend].memory()
            ms = time_in_turn(trainers, repeats)
            print(format_row(Row(workload.name, block, density, ms, memory)), flush=True)


def parse_shape(text: str) -> tuple[int, int, int]:
    batch, in_features, out_features = (int(v) for v in text.lower().split("x"))
    return batch, in_features, out_features


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--shapes", type=parse_shape, nargs="*", default=SHAPES, help="batch x in x out"
    )
    parser.add_argument("--densities", type=float, nargs="+", help=f"default {DENSITIES}")
    parser.add_argument("--lm-densities", type=float, nargs="*", help=f"default {LM_DENSITIES}")
    parser.add_argument("--lm-batch", type=int, default=16)
    parser.add_argument("--blocks", type=int, nargs="+", default=[1, 16], help="1: unstructured")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, help="timed steps per row (default 7)")
    parser.add_argument("--quick", action="store_true", help="density 0.1 only, 1 repeat")
    args = parser.parse_args()
    densities = args.densities or (QUICK_DENSITIES if args.quick else DENSITIES)
    lm_densities = args.lm_densities
    if lm_densities is None:
        lm_densities = QUICK_DENSITIES if args.quick else LM_DENSITIES
    repeats = args.repeats or (1 if args.quick else 7)
    torch.set_num_threads(args.threads)

    start = time.perf_counter()
    print(
        f"kernels: {kernels.available_backend()}, threads: {torch.get_num_threads()}, "
        f"torch {torch.__version__}, method static, AdamW, median of {repeats} steps"
    )
    tuned = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
    print(f"malloc: {' '.join(f'{k}={v}' for k, v in sorted(tuned.items())) or 'glibc defaults'}\n")
    print(HEADER)
    print("-" * len(HEADER.splitlines()[1]))
    for shape in args.shapes:
        benchmark(linear_workload(*shape), densities, args.blocks, repeats)
    if lm_densities:
        benchmark(lm_workload(LM_CONFIG, args.lm_batch), lm_densities, args.blocks, repeats)
    print(f"\n{LEGEND}\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
