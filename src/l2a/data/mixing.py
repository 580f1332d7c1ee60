"""Mixing task samples (e.g. ``kv_retrieval``) into a packed text stream for training."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import torch
from torch.utils.data import IterableDataset, get_worker_info

from l2a.data.packing import PackedDataset, build_sequence
from l2a.data.tasks import Task, TaskSample, get_task


class TaskSampler:
    """Draws training samples from one or more tasks.

    Args:
        tasks: tasks or registry names (built with `get_task` defaults).
        tokenizer: encodes the samples.
        weights: relative frequency of each task (default: equal).
        min_length: None: every sample has the requested length; else a length drawn uniformly from
            [min_length, requested] (varied context lengths and needle distances).
    """

    def __init__(
        self,
        tasks: Sequence[Task | str] | Task | str,
        tokenizer: Any,
        *,
        weights: Sequence[float] | None = None,
        min_length: int | None = None,
    ) -> None:
        tasks = [tasks] if isinstance(tasks, str) or not isinstance(tasks, Sequence) else list(tasks)
        if not tasks:
            raise ValueError("TaskSampler needs at least one task")
        self.tasks = [get_task(task) if isinstance(task, str) else task for task in tasks]
        if weights is not None and (len(weights) != len(self.tasks) or min(weights) < 0 or sum(weights) <= 0):
            raise ValueError(
                f"weights {list(weights)} must be {len(self.tasks)} non-negative numbers, not all 0"
            )
        if min_length is not None and min_length < 1:
            raise ValueError(f"min_length must be positive, got {min_length}")
        self.tokenizer = tokenizer
        self.weights = list(weights) if weights is not None else [1.0] * len(self.tasks)
        self.min_length = min_length

    def sample(self, rng: random.Random, length: int) -> TaskSample:
        """One sample of prompt length ``length`` (or drawn up to it, see ``min_length``)."""
        task = rng.choices(self.tasks, weights=self.weights)[0]
        if self.min_length is not None:
            length = rng.randint(min(self.min_length, length), length)
        return task.sample(self.tokenizer, length, rng)


class MixedDataset(IterableDataset):
    """Packed text sequences with task samples mixed in, deterministic by ``seed`` and resumable.

    Each row is, with probability ``task_ratio``, a task sample (prompt + ``answer_ids``, padded to N with
    the text stream's pad id, labels -100 on padding), else the next packed text sequence. Rows have the
    format of `PackedDataset` (and follow its ``separate_documents``: a task row is one segment plus a
    padding segment).

    Args:
        text: the packed text stream; gives N (``seq_len``), the pad id and the boundary mode.
        task_sampler: draws the task samples.
        task_ratio: probability that a row is a task sample.
        seed: seeds the row choices and the task samples.
        task_loss: "all" – LM loss on every token of the task sample; "answer" – only on ``answer_ids``.
        answer_reserve: tokens of N kept free for the answer when asking for the prompt length; if a
            sample still does not fit it is redrawn shorter.
    """

    def __init__(
        self,
        text: PackedDataset,
        task_sampler: TaskSampler,
        task_ratio: float,
        seed: int,
        *,
        task_loss: Literal["all", "answer"] = "all",
        answer_reserve: int = 16,
    ) -> None:
        super().__init__()
        if not 0.0 <= task_ratio <= 1.0:
            raise ValueError(f"task_ratio must be in [0, 1], got {task_ratio}")
        if task_loss not in ("all", "answer"):
            raise ValueError(f"task_loss must be 'all' or 'answer', got {task_loss!r}")
        if not 0 <= answer_reserve < text.seq_len:
            raise ValueError(f"answer_reserve must be in [0, seq_len={text.seq_len}), got {answer_reserve}")
        self.text = text
        self.task_sampler = task_sampler
        self.task_ratio = task_ratio
        self.seed = seed
        self.task_loss = task_loss
        self.answer_reserve = answer_reserve
        self._rng = random.Random(seed)
        self._counts = {"task_rows": 0, "text_rows": 0}

    def state_dict(self) -> dict[str, Any]:
        """RNG state, text-stream state and row counts after the last yielded row (picklable)."""
        return {"rng": self._rng.getstate(), "text": self.text.state_dict(), **self._counts}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        rng_state = state["rng"]
        # A state that went through JSON/YAML has lists where `random` needs tuples.
        self._rng.setstate((rng_state[0], tuple(rng_state[1]), rng_state[2]))
        self.text.load_state_dict(state["text"])
        self._counts = {"task_rows": int(state["task_rows"]), "text_rows": int(state["text_rows"])}

    def _task_row(self, rng: random.Random) -> dict[str, torch.Tensor]:
        n = self.text.seq_len
        length = n - self.answer_reserve
        for _ in range(4):
            sample = self.task_sampler.sample(rng, length)
            ids = sample.input_ids + sample.answer_ids
            overflow = len(ids) - n
            if overflow <= 0:
                break
            length -= overflow + 1
        else:
            raise ValueError(
                f"task samples do not fit seq_len={n}: raise answer_reserve (now {self.answer_reserve})"
            )
        prompt, pad = len(sample.input_ids), n - len(ids)
        if self.task_loss == "all":
            mask = [True] * len(ids)
        else:
            mask = [False] * prompt + [True] * len(sample.answer_ids)
        return build_sequence(
            ids + [self.text.pad_token_id] * pad,
            [len(ids), pad] if pad else [len(ids)],
            separate_documents=self.text.separate_documents,
            label_mask=mask + [False] * pad,
        )

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        worker = get_worker_info()
        if worker is not None and worker.num_workers > 1:
            raise RuntimeError("MixedDataset is one ordered stream: use a DataLoader with num_workers <= 1")
        text = iter(self.text)
        while True:
            if self._rng.random() < self.task_ratio:
                row = self._task_row(random.Random(self._rng.getrandbits(64)))
                self._counts["task_rows"] += 1
            else:
                row = next(text, None)
                if row is None:
                    return
                self._counts["text_rows"] += 1
            yield row
