"""Inference speed on one GPU: time to first token (TTFT) and time per output token (TPOT) of an L2A model,
the same model local-only (force_route="none") and the dense HF base model, in one run.

Random weights with a real model shape (Qwen2.5-7B or -1.5B), bf16, dense base with SDPA. The models are
measured one after the other, each alone on the GPU: the dense base is built and measured, then converted
(its weights reused) into the L2A model, which is measured with learned routing and local-only. The L2A
routers get random weights and per-layer thresholds so that about `--routed` of the tokens are routed: for
the prefill calibrated on the second half of a random prompt, for the decode steps on the soft decisions of
the last 2048 tokens of the measured prompt (random-weight routing drifts with the position); the routed
fractions of prefill and decode are recorded.

TTFT (batch 1): one forward of the prompt with the cache generate() uses for a static generation (HF
`DynamicCache` and SDPA's causal kernel for the dense model, `L2ACache(max_length=...)`), logits of the last
token only.
TPOT (every batch size): decode steps from a static cache on both sides (HF `StaticCache`, `L2ACache` with
`max_length`) filled with the K/V of that batch-1 prompt, repeated over the batch (a prefill of B x 128K
tokens does not fit next to the cache: its activations alone are ~120 GB). Each row gets its own random
step tokens (teacher forcing: with random weights greedy continuations degenerate into one repeated token,
whose routing is all or nothing); the argmax of every step is computed as in greedy decoding. Every mode
starts from the same fill level and runs the same tokens at the same positions, so the modes route nearly
the same tokens (`DecodeStep.rewind`).
Modes: "eager" (the step as Python), "graph" (one step captured in a `torch.cuda.CUDAGraph` and replayed)
and "compiled" (`torch.compile(step, mode="reduce-overhead", fullgraph=True)`: Inductor and CUDA graphs,
as HF generate(cache_implementation="static") compiles its steps), the same settings on every side.

    python benchmarks/bench_inference.py --shape 7b --prompts 65536,131072 --batches 1,8 \\
        --modes eager,graph,compiled --out runs/bench_inference
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import math
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import transformers
from torch._dynamo.utils import counters
from transformers import Qwen2Config, Qwen2ForCausalLM
from transformers.cache_utils import DynamicCache, StaticCache

import l2a
from l2a.models import L2ACache
from l2a.models._compat import cache_kwargs

SHAPES = {  # hidden, intermediate, layers, heads, kv heads, vocab
    "7b": (3584, 18944, 28, 28, 4, 152064),
    "1.5b": (1536, 8960, 28, 12, 2, 151936),
    "tiny": (256, 512, 2, 4, 2, 1000),  # a smoke run of this script on CPU (--device cpu)
}
VARIANTS = ("dense", "l2a", "local_only")
DEVICE = "cuda"
START = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{datetime.now(timezone.utc):%H:%M:%S} +{time.perf_counter() - START:.0f}s] {msg}", flush=True)


def build_base(args: argparse.Namespace) -> Qwen2ForCausalLM:
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
    return base


def to_l2a(base: Qwen2ForCausalLM, args: argparse.Namespace) -> l2a.L2AForCausalLM:
    model = l2a.convert_model(base, sliding_window=args.window).eval()
    model.config.attention_backend = "triton" if DEVICE == "cuda" else "torch"
    return model


@torch.no_grad()
def calibrate_routers(model: l2a.L2AForCausalLM, fraction: float, n: int) -> None:
    """Random router weights (logit/tau ~ N(0, 1)); each layer's threshold at the (1 - fraction) quantile of
    its soft decisions over the second half of a random prompt of n tokens (positions like the decode
    steps', far from the start), first under full routing, then once more under the routing that this
    gives (the hidden states of later layers depend on the routing of earlier ones)."""
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    routers = [layer.router for layer in model.model.layers if layer.has_global]
    for r in routers:
        w = torch.randn(r.weight.shape, device=DEVICE, generator=gen) / math.sqrt(r.weight.shape[1])
        r.weight.copy_(w * r.temperature)
    ids = torch.randint(0, model.config.vocab_size, (1, n), device=DEVICE, generator=gen)
    for force in ("all", None):
        softs: list[torch.Tensor] = []
        hooks = [
            r.register_forward_hook(lambda _m, _i, out, s=softs: s.append(out.soft[:, n // 2 :].flatten()))
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


def free_memory() -> None:
    torch._dynamo.reset()  # compiled steps and their CUDA-graph pools
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


class DecodeStep:
    """One decode step that reads its input token from a fixed random stream (B, steps) at a step counter
    on the device and advances the counter (and, for HF, the cache position) itself, so that the same
    call can be replayed as a CUDA graph or compiled; returns the greedy next token (B, 1)."""

    def __init__(self, kind: str, model, cache, tokens: torch.Tensor, position: int):
        self.kind, self.model, self.cache, self.tokens = kind, model, cache, tokens
        self.start = position
        self.index = torch.zeros(1, device=tokens.device, dtype=torch.long)
        self.fraction = torch.zeros((), device=tokens.device)
        static = getattr(cache, "static", None)  # L2ACache: the fill level to rewind to
        self.filled = None if static is None else (static.position.clone(), static.host_filled)
        # HF StaticCache layers that count their own fill level (transformers >= 5.2x)
        self.lengths = [
            (layer.cumulative_length, layer.cumulative_length.clone())
            for layer in getattr(cache, "layers", [])
            if isinstance(getattr(layer, "cumulative_length", None), torch.Tensor)
        ]
        if DEVICE == "cuda":
            for t in (self.tokens, self.index, self.fraction):
                torch._dynamo.mark_static_address(t)

    def rewind(self) -> None:
        """Back to the first step: each mode then runs the same tokens at the same positions, so that the
        modes route (nearly) the same tokens. The global cache's slots are written again; the local ring's
        slots of the window's oldest positions hold the previous mode's later tokens (a ring of window + 15
        slots: after T steps, T - 16 of them), which changes nothing that is timed."""
        self.index.zero_()
        for length, start in self.lengths:
            length.copy_(start)
        if self.filled is not None:
            self.cache.static.position.copy_(self.filled[0])
            self.cache.static.host_filled = self.filled[1]

    @contextlib.contextmanager
    def untimed(self):
        """Steps run inside (profiles) leave the routed fraction of the timed steps as it was."""
        timed = self.fraction.clone()
        yield
        self.fraction.copy_(timed)

    @torch.no_grad()
    def __call__(self) -> torch.Tensor:
        token = self.tokens.index_select(1, self.index)
        kw = {"cache_position": self.index + self.start} if self.kind == "dense" else {}
        out = self.model(input_ids=token, use_cache=True, **cache_kwargs(self.cache), **kw)
        self.index.add_(1)
        if self.kind == "l2a":
            self.fraction.add_(out.router_fraction.mean())
        return out.logits[:, -1:].argmax(-1)


@torch.no_grad()
def prefill(kind: str, model, ids: torch.Tensor, max_len: int, tail: int = 2048) -> tuple:
    """TTFT of one prompt (1, N); returns it, the cache, the routed fraction and, for L2A, the routers'
    soft decisions on the last `tail` tokens (the decode steps' neighbourhood; random-weight routing
    drifts with the position)."""
    cache = DynamicCache() if kind == "dense" else L2ACache(model.config, max_length=max_len)
    softs: list[torch.Tensor] = []
    routers = [layer.router for layer in model.model.layers if getattr(layer, "has_global", False)]
    hooks = [r.register_forward_hook(lambda _m, _i, out: softs.append(out.soft[:, -tail:])) for r in routers]
    t0 = sync_time()
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **cache_kwargs(cache))
    ttft = sync_time() - t0
    for h in hooks:
        h.remove()
    fraction = out.router_fraction.mean().item() if kind == "l2a" else None
    return ttft, cache, fraction, softs


def decode_thresholds(softs: list[torch.Tensor], fraction: float) -> list[float]:
    """Per layer the (1 - fraction) quantile of its soft decisions at the end of the prompt."""
    return [float(torch.quantile(s.float().flatten(), 1 - fraction)) for s in softs]


def static_cache_for_batch(kind: str, model, prompt_cache, batch: int, n: int, max_len: int):
    """A static cache of `batch` rows, each holding the batch-1 prompt's K/V (documented synthetic fill)."""
    if kind == "dense":
        static = StaticCache(config=model.config, max_cache_len=max_len)
        positions = {"cache_position": torch.arange(n, device=DEVICE)}
        for i, layer in enumerate(prompt_cache.layers):
            static.update(
                layer.keys.expand(batch, -1, -1, -1), layer.values.expand(batch, -1, -1, -1), i, positions
            )
        return static
    cache = copy.deepcopy(prompt_cache)  # the prompt cache stays as it is for the next batch size
    if batch > 1:
        cache.batch_repeat_interleave(batch)
    if DEVICE == "cuda":  # the copies keep their addresses (compiled steps: CUDA graphs write them in place)
        tensors = [cache.key_start, cache.static.position]
        tensors += [
            t
            for layer in cache.layers
            for buf in (layer.local, layer.global_)
            for t in (buf.keys, buf.values)
        ]
        for t in tensors:
            if t is not None:
                torch._dynamo.mark_static_address(t)
    return cache


def time_eager(step: DecodeStep, warmup: int, steps: int) -> float:
    for _ in range(warmup):
        step()
    step.fraction.zero_()
    t0 = sync_time()
    for _ in range(steps):
        step()
    return (sync_time() - t0) / steps


def host_profile(step: DecodeStep, steps: int, path: Path) -> float:
    """Host side of eager steps: ms to enqueue one step (no synchronisation inside the timed loop, so a
    host-bound step shows its host time) and a cProfile of `steps` steps by own time, written to `path`."""
    import cProfile
    import io
    import pstats

    with step.untimed():
        sync_time()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        enqueue_ms = (time.perf_counter() - t0) / steps * 1e3
        sync_time()
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(steps):
            step()
        profiler.disable()
        sync_time()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(45)
    path.write_text(
        f"{steps} eager steps, {enqueue_ms:.2f} ms per step to enqueue (unprofiled)\n{text.getvalue()}"
    )
    return enqueue_ms


def profile_kernels(run, path: Path, label: str, elapsed: float, repeats: int = 4) -> None:
    """GPU time per kernel of `repeats` calls of `run` (torch.profiler), written to `path`: the profiler's
    table, then one line per kernel with its launches and microseconds per step."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            run()
        sync_time()
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    events.sort(key=lambda e: -e.self_device_time_total)
    launches = sum(e.count for e in events) / repeats
    busy = sum(e.self_device_time_total for e in events) / repeats
    # the GPU's idle time before each kernel (since the previous kernel ended), by kernel name
    idle: dict[str, float] = {}
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    kernels.sort(key=lambda e: e.time_range.start)
    for before, e in zip(kernels, kernels[1:]):
        idle[e.name] = idle.get(e.name, 0.0) + max(0.0, e.time_range.start - before.time_range.end)
    lines = [
        f"{repeats} {label} steps, {elapsed * 1e3:.3f} ms per step untraced; per step {launches:.0f} kernel "
        f"launches, {busy / 1e3:.3f} ms of kernel time, {sum(idle.values()) / repeats / 1e3:.3f} ms idle "
        "between kernels",
        f"{'launches/step':>13} {'us/step':>9} {'us/launch':>9} {'idle before':>11}  kernel",
    ]
    for e in events:
        lines.append(
            f"{e.count / repeats:13.1f} {e.self_device_time_total / repeats:9.1f} "
            f"{e.self_device_time_total / max(e.count, 1):9.2f} {idle.get(e.key, 0.0) / repeats:11.1f}  "
            f"{e.key[:110]}"
        )
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=90)
    path.write_text("\n".join(lines) + "\n\n" + table)


def time_graph(step: DecodeStep, warmup: int, steps: int, profile: Path | None = None) -> float:
    """Capture one step in a CUDA graph (after warm-up steps on a side stream), time its replays; with
    `profile`, the kernels of 4 more replays (`profile_kernels`)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(max(2, warmup)):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    graph.replay()
    step.fraction.zero_()
    t0 = sync_time()
    for _ in range(steps):
        graph.replay()
    elapsed = (sync_time() - t0) / steps
    if profile is not None:
        with step.untimed():
            profile_kernels(graph.replay, profile, "graph", elapsed)
    del graph
    return elapsed


def time_compiled(
    step: DecodeStep, warmup: int, steps: int, profile: Path | None = None
) -> tuple[float, float]:
    """torch.compile(mode="reduce-overhead", fullgraph=True) of the step; returns (compile + first calls
    seconds, seconds per step). With `profile`, 4 more steps under torch.profiler: GPU time per kernel."""
    counters.clear()
    compiled = torch.compile(step.__call__, mode="reduce-overhead", fullgraph=True)
    t0 = sync_time()
    for _ in range(max(3, warmup)):  # compile, then CUDA-graph recording
        compiled()
    compile_s = sync_time() - t0
    step.fraction.zero_()
    t0 = sync_time()
    for _ in range(steps):
        compiled()
    elapsed = (sync_time() - t0) / steps
    if profile is not None:
        with step.untimed():
            profile_kernels(compiled, profile, "compiled", elapsed)
    return compile_s, elapsed


@torch.no_grad()
def measure_variant(variant: str, model, args: argparse.Namespace, emit) -> None:
    """TTFT and TPOT of one variant for every prompt length and batch size; rows go to `emit`."""
    kind = "dense" if variant == "dense" else "l2a"
    modes = [m for m in args.modes if m != "graph" or DEVICE == "cuda"]
    total = args.warmup + args.steps + 3 + (2 * args.steps if args.host_profile else 0) + 4 * args.profile
    for n in args.prompts:
        max_len = n + total + 8
        ids = torch.randint(0, model.config.vocab_size, (1, n), device=DEVICE)
        try:
            ttft, prompt_cache, routed, softs = prefill(kind, model, ids, max_len)
        except torch.OutOfMemoryError:
            emit(dict(prompt=n, variant=variant, batch=1, error="prefill: out of memory"))
            free_memory()
            continue
        for b in [1] if args.ttft_only else args.batches:
            row = dict(prompt=n, batch=b, variant=variant, routed_prefill=routed)
            if b == 1:
                row["ttft_s"] = ttft
            if args.ttft_only:
                emit(row)
                continue
            routers = [layer.router for layer in model.model.layers if getattr(layer, "has_global", False)]
            prompt_thresholds = [r.threshold for r in routers]
            if variant == "l2a":  # the decode steps' thresholds (see the module docstring)
                for r, t in zip(routers, decode_thresholds(softs, args.routed), strict=True):
                    r.threshold = t
            try:
                cache = static_cache_for_batch(kind, model, prompt_cache, b, n, max_len)
                tokens = torch.randint(0, model.config.vocab_size, (b, total), device=DEVICE)
                step = DecodeStep(kind, model, cache, tokens, n)
                first = n == args.prompts[0] and b == args.batches[0] and args.profile
                stem = f"profile_{args.shape}_{variant}_{n // 1024}k_b{b}"
                for mode in modes:
                    if mode == "compiled" and time.perf_counter() - START > args.budget_s:
                        row["compiled_error"] = "not run (--budget-s)"
                        continue
                    if mode == "compiled" and args.compiled_batches and b not in args.compiled_batches:
                        continue
                    step.rewind()
                    try:
                        if mode == "eager":
                            row["tpot_eager_ms"] = time_eager(step, args.warmup, args.steps) * 1e3
                            if args.host_profile and n == args.prompts[0] and b == args.batches[0]:
                                row["host_enqueue_ms"] = host_profile(
                                    step, args.steps, args.out / f"host_{args.shape}_{variant}.txt"
                                )
                        elif mode == "graph":
                            target = args.out / f"{stem}_{mode}.txt" if first else None
                            row["tpot_graph_ms"] = time_graph(step, args.warmup, args.steps, target) * 1e3
                        else:
                            target = args.out / f"{stem}_{mode}.txt" if first else None
                            row["compile_s"], tpot = time_compiled(step, args.warmup, args.steps, target)
                            row["tpot_compiled_ms"] = tpot * 1e3
                        if kind == "l2a" and variant == "l2a":
                            row[f"routed_decode_{mode}"] = step.fraction.item() / args.steps
                    except Exception as e:  # recorded, the other modes still run
                        row[f"{mode}_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
                    if mode == "compiled":
                        row["cudagraph_skips"] = counters["inductor"]["cudagraph_skips"]
                    free_memory()
                if isinstance(cache, L2ACache):
                    row["kv_bytes"] = cache.nbytes()
                del step, cache
            except torch.OutOfMemoryError:
                row["error"] = "out of memory"
            for r, t in zip(routers, prompt_thresholds, strict=True):
                r.threshold = t
            free_memory()
            emit(row)
        del prompt_cache, softs
        free_memory()


def check_generation() -> list[str]:
    """On the GPU, a small L2A model (bf16 weights would hide little here: float32): cached greedy decoding
    (static cache: the fused decode GEMM, eager, CUDA graph and compiled) equals greedy decoding by
    recomputing the whole sequence; left padding, mixed routing. Returns failures (empty: all equal)."""
    from transformers import Qwen2Config as Config

    from l2a.ops.triton import decode

    decode.DECODE_MIN_KEYS = 8  # the decode kernels serve these short caches
    torch.manual_seed(0)
    config = Config(
        vocab_size=300, hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, attn_implementation="sdpa",
    )  # fmt: skip
    model = to_l2a(Qwen2ForCausalLM(config).to(DEVICE).eval(), argparse.Namespace(window=8))
    with torch.no_grad():
        for layer in model.model.layers:
            layer.router.weight.normal_(0.0, 0.05)
    ids = torch.randint(1, 300, (2, 40), device=DEVICE)
    mask = torch.ones_like(ids)
    ids[1, :5], mask[1, :5] = 0, 0
    new = 12
    with torch.no_grad():
        seq, m, fractions = ids, mask, []
        for _ in range(new):  # the reference: the full forward of the training kernels, every step
            out = model(seq, attention_mask=m, use_cache=False)
            fractions.append(out.router_fraction)
            nxt = out.logits[:, -1:].argmax(-1)
            seq, m = torch.cat([seq, nxt], 1), torch.cat([m, torch.ones_like(nxt)], 1)
    failures = []
    fractions = torch.stack(fractions)
    if not ((fractions > 0) & (fractions < 1)).any():
        failures.append("routing is not mixed")
    for impl in ("dynamic", "static"):
        got = model.generate(
            ids, attention_mask=mask, max_new_tokens=new, do_sample=False, cache_implementation=impl
        )
        if not torch.equal(got, seq):
            failures.append(f"generate(cache_implementation={impl!r}) differs from recomputation")
    for mode in ("eager", "graph", "compiled") if DEVICE == "cuda" else ("eager", "compiled"):
        cache = L2ACache(model.config, max_length=40 + 3 * new + 8)
        with torch.no_grad():
            out = model(ids, attention_mask=mask, use_cache=True, **cache_kwargs(cache))
        step = DecodeStep("l2a", model, cache, seq[:, 40:].contiguous(), 40)  # step i feeds token 40 + i
        if mode == "eager":
            got = [step() for _ in range(new)]
        elif mode == "graph":
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                token = step()
            got = []
            for _ in range(new):
                graph.replay()
                got.append(token.clone())
        else:
            compiled = torch.compile(step.__call__, mode="reduce-overhead", fullgraph=True)
            got = [compiled().clone() for _ in range(new)]
        got = torch.cat([out.logits[:, -1:].argmax(-1)] + got[:-1], 1)
        if not torch.equal(got, seq[:, 40:]):
            failures.append(f"{mode} static decode steps differ from recomputation")
        free_memory()
    decode.DECODE_MIN_KEYS = 1024
    return failures


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
        "--modes", type=lambda s: s.split(","), default=["eager", "graph", "compiled"],
        help="comma-separated: eager, graph (CUDA graph capture), compiled (torch.compile reduce-overhead)",
    )  # fmt: skip
    parser.add_argument(
        "--compiled-batches", type=lambda s: [int(x) for x in s.split(",")], default=[],
        help="compiled mode only at these batch sizes (default: all of --batches)",
    )  # fmt: skip
    parser.add_argument("--variants", type=lambda s: s.split(","), default=list(VARIANTS))
    parser.add_argument("--window", type=int, default=4096)
    parser.add_argument("--routed", type=float, default=0.1, help="target fraction of routed tokens")
    parser.add_argument(
        "--calibration-tokens", type=int, default=None, help="router calibration prompt (32768; CPU: 256)"
    )
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--budget-s", type=float, default=1e9, help="no new compiled run after this many s")
    parser.add_argument(
        "--profile", action="store_true", help="kernels of the first configuration (graph, compiled)"
    )
    parser.add_argument(
        "--host-profile", action="store_true",
        help="eager mode, first prompt and batch: host enqueue time per step and a cProfile (host_*.txt)",
    )  # fmt: skip
    parser.add_argument("--ttft-only", action="store_true", help="prefill (batch 1) only, no decode steps")
    parser.add_argument("--check", action="store_true", help="first check cached decoding == recomputation")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_inference"))
    parser.add_argument("--device", default="cuda", help="cuda; cpu only for a smoke run with --shape tiny")
    parser.add_argument("--replot", type=Path, help="only redraw the plot and table of a results JSON")
    parser.add_argument(
        "--entry-launch", type=lambda s: tuple(int(x) for x in s.split(",")),
        help="BLOCK_K,warps,stages of the global branch's decode entry kernel "
        "(`l2a.ops.triton.routed_linear.ENTRY_LAUNCH`; bench_decode_ops.py --entry-only sweeps them)",
    )  # fmt: skip
    args = parser.parse_args()
    if args.entry_launch is not None:
        from l2a.ops.triton import routed_linear

        routed_linear.ENTRY_LAUNCH = args.entry_launch
    if args.replot is not None:
        saved = json.loads(args.replot.read_text())
        title = f"{saved['env']['gpu']}, {saved['env']['date']}: {saved['env']['command'].split(' --out')[0]}"
        plot(saved["rows"], args.replot.with_suffix(".png"), title)
        print_table(saved["rows"])
        return
    global DEVICE
    DEVICE = args.device
    bad_modes = sorted(set(args.modes) - {"eager", "graph", "compiled"})
    bad_variants = sorted(set(args.variants) - set(VARIANTS))
    if bad_modes or bad_variants:
        sys.exit(f"bench_inference.py: error: unknown modes {bad_modes} / variants {bad_variants}")
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
    rows: list[dict] = []
    results = args.out / f"results_{args.shape}.json"

    def emit(row: dict) -> None:
        log(json.dumps(row))
        rows.append(row)
        results.write_text(json.dumps({"env": env, "rows": rows}, indent=1))

    if args.check:
        failures = check_generation()
        steps = "eager, graph, compiled" if DEVICE == "cuda" else "eager, compiled"
        env["check"] = (
            failures or f"cached greedy decoding == recomputation (generate dynamic/static; {steps})"
        )
        log(f"check: {env['check']}")
    base = build_base(args)
    # warm-up: kernels compiled (and the allocator grown) before the first timed prefill
    warm = torch.randint(0, base.config.vocab_size, (1, 4096), device=DEVICE)
    if "dense" in args.variants:
        with torch.no_grad():
            base(warm, logits_to_keep=1)
        log("dense base built")
        measure_variant("dense", base, args, emit)
    model = to_l2a(base, args)
    del base
    free_memory()
    calibration = args.calibration_tokens or (32768 if DEVICE == "cuda" else 256)
    calibrate_routers(model, args.routed, calibration)
    log("L2A model converted, routers calibrated")
    with torch.no_grad():
        model(warm, use_cache=True, logits_to_keep=1)
    for variant in ("l2a", "local_only"):
        if variant in args.variants:
            model.config.force_route = "none" if variant == "local_only" else None
            measure_variant(variant, model, args, emit)
    model.config.force_route = None
    plot(rows, args.out / f"tpot_{args.shape}.png", f"{env['gpu']}, {args.shape} shape, {env['date']}")
    print_table(rows)


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Bar chart of TPOT per batch x prompt, one group per mode, bars dense / L2A / local-only."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    index = {(r["batch"], r["prompt"], r["variant"]): r for r in rows}
    configs = sorted({k[:2] for k in index if any(f"tpot_{m}_ms" in index[k] for m in ("eager", "graph"))})
    if not configs:
        return
    modes = ("eager", "graph", "compiled")
    fig, axes = plt.subplots(1, len(configs), figsize=(4 * len(configs), 3.6), squeeze=False)
    for ax, (b, n) in zip(axes[0], configs, strict=True):
        for j, variant in enumerate(VARIANTS):
            r = index.get((b, n, variant), {})
            values = [r.get(f"tpot_{m}_ms", float("nan")) for m in modes]
            ax.bar([i + 0.27 * (j - 1) for i in range(len(modes))], values, width=0.27, label=variant)
        ax.set_xticks(range(len(modes)), modes)
        ax.set_yscale("log")
        ax.set_title(f"batch {b}, {n // 1024}K prompt")
        ax.set_ylabel("ms per output token")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_table(rows: list[dict]) -> None:
    def cell(r: dict | None, key: str, scale: float = 1.0, digits: int = 1) -> str:
        return "-" if r is None or r.get(key) is None else f"{r[key] * scale:.{digits}f}"

    def ratio(a: dict | None, b: dict | None, key: str) -> str:
        if a is None or b is None or a.get(key) is None or b.get(key) is None:
            return "-"
        return f"{a[key] / b[key]:.2f}"

    index = {(r["batch"], r["prompt"], r["variant"]): r for r in rows}
    head = ["B", "prompt", "TTFT s dense / L2A / local", "dense/L2A"]
    for mode in ("eager", "graph", "compiled"):
        head += [f"TPOT {mode} ms dense / L2A / local", "L2A/dense", "L2A/local"]
    head += ["routed % prefill / decode", "errors"]
    print("| " + " | ".join(head) + " |\n" + "|---" * len(head) + "|")
    for b, n in sorted({k[:2] for k in index}):
        trio = [index.get((b, n, v)) for v in VARIANTS]
        d, x, lo = trio
        cells = [str(b), f"{n // 1024}K", " / ".join(cell(r, "ttft_s", digits=2) for r in trio)]
        cells.append(ratio(d, x, "ttft_s"))
        for mode in ("eager", "graph", "compiled"):
            key = f"tpot_{mode}_ms"
            cells += [" / ".join(cell(r, key) for r in trio), ratio(x, d, key), ratio(x, lo, key)]
        decode = [
            f"{x[k] * 100:.1f}" for k in ("routed_decode_compiled", "routed_decode_eager") if x and k in x
        ]
        decode = decode[0] if decode else "-"
        cells.append(f"{cell(x, 'routed_prefill', 100)} / {decode}")
        errors = [f"{r['variant']}: {k}={v}" for r in trio if r for k, v in r.items() if k.endswith("error")]
        cells.append("; ".join(errors))
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
