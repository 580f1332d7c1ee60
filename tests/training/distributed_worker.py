"""Run by `torchrun` from test_distributed.py: trains the tiny model on this rank's share of the batches
(rank r takes rows r, r + world, ...): first with data for 2 of the 4 steps (the run stops and saves a
checkpoint), then resumed to step 4; once per wrapper named in argv[2:] (ddp, fsdp). Rank 0 writes
{wrapper: {"history", "checkpoint"}} as JSON to argv[1]."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from conftest import random_batches, tiny_l2a  # noqa: E402
from l2a.training import LoggingConfig, OptimConfig, RouterConfig, TrainConfig, train  # noqa: E402


def main() -> None:
    out, wrappers = Path(sys.argv[1]), sys.argv[2:]
    torch.set_num_threads(1)
    # One group for all runs (train() joins an existing group and leaves it open).
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = batches()[rank::world]
    results = {}
    for parallel in wrappers:
        config = TrainConfig(
            output_dir=str(out.parent / f"run-{parallel}"),
            device="cpu",
            steps=4,
            parallel=parallel,
            optim=OptimConfig(lr=1e-2),
            router=RouterConfig(regularizer_weight=1e-2, leakage_probability=0.5),
            logging=LoggingConfig(every=1, progress_bar=False),
            checkpoint={"keep_last": 1, "resume": "auto"},
        )
        first = train(tiny_l2a(), None, config, data=mine[:2])
        second = train(tiny_l2a(seed=1), None, config, data=mine)
        results[parallel] = {"history": first.history + second.history, "checkpoint": str(second.checkpoint)}
    if rank == 0:
        out.write_text(json.dumps(results))
    dist.destroy_process_group()


def batches() -> list[dict[str, torch.Tensor]]:
    """8 rows with unequal label counts: the loss must be weighted by tokens across ranks."""
    rows = random_batches(8, packed=False, seq_len=24)
    for i, row in enumerate(rows):
        row["labels"] = row["input_ids"].clone()
        row["labels"][:, : 3 * i] = -100
    return rows


if __name__ == "__main__":
    main()
