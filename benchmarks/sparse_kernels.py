"""Benchmark of the sparse Linear kernels (alwayssparse.kernels) against the dense step.

One training step of ``y = x @ W^T`` = forward + input gradient + sampled weight gradient.
The dense step is ``x @ W.T`` + ``grad_y @ W`` + ``grad_y.T @ x``.  Times are medians over
``--repeats`` runs (after a warm-up) with ``torch.set_num_threads(--threads)``.

    python3 benchmarks/sparse_kernels.py                       # fast path and torch fallback
    python3 benchmarks/sparse_kernels.py --backends fast --densities 0.1 0.05 0.01

The fallback is selected in-process by swapping the kernel module's backend (same as
ALWAYSSPARSE_KERNELS=torch).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from alwayssparse import kernels as K
from alwayssparse.kernels import _build


def _median_ms(fn, repeats: int) -> float:
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(ts)


def _make(n, fin, fout, density, block, gen):
    x = torch.randn(n, fin, generator=gen)
    gy = torch.randn(n, fout, generator=gen)
    w = torch.randn(fout, fin, generator=gen)
    if block == 1:
        mask = torch.rand(fout, fin, generator=gen) < density
        s = K.dense_to_csr(w, mask)
    else:
        bm = torch.rand(fout // block, fin // block, generator=gen) < density
        s = K.dense_to_bsr(w, bm, block)
    return x, gy, w, s


def _ops(block, s, x, gy, fin, fout):
    if block == 1:
        rp, ci, v = s
        return (
            lambda: K.csr_matmul(rp, ci, v, x, fout),
            lambda: K.csr_matmul_t(rp, ci, v, gy, fin),
            lambda: K.csr_sampled_grad(rp, ci, gy, x),
        )
    bp, bc, bl = s
    return (
        lambda: K.bsr_matmul(bp, bc, bl, x, fout),
        lambda: K.bsr_matmul_t(bp, bc, bl, gy, fin),
        lambda: K.bsr_sampled_grad(bp, bc, gy, x),
    )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--densities", type=float, nargs="+", default=[0.5, 0.2, 0.1, 0.05, 0.01])
    p.add_argument(
        "--shapes", nargs="+", default=["2048x1024x4096", "2048x4096x1024"], help="batch x in x out"
    )
    p.add_argument("--blocks", type=int, nargs="+", default=[1, 16], help="1 = unstructured")
    p.add_argument("--backends", nargs="+", default=["fast", "torch"], choices=["fast", "torch"])
    p.add_argument(
        "--fallback-repeats", type=int, default=3, help="repeats for the (slow) torch fallback"
    )
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    fast_backend = K.available_backend()
    print(
        f"fast backend: {fast_backend} (first load {time.perf_counter() - t0:.1f} s), "
        f"threads={torch.get_num_threads()}, torch {torch.__version__}"
    )
    gen = torch.Generator().manual_seed(0)
    hdr = (
        f"{'shape':>15} {'kind':>6} {'dens':>5} {'backend':>7} | {'fwd':>8} {'in-grad':>8} "
        f"{'w-grad':>8} {'total':>8} | {'dense':>8} {'speedup':>7}"
    )
    print(hdr)
    print("-" * len(hdr))
    for shape in args.shapes:
        n, fin, fout = (int(v) for v in shape.split("x"))
        x = torch.randn(n, fin, generator=gen)
        gy = torch.randn(n, fout, generator=gen)
        w = torch.randn(fout, fin, generator=gen)

        def dense_step(x=x, gy=gy, w=w):
            x @ w.T
            gy @ w
            gy.T @ x

        dense_ms = _median_ms(dense_step, args.repeats)
        print(
            f"{shape:>15} {'dense':>6} {1.0:>5} {'torch':>7} | {'':>8} {'':>8} {'':>8} "
            f"{dense_ms:8.2f} | {dense_ms:8.2f} {1.0:7.2f}x"
        )
        for block in args.blocks:
            for d in args.densities:
                x_, gy_, _, s = _make(n, fin, fout, d, block, gen)
                for be in args.backends:
                    saved = dict(_build._state)
                    if be == "torch":
                        _build._state.update(loaded=True, module=None)
                    reps = args.repeats if be == "fast" else args.fallback_repeats
                    try:
                        f, t, g = _ops(block, s, x_, gy_, fin, fout)
                        # Re-measure the dense step right next to the sparse one (noisy machine).
                        dms = _median_ms(dense_step, 3)
                        tf = _median_ms(f, reps)
                        tt = _median_ms(t, reps)
                        tg = _median_ms(g, reps)
                    finally:
                        _build._state.clear()
                        _build._state.update(saved)
                    tot = tf + tt + tg
                    kind = "csr" if block == 1 else f"bsr{block}"
                    name = fast_backend if be == "fast" else "torch"
                    print(
                        f"{shape:>15} {kind:>6} {d:>5} {name:>7} | {tf:8.2f} {tt:8.2f} {tg:8.2f} "
                        f"{tot:8.2f} | {dms:8.2f} {dms / tot:7.2f}x",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
