"""Retrieval tasks: RULER's needle-in-a-haystack family, variable tracking, and synthetic key–value retrieval.

Each task writes its needles (key facts) into a haystack with `compose`, so the prompt has the requested
length in tokens of the given tokenizer, and the first answer-bearing needle sits at the requested depth.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass
from typing import Any, Literal

from l2a.data.corpora import STDLIB
from l2a.data.tasks.base import TaskSample
from l2a.data.tasks.text import (
    Haystack,
    answer_token_ids,
    compose,
    corpus_haystack,
    distinct,
    items_haystack,
    make_item,
    noise_haystack,
    number,
)
from l2a.data.tokenization import encode, special_prefix

ItemKind = Literal["words", "numbers", "uuids"]
_ITEM_KINDS = ("words", "numbers", "uuids")


def _check_depth(depth: float | None, task: str) -> None:
    if depth is not None and not 0.0 <= depth <= 1.0:
        raise ValueError(f"{task}: depth must be in [0, 1], got {depth}")


def _corpus_key(corpus: str | list[str] | tuple[str, ...]) -> str | tuple[str, ...]:
    return corpus if isinstance(corpus, str) else tuple(str(c) for c in corpus)


def _join_keys(keys: list[str]) -> str:
    return keys[0] if len(keys) == 1 else ", ".join(keys[:-1]) + " and " + keys[-1]


@dataclass
class NeedleTask:
    """RULER's needle in a haystack: find the value(s) of the queried key(s).

    A needle reads "One of the special magic {values} for {key} is: {value}.".

    Args:
        name: registry name.
        haystack: "noise" (RULER's repeated sentences), "corpus" (text from ``corpus``), or "needles"
            (the haystack is made of distractor needles with other keys).
        key_type, value_type: "words" (adjective-noun), "numbers" (7 digits) or "uuids".
        num_keys: needles with distinct keys; the ones not queried are distractors.
        num_values: values (needles) per queried key; all of them are answers.
        num_queries: keys asked for (the first ``num_queries`` of the ``num_keys``).
        corpus, corpus_chars: source for the "corpus" haystack (see `l2a.data.iter_documents`) and how many
            characters of it to use (longer contexts repeat it).
        max_new_tokens: minimum generation budget (raised to twice the answer's length when needed).
    """

    name: str = "niah_single_1"
    haystack: Literal["noise", "corpus", "needles"] = "noise"
    key_type: ItemKind = "words"
    value_type: ItemKind = "numbers"
    num_keys: int = 1
    num_values: int = 1
    num_queries: int = 1
    corpus: str | list[str] = STDLIB
    corpus_chars: int = 2_000_000
    max_new_tokens: int = 128

    def __post_init__(self) -> None:
        if self.haystack not in ("noise", "corpus", "needles"):
            raise ValueError(
                f"{self.name}: haystack must be 'noise', 'corpus' or 'needles', got {self.haystack!r}"
            )
        for field_name in ("key_type", "value_type"):
            if getattr(self, field_name) not in _ITEM_KINDS:
                raise ValueError(f"{self.name}: {field_name} must be one of {_ITEM_KINDS}")
        if min(self.num_keys, self.num_values, self.num_queries) < 1 or self.num_queries > self.num_keys:
            raise ValueError(
                f"{self.name}: need 1 <= num_queries <= num_keys and num_values >= 1, got "
                f"num_keys={self.num_keys}, num_values={self.num_values}, num_queries={self.num_queries}"
            )

    def _needle(self, key: str, value: str) -> str:
        return f"One of the special magic {self.value_type} for {key} is: {value}."

    def sample(
        self, tokenizer: Any, length: int, rng: random.Random, *, depth: float | None = None
    ) -> TaskSample:
        _check_depth(depth, self.name)
        used: set[str] = set()
        keys = distinct(lambda: make_item(self.key_type, rng), self.num_keys, used, f"{self.key_type} keys")
        queried, distractors = keys[: self.num_queries], keys[self.num_queries :]
        values = {
            key: distinct(lambda: make_item(self.value_type, rng), self.num_values, used, "values")
            for key in queried
        }
        distractor_values = {
            key: distinct(lambda: make_item(self.value_type, rng), 1, used, "values")[0]
            for key in distractors
        }
        answers = [value for key in queried for value in values[key]]
        targets = [self._needle(key, value) for key in queried for value in values[key]]
        others = [self._needle(key, value) for key, value in distractor_values.items()]
        first_depth = rng.random() if depth is None else depth
        depths = [first_depth] + [rng.random() for _ in range(len(targets) - 1 + len(others))]

        kind = self.value_type
        prefix = (
            f"Some special magic {kind} are hidden within the following text. Make sure to memorize it. "
            f"I will quiz you about the {kind} afterwards.\n"
        )
        query = _join_keys(queried)
        suffix = (
            f"\nWhat are all the special magic {kind} for {query} mentioned in the provided text? "
            f"The special magic {kind} for {query} mentioned in the provided text are:"
        )
        answer_text = " " + ", ".join(answers) + "."
        composition = compose(
            tokenizer,
            length,
            prefix=prefix,
            suffix=suffix,
            needles=targets + others,
            depths=depths,
            haystack=self._haystack(used),
            seed=rng.getrandbits(64),
            task=self.name,
        )
        answer_ids = answer_token_ids(tokenizer, answer_text)
        return TaskSample(
            task=self.name,
            input_ids=composition.input_ids,
            answers=answers,
            answer_ids=answer_ids,
            metric="all",
            depth=first_depth,
            needle_spans=composition.needle_spans[: len(targets)],
            max_new_tokens=max(self.max_new_tokens, 2 * len(answer_ids)),
            meta={
                "context_span": composition.context_span,
                "answer_text": answer_text,
                "keys": queried,
                "distractor_spans": composition.needle_spans[len(targets) :],
                "haystack": self.haystack,
            },
        )

    def _haystack(self, used: set[str]) -> Haystack:
        if self.haystack == "noise":
            return noise_haystack
        if self.haystack == "corpus":
            return corpus_haystack(_corpus_key(self.corpus), self.corpus_chars)

        def distractor(rng: random.Random) -> str:
            key = make_item(self.key_type, rng)
            while key in used:
                key = make_item(self.key_type, rng)
            value = make_item(self.value_type, rng)
            while value in used:
                value = make_item(self.value_type, rng)
            return self._needle(key, value)

        return items_haystack(distractor)


def _variable(rng: random.Random) -> str:
    return "".join(rng.choices(string.ascii_uppercase, k=5))


@dataclass
class VariableTrackingTask:
    """RULER's variable tracking: chains ``VAR A = 12345.``, ``VAR B = VAR A.``, ... hidden in noise; name
    every variable that ends up holding the queried value.

    Args:
        name: registry name.
        num_chains: chains in the text; the first is queried, the others are distractors.
        num_hops: assignments after the first one in each chain (the answer has ``num_hops + 1`` names).
        max_new_tokens: minimum generation budget (raised to twice the answer's length when needed).
    """

    name: str = "vt"
    num_chains: int = 1
    num_hops: int = 4
    max_new_tokens: int = 30

    def __post_init__(self) -> None:
        if self.num_chains < 1 or self.num_hops < 1:
            raise ValueError(f"{self.name}: num_chains and num_hops must be >= 1")

    def sample(
        self, tokenizer: Any, length: int, rng: random.Random, *, depth: float | None = None
    ) -> TaskSample:
        _check_depth(depth, self.name)
        used: set[str] = set()
        chains = []
        for _ in range(self.num_chains):
            names = distinct(lambda: _variable(rng), self.num_hops + 1, used, "variable names")
            value = distinct(lambda: number(rng, 5), 1, used, "values")[0]
            statements = [f"VAR {names[0]} = {value}."]
            statements += [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
            chains.append((names, value, statements))
        first_depth = rng.random() if depth is None else depth
        # Assignments must come in chain order: sorted depths, the queried chain starting at `depth`.
        depths = [first_depth, *sorted(rng.uniform(first_depth, 1.0) for _ in range(self.num_hops))]
        for _ in chains[1:]:
            depths += sorted(rng.random() for _ in range(self.num_hops + 1))
        names, value, _ = chains[0]
        prefix = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
        suffix = (
            f"\nQuestion: Find all variables that are assigned the value {value} in the text above. "
            "Answer: According to the chain(s) of variable assignment in the text above, "
            f"{len(names)} variables are assigned the value {value}, they are:"
        )
        answer_text = " " + " ".join(names)
        composition = compose(
            tokenizer,
            length,
            prefix=prefix,
            suffix=suffix,
            needles=[s for chain in chains for s in chain[2]],
            depths=depths,
            haystack=noise_haystack,
            seed=rng.getrandbits(64),
            task=self.name,
        )
        answer_ids = answer_token_ids(tokenizer, answer_text)
        hops = self.num_hops + 1
        return TaskSample(
            task=self.name,
            input_ids=composition.input_ids,
            answers=list(names),
            answer_ids=answer_ids,
            metric="all",
            depth=first_depth,
            needle_spans=composition.needle_spans[:hops],
            max_new_tokens=max(self.max_new_tokens, 2 * len(answer_ids)),
            meta={
                "context_span": composition.context_span,
                "answer_text": answer_text,
                "value": value,
                "distractor_spans": composition.needle_spans[hops:],
            },
        )


def _kv_key(rng: random.Random, chars: int) -> str:
    return "".join(rng.choices(string.ascii_lowercase, k=chars))


def _kv_value(rng: random.Random, digits: int) -> str:
    return "".join(rng.choices(string.digits, k=digits))


@dataclass
class KVRetrievalTask:
    """Synthetic long-range key–value retrieval, learnable by tiny models (byte tokenizer, 256–1024 tokens).

    The context is a stream of pairs ``"key: value"`` (``filler="pairs"``: every item is a pair with a
    distinct random key) or corpus text with ``num_pairs`` pairs inserted (``filler="corpus"``). The prompt
    ends with the query ``"\\nkey:"``; the answer is ``" value"`` (+ eos). With ``num_queries > 1`` the
    earlier queries appear answered before the last one (``"\\nkey: value"``: extra teacher-forced signal);
    only the last is the sample's answer.

    The queried needle ends at least ``min_distance`` tokens before the end of the prompt, so a sliding
    window of that size around the last prompt token cannot see it. ``meta["distance"]`` is
    ``len(input_ids) - needle_end`` (the token gap from the needle's last token to the last prompt token)
    and ``meta["query_distances"]`` lists it for every query.

    Args:
        name: registry name.
        min_distance: smallest allowed distance of every queried needle.
        key_chars: lowercase letters per key.
        value_digits: digits per value.
        num_queries: queries at the end (distinct keys).
        filler: "pairs" or "corpus".
        num_pairs: distractor pairs inserted into corpus filler (``filler="corpus"`` only; default 8).
        corpus, corpus_chars: corpus filler source (see `NeedleTask`).
    """

    name: str = "kv_retrieval"
    min_distance: int = 64
    key_chars: int = 3
    value_digits: int = 3
    num_queries: int = 1
    filler: Literal["pairs", "corpus"] = "pairs"
    num_pairs: int | None = None
    corpus: str | list[str] = STDLIB
    corpus_chars: int = 2_000_000

    def __post_init__(self) -> None:
        if self.filler not in ("pairs", "corpus"):
            raise ValueError(f"{self.name}: filler must be 'pairs' or 'corpus', got {self.filler!r}")
        if self.filler == "pairs" and self.num_pairs is not None:
            raise ValueError(f"{self.name}: num_pairs applies to filler='corpus' only")
        if self.filler == "corpus" and self.num_pairs is None:
            self.num_pairs = 8
        if self.min_distance < 0 or self.key_chars < 1 or self.value_digits < 1 or self.num_queries < 1:
            raise ValueError(
                f"{self.name}: need min_distance >= 0, key_chars >= 1, value_digits >= 1, num_queries >= 1"
            )

    def sample(
        self, tokenizer: Any, length: int, rng: random.Random, *, depth: float | None = None
    ) -> TaskSample:
        _check_depth(depth, self.name)
        used: set[str] = set()
        keys = distinct(lambda: _kv_key(rng, self.key_chars), self.num_queries, used, "keys")
        values = [_kv_value(rng, self.value_digits) for _ in keys]
        pairs = [f"{key}: {value}" for key, value in zip(keys, values)]
        # The answered query is the last one; its needle comes first (it is the one `depth` places).
        queries = "".join(f"\n{pair}" for pair in pairs[:-1]) + f"\n{keys[-1]}:"
        needles = [pairs[-1], *pairs[:-1]]

        context_tokens = length - len(encode(tokenizer, queries)) - len(special_prefix(tokenizer))
        needle_tokens = max(len(encode(tokenizer, needle + " ")) for needle in needles)
        slack = 8  # needles snap to pair/word boundaries a few tokens from the requested depth
        room = context_tokens - self.min_distance - needle_tokens - slack
        if room < 0:
            raise ValueError(
                f"{self.name}: length {length} leaves no room for a needle "
                f"min_distance={self.min_distance} tokens before the query"
            )
        max_depth = room / context_tokens
        if depth is not None and depth > max_depth:
            raise ValueError(
                f"{self.name}: depth {depth} puts the needle closer than min_distance={self.min_distance} "
                f"tokens to the query at length {length} (largest depth: {max_depth:.3f})"
            )
        first_depth = rng.uniform(0.0, max_depth) if depth is None else depth
        depths = [first_depth] + [rng.uniform(0.0, max_depth) for _ in needles[1:]]
        if self.filler == "pairs":

            def distractor(item_rng: random.Random) -> str:
                key = _kv_key(item_rng, self.key_chars)
                while key in used:
                    key = _kv_key(item_rng, self.key_chars)
                return f"{key}: {_kv_value(item_rng, self.value_digits)}"

            haystack = items_haystack(distractor)
        else:
            extra = distinct(lambda: _kv_key(rng, self.key_chars), self.num_pairs, used, "keys")
            needles += [f"{key}: {_kv_value(rng, self.value_digits)}" for key in extra]
            depths += [rng.random() for _ in extra]
            haystack = corpus_haystack(_corpus_key(self.corpus), self.corpus_chars)
        composition = compose(
            tokenizer,
            length,
            prefix="",
            suffix=queries,
            needles=needles,
            depths=depths,
            haystack=haystack,
            seed=rng.getrandbits(64),
            task=self.name,
        )
        spans = composition.needle_spans[: self.num_queries]
        total = len(composition.input_ids)
        distances = [total - end for _, end in spans]
        if min(distances) < self.min_distance:
            raise RuntimeError(
                f"{self.name}: a needle landed {min(distances)} < {self.min_distance} tokens from the end"
            )
        answer_text = f" {values[-1]}"
        answer_ids = answer_token_ids(tokenizer, answer_text)
        return TaskSample(
            task=self.name,
            input_ids=composition.input_ids,
            answers=[values[-1]],
            answer_ids=answer_ids,
            metric="all",
            depth=first_depth,
            needle_spans=spans[:1],
            max_new_tokens=len(answer_ids) + 2,
            meta={
                "context_span": composition.context_span,
                "answer_text": answer_text,
                "key": keys[-1],
                "distance": distances[0],
                "query_distances": [*distances[1:], distances[0]],
                "min_distance": self.min_distance,
            },
        )
