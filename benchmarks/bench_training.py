"""Training throughput on a GPU: learned routing (after sparsity settles) against force_route="all".

One randomly initialised Qwen3-architecture model (no downloads on the GPU machine) is converted to L2A
(window 4096). Phase 1 trains only the routers with a strong regulariser until the mean sparsity reaches
`--target-sparsity` (the "settled" state; random tokens give global attention nothing to win, so the
regulariser alone decides how far it goes, and we stop at the target). Phase 2 runs the library trainer
(`l2a.training.train`, bf16 autocast, the paper's trainable groups) for `--steps` steps on the same model
twice: with the learned routers (λ = 0, lr ≈ 0 so the routing stays where it settled, no leakage steps)
and with `force_route="all"`. Reported: median tokens/s over the steps after warm-up, and the sparsity
measured during those steps.

    python benchmarks/bench_training.py --seq-lens 16384,32768 --out runs/bench_training

`--mode dense`: L2A against the dense HF model (SDPA) with the same settings in the same run: a Qwen2.5-1.5B
shape (random weights, built on the GPU), all parameters trainable, bf16 autocast, activation checkpointing,
the fused LM loss for both; L2A with fixed random token-wise routing (a fraction `--sparsity` of the tokens
skips global attention, a fresh mask per layer). Reported: step time (median after one warm-up step) and
peak memory of each.

    python benchmarks/bench_training.py --mode dense --seq-lens 65536,131072 --out runs/bench_dense

`--models` picks the models of that comparison (also `dense-fused`, the dense model with the L2A layers'
fused norm/RoPE/SwiGLU kernels, and the `l2a-local` / `l2a-all` variants); `--profile` records each model's
last step with the torch profiler (CUDA time by op and by op and shapes, GPU idle gaps) in `--out`.

`--mode recipe`: one or more steps of a training recipe (`--config`, e.g. configs/qwen3-8b-128k.yaml) through
`l2a.training.train`, on a Qwen3-8B-shaped L2A model with random weights built on the GPU in bf16 (trainable
parameters then cast to fp32 masters), on random packed documents of `data.seq_len` tokens: peak memory and
tokens/s per step.

    python benchmarks/bench_training.py --mode recipe --config configs/qwen3-8b-128k.yaml --steps 2
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from pathlib import Path

import torch
import transformers

import l2a
from l2a.layers.common import GatedMLP, RMSNorm, apply_rotary
from l2a.layers.router import RoutingDecision
from l2a.models.conversion import l2a_config_from_base
from l2a.training import CheckpointConfig, LoggingConfig, OptimConfig, RouterConfig, TrainConfig, train
from l2a.training.config import load_config
from l2a.training.params import set_trainable


def build_model(args: argparse.Namespace) -> l2a.L2AForCausalLM:
    base_config = transformers.Qwen3Config(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=3 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=128,
        max_position_embeddings=131072,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    base = transformers.Qwen3ForCausalLM(base_config)
    return l2a.convert_model(base, sliding_window=args.window)


def random_batches(n: int, seq_len: int, vocab: int, seed: int) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, vocab, (1, seq_len), generator=gen)} for _ in range(n)]


def settle_routers(model: l2a.L2AForCausalLM, seq_len: int, args: argparse.Namespace) -> float:
    """Train the routers alone until the mean sparsity reaches the target; returns the sparsity reached."""
    model.to(args.device).train()
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith("router.weight"))
    routers = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(routers, lr=args.settle_lr)
    sparsity = 0.0
    for step, batch in enumerate(random_batches(args.settle_steps, seq_len, args.vocab, seed=1)):
        with torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.device == "cuda"):
            out = model(input_ids=batch["input_ids"].to(args.device), global_leakage=True)
        loss = args.settle_lambda * out.router_regularizer
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sparsity = float(1 - out.router_fraction.mean())
        print(f"  settle step {step}: sparsity {sparsity:.3f}", flush=True)
        if sparsity >= args.target_sparsity:
            break
    for p in model.parameters():
        p.requires_grad_(False)
    return sparsity


def run_phase(model, seq_len: int, args: argparse.Namespace, out_dir: Path) -> dict:
    records: list[dict] = []
    config = TrainConfig(
        output_dir=str(out_dir),
        steps=args.steps,
        optim=OptimConfig(lr=1e-12, warmup_steps=0, lr_schedule="constant"),
        router=RouterConfig(regularizer_weight=0.0, regularizer_schedule="constant", leakage_probability=0.0),
        logging=LoggingConfig(every=1, progress_bar=False, jsonl=True),
        checkpoint=CheckpointConfig(every=0, save_final=False),
        gradient_checkpointing=args.gradient_checkpointing,
    )
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    train(
        model,
        None,
        config,
        data=random_batches(args.steps, seq_len, args.vocab, seed=2),
        on_log=records.append,
    )
    wall = time.perf_counter() - t0
    timed = records[args.warmup :]
    return {
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
        "sparsity": statistics.mean(r["sparsity"] for r in timed),
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else float("nan"),
        "steps": len(records),
        "wall_s": wall,
    }


class FixedRouting(torch.nn.Module):
    """Wraps a router: the hard decision is a fixed mask `routed` (1, N); the gate's gradient still flows
    through the router's soft output (straight-through), as in training."""

    def __init__(self, router: torch.nn.Module, routed: torch.Tensor):
        super().__init__()
        self.router = router
        self.register_buffer("routed", routed, persistent=False)

    def forward(self, hidden_states: torch.Tensor, force=None, random_fraction=None) -> RoutingDecision:
        decision = self.router(hidden_states, force, random_fraction)
        hard = self.routed[:, : hidden_states.shape[1]].expand_as(decision.hard)
        gate = hard.to(hidden_states.dtype) + (decision.soft - decision.soft.detach()).to(hidden_states.dtype)
        return RoutingDecision(soft=decision.soft, hard=hard, gate=gate)


