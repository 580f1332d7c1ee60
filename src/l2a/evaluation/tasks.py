"""Long-context task evaluation (RULER-style): sample prompts, greedy-generate, score.

The task generators and the scoring rules belong to `l2a.data.tasks`; this module runs them against a
model: one prompt at a time (no padding, so no model needs left-padding support), greedy decoding with
``model.generate`` up to the sample's ``max_new_tokens``, decoding without special tokens, and RULER's
string-match scoring. For L2A models the prefill's ``router_fraction`` is recorded on the way.

Task arguments (``task_args={"kv_retrieval": {"key_chars": 2}}``, ``l2a eval --task-arg
kv_retrieval.key_chars=2``) override a task's defaults, e.g. to evaluate in the format a model was
trained on.
"""

from __future__ import annotations

import dataclasses
import random
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import yaml
from tqdm.auto import tqdm

from l2a.data.tasks import TASKS, Task, TaskSample, get_task, score_prediction, score_samples
from l2a.evaluation.common import model_device


@dataclass
class SampleResult:
    """One scored sample: the model's text, the references and the sample's score (0–100).

    ``needle_distance``: tokens between the end of the earliest needle and the end of the prompt, i.e. how
    far back the model must look (None for tasks without needles); compare it with the sliding window.
    """

    depth: float | None
    prediction: str
    answers: list[str]
    score: float
    prompt_tokens: int
    needle_distance: int | None = None


def needle_distance(sample: TaskSample) -> int | None:
    """Tokens from the end of the earliest needle span to the end of the prompt (None: no needles)."""
    if not sample.needle_spans:
        return None
    return len(sample.input_ids) - min(end for _, end in sample.needle_spans)


@dataclass
class TaskResult:
    """Score (0–100, RULER's string match) of one task at one length, averaged over its samples.

    ``router_fraction`` is the mean over samples of the per-layer fraction of prompt tokens routed to
    global attention during prefill (L2A models only; order as ``config.global_layers``).
    """

    task: str
    length: int
    score: float
    num_samples: int
    samples: list[SampleResult] = field(default_factory=list)
    router_fraction: list[float] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def sample_seed(seed: int, task: str, length: int, index: int) -> int:
    """The RNG seed of one sample: independent of which other tasks/lengths are evaluated."""
    return random.Random(f"{seed}/{task}/{length}/{index}").getrandbits(63)


_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def parse_task_arg(text: str) -> tuple[str, str, Any]:
    """``"TASK.KEY=VALUE"`` → ``(task, key, value)``, the value read as YAML (``2`` → int, ``true`` → bool,
    ``null`` → None, ``[a, b]`` → list, else str); numbers such as ``1e-3`` (a string to YAML) become floats.
    """
    target, sep, raw = text.partition("=")
    task, dot, key = target.strip().partition(".")
    if not sep or not dot or not task or not key:
        raise ValueError(
            f"task argument {text!r} must look like TASK.KEY=VALUE, e.g. kv_retrieval.key_chars=2"
        )
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as error:
        raise ValueError(f"task argument {text!r}: cannot read the value: {error}") from None
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        value = float(value)
    return task, key.strip(), value


def build_task(name: str, overrides: Mapping[str, Any] | None = None) -> Task:
    """``get_task(name, **overrides)``, with a ValueError naming the task and key for an unknown task, an
    unknown keyword (the task's dataclass fields, ``name`` excluded) or a value the task rejects."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    overrides = dict(overrides or {})
    factory = getattr(TASKS[name], "func", TASKS[name])
    if dataclasses.is_dataclass(factory):
        valid = [f.name for f in dataclasses.fields(factory) if f.init and f.name != "name"]
        unknown = [key for key in overrides if key not in valid]
        if unknown:
            raise ValueError(
                f"task {name!r} has no argument {unknown[0]!r}; its arguments: {', '.join(valid)}"
            )
    try:
        return get_task(name, **overrides)
    except TypeError as error:  # an unknown keyword, or a value of the wrong type in validation
        raise ValueError(f"task {name!r}: bad arguments {overrides}: {error}") from None
    except ValueError as error:
        raise ValueError(f"task {name!r} with arguments {overrides}: {error}") from None


def sample_tasks(
    tokenizer: Any,
    tasks: Sequence[str],
    lengths: Sequence[int],
    samples: int,
    seed: int = 0,
    *,
    task_args: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[tuple[str, int], list[TaskSample]]:
    """Draw ``samples`` prompts for every (task, length); the same arguments always give the same prompts.

    ``task_args`` maps a task name to keyword overrides of its defaults (`build_task`).
    """
    if samples < 1:
        raise ValueError(f"samples must be positive, got {samples}")
    task_args = task_args or {}
    stray = [name for name in task_args if name not in tasks]
    if stray:
        raise ValueError(f"task arguments given for {stray}, which are not among the tasks {list(tasks)}")
    drawn: dict[tuple[str, int], list[TaskSample]] = {}
    for name in tasks:
        task = build_task(name, task_args.get(name))
        for length in lengths:
            drawn[(name, length)] = [
                task.sample(tokenizer, length, random.Random(sample_seed(seed, name, length, i)))
                for i in range(samples)
            ]
    return drawn


@contextmanager
def record_prefill_router_fraction(model: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collect ``router_fraction`` (num_global_layers,) of every prefill forward (calls with more than one
    new token) while the context is open. Models whose outputs have no router fraction record nothing."""
    recorded: list[torch.Tensor] = []

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        fraction = getattr(output, "router_fraction", None)
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if fraction is not None and input_ids is not None and input_ids.shape[-1] > 1:
            recorded.append(fraction.detach().float())

    handle = model.register_forward_hook(hook, with_kwargs=True)
    try:
        yield recorded
    finally:
        handle.remove()


