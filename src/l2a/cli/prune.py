"""`l2a prune MODEL_DIR OUT_DIR (--layers I [I ...] | --threshold T --fractions F [F ...])`."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from l2a.cli._common import UsageError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "prune",
        help="turn chosen layers of an L2A model into local-only layers",
        description="Drop the router, global projections and global KV cache of some layers: either "
        "the given --layers, or the global layers whose measured routed fraction (--fractions, one per "
        "global layer in config order) is below --threshold. The tokenizer files and generation config "
        "are copied along.",
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
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    import l2a.models  # noqa: F401  (registers the Auto classes)
    from l2a.models import prune_global_layers
    from l2a.models.conversion import TOKENIZER_FILES

    model_dir, out_dir = Path(args.model_dir), Path(args.out_dir)
    if not (model_dir / "config.json").is_file():
        raise UsageError(f"no config.json in model directory {str(model_dir)!r}")
    if out_dir.resolve() == model_dir.resolve():
        raise UsageError(f"output directory {str(out_dir)!r} is the input model; refusing to overwrite it")
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"output path {str(out_dir)!r} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not args.force:
        raise UsageError(f"output directory {str(out_dir)!r} is not empty (use --force to write into it)")
    model_type = AutoConfig.from_pretrained(model_dir).model_type
    if model_type != "l2a":
        raise UsageError(f"{str(model_dir)!r} holds a {model_type!r} model, not an L2A model")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto")
    pruned = prune_global_layers(model, args.layers, threshold=args.threshold, fractions=args.fractions)
    if (model_dir / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(model_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    for name in TOKENIZER_FILES:
        if (model_dir / name).is_file():
            shutil.copy2(model_dir / name, out_dir / name)
    print(f"pruned layers {pruned}; global layers now {model.config.global_layers}; saved to {out_dir}")
    return 0
