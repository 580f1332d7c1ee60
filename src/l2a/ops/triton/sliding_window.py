"""Host launchers for sliding-window attention; autograd lives in `_autograd.py`."""

from __future__ import annotations

import torch

from l2a.ops.triton import _flash, _flash_bwd, _flash_fwd


def _rows(
    q: torch.Tensor,
    k: torch.Tensor,
    window: int,
    cu_seqlens: torch.Tensor | None,
    key_start: torch.Tensor | None,
) -> _flash.Rows:
    b, n, hq, _ = q.shape
    nk, hkv = k.shape[1], k.shape[2]
    lo, hi = _flash.key_bounds(n, nk, b, q.device, window=window, cu_seqlens=cu_seqlens, key_start=key_start)
    return _flash.compact_rows(None, lo, hi, hq, hkv, span=window)


def sliding_window_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    scale: float,
    cu_seqlens: torch.Tensor | None,
    key_start: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """out (B, N, Hq, D), lse float32 (B, Hq, N); see `l2a.ops.sliding_window_attention`."""
    return _flash_fwd.forward(q, k, v, _rows(q, k, window, cu_seqlens, key_start), None, scale)


def sliding_window_attention_bwd(
    dout: torch.Tensor,
    dlse: torch.Tensor | None,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    window: int,
    scale: float,
    cu_seqlens: torch.Tensor | None,
    key_start: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq (B, N, Hq, D), dk, dv (B, Nk, Hkv, D)."""
    rows = _rows(q, k, window, cu_seqlens, key_start)
    return _flash_bwd.backward(dout, dlse, q, k, v, out, lse, rows, None, scale)
