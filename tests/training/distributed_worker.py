"""Run by `torchrun` from test_distributed.py: trains the tiny model on this rank's share of the batches
(rank r takes rows r, r + world, ...) and rank 0 writes the history as JSON to argv[1]."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import random_batches, tiny_l2a  # noqa: E402

from l2a.training import LoggingConfig, OptimConfig, RouterConfig, TrainConfig, train  # noqa: E402


def main() -> None:
    out, parallel = Path(sys.argv[1]), sys.argv[2]
    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    rows = random_batches(6, packed=False, seq_len=24)
    for i, row in enumerate(rows):
        row["labels"] = row["input_ids"].clone()
        row["labels"][:, : 3 * i] = -100
    config = TrainConfig(
        output_dir=str(out.parent / f"run-{parallel}"),
        steps=3,
        parallel=parallel,
        optim=OptimConfig(lr=1e-2),
        router=RouterConfig(regularizer_weight=1e-2, leakage_probability=0.5),
        logging=LoggingConfig(every=1, progress_bar=False),
        checkpoint={"every": 2, "keep_last": 1},
    )
    result = train(tiny_l2a(), None, config, data=rows[rank::world])
    if rank == 0:
        out.write_text(json.dumps({"history": result.history, "checkpoint": str(result.checkpoint)}))


if __name__ == "__main__":
    main()
