"""Sparse inference and file size: a GPT-2-small-shaped model, exported compressed, against dense.

The model is Hugging Face ``GPT2LMHeadModel`` with GPT-2 small's shape (12 layers, d_model 768,
12 heads, d_ff 3072, vocabulary 50257, 124M parameters), randomly initialised (nothing is
downloaded). For each density its 48 Conv1D weights (attention qkv and projection, MLP in and
out: 85M weights) get static random masks (``Sparsity(method="static")``), the model is written
with :func:`alwayssparse.inference.save` compressed (CSR: float32 values + int32 column indices +
int32 row pointers) and dense, and the compressed file is read back with ``alwayssparse.load``,
which puts a :class:`~alwayssparse.inference.SparseInferenceLinear` (the C++ CSR kernels) in place
of each Conv1D. Embeddings, LayerNorms, biases and the LM head (tied to the token embedding,
38.6M weights) stay dense.

Latency: median ms of a ``torch.inference_mode`` forward of ``batch`` sequences of ``seq`` tokens
(default 1: one position per sequence, as a decoding step without the KV cache, where the weight
products are all the work), for the whole model (LM head included) and for the transformer body
alone (``model.transformer``, where the sparse layers are), dense and sparse measured in turn,
repeat by repeat. The dense model is the plain exported model (zeros outside A, dense products).

File size: the two .safetensors files (whole model), and the bytes of the 48 sparse weights alone.

Run (about 2 minutes on 2 cores):

    python3 benchmarks/inference.py
    python3 benchmarks/inference.py --densities 0.1 --batches 1 --seq 1 16
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import alwayssparse
from alwayssparse import Sparsity, kernels
from alwayssparse.inference import read_header, save


def gpt2_small() -> nn.Module:
    import transformers

    config = transformers.GPT2Config(n_layer=12, n_embd=768, n_head=12, n_positions=1024,
                                     vocab_size=50257)  # fmt: skip
    return transformers.GPT2LMHeadModel(config).eval()


def median_ms(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median ms per function, calling them in turn, repeat by repeat, after a warm-up."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--densities", type=float, nargs="+", default=[0.1, 0.05])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--seq", type=int, nargs="+", default=[1])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, kernels "
          f"{kernels.available_backend()}")  # fmt: skip
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for density in args.densities:
            model = gpt2_small()
            sp = Sparsity(model, method="static", density=density)
            assert len(sp.tensors) == 48
            compressed, dense_file = Path(tmp) / "c.safetensors", Path(tmp) / "d.safetensors"
            header = save(model, compressed, sparsity=sp)
            save(model, dense_file, sparsity=sp, storage="dense")
            sp.export()
            dense = model.eval()
            sparse = alwayssparse.load(compressed)
            with torch.inference_mode():
                x = torch.randint(0, 50257, (2, 4))
                torch.testing.assert_close(sparse(x).logits, dense(x).logits, rtol=1e-3,
                                           atol=1e-3)  # fmt: skip
            stored = sum(e["nnz"] for e in header["tensors"].values())
            total = sum(e["shape"][0] * e["shape"][1] for e in header["tensors"].values())
            layer_bytes = _sparse_layer_bytes(compressed, header)
            print(f"\ndensity {density}: {stored:,} of {total:,} sparse-layer weights stored")
            print(f"  file: compressed {compressed.stat().st_size / 2**20:.1f} MiB, dense "
                  f"{dense_file.stat().st_size / 2**20:.1f} MiB; sparse layers alone "
                  f"{layer_bytes / 2**20:.1f} MiB vs {total * 4 / 2**20:.1f} MiB")  # fmt: skip
            for seq in args.seq:
                for batch in args.batches:
                    repeats = args.repeats if batch * seq <= 64 else max(3, args.repeats // 3)
                    ms = _measure(dense, sparse, torch.randint(0, 50257, (batch, seq)), repeats)
                    rows.append((density, batch, seq, ms))
                    print(f"  batch {batch:3d} x {seq} tokens: model dense {ms['dense']:8.2f} ms, "
                          f"sparse {ms['sparse']:8.2f} ms ({ms['dense'] / ms['sparse']:.2f}x); "
                          f"body dense {ms['dense body']:8.2f} ms, sparse "
                          f"{ms['sparse body']:8.2f} ms "
                          f"({ms['dense body'] / ms['sparse body']:.2f}x)", flush=True)  # fmt: skip
    print("\n| density | batch x tokens | model dense ms | model sparse ms | speed-up | "
          "body dense ms | body sparse ms | speed-up |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for density, batch, seq, ms in rows:
        model, body = ms["dense"] / ms["sparse"], ms["dense body"] / ms["sparse body"]
        print(
            f"| {density} | {batch} x {seq} | {ms['dense']:.1f} | {ms['sparse']:.1f} | "
            f"{model:.2f}x | {ms['dense body']:.1f} | {ms['sparse body']:.1f} | {body:.2f}x |"
        )


def _measure(dense: nn.Module, sparse: nn.Module, ids: torch.Tensor, repeats: int) -> dict:
    with torch.inference_mode():
        return median_ms({
            "dense": lambda: dense(ids),
            "sparse": lambda: sparse(ids),
            "dense body": lambda: dense.transformer(ids),
            "sparse body": lambda: sparse.transformer(ids),
        }, repeats)  # fmt: skip


def _sparse_layer_bytes(path: Path, header: dict) -> int:
    """Bytes of the compressed arrays of the sparse weights in a file written by ``save``."""
    from safetensors import safe_open

    total = 0
    with safe_open(str(path), framework="pt") as f:
        for name in header["tensors"]:
            for suffix in (".values", ".col_indices", ".crow_indices"):
                t = f.get_tensor(name + suffix)
                total += t.numel() * t.element_size()
    assert read_header(path) == header
    return total


if __name__ == "__main__":
    main()
