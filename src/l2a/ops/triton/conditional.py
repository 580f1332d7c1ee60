"""Host launchers for routed (conditional) causal attention; autograd lives in `_autograd.py`.

The forward returns its compact row lists (`Rows`: idx, lo, hi, count) with out/lse, so that the backward
reuses them instead of compacting again.
"""

from __future__ import annotations

import torch

from l2a.ops.triton import _flash, _flash_bwd, _flash_fwd


def _rows(
    q: torch.Tensor,
    k: torch.Tensor,
    active: torch.Tensor,
    key_offset: int,
    cu_seqlens: torch.Tensor | None,
    key_start: torch.Tensor | None,
) -> _flash.Rows:
    b, n, hq, _ = q.shape
    nk, hkv = k.shape[1], k.shape[2]
    lo, hi = _flash.key_bounds(
        n, nk, b, q.device, key_offset=key_offset, cu_seqlens=cu_seqlens, key_start=key_start
    )
    return _flash.compact_rows(active, lo, hi, hq, hkv)


def _saved_rows(
    idx: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, count: torch.Tensor, hq: int, hkv: int
) -> _flash.Rows:
    """The `Rows` of `compact_rows` back from its tensors (token-wise: one list; head-wise: Hq lists)."""
    group = hq // hkv
    shared = idx.shape[1] == 1
    return _flash.Rows(idx, lo, hi, count, 1 if shared else group, group if shared else 1)


def conditional_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    active: torch.Tensor,
    scale: float,
    key_offset: int,
    cu_seqlens: torch.Tensor | None,
    key_start: torch.Tensor | None,
) -> tuple[torch.Tensor, ...]:
    """out (B, N, Hq, D), lse float32 (B, Hq, N) and the row lists idx, lo, hi int32 (B, Lc, N), count int32
    (B, Lc) (Lc = 1 token-wise, Hq head-wise); see `l2a.ops.conditional_attention`."""
    rows = _rows(q, k, active, key_offset, cu_seqlens, key_start)
    out, lse = _flash_fwd.forward(q, k, v, rows, active, scale)
    return out, lse, rows.idx, rows.lo, rows.hi, rows.count


def conditional_attention_bwd(
    dout: torch.Tensor,
    dlse: torch.Tensor | None,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    active: torch.Tensor,
    idx: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    count: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq (B, N, Hq, D), dk, dv (B, Nk, Hkv, D), from the forward's row lists (idx, lo, hi, count).

    The compact backward buffers are sized by the longest routed list: one host sync per call, in the
    backward only (the forward stays sync-free)."""
    rows = _saved_rows(idx, lo, hi, count, q.shape[2], k.shape[2])
    max_count = int(rows.count.max())
    return _flash_bwd.backward(dout, dlse, q, k, v, out, lse, rows, active, scale, max_count)
