"""GPU benchmark of all-or-here attention (AHA) against SDPA cuDNN dense causal attention.

Checks the Triton op against the float64 reference on small shapes first (bf16; D 64 and 128; GQA, documents,
key_start, decode-shaped N < Nk, all/none routed) and refuses to report if that fails. Then, at batch 1,
Hq=28, Hkv=4, D=128, bf16, window W and random head-wise routing with a fraction `--active` of (token, head)
pairs on full attention, times forward and forward+backward (median of `triton.testing.do_bench`) of
  * SDPA cuDNN dense causal, K/V expanded to 28 heads (its fastest form; anchors.md),
  * the one-pass AHA kernel (`all_or_here_attention`, backend="triton"),
  * the composed form: sliding-window attention for every pair + conditional attention with key_offset=W for
    the routed pairs, merged by log-sum-exp (`l2a.ops.aha.merge_by_lse`),
and writes a markdown table + json under --out. TF/s counts the useful FLOPs of each pair's keys
(4·keys·D forward; forward+backward 3.5x the forward).

    python benchmarks/bench_aha.py --ns 32768,131072 --out aha_out
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from bench_attention import _fmt, _fwd_bwd, _rel, bench
from torch.nn.attention import SDPBackend, sdpa_kernel

from l2a.ops import all_or_here_attention, conditional_attention, sliding_window_attention
from l2a.ops.aha import merge_by_lse
from l2a.ops.reference import all_or_here_attention_reference
from l2a.ops.triton.aha import aha_rows

CHECK_CASES = [
    dict(n=700, nk=700, hq=28, hkv=4, window=64, active=0.07),
    dict(n=513, nk=550, hq=8, hkv=2, window=256, active=0.3),
    dict(n=600, nk=600, hq=8, hkv=2, window=100, active=0.2, docs=(0, 170, 411, 600)),
    dict(n=400, nk=400, hq=4, hkv=1, window=50, active=1.0, key_start=37),
    dict(n=400, nk=400, hq=4, hkv=4, window=50, active=0.0),
    dict(n=5, nk=900, hq=28, hkv=4, window=256, active=0.5),
]


def composed_aha(q, k, v, active, window, **kw):
    """AHA from today's two ops plus an lse merge (the form the one-pass kernel replaces)."""
    near = sliding_window_attention(q, k, v, window, return_lse=True, backend="triton", **kw)
    far = conditional_attention(q, k, v, active, key_offset=window, return_lse=True, backend="triton", **kw)
    return merge_by_lse(*near, *far)[0]


def check_correctness(device: torch.device, head_dims=(64, 128)) -> list[str]:
    """The Triton op (bf16) against the float64 reference at small shapes; returns the failures."""
    failures = []
    g = torch.Generator(device="cpu").manual_seed(1)
    for d in head_dims:
        for c in CHECK_CASES:
            n, nk, hq, hkv = c["n"], c["nk"], c["hq"], c["hkv"]
            q = torch.randn(1, n, hq, d, generator=g).to(device, torch.bfloat16).requires_grad_()
            k = torch.randn(1, nk, hkv, d, generator=g).to(device, torch.bfloat16).requires_grad_()
            v = torch.randn(1, nk, hkv, d, generator=g).to(device, torch.bfloat16).requires_grad_()
            dout = torch.randn(1, n, hq, d, generator=g).to(device, torch.bfloat16)
            active = (torch.rand(1, n, hq, generator=g) < c["active"]).to(device)
            kw = {}
            if "docs" in c:
                kw["cu_seqlens"] = torch.tensor(c["docs"], dtype=torch.int32, device=device)
            if "key_start" in c:
                kw["key_start"] = torch.tensor([c["key_start"]], device=device)
            out, lse = all_or_here_attention(
                q, k, v, active, c["window"], return_lse=True, backend="triton", **kw
            )
            qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
            ref, ref_lse = all_or_here_attention_reference(
                qd, kd, vd, active, c["window"], 1 / math.sqrt(d), kw.get("cu_seqlens"), kw.get("key_start")
            )
            grads = torch.autograd.grad(out, (q, k, v), dout)
            ref_grads = torch.autograd.grad(ref, (qd, kd, vd), dout.double())
            name = f"D{d}-" + "-".join(f"{key}{val}" for key, val in c.items())
            if not torch.equal(torch.isinf(lse), torch.isinf(ref_lse)):
                failures.append(f"{name}: lse -inf pattern differs")
            fin = torch.isfinite(ref_lse)
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


