"""Teacher-forced scoring of task samples: one batched forward per group of prompts, no generation.

The prompt and its reference answer (``sample.answer_ids``) are fed together; an answer string counts as
found when the greedy next-token prediction is right at every one of its tokens. A sample's score then
follows RULER's metrics: "all" = the fraction of its answers found, "part" = 1 if any is. Because every
answer is conditioned on the correct text before it, this is easier than free generation (`evaluate_tasks`
in `l2a.evaluation.tasks`), but it is the same for every model compared and costs one forward per prompt,
so hundreds of samples per task and length stay cheap.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from l2a.data.tasks import TaskSample
from l2a.data.tokenization import encode
from l2a.evaluation.common import model_device
from l2a.evaluation.routing import capture_routing, router_modules


@dataclass
class ScoredSample:
    """score: 0–100; routed_fraction: per global layer (in layer order), over the tokens of prompt +
    answer (models with routers only, else None); needle_distance: tokens from the end of the earliest
    needle to the end of the prompt (None without needles)."""

    score: float
    routed_fraction: list[float] | None
    needle_distance: int | None


def answer_token_spans(tokenizer: object, sample: TaskSample) -> list[tuple[int, int]]:
    """[start, end) positions inside ``sample.answer_ids`` of each of ``sample.answers``.

    Located through the answer's text (``meta["answer_text"]``): the tokens of the text before an answer
    must be a prefix of ``answer_ids`` (true for byte-level tokenizers; a ValueError otherwise).
    """
    text = sample.meta["answer_text"]
    spans, cursor = [], 0
    for answer in sample.answers:
        start = text.find(answer, cursor)
        if start < 0:
            raise ValueError(f"{sample.task}: answer {answer!r} not found in the answer text {text!r}")
        begin = len(encode(tokenizer, text[:start]))
        end = len(encode(tokenizer, text[: start + len(answer)]))
        if encode(tokenizer, text[: start + len(answer)]) != sample.answer_ids[:end]:
            raise ValueError(
                f"{sample.task}: the tokens of the answer text are not a prefix of answer_ids; "
                "teacher-forced scoring needs a tokenizer whose tokens do not merge across answers"
            )
        spans.append((begin, end))
        cursor = start + len(answer)
    return spans


def _needle_distance(sample: TaskSample) -> int | None:
    if not sample.needle_spans:
        return None
    return len(sample.input_ids) - min(end for _, end in sample.needle_spans)


@torch.no_grad()
def score_teacher_forced(
    model: torch.nn.Module,
    tokenizer: object,
    samples: Sequence[TaskSample],
    *,
    batch_size: int = 8,
    pad_token_id: int = 0,
) -> list[ScoredSample]:
    """Teacher-forced RULER-style score of every sample (see the module docstring).

    Prompts + answers (B, N ≤ longest in the batch) are right-padded with ``pad_token_id`` and passed with
    a 2-D ``attention_mask``. The model runs as it is (wrap the call in autocast for bf16).
    """
    device = model_device(model)
    routers = bool(router_modules(model))
    was_training = model.training
    model.eval()
    results: list[ScoredSample] = []
    try:
        for first in range(0, len(samples), batch_size):
            chunk = samples[first : first + batch_size]
            rows = [s.input_ids + s.answer_ids for s in chunk]
            width = max(len(r) for r in rows)
            ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for b, row in enumerate(rows):
                ids[b, : len(row)] = torch.tensor(row)
                mask[b, : len(row)] = 1
            if routers:
                with capture_routing(model) as captured:
                    out = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
                hard = torch.stack([captured[layer][0] for layer in captured], dim=1).cpu()  # (B, L, N)
                routed = (hard & mask.bool().unsqueeze(1)).sum(-1) / mask.sum(-1, keepdim=True)
                per_row = routed.double().tolist()
            else:
                out = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
                per_row = None
            pred = out.logits.argmax(-1).cpu()  # (B, N): one transfer per batch
            for b, sample in enumerate(chunk):
                prompt = len(sample.input_ids)
                found = []
                for begin, end in answer_token_spans(tokenizer, sample):
                    positions = torch.arange(prompt + begin, prompt + end)
                    found.append(bool((pred[b, positions - 1] == ids[b, positions]).all()))
                hit = sum(found) / len(found) if sample.metric == "all" else float(any(found))
                results.append(
                    ScoredSample(
                        score=100.0 * hit,
                        routed_fraction=None if per_row is None else per_row[b],
                        needle_distance=_needle_distance(sample),
                    )
                )
    finally:
        model.train(was_training)
    return results