def use_l2a_elementwise_kernels(model: transformers.Qwen2ForCausalLM) -> None:
    """The dense model with the elementwise work of the L2A layers: its decoder norms, MLPs and final norm
    replaced by l2a's modules (fused RMSNorm writing the autocast dtype into linears, gate/up as one GEMM,
    fused SwiGLU; same weights), for a dense reference with equal non-attention kernels. RoPE: see
    `l2a_rope_in_qwen2`."""
    for layer in model.model.layers:
        for name in ("input_layernorm", "post_attention_layernorm"):
            old = getattr(layer, name)
            norm = RMSNorm(old.weight.numel(), eps=old.variance_epsilon, feeds_linear=True)
            norm.load_state_dict(old.state_dict())
            setattr(layer, name, norm.to(old.weight.device, old.weight.dtype))
        old = layer.mlp
        mlp = GatedMLP(old.hidden_size, old.intermediate_size, model.config.hidden_act)
        mlp.load_state_dict(old.state_dict())
        layer.mlp = mlp.to(old.down_proj.weight.device, old.down_proj.weight.dtype)
    old = model.model.norm
    norm = RMSNorm(old.weight.numel(), eps=old.variance_epsilon)
    norm.load_state_dict(old.state_dict())
    model.model.norm = norm.to(old.weight.device, old.weight.dtype)


@contextlib.contextmanager
def l2a_rope_in_qwen2():
    """Within the block HF Qwen2 attention applies RoPE with l2a's fused kernel (the L2A layers' RoPE)."""
    from transformers.models.qwen2 import modeling_qwen2

    def rope(q, k, cos, sin, unsqueeze_dim=1):
        # HF layout (B, H, N, D) -> the ops layout (B, N, H, D) as views, and back
        return tuple(apply_rotary(t.transpose(1, 2), cos, sin).transpose(1, 2) for t in (q, k))

    saved = modeling_qwen2.apply_rotary_pos_emb
    modeling_qwen2.apply_rotary_pos_emb = rope
    try:
        yield
    finally:
        modeling_qwen2.apply_rotary_pos_emb = saved


def qwen25_15b_config(vocab: int) -> transformers.Qwen2Config:
    return transformers.Qwen2Config(
        vocab_size=vocab,
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        max_position_embeddings=131072,
        tie_word_embeddings=True,
        rope_theta=1e6,
    )


