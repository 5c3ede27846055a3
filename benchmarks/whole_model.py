"""Whole-model training step of every method on both backends, against dense (issue 14).

A byte-level TransformerLM (default: 4 layers, d_model 512, d_ff 2048, 8 heads, context 256,
batch 8, random bytes, ``lm_loss``) at density 0.1, AdamW (lr 1e-3, weight decay 0.01; torch's
loop, or with ``--optimizer adamw-fused`` its fused kernel, what ``alwayssparse train`` uses), the
loop ``loss + sparsity.regularizer()``, ``backward``, ``optimizer.step``,
``zero_grad(set_to_none=True)``, ``sparsity.step``. Rows: ``static``; ``topkast`` (0.9, 0.8)
refreshing every step and every 100 steps; ``set`` and ``rigl`` with their default schedules
(an update every 100 steps until 75% of a ``--run-steps`` run, drop fraction 0.3
cosine-decayed). Every model starts from the same initial weights; the embeddings (tied with
the head), LayerNorms and biases stay dense.

Timing. All models are stepped in turn, round by round, so that a shared machine's drifts hit
them alike; the step numbers handed to ``sparsity.step`` are chosen so that every round of a
model with periodic updates runs

    plain   a step with no mask update
    update  the step whose ``sparsity.step`` changes masks
    after   the step that follows it (it pays for caches rebuilt after the change)

and the update steps of the rounds are the run's own (SET/RigL: the 1st, 2nd... update of the
run, with their drop fractions; RigL's update step also captures the dense gradient). The time
per step averaged over a run is then

    plain + (updates in the run / run steps) * (update + after - 2 * plain)

each kind summarised by its median over the rounds ("median") and, as readings that a shared
machine disturbs less, by its minimum ("best": other processes only ever add time) and by the
median of the process's CPU time (all threads; "cpu": waiting for a core is not counted).
Top-KAST refreshing every step has every step an update; static and dense only plain steps.
The last column also gives the median share of B's units that enter B at an update (read outside
the timed steps): these are early steps of a randomly initialised model, whose masks move far
more than a trained model's.
"x" is dense ms / this ms (higher is faster), the two readings each against dense's own.

Run (about 5 minutes on 2 idle cores):

    python3 benchmarks/whole_model.py
    python3 benchmarks/whole_model.py --quick          # 2 layers, d_model 256, 2 rounds
    python3 benchmarks/whole_model.py --backends sparse --methods static topkast-1
    python3 benchmarks/whole_model.py --block-size 16         # 16x16 blocks
    python3 benchmarks/whole_model.py --allocator default     # glibc's malloc as it comes

By default glibc's malloc keeps freed memory for reuse (:mod:`alwayssparse.host_memory`, as
``alwayssparse train`` does): otherwise the steps page-fault on the activations they allocate
again, which costs the short sparse steps a larger share than the dense one.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from alwayssparse import Sparsity, kernels
from alwayssparse.host_memory import reuse_freed_memory
from alwayssparse.models import TransformerLM, TransformerLMConfig, lm_loss

FULL = TransformerLMConfig(n_layer=4, n_head=8, d_model=512, d_ff=2048, context=256)
QUICK = TransformerLMConfig(n_layer=2, n_head=4, d_model=256, d_ff=1024, context=128)


@dataclass(frozen=True)
class MethodSpec:
    """One row: a method and its options."""

    label: str
    method: str
    options: dict[str, object] = field(default_factory=dict)


METHODS = {
    "static": MethodSpec("static", "static"),
    "topkast-1": MethodSpec(
        "topkast r1", "topkast", {"backward_sparsity": 0.8, "refresh_interval": 1}
    ),
    "topkast-100": MethodSpec(
        "topkast r100", "topkast", {"backward_sparsity": 0.8, "refresh_interval": 100}
    ),
    "set": MethodSpec("set", "set"),
    "rigl": MethodSpec("rigl", "rigl"),
}


class Trainer:
    """A model, its AdamW optimizer and its Sparsity (none when dense)."""

    def __init__(
        self,
        config: TransformerLMConfig,
        batch: int,
        backend: str,
        spec: MethodSpec | None,
        density: float,
        run_steps: int,
        fused: bool = False,
        block: int = 1,
    ) -> None:
        torch.manual_seed(0)  # the same initial weights and batch for every model
        self.model = TransformerLM(config)
        tokens = torch.randint(0, config.vocab_size, (batch, config.context + 1))
        self.inputs, self.targets = tokens[:, :-1], tokens[:, 1:]
        self.sparsity = None
        self.updates: list[int] = []  # optimizer steps whose sparsity.step changes masks
        self.every_step = False
        if spec is not None:
            self.sparsity = Sparsity(
                self.model, method=spec.method, density=density, backend=backend,
                total_steps=run_steps, block_size=block, **spec.options,
            )  # fmt: skip
            method = self.sparsity.method
            self.updates = [s for s in range(run_steps) if method.updates_at(s)]
            self.every_step = len(self.updates) == run_steps
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=1e-3, weight_decay=0.01, fused=fused
        )

    def step(self, number: int) -> None:
        loss = lm_loss(self.model(self.inputs), self.targets)
        if self.sparsity is not None:
            loss = loss + self.sparsity.regularizer()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.sparsity is not None:
            self.sparsity.step(number, self.optimizer)

    def stored_units(self) -> list[np.ndarray]:
        """B's sorted units of every sparse tensor (a copy; read outside the timed steps)."""
        assert self.sparsity is not None
        return [t.storage.units()[0].cpu().numpy().copy() for t in self.sparsity.tensors]

    def plain_step_before(self, update: int) -> int:
        """A step number just before ``update`` at which nothing changes."""
        assert self.sparsity is not None
        number = update - 1
        while self.sparsity.method.updates_at(number):
            number -= 1
        return number


