"""Inference speed on one GPU: time to first token (TTFT) and time per output token (TPOT) of an L2A model,
the same model local-only (force_route="none") and the dense HF base model, in one run.

Random weights with a real model shape (Qwen2.5-7B or -1.5B), bf16, dense base with SDPA. The L2A routers get
random weights and a per-layer threshold calibrated on a random prompt so that about `--routed` of the tokens
are routed; the measured routed fractions (prefill and decode) are recorded next to the times.
TTFT: one forward of the prompt with the cache generate() uses (HF `DynamicCache`, SDPA causal; `L2ACache`).
Decode: greedy single-token steps from the prompt's cache, the same loop for every model, with a static
cache on both sides (HF `StaticCache` filled from the prompt's cache; `L2ACache(max_length=...)`):
"eager" runs the step as Python, "graph" captures one step in a CUDA graph and replays it (what
`torch.compile(mode="reduce-overhead")` does, without Inductor's kernel fusion, on both sides).

    python benchmarks/bench_inference.py --shape 7b --prompts 32768,65536,131072 --batches 1,8 \
        --modes eager,graph --out runs/bench_inference
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
    """Random router weights (logit/tau ~ N(0, 1)); each layer's threshold at the (1 - fraction) quantile of
    its soft decisions on a random prompt of n tokens, first under full routing, then once more under the
    routing that this gives (the hidden states of later layers depend on the routing of earlier ones)."""
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    routers = [layer.router for layer in model.model.layers if layer.has_global]
    for r in routers:
        w = torch.randn(r.weight.shape, device=DEVICE, generator=gen) / math.sqrt(r.weight.shape[1])
        r.weight.copy_(w * r.temperature)
    ids = torch.randint(0, model.config.vocab_size, (1, n), device=DEVICE, generator=gen)
    for force in ("all", None):
        softs: list[torch.Tensor] = []
        hooks = [
            r.register_forward_hook(lambda _m, _i, out, s=softs: s.append(out.soft.flatten()))
            for r in routers
        ]
        model.config.force_route = force
        model(ids, use_cache=False, logits_to_keep=1)
        for h in hooks:
            h.remove()
        for r, soft in zip(routers, softs, strict=True):
            r.threshold = float(torch.quantile(soft.float()[:: max(1, soft.numel() // 100000)], 1 - fraction))
    model.config.force_route = None


def sync_time() -> float:
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


class DecodeStep:
    """One greedy decode step that updates its own input token (and, for HF, cache position) in place, so
    that it can be replayed as a CUDA graph. Both models use a static cache for decoding: HF's `StaticCache`
    (filled from the prefill's `DynamicCache`) and `L2ACache(max_length=...)`."""

    def __init__(self, kind: str, model, cache, token: torch.Tensor, position: int):
        self.kind, self.model, self.cache = kind, model, cache
        self.token = token.clone()
        self.position = torch.full((1,), position, device=token.device, dtype=torch.long)
        self.fraction = torch.zeros((), device=token.device)

    @torch.no_grad()
    def __call__(self) -> None:
        kw = {"cache_position": self.position} if self.kind == "dense" else {}
        out = self.model(input_ids=self.token, past_key_values=self.cache, use_cache=True, **kw)
        self.token.copy_(out.logits[:, -1:].argmax(-1))
        self.position.add_(1)
        if self.kind == "l2a":
            self.fraction.add_(out.router_fraction.mean())


@torch.no_grad()
def prefill(kind: str, model, ids: torch.Tensor, max_len: int):
    """Time to first token, with the cache each model's generate() uses for a prompt; returns the static
    cache for decoding, the first token and the routed fraction."""
    b, n = ids.shape
    cache = DynamicCache() if kind == "dense" else L2ACache(model.config, max_length=max_len)
    t0 = sync_time()
    out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    ttft = sync_time() - t0
    fraction = out.router_fraction.mean().item() if kind == "l2a" else None
    token = out.logits[:, -1:].argmax(-1)
    if kind == "dense":  # move the prompt's K/V into a static cache for the decode steps
        static = StaticCache(config=model.config, max_cache_len=max_len)
        for i, layer in enumerate(cache.layers):
            static.update(layer.keys, layer.values, i, {"cache_position": torch.arange(n, device=ids.device)})
            layer.keys = layer.values = None  # free as we go: both caches at once may not fit
        cache = static
    return ttft, cache, token, fraction


def time_steps(step: DecodeStep, steps: int) -> float:
    t0 = sync_time()
    for _ in range(steps):
        step()
    return (sync_time() - t0) / steps


def time_graph(step: DecodeStep, steps: int) -> float:
    """Capture one step in a CUDA graph (after two warm-up steps on a side stream), time its replays."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
        step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    t0 = sync_time()
    for _ in range(steps):
        graph.replay()
    return (sync_time() - t0) / steps


@torch.no_grad()
def run_one(kind: str, model, ids: torch.Tensor, args: argparse.Namespace) -> dict:
    """Prefill, then eager decode steps and (mode "graph") CUDA-graph replays of the step, one cache."""
    b, n = ids.shape
    total = args.warmup + args.steps
    ttft, cache, token, routed_prefill = prefill(kind, model, ids, n + 2 * total + 8)
    row = dict(ttft_s=ttft, routed_prefill=routed_prefill)
    row["kv_bytes"] = cache.nbytes() if isinstance(cache, L2ACache) else None
    step = DecodeStep(kind, model, cache, token, n)
    for _ in range(args.warmup):
        step()
    step.fraction.zero_()
    row["tpot_ms"] = time_steps(step, args.steps) * 1e3
    if "graph" in args.modes and DEVICE == "cuda":
        try:
            row["tpot_graph_ms"] = time_graph(step, args.steps) * 1e3
        except Exception as e:  # recorded, the other figures stand
            row["graph_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    row["routed_decode"] = step.fraction.item() / args.steps if kind == "l2a" else None
    return row


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
    parser.add_argument(
        "--modes", type=lambda s: s.split(","), default=["eager", "graph"], help="eager, graph (CUDA graphs)"
    )
    parser.add_argument("--variants", type=lambda s: s.split(","), default=["dense", "l2a", "local_only"])
    parser.add_argument("--window", type=int, default=4096)
    parser.add_argument(
        "--offload-idle",
        action="store_true",
        help="keep only the model being timed on the GPU (for batch x prompt that do not fit next to both)",
    )
    parser.add_argument(
        "--max-batch-tokens", type=int, default=0, help="skip batch x prompt above this (recorded as not run)"
    )
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
        run_one("dense" if m is base else "l2a", m, warm_ids, args)
    rows = []
    for b in args.batches:
        for n in args.prompts:
            if args.max_batch_tokens and b * n > args.max_batch_tokens:
                rows += [
                    dict(batch=b, prompt=n, variant=v, error="not run (--max-batch-tokens)")
                    for v in args.variants
                ]
                continue
            ids = torch.randint(0, model.config.vocab_size, (b, n), device=DEVICE)
            for variant in args.variants:
                model.config.force_route = "none" if variant == "local_only" else None
                m = base if variant == "dense" else model
                if args.offload_idle:
                    (model if m is base else base).to("cpu")
                    m.to(DEVICE)
                row = dict(batch=b, prompt=n, variant=variant)
                try:
                    row.update(run_one("dense" if variant == "dense" else "l2a", m, ids, args))
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
        if r is None or r.get(key) is None:
            return "-"
        return f"{r[key] * scale:.{digits}f}"

    def ratio(a: dict | None, b: dict | None, key: str) -> str:
        if a is None or b is None or a.get(key) is None or b.get(key) is None:
            return "-"
        return f"{a[key] / b[key]:.2f}"

    index = {(r["batch"], r["prompt"], r["variant"]): r for r in rows}
    head = [
        "B", "prompt", "TTFT s dense / L2A / local", "TTFT dense/L2A", "TPOT eager ms dense / L2A / local",
        "eager L2A/dense", "TPOT graph ms dense / L2A / local", "graph L2A/dense", "graph L2A/local",
        "routed prefill / decode %", "errors",
    ]  # fmt: skip
    print("| " + " | ".join(head) + " |\n" + "|---" * len(head) + "|")
    for b, n in sorted({k[:2] for k in index}):
        d, x, lo = (index.get((b, n, v)) for v in ("dense", "l2a", "local_only"))
        cells = [
            str(b),
            f"{n // 1024}K",
            " / ".join(fmt(r, "ttft_s") for r in (d, x, lo)),
            ratio(d, x, "ttft_s"),
            " / ".join(fmt(r, "tpot_ms", 1, 1) for r in (d, x, lo)),
            ratio(x, d, "tpot_ms"),
            " / ".join(fmt(r, "tpot_graph_ms", 1, 1) for r in (d, x, lo)),
            ratio(x, d, "tpot_graph_ms"),
            ratio(x, lo, "tpot_graph_ms"),
            f"{fmt(x, 'routed_prefill', 100, 1)} / {fmt(x, 'routed_decode', 100, 1)}",
            " ".join(r.get("error", "") + r.get("graph_error", "") for r in (d, x, lo) if r is not None),
        ]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
