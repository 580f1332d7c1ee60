"""GPU benchmark of l2a's Triton attention kernels against SDPA (cuDNN, flash) and FlexAttention.

Checks the kernels against the float64 reference on small shapes first and refuses to report if that
fails. Then times forward and forward+backward (median of `triton.testing.do_bench`) at
batch 1, Hq=28, Hkv=4, D=128, bf16, and prints / writes (markdown + json under --out) a table.

TF/s counts useful FLOPs as /work/shared/docs/anchors.md: causal forward 2·N_active·N·Hq·D (each query
sees N/2 keys on average), sliding window 4·N·W·Hq·D; forward+backward 3.5x the forward.

    python benchmarks/bench_attention.py --out bench_out
    python benchmarks/bench_attention.py --ns 32768 --sparsities 0.9 --methods cudnn,ours
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import math
import os
import platform
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from l2a.ops import conditional_attention, sliding_window_attention
from l2a.ops.reference import conditional_attention_reference, sliding_window_attention_reference

METHODS = ("cudnn", "flash", "flex", "ours")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖, with a floor on ‖b‖ for exactly-zero references (window 1 has dq = dk = 0)."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-2 * b.numel() ** 0.5)).item()


def check_correctness(device: torch.device) -> list[str]:
    """Small-shape comparisons of the kernels (bf16) with the float64 reference; returns failures."""
    failures = []
    g = torch.Generator(device="cpu").manual_seed(1)
    cases = [
        dict(n=700, hq=28, hkv=4, s=0.9, headwise=False, window=None, key_offset=0),
        dict(n=513, hq=8, hkv=2, s=0.5, headwise=True, window=None, key_offset=0),
        dict(n=1000, hq=7, hkv=1, s=0.8, headwise=False, window=None, key_offset=64),
        dict(n=1100, hq=28, hkv=4, s=0.0, headwise=False, window=256, key_offset=0),
        dict(n=300, hq=4, hkv=4, s=0.0, headwise=False, window=1, key_offset=0),
    ]
    for d in (64, 128):
        for c in cases:
            n, hq, hkv = c["n"], c["hq"], c["hkv"]
            q = torch.randn(1, n, hq, d, generator=g).to(device, torch.bfloat16).requires_grad_()
            k = torch.randn(1, n + 37, hkv, d, generator=g).to(device, torch.bfloat16).requires_grad_()
            v = torch.randn(1, n + 37, hkv, d, generator=g).to(device, torch.bfloat16).requires_grad_()
            dout = torch.randn(1, n, hq, d, generator=g).to(device, torch.bfloat16)
            shape = (1, n, hq) if c["headwise"] else (1, n)
            active = (torch.rand(shape, generator=g) >= c["s"]).to(device)
            scale = 1 / math.sqrt(d)
            if c["window"] is None:
                out, lse = conditional_attention(
                    q, k, v, active, key_offset=c["key_offset"], return_lse=True, backend="triton"
                )
                qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
                ref, ref_lse = conditional_attention_reference(qd, kd, vd, active, scale, c["key_offset"])
            else:
                out, lse = sliding_window_attention(q, k, v, c["window"], return_lse=True, backend="triton")
                qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
                ref, ref_lse = sliding_window_attention_reference(qd, kd, vd, c["window"], scale)
            grads = torch.autograd.grad(out, (q, k, v), dout)
            ref_grads = torch.autograd.grad(ref, (qd, kd, vd), dout.double())
            name = f"D{d}-" + "-".join(f"{key}{val}" for key, val in c.items())
            fin = torch.isfinite(ref_lse)
            if not torch.equal(torch.isinf(lse), torch.isinf(ref_lse)):
                failures.append(f"{name}: lse -inf pattern differs")
            errors = {
                "out": _rel(out, ref),
                "lse": (lse[fin].double() - ref_lse[fin]).abs().max().item() if fin.any() else 0.0,
                "dq": _rel(grads[0], ref_grads[0]),
                "dk": _rel(grads[1], ref_grads[1]),
                "dv": _rel(grads[2], ref_grads[2]),
            }
            for key, err in errors.items():
                if not err <= 2e-2:  # bf16 operands: 1e-3..1e-2 expected; NaN fails
                    failures.append(f"{name}: {key} error {err:.3g}")
            print(f"check {name}: " + " ".join(f"{k}={e:.2e}" for k, e in errors.items()), flush=True)
    return failures


def bench(fn: Callable[[], object]) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def _fwd_bwd(
    fn: Callable[[], torch.Tensor], inputs: tuple[torch.Tensor, ...], dout: torch.Tensor
) -> Callable:
    def run() -> None:
        out = fn()
        torch.autograd.grad(out, inputs, dout)

    return run


def _sliding_mask(window: int) -> Callable:
    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < window)

    return mask_mod


def _gathered_causal_mask(pos: torch.Tensor) -> Callable:
    """Gathered query q_idx sits at position pos[q_idx]."""

    def mask_mod(b, h, q_idx, kv_idx):
        return kv_idx <= pos[q_idx]

    return mask_mod


def run_benchmarks(args: argparse.Namespace, device: torch.device) -> list[dict]:
    b, hq, hkv, d, window = 1, 28, 4, 128, args.window
    dtype = torch.bfloat16
    rows = []
    methods = set(args.methods.split(","))

    def record(
        method: str, n: int, s: float | str, fwd: float | None, fb: float | None, flops: float, **extra
    ):
        row = dict(method=method, N=n, s=s, fwd_ms=fwd, fwd_bwd_ms=fb, **extra)
        row["fwd_tflops"] = flops / (fwd * 1e-3) / 1e12 if fwd else None
        row["fwd_bwd_tflops"] = 3.5 * flops / (fb * 1e-3) / 1e12 if fb else None
        rows.append(row)
        print(json.dumps(row), flush=True)

    for n in args.ns:
        torch.manual_seed(n)
        q = torch.randn(b, n, hq, d, device=device, dtype=dtype, requires_grad=True)
        k = torch.randn(b, n, hkv, d, device=device, dtype=dtype, requires_grad=True)
        v = torch.randn(b, n, hkv, d, device=device, dtype=dtype, requires_grad=True)
        dout = torch.randn_like(q)
        dense_flops = 2.0 * n * n * hq * d
        if methods & {"cudnn", "flash"}:
            # SDPA layout (B, H, N, D), K/V expanded to Hq as in anchors.md
            qt = q.detach().transpose(1, 2).contiguous().requires_grad_()
            kt = k.detach().repeat_interleave(hq // hkv, 2).transpose(1, 2).contiguous().requires_grad_()
            vt = v.detach().repeat_interleave(hq // hkv, 2).transpose(1, 2).contiguous().requires_grad_()
            dt = dout.transpose(1, 2).contiguous()
            for method, backend in (
                ("cudnn", SDPBackend.CUDNN_ATTENTION),
                ("flash", SDPBackend.FLASH_ATTENTION),
            ):
                if method not in methods:
                    continue
                with sdpa_kernel(backend):
                    fn = partial(F.scaled_dot_product_attention, qt, kt, vt, is_causal=True)
                    fwd = bench(fn)
                    fb = None if args.fwd_only else bench(_fwd_bwd(fn, (qt, kt, vt), dt))
                record(f"SDPA {method} dense causal", n, 0, fwd, fb, dense_flops)
            del qt, kt, vt, dt
            torch.cuda.empty_cache()

        window_flops = 4.0 * n * min(window, n) * hq * d
        if "flex" in methods:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention

            flex = torch.compile(flex_attention)
            qt, kt, vt = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v))
            dt = dout.transpose(1, 2).contiguous()
            try:
                mask = create_block_mask(
                    _sliding_mask(window), None, None, n, n, device=device, _compile=True
                )
                fn = partial(flex, qt, kt, vt, block_mask=mask, enable_gqa=True)
                fwd = bench(fn)
                fb = None if args.fwd_only else bench(_fwd_bwd(fn, (qt, kt, vt), dt))
                record(f"FlexAttention sliding window {window}", n, 0, fwd, fb, window_flops)
            except Exception as e:  # noqa: BLE001  (OOM building the block mask, compile failure)
                note = type(e).__name__
                record(f"FlexAttention sliding window {window}", n, 0, None, None, window_flops, note=note)
            torch.cuda.empty_cache()
        if "ours" in methods:
            fn = partial(sliding_window_attention, q, k, v, window, backend="triton")
            fwd = bench(fn)
            fb = None if args.fwd_only else bench(_fwd_bwd(fn, (q, k, v), dout))
            record(f"l2a sliding window {window}", n, 0, fwd, fb, window_flops)

        for s in args.sparsities:
            gen = torch.Generator(device=device).manual_seed(int(s * 1000) + n)
            active = torch.rand(b, n, device=device, generator=gen) >= s
            n_active = int(active.sum())
            flops = 2.0 * n_active * n * hq * d
            if "ours" in methods:
                fn = partial(conditional_attention, q, k, v, active, backend="triton")
                fwd = bench(fn)
                fb = None if args.fwd_only else bench(_fwd_bwd(fn, (q, k, v), dout))
                record("l2a conditional (token-wise)", n, s, fwd, fb, flops)
                if args.headwise:
                    active_h = torch.rand(b, n, hq, device=device, generator=gen) >= s
                    fn = partial(conditional_attention, q, k, v, active_h, backend="triton")
                    fwd = bench(fn)
                    fb = None if args.fwd_only else bench(_fwd_bwd(fn, (q, k, v), dout))
                    record(
                        "l2a conditional (head-wise)",
                        n,
                        s,
                        fwd,
                        fb,
                        2.0 * int(active_h.sum()) / hq * n * hq * d,
                    )
            if "flex" in methods and n > args.flex_gathered_max:
                record("FlexAttention on gathered active queries", n, s, None, None, flops, note="not run")
            elif "flex" in methods:
                pos = active[0].nonzero().squeeze(1).to(torch.int32)
                qg = q.detach()[:, pos.long()].transpose(1, 2).contiguous().requires_grad_()
                kt, vt = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (k, v))
                dg = dout[:, pos.long()].transpose(1, 2).contiguous()
                try:
                    # no _compile here: each sparsity's query count is a new shape, and compiling the mask
                    # builder again per shape took minutes (14:45 UTC run); the mask is n_active x n <= 32K^2
                    mask = create_block_mask(
                        _gathered_causal_mask(pos), None, None, n_active, n, device=device
                    )
                    fn = partial(flex, qg, kt, vt, block_mask=mask, enable_gqa=True)
                    fwd = bench(fn)
                    fb = None if args.fwd_only else bench(_fwd_bwd(fn, (qg, kt, vt), dg))
                    record("FlexAttention on gathered active queries", n, s, fwd, fb, flops)
                except Exception as e:  # noqa: BLE001
                    note = type(e).__name__
                    record("FlexAttention on gathered active queries", n, s, None, None, flops, note=note)
                del qg, kt, vt, dg
                torch.cuda.empty_cache()
        del q, k, v, dout
        torch.cuda.empty_cache()
    return rows


FWD_SWEEP = ["128,64,8,2", "128,64,8,3", "128,128,8,2", "64,64,4,3"]
DQ_SWEEP = ["64,64,4,2", "128,64,8,2", "128,32,8,3"]
DKDV_SWEEP = ["64,128,8,2", "32,128,4,2", "32,128,4,3", "64,64,4,2"]


def sweep(args: argparse.Namespace, device: torch.device) -> list[dict]:
    """Time our kernels under several launch configs (env overrides read by `_flash`)."""
    b, hq, hkv, d = 1, 28, 4, 128
    results = []
    for n in args.ns:
        torch.manual_seed(n)
        q = torch.randn(b, n, hq, d, device=device, dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(b, n, hkv, d, device=device, dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(b, n, hkv, d, device=device, dtype=torch.bfloat16, requires_grad=True)
        dout = torch.randn_like(q)
        active = torch.rand(b, n, device=device) >= 0.9
        tasks = {
            "cond0.9": partial(conditional_attention, q, k, v, active, backend="triton"),
            f"window{args.window}": partial(sliding_window_attention, q, k, v, args.window, backend="triton"),
        }
        for task, fn in tasks.items():
            for cfg in FWD_SWEEP:
                os.environ["L2A_FWD"] = cfg
                try:
                    ms = bench(fn)
                except Exception as e:  # noqa: BLE001  (out of resources for this config)
                    ms, cfg = None, f"{cfg} ({type(e).__name__})"
                results.append(dict(N=n, task=task, kernel="fwd", cfg=cfg, ms=ms))
                print(json.dumps(results[-1]), flush=True)
            os.environ.pop("L2A_FWD")
            for dq_cfg in DQ_SWEEP:
                for dkdv_cfg in DKDV_SWEEP:
                    os.environ["L2A_BWD_DQ"], os.environ["L2A_BWD_DKDV"] = dq_cfg, dkdv_cfg
                    cfg = f"dq {dq_cfg} / dkdv {dkdv_cfg}"
                    try:
                        ms = bench(_fwd_bwd(fn, (q, k, v), dout))
                    except Exception as e:  # noqa: BLE001
                        ms, cfg = None, f"{cfg} ({type(e).__name__})"
                    results.append(dict(N=n, task=task, kernel="fwd+bwd", cfg=cfg, ms=ms))
                    print(json.dumps(results[-1]), flush=True)
            for loop, dkdv_cfg in itertools.product(("masked", "split"), DKDV_SWEEP):
                os.environ["L2A_DKDV_LOOP"] = loop
                os.environ["L2A_BWD_DQ"], os.environ["L2A_BWD_DKDV"] = DQ_SWEEP[0], dkdv_cfg
                cfg = f"dq {DQ_SWEEP[0]} / dkdv {dkdv_cfg} / loop {loop}"
                try:
                    ms = bench(_fwd_bwd(fn, (q, k, v), dout))
                except Exception as e:  # noqa: BLE001
                    ms, cfg = None, f"{cfg} ({type(e).__name__})"
                results.append(dict(N=n, task=task, kernel="fwd+bwd", cfg=cfg, ms=ms))
                print(json.dumps(results[-1]), flush=True)
            for name in ("L2A_BWD_DQ", "L2A_BWD_DKDV", "L2A_DKDV_LOOP"):
                os.environ.pop(name)
    return results


def lowest_total_slowdown(rows: list[dict], setting: Callable[[dict], object]) -> object | None:
    """Among the settings (``setting(row)``) timed on every (N, task) of `rows`, the one with the lowest
    summed slowdown (ms / fastest ms of that N and task); None if no setting is complete."""
    rows = [r for r in rows if r["ms"] is not None]
    fastest: dict[tuple, float] = {}
    for r in rows:
        fastest[(r["N"], r["task"])] = min(fastest.get((r["N"], r["task"]), math.inf), r["ms"])
    score: dict[object, float] = {}
    covered: dict[object, set] = {}
    for r in rows:
        key = setting(r)
        score[key] = score.get(key, 0.0) + r["ms"] / fastest[(r["N"], r["task"])]
        covered.setdefault(key, set()).add((r["N"], r["task"]))
    complete = [key for key in score if len(covered[key]) == len(fastest)]
    return min(complete, key=score.__getitem__) if complete else None


def best_configs(results: list[dict]) -> dict[str, str]:
    """Per kernel, the config with the lowest summed slowdown (ms / best ms) over all tasks and sizes."""
    best = {}
    for kernel in ("fwd", "fwd+bwd"):
        choice = lowest_total_slowdown([r for r in results if r["kernel"] == kernel], lambda r: r["cfg"])
        if choice is None:
            continue
        if kernel == "fwd":
            best["L2A_FWD"] = choice
        else:
            parts = choice.split(" / ")
            best["L2A_BWD_DQ"] = parts[0].removeprefix("dq ")
            best["L2A_BWD_DKDV"] = parts[1].removeprefix("dkdv ")
            if len(parts) == 3:
                best["L2A_DKDV_LOOP"] = parts[2].removeprefix("loop ")
    return best


def _fmt(x: float | None, digits: int = 2) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def markdown(rows: list[dict]) -> str:
    """Table with speed-ups against SDPA cuDNN dense causal at the same N."""
    cudnn = {r["N"]: r for r in rows if r["method"].startswith("SDPA cudnn")}
    lines = [
        "| method | N | s | fwd ms | fwd+bwd ms | fwd TF/s | fwd+bwd TF/s | fwd × cuDNN | fwd+bwd × cuDNN |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ref = cudnn.get(r["N"])
        sf = ref["fwd_ms"] / r["fwd_ms"] if ref and r["fwd_ms"] else None
        sb = ref["fwd_bwd_ms"] / r["fwd_bwd_ms"] if ref and ref["fwd_bwd_ms"] and r["fwd_bwd_ms"] else None
        n = f"{r['N'] // 1024}K"
        method = r["method"] + (f" ({r['note']})" if r.get("note") else "")
        lines.append(
            f"| {method} | {n} | {r['s']} | {_fmt(r['fwd_ms'])} "
            f"| {_fmt(r['fwd_bwd_ms'])} | {_fmt(r['fwd_tflops'], 0)} | {_fmt(r['fwd_bwd_tflops'], 0)} "
            f"| {_fmt(sf, 1)} | {_fmt(sb, 1)} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("bench_out"))
    parser.add_argument("--ns", type=lambda s: [int(x) for x in s.split(",")], default=[16384, 32768, 131072])
    parser.add_argument(
        "--sparsities", type=lambda s: [float(x) for x in s.split(",")], default=[0.5, 0.8, 0.9]
    )
    parser.add_argument("--window", type=int, default=4096)
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {METHODS}")
    parser.add_argument(
        "--flex-gathered-max", type=int, default=32768, help="largest N for FlexAttention on gathered queries"
    )
    parser.add_argument("--headwise", action="store_true", help="also time head-wise routing masks")
    parser.add_argument("--fwd-only", action="store_true")
    parser.add_argument("--sweep", action="store_true", help="time our kernels under several launch configs")
    parser.add_argument(
        "--skip-check", action="store_true", help="skip the correctness check (tuning runs only)"
    )
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_attention.py needs a CUDA GPU")
    device = torch.device("cuda")
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.skip_check:
        failures = check_correctness(device)
        if failures:
            print("correctness check FAILED; refusing to report:\n  " + "\n  ".join(failures))
            sys.exit(1)
        print("correctness check passed", flush=True)
    if args.sweep:
        results = sweep(args, device)
        (args.out / "sweep.json").write_text(json.dumps(results, indent=1))
        for r in results:
            print(f"{r['N']:>7} {r['task']:>12} {r['kernel']:>8} {_fmt(r['ms'])} ms  {r['cfg']}")
        best = best_configs(results)
        (args.out / "best.env").write_text("".join(f"{k}={v}\n" for k, v in best.items()))
        print("best:", best)
        return
    rows = run_benchmarks(args, device)
    meta = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python " + " ".join(sys.argv),
        "shape": "batch 1, Hq=28, Hkv=4, D=128, bf16, token-wise random routing",
        "config_env": {k: v for k, v in os.environ.items() if k.startswith("L2A_")},
        "checked": not args.skip_check,
    }
    table = markdown(rows)
    header = (
        f"{meta['device']}; torch {meta['torch']}, triton {meta['triton']}; {meta['date']}\n"
        f"{meta['shape']}; median of triton.testing.do_bench\n`{meta['command']}`\n"
    )
    (args.out / "bench_attention.md").write_text(header + "\n" + table + "\n")
    (args.out / "bench_attention.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(header)
    print(table)


if __name__ == "__main__":
    main()
