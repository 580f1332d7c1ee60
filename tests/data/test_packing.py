import random
from itertools import islice

import pytest
import torch
from torch.utils.data import DataLoader

from l2a.data import IGNORE_INDEX, PackedDataset, collate_packed, pack_documents

EOS, PAD = 1000, 1001


def make_documents(count=40, seed=0, max_len=50):
    rng = random.Random(seed)
    # Ids below EOS, lengths from 0 (an eos-only document) to longer than a sequence.
    return [[rng.randrange(EOS) for _ in range(rng.randrange(max_len))] for _ in range(count)]


def expected_stream(documents):
    return [t for doc in documents for t in [*doc, EOS]]


def document_boundaries(documents):
    """Cumulative positions where documents start in the concatenated stream."""
    starts, position = [], 0
    for doc in documents:
        starts.append(position)
        position += len(doc) + 1
    return set(starts)


@pytest.mark.parametrize("seq_len", [7, 32, 64], ids=lambda n: f"N{n}")
def test_separate_documents(seq_len):
    documents = make_documents()
    rows = list(pack_documents(documents, seq_len, eos_token_id=EOS))
    stream = expected_stream(documents)
    assert len(rows) == len(stream) // seq_len
    flat = torch.cat([row["input_ids"] for row in rows]).tolist()
    assert flat == stream[: len(flat)]  # exact conservation, nothing lost or reordered
    starts = document_boundaries(documents)
    for index, row in enumerate(rows):
        offset = index * seq_len
        cu = row["cu_seqlens"]
        assert cu.dtype == torch.int32 and cu[0] == 0 and cu[-1] == seq_len
        # Segment boundaries are exactly the row start plus the document starts inside the row.
        inside = sorted(p - offset for p in starts if offset < p < offset + seq_len)
        assert cu.tolist() == [0, *inside, seq_len]
        for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
            assert row["position_ids"][a:b].tolist() == list(range(b - a))
            assert row["labels"][a] == IGNORE_INDEX
            assert torch.equal(row["labels"][a + 1 : b], row["input_ids"][a + 1 : b])
        assert row["input_ids"].dtype == row["labels"].dtype == row["position_ids"].dtype == torch.long


def test_joined_documents():
    documents = make_documents()
    rows = list(pack_documents(documents, 32, eos_token_id=EOS, separate_documents=False))
    for row in rows:
        assert row["cu_seqlens"].tolist() == [0, 32]
        assert row["position_ids"].tolist() == list(range(32))
        assert torch.equal(row["labels"], row["input_ids"])


def test_text_documents_with_tokenizer(byte_tok):
    documents = ["hello world", "é", "x" * 40]
    rows = list(pack_documents(documents, 16, tokenizer=byte_tok, drop_last=False))
    flat = torch.cat([row["input_ids"] for row in rows]).tolist()
    stream = [b for doc in documents for b in [*doc.encode(), byte_tok.eos_token_id]]
    assert flat[: len(stream)] == stream
    assert flat[len(stream) :] == [byte_tok.pad_token_id] * (len(flat) - len(stream))
    last = rows[-1]
    pad = len(flat) - len(stream)
    assert (last["labels"][-pad:] == IGNORE_INDEX).all()
    assert last["cu_seqlens"][-2].item() == 16 - pad  # the padding is its own segment


@pytest.mark.parametrize("stop", [0, 1, 5, 13], ids=lambda k: f"stop{k}")
@pytest.mark.parametrize("repeat", [False, True], ids=["once", "repeat"])
def test_resume_continues_identically(stop, repeat):
    documents = make_documents(count=12)
    limit = 40 if repeat else None  # with repeat the stream is endless: compare a window spanning epochs
    full = list(islice(PackedDataset(documents, 16, eos_token_id=EOS, repeat=repeat), limit))
    first = PackedDataset(documents, 16, eos_token_id=EOS, repeat=repeat)
    head = list(islice(iter(first), stop))
    state = first.state_dict()
    resumed = PackedDataset(documents, 16, eos_token_id=EOS, repeat=repeat)
    resumed.load_state_dict(state)
    tail = list(islice(iter(resumed), None if limit is None else limit - stop))
    assert len(head) + len(tail) == len(full)
    for got, want in zip(head + tail, full):
        for key in want:
            assert torch.equal(got[key], want[key]), key
    if repeat:
        assert resumed.state_dict()["epoch"] >= 1


def test_shards_partition_the_stream():
    documents = make_documents()
    full = list(PackedDataset(documents, 16, eos_token_id=EOS))
    shards = [
        list(PackedDataset(documents, 16, eos_token_id=EOS, num_shards=3, shard_index=i)) for i in range(3)
    ]
    for index, row in enumerate(full):
        assert torch.equal(shards[index % 3][index // 3]["input_ids"], row["input_ids"])


def test_collate_and_dataloader():
    documents = make_documents()
    dataset = PackedDataset(documents, 16, eos_token_id=EOS)
    single = next(iter(DataLoader(dataset, batch_size=1, collate_fn=collate_packed)))
    assert single["input_ids"].shape == (1, 16) and single["cu_seqlens"].ndim == 1
    batch = next(iter(DataLoader(dataset, batch_size=2, collate_fn=collate_packed)))
    assert batch["input_ids"].shape == batch["labels"].shape == batch["position_ids"].shape == (2, 16)
    assert "cu_seqlens" not in batch


def test_bad_arguments():
    with pytest.raises(TypeError, match="re-iterable"):
        PackedDataset((d for d in make_documents()), 16, eos_token_id=EOS)
    with pytest.raises(ValueError, match="eos"):
        PackedDataset(make_documents(), 16)
    with pytest.raises(ValueError, match="seq_len"):
        PackedDataset(make_documents(), 1, eos_token_id=EOS)
    with pytest.raises(ValueError, match="empty"):
        list(islice(PackedDataset([], 16, eos_token_id=EOS, repeat=True), 1))
