"""Building blocks of the task generators: random keys/values/words, haystacks, and length fitting.

`compose` lays out ``prefix + haystack-with-needles + suffix`` so that the tokenised prompt has the
requested length: it tokenises the haystack once, cuts it at a token boundary, inserts the needles at
the last word/sentence boundary before their depths, tokenises the whole text, and corrects the haystack
budget by the measured difference (tokens can merge across the seams) until the length is met.
"""

from __future__ import annotations

import bisect
import random
import re
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from l2a.data.corpora import iter_documents
from l2a.data.tokenization import encode, encode_with_offsets, special_prefix

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
"""RULER's repeated noise haystack."""

_ADJECTIVES_TEXT = """
    able absent acid agile airy alert amber ample ancient angry arctic ashen aware bitter blank bold
    brave brief bright brisk broad bronze busy calm candid cheap chilly civil clean clever cloudy coarse
    cold cosmic cozy crisp cruel curly damp dark dear deep dense dizzy dry dull eager early earthy easy
    empty equal exact faint fair false famous fancy fast fierce fine firm flat fluffy fond fresh frosty
    funny fuzzy gentle giant glad gloomy golden grand grassy great green grim gritty happy hardy harsh
    hasty heavy hidden hollow honest humble hungry icy idle jolly keen kind large lazy lean level light
    likely little lively lonely loud lucky lunar mad magic major mellow merry mighty mild minor misty
    modern modest moist muddy narrow neat nervous noble noisy odd olive open orange pale plain plucky
    polite proud pure quick quiet rapid rare raw ready regal rich rigid ripe rocky rough round royal
    rusty sad salty sandy scarlet secret shaggy sharp shiny short shy silent silky silly simple sleepy
    slim slow small smart smooth snowy soft solar solid sour spare spicy steady steep stiff stormy
    strict strong sturdy subtle sunny super sweet swift tall tame tender tense thick thin tidy tiny
    tough tricky vast vivid warm wary weary wet wide wild windy wise witty young zany zealous
"""
ADJECTIVES = tuple(_ADJECTIVES_TEXT.split())

_NOUNS_TEXT = """
    acorn anchor apple arrow artist badge bakery banjo barn basket beacon beaver bell bicycle bison
    blanket boat bottle boulder bracket branch bread bridge brush bucket butter button cabin cactus
    camera candle canoe canyon carpet carrot castle cave cedar chair cherry chimney cinema circus cliff
    clock cloud coat comet compass copper cottage cotton crab crane crater crayon crown crystal cup
    curtain daisy desert diamond dolphin donkey dragon drum eagle easel engine falcon feather fence fern
    fiddle flag flute forest fossil fountain fox garden garlic gate geyser ginger glacier goat grape
    guitar hammer harbor harp hat hawk helmet hill honey horizon horse island ivory jacket jaguar jar
    kettle kite ladder lagoon lake lamp lantern lemon lily lion lizard lobster magnet mango maple marble
    meadow melon mirror mitten monkey moon mountain mushroom needle nest oak ocean olive onion orchard
    otter owl oyster paddle palace panda parrot peach pebble pencil pepper piano pigeon pillow pine
    planet plum pond potato pumpkin puzzle quilt rabbit radio raven ribbon river robin rocket saddle
    salmon sandal scarf shell shovel silver sled snail spider spoon squirrel stable star statue stone
    stove sugar sunset swan sword table teapot tent thimble tiger tomato tower tractor trumpet tulip
    turtle umbrella valley vase violin volcano wagon walnut walrus whale whistle willow window wizard
    wolf yacht zebra
"""
NOUNS = tuple(_NOUNS_TEXT.split())

_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


def answer_token_ids(tokenizer: Any, answer_text: str) -> list[int]:
    """``answer_text`` encoded as a continuation of the prompt, followed by eos when the tokenizer has one."""
    eos = getattr(tokenizer, "eos_token_id", None)
    return encode(tokenizer, answer_text) + ([eos] if eos is not None else [])


def word_key(rng: random.Random) -> str:
    """An adjective–noun key such as ``"brisk-lantern"`` (as RULER's word keys)."""
    return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"


def number(rng: random.Random, digits: int = 7) -> str:
    """A ``digits``-digit decimal number without a leading zero."""
    return str(rng.randrange(10 ** (digits - 1), 10**digits))


def uuid_string(rng: random.Random) -> str:
    """A version-4 UUID drawn from ``rng`` (deterministic, unlike `uuid.uuid4`)."""
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def make_item(kind: str, rng: random.Random) -> str:
    """A random key/value of a kind: "words", "numbers" or "uuids"."""
    if kind == "words":
        return word_key(rng)
    if kind == "numbers":
        return number(rng)
    if kind == "uuids":
        return uuid_string(rng)
    raise ValueError(f"item kind must be 'words', 'numbers' or 'uuids', got {kind!r}")


