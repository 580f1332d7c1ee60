"""Decode-step projection kernels against cuBLAS on the GPU: time per call of one decode step's shapes
(Qwen2.5-7B: hidden 3584, 28 query heads, 4 K/V heads of 128), each replayed in a CUDA graph of 50 calls that
read 8 copies of the weights in turn (so that they stream from HBM, as in a model step, not from L2), for a
few tile configurations of `l2a.ops.triton.routed_linear`; and the global branch's decode-step entry (norm +
router logits, decision, k/v into the cache, routed q) as three launches against `norm_route_qkv`.

    python benchmarks/bench_decode_ops.py [--rows 1] [--copies 8] [--entry-only] [--out runs/decode_ops.json]
        [--device cpu]
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import torch

from l2a.ops import attention_with_kvcache, routed_linear
from l2a.ops.kvcache import norm_route_qkv, project_kv_cache, write_kv_cache
from l2a.ops.norm import rms_norm_and_logits
from l2a.ops.rotary import apply_rotary
from l2a.ops.triton import decode
from l2a.ops.triton import routed_linear as kernels

DEVICE = "cuda"
# norm_route_qkv's (k/v BLOCK_K, num_warps, num_stages), the first the default
ENTRY_SWEEP = [(512, 4, 3), (512, 4, 1), (512, 4, 2), (256, 4, 3), (512, 8, 3)]
CONFIGS = [
    (16, 256, 4, 4),
    (16, 512, 4, 3),
    (16, 128, 4, 6),
    (32, 256, 4, 4),
    (16, 256, 8, 4),
    (16, 512, 8, 3),
]


class Copies:
    """`n` distinct tensors made by `make`, handed out in turn by calling the object: the calls captured in
    one graph then read more weight bytes than the GPU's L2 holds (50 MB on the H200, where one copy of a
    decode step's q and k/v weights, 33 MB, would stay resident and time as L2 reads)."""

    def __init__(self, make, n: int):
        self.items = [make() for _ in range(n)]
        self.turn = 0

    def __call__(self) -> torch.Tensor:
        self.turn = (self.turn + 1) % len(self.items)
        return self.items[self.turn]

    def nbytes(self) -> int:
        return self.items[0].numel() * self.items[0].element_size()


