"""The reproduction's data (`l2a.experiments.reproduction`): task samples for training pools and
evaluation, the embedded corpus, and the resumable training rows."""

from __future__ import annotations

import functools
import random
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from typing import Any

import torch

from l2a.data import byte_tokenizer, stdlib_corpus
from l2a.data.packing import IGNORE_INDEX
from l2a.data.tasks import TaskSample
from l2a.evaluation.tasks import build_task, sample_seed
from l2a.experiments.config import ReproductionConfig


# -------------------------------------------------------------------------------------------- samples
def _draw_one(spec: tuple[str, dict[str, Any], int, int]) -> TaskSample:
    name, args, length, seed = spec
    return build_task(name, args).sample(byte_tokenizer(), length, random.Random(seed))


def draw_samples(specs: Sequence[tuple[str, dict[str, Any], int, int]], workers: int) -> list[TaskSample]:
    """Task samples for (task, task args, prompt length, seed) specs, in order; deterministic given the
    specs, drawn in `workers` processes (spawned: safe after CUDA initialisation) when > 1."""
    if workers <= 1 or len(specs) < 2 * workers:
        return [_draw_one(spec) for spec in specs]
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        return list(pool.map(_draw_one, specs, chunksize=max(1, len(specs) // (4 * workers))))


def _once_per_config(draw: Callable[..., Any]) -> Callable[..., Any]:
    """Memoise a sample draw on (config fingerprint, its other arguments) for this process: every arm and
    pruned copy that one process runs shares the same samples (callers must not modify them)."""
    cache: dict[tuple[Any, ...], Any] = {}

    @functools.wraps(draw)
    def drawn(config: ReproductionConfig, *args: Any) -> Any:
        key = (config.fingerprint(), *args)
        if key not in cache:
            cache[key] = draw(config, *args)
        return cache[key]

    return drawn


@_once_per_config
def _training_pool(
    config: ReproductionConfig, stage: str, min_length: int, max_length: int
) -> list[TaskSample]:
    """`task_pool` samples per training task with prompt lengths drawn from [min_length, max_length]."""
    data = config.data
    rng = random.Random(f"{config.seed}/pool/{stage}")
    specs = []
    for name in data.tasks:
        for _ in range(data.task_pool):
            specs.append(
                (name, data.task_args.get(name, {}), rng.randint(min_length, max_length), rng.getrandbits(63))
            )
    return draw_samples(specs, config.workers)


@_once_per_config
def eval_samples(
    config: ReproductionConfig, length: int, count: int, purpose: str
) -> dict[str, list[TaskSample]]:
    """``count`` held-out samples per evaluation task at nominal length ``length``: prompts of
    ``length - data.answer_reserve`` tokens, so that prompt + answer fit in ``length`` (seeds apart from
    the training pools; ``purpose`` separates e.g. the pretraining check from the evaluation)."""
    length -= config.data.answer_reserve
    specs, names = [], []
    for name in config.eval_tasks:
        for i in range(count):
            seed = sample_seed(config.seed + 7919, f"{purpose}/{name}", length, i)
            specs.append((name, config.data.task_args.get(name, {}), length, seed))
            names.append(name)
    drawn: dict[str, list[TaskSample]] = {name: [] for name in config.eval_tasks}
    for name, sample in zip(names, draw_samples(specs, config.workers)):
        drawn[name].append(sample)
    return drawn


# ----------------------------------------------------------------------------------------------- data
@dataclass
class Corpus:
    """Token ids of the training documents and the texts of the held-out documents."""

    train_ids: torch.Tensor
    heldout_texts: list[str]


def load_corpus(config: ReproductionConfig, tokenizer: Any) -> Corpus:
    """The first `corpus_chars` characters of shuffled standard-library documents for training, the
    following documents (`heldout_chars`) held out for perplexity."""
    train, heldout, size = [], [], 0
    for doc in stdlib_corpus(shuffle_seed=config.seed):
        if size < config.data.corpus_chars:
            train.append(doc)
        else:
            heldout.append(doc)
        size += len(doc)
        if size >= config.data.corpus_chars + config.data.heldout_chars:
            break
    if not heldout:
        raise ValueError(
            f"the embedded corpus has no documents left for held-out perplexity after "
            f"data.corpus_chars={config.data.corpus_chars}; lower it"
        )
    ids = tokenizer("\n".join(train), add_special_tokens=False)["input_ids"]
    return Corpus(torch.tensor(ids, dtype=torch.long), heldout)


class TrainingRows:
    """Endless, resumable micro-batches (input_ids, labels: (B, N)) of task rows (labels on the answer, or
    with ``task_loss="all"`` on the whole sample) and corpus rows.

    Batch i depends only on (seed, i): every arm of the extension sees the same rows, and the state is
    just the batch index. ``stop()`` ends the stream at the next batch (the pretraining stop criterion).
    """

    def __init__(
        self,
        pool: list[TaskSample],
        corpus: torch.Tensor,
        *,
        seq_len: int,
        batch_size: int,
        task_ratio: float,
        text_loss_tokens: int | None,
        pad_token_id: int,
        seed: str,
        task_loss: str = "answer",
    ):
        self.pool, self.corpus = pool, corpus
        self.seq_len, self.batch_size, self.task_ratio = seq_len, batch_size, task_ratio
        self.text_loss_tokens = text_loss_tokens or seq_len
        self.pad_token_id, self.seed = pad_token_id, seed
        self.task_loss = task_loss
        self.index = 0
        self.stopped = False
        if len(corpus) <= seq_len:
            raise ValueError(f"the training corpus has {len(corpus)} tokens, fewer than a row of {seq_len}")

    def stop(self) -> None:
        self.stopped = True

    def state_dict(self) -> dict[str, Any]:
        return {"index": self.index}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.index = int(state["index"])

    def batch(self, index: int) -> dict[str, torch.Tensor]:
        rng = random.Random(f"{self.seed}/{index}")
        n = self.seq_len
        ids = torch.full((self.batch_size, n), self.pad_token_id, dtype=torch.long)
        labels = torch.full((self.batch_size, n), IGNORE_INDEX, dtype=torch.long)
        for b in range(self.batch_size):
            if rng.random() < self.task_ratio:
                sample = self.pool[rng.randrange(len(self.pool))]
                row = (sample.input_ids + sample.answer_ids)[:n]
                ids[b, : len(row)] = torch.tensor(row)
                start = len(sample.input_ids) if self.task_loss == "answer" else 0
                labels[b, start : len(row)] = ids[b, start : len(row)]
            else:
                start = rng.randrange(len(self.corpus) - n)
                ids[b] = self.corpus[start : start + n]
                labels[b, -self.text_loss_tokens :] = ids[b, -self.text_loss_tokens :]
        return {"input_ids": ids, "labels": labels}

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while not self.stopped:
            batch = self.batch(self.index)
            self.index += 1
            yield batch
