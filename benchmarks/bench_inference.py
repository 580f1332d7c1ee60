"""Inference speed on one GPU: time to first token (TTFT) and time per output token (TPOT) of an L2A model,
the same model local-only (force_route="none") and the dense HF base model, in one run.

Random weights with a real model shape (Qwen2.5-7B or -1.5B), bf16, dense base with SDPA. The L2A routers get
random weights and a per-layer threshold calibrated on a random prompt so that about `--routed` of the tokens
are routed; the measured routed fractions (prefill and decode) are recorded next to the times.
Decode is a greedy loop of single-token forwards from the prefill's cache, the same loop for every model:
"eager" with each model's dynamic cache, "compiled" with a static cache (HF `StaticCache` / `L2ACache`
with `max_length`) and `torch.compile(mode="reduce-overhead", fullgraph=True)` of the step (CUDA graphs).

    python benchmarks/bench_inference.py --shape 7b --prompts 32768,65536,131072 --batches 1,8 \
        --modes eager,compiled --out runs/bench_inference
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import transformers
from transformers import Qwen2Config, Qwen2ForCausalLM
from transformers.cache_utils import DynamicCache, StaticCache

import l2a
from l2a.models import L2ACache

SHAPES = {  # hidden, intermediate, layers, heads, kv heads, vocab
    "7b": (3584, 18944, 28, 28, 4, 152064),
    "1.5b": (1536, 8960, 28, 12, 2, 151936),
    "tiny": (256, 512, 2, 4, 2, 1000),  # a smoke run of this script on CPU (--device cpu)
}
DEVICE = "cuda"


def log(msg: str) -> None:
    print(f"[{datetime.now(timezone.utc):%H:%M:%S}] {msg}", flush=True)


def build_models(args: argparse.Namespace) -> tuple[Qwen2ForCausalLM, l2a.L2AForCausalLM]:
    hidden, inter, layers, heads, kv, vocab = SHAPES[args.shape]
    config = Qwen2Config(
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=args.layers or layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        vocab_size=vocab,
        max_position_embeddings=max(args.prompts) + 1024,
        rope_theta=5e6,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(DEVICE):
        base = Qwen2ForCausalLM(config).eval()
    torch.set_default_dtype(default)
    model = l2a.convert_model(base, sliding_window=args.window).eval()
    model.config.attention_backend = "triton" if DEVICE == "cuda" else "torch"
    return base, model


@torch.no_grad()
def calibrate_routers(model: l2a.L2AForCausalLM, fraction: float, n: int) -> None:
    """Random router weights (logit/tau ~ N(0, 1)) and each layer's threshold at its (1 - fraction) quantile
    of the soft decisions on a random prompt of n tokens."""
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    routers = [layer.router for layer in model.model.layers if layer.has_global]
    for r in routers:
        w = torch.randn(r.weight.shape, device=DEVICE, generator=gen) / math.sqrt(r.weight.shape[1])
        r.weight.copy_(w * r.temperature)
    softs = []
    hooks = [r.register_forward_hook(lambda _m, _i, out: softs.append(out.soft.flatten())) for r in routers]
    ids = torch.randint(0, model.config.vocab_size, (1, n), device=DEVICE, generator=gen)
    model.config.force_route = "all"  # calibrate on the hidden states of full routing, in one pass
    model(ids, use_cache=False, logits_to_keep=1)
    model.config.force_route = None
    for h in hooks:
        h.remove()
    for r, soft in zip(routers, softs, strict=True):
        r.threshold = float(torch.quantile(soft.float()[:: max(1, soft.numel() // 100000)], 1 - fraction))


def sync_time() -> float:
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def make_cache(kind: str, model, max_len: int):
    if kind == "dense":
        return StaticCache(config=model.config, max_cache_len=max_len) if max_len else DynamicCache()
    return L2ACache(model.config, max_length=max_len or None)


@torch.no_grad()
def run_one(kind: str, model, step, ids: torch.Tensor, args: argparse.Namespace, compiled: bool) -> dict:
    """Prefill, then `warmup` + `steps` greedy decode steps; returns TTFT, TPOT and routed fractions."""
    b, n = ids.shape
    total = args.warmup + args.steps
    cache = make_cache(kind, model, n + total + 1 if compiled else 0)
    extra = {"cache_position": torch.arange(n, device=DEVICE)} if kind == "dense" and compiled else {}
    t0 = sync_time()
    out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1, **extra)
    ttft = sync_time() - t0
    prefill_fraction = out.router_fraction.mean().item() if kind == "l2a" else None
    tok = out.logits[:, -1:].argmax(-1)
    del out
    fractions = []
    for i in range(total):
        if i == args.warmup:
            t0 = sync_time()
        kw = (
            {"cache_position": torch.full((1,), n + i, device=DEVICE)} if kind == "dense" and compiled else {}
        )
        out = step(input_ids=tok, past_key_values=cache, use_cache=True, **kw)
        tok = out.logits[:, -1:].argmax(-1)
        if kind == "l2a" and i >= args.warmup:
            fractions.append(out.router_fraction.mean())
    tpot = (sync_time() - t0) / args.steps
    kv_bytes = cache.nbytes() if isinstance(cache, L2ACache) else None
    del cache
    decode_fraction = torch.stack(fractions).mean().item() if fractions else None
    return dict(
        ttft_s=ttft,
        tpot_ms=tpot * 1e3,
        routed_prefill=prefill_fraction,
        routed_decode=decode_fraction,
        kv_bytes=kv_bytes,
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    parser.add_argument(
        "--layers", type=int, default=0, help="override the number of layers (0: the shape's)"
    )
    parser.add_argument(
        "--prompts", type=lambda s: [int(x) for x in s.split(",")], default=[32768, 65536, 131072]
    )
    parser.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8])
    parser.add_argument("--modes", type=lambda s: s.split(","), default=["eager", "compiled"])
    parser.add_argument("--variants", type=lambda s: s.split(","), default=["dense", "l2a", "local_only"])
    parser.add_argument("--window", type=int, default=4096)
    parser.add_argument("--routed", type=float, default=0.1, help="target fraction of routed tokens")
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path("runs/bench_inference"))
    parser.add_argument("--device", default="cuda", help="cuda; cpu only for a smoke run with --shape tiny")
    args = parser.parse_args()
    global DEVICE
    DEVICE = args.device
    if DEVICE == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_inference.py: error: needs a CUDA GPU")
    args.out.mkdir(parents=True, exist_ok=True)
    env = {
        "gpu": torch.cuda.get_device_name() if DEVICE == "cuda" else platform.processor(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "date": datetime.now(timezone.utc).isoformat(timespec="minutes"),
        "command": " ".join(sys.argv),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    log(json.dumps(env))
    base, model = build_models(args)
    calibrate_routers(model, args.routed, min(args.prompts))
    log("models built, routers calibrated")
    # one short prefill + decode per model so that kernels are compiled before timing
    warm_ids = torch.randint(0, model.config.vocab_size, (1, min(2048, min(args.prompts))), device=DEVICE)
    for m in (base, model):
        run_one("dense" if m is base else "l2a", m, m, warm_ids, args, compiled=False)
    rows = []
    for mode in args.modes:
        steps = {}
        for variant in args.variants:
            m = base if variant == "dense" else model
            steps[variant] = (
                torch.compile(m, mode="reduce-overhead", fullgraph=True) if mode == "compiled" else m
            )
        for b in args.batches:
            for n in args.prompts:
                ids = torch.randint(0, model.config.vocab_size, (b, n), device=DEVICE)
                for variant in args.variants:
                    model.config.force_route = "none" if variant == "local_only" else None
                    kind = "dense" if variant == "dense" else "l2a"
                    m = base if variant == "dense" else model
                    row = dict(mode=mode, batch=b, prompt=n, variant=variant)
                    try:
                        row.update(run_one(kind, m, steps[variant], ids, args, compiled=mode == "compiled"))
                    except torch.OutOfMemoryError:
                        row["error"] = "out of memory"
                    except Exception as e:  # a failing configuration is recorded, the others still run
                        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                    model.config.force_route = None
                    if DEVICE == "cuda":
                        torch.cuda.empty_cache()
                    log(json.dumps(row))
                    rows.append(row)
                    (args.out / "results.json").write_text(json.dumps({"env": env, "rows": rows}, indent=1))
    print_table(rows)


def print_table(rows: list[dict]) -> None:
    def fmt(r: dict | None, key: str, scale: float = 1.0, digits: int = 2) -> str:
        if r is None:
            return "-"
        if "error" in r:
            return "OOM" if "memory" in r["error"] else "fail"
        return f"{r[key] * scale:.{digits}f}"

    index = {(r["mode"], r["batch"], r["prompt"], r["variant"]): r for r in rows}
    print(
        "| mode | B | prompt | TTFT dense / L2A / local (s) | TTFT speed-up | TPOT dense / L2A / local (ms) | "
        "TPOT L2A/dense | L2A/local | routed prefill / decode |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for mode, b, n in sorted({k[:3] for k in index}):
        d, x, lo = (index.get((mode, b, n, v)) for v in ("dense", "l2a", "local_only"))
        ok = all(r is not None and "error" not in r for r in (d, x))
        speed = f"{d['ttft_s'] / x['ttft_s']:.2f}x" if ok else "-"
        ratio = f"{x['tpot_ms'] / d['tpot_ms']:.2f}" if ok else "-"
        own = f"{x['tpot_ms'] / lo['tpot_ms']:.2f}" if ok and lo is not None and "error" not in lo else "-"
        routed = f"{fmt(x, 'routed_prefill', 100, 1)} / {fmt(x, 'routed_decode', 100, 1)} %"
        print(
            f"| {mode} | {b} | {n // 1024}K | {fmt(d, 'ttft_s')} / {fmt(x, 'ttft_s')} / {fmt(lo, 'ttft_s')} | {speed} "
            f"| {fmt(d, 'tpot_ms', 1, 1)} / {fmt(x, 'tpot_ms', 1, 1)} / {fmt(lo, 'tpot_ms', 1, 1)} | {ratio} | {own} "
            f"| {routed} |"
        )


if __name__ == "__main__":
    main()
