import random
from itertools import islice

import pytest
import torch

from l2a.data import IGNORE_INDEX, MixedDataset, PackedDataset, TaskSampler
from l2a.data.tasks import get_task

TEXT = [f"plain text document number {i}. " * (i % 5 + 1) for i in range(200)]


def mixed(tokenizer, task_loss="all", separate=True, seed=3):
    text = PackedDataset(TEXT, 256, tokenizer=tokenizer, separate_documents=separate)
    sampler = TaskSampler(get_task("kv_retrieval", min_distance=32), tokenizer, min_length=128)
    return MixedDataset(text, sampler, task_ratio=0.5, seed=seed, task_loss=task_loss)


def is_task_row(tokenizer, row):
    return (row["input_ids"] == tokenizer.pad_token_id).any() or b"plain" not in bytes(
        [t for t in row["input_ids"].tolist() if t < 256]
    )


def test_rows_and_labels(byte_tok):
    rows = list(islice(mixed(byte_tok), 40))
    kinds = [is_task_row(byte_tok, row) for row in rows]
    assert 8 < sum(kinds) < 32  # both kinds, about half each
    for row, task in zip(rows, kinds):
        assert row["input_ids"].shape == row["labels"].shape == row["position_ids"].shape == (256,)
        assert row["cu_seqlens"][-1] == 256
        if task:
            pad = row["input_ids"] == byte_tok.pad_token_id
            assert (row["labels"][pad] == IGNORE_INDEX).all()
            assert (row["labels"][~pad][1:] == row["input_ids"][~pad][1:]).all()  # "all": every token


def test_answer_only_loss(byte_tok):
    for row in islice(mixed(byte_tok, task_loss="answer"), 30):
        if not is_task_row(byte_tok, row):
            continue
        labelled = (row["labels"] != IGNORE_INDEX).nonzero().flatten()
        answer = bytes(row["labels"][labelled].tolist()[:-1])  # the answer ids end with eos
        assert answer.startswith(b" ") and answer[1:].isdigit()
        text = bytes([t for t in row["input_ids"][: labelled[0]].tolist() if t < 256]).decode()
        key = text.rsplit("\n", 1)[1].removesuffix(":")
        assert f"{key}:{answer.decode()}" in text  # the labelled answer is the queried key's value


def test_deterministic_and_resumable(byte_tok):
    full = list(islice(mixed(byte_tok), 30))
    again = list(islice(mixed(byte_tok), 30))
    other = list(islice(mixed(byte_tok, seed=4), 30))
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(full, again))
    assert not all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(full, other))
    first = mixed(byte_tok)
    head = list(islice(iter(first), 11))
    resumed = mixed(byte_tok)
    resumed.load_state_dict(first.state_dict())
    tail = list(islice(iter(resumed), 19))
    for got, want in zip(head + tail, full):
        for key in want:
            assert torch.equal(got[key], want[key])


def test_task_rows_without_document_separation(byte_tok):
    for row in islice(mixed(byte_tok, separate=False), 10):
        assert row["cu_seqlens"].tolist() == [0, 256]
        assert row["position_ids"].tolist() == list(range(256))


def test_sampler_and_errors(byte_tok):
    sampler = TaskSampler(["kv_retrieval", "niah_single_1"], byte_tok, weights=[0.0, 1.0])
    assert sampler.sample(random.Random(0), 1024).task == "niah_single_1"
    with pytest.raises(ValueError, match="weights"):
        TaskSampler(["kv_retrieval"], byte_tok, weights=[1.0, 2.0])
    text = PackedDataset(TEXT, 256, tokenizer=byte_tok)
    with pytest.raises(ValueError, match="task_ratio"):
        MixedDataset(text, sampler, task_ratio=1.5, seed=0)
    with pytest.raises(ValueError, match="task_loss"):
        MixedDataset(text, sampler, task_ratio=0.5, seed=0, task_loss="prompt")
