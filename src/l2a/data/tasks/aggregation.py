"""Aggregation tasks of RULER: common words extraction (cwe) and frequent words extraction (fwe).

The answer depends on the whole context (counting), so there are no needles: ``needle_spans`` is empty
and ``depth`` None. The length is fitted by the number of list items / words (one item of granularity).
"""

from __future__ import annotations

import random
import string
from collections import Counter
from dataclasses import dataclass
from itertools import accumulate
from typing import Any

from l2a.data.tasks.base import TaskSample
from l2a.data.tasks.text import answer_token_ids, english_then_pseudo_words, fit_count, length_tolerance
from l2a.data.tokenization import encode, encode_with_offsets, special_prefix


def _context_span(tokenizer: Any, text: str, start: int, end: int, shift: int) -> tuple[int, int]:
    _, offsets = encode_with_offsets(tokenizer, text)
    first = next(i for i, (_, e) in enumerate(offsets) if e > start)
    last = max(i for i, (s, _) in enumerate(offsets) if s < end)
    return first + shift, last + 1 + shift


def _check_fit(task: str, got: int, length: int) -> None:
    if length - got > length_tolerance(length):
        raise RuntimeError(f"{task}: could not fit {length} tokens (got {got})")


def _list_answer_sample(
    task: Any, tokenizer: Any, head: list[int], items: list[str], length: int, answers: list[str], **meta: Any
) -> TaskSample:
    """The sample of `task`'s prompt over `items` (`task._prompt`: prefix, body, suffix), answered by naming
    all of `answers`; `meta` is added to the sample's meta."""
    prefix, body, suffix = task._prompt(items)
    text = prefix + body + suffix
    input_ids = head + encode(tokenizer, text)
    _check_fit(task.name, len(input_ids), length)
    answer_text = " " + ", ".join(answers)
    answer_ids = answer_token_ids(tokenizer, answer_text)
    return TaskSample(
        task=task.name,
        input_ids=input_ids,
        answers=answers,
        answer_ids=answer_ids,
        metric="all",
        depth=None,
        needle_spans=[],
        max_new_tokens=max(task.max_new_tokens, 2 * len(answer_ids)),
        meta={
            "context_span": _context_span(tokenizer, text, len(prefix), len(prefix) + len(body), len(head)),
            "answer_text": answer_text,
            **meta,
        },
    )


@dataclass
class CommonWordsTask:
    """RULER's common words extraction: a numbered list where ``num_common`` words appear
    ``freq_common`` times and the others ``freq_uncommon`` times (or fewer); name the common ones.

    ``freq_common`` is lowered for short lengths so that the common words take at most half of the prompt
    (as short RULER contexts cannot hold 10 × 30 items); the value used is ``meta["freq_common"]`` and it
    stays above ``freq_uncommon + 1``.
    """

    name: str = "cwe"
    freq_common: int = 30
    freq_uncommon: int = 3
    num_common: int = 10
    max_new_tokens: int = 120

    def __post_init__(self) -> None:
        if self.num_common < 1 or self.freq_uncommon < 1 or self.freq_common <= self.freq_uncommon + 1:
            raise ValueError(
                f"{self.name}: need num_common >= 1, freq_uncommon >= 1, freq_common > freq_uncommon + 1"
            )

    def _prompt(self, items: list[str]) -> tuple[str, str, str]:
        prefix = (
            "Below is a numbered list of words. In these words, some appear more often than others. "
            "Memorize the ones that appear most often.\n"
        )
        body = " ".join(f"{i}. {word}" for i, word in enumerate(items, 1))
        suffix = (
            f"\nQuestion: What are the {self.num_common} most common words in the above list? "
            f"Answer: The top {self.num_common} words that appear most often in the list are:"
        )
        return prefix, body, suffix

    def sample(
        self, tokenizer: Any, length: int, rng: random.Random, *, depth: float | None = None
    ) -> TaskSample:
        if depth is not None:
            raise ValueError(f"{self.name} has no needle: depth must be None")
        head = special_prefix(tokenizer)
        seed = rng.getrandbits(64)
        prefix, _, suffix = self._prompt([])
        base = len(head) + len(encode(tokenizer, prefix + suffix))
        upper = max(0, length - base) // 2 + 1  # every item costs at least two tokens ("k." and the word)
        words = english_then_pseudo_words(
            random.Random(seed), self.num_common + upper // self.freq_uncommon + 1
        )
        common, uncommon = words[: self.num_common], words[self.num_common :]

        def items(freq: int, count: int) -> list[str]:
            listed = common * freq + [uncommon[i // self.freq_uncommon] for i in range(count)]
            random.Random(seed + 1).shuffle(listed)
            return listed

        def measure(freq: int, count: int) -> int:
            return len(head) + len(encode(tokenizer, "".join(self._prompt(items(freq, count)))))

        floor = self.freq_uncommon + 2
        if measure(floor, 0) > (length + base) // 2:
            raise ValueError(
                f"{self.name}: length {length} is too short: {self.num_common} common words × {floor} need "
                f"~{2 * (measure(floor, 0) - base)} tokens with the uncommon ones"
            )
        freq = fit_count(lambda f: measure(f, 0), (length + base) // 2, floor, self.freq_common, self.name)
        count = fit_count(lambda c: measure(freq, c), length, 0, upper, self.name, slack=4)
        listed = items(freq, count)
        return _list_answer_sample(
            self, tokenizer, head, listed, length, list(common), freq_common=freq, num_items=len(listed)
        )


def _coded_word(rng: random.Random) -> str:
    return "".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 6)))


