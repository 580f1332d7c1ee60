"""All-or-here attention (AHA) on the compact-row kernels of `_flash.py`: host launchers and the
`torch.library` custom ops `l2a::all_or_here_attention[_backward]` (fake kernels, autograd).

Every (token, query head) pair reads one contiguous key range: [lo(t), p_t] where it is routed to full
attention, [max(lo(t), p_t - W + 1), p_t] where it stays local. Each K/V group gets two compact lists of
(token, head) pairs (routed, local), both sorted with non-decreasing bounds, so the kernels of conditional
and sliding-window attention run AHA in one pass: no log-sum-exp merge, no zero fill (every pair is
written exactly once), and the far keys are read only by routed pairs. See `l2a/ops/README.md`, "AHA".
"""

from __future__ import annotations

from typing import Any

import torch

from l2a.ops.triton import _flash


def aha_rows(
    q: torch.Tensor,
    k: torch.Tensor,
    active: torch.Tensor,
    window: int,
    cu_seqlens: torch.Tensor | None,
    key_start: torch.Tensor | None,
) -> _flash.Rows:
    """Two pair lists per K/V group, (B, 2 Hkv, N G): the routed (token, head) pairs with the causal key
    range, then the local pairs with the window range, each in (token, head) order (slot value t G + g).

    Mixing the G heads of a group in one list keeps an M-tile's span of positions short: ~BLOCK_M / G local
    tokens (the window tile loads ~W + BLOCK_M / G keys) and ~BLOCK_M / (G a) routed ones at a fraction a
    routed. One cumulative sum places both lists: pair p is routed slot c_p - 1 or local slot p - c_p.
    """
    b, n, hq, _ = q.shape
    nk, hkv = k.shape[1], k.shape[2]
    group = hq // hkv
    n_pairs = n * group
    bounds = dict(cu_seqlens=cu_seqlens, key_start=key_start)
    lo_full, hi = _flash.key_bounds(n, nk, b, q.device, **bounds)
    lo_window, _ = _flash.key_bounds(n, nk, b, q.device, window=window, **bounds)
    routed = (active[:, :, None] if active.dim() == 2 else active).expand(b, n, hq)
    routed = routed.reshape(b, n, hkv, group).permute(0, 2, 1, 3).reshape(b, hkv, n_pairs)
    cum = torch.cumsum(routed, dim=-1, dtype=torch.int32)
    pair = torch.arange(n_pairs, device=q.device, dtype=torch.int32)
    dest = torch.where(routed, cum - 1, n_pairs + pair - cum).long()
    idx = torch.zeros(b, hkv, 2 * n_pairs, device=q.device, dtype=torch.int32)
    idx.scatter_(-1, dest, pair.expand(b, hkv, n_pairs))
    idx = idx.view(b, 2 * hkv, n_pairs)
    n_routed = cum[..., -1]
    count = torch.stack((n_routed, n_pairs - n_routed), dim=-1).reshape(b, 2 * hkv)
    filled = pair[None, None, :] < count[..., None]
    tok = (idx // group).long()
    lo = torch.stack((lo_full, lo_window), dim=1)[:, None].expand(b, hkv, 2, n).reshape(b, 2 * hkv, n)
    lo_c = torch.where(filled, torch.gather(lo, -1, tok), _flash._PAD)
    hi_c = torch.where(filled, torch.gather(hi[:, None].expand(b, 2 * hkv, n), -1, tok), _flash._PAD)
    return _flash.Rows(idx, lo_c, hi_c, count, lists_per_group=2, rows_per_token=1, pairs=True)


def all_or_here_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    active: torch.Tensor,
    window: int,
    scale: float,
    cu_seqlens: torch.Tensor | None,
    key_start: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """out (B, N, Hq, D), lse float32 (B, Hq, N); see `l2a.ops.all_or_here_attention`."""
    rows = aha_rows(q, k, active, window, cu_seqlens, key_start)
    # active=None: every row is listed, so the outputs need no zero fill
    return _flash.forward(q, k, v, rows, None, scale)


def all_or_here_attention_bwd(
    dout: torch.Tensor,
    dlse: torch.Tensor | None,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    active: torch.Tensor,
    window: int,
    scale: float,
    cu_seqlens: torch.Tensor | None,
    key_start: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq (B, N, Hq, D), dk, dv (B, Nk, Hkv, D)."""
    rows = aha_rows(q, k, active, window, cu_seqlens, key_start)
    return _flash.backward(dout, dlse, q, k, v, out, lse, rows, None, scale)


@torch.library.custom_op("l2a::all_or_here_attention", mutates_args=())
def all_or_here_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    active: torch.Tensor,
    window: int,
    scale: float,
    cu_seqlens: torch.Tensor | None,
    key_start: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    return all_or_here_attention_fwd(q, k, v, active, window, scale, cu_seqlens, key_start)


@all_or_here_attention_op.register_fake
def _(q, k, v, active, window, scale, cu_seqlens, key_start):
    b, n, hq, _ = q.shape
    return torch.empty_like(q), q.new_empty((b, hq, n), dtype=torch.float32)


@torch.library.custom_op("l2a::all_or_here_attention_backward", mutates_args=())
def all_or_here_attention_backward_op(
    dout: torch.Tensor,
    dlse: torch.Tensor | None,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    active: torch.Tensor,
    window: int,
    scale: float,
    cu_seqlens: torch.Tensor | None,
    key_start: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return all_or_here_attention_bwd(
        dout, dlse, q, k, v, out, lse, active, window, scale, cu_seqlens, key_start
    )


@all_or_here_attention_backward_op.register_fake
def _(dout, dlse, q, k, v, out, lse, active, window, scale, cu_seqlens, key_start):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup(ctx: Any, inputs: tuple, output: tuple) -> None:
    q, k, v, active, window, scale, cu_seqlens, key_start = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], active, cu_seqlens, key_start)
    ctx.window, ctx.scale = window, scale


def _backward(ctx: Any, dout: torch.Tensor, dlse: torch.Tensor | None) -> tuple:
    q, k, v, out, lse, active, cu_seqlens, key_start = ctx.saved_tensors
    dq, dk, dv = all_or_here_attention_backward_op(
        dout, dlse, q, k, v, out, lse, active, ctx.window, ctx.scale, cu_seqlens, key_start
    )
    return dq, dk, dv, None, None, None, None, None


all_or_here_attention_op.register_autograd(_backward, setup_context=_setup)


def all_or_here_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    active: torch.Tensor,
    window: int,
    scale: float,
    cu_seqlens: torch.Tensor | None = None,
    key_start: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """AHA in one pass; arguments as `l2a.ops.all_or_here_attention` (already validated there)."""
    _flash.check_supported(q)
    return all_or_here_attention_op(q, k, v, active, window, scale, cu_seqlens, key_start)
