"""Time the backward kernels (dQ, dK/dV) apart under several launch configs; show how Triton built them.

For each N and task (routed s = 0.9, sliding window), the forward runs once; then the dQ kernel alone and
the dK/dV kernel alone are timed for every config in `--dq` / `--dkdv` (`BM,BN,warps,stages`) and every
dK/dV row loop in `--loops`. Last, the registers, spills and shared memory of every compiled variant (from
Triton's cache) are printed, so a config that spills can be told apart from one that is slow for another
reason. GPU only.

    python benchmarks/bench_backward.py --ns 32768,131072 --out runs/bench_backward
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import triton
from bench_attention import lowest_total_slowdown  # run as `python benchmarks/bench_backward.py`

from l2a.ops.triton import _flash, _flash_bwd, _flash_fwd, conditional, sliding_window

DQ_CONFIGS = "128,64,8,2;128,64,8,3;64,128,8,3;64,64,4,3;128,128,8,2"
DKDV_CONFIGS = "64,128,8,2;64,128,8,3;32,128,8,3;64,64,8,3;64,64,4,3"


def _inputs(n: int, task: str, window: int, device: torch.device):
    b, hq, hkv, d = 1, 28, 4, 128
    torch.manual_seed(n)
    q = torch.randn(b, n, hq, d, device=device, dtype=torch.bfloat16)
    k = torch.randn(b, n, hkv, d, device=device, dtype=torch.bfloat16)
    v = torch.randn(b, n, hkv, d, device=device, dtype=torch.bfloat16)
    dout = torch.randn_like(q)
    scale = d**-0.5
    if task == "cond0.9":
        active = torch.rand(b, n, device=device) >= 0.9
        rows = conditional._rows(q, k, active, 0, None, None)
    else:
        active = None
        rows = sliding_window._rows(q, k, window, None, None)
    out, lse = _flash_fwd.forward(q, k, v, rows, active, scale)
    return q, k, v, dout, out, lse, rows, active, scale


def _useful_bwd_flops(n: int, task: str, window: int, rows: _flash.Rows) -> float:
    """2.5× the forward's useful FLOPs (anchors.md convention)."""
    hq, d = 28, 128
    fwd = 2 * float(rows.count.sum()) * n * hq * d if task == "cond0.9" else 4.0 * n * window * hq * d
    return 2.5 * fwd


def _time(fn) -> float | None:
    try:
        return triton.testing.do_bench(fn, warmup=25, rep=100)
    except Exception as e:  # noqa: BLE001  (out of resources for this config)
        print(f"  failed: {type(e).__name__}: {e}", flush=True)
        return None


def time_task(n: int, task: str, args: argparse.Namespace, device: torch.device) -> list[dict]:
    """Timings of every dQ and dK/dV config for one N and task."""
    q, k, v, dout, out, lse, rows, active, scale = _inputs(n, task, args.window, device)
    flops = _useful_bwd_flops(n, task, args.window, rows)
    dq, _ = _flash._row_outputs(q, active)
    results = []
    for cfg in args.dq.split(";"):
        os.environ["L2A_BWD_DQ"] = cfg
        ms = _time(lambda: _flash_bwd.backward_dq(dout, None, q, k, v, out, lse, rows, scale, dq))
        results.append(dict(N=n, task=task, kernel="dq", cfg=cfg, ms=ms, bwd_flops=flops))
        print(json.dumps(results[-1]), flush=True)
    os.environ.pop("L2A_BWD_DQ")
    compact = _flash_bwd.backward_dq(dout, None, q, k, v, out, lse, rows, scale, dq)
    for loop in args.loops.split(","):
        os.environ["L2A_DKDV_LOOP"] = loop
        for phase in args.phases.split(","):
            os.environ["L2A_DKDV_PHASE"] = phase
            for cfg in args.dkdv.split(";"):
                os.environ["L2A_BWD_DKDV"] = cfg
                ms = _time(lambda: _flash_bwd.backward_dkdv(k, v, compact, rows, scale))
                kernel = f"dkdv {loop} phase{phase}"
                results.append(dict(N=n, task=task, kernel=kernel, cfg=cfg, ms=ms, bwd_flops=flops))
                print(json.dumps(results[-1]), flush=True)
    for name in ("L2A_BWD_DKDV", "L2A_DKDV_LOOP", "L2A_DKDV_PHASE"):
        os.environ.pop(name)
    return results


