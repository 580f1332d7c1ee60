"""All-or-here attention (AHA) on the compact-row kernels of `_flash.py`: host launchers and the
`torch.library` custom ops `l2a::all_or_here_attention[_backward]` (fake kernels, autograd).

Every (token, query head) pair reads one contiguous key range: [lo(t), p_t] where it is routed to full
attention, [max(lo(t), p_t - W + 1), p_t] where it stays local. Each K/V group gets two compact lists of
(token, head) pairs (routed, local), both sorted with non-decreasing bounds, so the kernels of conditional
and sliding-window attention run AHA in one pass: no log-sum-exp merge, no zero fill (every pair is
written exactly once), and the far keys are read only by routed pairs. The forward runs both lists of
a group from one program range, routed tiles first (`fwd_launch`). See `l2a/ops/README.md`, "AHA".
"""

from __future__ import annotations

import os
from typing import Any

import torch
import triton
import triton.language as tl

from l2a.ops.triton import _flash, _flash_bwd, _flash_fwd
from l2a.ops.triton._autograd import _fake_grads, _fake_out_lse

# pairs per program of the list builder
_CHUNK = 1024


@triton.jit
def _pair_routed(
    ACTIVE, pid, n_chunks, hkv_heads, group, n_pairs, stride_ab, stride_an, stride_ah, CHUNK: tl.constexpr
):
    """Program id -> (b, K/V head, chunk); the chunk's pairs p = t G + g and their routing bits."""
    chunk = pid % n_chunks
    bh = pid // n_chunks
    b = bh // hkv_heads
    hkv = bh % hkv_heads
    p = chunk * CHUNK + tl.arange(0, CHUNK)
    valid = p < n_pairs
    t = p // group
    head = hkv * group + p % group
    r = tl.load(ACTIVE + b * stride_ab + t * stride_an + head * stride_ah, mask=valid, other=0)
    return bh, b, p, valid, t, (r != 0) & valid


@triton.jit
def _count_kernel(
    ACTIVE, CNT, n_chunks, hkv_heads, group, n_pairs, stride_ab, stride_an, stride_ah, CHUNK: tl.constexpr
):
    pid = tl.program_id(0)
    _, _, _, _, _, routed = _pair_routed(
        ACTIVE, pid, n_chunks, hkv_heads, group, n_pairs, stride_ab, stride_an, stride_ah, CHUNK
    )
    tl.store(CNT + pid, tl.sum(routed.to(tl.int32), 0))