@dataclass
class Samples:
    """Milliseconds of each kind of step: wall clock, and the process's CPU time."""

    plain: list[float] = field(default_factory=list)
    update: list[float] = field(default_factory=list)
    after: list[float] = field(default_factory=list)
    cpu: dict[str, list[float]] = field(default_factory=dict)
    churn: list[float] = field(default_factory=list)  # fraction of B that changed per update

    def add(self, kind: str, fn: Callable[[], None]) -> None:
        start, cpu = time.perf_counter(), time.process_time()
        fn()
        getattr(self, kind).append((time.perf_counter() - start) * 1e3)
        self.cpu.setdefault(kind, []).append((time.process_time() - cpu) * 1e3)

    def of_cpu(self) -> Samples:
        cpu = self.cpu
        return Samples(cpu.get("plain", []), cpu.get("update", []), cpu.get("after", []))


def run_round(trainer: Trainer, samples: Samples, round_index: int) -> None:
    """One round of one model: a plain step, or plain + update + after (see the docstring)."""
    if trainer.sparsity is None or not trainer.updates:
        number = 1000 + round_index  # any step: nothing ever changes
        samples.add("plain", lambda: trainer.step(number))
        return
    if trainer.every_step:
        before = trainer.stored_units()
        samples.add("update", lambda: trainer.step(round_index + 2))
        samples.churn.append(churn(before, trainer.stored_units()))
        return
    update = trainer.updates[round_index % len(trainer.updates)]
    samples.add("plain", lambda: trainer.step(trainer.plain_step_before(update)))
    before = trainer.stored_units()
    samples.add("update", lambda: trainer.step(update))
    samples.churn.append(churn(before, trainer.stored_units()))
    samples.add("after", lambda: trainer.step(update + 1))


def churn(before: list[np.ndarray], after: list[np.ndarray]) -> float:
    """The fraction of B's units (over all tensors) that entered B between two readings."""
    entered = total = 0
    for old, new in zip(before, after, strict=True):
        if old.size:
            found = old[np.searchsorted(old, new).clip(max=old.size - 1)] == new
            entered += int(np.count_nonzero(~found))
        else:
            entered += new.size
        total += new.size
    return entered / max(total, 1)


