"""`l2a eval`: long-context tasks, perplexity by position, routing and speed for one or more models."""

from __future__ import annotations

import argparse
import importlib

from l2a.cli._common import check_corpus, check_model_path, prepare_output_dir

OUTPUTS = ("results.json", "results.md", "*.png")
"""What `write_report` puts into --out (removed first with --force, so no plot of an earlier run survives)."""


def _arg(module: str, name: str):
    """Argument type calling `module.name` (imported when parsing, not when building the parser), so that
    its ValueError message reaches argparse's usage error."""

    def convert(text: str):
        parse = getattr(importlib.import_module(module), name)
        try:
            return parse(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    convert.__name__ = name  # argparse names the type in "invalid <name> value"
    return convert


parse_length = _arg("l2a.evaluation.common", "parse_length")
parse_lengths = _arg("l2a.evaluation.common", "parse_lengths")
parse_task_arg = _arg("l2a.evaluation.tasks", "parse_task_arg")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="evaluate models: RULER-style tasks, perplexity by position, routing, speed/memory",
        description=(
            "Evaluate one or more models (L2A checkpoints or plain HF causal LMs) and write results.json, "
            "results.md and PNG plots to --out."
        ),
    )
    parser.add_argument("models", nargs="+", metavar="MODEL", help="model directories")
    parser.add_argument("--tasks", default="", help="comma-separated task names, e.g. niah_single_1,vt")
    parser.add_argument(
        "--task-arg",
        action="append",
        type=parse_task_arg,
        default=[],
        metavar="TASK.KEY=VALUE",
        dest="task_args",
        help="override a task's default, e.g. kv_retrieval.key_chars=2 (repeatable; TASK must be in --tasks)",
    )
    parser.add_argument(
        "--lengths",
        type=parse_lengths,
        default=[],
        help="comma-separated prompt lengths, e.g. 4k,8k,16k",
    )
    parser.add_argument("--samples", type=int, default=10, help="prompts per task and length (default 10)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out",
        default="runs/eval",
        help="output directory (default runs/eval); must be empty unless --force",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="write into a non-empty --out, first deleting its results.json, results.md and *.png",
    )
    routing = parser.add_mutually_exclusive_group()
    routing.add_argument(
        "--variants",
        default="l2a",
        help="routing variants of L2A/AHA models: l2a or learned (the learned routing), local_only, "
        "all_global (dense reference)",
    )
    routing.add_argument(
        "--force-route",
        choices=["all", "none"],
        help="evaluate L2A models with config.force_route set (same as --variants all_global / local_only)",
    )
    parser.add_argument("--tokenizer", help="tokenizer path or 'byte' (default: the model directory)")
    parser.add_argument("--perplexity", action="store_true", help="perplexity by position on held-out text")
    parser.add_argument(
        "--ppl-data", default="stdlib", help="corpus for perplexity and routing texts (default stdlib)"
    )
    parser.add_argument(
        "--ppl-seq-len", type=parse_length, help="perplexity window (default: largest --lengths)"
    )
    parser.add_argument("--ppl-windows", type=int, default=8, help="windows for perplexity (default 8)")
    parser.add_argument(
        "--ppl-buckets", choices=["log", "linear"], default="log", help="position bucket spacing"
    )
    parser.add_argument("--no-routing", action="store_true", help="skip the routing analysis of L2A models")
    parser.add_argument(
        "--routing-texts", type=int, default=4, help="corpus documents in the routing analysis"
    )
    parser.add_argument(
        "--speed", action="store_true", help="prefill/decode speed, peak memory, KV-cache bytes"
    )
    parser.add_argument(
        "--speed-lengths",
        type=parse_lengths,
        default=[],
        help="lengths for --speed (default: --lengths)",
    )
    parser.add_argument(
        "--decode-tokens", type=int, default=32, help="decode steps timed per run (default 32)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per length (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per length")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    parser.add_argument(
        "--dtype", default="auto", help="auto (bfloat16 on cuda, float32 on cpu), float32, bfloat16, float16"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from l2a.evaluation.runner import (
        EvalSettings,
        check_settings,
        check_variants,
        resolve_device,
        resolve_dtype,
        run_evaluation,
    )

    if args.force_route is not None:
        variants = ["all_global" if args.force_route == "all" else "local_only"]
    else:
        variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    task_args: dict[str, dict] = {}
    for task, key, value in args.task_args:
        task_args.setdefault(task, {})[key] = value
    settings = EvalSettings(
        tasks=[t.strip() for t in args.tasks.split(",") if t.strip()],
        task_args=task_args,
        lengths=args.lengths,
        samples=args.samples,
        seed=args.seed,
        perplexity=args.perplexity,
        perplexity_data=args.ppl_data,
        perplexity_seq_len=args.ppl_seq_len,
        perplexity_windows=args.ppl_windows,
        perplexity_spacing=args.ppl_buckets,
        routing=not args.no_routing,
        routing_texts=args.routing_texts,
        speed=args.speed,
        speed_lengths=args.speed_lengths,
        decode_tokens=args.decode_tokens,
        repeats=args.repeats,
        warmup=args.warmup,
        progress=not args.no_progress,
    )
    models = [check_model_path(path, "model") for path in args.models]
    tokenizer = args.tokenizer
    if tokenizer not in (None, "byte"):
        tokenizer = check_model_path(tokenizer, "tokenizer")
    if settings.perplexity or (settings.routing and settings.routing_texts):
        check_corpus([settings.perplexity_data], "--ppl-data")
    check_variants(variants)
    resolve_dtype(args.dtype, resolve_device(args.device))
    check_settings(settings, tokenizer or models[0])
    prepare_output_dir(args.out, force=args.force, outputs=OUTPUTS)
    results = run_evaluation(
        models,
        settings,
        out_dir=args.out,
        variants=variants,
        tokenizer=tokenizer,
        device=args.device,
        dtype=args.dtype,
    )
    print(f"evaluated {len(results)} model(s); report in {args.out}/results.md")
    return 0