@triton.jit
def _lists_kernel(
    ACTIVE, CNT, KEY_START, DOC_START, IDX, LO, HI, COUNT,
    n_chunks, hkv_heads, group, n_pairs, stride_ab, stride_an, stride_ah, n, nk, window,
    HAS_KEY_START: tl.constexpr, HAS_DOCS: tl.constexpr, CHUNK: tl.constexpr, PAD: tl.constexpr,
    MAX_CHUNKS: tl.constexpr,
):  # fmt: skip
    """Place each pair of one chunk in its list: routed slot (routed pairs up to it) - 1, local slot
    p - (routed pairs up to p); write its token's key range, _PAD past each list's count, and (chunk 0)
    the two counts. The routed pairs before the chunk: a sum over the per-chunk counts of its group."""
    pid = tl.program_id(0)
    bh, b, p, valid, t, routed = _pair_routed(
        ACTIVE, pid, n_chunks, hkv_heads, group, n_pairs, stride_ab, stride_an, stride_ah, CHUNK
    )
    chunk = pid % n_chunks
    chunks = tl.arange(0, MAX_CHUNKS)
    counts = tl.load(CNT + bh * n_chunks + chunks, mask=chunks < n_chunks, other=0)
    total = tl.sum(counts, 0)
    routed_upto = tl.sum(tl.where(chunks < chunk, counts, 0), 0) + tl.cumsum(routed.to(tl.int32), 0)
    if chunk == 0:
        tl.store(COUNT + 2 * bh, total)
        tl.store(COUNT + 2 * bh + 1, n_pairs - total)
    pos = t + (nk - n)
    lo = tl.zeros([CHUNK], dtype=tl.int32)
    if HAS_KEY_START:
        lo = tl.maximum(lo, tl.load(KEY_START + b).to(tl.int32))
    if HAS_DOCS:
        lo = tl.maximum(lo, tl.load(DOC_START + t, mask=valid, other=0))
    lo_window = tl.maximum(lo, pos - window + 1)
    base_routed = bh * 2 * n_pairs
    base_local = base_routed + n_pairs
    local = valid & ~routed
    slot_routed = base_routed + routed_upto - 1
    slot_local = base_local + p - routed_upto
    tl.store(IDX + slot_routed, p, mask=routed)
    tl.store(LO + slot_routed, lo, mask=routed)
    tl.store(HI + slot_routed, pos, mask=routed)
    tl.store(IDX + slot_local, p, mask=local)
    tl.store(LO + slot_local, lo_window, mask=local)
    tl.store(HI + slot_local, pos, mask=local)
    # slots p of the chunk's range that lie past a list's count: sorted padding for searchsorted
    pad = valid & (p >= total)
    tl.store(IDX + base_routed + p, 0, mask=pad)
    tl.store(LO + base_routed + p, PAD, mask=pad)
    tl.store(HI + base_routed + p, PAD, mask=pad)
    pad = valid & (p >= n_pairs - total)
    tl.store(IDX + base_local + p, 0, mask=pad)
    tl.store(LO + base_local + p, PAD, mask=pad)
    tl.store(HI + base_local + p, PAD, mask=pad)


def aha_rows(
    q: torch.Tensor,
    k: torch.Tensor,
    active: torch.Tensor,
    window: int,
    cu_seqlens: torch.Tensor | None,
    key_start: torch.Tensor | None,
    packed: bool = True,
) -> _flash.Rows:
    """Two pair lists per K/V group, (B, 2 Hkv, N G): the routed (token, head) pairs with the causal key
    range, then the local pairs with the window range, each in (token, head) order (slot value t G + g).

    Mixing the G heads of a group in one list keeps an M-tile's span of positions short: ~BLOCK_M / G local
    tokens (the window tile loads ~W + BLOCK_M / G keys) and ~BLOCK_M / (G a) routed ones at a fraction a
    routed. Built by two small kernels (per-chunk counts, then placement with the counts' prefix sum):
    pair p is routed slot c_p - 1 or local slot p - c_p, c_p the routed pairs up to p. `packed`: the
    kernels run the tiles of both lists of a group from one program range (`Rows.packed`).
    """
    b, n, hq, _ = q.shape
    nk, hkv = k.shape[1], k.shape[2]
    group = hq // hkv
    n_pairs = n * group
    routed = (active[:, :, None] if active.dim() == 2 else active).expand(b, n, hq).view(torch.uint8)
    # at most ~1024 chunks per group, so that every program can sum the counts of the chunks before it
    chunk = max(_CHUNK, triton.next_power_of_2(triton.cdiv(n_pairs, 1024)))
    n_chunks = triton.cdiv(n_pairs, chunk)
    grid = (b * hkv * n_chunks,)
    geometry = (n_chunks, hkv, group, n_pairs, *routed.stride())
    counts = torch.empty(b * hkv, n_chunks, device=q.device, dtype=torch.int32)
    _count_kernel[grid](routed, counts, *geometry, CHUNK=chunk)
    doc_start = None
    if cu_seqlens is not None:
        doc_start = _flash.key_bounds(n, nk, 1, q.device, cu_seqlens=cu_seqlens)[0][0]
    idx, lo, hi = (torch.empty(b, 2 * hkv, n_pairs, device=q.device, dtype=torch.int32) for _ in range(3))
    count = torch.empty(b, 2 * hkv, device=q.device, dtype=torch.int32)
    _lists_kernel[grid](
        routed, counts, counts if key_start is None else key_start,
        counts if doc_start is None else doc_start, idx, lo, hi, count, *geometry, n, nk, window,
        HAS_KEY_START=key_start is not None, HAS_DOCS=doc_start is not None, CHUNK=chunk, PAD=_flash._PAD,
        MAX_CHUNKS=triton.next_power_of_2(n_chunks),
    )  # fmt: skip
    return _flash.Rows(idx, lo, hi, count, lists_per_group=2, rows_per_token=1, pairs=True, packed=packed)


