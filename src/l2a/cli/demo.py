"""`l2a demo [--out DIR] [--seed N] [--quick]`: the embedded CPU demo (see `l2a.demo`)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="train a tiny model, convert it to L2A, route it and evaluate retrieval (CPU, minutes)",
        description="Pretrain a tiny Qwen3-style model on the Python standard library's sources mixed with "
        "a key-value retrieval task, convert it to L2A, train its routers, and compare beyond-window "
        "retrieval of the learned routing with local-only and all-global routing. "
        "Writes DIR/report.json and DIR/routing.png.",
    )
    parser.add_argument(
        "--out", default="runs/demo", metavar="DIR", help="output directory (default: runs/demo)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of initialisation, data and leakage draws")
    parser.add_argument("--quick", action="store_true", help="a reduced run (tens of seconds; no accuracy)")
    parser.add_argument(
        "--threads", type=int, default=2, help="torch CPU threads for the run (default 2, as on CI)"
    )
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from l2a.demo import format_report, run_demo

    report = run_demo(args.out, seed=args.seed, quick=args.quick, threads=args.threads)
    print(format_report(report))
    print(f"report: {args.out}/report.json, plot: {args.out}/routing.png")
    return 0
