"""Task generators: length fitting, needle depth, determinism, answers in the context, oracle scoring."""

import random
import re
from collections import Counter

import pytest
from tokenizers import processors
from transformers import PreTrainedTokenizerFast

from l2a.data.tasks import RULER_TASKS, TASKS, TaskSample, get_task, length_tolerance, score_samples

NEEDLE_TASKS = [name for name in TASKS if name not in ("cwe", "fwe")]


def draw(name, tokenizer, length, seed=0, **kwargs):
    return get_task(name).sample(tokenizer, length, random.Random(seed), **kwargs)


def text_of(tokenizer, sample):
    return tokenizer.decode(sample.input_ids)


def oracle(tokenizer, sample: TaskSample) -> str:
    """Answer by reading the prompt only (not ``sample.answers``)."""
    text = text_of(tokenizer, sample)
    if sample.task.startswith("niah"):
        query = re.search(r"What are all the special magic \w+ for (.+?) mentioned", text).group(1)
        keys = re.split(r", | and ", query)
        return ", ".join(v for k in keys for v in re.findall(rf"for {re.escape(k)} is: (\S+)\.", text))
    if sample.task == "vt":
        value = re.search(r"assigned the value (\d+) in the text above", text).group(1)
        assigned = dict(re.findall(r"VAR (\w+) = ((?:VAR )?\w+)\.", text))
        names = {n for n, v in assigned.items() if v == value}
        while grown := {n for n, v in assigned.items() if v.removeprefix("VAR ") in names} - names:
            names |= grown
        return " ".join(sorted(names))
    if sample.task == "cwe":
        words = re.findall(r"\d+\. (\w+)", text.split("\nQuestion:")[0])
        number = int(re.search(r"What are the (\d+) most common", text).group(1))
        return ", ".join(w for w, _ in Counter(words).most_common(number))
    if sample.task == "fwe":
        body = text.split("coded words.\n", 1)[1].split("\nQuestion:")[0]
        return ", ".join(w for w, _ in Counter(body.split()).most_common(3))
    if sample.task == "kv_retrieval":
        key = text.rsplit("\n", 1)[1].removesuffix(":")
        return re.search(rf"(?:^|\s){key}: (\d+)", text).group(1)
    raise AssertionError(sample.task)


LENGTHS = {"byte": [1536, 4000], "bpe": [1024, 4000]}


@pytest.mark.parametrize("length_index", [0, 1], ids=["short", "long"])
@pytest.mark.parametrize("name", list(TASKS))
def test_length_within_tolerance(name, tokenizer, length_index):
    length = LENGTHS["byte" if tokenizer.eos_token_id == 258 else "bpe"][length_index]
    sample = draw(name, tokenizer, length)
    assert abs(len(sample.input_ids) - length) <= length_tolerance(length)
    assert all(0 <= i < len(tokenizer) for i in sample.input_ids + sample.answer_ids)
    assert sample.answer_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(sample.answer_ids[:-1]) == sample.meta["answer_text"]
    start, end = sample.meta["context_span"]
    assert 0 <= start < end <= len(sample.input_ids)
    assert sample.max_new_tokens >= len(sample.answer_ids)


@pytest.mark.parametrize("depth", [0.0, 0.35, 0.8], ids=lambda d: f"depth{d}")
@pytest.mark.parametrize("name", NEEDLE_TASKS)
def test_needle_at_requested_depth(name, tokenizer, depth):
    length = 2048
    if name == "kv_retrieval":
        depth = min(depth, 0.7)  # the needle must stay min_distance tokens before the query
    sample = draw(name, tokenizer, length, depth=depth)
    start, end = sample.meta["context_span"]
    needle = sample.needle_spans[0][0]
    assert sample.depth == depth
    # Needles go to the last sentence/word/item boundary before the depth: at most one haystack unit early
    # (an item of the "needles" haystack is as long as a needle).
    unit = sample.needle_spans[0][1] - sample.needle_spans[0][0] + 40
    relative = (needle - start) / (end - start)
    assert depth - 0.01 - unit / (end - start) <= relative <= depth + 0.01


@pytest.mark.parametrize("name", list(TASKS))
def test_deterministic_by_seed(name, byte_tok):
    a, b, c = (draw(name, byte_tok, 2048, seed=seed) for seed in (5, 5, 6))
    assert a == b
    assert a.input_ids != c.input_ids and a.answers != c.answers


@pytest.mark.parametrize("name", NEEDLE_TASKS)
def test_answers_in_needles(name, tokenizer):
    sample = draw(name, tokenizer, 2048, seed=1)
    needles = [tokenizer.decode(sample.input_ids[a:b]) for a, b in sample.needle_spans]
    if name == "vt":
        assert len(needles) == len(sample.answers)
        for needle, variable in zip(needles, sample.answers):
            assert f"VAR {variable} =" in needle
        return
    assert len(needles) == len(sample.answers)
    for needle, answer in zip(needles, sample.answers):
        assert answer in needle
        assert text_of(tokenizer, sample).count(answer) == 1


