"""Perplexity by position: bucket edges and assignment by hand, a model with known per-position loss,
and `token_nll` against HF's own loss."""

import math
from types import SimpleNamespace

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from l2a.data.tokenization import byte_tokenizer
from l2a.evaluation.perplexity import bucket_nll, perplexity_by_position, position_buckets, token_nll


@pytest.mark.parametrize(
    ("seq_len", "spacing", "num", "edges"),
    [
        (16, "log", None, [1, 2, 4, 8, 16]),
        (10, "log", None, [1, 2, 4, 8, 10]),
        (2, "log", None, [1, 2]),
        (10, "linear", 3, [1, 4, 7, 10]),
        (9, "linear", None, [1, 2, 3, 4, 5, 6, 7, 8, 9]),
        (1000, "log", 3, [1, 10, 100, 1000]),
    ],
    ids=lambda x: str(x),
)
def test_position_buckets(seq_len, spacing, num, edges):
    assert position_buckets(seq_len, spacing, num) == edges


def test_position_buckets_rejects_bad_input():
    with pytest.raises(ValueError, match="seq_len"):
        position_buckets(1)
    with pytest.raises(ValueError, match="spacing"):
        position_buckets(8, "cubic")


def test_bucket_nll_by_hand():
    # nll entry p-1 belongs to position p; use the position itself as the loss
    nll = torch.arange(1, 8, dtype=torch.float32).repeat(2, 1)  # positions 1..7, two rows
    counts, sums = bucket_nll(nll, [1, 2, 4, 8])
    assert counts == [2, 4, 8]  # {1}, {2,3}, {4..7}, times 2 rows
    assert sums == [2.0, 10.0, 44.0]
    counts, sums = bucket_nll(nll, [3, 5])  # only positions 3 and 4
    assert counts == [4] and sums == [14.0]


class _KnownLossDecoder(torch.nn.Module):
    """Hidden state at p = logits that give the true next token probability q(p) = 1 / (p + 2)."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab

    def forward(self, input_ids, use_cache=False):
        b, n = input_ids.shape
        hidden = torch.zeros(b, n, self.vocab, dtype=torch.float64)
        q = 1.0 / (torch.arange(1, n + 1, dtype=torch.float64) + 2)  # position p = index + 1 of the target
        target_logit = torch.log(q * (self.vocab - 1) / (1 - q))
        hidden[:, :-1].scatter_(2, input_ids[:, 1:, None], target_logit[: n - 1].expand(b, -1)[..., None])
        return SimpleNamespace(last_hidden_state=hidden.float())


class _KnownLossModel(torch.nn.Module):
    base_model_prefix = "model"

    def __init__(self, vocab: int = 300):
        super().__init__()
        self.model = _KnownLossDecoder(vocab)
        self.head = torch.nn.Identity()
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def get_output_embeddings(self):
        return self.head


def test_perplexity_of_a_model_with_known_loss():
    tokenizer = byte_tokenizer()
    texts = ["x" * 40, "short", "abcdefghij" * 5]  # 40 and 50 bytes: windows of 16 → 2 + 3; "short" skipped
    report = perplexity_by_position(_KnownLossModel(), tokenizer, texts, 16, [1, 2, 4, 8, 16], batch_size=2)
    assert report.num_sequences == 5
    assert report.edges == [1, 2, 4, 8, 16]
    assert report.tokens == [5, 10, 20, 40]
    for (lo, hi), nll in zip([(1, 2), (2, 4), (4, 8), (8, 16)], report.nll):
        expected = sum(math.log(p + 2) for p in range(lo, hi)) / (hi - lo)
        assert nll == pytest.approx(expected, rel=1e-4)
    overall = sum(math.log(p + 2) for p in range(1, 16)) / 15
    assert report.overall_nll == pytest.approx(overall, rel=1e-4)
    assert report.ppl[0] == pytest.approx(3.0, rel=1e-4)


def test_perplexity_needs_long_enough_text():
    with pytest.raises(ValueError, match="no text has 64 tokens"):
        perplexity_by_position(_KnownLossModel(), byte_tokenizer(), ["tiny"], 64)


def test_token_nll_matches_hf_loss():
    config = Qwen3Config(
        vocab_size=259,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=128,
    )
    model = Qwen3ForCausalLM(config).eval()
    ids = torch.randint(0, 259, (2, 40))
    nll = token_nll(model, ids, chunk_size=7)  # chunks that do not divide N - 1
    with torch.no_grad():
        reference = model(input_ids=ids, labels=ids).loss
    assert nll.shape == (2, 39)
    torch.testing.assert_close(nll.mean(), reference, rtol=1e-5, atol=1e-5)
