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
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import transformers

import l2a
from l2a.training import CheckpointConfig, LoggingConfig, OptimConfig, RouterConfig, TrainConfig, train


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_training.py needs a CUDA device (--device cpu only smoke-tests the script)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
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
    meta = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "args": vars(args),
    }
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