def graph_us(fn, calls: int = 50, repeats: int = 5) -> float:
    """Microseconds per call of fn, captured `calls` times in one CUDA graph (launch gaps included); on
    the CPU (a smoke run under TRITON_INTERPRET=1) one plain call."""
    if DEVICE == "cpu":
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e6
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) * 1e3 / calls)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1)
    parser.add_argument(
        "--copies", type=int, default=8, help="distinct copies of each weight, read in turn (1: L2-resident)"
    )
    parser.add_argument("--out", type=Path, default=Path("runs/decode_ops.json"))
    parser.add_argument("--device", default="cuda", help="cpu: a smoke run (TRITON_INTERPRET=1)")
    parser.add_argument(
        "--attention",
        action="store_true",
        help="only the decode attention (window ring and 128K global cache) at each "
        "DECODE_MIN_SPLIT_BLOCKS of --min-blocks",
    )
    parser.add_argument("--min-blocks", default="1,2,4", help="DECODE_MIN_SPLIT_BLOCKS values (--attention)")
    parser.add_argument(
        "--entry-only",
        action="store_true",
        help="only the entry, at each (BLOCK_K, warps, stages) of ENTRY_SWEEP",
    )
    args = parser.parse_args()
    global DEVICE
    DEVICE = dev = args.device
    if args.attention:
        rows = attention_rows(args, [int(v) for v in args.min_blocks.split(",")])
        write_table(rows, args, f"batch {args.rows}, {1 if dev == 'cpu' else args.copies} cache copies", "KV")
        return
    dt = torch.bfloat16
    # the Qwen2.5-7B shape; a CPU smoke run a small one (the interpreter takes minutes per 7B-shape call)
    hidden, hq, hkv, d, slots = (3584, 28, 4, 128, 8192) if dev != "cpu" else (256, 4, 2, 64, 64)
    x = torch.randn(args.rows, 1, hidden, device=dev, dtype=dt)
    copies = 1 if dev == "cpu" else args.copies
    wq = Copies(lambda: torch.randn(hq * d, hidden, device=dev, dtype=dt) / 60, copies)
    bq = torch.randn(hq * d, device=dev, dtype=dt)
    wkv = Copies(lambda: torch.randn(2 * hkv * d, hidden, device=dev, dtype=dt) / 60, copies)
    bkv = torch.randn(2 * hkv * d, device=dev, dtype=dt)
    kc, vc = (torch.zeros(args.rows, slots, hkv, d, device=dev, dtype=dt) for _ in range(2))
    idx = torch.tensor([slots // 2], device=dev)
    cos, sin = torch.randn(1, 1, d, device=dev, dtype=dt), torch.randn(1, 1, d, device=dev, dtype=dt)
    live = torch.ones(args.rows, 1, dtype=torch.bool, device=dev)
    dead = torch.zeros_like(live)
    wo = Copies(lambda: torch.randn(hidden, hq * d, device=dev, dtype=dt) / 60, copies)
    res = torch.randn(args.rows, 1, hidden, device=dev, dtype=dt)
    linear = torch.nn.functional.linear
    tri = dict(backend="triton")

    def cublas_kv_write():
        k, v = linear(x, wkv(), bkv).view(args.rows, 1, 2 * hkv, d).split(hkv, -2)
        write_kv_cache(kc, vc, idx, k, v, cos, sin)

    # (name, weight bytes read, call)
    cublas = [
        ("cuBLAS q (3584 -> 3584, bias)", wq, lambda: linear(x, wq(), bq)),
        (
            "cuBLAS q + RoPE kernel",
            wq,
            lambda: apply_rotary(linear(x, wq(), bq).view(args.rows, 1, hq, d), cos, sin),
        ),
        ("cuBLAS k/v (3584 -> 1024, bias)", wkv, lambda: linear(x, wkv(), bkv)),
        ("cuBLAS k/v + cache-write kernel", wkv, cublas_kv_write),
        ("cuBLAS o (3584 -> 3584) + residual add", wo, lambda: res + linear(x, wo())),
    ]
    triton_ops = [
        ("routed q + RoPE, routed", wq, lambda: routed_linear(x, wq(), bq, live, rotary=(cos, sin), **tri)),
        (
            "routed q + RoPE, not routed",
            None,
            lambda: routed_linear(x, wq(), bq, dead, rotary=(cos, sin), **tri),
        ),
        ("project_kv_cache", wkv, lambda: project_kv_cache(kc, vc, idx, x, wkv(), bkv, cos, sin, **tri)),
        ("routed o + residual, routed", wo, lambda: routed_linear(x, wo(), None, live, residual=res, **tri)),
    ]
    # the global branch's entry: norm + router logits, k/v into the cache, routed q as three launches (the
    # decision between them in PyTorch), against `norm_route_qkv`'s one kernel
    norm_w = torch.rand(hidden, device=dev, dtype=dt) + 0.5
    router_w = torch.zeros(1, hidden, device=dev, dtype=dt)

    def three_launches(offset):
        g, logits = rms_norm_and_logits(x, norm_w, 1e-6, router_w, **tri)
        hard = torch.sigmoid((logits.squeeze(-1) + offset) / 0.1) >= 0.5
        project_kv_cache(kc, vc, idx, g, wkv(), bkv, cos, sin, **tri)
        return routed_linear(g, wq(), bq, hard, rotary=(cos, sin), **tri)

    def one_kernel(offset):
        return norm_route_qkv(
            x, norm_w, 1e-6, router_w, wq(), bq, wkv(), bkv, kc, vc, idx, cos, sin, temperature=0.1,
            threshold=0.5, offset=offset, **tri,
        )  # fmt: skip

    entry = [
        (f"{name}, {'routed' if offset > 0 else 'not routed'}", (wq, wkv) if offset > 0 else (wkv,), call)
        for offset in (1.0, -1.0)
        for name, call in (
            (
                "entry: norm+logits, decision, k/v into cache, routed q (3 kernels + torch)",
                lambda o=offset: three_launches(o),
            ),
            ("entry: norm_route_qkv (one kernel)", lambda o=offset: one_kernel(o)),
        )
    ]
    rows = []
    real = kernels._tiles
    with torch.no_grad():
        for name, weight, call in [] if args.entry_only else cublas:
            rows.append(dict(op=name, us=graph_us(call), weight_bytes=weight.nbytes()))
        default = kernels.ENTRY_LAUNCH
        for launch in ENTRY_SWEEP if args.entry_only else [default]:
            kernels.ENTRY_LAUNCH = launch
            for name, weights, call in entry:
                if "one kernel" not in name and launch != ENTRY_SWEEP[0] and args.entry_only:
                    continue
                tag = " [BK{} w{} s{}]".format(*launch) if "one kernel" in name else ""
                nbytes = sum(w.nbytes() for w in weights)
                rows.append(dict(op=name + tag, us=graph_us(call), weight_bytes=nbytes, launch=launch))
        kernels.ENTRY_LAUNCH = default
        for config in [] if args.entry_only else CONFIGS:
            kernels._tiles = lambda _kernel, c=config: c
            tag = "BN{} BK{} w{} s{}".format(*config)
            for name, weight, call in triton_ops:
                nbytes = None if weight is None else weight.nbytes()
                rows.append(dict(op=f"{name} [{tag}]", us=graph_us(call), weight_bytes=nbytes))
    kernels._tiles = real
    write_table(rows, args, f"rows={args.rows}, {copies} weight copies", "weight")


def attention_rows(args: argparse.Namespace, min_blocks: list[int]) -> list[dict]:
    """µs per decode-attention call (`attention_with_kvcache`, one new token a row, the Qwen2.5-7B heads):
    the local branch's ring (window 4096) and the global branch's 128K cache with one row routed or none,
    at each DECODE_MIN_SPLIT_BLOCKS (split kernel and merge kernel in one graph)."""
    dev, dt, b = args.device, torch.bfloat16, args.rows
    hq, hkv, d, window, filled = (28, 4, 128, 4096, 131072) if dev != "cpu" else (4, 2, 64, 40, 300)
    copies = 1 if dev == "cpu" else args.copies
    q = torch.randn(b, 1, hq, d, device=dev, dtype=dt)
    seqlen = torch.tensor([filled], dtype=torch.int32, device=dev)
    one = torch.zeros(b, 1, dtype=torch.bool, device=dev)
    one[0] = True
    row_bytes = 2 * hkv * d * 2  # one position's K and V, bf16
    cases = []
    for name, slots, nbytes, kw in (  # nbytes: the K/V the call must read
        ("window 4096 (ring)", window + 15, b * window * row_bytes, dict(window=window, ring=True)),
        ("global 128K, 1 row routed", filled + 16, filled * row_bytes, dict(active=one)),
        ("global 128K, none routed", filled + 16, 0, dict(active=torch.zeros_like(one))),
    ):
        kv = Copies(lambda s=slots: torch.randn(2, b, s, hkv, d, device=dev, dtype=dt), copies)
        cases.append((name, kv, nbytes, kw))
    rows = []
    real = decode.DECODE_MIN_SPLIT_BLOCKS
    with torch.no_grad():
        for (name, kv, nbytes, kw), blocks in itertools.product(cases, min_blocks):
            decode.DECODE_MIN_SPLIT_BLOCKS = blocks

            def call(kv=kv, kw=kw):
                k, v = kv()
                return attention_with_kvcache(q, k, v, seqlen, backend="triton", **kw)

            us = graph_us(call)
            rows.append(dict(op=f"{name} [min {blocks} blocks]", us=us, kv_bytes=nbytes, min_blocks=blocks))
        del cases
    decode.DECODE_MIN_SPLIT_BLOCKS = real
    return rows


def write_table(rows: list[dict], args: argparse.Namespace, title: str, what: str) -> None:
    """Rows to --out (JSON) and a Markdown table with the bandwidth of the bytes each call must read."""
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1))
    key = f"{what.lower()}_bytes"
    print(f"| op ({title}) | us per call | {what} GB/s |\n|---|---|---|")
    for r in rows:
        gbs = "" if not r[key] else f"{r[key] / r['us'] / 1e3:.0f}"
        print(f"| {r['op']} | {r['us']:.2f} | {gbs} |")


if __name__ == "__main__":
    main()
