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
(4·keys·D forward; forward+backward 3.5x the forward). `--repeats R` times every row R times, the rows taking
turns, and reports medians (with the range of the per-repeat ratios to cuDNN); `--variants` times the op
again under L2A_* launch settings, each first checked against the float64 reference, taking turns with the
default and cuDNN. Last, the registers / spills / shared memory of every compiled attention kernel.

    python benchmarks/bench_aha.py --ns 32768,131072 --out aha_out
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
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


def timed_round_robin(fns: dict[str, object], repeats: int, settings: dict[str, dict] | None = None) -> dict:
    """name -> `repeats` medians of `bench`, the functions taking turns (so that drift hits all alike);
    `settings[name]`: L2A_* environment variables set while that function is timed."""
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            env = (settings or {}).get(name, {})
            os.environ.update(env)
            try:
                times[name].append(bench(fn))
            except Exception as e:  # noqa: BLE001  (out of resources for this config)
                times[name].append(None)
                print(f"{name}: {type(e).__name__}: {e}", flush=True)
            finally:
                for key in env:
                    os.environ.pop(key)
    return times


def _median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _cudnn(qt, kt, vt, dt, backward: bool):
    """SDPA cuDNN dense causal on (B, H, N, D) inputs, forward or forward+backward."""
    fn = partial(F.scaled_dot_product_attention, qt, kt, vt, is_causal=True)
    fn = _fwd_bwd(fn, (qt, kt, vt), dt) if backward else fn

    def run():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            fn()

    return run