def distinct(make: Callable[[], str], count: int, exclude: set[str], what: str) -> list[str]:
    """``count`` values of ``make()`` not in ``exclude`` and not repeated; adds them to ``exclude``."""
    values: list[str] = []
    for _ in range(100 * count + 100):
        if len(values) == count:
            break
        value = make()
        if value not in exclude:
            exclude.add(value)
            values.append(value)
    if len(values) < count:
        raise ValueError(f"could not draw {count} distinct {what}: the space of values is too small")
    return values


def pseudo_words(rng: random.Random, count: int, exclude: set[str]) -> list[str]:
    """``count`` distinct pronounceable nonsense words (2–3 consonant–vowel syllables) not in ``exclude``."""

    def make() -> str:
        return "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(rng.choice((2, 3))))

    return distinct(make, count, exclude, "pseudo-words")


def english_then_pseudo_words(rng: random.Random, count: int) -> list[str]:
    """``count`` distinct words: shuffled English nouns and adjectives first, pseudo-words beyond them."""
    pool = sorted(set(NOUNS) | set(ADJECTIVES))
    rng.shuffle(pool)
    words = pool[:count]
    if len(words) < count:
        words += pseudo_words(rng, count - len(words), set(words))
    return words


@lru_cache(maxsize=8)
def corpus_pool(corpus: str | tuple[str, ...], max_chars: int) -> str:
    """The first ``max_chars`` characters of a corpus (documents joined by blank lines), cached."""
    parts: list[str] = []
    total = 0
    source = list(corpus) if isinstance(corpus, tuple) else corpus
    for document in iter_documents(source):
        parts.append(document.strip("\n") + "\n\n")
        total += len(parts[-1])
        if total >= max_chars:
            break
    if not parts:
        raise ValueError(f"corpus {corpus!r} has no documents")
    return "".join(parts)[:max_chars]


Haystack = Callable[[int, int], tuple[str, list[int]]]
"""``haystack(seed, min_chars) -> (text, boundaries)``: at least ``min_chars`` characters of filler
(a longer request with the same seed extends the same text) and the sorted character positions where
needles may be inserted."""

_WORD_START = re.compile(r"(?<=\s)\S")


def word_boundaries(text: str) -> list[int]:
    return [0, *(match.start() for match in _WORD_START.finditer(text))]


