"""`l2a demo [--out DIR] [--seed N] [--quick] [--device D] [--set KEY=VALUE ...]`: the embedded demo
(see `l2a.demo`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from l2a.cli._common import UsageError, prepare_output_dir

OUTPUTS = ("report.json", "*.png", "model", "base", "pretrain", "routed")
"""What `run_demo` writes into --out (removed first with --force, so nothing of an earlier run survives)."""
AHA_OUTPUTS = (*OUTPUTS, "long_tail")
"""What `l2a.demo_aha.run_aha_demo` writes into --out."""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="train a tiny model, convert it to L2A, route it and evaluate retrieval (CPU, minutes)",
        description="Convert a tiny pretrained Qwen3-style model (embedded in the package, or pretrained "
        "here with --base scratch on the Python standard library's sources mixed with a key-value "
        "retrieval task) to L2A, train its routers, and compare beyond-window retrieval of the learned "
        "routing with local-only and all-global routing and with the dense model. "
        "Writes DIR/report.json, DIR/routing.png and the trained models DIR/model (L2A) and DIR/base "
        "(full attention, before conversion).",
    )
    parser.add_argument(
        "--out",
        default="runs/demo",
        metavar="DIR",
        help="output directory (default: runs/demo); must be empty unless --force",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="write into a non-empty DIR, first deleting an earlier run's " + ", ".join(OUTPUTS),
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of initialisation, data and leakage draws")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a reduced run (seconds: fewer steps and samples; exit 0 whatever it scores)",
    )
    parser.add_argument(
        "--threads", type=int, default=2, help="torch CPU threads for a CPU run (default 2, as on CI)"
    )
    parser.add_argument(
        "--device",
        default="cpu",
        help="cpu (default), cuda, cuda:N or auto (cuda when available); CUDA trains under bf16 autocast",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        dest="overrides",
        help="override a DemoConfig field, e.g. --set routed_steps=300 (repeatable; applied after --quick; "
        "other model sizes need --base scratch)",
    )
    parser.add_argument(
        "--method",
        choices=("l2a", "aha"),
        default="l2a",
        help="l2a (default) or aha: per-head routing between full and window attention (l2a.demo_aha; "
        "default --out runs/demo_aha)",
    )
    parser.add_argument(
        "--base",
        default="embedded",
        metavar="embedded|scratch|DIR",
        help="the dense model to convert: embedded (default: the package's pretrained tiny base, "
        "l2a/assets/demo_base), scratch (pretrain one until it retrieves, at most 2800 steps: a few "
        "minutes; when retrieval appears varies with the seed and the CPU, and a run whose base does not "
        "retrieve ends INVALID), or DIR, the base/ folder of an earlier demo run",
    )
    parser.set_defaults(func=_run)


def _check_base(base: str, config, out: str) -> None:
    """--base names the embedded base, scratch, or a saved base of the configured sizes outside --out."""
    from l2a.demo_common import base_path, check_base

    path = base_path(base)
    if path is not None and Path(out).resolve() in (path.resolve(), *path.resolve().parents):
        raise UsageError(f"--base {base} lies inside --out {out}: use another --out (the run rewrites it)")
    try:
        check_base(base, config)
    except (FileNotFoundError, ValueError) as error:
        raise UsageError(f"--base {base}: {error}") from None


def _run_aha(args: argparse.Namespace) -> int:
    from l2a.demo import resolve_device, task_arg_flags
    from l2a.demo_aha import AHADemoConfig, format_aha_report, run_aha_demo

    out = "runs/demo_aha" if args.out == "runs/demo" else args.out
    config = (AHADemoConfig.quick() if args.quick else AHADemoConfig()).with_overrides(args.overrides)
    if args.threads < 1:
        raise UsageError(f"--threads must be >= 1, got {args.threads}")
    resolve_device(args.device)
    _check_base(args.base, config, out)
    prepare_output_dir(out, force=args.force, outputs=AHA_OUTPUTS)
    report = run_aha_demo(
        out, seed=args.seed, config=config, threads=args.threads, device=args.device, base=args.base
    )
    print(format_aha_report(report))
    plots = f"{out}/aha_routing.png" + (f", {out}/long_tail.png" if report["long_tail"] else "")
    print(f"report: {out}/report.json, plots: {plots}")
    print(
        f"evaluate: l2a eval {report['model_dir']} {report['base_dir']} "
        f"--variants learned,local_only,all_global {task_arg_flags(report)} ..."
    )
    # as the L2A demo: a missed target (or an invalid run) is exit status 1, except for the --quick smoke run
    return 0 if args.quick or report["verdict"]["passed"] else 1


def _run(args: argparse.Namespace) -> int:
    if args.method == "aha":
        return _run_aha(args)
    import dataclasses

    from l2a.demo import DemoConfig, format_report, resolve_device, run_demo, task_arg_flags, verdict
    from l2a.training.config import did_you_mean

    keys = [field.name for field in dataclasses.fields(DemoConfig)]
    for item in args.overrides:
        key = item.partition("=")[0].strip()
        if "=" in item and key not in keys:
            raise UsageError(
                f"unknown demo config key {key!r}{did_you_mean(key, keys)} (valid keys: {', '.join(keys)})"
            )
    config = (DemoConfig.quick() if args.quick else DemoConfig()).with_overrides(args.overrides)
    if args.threads < 1:
        raise UsageError(f"--threads must be >= 1, got {args.threads}")
    resolve_device(args.device)
    _check_base(args.base, config, args.out)
    prepare_output_dir(args.out, force=args.force, outputs=OUTPUTS)
    report = run_demo(
        args.out, seed=args.seed, config=config, threads=args.threads, device=args.device, base=args.base
    )
    print(format_report(report))
    print(f"report: {args.out}/report.json, plot: {args.out}/routing.png")
    print(f"models: {report['model_dir']} (L2A), {report['base_dir']} (full attention, before conversion)")
    print(f"evaluate them: l2a eval {report['model_dir']} {report['base_dir']} {task_arg_flags(report)} ...")
    if not report["targets_met"]:
        print(verdict(report))
    # exit 1 when the run does not show the documented result; a quick run checks the pipeline only
    return 0 if args.quick or report["targets_met"] else 1