def qwen3_8b_config() -> transformers.Qwen3Config:
    return transformers.Qwen3Config(
        vocab_size=151936,
        hidden_size=4096,
        intermediate_size=12288,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=40960,
        tie_word_embeddings=False,
    )


def _build_on_gpu(cls, config, dtype: torch.dtype = torch.bfloat16):
    """Random weights initialised on the GPU (HF's init on the CPU takes minutes for billions of weights)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("cuda"):
            torch.manual_seed(0)
            return cls(config)
    finally:
        torch.set_default_dtype(previous)


def _timed_train(
    model, config: TrainConfig, data: list[dict], warmup: int, profile_to: Path | None = None
) -> dict:
    """Train on `data` (one step per batch); profile_to: record the last step with the torch profiler and
    write its CUDA time breakdown there (`_write_profile`)."""
    records: list[dict] = []
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    if profile_to is None:
        train(model, None, config, data=data, on_log=records.append)
    else:
        steps = len(data) // config.grad_accum_steps
        schedule = torch.profiler.schedule(wait=max(steps - 2, 0), warmup=1 if steps > 1 else 0, active=1)
        activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        tokens = data[0]["input_ids"].numel() * config.grad_accum_steps

        def write(prof: torch.profiler.profile) -> None:  # the active step's events, before they are cleared
            _write_profile(prof, profile_to, tokens / records[-1]["tokens_per_s"])

        with torch.profiler.profile(
            activities=activities, schedule=schedule, record_shapes=True, on_trace_ready=write
        ) as prof:

            def on_log(record: dict) -> None:
                records.append(record)
                torch.cuda.synchronize()
                prof.step()

            train(model, None, config, data=data, on_log=on_log)
    torch.cuda.synchronize()
    timed = records[warmup:] or records
    tokens = data[0]["input_ids"].numel() * config.grad_accum_steps
    return {
        "step_s": statistics.median(tokens / r["tokens_per_s"] for r in timed),
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
        "per_step": [
            {k: r.get(k) for k in ("step", "lm_loss", "tokens_per_s", "sparsity", "loss_impl")}
            for r in records
        ],
    }


def _write_profile(prof: torch.profiler.profile, path: Path, step_s: float) -> None:
    """CUDA time of the profiled step by op (self time, so nothing is counted twice), by op and input shapes
    (which GEMM is which), and the sum of kernel time against the step's wall time (GPU idle = the rest)."""
    by_op = prof.key_averages()
    kernels = sorted(
        (
            e
            for e in prof.events()
            if e.device_type == torch.autograd.DeviceType.CUDA and not e.is_user_annotation
        ),
        key=lambda e: e.time_range.start,
    )
    kernel_s = sum(e.time_range.elapsed_us() for e in kernels) / 1e6
    # GPU idle: gaps between consecutive kernels, charged to the kernel that ends the gap
    gaps: dict[str, float] = {}
    busy_until = kernels[0].time_range.end if kernels else 0
    for e in kernels[1:]:
        gap = e.time_range.start - busy_until
        if gap > 20:  # µs; shorter gaps are launch spacing
            key = f"{e.name[:70]} (after {e.cpu_parent.name[:40] if e.cpu_parent else '?'})"
            gaps[key] = gaps.get(key, 0.0) + gap
        busy_until = max(busy_until, e.time_range.end)
    span_s = (busy_until - kernels[0].time_range.start) / 1e6 if kernels else 0.0
    lines = [
        f"step wall {step_s:.3f} s (under the profiler), kernel span {span_s:.3f} s, CUDA kernel time "
        f"{kernel_s:.3f} s, GPU idle gaps > 20 us {sum(gaps.values()) / 1e6:.3f} s",
        "",
        "largest idle gaps by the kernel that ends them (ms):",
        *(f"  {t / 1e3:9.2f}  {k}" for k, t in sorted(gaps.items(), key=lambda kv: -kv[1])[:25]),
        "",
        by_op.table(sort_by="self_device_time_total", row_limit=60, max_name_column_width=70),
        prof.key_averages(group_by_input_shape=True).table(
            sort_by="self_device_time_total",
            row_limit=80,
            max_name_column_width=60,
            max_shapes_column_width=90,
        ),
    ]
    path.write_text("\n".join(lines))
    print(lines[0], flush=True)