def useful_fwd_flops(active: torch.Tensor, window: int, d: int) -> float:
    """4·keys·D summed over (token, head) pairs: t + 1 keys where routed, min(W, t + 1) otherwise."""
    n = active.shape[1]
    keys_full = torch.arange(1, n + 1, device=active.device, dtype=torch.float64)
    keys_local = keys_full.clamp_max(window)
    keys = torch.where(active, keys_full[None, :, None], keys_local[None, :, None])
    return 4.0 * d * keys.sum().item()


def _inputs(n: int, active_frac: float, device: torch.device) -> tuple[torch.Tensor, ...]:
    """q (1, n, 28, 128), k, v (1, n, 4, 128) bf16, dout, and a head-wise routing mask (1, n, 28)."""
    torch.manual_seed(n)
    q = torch.randn(1, n, 28, 128, device=device, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, n, 4, 128, device=device, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(1, n, 4, 128, device=device, dtype=torch.bfloat16, requires_grad=True)
    dout = torch.randn_like(q)
    gen = torch.Generator(device=device).manual_seed(n)
    active = torch.rand(1, n, 28, device=device, generator=gen) < active_frac
    return q, k, v, dout, active


def run_benchmarks(args: argparse.Namespace, device: torch.device, log) -> list[dict]:
    """The table: cuDNN, one-pass, composed and the row-list cost at every N; then the launch variants."""
    hq, hkv, d, window = 28, 4, 128, args.window
    rows = []

    def record(method: str, n: int, fwd: float | None, fb: float | None, flops: float, **extra) -> None:
        row = dict(method=method, N=n, fwd_ms=fwd, fwd_bwd_ms=fb, **extra)
        row["fwd_tflops"] = flops / (fwd * 1e-3) / 1e12 if fwd else None
        row["fwd_bwd_tflops"] = 3.5 * flops / (fb * 1e-3) / 1e12 if fb else None
        rows.append(row)
        log(json.dumps(row))

    for n in args.ns:
        q, k, v, dout, active = _inputs(n, args.active, device)
        frac = round(active.float().mean().item(), 4)
        qt = q.detach().transpose(1, 2).contiguous().requires_grad_()
        kt = k.detach().repeat_interleave(hq // hkv, 2).transpose(1, 2).contiguous().requires_grad_()
        vt = v.detach().repeat_interleave(hq // hkv, 2).transpose(1, 2).contiguous().requires_grad_()
        dt = dout.transpose(1, 2).contiguous()
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            fn = partial(F.scaled_dot_product_attention, qt, kt, vt, is_causal=True)
            fwd = bench(fn)
            fb = bench(_fwd_bwd(fn, (qt, kt, vt), dt))
        record("SDPA cudnn dense causal", n, fwd, fb, 2.0 * n * (n + 1) * hq * d, active=1.0)
        del qt, kt, vt, dt
        torch.cuda.empty_cache()
        flops = useful_fwd_flops(active, window, d)
        methods = {
            "l2a AHA one-pass": partial(all_or_here_attention, q, k, v, active, window, backend="triton"),
        }
        if not args.no_composed:
            methods["l2a AHA composed (window + far + lse merge)"] = partial(
                composed_aha, q, k, v, active, window
            )
        for method, fn in methods.items():
            fwd = bench(fn)
            fb = bench(_fwd_bwd(fn, (q, k, v), dout))
            record(method, n, fwd, fb, flops, active=frac)
        # fixed cost inside both passes: building the two pair lists per K/V group
        record(
            "AHA pair lists alone (built in fwd and in bwd)",
            n,
            bench(partial(aha_rows, q, k, active, window, None, None)),
            None,
            0.0,
        )
        del q, k, v, dout, active
        torch.cuda.empty_cache()
    for n in args.ns if args.variants else ():
        q, k, v, dout, active = _inputs(n, args.active, device)
        flops = useful_fwd_flops(active, window, d)
        fn = partial(all_or_here_attention, q, k, v, active, window, backend="triton")
        for variant in args.variants:
            settings = dict(item.split("=", 1) for item in variant.split())
            os.environ.update(settings)
            try:
                record(
                    f"l2a AHA one-pass, {variant}", n, bench(fn), bench(_fwd_bwd(fn, (q, k, v), dout)), flops
                )
            except Exception as e:  # noqa: BLE001  (out of resources for this config)
                record(f"l2a AHA one-pass, {variant}", n, None, None, flops, note=type(e).__name__)
            for name in settings:
                os.environ.pop(name)
        del q, k, v, dout, active
        torch.cuda.empty_cache()
    return rows


def markdown(rows: list[dict]) -> str:
    """Table with speed-ups against SDPA cuDNN dense causal at the same N."""
    cudnn = {r["N"]: r for r in rows if r["method"].startswith("SDPA cudnn")}
    lines = [
        "| method | N | active | fwd ms | fwd+bwd ms | fwd TF/s | fwd+bwd TF/s | fwd × cuDNN "
        "| fwd+bwd × cuDNN |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ref = cudnn.get(r["N"])
        sf = ref["fwd_ms"] / r["fwd_ms"] if ref and r["fwd_ms"] else None
        sb = ref["fwd_bwd_ms"] / r["fwd_bwd_ms"] if ref and r["fwd_bwd_ms"] else None
        method = r["method"] + (f" ({r['note']})" if r.get("note") else "")
        lines.append(
            f"| {method} | {r['N'] // 1024}K | {r.get('active', '')} | {_fmt(r['fwd_ms'])} "
            f"| {_fmt(r['fwd_bwd_ms'])} | {_fmt(r['fwd_tflops'], 0)} | {_fmt(r['fwd_bwd_tflops'], 0)} "
            f"| {_fmt(sf, 2)} | {_fmt(sb, 2)} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("aha_out"))
    parser.add_argument("--ns", type=lambda s: [int(x) for x in s.split(",")], default=[32768, 131072])
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--active", type=float, default=0.07, help="fraction of (token, head) pairs routed")
    parser.add_argument(
        "--variants",
        type=lambda s: [c.strip() for c in s.split("|") if c.strip()],
        default=[],
        help="launch settings to time the one-pass kernel under, after the table: "
        "'L2A_FWD=128,128,8,2|L2A_BWD_DQ=64,64,4,2 L2A_BWD_DKDV=64,64,4,2'",
    )
    parser.add_argument("--no-composed", action="store_true", help="skip the composed two-op form")
    parser.add_argument(
        "--check-head-dims", type=lambda s: tuple(int(x) for x in s.split(",")), default=(64, 128)
    )
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_aha.py needs a CUDA GPU")
    device = torch.device("cuda")
    args.out.mkdir(parents=True, exist_ok=True)
    log_file = (args.out / "bench_aha.log").open("w")

    def log(line: str) -> None:
        print(line, flush=True)
        log_file.write(line + "\n")
        log_file.flush()

    failures = check_correctness(device, args.check_head_dims)
    if failures:
        log("correctness check FAILED; refusing to report:\n  " + "\n  ".join(failures))
        sys.exit(1)
    log("correctness check passed")
    rows = run_benchmarks(args, device, log)
    meta = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cudnn": torch.backends.cudnn.version(),
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python " + " ".join(sys.argv),
        "shape": f"batch 1, Hq=28, Hkv=4, D=128, bf16, W={args.window}, head-wise random routing "
        f"({args.active:.0%} of pairs)",
        "config_env": {k: v for k, v in os.environ.items() if k.startswith("L2A_")},
    }
    table = markdown(rows)
    header = (
        f"{meta['device']}; torch {meta['torch']}, triton {meta['triton']}, cuDNN {meta['cudnn']}; "
        f"{meta['date']}\n"
        f"{meta['shape']}; median of triton.testing.do_bench\n`{meta['command']}`\n"
    )
    (args.out / "bench_aha.md").write_text(header + "\n" + table + "\n")
    (args.out / "bench_aha.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    log(header)
    log(table)


if __name__ == "__main__":
    main()