def _list_view(rows: _flash.Rows, part: int) -> _flash.Rows:
    """The routed (part 0) or local (part 1) lists of `rows` alone, one list per group."""
    return _flash.Rows(
        rows.idx[:, part::2], rows.lo[:, part::2], rows.hi[:, part::2], rows.count[:, part::2],
        lists_per_group=1, rows_per_token=1, pairs=True,
    )  # fmt: skip


FWD_LAUNCHES = ("packed", "split")
# routed tiles per program of the split forward's routed launch (`_flash_fwd._fwd_kernel`): its grid is
# sized for all N G pairs, so at 7 % routed one program in 1 / (8 * 0.07) ~ 2 finds a tile
_ROUTED_TILES_PER_PROGRAM = 8
# window tiles with at most this many key blocks run as one masked loop (`_flash_fwd._fwd_kernel`)
_LOCAL_SHORT_BLOCKS = 12


def fwd_launch() -> str:
    """Launches of the forward, `L2A_AHA_FWD_LAUNCH`: "split" (default) runs the routed lists (programs
    looping over `L2A_AHA_ROUTED_TILES` tiles, default 8; `fwd_config`) and the local lists
    (`aha_local_fwd_config`: small tiles under a register cap, several programs per SM, one masked loop a
    tile) as two kernels; "packed" runs both lists of every group in one launch with `fwd_config`, the
    routed (heavy) tiles first and the window tiles filling the tail, one program per SM. On an H200 at
    32K / 128K, 7 % routed: split 1.71 / 20.22 ms, packed 1.76 / 20.21 ms, taking turns in one run (medians
    of 3; docs/benchmarks.md, run 5). Running the window launch on a second stream, to fill the routed
    launch's tail, measured no faster (1.72 / 20.20 ms) and was dropped."""
    launch = os.environ.get("L2A_AHA_FWD_LAUNCH", "split")
    if launch not in FWD_LAUNCHES:
        raise ValueError(f"L2A_AHA_FWD_LAUNCH must be one of {FWD_LAUNCHES}, got {launch!r}")
    return launch


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
    launch = fwd_launch()
    rows = aha_rows(q, k, active, window, cu_seqlens, key_start, packed=launch == "packed")
    if launch == "packed":
        # active=None: every row is listed, so the outputs need no zero fill
        return _flash_fwd.forward(q, k, v, rows, None, scale)
    q, k, v = (_flash._contiguous_last(t) for t in (q, k, v))
    out, lse = _flash._row_outputs(q, None)
    d = q.shape[-1]
    routed, local = _list_view(rows, 0), _list_view(rows, 1)
    _flash_fwd.launch_forward(
        q, k, v, routed, out, lse, scale, _flash.fwd_config(d),
        tiles_per_program=int(os.environ.get("L2A_AHA_ROUTED_TILES", _ROUTED_TILES_PER_PROGRAM)),
    )  # fmt: skip
    _flash_fwd.launch_forward(
        q, k, v, local, out, lse, scale, _flash.aha_local_fwd_config(d), short_blocks=_LOCAL_SHORT_BLOCKS
    )
    return out, lse


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
    return _flash_bwd.backward(dout, dlse, q, k, v, out, lse, rows, None, scale)


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
    return _fake_out_lse(q)


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
    return _fake_grads(q, k, v)


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
    args = (q, k, v, active, window, scale, cu_seqlens, key_start)
    return _flash.dispatch(all_or_here_attention_op, all_or_here_attention_fwd, *args)