@torch.no_grad()
def generate_answer(model: torch.nn.Module, tokenizer: Any, sample: TaskSample) -> str:
    """Greedy continuation of the sample's prompt (at most ``sample.max_new_tokens``), decoded without
    special tokens and stripped. The prompt is used raw (no chat template), as RULER does for base models;
    generation stops at the model's ``generation_config.eos_token_id`` (else the tokenizer's eos)."""
    device = model_device(model)
    input_ids = torch.as_tensor(sample.input_ids, dtype=torch.long, device=device).unsqueeze(0)
    eos = getattr(tokenizer, "eos_token_id", None)
    pad = getattr(tokenizer, "pad_token_id", None)
    kwargs = {"pad_token_id": pad if pad is not None else eos}
    # the model's generation config may list several stop tokens (e.g. Qwen); only fill in a missing one
    if getattr(getattr(model, "generation_config", None), "eos_token_id", None) is None and eos is not None:
        kwargs["eos_token_id"] = eos
    output = model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=sample.max_new_tokens,
        do_sample=False,
        **kwargs,
    )
    new_tokens = output[0, input_ids.shape[1] :].tolist()
    return tokenizer.decode(new_tokens, skip_special_tokens=True).strip()


def evaluate_tasks(
    model: torch.nn.Module,
    tokenizer: Any,
    tasks: Sequence[str],
    lengths: Sequence[int],
    samples: int,
    seed: int = 0,
    *,
    progress: bool = False,
    task_args: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[TaskResult]:
    """Score the model on every (task, length): ``samples`` prompts each, greedy generation, RULER scoring.

    Args:
        model: anything with ``generate(input_ids=(1, N), max_new_tokens=...) -> (1, N + new)``.
        tokenizer: the model's tokenizer (``decode``, ``eos_token_id``); also used to build the prompts.
        tasks: names from `l2a.data.tasks` (e.g. "niah_single_1", "vt").
        lengths: prompt lengths in tokens.
        samples: prompts per (task, length).
        seed: sampling seed; see `sample_seed`.
        task_args: per task name, keyword overrides of the task's defaults (`build_task`).

    Returns:
        one `TaskResult` per (task, length), tasks outer, lengths inner.
    """
    drawn = sample_tasks(tokenizer, tasks, lengths, samples, seed, task_args=task_args)
    was_training = getattr(model, "training", False)
    if isinstance(model, torch.nn.Module):
        model.eval()
    results = []
    bar = tqdm(total=len(drawn) * samples, desc="tasks", disable=not progress, leave=False)
    try:
        for (name, length), batch in drawn.items():
            bar.set_postfix_str(f"{name}@{length}")
            predictions, fractions = [], []
            for sample in batch:
                with record_prefill_router_fraction(model) as recorded:
                    predictions.append(generate_answer(model, tokenizer, sample))
                fractions.extend(recorded[:1])
                bar.update(1)
            per_sample = [
                100.0 * score_prediction(p, s.answers, s.metric) for s, p in zip(batch, predictions)
            ]
            results.append(
                TaskResult(
                    task=name,
                    length=length,
                    score=score_samples(predictions, batch),
                    num_samples=len(batch),
                    samples=[
                        SampleResult(
                            depth=s.depth,
                            prediction=p,
                            answers=list(s.answers),
                            score=score,
                            prompt_tokens=len(s.input_ids),
                            needle_distance=needle_distance(s),
                        )
                        for s, p, score in zip(batch, predictions, per_sample)
                    ],
                    router_fraction=torch.stack(fractions).mean(0).tolist() if fractions else None,
                )
            )
    finally:
        bar.close()
        if isinstance(model, torch.nn.Module):
            model.train(was_training)
    return results
