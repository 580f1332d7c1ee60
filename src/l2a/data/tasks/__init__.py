"""Long-context tasks (RULER-style) and the synthetic key–value retrieval task, with RULER scoring.

``get_task(name, **overrides)`` builds a task from the registry `TASKS`; ``task.sample(tokenizer, length,
rng, depth=None)`` returns a `TaskSample` whose prompt is ``length`` tokens long (within
`length_tolerance`), deterministic given ``rng``.

RULER's 13 tasks without the two QA ones (they need SQuAD/HotpotQA):

=================  ==========================================================================
niah_single_1      noise haystack, word key, number value
niah_single_2      corpus haystack, word key, number value
niah_single_3      corpus haystack, word key, UUID value
niah_multikey_1    corpus haystack, 4 keys (3 distractors), number values
niah_multikey_2    haystack of distractor needles, word keys, number values
niah_multikey_3    haystack of distractor needles, UUID keys, UUID values
niah_multivalue    corpus haystack, one key with 4 values
niah_multiquery    corpus haystack, 4 keys all queried
vt                 variable tracking: 1 chain of 4 hops in noise
cwe                common words extraction (10 words × 30 among others × 3)
fwe                frequent words extraction (Zipf, α = 2, top 3)
kv_retrieval       synthetic key–value retrieval beyond a local window (tiny models)
=================  ==========================================================================
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from l2a.data.tasks.aggregation import CommonWordsTask, FrequentWordsTask
from l2a.data.tasks.base import Metric, Task, TaskSample, score_prediction, score_samples
from l2a.data.tasks.needles import KVRetrievalTask, NeedleTask, VariableTrackingTask
from l2a.data.tasks.text import length_tolerance

TASKS: dict[str, Callable[..., Task]] = {
    "niah_single_1": partial(NeedleTask, name="niah_single_1", haystack="noise"),
    "niah_single_2": partial(NeedleTask, name="niah_single_2", haystack="corpus"),
    "niah_single_3": partial(NeedleTask, name="niah_single_3", haystack="corpus", value_type="uuids"),
    "niah_multikey_1": partial(NeedleTask, name="niah_multikey_1", haystack="corpus", num_keys=4),
    "niah_multikey_2": partial(NeedleTask, name="niah_multikey_2", haystack="needles"),
    "niah_multikey_3": partial(
        NeedleTask, name="niah_multikey_3", haystack="needles", key_type="uuids", value_type="uuids"
    ),
    "niah_multivalue": partial(NeedleTask, name="niah_multivalue", haystack="corpus", num_values=4),
    "niah_multiquery": partial(
        NeedleTask, name="niah_multiquery", haystack="corpus", num_keys=4, num_queries=4
    ),
    "vt": partial(VariableTrackingTask, name="vt"),
    "cwe": partial(CommonWordsTask, name="cwe"),
    "fwe": partial(FrequentWordsTask, name="fwe"),
    "kv_retrieval": partial(KVRetrievalTask, name="kv_retrieval"),
}
"""Task factories with RULER's default settings; keyword arguments override them."""

RULER_TASKS = tuple(name for name in TASKS if name != "kv_retrieval")
"""The RULER-style tasks (the synthetic ``kv_retrieval`` excluded)."""


def get_task(name: str, **kwargs: Any) -> Task:
    """Build the registered task ``name``; ``kwargs`` override its defaults (e.g. ``corpus=...``)."""
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    return TASKS[name](**kwargs)


__all__ = [
    "RULER_TASKS",
    "TASKS",
    "CommonWordsTask",
    "FrequentWordsTask",
    "KVRetrievalTask",
    "Metric",
    "NeedleTask",
    "Task",
    "TaskSample",
    "VariableTrackingTask",
    "get_task",
    "length_tolerance",
    "score_prediction",
    "score_samples",
]