def per_step(
    trainer: Trainer, samples: Samples, run_steps: int, pick: Callable[[list[float]], float]
) -> tuple[float, str]:
    """Milliseconds per step averaged over a run (each kind of step summarised by ``pick``:
    the median, or the minimum), and how it was obtained."""
    if not samples.update:
        return pick(samples.plain), "plain steps"
    if not samples.plain:
        return pick(samples.update), "every step updates"
    plain, update, after = pick(samples.plain), pick(samples.update), pick(samples.after)
    share = len(trainer.updates) / run_steps
    note = (
        f"plain {plain:.0f} + {len(trainer.updates)}/{run_steps} x (update {update:.0f} + after "
        f"{after:.0f} - 2 plain)"
    )
    return plain + share * (update + after - 2 * plain), note


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small model, 2 rounds")
    parser.add_argument("--rounds", type=int, help="timed rounds (default 5, --quick 2)")
    parser.add_argument("--density", type=float, default=0.1)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--run-steps", type=int, default=1000, help="run length for schedules")
    parser.add_argument("--backends", nargs="+", default=["masked", "sparse"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument(
        "--block-size", type=int, default=1, help="unit edge: 1 (unstructured), 4, 8 or 16"
    )
    parser.add_argument(
        "--allocator", choices=["reuse", "default"], default="reuse",
        help="glibc malloc keeping freed memory for reuse (what `alwayssparse train` sets, "
        "alwayssparse.host_memory) or its default settings; every model runs with the same",
    )  # fmt: skip
    parser.add_argument(
        "--optimizer", choices=["adamw", "adamw-fused"], default="adamw",
        help="torch's AdamW loop (default) or its fused kernel (what `alwayssparse train` uses)",
    )  # fmt: skip
    args = parser.parse_args()
    config = QUICK if args.quick else FULL
    rounds = args.rounds or (2 if args.quick else 5)
    torch.set_num_threads(args.threads)

    fused = args.optimizer == "adamw-fused"
    start = time.perf_counter()
    tuned = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
    if args.allocator == "reuse" and reuse_freed_memory():
        tuned["mallopt"] = "reuse_freed_memory()"
    print(
        f"LM {config.n_layer}L d{config.d_model} ff{config.d_ff} ctx{config.context} "
        f"batch {args.batch}, density {args.density}, block {args.block_size}, {args.optimizer}, "
        f"threads {torch.get_num_threads()}, "
        f"kernels {kernels.available_backend()}, torch {torch.__version__}, {rounds} rounds, "
        f"malloc: {' '.join(f'{k}={v}' for k, v in sorted(tuned.items())) or 'glibc defaults'}",
        flush=True,
    )
    trainers: dict[tuple[str, str], Trainer] = {
        ("dense", "dense"): Trainer(config, args.batch, "dense", None, 1.0, args.run_steps, fused)
    }
    for backend in args.backends:
        for key in args.methods:
            spec = METHODS[key]
            trainers[(spec.label, backend)] = Trainer(
                config, args.batch, backend, spec, args.density, args.run_steps, fused,
                args.block_size,
            )  # fmt: skip
    samples = {key: Samples() for key in trainers}
    for trainer in trainers.values():  # warm-up: one step of each kind
        run_round(trainer, Samples(), 0)
    for index in range(rounds):
        for key, trainer in trainers.items():
            run_round(trainer, samples[key], index + 1)

    def wall(s: Samples) -> Samples:
        return s

    def smallest(values: list[float]) -> float:
        return min(values)

    readings: dict[str, tuple[Callable[[list[float]], float], Callable[[Samples], Samples]]] = {
        "median": (statistics.median, wall),
        "best": (smallest, wall),
        "cpu": (statistics.median, Samples.of_cpu),
    }
    dense_key = ("dense", "dense")
    dense = {
        name: per_step(trainers[dense_key], view(samples[dense_key]), 1, pick)[0]
        for name, (pick, view) in readings.items()
    }
    print(
        f"\n{'method':14} {'backend':8} {'median ms':>9} {'x dense':>7} {'best ms':>8} "
        f"{'x dense':>7} {'cpu ms':>8} {'x dense':>7}  how (medians)"
    )
    for key, trainer in trainers.items():
        cells = []
        for name, (pick, view) in readings.items():
            ms, _ = per_step(trainer, view(samples[key]), args.run_steps, pick)
            cells.append(f"{ms:8.1f} {dense[name] / ms:7.2f}")
        _, note = per_step(trainer, samples[key], args.run_steps, statistics.median)
        if samples[key].churn:
            note += f"; {100 * statistics.median(samples[key].churn):.1f}% of B changes per update"
        print(f"{key[0]:14} {key[1]:8} {' '.join(cells)}  {note}")
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
