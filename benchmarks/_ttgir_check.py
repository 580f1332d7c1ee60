"""Compile the attention kernels for sm_90 without a GPU: key TTGIR ops and the registers / stack per variant.

Shows whether a loop was software-pipelined (async copies into shared memory), whether the dots became Hopper
wgmma (`warp_group_dot`), and (`cuobjdump -res-usage` on the cubin) registers and stack frame per thread. The
pointers and the (B, N, H) strides get the 16-byte divisibility hints that the JIT gives them at the
benchmark's shapes (other integer arguments get none, so the GPU's kernels can still differ a little, e.g. in
shared memory): without the hints Triton neither vectorises nor pipelines the tile loads, and the counts say
nothing about the GPU's kernels. Needs only the `triton` package (its bundled ptxas and cuobjdump); uses the
local Triton: install the GPU machine's version (`pip install --target DIR triton==3.6.0`, DIR first on
PYTHONPATH) to see what it compiles.

    python benchmarks/_ttgir_check.py [--decode]   (--decode: the decode step's kernels instead)
"""

from __future__ import annotations

import collections
import inspect
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from l2a.ops.triton import _flash, _flash_bwd, _flash_fwd

INT_POINTERS = {"IDX", "LO", "HI", "CNT", "ROW_START", "ROW_END", "FULL_START", "FULL_END", "PHASE_START"}
FLOAT_POINTERS = {"LSE", "DLSE", "DELTA", "LSEC", "DELTAC"}
TENSOR_POINTERS = {"Q", "K", "V", "Out", "DO", "DQ", "DK", "DV", "QC", "DOC"}
# integer arguments that are multiples of 16 at the benchmark's shapes: (B, N, H) strides, key count
DIVISIBLE_INTS = re.compile(r"stride_(q|k|v|o|do|dq|dk|dv)[bnh]$|^nk$")
OPS = ("async_copy_global_to_local", "warp_group_dot", "scf.if")


def _source(kernel: triton.JITFunction, constexprs: dict) -> ASTSource:
    sig, attrs = {}, {}
    for i, name in enumerate(inspect.signature(kernel.fn).parameters):
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
        if sig[name].startswith("*") or DIVISIBLE_INTS.search(name):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return ASTSource(kernel, sig, constexprs=constexprs, attrs=attrs)