def noise_haystack(seed: int, min_chars: int) -> tuple[str, list[int]]:
    """RULER's noise sentences repeated; needles go between sentences."""
    del seed  # the noise is the same for every sample
    block = NOISE + " "
    text = block * (min_chars // len(block) + 1)
    return text, [m.start() for m in re.finditer(r"(?:^|(?<=\. ))\S", text)]


def corpus_haystack(corpus: str | tuple[str, ...], max_chars: int) -> Haystack:
    """Corpus text from a random line of the pool on (wrapping around); needles go between words."""

    def haystack(seed: int, min_chars: int) -> tuple[str, list[int]]:
        pool = corpus_pool(corpus, max_chars)
        start = random.Random(seed).randrange(len(pool))
        start = pool.find("\n", start) + 1  # 0 when there is no later newline: wrap to the start
        repeats = (start + min_chars) // len(pool) + 1
        text = (pool * (repeats + 1))[start : start + min_chars]
        return text, word_boundaries(text)

    return haystack


def items_haystack(make: Callable[[random.Random], str]) -> Haystack:
    """Random items (e.g. distractor needles or key=value pairs) separated by spaces; needles go between
    items. ``make(rng)`` draws one item."""

    def haystack(seed: int, min_chars: int) -> tuple[str, list[int]]:
        rng = random.Random(seed)
        parts, boundaries, total = [], [], 0
        while total < min_chars:
            boundaries.append(total)
            parts.append(make(rng) + " ")
            total += len(parts[-1])
        return "".join(parts), boundaries

    return haystack


@dataclass
class Composition:
    """A fitted prompt: ids, spans of the needles (in the order given), the context span, the text."""

    input_ids: list[int]
    needle_spans: list[tuple[int, int]]
    context_span: tuple[int, int]
    text: str


def length_tolerance(length: int) -> int:
    """Allowed |len(input_ids) − length|: 8 tokens or 2%, whichever is larger."""
    return max(8, length // 50)


def _token_span(starts: list[int], ends: list[int], start: int, end: int, shift: int) -> tuple[int, int]:
    """[first, last + 1) of the tokens overlapping characters [start, end), shifted by ``shift``."""
    first = bisect.bisect_right(ends, start)
    last = bisect.bisect_left(starts, end)
    return first + shift, max(last, first + 1) + shift


def compose(
    tokenizer: Any,
    length: int,
    *,
    prefix: str,
    suffix: str,
    needles: Sequence[str],
    depths: Sequence[float],
    haystack: Haystack,
    seed: int,
    task: str,
) -> Composition:
    """Fit ``prefix + haystack (with needles inserted) + suffix`` to ``length`` tokens.

    Args:
        needles: texts inserted into the haystack (each followed by a space).
        depths: relative position in [0, 1] of each needle within the context; needles at equal positions
            keep their order.
        haystack: the filler generator; ``seed`` picks its text.
        task: name used in error messages.

    Returns:
        the composition; ``input_ids`` starts with the tokenizer's own special prefix (e.g. bos).
    """
    if len(needles) != len(depths):
        raise ValueError(f"{len(needles)} needles but {len(depths)} depths")
    if any(not 0.0 <= d <= 1.0 for d in depths):
        raise ValueError(f"{task}: depths must lie in [0, 1], got {list(depths)}")
    head = special_prefix(tokenizer)
    fixed = len(head) + len(encode(tokenizer, prefix)) + len(encode(tokenizer, suffix))
    needle_tokens = [len(encode(tokenizer, needle + " ")) for needle in needles]
    fixed += sum(needle_tokens)
    budget = length - fixed
    if budget < 0:
        raise ValueError(
            f"{task}: length {length} is too short, the prompt without filler has ~{fixed} tokens"
        )

    probe = haystack(seed, 4096)[0]
    chars_per_token = len(probe) / max(1, len(encode(tokenizer, probe)))
    min_chars = int(budget * chars_per_token * 1.1) + 256
    while True:
        hay, boundaries = haystack(seed, min_chars)
        _, hay_offsets = encode_with_offsets(tokenizer, hay)
        if len(hay_offsets) > budget + length_tolerance(length) + 16:
            break
        min_chars *= 2
    order = sorted(range(len(needles)), key=lambda i: depths[i])  # stable: ties keep their order

    best: Composition | None = None
    tried: set[int] = set()
    while budget not in tried:
        tried.add(budget)
        cut = hay_offsets[budget - 1][1] if budget > 0 else 0
        allowed = boundaries[: bisect.bisect_right(boundaries, cut)] + [cut]
        pieces, spans, position, before = [prefix], [(0, 0)] * len(needles), 0, 0
        for i in order:
            # Depth is relative to the whole context (haystack + needles): discount the needles before it.
            token = min(max(0, round(depths[i] * (budget + sum(needle_tokens)) - before)), budget)
            before += needle_tokens[i]
            wanted = hay_offsets[token][0] if token < budget else cut
            # The last boundary at or before the wanted position: a needle never lands later than asked,
            # so a minimum distance to the question (kv_retrieval) holds.
            at = max(allowed[bisect.bisect_right(allowed, wanted) - 1], position)
            pieces.append(hay[position:at])
            if at == cut and cut > 0 and not hay[cut - 1].isspace():
                pieces.append(" ")  # the cut fell inside a word: do not glue the needle onto it
            start = sum(map(len, pieces))
            spans[i] = (start, start + len(needles[i]))
            pieces.append(needles[i] + " ")
            position = at
        pieces += [hay[position:cut], suffix]
        text = "".join(pieces)
        ids, offsets = encode_with_offsets(tokenizer, text)
        starts, ends = [o[0] for o in offsets], [o[1] for o in offsets]
        context = _token_span(starts, ends, len(prefix), len(text) - len(suffix), len(head))
        composition = Composition(
            input_ids=head + ids,
            needle_spans=[_token_span(starts, ends, a, b, len(head)) for a, b in spans],
            context_span=context,
            text=text,
        )
        error = len(composition.input_ids) - length
        if best is None or (abs(error), error > 0) < (
            abs(len(best.input_ids) - length),
            len(best.input_ids) > length,
        ):
            best = composition
        if error == 0:
            break
        budget = min(max(0, budget - error), len(hay_offsets))
    if abs(len(best.input_ids) - length) > length_tolerance(length):
        raise RuntimeError(f"{task}: could not fit {length} tokens (got {len(best.input_ids)})")
    return best


def fit_count(
    measure: Callable[[int], int], length: int, lower: int, upper: int, task: str, slack: int = 0
) -> int:
    """A count in [lower, upper] whose ``measure(count)`` (a token length growing with the count) is at
    most ``length`` and at least ``length - slack`` if one exists, else the largest one under ``length``.

    Secant steps first (the length is nearly linear in the count: a few tokenisations even at 128K
    tokens), then bisection on the bracket they leave. Raises if even ``lower`` is too long.
    """
    low_value = measure(lower)
    if low_value > length:
        raise ValueError(f"{task}: length {length} is too short (the smallest prompt has {low_value} tokens)")
    high, high_value = upper + 1, None  # counts >= high are known (or assumed) to be too long
    for _ in range(8):
        if length - low_value <= slack or lower >= high - 1:
            return lower
        if high_value is None:
            per_count = max((low_value - measure(0)) / lower, 1e-3) if lower > 0 else 1.0
            guess = lower + int((length - low_value) / per_count)
        else:
            guess = lower + int((length - low_value) * (high - lower) / max(1, high_value - low_value))
        guess = min(max(guess, lower + 1), high - 1)
        value = measure(guess)
        if value <= length:
            lower, low_value = guess, value
        else:
            high, high_value = guess, value
    while lower < high - 1:
        middle = (lower + high) // 2
        value = measure(middle)
        if value <= length:
            lower, low_value = middle, value
        else:
            high = middle
    return lower
