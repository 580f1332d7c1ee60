"""`l2a reproduce CONFIG --out DIR [--stage STAGE ...] [--set KEY=VALUE ...]`: the reproduction experiment
(issue 13) in resumable stages (see `l2a.experiments.reproduction` and docs/reproduction.md)."""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    from l2a.experiments.stages import STAGES

    parser = subparsers.add_parser(
        "reproduce",
        help="pretrain a base, extend it 4x with CLP / L2A / SWA / random routing, evaluate, prune, report",
        description="Run the stages of the reproduction experiment that are not done yet in DIR "
        f"({', '.join(STAGES)}); a stage that is done (DIR/stages/STAGE.json) is skipped, so the run can be "
        "split over several invocations. Writes DIR/results.json, DIR/report.md and PNG plots.",
    )
    parser.add_argument("config", help="experiment file, e.g. configs/reproduction-cpu-tiny.yaml")
    parser.add_argument("--out", required=True, metavar="DIR", help="run directory (created; resumed)")
    parser.add_argument(
        "--stage",
        dest="stages",
        action="append",
        choices=STAGES,
        metavar="STAGE",
        help=f"run only this stage (repeatable; one of {', '.join(STAGES)}); default: all",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, dotted for sections: --set extend.steps=100 --set device=cuda",
    )
    parser.add_argument(
        "--estimate",
        type=float,
        metavar="TFLOPS",
        help="print each stage's FLOP estimate and its time at TFLOPS effective TFLOP/s, run nothing",
    )
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from l2a.experiments.config import load_reproduction_config
    from l2a.experiments.reproduction import run_reproduction

    try:
        config = load_reproduction_config(args.config, args.overrides)
        if args.estimate is not None:
            return _print_estimate(config, args.estimate)
        run_reproduction(config, args.out, args.stages)
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"l2a reproduce: error: {err}", file=sys.stderr)
        return 2
    if args.stages is None or "report" in args.stages:
        print(f"results: {args.out}/results.json, report: {args.out}/report.md")
    else:
        print(f"stages done: {', '.join(args.stages)} (report: --stage report)")
    return 0


def _print_estimate(config, tflops: float) -> int:
    from l2a.experiments.config import stage_flops

    if tflops <= 0:
        raise ValueError(f"--estimate takes effective TFLOP/s > 0, got {tflops}")
    flops = stage_flops(config)
    print(f"{config.name}: {flops.pop('parameters') / 1e6:.1f}M parameters (estimate at {tflops:g} TFLOP/s)")
    for stage, value in flops.items():
        print(f"{stage:10s} {value:.2e} FLOPs  ~{value / (tflops * 1e12):.0f} s")
    return 0
