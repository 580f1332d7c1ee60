"""The task runner end to end: an oracle scores 100, a constant model about 0, and a real tiny L2A model
runs through `model.generate` with its prefill routing recorded."""

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from l2a.data.tokenization import byte_tokenizer
from l2a.evaluation.tasks import build_task, evaluate_tasks, parse_task_arg, sample_tasks

TASKS = ["niah_single_1", "niah_multikey_2", "vt", "fwe", "kv_retrieval"]
LENGTHS = [768, 1024]


class _FakeGenerator(torch.nn.Module):
    """Stands in for an HF model in `evaluate_tasks`: ``generate`` appends ``reply(prompt)`` (capped at
    ``max_new_tokens``) to the prompt, as HF's greedy ``generate`` returns prompt + new tokens."""

    def __init__(self, reply):
        super().__init__()
        self.reply = reply
        self.calls = []

    def generate(self, input_ids, attention_mask, max_new_tokens, do_sample, pad_token_id, eos_token_id=None):
        assert input_ids.shape[0] == 1 and attention_mask.shape == input_ids.shape and do_sample is False
        self.calls.append(input_ids.shape[1])
        new = self.reply(tuple(input_ids[0].tolist()))[:max_new_tokens]
        return torch.cat([input_ids, torch.tensor([new], dtype=torch.long)], dim=1)


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


def test_oracle_scores_100(tokenizer):
    drawn = sample_tasks(tokenizer, TASKS, LENGTHS, samples=2, seed=3)
    oracle_answers = {}
    for samples in drawn.values():
        for sample in samples:
            prompt = tokenizer.decode(sample.input_ids)
            # the oracle's answer is read from the prompt: every needle-task answer is in a needle span
            for answer in sample.answers if sample.needle_spans else []:
                assert any(
                    answer in tokenizer.decode(sample.input_ids[a:b]) for a, b in sample.needle_spans
                ) or (answer in prompt)
            oracle_answers[tuple(sample.input_ids)] = sample.answer_ids
    oracle = _FakeGenerator(lambda prompt: oracle_answers[prompt])
    results = evaluate_tasks(oracle, tokenizer, TASKS, LENGTHS, samples=2, seed=3)
    assert [(r.task, r.length) for r in results] == [(t, n) for t in TASKS for n in LENGTHS]
    assert len(oracle.calls) == len(TASKS) * len(LENGTHS) * 2
    for result in results:
        assert result.score == 100.0, (result.task, result.length, [s.prediction for s in result.samples])
        assert result.num_samples == 2 and len(result.samples) == 2
        assert all(s.score == 100.0 and s.prompt_tokens > 0.9 * result.length for s in result.samples)
        assert result.router_fraction is None
    first = drawn["niah_single_1", 768][0]
    assert (
        results[0].samples[0].needle_distance
        == len(first.input_ids) - min(e for _, e in first.needle_spans)
        > 0
    )
    assert all(s.needle_distance is None for r in results if r.task == "fwe" for s in r.samples)


def test_constant_model_scores_about_zero(tokenizer):
    constant = _FakeGenerator(
        lambda prompt: tokenizer("I do not know.", add_special_tokens=False)["input_ids"]
    )
    results = evaluate_tasks(constant, tokenizer, TASKS, LENGTHS, samples=2, seed=3)
    for result in results:
        assert result.score <= 5.0
        assert all("I do not know.".startswith(s.prediction) for s in result.samples)  # cut at max_new_tokens


def test_half_right_model_scores_50(tokenizer):
    """Sample scores are averaged: answering only the even-indexed prompts gives 50."""
    drawn = sample_tasks(tokenizer, ["niah_single_1"], [512], samples=4, seed=1)["niah_single_1", 512]
    answers = {tuple(s.input_ids): (s.answer_ids if i % 2 == 0 else [32]) for i, s in enumerate(drawn)}
    results = evaluate_tasks(
        _FakeGenerator(answers.__getitem__), tokenizer, ["niah_single_1"], [512], 4, seed=1
    )
    assert results[0].score == 50.0
    assert [s.score for s in results[0].samples] == [100.0, 0.0, 100.0, 0.0]


def test_samples_are_reproducible_and_independent_of_the_task_list(tokenizer):
    one = sample_tasks(tokenizer, ["vt"], [512], 2, seed=5)["vt", 512]
    two = sample_tasks(tokenizer, ["niah_single_1", "vt"], [512, 640], 2, seed=5)["vt", 512]
    assert [s.input_ids for s in one] == [s.input_ids for s in two]
    other = sample_tasks(tokenizer, ["vt"], [512], 2, seed=6)["vt", 512]
    assert [s.input_ids for s in one] != [s.input_ids for s in other]


