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
from l2a.ops.attention import _use_triton, _use_triton_elementwise
from l2a.ops.reference import masked_attention
from l2a.ops.rotary import rotary_reference, triton_supported


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


def write_kv_cache(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
    *,
    backend: str = "auto",
) -> None:
    """Write new keys and values into preallocated caches in place: k_cache[:, slots[t]] = k[:, t] (rotated
    by cos/sin first when given, as `l2a.ops.rotary.apply_rotary`), v_cache[:, slots[t]] = v[:, t].

    Args:
        k_cache, v_cache: (B, S, Hkv, D), written in place (cast to their dtype).
        slots: int64 (N,) slot of each new token, on the device (the same for every batch row).
        k, v: (B, N, Hkv, D). cos, sin: (B or 1, N, D), or None (k written as it is).
        backend: "auto" (one Triton kernel for CUDA tensors of float16 / bfloat16 / float32 with D / 2 a
            power of two, no gradient; else PyTorch: `apply_rotary` and two `index_copy_`), "triton", "torch".
    """
    _checks.check_backend(backend)
    b, n, h, d = k.shape if k.dim() == 4 else (None,) * 4
    if (
        k.dim() != 4
        or v.shape != k.shape
        or k_cache.shape != v_cache.shape
        or k_cache.dim() != 4
        or (k_cache.shape[0], *k_cache.shape[2:]) != (b, h, d)
    ):
        raise ValueError(
            "write_kv_cache: k, v must be (B, N, Hkv, D) and the caches (B, S, Hkv, D), got "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}, caches {tuple(k_cache.shape)} / {tuple(v_cache.shape)}"
        )
    if slots.shape != (n,) or slots.dtype != torch.int64:
        raise ValueError(
            f"write_kv_cache: slots must be int64 of shape ({n},), got {slots.dtype} {tuple(slots.shape)}"
        )
    if (cos is None) != (sin is None) or (
        cos is not None and (cos.shape != sin.shape or cos.shape[-2:] != (n, d))
    ):
        raise ValueError("write_kv_cache: cos and sin must both be given, each (B or 1, N, D), or both None")
    tables = (cos, sin) if cos is not None else (k, k)  # without rotation only D and the dtypes matter
    supported = (
        d % 2 == 0
        and triton_supported(k, *tables)
        and all(t.dtype in _checks.TRITON_DTYPES for t in (v, k_cache, v_cache))
        and not (torch.is_grad_enabled() and any(t.requires_grad for t in (k, v, cos, sin) if t is not None))
    )
    if backend == "triton" and not supported:
        raise ValueError(
            "write_kv_cache: the Triton kernel needs D / 2 a power of two, 16/32-bit floats and no gradient"
        )
    if not _use_triton_elementwise(backend, k, supported):
        if cos is not None:
            k = rotary_reference(k, cos, sin)
        k_cache.index_copy_(1, slots, k.to(k_cache.dtype))
        v_cache.index_copy_(1, slots, v.to(v_cache.dtype))
        return
    from l2a.ops.triton._flash import dispatch
    from l2a.ops.triton.rotary import write_kv_cache_fwd, write_kv_cache_op

    dispatch(write_kv_cache_op, write_kv_cache_fwd, k_cache, v_cache, slots, k, v, cos, sin)
