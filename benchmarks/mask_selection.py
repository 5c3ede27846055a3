"""How much does choosing masks cost, compared with a dense training step?

Prints two tables for one Linear layer (default 1024 x 4096, batch 2048):

1. selection algorithms for an exact top-k at density 0.1, in ms and as a ratio of the dense
   training step (forward + backward + AdamW step);
2. a full training step with the masked backend (Top-KAST refreshing every step, every 100 steps,
   and static), including ``sparsity.regularizer()`` and ``sparsity.step()``, as a ratio of the
   dense step.

Run: ``python benchmarks/mask_selection.py [--rows 1024 --cols 4096 --batch 2048 --threads 2]``.
Timings on shared machines are noisy: compare the ratios measured within one run.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from alwayssparse import Sparsity
from alwayssparse.masks import topk_mask


def timed(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``fn`` in milliseconds, after one warm-up call."""
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def training_step(
    layer: nn.Module, x: torch.Tensor, sparsity: Sparsity | None
) -> Callable[[], None]:
    optimizer = torch.optim.AdamW(layer.parameters(), lr=1e-3, weight_decay=0.01)
    counter = iter(range(10**9))

    def step() -> None:
        loss = layer(x).square().mean()
        if sparsity is not None:
            loss = loss + sparsity.regularizer()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if sparsity is not None:
            sparsity.step(next(counter), optimizer)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--cols", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--density", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    layer = nn.Linear(args.cols, args.rows)
    x = torch.randn(args.batch, args.cols)
    dense_ms = timed(training_step(layer, x, None), args.repeats)

    scores = torch.randn(args.rows, args.cols).abs()
    flat = scores.reshape(-1)
    n, k = flat.numel(), round(args.density * flat.numel())
    k_row = round(args.density * args.cols)
    selections: dict[str, Callable[[], object]] = {
        "torch.topk (flat)": lambda: torch.topk(flat, k),
        "torch.kthvalue (flat)": lambda: torch.kthvalue(flat, n - k + 1),
        "numpy.partition (flat)": lambda: np.partition(flat.numpy(), n - k),
        "torch.topk per row": lambda: torch.topk(scores, k_row, dim=1),
        "alwayssparse topk_mask (exact, ties by index)": lambda: topk_mask(scores, k),
    }
    print(f"Linear {args.rows} x {args.cols}, batch {args.batch}, {args.threads} threads")
    print(f"dense training step: {dense_ms:.1f} ms\n")
    print(f"{'selection at density ' + str(args.density):48s} {'ms':>8s} {'x dense step':>13s}")
    for name, fn in selections.items():
        ms = timed(fn, args.repeats)
        print(f"{name:48s} {ms:8.1f} {ms / dense_ms:13.3f}")

    print(f"\n{'training step (masked backend)':48s} {'ms':>8s} {'x dense step':>13s}")
    forward_sparsity = 1.0 - args.density
    backward_sparsity = max(0.0, 1.0 - 2 * args.density)
    variants = {
        "dense": None,
        "static": {"method": "static"},
        "topkast, refresh every step": {"method": "topkast", "refresh_interval": 1},
        "topkast, refresh every 100 steps": {"method": "topkast", "refresh_interval": 100},
    }
    reference = None
    for name, options in variants.items():
        torch.manual_seed(0)
        model = nn.Linear(args.cols, args.rows)
        sparsity = None
        if options is not None:
            if options["method"] == "topkast":
                options = {**options, "backward_sparsity": backward_sparsity}
            sparsity = Sparsity(model, sparsity=forward_sparsity, **options)
        ms = timed(training_step(model, x, sparsity), args.repeats)
        reference = reference or ms  # ratios against this table's own dense row
        print(f"{name:48s} {ms:8.1f} {ms / reference:13.3f}")


if __name__ == "__main__":
    main()
