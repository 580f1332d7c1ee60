"""Triton backend of `l2a.ops`: flash attention over compact routed query rows. Imported lazily.

Both functions return (out (B, N, Hq, D), lse float32 (B, Hq, N)) and are differentiable in q, k, v
(and through lse) via `torch.library` custom ops, so `torch.compile(fullgraph=True)` keeps them in graph.
"""

from __future__ import annotations

import torch

from l2a.ops.triton import _flash
from l2a.ops.triton._autograd import conditional_attention_op, sliding_window_attention_op
from l2a.ops.triton.conditional import conditional_attention_fwd
from l2a.ops.triton.sliding_window import sliding_window_attention_fwd


def conditional_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    active: torch.Tensor,
    scale: float,
    key_offset: int = 0,
    cu_seqlens: torch.Tensor | None = None,
    key_start: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Routed causal attention; arguments as `l2a.ops.conditional_attention` (already validated there)."""
    _flash.check_supported(q)
    args = (q, k, v, active, scale, key_offset, cu_seqlens, key_start)
    out, lse, *_rows = _flash.dispatch(conditional_attention_op, conditional_attention_fwd, *args)
    return out, lse


def sliding_window_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    scale: float,
    cu_seqlens: torch.Tensor | None = None,
    key_start: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sliding-window attention; arguments as `l2a.ops.sliding_window_attention` (already validated there)."""
    _flash.check_supported(q)
    args = (q, k, v, window, scale, cu_seqlens, key_start)
    return _flash.dispatch(sliding_window_attention_op, sliding_window_attention_fwd, *args)


__all__ = ["conditional_attention_triton", "sliding_window_attention_triton"]