def fastest_settings(results: list[dict]) -> dict[str, str]:
    """Per kernel family, the setting with the lowest summed slowdown (ms / best ms) over all N and tasks."""
    best = {}
    for family in ("dq", "dkdv"):
        rows = [r for r in results if r["kernel"].startswith(family)]
        choice = lowest_total_slowdown(rows, lambda r: (r["kernel"], r["cfg"]))
        if choice is None:
            continue
        kernel, cfg = choice
        if family == "dq":
            best["L2A_BWD_DQ"] = cfg
        else:
            _, loop, phase = kernel.split()
            best.update(L2A_BWD_DKDV=cfg, L2A_DKDV_LOOP=loop, L2A_DKDV_PHASE=phase.removeprefix("phase"))
    return best


def compiled_variants() -> list[dict]:
    """Registers / spills / shared memory of every compiled variant in the Triton JIT caches."""
    found = []
    for name in ("_bwd_dq_kernel", "_bwd_dkdv_kernel", "_fwd_kernel"):
        fn = getattr(_flash, name)
        for entry in getattr(fn, "device_caches", {}).values():
            cache = entry[0] if isinstance(entry, tuple) else entry
            for kernel in getattr(cache, "values", lambda: [])():
                meta = getattr(kernel, "metadata", None)
                consts = getattr(getattr(kernel, "src", None), "constants", {}) or {}
                found.append(
                    dict(
                        kernel=name,
                        regs=getattr(kernel, "n_regs", None),
                        spills=getattr(kernel, "n_spills", None),
                        shared=getattr(meta, "shared", None),
                        warps=getattr(meta, "num_warps", None),
                        stages=getattr(meta, "num_stages", None),
                        consts={
                            str(k): v for k, v in consts.items() if "BLOCK" in str(k) or "LOOP" in str(k)
                        },
                    )
                )
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ns", default="32768,131072")
    parser.add_argument("--window", type=int, default=4096)
    parser.add_argument("--dq", default=DQ_CONFIGS, help="';'-separated BM,BN,warps,stages")
    parser.add_argument("--dkdv", default=DKDV_CONFIGS, help="';'-separated BM,BN,warps,stages")
    parser.add_argument("--loops", default="split", help=f"comma-separated subset of {_flash.DKDV_LOOPS}")
    parser.add_argument("--phases", default="1", help="comma-separated L2A_DKDV_PHASE values to time (0, 1)")
    parser.add_argument(
        "--exports", type=Path, help="write the fastest settings here as shell `export` lines"
    )
    parser.add_argument("--out", type=Path, default=Path("runs/bench_backward"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_backward.py needs a CUDA GPU")
    device = torch.device("cuda")
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for n in (int(x) for x in args.ns.split(",")):
        for task in ("cond0.9", f"window{args.window}"):
            results += time_task(n, task, args, device)
            torch.cuda.empty_cache()
    variants = compiled_variants()
    (args.out / "bench_backward.json").write_text(
        json.dumps({"timings": results, "compiled": variants}, indent=1)
    )
    print(f"\n{'N':>7} {'task':>11} {'kernel':>12} {'config':>22} {'ms':>8}")
    for r in results:
        ms = "—" if r["ms"] is None else f"{r['ms']:.2f}"
        print(f"{r['N']:>7} {r['task']:>11} {r['kernel']:>12} {r['cfg']:>22} {ms:>8}")
    best = fastest_settings(results)
    print("fastest:", best)
    if args.exports:
        args.exports.write_text("".join(f"export {k}={v}\n" for k, v in best.items()))
    print("\ncompiled variants (regs, spills, shared bytes):")
    for c in variants:
        print(f"  {c['kernel']:>16} w{c['warps']} s{c['stages']} {c['consts']} regs={c['regs']} "
              f"spills={c['spills']} smem={c['shared']}")  # fmt: skip


if __name__ == "__main__":
    main()