def test_tiny_l2a_model_through_generate(tokenizer):
    from l2a.models import convert_model

    config = Qwen3Config(
        vocab_size=259,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=2048,
        eos_token_id=258,
        pad_token_id=256,
    )
    model = convert_model(Qwen3ForCausalLM(config), sliding_window=64)
    results = evaluate_tasks(model, tokenizer, ["kv_retrieval"], [256], samples=2, seed=0)
    assert results[0].score <= 50.0  # random weights
    assert all(
        len(s.prediction) <= 7 * 4 for s in results[0].samples
    )  # max_new_tokens bytes (UTF-8 ≤ 4 each)
    # zero-initialised routers route every token: the recorded prefill fraction is 1 in both layers
    assert results[0].router_fraction == [1.0, 1.0]
    assert model.training  # the runner restores the training flag


def test_task_args_reach_the_prompts(tokenizer):
    """kv_retrieval defaults to 3-letter keys and 3-digit values; the overrides change the prompts."""
    default = sample_tasks(tokenizer, ["kv_retrieval"], [512], 3, seed=0)["kv_retrieval", 512]
    drawn = sample_tasks(
        tokenizer,
        ["kv_retrieval", "vt"],
        [512],
        3,
        seed=0,
        task_args={"kv_retrieval": {"key_chars": 2, "value_digits": 2, "num_queries": 2, "min_distance": 90}},
    )
    for samples, chars in ((default, 3), (drawn["kv_retrieval", 512], 2)):
        for sample in samples:
            key, prompt = sample.meta["key"], tokenizer.decode(sample.input_ids)
            assert len(key) == chars and prompt.endswith(f"\n{key}:")
            assert len(sample.answers[0]) == chars and sample.answers[0].isdigit()
    assert all(min(s.meta["query_distances"]) >= 90 for s in drawn["kv_retrieval", 512])
    assert all(s.meta["min_distance"] == 64 for s in default)
    # other tasks keep their prompts
    assert [s.input_ids for s in drawn["vt", 512]] == [
        s.input_ids for s in sample_tasks(tokenizer, ["vt"], [512], 3, seed=0)["vt", 512]
    ]


def test_task_args_reach_evaluate_tasks(tokenizer):
    model = _FakeGenerator(lambda prompt: [])
    results = evaluate_tasks(
        model, tokenizer, ["kv_retrieval"], [256], 2, task_args={"kv_retrieval": {"value_digits": 5}}
    )
    assert all(len(s.answers[0]) == 5 for s in results[0].samples)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("kv_retrieval.key_chars=2", ("kv_retrieval", "key_chars", 2)),
        ("kv_retrieval.filler=corpus", ("kv_retrieval", "filler", "corpus")),
        ("kv_retrieval.num_pairs=null", ("kv_retrieval", "num_pairs", None)),
        ("niah_single_1.x=1e-3", ("niah_single_1", "x", 1e-3)),
        ("cwe.flag=true", ("cwe", "flag", True)),
        ("vt.names=[a, b]", ("vt", "names", ["a", "b"])),
    ],
)
def test_parse_task_arg(text, expected):
    assert parse_task_arg(text) == expected


@pytest.mark.parametrize("text", ["kv_retrieval.key_chars", "key_chars=2", ".key_chars=2", "kv_retrieval.=2"])
def test_parse_task_arg_rejects_malformed(text):
    with pytest.raises(ValueError, match="TASK.KEY=VALUE"):
        parse_task_arg(text)


def test_bad_task_args_name_task_and_key(tokenizer):
    with pytest.raises(ValueError, match="task 'kv_retrieval' has no argument 'keychars'; its arguments: "):
        build_task("kv_retrieval", {"keychars": 2})
    with pytest.raises(ValueError, match="has no argument 'name'"):
        build_task("kv_retrieval", {"name": "other"})
    with pytest.raises(ValueError, match="task 'kv_retrieval': bad arguments .*'key_chars': 'two'"):
        build_task("kv_retrieval", {"key_chars": "two"})
    with pytest.raises(
        ValueError, match="task 'kv_retrieval' with arguments .*num_pairs applies to filler='corpus'"
    ):
        build_task("kv_retrieval", {"num_pairs": 3})
    with pytest.raises(ValueError, match="unknown task 'kv'"):
        build_task("kv")
    with pytest.raises(ValueError, match=r"task arguments given for \['vt'\], which are not among the tasks"):
        sample_tasks(tokenizer, ["kv_retrieval"], [256], 1, task_args={"vt": {"num_chains": 2}})