def run_dense_comparison(args: argparse.Namespace, out: Path) -> list[dict]:
    rows = []
    for seq_len in (int(s) for s in args.seq_lens.split(",")):
        config = TrainConfig(
            output_dir=str(out / f"run-{seq_len}"),
            steps=args.steps,
            trainable=["*"],
            precision="bf16",
            gradient_checkpointing=True,
            optim=OptimConfig(lr=1e-6, lr_schedule="constant"),
            router=RouterConfig(regularizer_weight=0.0, leakage_probability=0.0),
            logging=LoggingConfig(every=1, progress_bar=False, jsonl=False),
            checkpoint=CheckpointConfig(save_final=False),
        )
        data = random_batches(args.steps, seq_len, args.vocab, seed=2)
        row: dict = {"seq_len": seq_len}
        for name in args.models.split(","):
            base = _build_on_gpu(transformers.Qwen2ForCausalLM, qwen25_15b_config(args.vocab))
            base.config._attn_implementation = "sdpa"
            if name.startswith("l2a"):
                model = l2a.convert_model(base, sliding_window=args.window)
                del base
                if name == "l2a":
                    gen = torch.Generator(device="cuda").manual_seed(0)
                    for layer in model.model.layers:
                        routed = torch.rand(1, seq_len, device="cuda", generator=gen) >= args.sparsity
                        layer.router = FixedRouting(layer.router, routed)
                else:
                    model.config.force_route = "none" if name == "l2a-local" else "all"
            else:
                model = base
                if name == "dense-fused":
                    use_l2a_elementwise_kernels(model)
            model.float()  # fp32 master weights under bf16 autocast, as `l2a train` loads them
            profile_to = out / f"profile-{name}-{seq_len}.txt" if args.profile else None
            with l2a_rope_in_qwen2() if name == "dense-fused" else contextlib.nullcontext():
                row[name] = _timed_train(model, config, data, warmup=1, profile_to=profile_to)
            print(
                f"  N={seq_len} {name}: {row[name]['step_s']:.2f} s/step, "
                f"{row[name]['peak_mem_gib']:.1f} GiB",
                flush=True,
            )
            del model
            torch.cuda.empty_cache()
        rows.append(row)
    names = args.models.split(",")
    print(
        "| N | "
        + " | ".join(f"{m} step" for m in names)
        + " | dense[-fused] / l2a | peak GiB "
        + " / ".join(names)
        + " |"
    )
    print("|---" * (len(names) + 3) + "|")
    for r in rows:
        speedup = " / ".join(
            f"{r[d]['step_s'] / r['l2a']['step_s']:.2f}x"
            for d in ("dense", "dense-fused")
            if d in r and "l2a" in r
        )
        steps = " | ".join(f"{r[m]['step_s']:.2f} s" for m in names)
        peaks = " / ".join(f"{r[m]['peak_mem_gib']:.1f}" for m in names)
        print(f"| {r['seq_len']} | {steps} | {speedup} | {peaks} |")
    return rows


def packed_documents(n: int, seq_len: int, vocab: int, docs: int, seed: int) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        cuts = torch.randperm(seq_len - 1, generator=gen)[: docs - 1].add(1).sort().values
        out.append(
            {
                "input_ids": torch.randint(0, vocab, (1, seq_len), generator=gen),
                "cu_seqlens": torch.cat([torch.tensor([0]), cuts, torch.tensor([seq_len])]).to(torch.int32),
            }
        )
    return out


