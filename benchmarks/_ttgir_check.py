"""Compile the attention kernels for sm_90 without a GPU and count key TTGIR ops per kernel variant.

Shows whether a loop was software-pipelined (async copies into shared memory) and whether the dots became
Hopper wgmma (`warp_group_dot`). Needs only the `triton` package (its bundled ptxas); uses the local Triton,
which may pipeline differently from the GPU machine's version.

    python benchmarks/_ttgir_check.py
"""

from __future__ import annotations

import collections
import inspect
import re

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from l2a.ops.triton import _flash, _flash_bwd, _flash_fwd

INT_POINTERS = {"IDX", "LO", "HI", "CNT", "ROW_START", "ROW_END", "FULL_START", "FULL_END", "PHASE_START"}
FLOAT_POINTERS = {"LSE", "DLSE", "DELTA", "LSEC", "DELTAC"}
TENSOR_POINTERS = {"Q", "K", "V", "Out", "DO", "DQ", "DK", "DV", "QC", "DOC"}
OPS = ("async_copy_global_to_local", "warp_group_dot", "scf.if")


def _signature(kernel: triton.JITFunction, constexprs: dict) -> dict[str, str]:
    sig = {}
    for name in inspect.signature(kernel.fn).parameters:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in INT_POINTERS:
            sig[name] = "*i32"
        elif name in FLOAT_POINTERS:
            sig[name] = "*fp32"
        elif name in TENSOR_POINTERS:
            sig[name] = "*bf16"
        elif name in ("qk_scale", "scale"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def main() -> None:
    target = GPUTarget("cuda", 90, 32)
    common = dict(R=7, HEAD_DIM=128, DOT_PRECISION="tf32")
    jobs = [
        ("fwd", _flash_fwd._fwd_kernel, dict(common, BLOCK_M=128, BLOCK_N=64), 3),
        ("dq", _flash_bwd._bwd_dq_kernel, dict(common, BLOCK_M=128, BLOCK_N=64, HAS_DLSE=False), 2),
    ]
    jobs += [
        (f"dkdv {loop}", _flash_bwd._bwd_dkdv_kernel, dict(common, BLOCK_M=64, BLOCK_N=128, LOOP=loop), 2)
        for loop in _flash.DKDV_LOOPS
    ]
    print(f"triton {triton.__version__}, sm_90, 8 warps")
    for name, kernel, constexprs, stages in jobs:
        src = ASTSource(kernel, _signature(kernel, constexprs), constexprs=constexprs)
        compiled = triton.compile(src, target=target, options=dict(num_warps=8, num_stages=stages))
        ops = collections.Counter(re.findall(r"\b(?:ttg|ttng)\.(\w+)|(scf\.if)", compiled.asm["ttgir"]))
        counts = {op: sum(v for k, v in ops.items() if op in k) for op in OPS}
        print(f"{name:>12}  stages={stages}  smem={compiled.metadata.shared:>6} B  {counts}")


if __name__ == "__main__":
    main()
