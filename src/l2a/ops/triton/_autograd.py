"""`torch.library` custom ops (with fake kernels and autograd) around the Triton launchers.

Registered as ops so that `torch.compile(fullgraph=True)` traces through them without a graph break.
Both outputs are differentiable: a cotangent of lse enters the backward as a shift of delta.
"""

from __future__ import annotations

from typing import Any

import torch

from l2a.ops.triton.conditional import conditional_attention_bwd, conditional_attention_fwd
from l2a.ops.triton.sliding_window import sliding_window_attention_bwd, sliding_window_attention_fwd


def _fake_out_lse(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    b, n, hq, _ = q.shape
    return torch.empty_like(q), q.new_empty((b, hq, n), dtype=torch.float32)


def _fake_grads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


@torch.library.custom_op("l2a::conditional_attention", mutates_args=())
def conditional_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    active: torch.Tensor,
    scale: float,
    key_offset: int,
    cu_seqlens: torch.Tensor | None,
    key_start: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """out, lse and the compact row lists idx, lo, hi, count (saved for the backward, not differentiable)."""
    return conditional_attention_fwd(q, k, v, active, scale, key_offset, cu_seqlens, key_start)


@conditional_attention_op.register_fake
def _(q, k, v, active, scale, key_offset, cu_seqlens, key_start):
    b, n, hq, _ = q.shape
    lists = 1 if active.dim() == 2 else hq
    idx, lo, hi = (q.new_empty((b, lists, n), dtype=torch.int32) for _ in range(3))
    return (*_fake_out_lse(q), idx, lo, hi, q.new_empty((b, lists), dtype=torch.int32))


@torch.library.custom_op("l2a::conditional_attention_backward", mutates_args=())
def conditional_attention_backward_op(
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
    return conditional_attention_bwd(dout, dlse, q, k, v, out, lse, active, idx, lo, hi, count, scale)


@conditional_attention_backward_op.register_fake
def _(dout, dlse, q, k, v, out, lse, active, idx, lo, hi, count, scale):
    return _fake_grads(q, k, v)


def _conditional_setup(ctx: Any, inputs: tuple, output: tuple) -> None:
    q, k, v, active, scale, *_ = inputs
    ctx.save_for_backward(q, k, v, *output, active)
    ctx.mark_non_differentiable(*output[2:])
    ctx.scale = scale


def _conditional_backward(ctx: Any, dout: torch.Tensor, dlse: torch.Tensor | None, *_rows: Any) -> tuple:
    q, k, v, out, lse, idx, lo, hi, count, active = ctx.saved_tensors
    dq, dk, dv = conditional_attention_backward_op(
        dout, dlse, q, k, v, out, lse, active, idx, lo, hi, count, ctx.scale
    )
    return dq, dk, dv, None, None, None, None, None


conditional_attention_op.register_autograd(_conditional_backward, setup_context=_conditional_setup)


@torch.library.custom_op("l2a::sliding_window_attention", mutates_args=())
def sliding_window_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    scale: float,
    cu_seqlens: torch.Tensor | None,
    key_start: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    return sliding_window_attention_fwd(q, k, v, window, scale, cu_seqlens, key_start)


@sliding_window_attention_op.register_fake
def _(q, k, v, window, scale, cu_seqlens, key_start):
    return _fake_out_lse(q)


@torch.library.custom_op("l2a::sliding_window_attention_backward", mutates_args=())
def sliding_window_attention_backward_op(
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
    return sliding_window_attention_bwd(dout, dlse, q, k, v, out, lse, window, scale, cu_seqlens, key_start)


@sliding_window_attention_backward_op.register_fake
def _(dout, dlse, q, k, v, out, lse, window, scale, cu_seqlens, key_start):
    return _fake_grads(q, k, v)


def _sliding_setup(ctx: Any, inputs: tuple, output: tuple) -> None:
    q, k, v, window, scale, cu_seqlens, key_start = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], cu_seqlens, key_start)
    ctx.window, ctx.scale = window, scale


def _sliding_backward(ctx: Any, dout: torch.Tensor, dlse: torch.Tensor | None) -> tuple:
    q, k, v, out, lse, cu_seqlens, key_start = ctx.saved_tensors
    dq, dk, dv = sliding_window_attention_backward_op(
        dout, dlse, q, k, v, out, lse, ctx.window, ctx.scale, cu_seqlens, key_start
    )
    return dq, dk, dv, None, None, None, None


sliding_window_attention_op.register_autograd(_sliding_backward, setup_context=_sliding_setup)