def run_recipe(args: argparse.Namespace, out: Path) -> dict:
    config = load_config(
        args.config,
        [
            f"steps={args.steps}",
            f"output_dir={out / 'recipe'}",
            "checkpoint.resume=null",
            "checkpoint.save_final=false",
            "logging.every=1",
            "logging.tensorboard=false",
            "logging.progress_bar=false",
            "optim.warmup_steps=0",
            *args.set,
        ],
    )
    l2a_config = l2a_config_from_base(
        qwen3_8b_config(), sliding_window=4095, rope_theta=5e6, max_position_embeddings=131072
    )
    model = _build_on_gpu(l2a.L2AForCausalLM, l2a_config)
    set_trainable(model, config.trainable)
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.float()  # fp32 masters of the trained weights
    print(f"  model built: {torch.cuda.memory_allocated() / 2**30:.1f} GiB", flush=True)
    micro = args.steps * config.grad_accum_steps
    data = packed_documents(micro, config.data.seq_len, l2a_config.vocab_size, docs=4, seed=3)
    result = _timed_train(model, config, data, warmup=1 if args.steps > 1 else 0)
    result["config"] = config.to_dict()
    print(
        f"| {config.data.seq_len} tokens | {result['step_s']:.1f} s/step | "
        f"{result['tokens_per_s']:,.0f} tokens/s | peak {result['peak_mem_gib']:.1f} GiB | "
        f"loss {result['per_step'][0]['loss_impl']} |"
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["learned", "dense", "recipe"], default="learned")
    parser.add_argument(
        "--sparsity", type=float, default=0.9, help="dense mode: fraction of tokens not routed"
    )
    parser.add_argument(
        "--models",
        default="dense,l2a",
        help="dense mode: comma list of dense, dense-fused (dense with the L2A layers' norm/RoPE/SwiGLU "
        "kernels), l2a (fixed random routing), l2a-local (force_route=none), l2a-all (force_route=all)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="dense mode: record each model's last step with the torch profiler (--out/profile-MODEL-N.txt)",
    )
    parser.add_argument("--config", default="configs/qwen3-8b-128k.yaml", help="recipe mode: the recipe")
    parser.add_argument("--set", action="append", default=[], help="recipe mode: config override KEY=VALUE")
    parser.add_argument("--seq-lens", default="16384,32768")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--window", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--target-sparsity", type=float, default=0.85)
    parser.add_argument("--settle-steps", type=int, default=200)
    parser.add_argument("--settle-lr", type=float, default=2e-5)
    parser.add_argument("--settle-lambda", type=float, default=1e-2)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--out", default="runs/bench_training")
    parser.add_argument("--device", default="cuda", help="cuda; cpu only as a smoke test of the script")
    args = parser.parse_args()
    unknown = sorted(set(args.models.split(",")) - {"dense", "dense-fused", "l2a", "l2a-local", "l2a-all"})
    if unknown:
        parser.error(
            f"--models: unknown model(s) {unknown}; choose from dense, dense-fused, l2a, l2a-local, l2a-all"
        )
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_training.py needs a CUDA device (--device cpu only smoke-tests the script)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "args": vars(args),
    }
    if args.mode != "learned":
        print(f"{meta['device']}, torch {meta['torch']}, transformers {meta['transformers']}, {meta['date']}")
        result = run_dense_comparison(args, out) if args.mode == "dense" else run_recipe(args, out)
        (out / f"bench_training_{args.mode}.json").write_text(
            json.dumps({"meta": meta, "result": result}, indent=2)
        )
        return
    rows = []
    for seq_len in (int(s) for s in args.seq_lens.split(",")):
        model = build_model(args)
        settled = settle_routers(model, seq_len, args)
        learned = run_phase(model, seq_len, args, out / f"learned-{seq_len}")
        model.config.force_route = "all"
        dense = run_phase(model, seq_len, args, out / f"all-{seq_len}")
        rows.append(
            {"seq_len": seq_len, "settled_sparsity": settled, "learned": learned, "all_global": dense}
        )
        del model
        if args.device == "cuda":
            torch.cuda.empty_cache()
    (out / "bench_training.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"\n{meta['device']}, torch {meta['torch']}, transformers {meta['transformers']}, {meta['date']}")
    print("| seq len | sparsity | learned tok/s | all-global tok/s | speed-up | peak GiB (learned / all) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        lt, dt = r["learned"]["tokens_per_s"], r["all_global"]["tokens_per_s"]
        print(
            f"| {r['seq_len']} | {r['learned']['sparsity']:.3f} | {lt:,.0f} | {dt:,.0f} | {lt / dt:.2f}x | "
            f"{r['learned']['peak_mem_gib']:.1f} / {r['all_global']['peak_mem_gib']:.1f} |"
        )


if __name__ == "__main__":
    main()
