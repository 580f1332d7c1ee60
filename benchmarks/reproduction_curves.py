"""Dense score at L by pretraining step for several `l2a reproduce` pretraining runs, as one PNG and JSON.

Each run is LABEL=PATH: a stage record (``OUT/stages/pretrain.json``, its ``checks``) or a log of
`l2a reproduce` (the ``[pretrain] step N: dense score at L S`` lines; for a stage cut before its record).

    python benchmarks/reproduction_curves.py --out docs/reproduction/pretraining \\
        "answer-only labels=run/stages/pretrain.json" "all labels=run_scratch/logs/pretrain.log"

``--include PREVIOUS.json`` keeps every curve of an earlier output first (runs whose records are gone).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

CHECK_LINE = re.compile(r"\[pretrain\] step (\d+): dense score at L ([0-9.]+)")


def read_checks(path: Path) -> list[tuple[int, float]]:
    """(step, mean teacher-forced score at L) of one run's pretraining checks."""
    text = path.read_text()
    if path.suffix == ".json":
        return [(c["step"], c["score"]) for c in json.loads(text)["result"]["checks"]]
    return [(int(step), float(score)) for step, score in CHECK_LINE.findall(text)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", metavar="LABEL=PATH")
    parser.add_argument("--out", required=True, help="output stem: STEM.png and STEM.json")
    parser.add_argument(
        "--include", action="append", default=[], metavar="JSON", help="curves of an earlier output"
    )
    args = parser.parse_args()
    curves = {}
    for path in args.include:
        for label, points in json.loads(Path(path).read_text()).items():
            curves[label] = [(p["step"], p["score"]) for p in points]
    for item in args.runs:
        label, _, path = item.partition("=")
        if not path:
            parser.error(f"expected LABEL=PATH, got {item!r}")
        curves[label] = read_checks(Path(path))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, points in curves.items():
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    ax.set_xlabel("pretraining step (32 x 1024 tokens)")
    ax.set_ylabel("dense score at L (mean of 12 tasks, 0-100)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    stem = Path(args.out)
    stem.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(stem.with_suffix(".png"), dpi=120)
    stem.with_suffix(".json").write_text(
        json.dumps(
            {label: [{"step": s, "score": v} for s, v in pts] for label, pts in curves.items()}, indent=1
        )
        + "\n"
    )
    print(f"wrote {stem.with_suffix('.png')} and {stem.with_suffix('.json')}")


if __name__ == "__main__":
    main()
