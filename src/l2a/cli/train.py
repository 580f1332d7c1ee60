"""`l2a train CONFIG [--set key=value ...]`: train a converted L2A model from a YAML/TOML recipe.

Several GPUs: `torchrun --nproc-per-node N -m l2a train CONFIG --set parallel=fsdp`.
"""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train an L2A model (router regulariser, leakage steps, checkpoints)",
        description="Train a model directory made by `l2a convert` with the recipe in CONFIG (YAML or TOML). "
        "See docs/training.md for every key.",
    )
    parser.add_argument("config", help="recipe file (.yaml/.yml/.toml), e.g. configs/tiny-cpu.yaml")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, dotted for sections (repeatable): --set optim.lr=1e-4 --set steps=10",
    )
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from l2a.training import load_config, run_training

    config = load_config(args.config, args.overrides)
    result = run_training(config)
    if result.history:
        last = result.history[-1]
        summary = f"step {result.step}: lm_loss {last['lm_loss']:.4f}"
        if "sparsity" in last:
            summary += f", sparsity {last['sparsity']:.3f}"
        print(summary)
    if result.checkpoint is not None:
        print(f"checkpoint: {result.checkpoint}")
    if result.data_exhausted:
        print(f"data ran out after {result.step} of {config.steps} steps")
    return 0
