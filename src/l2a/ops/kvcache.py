"""Attention of a few new tokens against a preallocated KV cache whose fill level lives on the device.

Legend: B batch, N new query tokens, S cache slots, Hq query heads, Hkv key/value heads, D head dim.
The convention is flash-attn's `flash_attn_with_kvcache`: the cache holds `cache_seqlen` tokens (the N new
ones included, already written), and query i sits at position cache_seqlen - N + i. Nothing in a call
depends on a host integer that changes from step to step, so a decode step can be captured in a CUDA graph.
"""

from __future__ import annotations

import math

import torch

from l2a.ops import _checks
from l2a.ops.attention import _use_triton
from l2a.ops.reference import masked_attention


def slot_positions(cache_seqlen: torch.Tensor, slots: int, ring: bool) -> torch.Tensor:
    """Absolute position held by each slot, int64 (S,); -1 for slots not written yet."""
    j = torch.arange(slots, device=cache_seqlen.device)
    filled = cache_seqlen.long().reshape(1)
    # a ring slot j holds the latest position p < filled with p = j (mod S)
    pos = filled - 1 - torch.remainder(filled - 1 - j, slots) if ring else j
    return torch.where(pos < filled, pos, -1)


def attention_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlen: torch.Tensor,
    *,
    active: torch.Tensor | None = None,
    window: int | None = None,
    ring: bool = False,
    key_start: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Causal attention of the last N tokens of a preallocated cache.

    Args:
        q: (B, N, Hq, D). k_cache, v_cache: (B, S, Hkv, D), Hq a multiple of Hkv.
        cache_seqlen: int32/int64 (1,) tokens written so far, the N new ones included.
        active: None (every query), bool (B, N) token-wise or (B, N, Hq) head-wise routing; rows not routed
            give 0 and cost nothing in the Triton kernel.
        window: sliding window (keys t - window < j <= t), or None for full causal attention.
        ring: the cache is a ring buffer: position j lives in slot j % S; needs window + N - 1 <= S.
        key_start: int (B,) first valid position per row (left padding).
        softmax_scale: defaults to 1/sqrt(D). backend: as in `l2a.ops.conditional_attention`.

    Returns:
        out (B, N, Hq, D) in q's dtype.
    """
    b, n, s, hq, _, d = _checks.check_qkv(q, k_cache, v_cache)
    if active is not None:
        _checks.check_active(active, b, n, hq, q.device)
    _checks.check_key_start(key_start, b, q.device)
    if (
        not isinstance(cache_seqlen, torch.Tensor)
        or cache_seqlen.shape != (1,)
        or cache_seqlen.is_floating_point()
    ):
        raise ValueError(
            "cache_seqlen must be an int tensor of shape (1,): the number of tokens in the cache"
        )
    if window is not None:
        _checks.check_nonnegative_int("window", window, 1)
    if ring and (window is None or window + n - 1 > s):
        raise ValueError(f"a ring cache of {s} slots needs a window with window + N - 1 <= {s}, got {window}")
    scale = 1.0 / math.sqrt(d) if softmax_scale is None else float(softmax_scale)
    if _use_triton(backend, q):
        from l2a.ops.triton._flash import dispatch
        from l2a.ops.triton.decode import decode_attention_fwd, decode_attention_op

        args = (q, k_cache, v_cache, active, scale, 0, window or 0, key_start, cache_seqlen, ring)
        out, _ = dispatch(decode_attention_op, decode_attention_fwd, *args)
        return out
    kpos = slot_positions(cache_seqlen, s, ring)
    # unwritten slots hold arbitrary bits (NaN even): zero them, as 0 weight x NaN is NaN
    written = (kpos >= 0)[None, :, None, None]
    k_cache, v_cache = torch.where(written, k_cache, 0), torch.where(written, v_cache, 0)
    qpos = cache_seqlen.long().reshape(1) - n + torch.arange(n, device=q.device)
    allowed = (kpos[None, :] >= 0) & (kpos[None, :] <= qpos[:, None])
    if window is not None:
        allowed = allowed & (kpos[None, :] > qpos[:, None] - window)
    allowed = allowed.expand(b, n, s)
    if key_start is not None:
        allowed = allowed & (kpos[None, None, :] >= key_start.long()[:, None, None])
    if active is not None:
        if active.dim() == 2:
            allowed = allowed & active[:, :, None]
        else:
            allowed = allowed[:, None] & active.permute(0, 2, 1)[:, :, :, None]
    return masked_attention(q, k_cache, v_cache, allowed, scale)[0]