def _resources(cubin: bytes) -> str:
    """'REG:n STACK:n' of the cubin, from the cuobjdump that ships with Triton."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    return " ".join(re.findall(r"(?:REG|STACK):\d+", out))


# the decode-step kernels' pointer arguments: bf16 data, uint8 flags, int64 slots, float32 tables
DECODE_POINTERS = {
    **dict.fromkeys(("X", "W", "BIAS", "RES", "COS", "SIN", "Y", "P", "KC", "VC"), "*bf16"),
    **dict.fromkeys(("Q", "K", "V", "Out", "NW", "RW", "WQ", "BQ", "WKV", "BKV"), "*bf16"),
    **dict.fromkeys(("PO", "PL", "LSE", "LOGITS", "RSTD", "SOFT"), "*fp32"),
    "ACT": "*u8", "HARD": "*u8", "SLOTS": "*i64", "KS": "*i64", "NKP": "*i32",
}  # fmt: skip


def _decode_source(kernel: triton.JITFunction, constexprs: dict) -> ASTSource:
    sig, attrs = {}, {}
    for i, name in enumerate(inspect.signature(kernel.fn).parameters):
        sig[name] = "constexpr" if name in constexprs else DECODE_POINTERS.get(name, "i32")
        if name in ("eps", "qk_scale", "offset", "temperature", "threshold"):
            sig[name] = "fp32"
        if sig[name].startswith("*") or name.startswith("stride_") and not name.endswith("cs"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return ASTSource(kernel, sig, constexprs=constexprs, attrs=attrs)


def decode_jobs() -> list[tuple[str, triton.JITFunction, dict, dict]]:
    """The decode step's kernels (projections with RoPE / cache-write epilogues, the global branch's entry,
    norm + logits, split and merge) at the Qwen2.5-7B shape's constexprs: (name, kernel, constexprs, launch
    options)."""
    from l2a.ops.triton import decode, rmsnorm, routed_linear

    routed = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=256, DOT_PRECISION="ieee")
    kv = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=512, DOT_PRECISION="ieee")
    four = dict(num_warps=4, num_stages=4)
    flags = dict(HAS_ACTIVE=True, HEAD_WISE=False, HAS_KEY_START=True, HAS_NK_PTR=True, HEAD_DIM=128)
    jobs = [
        (f"routed_linear rotary={rot} residual={res}", routed_linear._routed_linear_kernel,
         dict(routed, HAS_BIAS=True, HAS_RESIDUAL=res, ROTARY=rot, HEAD_DIM=128), four)
        for rot, res in ((True, False), (False, True), (False, False))
    ]  # fmt: skip
    jobs += [
        (f"linear_kv_cache rotate={rot}", routed_linear._linear_kv_cache_kernel,
         dict(kv, HAS_BIAS=True, ROTATE=rot, HEAD_DIM=128), dict(num_warps=4, num_stages=3))
        for rot in (True, False)
    ]  # fmt: skip
    jobs += [
        (f"norm_route_qkv bias={bias}", routed_linear._norm_route_qkv_kernel,
         dict(HAS_BIAS=bias, HEAD_DIM=128, BLOCK_M=16, BLOCK_ROW=4096, BLOCK_N_KV=16, BLOCK_K_KV=512,
              BLOCK_N_Q=32, BLOCK_K_Q=256, DOT_PRECISION="ieee"), dict(num_warps=4, num_stages=3))
        for bias in (True, False)
    ]  # fmt: skip
    jobs += [
        ("rms_norm + logits", rmsnorm._rms_norm_fwd_kernel,
         dict(BLOCK=4096, PROJECT=True, BLOCK_P=1), dict(num_warps=16)),
        ("decode split", decode._decode_split_kernel,
         dict(flags, BLOCK_M=16, BLOCK_N=64, DOT_PRECISION="ieee"), dict(num_warps=4, num_stages=2)),
        ("decode merge", decode._decode_merge_kernel, dict(flags, BLOCK_M=16, BLOCK_S=64), dict(num_warps=4)),
    ]  # fmt: skip
    return jobs


def compile_decode(kernel: triton.JITFunction, constexprs: dict, options: dict):
    """One decode kernel compiled for sm_90 (a compile error here is one the GPU would raise at the first
    decode step)."""
    return triton.compile(
        _decode_source(kernel, constexprs), target=GPUTarget("cuda", 90, 32), options=options
    )


def decode_kernels() -> None:
    print(f"triton {triton.__version__}, sm_90, decode kernels")
    for name, kernel, constexprs, options in decode_jobs():
        compiled = compile_decode(kernel, constexprs, options)
        resources = _resources(compiled.asm["cubin"])
        print(f"{name:>40}  {options}  smem={compiled.metadata.shared:>6} B  {resources}")


def main() -> None:
    if "--decode" in os.sys.argv:
        decode_kernels()
        return
    target = GPUTarget("cuda", 90, 32)
    pairs = dict(R=1, HEAD_DIM=128, DOT_PRECISION="tf32", PAIRS=True)
    fwd = dict(pairs, POSITIVE_SCALE=True, BLOCK_M=128, BLOCK_N=64)
    window = _flash.gpu_aha_local_fwd_config(128)
    eight = dict(num_warps=8, num_stages=3)
    jobs = [
        ("AHA fwd packed", _flash_fwd._fwd_kernel,
         dict(fwd, PACKED=True, SHORT_BLOCKS=0, TILES_PER_PROGRAM=1), eight),
        ("AHA fwd routed", _flash_fwd._fwd_kernel,
         dict(fwd, PACKED=False, SHORT_BLOCKS=0, TILES_PER_PROGRAM=8), eight),
        ("AHA fwd window", _flash_fwd._fwd_kernel,
         dict(fwd, BLOCK_M=window.block_m, BLOCK_N=window.block_n, PACKED=False, SHORT_BLOCKS=12,
              TILES_PER_PROGRAM=1), window.launch_options()),
        ("AHA dq", _flash_bwd._bwd_dq_kernel,
         dict(pairs, BLOCK_M=128, BLOCK_N=64, HAS_DLSE=False, PACKED=True), eight),
    ]  # fmt: skip
    jobs += [
        (f"dkdv {loop}", _flash_bwd._bwd_dkdv_kernel,
         dict(R=1, HEAD_DIM=128, DOT_PRECISION="tf32", BLOCK_M=64, BLOCK_N=128, LOOP=loop), eight)
        for loop in _flash.DKDV_LOOPS
    ]  # fmt: skip
    print(f"triton {triton.__version__}, sm_90")
    for name, kernel, constexprs, options in jobs:
        compiled = triton.compile(_source(kernel, constexprs), target=target, options=options)
        ops = collections.Counter(re.findall(r"\b(?:ttg|ttng)\.(\w+)|(scf\.if)", compiled.asm["ttgir"]))
        counts = {op: sum(v for k, v in ops.items() if op in k) for op in OPS}
        print(
            f"{name:>15}  {options}  smem={compiled.metadata.shared:>6} B  "
            f"{_resources(compiled.asm['cubin'])}  {counts}"
        )


if __name__ == "__main__":
    main()
