"""Compile every Triton block-sparse kernel variant for an NVIDIA GPU, without a GPU.

For each block size, input dtype and kernel mode of :mod:`alwayssparse.kernels.triton_bsr` with
its launch configuration, compiles to PTX/cubin for the target (default sm_90, H100/H200) and
prints the matrix instruction the compiler chose (``wgmma``, ``mma``, or ``fma`` for IEEE fp32),
whether the block loop is software-pipelined (asynchronous global-to-shared copies) and the
shared memory per program. Pointers and row strides are marked divisible by 16, as Triton's
launch-time specialisation does for the tensors the wrappers pass (rows of ``in`` or ``out``
elements, both multiples of b >= 16). This checks that the kernels compile and map onto tensor
cores; it measures no speed.

Run: ``python benchmarks/triton_bsr_compile.py [--arch 90]`` (needs triton; about 20 s on
2 cores). Do not set TRITON_INTERPRET.
"""

from __future__ import annotations

import argparse
import itertools
import os
import time

from alwayssparse.kernels import triton_bsr as tb

PTR = {"fp32": "*fp32", "bf16": "*bf16", "fp16": "*fp16"}


def compile_variant(fn, dtypes: dict[str, str], consts: dict, warps: int, stages: int, arch: int):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = fn.arg_names
    signature = {}
    attrs = {}
    for i, name in enumerate(names):
        if name in consts:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = dtypes.get(name, "*i32")
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "i32"
            if name.startswith("stride"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs)
    return triton.compile(
        source,
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": warps, "num_stages": stages},
    )


def describe(kernel) -> str:
    ptx, ttgir = kernel.asm["ptx"], kernel.asm["ttgir"]
    instr = "wgmma" if "wgmma" in ptx else "mma" if "mma.sync" in ptx else "fma"
    pipelined = "async_copy_global_to_local" in ttgir or "async_tma" in ttgir
    return f"{instr:6s} pipelined={'yes' if pipelined else 'no ':3s} smem={kernel.metadata.shared}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80, 90")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("unset TRITON_INTERPRET: this compiles the kernels for a GPU")
    jit = tb._jit()
    start = time.perf_counter()
    print(f"sm_{args.arch}: kernel            b  dtype  mode      instr  loop / shared memory")
    for b, dt, forward in itertools.product(tb.BLOCK_SIZES, PTR, (True, False)):
        block_m, warps, stages = tb._DENSE_CONFIG[(b, 4 if dt == "fp32" else 2)]
        consts = {"B": b, "BLOCK_M": block_m, "TRANS_W": forward}
        consts |= {"PRECISION": "ieee", "UPCAST": False}
        dtypes = {"a_ptr": PTR[dt], "v_ptr": PTR[dt], "out_ptr": PTR[dt]}
        kernel = compile_variant(jit.dense_bsr_kernel, dtypes, consts, warps, stages, args.arch)
        mode = "forward" if forward else "input-grad"
        print(f"       dense_bsr_kernel  {b:2d} {dt:5s}  {mode:10s}  {describe(kernel)}")
    for b, dt, partial in itertools.product(tb.BLOCK_SIZES, PTR, (False, True)):
        block_n, warps, stages = tb._SAMPLED_CONFIG[b]
        consts = {"B": b, "BLOCK_N": block_n, "PARTIAL": partial}
        consts |= {"PRECISION": "ieee", "UPCAST": False}
        dtypes = {"dy_ptr": PTR[dt], "x_ptr": PTR[dt], "out_ptr": "*fp32" if partial else PTR[dt]}
        kernel = compile_variant(jit.sampled_grad_kernel, dtypes, consts, warps, stages, args.arch)
        mode = "split" if partial else "direct"
        print(f"    sampled_grad_kernel  {b:2d} {dt:5s}  {mode:10s}  {describe(kernel)}")
    print(f"compiled in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
