"""`l2a convert BASE_DIR OUT_DIR --window W`: turn a Qwen2/Qwen3/Llama checkpoint into an L2A checkpoint."""

from __future__ import annotations

import argparse
import math

DTYPES = ("auto", "float32", "bfloat16", "float16")


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="convert a Qwen2/Qwen3/Llama checkpoint into an L2A model",
        description="Copy the base attention into a local (sliding-window) and a global branch per layer, "
        "add zero-initialised routers, and save the L2A model with the tokenizer files.",
    )
    parser.add_argument("base_dir", help="local base checkpoint directory (config.json + weights)")
    parser.add_argument("out_dir", help="output directory (must be empty or absent unless --force)")
    parser.add_argument("--window", type=_positive_int, required=True, help="local attention window (tokens)")
    parser.add_argument(
        "--rope-theta", type=_positive_float, default=None, help="override RoPE theta (e.g. 5e6)"
    )
    parser.add_argument(
        "--max-position-embeddings", type=_positive_int, default=None, help="override the maximum positions"
    )
    parser.add_argument("--dtype", choices=DTYPES, default="auto", help="weight dtype of the saved model")
    parser.add_argument("--force", action="store_true", help="write into a non-empty output directory")
    parser.add_argument(
        "--method",
        choices=("l2a", "aha"),
        default="l2a",
        help="l2a (default): local + routed global branch per layer; aha: the base attention with a per-head "
        "router choosing full or window attention (docs/aha.md)",
    )
    parser.add_argument(
        "--router-logit-offset",
        type=_finite_float,
        default=0.0,
        metavar="B",
        help="fixed number added to every router logit (default 0, the paper's: zero-initialised routers "
        "start on the threshold); > 0 starts them on the global side (docs/reproduction.md)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from l2a.models.conversion import convert_checkpoint

    out = convert_checkpoint(
        args.base_dir,
        args.out_dir,
        window=args.window,
        rope_theta=args.rope_theta,
        max_position_embeddings=args.max_position_embeddings,
        dtype=args.dtype,
        force=args.force,
        method=args.method,
        router_logit_offset=args.router_logit_offset,
    )
    print(f"saved {args.method.upper()} model to {out}")
    return 0
