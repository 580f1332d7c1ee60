"""`l2a prune MODEL_DIR OUT_DIR (--layers I [I ...] | --threshold T --fractions F [F ...])`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "prune",
        help="turn chosen layers of an L2A model into local-only layers",
        description="Drop the router, global projections and global KV cache of some layers: either "
        "the given --layers, or the global layers whose measured routed fraction (--fractions, one per "
        "global layer in config order) is below --threshold.",
    )
    parser.add_argument("model_dir", help="L2A checkpoint directory")
    parser.add_argument("out_dir", help="output directory (must be empty or absent unless --force)")
    choice = parser.add_mutually_exclusive_group(required=True)
    choice.add_argument("--layers", type=int, nargs="+", help="indices of the layers to prune")
    choice.add_argument("--threshold", type=float, help="prune global layers with routed fraction below this")
    parser.add_argument("--fractions", type=float, nargs="+", help="routed fraction of each global layer")
    parser.add_argument("--force", action="store_true", help="write into a non-empty output directory")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from transformers import AutoModelForCausalLM

    import l2a  # noqa: F401  (registers the Auto classes)
    from l2a.models import prune_global_layers

    model_dir, out_dir = Path(args.model_dir), Path(args.out_dir)
    try:
        if not (model_dir / "config.json").is_file():
            raise FileNotFoundError(f"no config.json in model directory {str(model_dir)!r}")
        if out_dir.resolve() == model_dir.resolve():
            raise ValueError(
                f"output directory {str(out_dir)!r} is the input model; refusing to overwrite it"
            )
        if out_dir.is_dir() and any(out_dir.iterdir()) and not args.force:
            raise FileExistsError(
                f"output directory {str(out_dir)!r} is not empty (use --force to write into it)"
            )
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto")
        if model.config.model_type != "l2a":
            raise ValueError(
                f"{str(model_dir)!r} holds a {model.config.model_type!r} model, not an L2A model"
            )
        pruned = prune_global_layers(model, args.layers, threshold=args.threshold, fractions=args.fractions)
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"l2a prune: error: {err}", file=sys.stderr)
        return 2
    model.save_pretrained(out_dir)
    print(f"pruned layers {pruned}; global layers now {model.config.global_layers}; saved to {out_dir}")
    return 0
