"""Perplexity of held-out text by position: how the loss falls as more context is available.

A model that uses far context keeps lowering its loss at large positions; a model limited to a window
of W tokens flattens out after position W.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from l2a.data.tokenization import encode
from l2a.evaluation.common import model_device


def position_buckets(
    seq_len: int, spacing: Literal["log", "linear"] = "log", num_buckets: int | None = None
) -> list[int]:
    """Bucket edges over the target positions 1 .. seq_len − 1 of a window of ``seq_len`` tokens.

    Position p is the index of the predicted token, i.e. the number of tokens of context it had.
    Bucket i holds positions ``edges[i] <= p < edges[i + 1]``; the first edge is 1, the last is seq_len.

    Args:
        seq_len: window length in tokens (≥ 2).
        spacing: "log" (powers of two when ``num_buckets`` is None, else geometric) or "linear".
        num_buckets: number of buckets; default: one per power of two ("log") or 8 ("linear").
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2 to predict one token, got {seq_len}")
    if spacing not in ("log", "linear"):
        raise ValueError(f"spacing must be 'log' or 'linear', got {spacing!r}")
    if num_buckets is not None and num_buckets < 1:
        raise ValueError(f"num_buckets must be positive, got {num_buckets}")
    if spacing == "log" and num_buckets is None:
        edges = [1 << i for i in range(max(1, (seq_len - 1).bit_length())) if (1 << i) < seq_len]
    elif spacing == "log":
        edges = [round(math.exp(i * math.log(seq_len) / num_buckets)) for i in range(num_buckets)]
    else:
        count = 8 if num_buckets is None else num_buckets
        edges = [1 + round(i * (seq_len - 1) / count) for i in range(count)]
    return sorted(set(edges) | {1}) + [seq_len]


def _check_edges(edges: Sequence[int], seq_len: int) -> list[int]:
    edges = [int(e) for e in edges]
    if len(edges) < 2 or edges[0] < 1 or edges[-1] > seq_len or any(a >= b for a, b in zip(edges, edges[1:])):
        raise ValueError(
            f"bucket edges must increase strictly from >= 1 to <= seq_len={seq_len}; got {edges}"
        )
    return edges


@torch.no_grad()
def token_nll(model: torch.nn.Module, input_ids: torch.Tensor, chunk_size: int = 2048) -> torch.Tensor:
    """Negative log-likelihood of every next token, in float32.

    The final hidden states come from the model's decoder (``model.<base_model_prefix>``); the output
    embedding is applied in chunks of ``chunk_size`` positions so that the (N, vocab) logits of a long
    sequence never exist at once.

    Args:
        model: an HF causal LM (``get_output_embeddings()`` and a base model under ``base_model_prefix``).
        input_ids: (B, N) token ids.

    Returns:
        nll: (B, N − 1); entry p − 1 is −log P(input_ids[:, p] | input_ids[:, :p]).
    """
    if input_ids.ndim != 2 or input_ids.shape[1] < 2:
        raise ValueError(f"input_ids must be (B, N) with N >= 2, got shape {tuple(input_ids.shape)}")
    decoder = getattr(model, model.base_model_prefix)
    head = model.get_output_embeddings()
    out = decoder(input_ids=input_ids, use_cache=False)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    targets = input_ids[:, 1:]
    nll = []
    for start in range(0, targets.shape[1], chunk_size):
        end = min(start + chunk_size, targets.shape[1])
        logits = head(hidden[:, start:end]).float()
        nll.append(F.cross_entropy(logits.transpose(1, 2), targets[:, start:end], reduction="none"))
    return torch.cat(nll, dim=1)


@dataclass
class PerplexityReport:
    """Loss by position bucket. Bucket i covers target positions ``edges[i] <= p < edges[i + 1]``."""

    seq_len: int
    edges: list[int]
    num_sequences: int
    tokens: list[int]
    nll: list[float]
    ppl: list[float]
    overall_nll: float
    overall_ppl: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def bucket_nll(nll: torch.Tensor, edges: Sequence[int]) -> tuple[list[int], list[float]]:
    """Sum NLL into position buckets.

    Args:
        nll: (B, N − 1) per-token loss as returned by `token_nll` (entry p − 1 belongs to position p).
        edges: bucket edges, see `position_buckets`.

    Returns:
        (token count per bucket, NLL sum per bucket).
    """
    positions = torch.arange(1, nll.shape[1] + 1)
    keep = (positions >= edges[0]) & (positions < edges[-1])
    index = torch.bucketize(positions[keep], torch.tensor(edges[1:-1]), right=True)
    per_position = nll.double().sum(0).cpu()[keep]
    counts = torch.bincount(index, minlength=len(edges) - 1) * nll.shape[0]
    sums = torch.zeros(len(edges) - 1, dtype=torch.float64).index_add_(0, index, per_position)
    return counts.tolist(), sums.tolist()


def windows_from_texts(
    tokenizer: Any, texts: Iterable[str], seq_len: int, max_sequences: int | None = None
) -> torch.Tensor:
    """Cut each text into non-overlapping windows of ``seq_len`` tokens (texts shorter than that are skipped,
    so every window is one coherent document). Returns (num_windows, seq_len) int64."""
    windows: list[torch.Tensor] = []
    longest = 0
    for text in texts:
        ids = torch.tensor(encode(tokenizer, text), dtype=torch.long)
        longest = max(longest, ids.numel())
        for start in range(0, ids.numel() - seq_len + 1, seq_len):
            windows.append(ids[start : start + seq_len])
            if max_sequences is not None and len(windows) >= max_sequences:
                return torch.stack(windows)
    if not windows:
        raise ValueError(
            f"no text has {seq_len} tokens (longest: {longest}); pass longer texts or a smaller seq_len"
        )
    return torch.stack(windows)


def perplexity_by_position(
    model: torch.nn.Module,
    tokenizer: Any,
    texts: Iterable[str],
    seq_len: int,
    buckets: Sequence[int] | None = None,
    *,
    max_sequences: int | None = None,
    batch_size: int = 1,
    progress: bool = False,
) -> PerplexityReport:
    """Mean loss and perplexity of held-out text by position bucket.

    Args:
        model: HF causal LM (see `token_nll`).
        tokenizer: HF tokenizer; texts are encoded without special tokens.
        texts: documents; each is cut into windows of ``seq_len`` tokens (shorter ones are skipped).
        seq_len: window length N.
        buckets: edges as from `position_buckets` (default: powers of two).
        max_sequences: stop after this many windows.
        batch_size: windows per forward pass.
    """
    edges = _check_edges(position_buckets(seq_len) if buckets is None else buckets, seq_len)
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    windows = windows_from_texts(tokenizer, texts, seq_len, max_sequences)
    device = model_device(model)
    counts = [0] * (len(edges) - 1)
    sums = [0.0] * (len(edges) - 1)
    batches = range(0, windows.shape[0], batch_size)
    for start in tqdm(batches, desc=f"perplexity N={seq_len}", disable=not progress, leave=False):
        nll = token_nll(model, windows[start : start + batch_size].to(device))
        c, s = bucket_nll(nll, edges)
        counts = [a + b for a, b in zip(counts, c)]
        sums = [a + b for a, b in zip(sums, s)]
    nll_mean = [s / c if c else float("nan") for s, c in zip(sums, counts)]
    total = sum(sums) / sum(counts)
    return PerplexityReport(
        seq_len=seq_len,
        edges=edges,
        num_sequences=int(windows.shape[0]),
        tokens=counts,
        nll=nll_mean,
        ppl=[math.exp(x) for x in nll_mean],
        overall_nll=total,
        overall_ppl=math.exp(total),
    )