@dataclass
class FrequentWordsTask:
    """RULER's frequent words extraction: coded words drawn from a Zipf law (exponent ``alpha``) over a
    ``vocab_size`` vocabulary; name the ``num_answers`` most frequent ones. Samples whose top counts tie
    are redrawn, so the answer is unique."""

    name: str = "fwe"
    alpha: float = 2.0
    num_answers: int = 3
    vocab_size: int = 1000
    max_new_tokens: int = 50

    def __post_init__(self) -> None:
        if self.alpha <= 0 or self.num_answers < 1 or self.vocab_size <= self.num_answers:
            raise ValueError(f"{self.name}: need alpha > 0, num_answers >= 1, vocab_size > num_answers")

    def _prompt(self, words: list[str]) -> tuple[str, str, str]:
        prefix = (
            "Read the following coded text and track the frequency of each coded word. "
            f"Find the {self.num_answers} most frequently appeared coded words.\n"
        )
        suffix = (
            f"\nQuestion: What are the {self.num_answers} most frequently appeared words in the above coded "
            f"text? Answer: According to the coded text above, the {self.num_answers} most frequently "
            "appeared words are:"
        )
        return prefix, " ".join(words), suffix

    def sample(
        self, tokenizer: Any, length: int, rng: random.Random, *, depth: float | None = None
    ) -> TaskSample:
        if depth is not None:
            raise ValueError(f"{self.name} has no needle: depth must be None")
        head = special_prefix(tokenizer)
        prefix, _, suffix = self._prompt([])
        base = len(head) + len(encode(tokenizer, prefix + suffix))
        upper = max(1, length - base)
        cumulative = list(accumulate(rank ** (-self.alpha) for rank in range(1, self.vocab_size + 1)))
        for _ in range(100):
            seed = rng.getrandbits(64)
            draw = random.Random(seed)
            vocab: list[str] = []
            seen: set[str] = set()
            while len(vocab) < self.vocab_size:
                word = _coded_word(draw)
                if word not in seen:
                    seen.add(word)
                    vocab.append(word)
            stream = draw.choices(vocab, cum_weights=cumulative, k=upper)

            def measure(count: int, stream: list[str] = stream) -> int:
                return len(head) + len(encode(tokenizer, "".join(self._prompt(stream[:count]))))

            count = fit_count(measure, length, 1, upper, self.name, slack=4)
            ranked = Counter(stream[:count]).most_common(self.num_answers + 1)
            k = self.num_answers
            if len(ranked) > k and ranked[k - 1][1] == ranked[k][1]:
                continue  # a tie at the cut: the answer would be ambiguous
            break
        else:
            raise RuntimeError(f"{self.name}: could not draw a sample without ties at length {length}")
        answers = [word for word, _ in ranked[: self.num_answers]]
        counts = [n for _, n in ranked[: self.num_answers]]
        return _list_answer_sample(
            self, tokenizer, head, stream[:count], length, answers, counts=counts, num_words=count
        )