@pytest.mark.parametrize("name", ["cwe", "fwe"])
def test_aggregation_answers_are_most_frequent(name, tokenizer):
    sample = draw(name, tokenizer, 2048, seed=1)
    start, end = sample.meta["context_span"]
    words = Counter(re.findall(r"[a-z]+", tokenizer.decode(sample.input_ids[start:end])))
    counts = sorted(words.values(), reverse=True)
    k = len(sample.answers)
    assert sorted(words[a] for a in sample.answers) == sorted(counts[:k])
    assert counts[k - 1] > counts[k]  # a unique answer


@pytest.mark.parametrize("name", list(TASKS))
def test_oracle_scores_100_and_constant_near_0(name, tokenizer):
    samples = [draw(name, tokenizer, 2048, seed=seed) for seed in range(3)]
    assert score_samples([oracle(tokenizer, s) for s in samples], samples) == 100.0
    assert score_samples(["42"] * len(samples), samples) <= 10.0


def test_kv_retrieval_distance_and_tiny_lengths(byte_tok):
    task = get_task("kv_retrieval", min_distance=96)
    for seed in range(20):
        for length in (256, 512, 1024):
            sample = task.sample(byte_tok, length, random.Random(seed))
            assert len(sample.input_ids) == length
            assert sample.meta["distance"] == length - sample.needle_spans[0][1] >= 96
            assert sample.answer_ids == [*f" {sample.answers[0]}".encode(), byte_tok.eos_token_id]
            assert byte_tok.decode(sample.input_ids).endswith(f"\n{sample.meta['key']}:")


def test_kv_retrieval_options(byte_tok):
    sample = get_task("kv_retrieval", num_queries=3, value_digits=4).sample(byte_tok, 512, random.Random(0))
    text = byte_tok.decode(sample.input_ids)
    assert len(sample.meta["query_distances"]) == 3 and len(sample.answers[0]) == 4
    assert len(re.findall(r"\n[a-z]{3}: \d{4}", text)) == 2  # the earlier queries come answered
    corpus = get_task("kv_retrieval", filler="corpus").sample(byte_tok, 1024, random.Random(0))
    assert len(re.findall(r"(?<![a-z])[a-z]{3}: \d{3}", byte_tok.decode(corpus.input_ids))) >= 9
    with pytest.raises(ValueError, match="min_distance"):
        get_task("kv_retrieval", min_distance=200).sample(byte_tok, 256, random.Random(0), depth=0.9)
    with pytest.raises(ValueError, match="num_pairs"):
        get_task("kv_retrieval", num_pairs=4)


def test_corpus_directory_haystack(tmp_path, byte_tok):
    (tmp_path / "story.txt").write_text("Once upon a time a fox crossed the quiet meadow at dawn.\n" * 20)
    sample = get_task("niah_single_2", corpus=str(tmp_path)).sample(byte_tok, 1024, random.Random(0))
    assert "fox crossed the quiet meadow" in byte_tok.decode(sample.input_ids)


def test_errors(byte_tok):
    with pytest.raises(KeyError, match="niah_single_1"):
        get_task("nope")
    with pytest.raises(ValueError, match="too short"):
        draw("niah_multiquery", byte_tok, 300)
    with pytest.raises(ValueError, match="too short"):
        draw("cwe", byte_tok, 300)
    with pytest.raises(ValueError, match="depth"):
        draw("niah_single_1", byte_tok, 1024, depth=1.5)
    with pytest.raises(ValueError, match="depth"):
        draw("cwe", byte_tok, 2048, depth=0.5)
    with pytest.raises(ValueError, match="num_queries"):
        get_task("niah_single_1", num_queries=2)


def test_registry_covers_ruler():
    assert len(RULER_TASKS) == 11 and "kv_retrieval" in TASKS
    assert get_task("niah_multikey_3").key_type == "uuids"
    assert get_task("vt", num_hops=2).num_hops == 2


def test_tokenizer_with_bos(bpe_tok):
    """A tokenizer that prepends bos by itself (as Llama's) gets it in front of every prompt."""
    backend = bpe_tok.backend_tokenizer.__class__.from_str(bpe_tok.backend_tokenizer.to_str())
    backend.add_special_tokens(["<s>"])
    bos = backend.token_to_id("<s>")
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="<|endoftext|>")
    for name in ("niah_single_2", "kv_retrieval", "cwe"):
        sample = draw(name, tok, 2048)
        assert sample.input_ids[0] == bos and bos not in sample.input_ids[1:]
        assert abs(len(sample.input_ids) - 2048) <= length_tolerance(2048)
        assert score_samples([oracle(tok, sample)], [sample]) == 100.0
        for start, end in sample.needle_spans:
            assert sample.answers[0] in tok.decode(sample.input_ids[start:end])