def run_benchmarks(args: argparse.Namespace, device: torch.device, log) -> list[dict]:
    """The table: cuDNN, one-pass, composed and the row-list cost at every N; then the launch variants,
    each timed `--repeats` times, taking turns with the default and cuDNN."""
    hq, hkv, d, window = 28, 4, 128, args.window
    rows = []

    def record(method: str, n: int, fwd: list, fb: list | None, flops: float, **extra) -> None:
        row = dict(method=method, N=n, fwd_ms=_median(fwd), fwd_bwd_ms=_median(fb or []), **extra)
        row["fwd_ms_runs"], row["fwd_bwd_ms_runs"] = fwd, fb
        row["fwd_tflops"] = flops / (row["fwd_ms"] * 1e-3) / 1e12 if row["fwd_ms"] else None
        row["fwd_bwd_tflops"] = 3.5 * flops / (row["fwd_bwd_ms"] * 1e-3) / 1e12 if row["fwd_bwd_ms"] else None
        rows.append(row)
        log(json.dumps(row))

    for n in args.ns:
        q, k, v, dout, active = _inputs(n, args.active, device)
        frac = round(active.float().mean().item(), 4)
        qt = q.detach().transpose(1, 2).contiguous().requires_grad_()
        kt = k.detach().repeat_interleave(hq // hkv, 2).transpose(1, 2).contiguous().requires_grad_()
        vt = v.detach().repeat_interleave(hq // hkv, 2).transpose(1, 2).contiguous().requires_grad_()
        dt = dout.transpose(1, 2).contiguous()
        flops = useful_fwd_flops(active, window, d)

        methods = {
            "l2a AHA one-pass": partial(all_or_here_attention, q, k, v, active, window, backend="triton"),
        }
        if not args.no_composed:
            methods["l2a AHA composed (window + far + lse merge)"] = partial(
                composed_aha, q, k, v, active, window
            )
        fns = {"cudnn fwd": _cudnn(qt, kt, vt, dt, False), "cudnn fwd+bwd": _cudnn(qt, kt, vt, dt, True)}
        for method, fn in methods.items():
            fns[method + " fwd"] = fn
            fns[method + " fwd+bwd"] = _fwd_bwd(fn, (q, k, v), dout)
        # fixed cost inside both passes: building the two pair lists per K/V group
        fns["lists"] = partial(aha_rows, q, k, active, window, None, None)
        times = timed_round_robin(fns, args.repeats)
        record(
            "SDPA cudnn dense causal", n, times["cudnn fwd"], times["cudnn fwd+bwd"],
            2.0 * n * (n + 1) * hq * d, active=1.0,
        )  # fmt: skip
        for method in methods:
            record(method, n, times[method + " fwd"], times[method + " fwd+bwd"], flops, active=frac)
        record("AHA pair lists alone (built in fwd and in bwd)", n, times["lists"], None, 0.0)
        if args.variants:
            fn = methods["l2a AHA one-pass"]
            fns, settings = {"cudnn fwd": _cudnn(qt, kt, vt, dt, False), "default fwd": fn}, {}
            if not args.variants_fwd_only:
                fns["default fwd+bwd"] = _fwd_bwd(fn, (q, k, v), dout)
            for variant in args.variants:
                settings[variant + " fwd"] = settings[variant + " fwd+bwd"] = dict(
                    item.split("=", 1) for item in variant.split()
                )
                fns[variant + " fwd"] = fn
                if not args.variants_fwd_only:
                    fns[variant + " fwd+bwd"] = _fwd_bwd(fn, (q, k, v), dout)
            times = timed_round_robin(fns, args.repeats, settings)
            record("SDPA cudnn dense causal (variant block)", n, times["cudnn fwd"], None, 0.0, active=1.0)
            for variant in ["default", *args.variants]:
                name = "l2a AHA one-pass" + ("" if variant == "default" else f", {variant}")
                record(
                    name + " (variant block)",
                    n,
                    times[variant + " fwd"],
                    times.get(variant + " fwd+bwd"),
                    flops,
                )
        del q, k, v, dout, active, qt, kt, vt, dt
        torch.cuda.empty_cache()
    return rows


def kernel_resources() -> list[str]:
    """Registers, spills and shared memory of every compiled attention kernel (Triton's JIT caches)."""
    from l2a.ops.triton import _flash_bwd, _flash_fwd

    lines = []
    kernels = [_flash_fwd._fwd_kernel, _flash_bwd._bwd_dq_kernel, _flash_bwd._bwd_dkdv_kernel]
    shown = ("BLOCK_M", "BLOCK_N", "PACKED", "SHORT_BLOCKS", "TILES_PER_PROGRAM", "HEAD_DIM", "LOOP")
    for kernel in kernels:
        for cache in getattr(kernel, "device_caches", {}).values():
            for compiled in cache[0].values():
                constants = {}
                for key, value in getattr(compiled.src, "constants", {}).items():
                    name = kernel.arg_names[key[0]] if isinstance(key, tuple) else key
                    if name in shown:
                        constants[name] = value
                meta = compiled.metadata
                lines.append(
                    f"{kernel.fn.__name__} {constants} warps={meta.num_warps} stages={meta.num_stages} "
                    f"maxnreg={getattr(meta, 'maxnreg', None)} regs={compiled.n_regs} "
                    f"spills={compiled.n_spills} shared={meta.shared}"
                )
    return lines


def markdown(rows: list[dict]) -> str:
    """Table with speed-ups against SDPA cuDNN dense causal at the same N (medians of the repeats; the
    range of the per-repeat ratios in brackets where there were several)."""
    cudnn = {}
    for r in rows:
        if r["method"].startswith("SDPA cudnn dense causal") and "variant" not in r["method"]:
            cudnn[r["N"]] = r
    lines = [
        "| method | N | active | fwd ms | fwd+bwd ms | fwd TF/s | fwd+bwd TF/s | fwd × cuDNN "
        "| fwd+bwd × cuDNN |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def ratio(ref: dict | None, r: dict, key: str) -> str:
        if not ref or not r[key] or not ref[key]:
            return _fmt(None)
        text = _fmt(ref[key] / r[key], 2)
        runs, ref_runs = r.get(key + "_runs") or [], ref.get(key + "_runs") or []
        if len(runs) > 1 and len(runs) == len(ref_runs) and None not in runs + ref_runs:
            per_run = [a / b for a, b in zip(ref_runs, runs)]
            text += f" [{min(per_run):.2f}–{max(per_run):.2f}]"
        return text

    for r in rows:
        ref = cudnn.get(r["N"])
        if "variant block" in r["method"]:
            ref = next(
                (
                    x
                    for x in rows
                    if x["N"] == r["N"] and x["method"].startswith("SDPA cudnn dense causal (variant")
                ),
                ref,
            )
            ref = dict(ref, fwd_bwd_ms=cudnn[r["N"]]["fwd_bwd_ms"], fwd_bwd_ms_runs=None) if ref else None
        method = r["method"] + (f" ({r['note']})" if r.get("note") else "")
        lines.append(
            f"| {method} | {r['N'] // 1024}K | {r.get('active', '')} | {_fmt(r['fwd_ms'])} "
            f"| {_fmt(r['fwd_bwd_ms'])} | {_fmt(r['fwd_tflops'], 0)} | {_fmt(r['fwd_bwd_tflops'], 0)} "
            f"| {ratio(ref, r, 'fwd_ms')} | {ratio(ref, r, 'fwd_bwd_ms')} |"
        )
    return "\n".join(lines)


def cuda_run_log(name: str, out: Path):
    """Exit unless CUDA is there; create ``out`` and return the device and a `log(line)` that prints a line
    and appends it to ``out/<name>.log`` (shared with profile_aha.py)."""
    if not torch.cuda.is_available():
        sys.exit(f"{name}.py needs a CUDA GPU")
    out.mkdir(parents=True, exist_ok=True)
    log_file = (out / f"{name}.log").open("w")

    def log(line: str) -> None:
        print(line, flush=True)
        log_file.write(line + "\n")
        log_file.flush()

    return torch.device("cuda"), log


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
        "--repeats", type=int, default=1, help="timings per row, taking turns; medians reported"
    )
    parser.add_argument(
        "--variants-fwd-only", action="store_true", help="time the variants' forward only (same backward)"
    )
    parser.add_argument(
        "--check-head-dims", type=lambda s: tuple(int(x) for x in s.split(",")), default=(64, 128)
    )
    args = parser.parse_args()
    device, log = cuda_run_log("bench_aha", args.out)

    failures = check_correctness(device, args.check_head_dims)
    if failures:
        log("correctness check FAILED; refusing to report:\n  " + "\n  ".join(failures))
        sys.exit(1)
    log("correctness check passed")
    for variant in list(args.variants):
        settings = dict(item.split("=", 1) for item in variant.split())
        os.environ.update(settings)
        try:
            failures = check_correctness(device, args.check_head_dims[-1:])
        finally:
            for key in settings:
                os.environ.pop(key)
        if failures:
            log(f"variant {variant!r} FAILED its check, not timed:\n  " + "\n  ".join(failures))
            args.variants.remove(variant)
        else:
            log(f"variant {variant!r}: correctness check passed")
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
    resources = kernel_resources()
    for line in resources:
        log(line)
    meta["kernels"] = resources
    table = markdown(rows)
    header = (
        f"{meta['device']}; torch {meta['torch']}, triton {meta['triton']}, cuDNN {meta['cudnn']}; "
        f"{meta['date']}\n"
        f"{meta['shape']}; median of triton.testing.do_bench, {args.repeats} repeat(s) taking turns\n"
        f"`{meta['command']}`\n"
    )
    (args.out / "bench_aha.md").write_text(header + "\n" + table + "\n")
    (args.out / "bench_aha.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    log(header)
    log(table)


if __name__ == "__main__":
    main()
