"""Per-layer sparsity of an L2A arm by training step, with λ and the regulariser's loss share, as a PNG.

Reads a training log (``OUT/l2a/train/log.jsonl`` of `l2a reproduce`, records with ``step``, ``lm_loss``,
``router_regularizer``, ``lambda``, ``sparsity_per_layer``): shows whether the routers switched off under
the regulariser (sparsity rising with λ) or before λ weighed anything (docs/reproduction.md).

    python benchmarks/reproduction_router_log.py docs/reproduction/l2a_train_log.jsonl \\
        --out docs/reproduction/l2a_routing_by_step.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("log", type=Path, help="log.jsonl of an L2A training run")
    parser.add_argument("--out", type=Path, required=True, help="PNG to write")
    args = parser.parse_args()
    records = [json.loads(line) for line in args.log.read_text().splitlines() if line.strip()]
    records = [r for r in records if r.get("sparsity_per_layer")]
    if not records:
        parser.error(f"{args.log}: no records with sparsity_per_layer (not an L2A training log)")
    steps = [r["step"] for r in records]
    layers = len(records[0]["sparsity_per_layer"])
    share = [
        r["lambda"] * r["router_regularizer"] / (r["lm_loss"] + r["lambda"] * r["router_regularizer"])
        for r in records
    ]

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True, height_ratios=[3, 2])
    for layer in range(layers):
        top.plot(steps, [r["sparsity_per_layer"][layer] for r in records], label=f"layer {layer}")
    top.plot(steps, [r["sparsity"] for r in records], color="black", linewidth=2, label="mean")
    top.set_ylabel("sparsity (training batch)")
    top.set_ylim(0, 1.02)
    top.grid(alpha=0.3)
    top.legend(fontsize=7, ncol=3, loc="lower right")
    bottom.plot(steps, [100 * s for s in share], color="tab:red", label="λ·regulariser, % of the loss")
    bottom.set_ylabel("% of the loss", color="tab:red")
    bottom.grid(alpha=0.3)
    twin = bottom.twinx()
    twin.plot(steps, [r["lambda"] for r in records], color="tab:blue", linestyle="--", label="λ")
    twin.set_ylabel("λ", color="tab:blue")
    bottom.set_xlabel("training step")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")
    for r, s in list(zip(records, share))[:6]:
        print(
            f"step {r['step']}: sparsity {r['sparsity']:.3f}, λ {r['lambda']:.2g}, "
            f"regulariser {100 * s:.2f} % of the loss"
        )


if __name__ == "__main__":
    main()
