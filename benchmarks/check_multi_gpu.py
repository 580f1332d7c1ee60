"""Equivalence of multi-GPU training with single-GPU gradient accumulation, through `l2a train` and torchrun.

Builds a small Qwen3-architecture model (random weights, no downloads), converts it to L2A, then trains it
from the same start with `configs/tiny-cpu.yaml` three ways: 1 process with `grad_accum_steps = world`, and
`world` processes under torchrun with `parallel=ddp` and `parallel=fsdp` (1 micro-step each): the same global
batch.
Prints the per-step LM loss of each run, the largest relative difference to the 1-process run, and writes
`OUT/multi_gpu.json`. On GPUs the runs use bf16; `--device cpu` runs the same check with gloo (a smoke test).

    python benchmarks/check_multi_gpu.py --world 2 --out runs/multi_gpu
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import transformers

import l2a


def build_model(path: Path, hidden: int, layers: int) -> None:
    config = transformers.Qwen3Config(
        vocab_size=512,
        hidden_size=hidden,
        intermediate_size=3 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=max(1, hidden // 256),
        head_dim=64,
        max_position_embeddings=4096,
    )
    torch.manual_seed(0)
    l2a.convert_model(transformers.Qwen3ForCausalLM(config), sliding_window=64).save_pretrained(path)


def train_run(name: str, world: int, args: argparse.Namespace, model: Path) -> list[dict]:
    out = args.out / name
    overrides = {
        "model": model,
        "output_dir": out,
        "steps": args.steps,
        "device": "cpu" if args.device == "cpu" else "cuda",
        "precision": "fp32" if args.device == "cpu" else "bf16",
        "parallel": "none" if name == "single" else name,
        "grad_accum_steps": args.world // world,
        "data.seq_len": args.seq_len,
        "logging.every": 1,
        "logging.progress_bar": "false",
    }
    sets = [arg for key, value in overrides.items() for arg in ("--set", f"{key}={value}")]
    if world == 1:
        cmd = [sys.executable, "-m", "l2a", "train", "configs/tiny-cpu.yaml", *sets]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world),
               "-m", "l2a", "train", "configs/tiny-cpu.yaml", *sets]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{name} run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=2, help="processes (GPUs) of the parallel runs")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--out", type=Path, default=Path("runs/multi_gpu"))
    args = parser.parse_args()
    if args.device == "cuda" and torch.cuda.device_count() < args.world:
        raise SystemExit(f"--world {args.world} needs {args.world} GPUs, found {torch.cuda.device_count()}")
    if args.out.exists() and any(args.out.iterdir()):
        raise SystemExit(f"{args.out} is not empty; give a new --out")
    args.out.mkdir(parents=True, exist_ok=True)
    model = args.out / "model"
    build_model(model, args.hidden, args.layers)
    runs = {name: train_run(name, world, args, model) for name, world in
            (("single", 1), ("ddp", args.world), ("fsdp", args.world))}  # fmt: skip
    ref = [r["lm_loss"] for r in runs["single"]]
    report = {"args": {k: str(v) for k, v in vars(args).items()}, "torch": torch.__version__, "runs": {}}
    print(f"{'step':>4} " + " ".join(f"{name:>10}" for name in runs))
    for i in range(len(ref)):
        print(f"{runs['single'][i]['step']:>4} " + " ".join(f"{runs[n][i]['lm_loss']:>10.5f}" for n in runs))
    for name, history in runs.items():
        losses = [r["lm_loss"] for r in history]
        rel = max(abs(a - b) / abs(b) for a, b in zip(losses, ref))
        report["runs"][name] = {"lm_loss": losses, "max_rel_diff_to_single": rel}
        print(f"{name}: max relative LM-loss difference to 1 process = {rel:.2e}")
    (args.out / "multi_gpu.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
