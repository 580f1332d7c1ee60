"""Forward kernel of the compact-row flash attention family (layout and row lists: `_flash.py`)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from l2a.ops.triton import _flash
from l2a.ops.triton._flash import (
    LOG2E,
    Config,
    Rows,
    _contiguous_last,
    _dot_precision,
    _key_block_ranges,
    _list_strides,
    _mma,
    _row_outputs,
    _tile_rows,
)


@triton.jit
def _fwd_inner(
    acc,
    l_i,
    m_i,
    q,
    k_base,
    v_base,
    stride_kn,
    stride_vn,
    lo_r,
    hi_r,
    kb_begin,
    kb_end,
    nk,
    qk_scale,
    offs_n,
    offs_d,
    MASK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    POSITIVE_SCALE: tl.constexpr,
):
    for kb in range(kb_begin, kb_end):
        kpos = kb * BLOCK_N + offs_n
        if MASK:
            k = tl.load(
                k_base + kpos[:, None] * stride_kn + offs_d[None, :], mask=kpos[:, None] < nk, other=0.0
            )
        else:
            k = tl.load(k_base + kpos[:, None] * stride_kn + offs_d[None, :])
        qk = _mma(q, tl.trans(k), None, DOT_PRECISION)
        if not POSITIVE_SCALE:
            qk = qk * qk_scale
        if MASK:
            valid = (kpos[None, :] >= lo_r[:, None]) & (kpos[None, :] <= hi_r[:, None])
            qk = tl.where(valid, qk, float("-inf"))
        # qk_scale > 0: max(s) * scale = max(s * scale), and exp2's argument is one fused multiply-add
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale if POSITIVE_SCALE else tl.max(qk, 1))
        # rows that have seen no key yet keep m = -inf; shift by 0 so exp2 gives 0, not NaN
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new) if MASK else m_new
        alpha = tl.exp2(m_i - m_shift)
        p = tl.exp2(qk * qk_scale - m_shift[:, None] if POSITIVE_SCALE else qk - m_shift[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if MASK:
            v = tl.load(
                v_base + kpos[:, None] * stride_vn + offs_d[None, :], mask=kpos[:, None] < nk, other=0.0
            )
        else:
            v = tl.load(v_base + kpos[:, None] * stride_vn + offs_d[None, :])
        acc = _mma(p.to(v.dtype), v, acc, DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _fwd_kernel(
    Q,
    K,
    V,
    Out,
    LSE,
    IDX,
    LO,
    HI,
    CNT,
    stride_qb,
    stride_qn,
    stride_qh,
    stride_kb,
    stride_kn,
    stride_kh,
    stride_vb,
    stride_vn,
    stride_vh,
    stride_ob,
    stride_on,
    stride_oh,
    stride_lb,
    stride_lh,
    stride_ib,
    stride_il,
    stride_cb,
    stride_cl,
    n_lists_total,
    hkv_heads,
    n_lists,
    group,
    nk,
    qk_scale,
    R: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    PAIRS: tl.constexpr,
    PACKED: tl.constexpr,
    SHORT_BLOCKS: tl.constexpr,
    POSITIVE_SCALE: tl.constexpr,
    TILES_PER_PROGRAM: tl.constexpr,
):
    """TILES_PER_PROGRAM M-tiles of compact rows, program ids p + i * (programs) (i < TILES_PER_PROGRAM): a
    short list (AHA's routed pairs) in a grid sized for N rows leaves most programs without a tile, and
    fewer, looping programs waste fewer launches. A tile that touches at most SHORT_BLOCKS key blocks (a
    window tile) runs them as one masked loop: three short pipelined loops would each wait for loads."""
    for i in range(TILES_PER_PROGRAM):
        pid = tl.program_id(0) + i * tl.num_programs(0)
        b, hkv, _, m_tile, row_valid, tok, head, lo_r, hi_r, lo_first, hi_first, lo_last, hi_last = (
            _tile_rows(
                pid, IDX, LO, HI, CNT, stride_ib, stride_il, stride_cb, stride_cl, n_lists_total, hkv_heads,
                n_lists, group, R, BLOCK_M, PAIRS, PACKED,
            )
        )  # fmt: skip
        if m_tile >= 0:
            offs_d = tl.arange(0, HEAD_DIM)
            offs_n = tl.arange(0, BLOCK_N)
            q_ptrs = Q + b * stride_qb + tok[:, None] * stride_qn + head[:, None] * stride_qh
            q = tl.load(q_ptrs + offs_d[None, :], mask=row_valid[:, None], other=0.0)
            k_base = K + b * stride_kb + hkv * stride_kh
            v_base = V + b * stride_vb + hkv * stride_vh
            kb_lo, u0, u1, kb_hi = _key_block_ranges(lo_first, hi_first, lo_last, hi_last, BLOCK_N)
            if SHORT_BLOCKS > 0:
                short = kb_hi - kb_lo <= SHORT_BLOCKS
                u0 = tl.where(short, kb_hi, u0)
                u1 = tl.where(short, kb_hi, u1)

            m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
            l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
            acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
            acc, l_i, m_i = _fwd_inner(
                acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, lo_r, hi_r, kb_lo, u0, nk,
                qk_scale, offs_n, offs_d, True, BLOCK_N, DOT_PRECISION, POSITIVE_SCALE,
            )  # fmt: skip
            acc, l_i, m_i = _fwd_inner(
                acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, lo_r, hi_r, u0, u1, nk,
                qk_scale, offs_n, offs_d, False, BLOCK_N, DOT_PRECISION, POSITIVE_SCALE,
            )  # fmt: skip
            acc, l_i, m_i = _fwd_inner(
                acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, lo_r, hi_r, u1, kb_hi, nk,
                qk_scale, offs_n, offs_d, True, BLOCK_N, DOT_PRECISION, POSITIVE_SCALE,
            )  # fmt: skip

            empty = l_i == 0.0
            l_safe = tl.where(empty, 1.0, l_i)
            out = acc / l_safe[:, None]
            lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) / 1.4426950408889634)
            o_ptrs = Out + b * stride_ob + tok[:, None] * stride_on + head[:, None] * stride_oh
            tl.store(o_ptrs + offs_d[None, :], out.to(Out.dtype.element_ty), mask=row_valid[:, None])
            tl.store(LSE + b * stride_lb + head * stride_lh + tok, lse, mask=row_valid)


def forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rows: Rows,
    active: torch.Tensor | None,
    scale: float,
    short_blocks: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """out (B, N, Hq, D), lse float32 (B, Hq, N) for the rows listed in `rows`; short_blocks: see
    `_fwd_kernel`."""
    q, k, v = _contiguous_last(q), _contiguous_last(k), _contiguous_last(v)
    out, lse = _row_outputs(q, active)
    launch_forward(q, k, v, rows, out, lse, scale, _flash.fwd_config(q.shape[-1]), short_blocks)
    return out, lse


def launch_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rows: Rows,
    out: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    cfg: Config,
    short_blocks: int = 0,
    tiles_per_program: int = 1,
) -> None:
    """Write out/lse of the rows listed in `rows` (q, k, v with contiguous last dims); short_blocks and
    tiles_per_program: see `_fwd_kernel`."""
    b, n, hq, d = q.shape
    nk, hkv = k.shape[1], k.shape[2]
    programs, n_lists_total = rows.programs(hkv, cfg.block_m, tiles_per_program=tiles_per_program)
    _fwd_kernel[(programs,)](
        q, k, v, out, lse, rows.idx, rows.lo, rows.hi, rows.count,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3], *lse.stride()[:2],
        *_list_strides(rows), n_lists_total, hkv, rows.lists_per_group, hq // hkv, nk, scale * LOG2E,
        R=rows.rows_per_token, HEAD_DIM=d, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        DOT_PRECISION=_dot_precision(q.dtype), PAIRS=rows.pairs, PACKED=rows.packed,
        SHORT_BLOCKS=short_blocks, POSITIVE_SCALE=scale > 0, TILES_PER_PROGRAM=tiles_per_program,
        **cfg.launch_options(),
    )  # fmt: skip
