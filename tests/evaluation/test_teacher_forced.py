"""Teacher-forced task scoring against models whose predictions are known exactly."""

import random
from types import SimpleNamespace

import pytest
import torch

from l2a.data import byte_tokenizer
from l2a.data.tasks import get_task, score_prediction
from l2a.evaluation.teacher_forced import answer_token_spans, score_teacher_forced


class Oracle(torch.nn.Module):
    """Predicts the true next token everywhere except at the positions in `wrong` ((row, position) pairs)."""

    def __init__(self, vocab: int, wrong=()):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.vocab, self.wrong = vocab, set(wrong)

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        nxt = torch.roll(input_ids, -1, dims=1)
        for b, t in self.wrong:
            nxt[b, t] = (nxt[b, t] + 1) % self.vocab
        return SimpleNamespace(logits=torch.nn.functional.one_hot(nxt, self.vocab).float())


@pytest.fixture(scope="module")
def samples():
    tok = byte_tokenizer()
    multi = get_task("niah_multivalue", corpus_chars=50_000)  # 4 answers, metric "all"
    return tok, [multi.sample(tok, 700, random.Random(i)) for i in range(2)]


def test_oracle_scores_100_and_matches_ruler_string_match(samples):
    tok, batch = samples
    scored = score_teacher_forced(Oracle(len(tok)), tok, batch, batch_size=2, pad_token_id=tok.pad_token_id)
    assert [s.score for s in scored] == [100.0, 100.0]
    for sample in batch:  # the oracle's continuation is the reference answer: RULER's score is 1 too
        assert score_prediction(sample.meta["answer_text"], sample.answers, sample.metric) == 1.0
    assert all(s.routed_fraction is None and s.needle_distance > 0 for s in scored)


def test_one_wrong_token_loses_exactly_that_answer(samples):
    tok, batch = samples
    spans = answer_token_spans(tok, batch[1])
    assert len(spans) == len(batch[1].answers) == 4
    for (begin, end), answer in zip(spans, batch[1].answers):
        assert tok.decode(batch[1].answer_ids[begin:end]) == answer
    # the logit at position p - 1 predicts token p: break the second answer's last token in row 1
    position = len(batch[1].input_ids) + spans[1][1] - 1
    model = Oracle(len(tok), wrong=[(1, position - 1)])
    scored = score_teacher_forced(model, tok, batch, batch_size=2, pad_token_id=tok.pad_token_id)
    assert [s.score for s in scored] == [100.0, 75.0]
