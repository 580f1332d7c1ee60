"""The task interface shared by training (teacher-forced samples) and evaluation, and RULER's scoring."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

Metric = Literal["all", "part"]


@dataclass
class TaskSample:
    """One prompt of a task with its references.

    Attributes:
        task: registry name of the task.
        input_ids: the whole prompt (context + question); the answer follows right after.
        answers: reference answer strings (scored by `score_prediction` with ``metric``).
        answer_ids: the answer as the model should generate it, for teacher forcing; ends with eos when the
            tokenizer has one.
        metric: "all" (every answer must appear) or "part" (any one suffices).
        depth: requested relative position in [0, 1] of the first answer-bearing needle within the context
            (``meta["context_span"]``), None for tasks without needles.
        needle_spans: [start, end) token spans in ``input_ids`` of the answer-bearing needles (key facts).
        max_new_tokens: generation budget for evaluation.
        meta: task-specific details; every task sets ``context_span`` ([start, end) tokens of the context)
            and ``answer_text`` (the decoded form of ``answer_ids`` without eos).
    """

    task: str
    input_ids: list[int]
    answers: list[str]
    answer_ids: list[int]
    metric: Metric
    depth: float | None
    needle_spans: list[tuple[int, int]]
    max_new_tokens: int
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def prompt_ids(self) -> list[int]:
        """Alias of ``input_ids``."""
        return self.input_ids


@runtime_checkable
class Task(Protocol):
    """A generator of task samples of a requested length in tokens, deterministic given ``rng``."""

    name: str

    def sample(
        self, tokenizer: Any, length: int, rng: random.Random, *, depth: float | None = None
    ) -> TaskSample: ...


def score_prediction(prediction: str, answers: Sequence[str], metric: str) -> float:
    """RULER's string match, case-insensitive: "all" → fraction of ``answers`` contained in ``prediction``,
    "part" → 1 if any of them is. Returns a value in [0, 1]."""
    if not answers:
        raise ValueError("answers is empty")
    text = prediction.lower()
    hits = [answer.lower() in text for answer in answers]
    if metric == "all":
        return sum(hits) / len(hits)
    if metric == "part":
        return float(any(hits))
    raise ValueError(f"metric must be 'all' or 'part', got {metric!r}")


def score_samples(predictions: Sequence[str], samples: Sequence[TaskSample]) -> float:
    """Mean `score_prediction` over samples, in percent (0–100).

    The two sequences may also be passed in the order ``(samples, predictions)``: their element types
    (`TaskSample` vs `str`) are unambiguous.
    """
    if predictions and isinstance(predictions[0], TaskSample):
        predictions, samples = samples, predictions
    if len(predictions) != len(samples):
        raise ValueError(f"{len(predictions)} predictions for {len(samples)} samples")
    if not samples:
        raise ValueError("no samples to score")
    for prediction, sample in zip(predictions, samples):
        if not isinstance(prediction, str) or not isinstance(sample, TaskSample):
            raise TypeError(
                "expected (str prediction, TaskSample), got "
                f"({type(prediction).__name__}, {type(sample).__name__})"
            )
    total = sum(score_prediction(p, s.answers, s.metric) for p, s in zip(predictions, samples))
    return 100.0 * total / len(samples)
