"""`l2a train CONFIG [--set key=value ...]`: train a converted L2A model from a YAML/TOML recipe.

Several GPUs: `torchrun --nproc-per-node N -m l2a train CONFIG --set parallel=fsdp`.
"""

from __future__ import annotations

import argparse
import inspect
import random
from typing import Any

from l2a.cli._common import UsageError, check_corpus, check_device, check_model_path


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
    check_inputs(config)
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


def check_inputs(config: Any) -> None:
    """What can be checked before the model loads: paths, device, corpus, the model's context length,
    the task and its length, an explicit resume checkpoint. Fixes up `~` in the paths."""
    if config.model is None:
        raise UsageError(
            "the config names no model: set `model:` or --set model=DIR (a dir from `l2a convert`)"
        )
    config.model = check_model_path(config.model, "model")
    if config.data.tokenizer not in (None, "byte"):
        config.data.tokenizer = check_model_path(config.data.tokenizer, "data.tokenizer")
    check_device(config.device, "device")
    check_corpus(config.data.sources, "data.sources")
    _check_context_length(config)
    if config.data.task is not None:
        _check_task(config)
    if config.checkpoint.resume not in (None, "auto"):
        from l2a.training.checkpoint import check_checkpoint

        check_checkpoint(check_model_path(config.checkpoint.resume, "checkpoint.resume"))


def _check_context_length(config: Any) -> None:
    from transformers import AutoConfig

    import l2a.models  # noqa: F401  (registers model_type "l2a")

    model_max = getattr(AutoConfig.from_pretrained(config.model), "max_position_embeddings", None)
    limit = config.max_position_embeddings or model_max
    if limit is not None and config.data.seq_len > limit:
        source = (
            "max_position_embeddings" if config.max_position_embeddings else f"the model's ({config.model})"
        )
        raise UsageError(
            f"data.seq_len={config.data.seq_len} exceeds {source} max_position_embeddings={limit}; "
            "lower data.seq_len or extend the context (max_position_embeddings, rope_theta)"
        )


def _check_task(config: Any) -> None:
    """The task exists, takes its arguments, and fits the shortest length the data stream asks for."""
    from l2a.data import MixedDataset, load_tokenizer
    from l2a.data.tasks import TASKS
    from l2a.evaluation.tasks import build_task
    from l2a.training.config import did_you_mean

    data = config.data
    if data.task not in TASKS:
        hint = did_you_mean(data.task, TASKS)
        raise UsageError(f"unknown data.task {data.task!r}{hint} (known tasks: {', '.join(TASKS)})")
    task = build_task(data.task, data.task_kwargs)
    reserve = inspect.signature(MixedDataset).parameters["answer_reserve"].default
    if data.seq_len <= reserve:
        raise UsageError(
            f"data.seq_len={data.seq_len} is too short for data.task {data.task!r}: "
            f"{reserve} tokens of each sequence are kept for the answer"
        )
    shortest = data.seq_len - reserve
    if data.task_min_length is not None:
        shortest = min(shortest, data.task_min_length)
    tokenizer = load_tokenizer(data.tokenizer or config.model)
    try:
        task.sample(tokenizer, shortest, random.Random(config.seed))
    except ValueError as error:
        setting = "task_min_length" if shortest == data.task_min_length else "seq_len"
        value = getattr(data, setting)
        raise UsageError(f"data.{setting}={value} is too short for data.task ({error})") from None
