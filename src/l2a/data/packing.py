"""Packing documents into fixed-length training sequences, with document boundaries and exact resume.

Each yielded sequence is a dict of tensors (N = ``seq_len``):

- ``input_ids``   LongTensor (N,)
- ``labels``      LongTensor (N,): HF convention, aligned with ``input_ids`` (the model shifts them); -100
  where no loss is taken.
- ``position_ids`` LongTensor (N,)
- ``cu_seqlens``  IntTensor (S + 1,): cumulative lengths of the S segments of the row, ``[0, ..., N]``.

Every document gets an eos appended and is cut into as many sequences as it needs. With
``separate_documents=True`` each piece of a document is its own segment: ``cu_seqlens`` marks the
boundaries, ``position_ids`` restart at 0 in each segment, and the first label of every segment is -100
(it would be predicted from the previous document's eos, which the model cannot see across the
boundary; a document's own eos *is* predicted). With ``separate_documents=False`` the row is one segment:
positions run 0..N-1, ``cu_seqlens = [0, N]`` and every token is a label (the eos predicts the next
document, as in plain GPT pre-training).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info

from l2a.data.tokenization import encode

IGNORE_INDEX = -100


def build_sequence(
    input_ids: Sequence[int],
    segment_lengths: Sequence[int],
    *,
    separate_documents: bool,
    label_mask: Sequence[bool] | None = None,
) -> dict[str, torch.Tensor]:
    """Tensors of one packed row from its ids and the lengths of its segments (see module docstring).

    Args:
        input_ids: N ids.
        segment_lengths: lengths of the row's segments, summing to N.
        separate_documents: per-segment positions/cu_seqlens and no label at segment starts, or one segment.
        label_mask: N booleans, False where the label must be -100 regardless (e.g. padding).
    """
    n = len(input_ids)
    if sum(segment_lengths) != n or any(length <= 0 for length in segment_lengths):
        raise ValueError(f"segment lengths {list(segment_lengths)} do not partition a row of {n} tokens")
    ids = torch.tensor(input_ids, dtype=torch.long)
    labels = ids.clone()
    if label_mask is not None:
        labels[~torch.tensor(label_mask, dtype=torch.bool)] = IGNORE_INDEX
    if separate_documents:
        lengths = torch.tensor(segment_lengths, dtype=torch.long)
        cu_seqlens = torch.zeros(len(segment_lengths) + 1, dtype=torch.int32)
        cu_seqlens[1:] = torch.cumsum(lengths, 0)
        starts = cu_seqlens[:-1].long()
        position_ids = torch.arange(n) - torch.repeat_interleave(starts, lengths)
        labels[starts] = IGNORE_INDEX
    else:
        cu_seqlens = torch.tensor([0, n], dtype=torch.int32)
        position_ids = torch.arange(n)
    return {"input_ids": ids, "labels": labels, "position_ids": position_ids, "cu_seqlens": cu_seqlens}


class PackedDataset(IterableDataset):
    """Documents → fixed-length packed sequences; an iterable that resumes exactly from `state_dict`.

    Iterating continues from the current state (it does not restart), so a new `PackedDataset` given
    the same documents and ``load_state_dict(old.state_dict())`` yields exactly what the old one would
    have yielded next. The state is plain ints (``documents`` fully consumed, ``offset`` tokens already
    emitted of the next one, ``sequences`` produced, ``epoch``).

    Args:
        documents: a re-iterable collection of texts (needs ``tokenizer``) or of token-id lists, e.g. a
            list or `l2a.data.DocumentStream`. Iteration must give the same documents in the same order
            every time, for resuming to be exact.
        seq_len: N, tokens per sequence.
        tokenizer: encodes text documents (no special tokens added) and gives the default eos/pad ids.
        eos_token_id: appended to every document (default: the tokenizer's).
        separate_documents: see the module docstring.
        drop_last: drop the final incomplete sequence; otherwise pad it with ``pad_token_id``
            (labels -100, the padding is its own segment).
        pad_token_id: default: the tokenizer's pad id, else the eos id.
        repeat: start over from the first document when the documents run out (``epoch`` counts).
        num_shards, shard_index: yield only sequences ``i`` with ``i % num_shards == shard_index``
            (data parallelism: every rank packs the whole stream and keeps its share).
    """

    def __init__(
        self,
        documents: Iterable[str] | Iterable[Sequence[int]],
        seq_len: int,
        *,
        tokenizer: Any = None,
        eos_token_id: int | None = None,
        separate_documents: bool = True,
        drop_last: bool = True,
        pad_token_id: int | None = None,
        repeat: bool = False,
        num_shards: int = 1,
        shard_index: int = 0,
    ) -> None:
        super().__init__()
        if seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {seq_len}")
        if not 0 <= shard_index < num_shards:
            raise ValueError(f"shard_index must be in [0, num_shards={num_shards}), got {shard_index}")
        if iter(documents) is documents:
            raise TypeError(
                "documents must be re-iterable (a list or an object whose __iter__ starts over, e.g. "
                "l2a.data.DocumentStream), not a one-shot iterator/generator: resuming re-reads it"
            )
        eos_token_id = eos_token_id if eos_token_id is not None else getattr(tokenizer, "eos_token_id", None)
        if eos_token_id is None:
            raise ValueError("no eos id: pass eos_token_id or a tokenizer that has one")
        if pad_token_id is None:
            pad_token_id = getattr(tokenizer, "pad_token_id", None)
            pad_token_id = eos_token_id if pad_token_id is None else pad_token_id
        self.documents = documents
        self.seq_len = seq_len
        self.tokenizer = tokenizer
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.separate_documents = separate_documents
        self.drop_last = drop_last
        self.repeat = repeat
        self.num_shards = num_shards
        self.shard_index = shard_index
        self._state = {"epoch": 0, "documents": 0, "offset": 0, "sequences": 0}

    def state_dict(self) -> dict[str, int]:
        """Position in the stream after the last yielded sequence (plain ints)."""
        return dict(self._state)

    def load_state_dict(self, state: dict[str, int]) -> None:
        missing = {"epoch", "documents", "offset", "sequences"} - set(state)
        if missing:
            raise KeyError(f"packing state lacks {sorted(missing)}")
        self._state = {key: int(state[key]) for key in ("epoch", "documents", "offset", "sequences")}

    def _tokens(self, document: str | Sequence[int]) -> list[int]:
        if isinstance(document, str):
            if self.tokenizer is None:
                raise ValueError("text documents need a tokenizer")
            ids = encode(self.tokenizer, document)
        else:
            ids = [int(token) for token in document]
        return [*ids, self.eos_token_id]

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        worker = get_worker_info()
        if worker is not None and worker.num_workers > 1:
            raise RuntimeError("PackedDataset is one ordered stream: use a DataLoader with num_workers <= 1")
        n = self.seq_len
        state = self._state
        buffer: list[int] = []
        segments: list[int] = []
        while True:
            base, offset, tokens_read = state["documents"], state["offset"], 0
            end = base
            for index, document in enumerate(itertools.islice(self.documents, base, None)):
                tokens = self._tokens(document)
                tokens_read += len(tokens)
                end = base + index + 1
                position = offset if index == 0 else 0
                while position < len(tokens):
                    take = min(len(tokens) - position, n - len(buffer))
                    buffer.extend(tokens[position : position + take])
                    segments.append(take)
                    position += take
                    if len(buffer) < n:
                        continue
                    # Update the state before yielding: it must name where the *next* sequence starts.
                    done = position == len(tokens)
                    sequence = state["sequences"]
                    state.update(
                        documents=base + index + done, offset=0 if done else position, sequences=sequence + 1
                    )
                    if sequence % self.num_shards == self.shard_index:
                        yield build_sequence(buffer, segments, separate_documents=self.separate_documents)
                    buffer, segments = [], []
            if not self.repeat:
                break
            if base == 0 and tokens_read == 0:
                raise ValueError("documents are empty: nothing to repeat")
            state.update(epoch=state["epoch"] + 1, documents=0, offset=0)
        if buffer and not self.drop_last:
            pad = n - len(buffer)
            sequence = state["sequences"]
            state.update(documents=end, offset=0, sequences=sequence + 1)
            if sequence % self.num_shards == self.shard_index:
                yield build_sequence(
                    buffer + [self.pad_token_id] * pad,
                    [*segments, pad],
                    separate_documents=self.separate_documents,
                    label_mask=[True] * len(buffer) + [False] * pad,
                )


def pack_documents(
    documents: Iterable[str] | Iterable[Sequence[int]], seq_len: int, **kwargs: Any
) -> PackedDataset:
    """``PackedDataset(documents, seq_len, **kwargs)``: see `PackedDataset`."""
    return PackedDataset(documents, seq_len, **kwargs)


def collate_packed(batch: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack packed rows into a batch for the model.

    One row: ``input_ids``/``labels``/``position_ids`` (1, N) and ``cu_seqlens`` (S + 1,) kept (the model
    keeps documents apart). Several rows: the three (B, N) stacks only; ``cu_seqlens`` describes one row
    and is dropped, so documents in a row then see each other (positions still restart per document).
    """
    if not batch:
        raise ValueError("empty batch")
    keys = ("input_ids", "labels", "position_ids")
    out = {key: torch.stack([row[key] for row in batch]) for key in keys}
    if len(batch) == 1:
        out["cu_seqlens"] = batch[0]["cu_seqlens"]
    return out
