"""Micro-batches for the training loop from `TrainConfig.data`, through `l2a.data`.

Each rank packs the whole document stream (`l2a.data.PackedDataset`, endless) and keeps every
`world_size`-th sequence, optionally mixing in task samples (`l2a.data.MixedDataset`); the stream's
`state_dict` is the data position saved in checkpoints.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import torch

from l2a.training.config import TrainConfig


class BatchStream:
    """Groups packed rows into micro-batches (B = `micro_batch_size`, N = `seq_len`).

    Rows packed with `separate_documents` keep `cu_seqlens` (B = 1). Otherwise each row is a single
    segment and the rows are stacked without `cu_seqlens`.

    Yields dicts: `input_ids`, `labels`, `position_ids` (B, N) and, for separated documents,
    `cu_seqlens` (num_segments + 1,).
    """

    def __init__(self, rows: Any, micro_batch_size: int, separate_documents: bool):
        if separate_documents and micro_batch_size != 1:
            raise ValueError(f"separate_documents needs micro_batch_size 1, got {micro_batch_size}")
        self.rows = rows
        self.micro_batch_size = micro_batch_size
        self.separate_documents = separate_documents

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        rows = iter(self.rows)
        while True:
            group = []
            for _ in range(self.micro_batch_size):
                try:
                    group.append(next(rows))
                except StopIteration:
                    return
            batch = {
                key: torch.stack([row[key] for row in group])
                for key in ("input_ids", "labels", "position_ids")
            }
            if self.separate_documents:
                batch["cu_seqlens"] = group[0]["cu_seqlens"]
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return self.rows.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rows.load_state_dict(state)


def build_batches(config: TrainConfig, tokenizer: Any, *, rank: int = 0, world_size: int = 1) -> BatchStream:
    """This rank's endless, resumable micro-batch stream described by `config.data`.

    Text rows are sharded over ranks (sequence i goes to rank i % world_size); task rows, when mixed in,
    come from a generator seeded by (seed, rank), so ranks draw different samples.
    """
    from l2a.data import DocumentStream, MixedDataset, PackedDataset, TaskSampler
    from l2a.data.tasks import get_task

    data = config.data
    if tokenizer is None:
        raise ValueError("building the data stream from config.data needs a tokenizer")
    documents = DocumentStream(data.sources, shuffle_seed=config.seed)
    rows = PackedDataset(
        documents,
        data.seq_len,
        tokenizer=tokenizer,
        separate_documents=data.separate_documents,
        repeat=True,
        num_shards=world_size,
        shard_index=rank,
    )
    if data.task is not None:
        sampler = TaskSampler(
            get_task(data.task, **data.task_kwargs), tokenizer, min_length=data.task_min_length
        )
        seed = random.Random(f"{config.seed}:{rank}").getrandbits(63)
        rows = MixedDataset(rows, sampler, data.task_ratio, seed, task_loss=data.task_loss)
    return BatchStream(rows, data.micro_batch_size, data.separate_documents)
