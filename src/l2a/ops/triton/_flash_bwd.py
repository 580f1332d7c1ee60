"""Backward kernels of the compact-row flash attention family: dQ per compact M-tile (which also writes
the rows in list order), then dK/dV per key block over those compact rows (`l2a/ops/README.md`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from l2a.ops.triton import _flash
from l2a.ops.triton._flash import (
    LOG2E,
    Rows,
    _contiguous_last,
    _dot_precision,
    _key_block_ranges,
    _list_strides,
    _mma,
    _row_outputs,
    _tile_rows,
    dkdv_loop,
    dkdv_phase_order,
)


@triton.jit
def _bwd_dq_inner(
    dq,
    q,
    do,
    lse2,
    delta,
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
):
    for kb in range(kb_begin, kb_end):
        kpos = kb * BLOCK_N + offs_n
        if MASK:
            k = tl.load(
                k_base + kpos[:, None] * stride_kn + offs_d[None, :], mask=kpos[:, None] < nk, other=0.0
            )
            v = tl.load(
                v_base + kpos[:, None] * stride_vn + offs_d[None, :], mask=kpos[:, None] < nk, other=0.0
            )
        else:
            k = tl.load(k_base + kpos[:, None] * stride_kn + offs_d[None, :])
            v = tl.load(v_base + kpos[:, None] * stride_vn + offs_d[None, :])
        qk = _mma(q, tl.trans(k), None, DOT_PRECISION) * qk_scale
        p = tl.exp2(qk - lse2[:, None])
        if MASK:
            valid = (kpos[None, :] >= lo_r[:, None]) & (kpos[None, :] <= hi_r[:, None])
            p = tl.where(valid, p, 0.0)
        dp = _mma(do, tl.trans(v), None, DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = _mma(ds.to(k.dtype), k, dq, DOT_PRECISION)
    return dq


@triton.jit
def _bwd_dq_kernel(
    Q,
    K,
    V,
    Out,
    DO,
    DQ,
    LSE,
    DLSE,
    QC,
    DOC,
    LSEC,
    DELTAC,
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
    stride_xb,
    stride_xl,
    stride_yb,
    stride_yl,
    n_lists_total,
    hkv_heads,
    n_lists,
    group,
    nk,
    qk_scale,
    scale,
    R: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_DLSE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    PAIRS: tl.constexpr,
    PACKED: tl.constexpr,
):
    """dQ of one compact M-tile. Also writes the tile's rows, in list order, to the compact buffers of the
    dK/dV kernel: q and dO to QC/DOC (B, lists, rows, D), base-2 lse and delta = rowsum(dO * O) - dLSE to
    LSEC/DELTAC (B, lists, rows); strides xb/xl and yb/yl."""
    b, hkv, li, m_tile, row_valid, tok, head, lo_r, hi_r, lo_first, hi_first, lo_last, hi_last = _tile_rows(
        tl.program_id(0),
        IDX,
        LO,
        HI,
        CNT,
        stride_ib,
        stride_il,
        stride_cb,
        stride_cl,
        n_lists_total,
        hkv_heads,
        n_lists,
        group,
        R,
        BLOCK_M,
        PAIRS,
        PACKED,
    )
    if m_tile < 0:
        return
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)
    row_off = tok[:, None] * stride_qn + head[:, None] * stride_qh + offs_d[None, :]
    o_off = b * stride_ob + tok[:, None] * stride_on + head[:, None] * stride_oh + offs_d[None, :]
    q = tl.load(Q + b * stride_qb + row_off, mask=row_valid[:, None], other=0.0)
    do = tl.load(DO + o_off, mask=row_valid[:, None], other=0.0)
    o = tl.load(Out + o_off, mask=row_valid[:, None], other=0.0)
    l_off = b * stride_lb + head * stride_lh + tok
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    if HAS_DLSE:
        # d lse / d s = p, so an lse cotangent only shifts delta: ds = p * (dp - (delta - dlse))
        delta -= tl.load(DLSE + l_off, mask=row_valid, other=0.0)
    lse = tl.load(LSE + l_off, mask=row_valid, other=float("-inf"))
    # rows without keys have lse = -inf; +inf makes every p = 0 instead of inf
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    lid = hkv * n_lists + li
    rows = m_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    c_off = b * stride_xb + lid * stride_xl + rows[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(QC + c_off, q, mask=row_valid[:, None])
    tl.store(DOC + c_off, do, mask=row_valid[:, None])
    r_off = b * stride_yb + lid * stride_yl + rows
    tl.store(LSEC + r_off, lse2, mask=row_valid)
    tl.store(DELTAC + r_off, delta, mask=row_valid)

    k_base = K + b * stride_kb + hkv * stride_kh
    v_base = V + b * stride_vb + hkv * stride_vh
    kb_lo, u0, u1, kb_hi = _key_block_ranges(lo_first, hi_first, lo_last, hi_last, BLOCK_N)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    dq = _bwd_dq_inner(
        dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn, lo_r, hi_r, kb_lo, u0, nk, qk_scale,
        offs_n, offs_d, True, BLOCK_N, DOT_PRECISION,
    )  # fmt: skip
    dq = _bwd_dq_inner(
        dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn, lo_r, hi_r, u0, u1, nk, qk_scale,
        offs_n, offs_d, False, BLOCK_N, DOT_PRECISION,
    )  # fmt: skip
    dq = _bwd_dq_inner(
        dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn, lo_r, hi_r, u1, kb_hi, nk, qk_scale,
        offs_n, offs_d, True, BLOCK_N, DOT_PRECISION,
    )  # fmt: skip
    tl.store(DQ + o_off, (dq * scale).to(DQ.dtype.element_ty), mask=row_valid[:, None])


@triton.jit
def _bwd_dkdv_inner(
    dk,
    dv,
    k,
    v,
    rows,
    row_valid,
    lo_r,
    hi_r,
    kpos,
    qc_base,
    doc_base,
    lsec_base,
    deltac_base,
    qk_scale,
    offs_d,
    HEAD_DIM: tl.constexpr,
    MASK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # Rows are contiguous in the compact buffers: plain affine loads, no index chain to wait on.
    c_off = rows[:, None] * HEAD_DIM + offs_d[None, :]
    if MASK:
        q = tl.load(qc_base + c_off, mask=row_valid[:, None], other=0.0)
        do = tl.load(doc_base + c_off, mask=row_valid[:, None], other=0.0)
        lse2 = tl.load(lsec_base + rows, mask=row_valid, other=float("inf"))
        delta = tl.load(deltac_base + rows, mask=row_valid, other=0.0)
    else:
        q = tl.load(qc_base + c_off)
        do = tl.load(doc_base + c_off)
        lse2 = tl.load(lsec_base + rows)
        delta = tl.load(deltac_base + rows)
    qk_t = _mma(k, tl.trans(q), None, DOT_PRECISION) * qk_scale
    p_t = tl.exp2(qk_t - lse2[None, :])
    if MASK:
        valid = (kpos[:, None] >= lo_r[None, :]) & (kpos[:, None] <= hi_r[None, :])
        p_t = tl.where(valid, p_t, 0.0)
    dv = _mma(p_t.to(do.dtype), do, dv, DOT_PRECISION)
    dp_t = _mma(v, tl.trans(do), None, DOT_PRECISION)
    ds_t = p_t * (dp_t - delta[None, :])
    dk = _mma(ds_t.to(q.dtype), q, dk, DOT_PRECISION)
    return dk, dv


@triton.jit
def _bwd_dkdv_rows(
    dk,
    dv,
    k,
    v,
    LO,
    HI,
    list_off,
    r_begin,
    r_end,
    row_end,
    j_first,
    j_last,
    kpos,
    qc_base,
    doc_base,
    lsec_base,
    deltac_base,
    qk_scale,
    offs_d,
    MASK_MODE: tl.constexpr,
    R: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Accumulate the row tiles starting at r_begin, r_begin + BLOCK_M, ... < r_end of one list.

    MASK_MODE 0: no mask (every row of every tile is valid and sees the whole key block); 1: always
    masked; 2: decided per tile. Rows >= row_end load q = dO = 0 and lse = +inf, so they add nothing.
    """
    for r0 in range(r_begin, r_end, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        row_valid = rows < row_end
        if MASK_MODE == 0:
            dk, dv = _bwd_dkdv_inner(
                dk, dv, k, v, rows, row_valid, row_valid, row_valid, kpos, qc_base, doc_base, lsec_base,
                deltac_base, qk_scale, offs_d, HEAD_DIM, False, DOT_PRECISION,
            )  # fmt: skip
        else:
            slot = rows // R
            lo_r = tl.load(LO + list_off + slot, mask=row_valid, other=0)
            hi_r = tl.load(HI + list_off + slot, mask=row_valid, other=-1)
            if MASK_MODE == 2:
                # unmasked loads need a full tile: rows past row_end may be real rows of a later block
                hi_first = tl.load(HI + list_off + r0 // R)
                lo_last = tl.load(LO + list_off + (tl.minimum(r0 + BLOCK_M, row_end) - 1) // R)
                if (r0 + BLOCK_M <= row_end) & (lo_last <= j_first) & (hi_first >= j_last):
                    dk, dv = _bwd_dkdv_inner(
                        dk, dv, k, v, rows, row_valid, lo_r, hi_r, kpos, qc_base, doc_base, lsec_base,
                        deltac_base, qk_scale, offs_d, HEAD_DIM, False, DOT_PRECISION,
                    )  # fmt: skip
                else:
                    dk, dv = _bwd_dkdv_inner(
                        dk, dv, k, v, rows, row_valid, lo_r, hi_r, kpos, qc_base, doc_base, lsec_base,
                        deltac_base, qk_scale, offs_d, HEAD_DIM, True, DOT_PRECISION,
                    )  # fmt: skip
            else:
                dk, dv = _bwd_dkdv_inner(
                    dk, dv, k, v, rows, row_valid, lo_r, hi_r, kpos, qc_base, doc_base, lsec_base,
                    deltac_base, qk_scale, offs_d, HEAD_DIM, True, DOT_PRECISION,
                )  # fmt: skip
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(
    K,
    V,
    DK,
    DV,
    QC,
    DOC,
    LSEC,
    DELTAC,
    LO,
    HI,
    ROW_START,
    ROW_END,
    FULL_START,
    FULL_END,
    PHASE_START,
    stride_kb,
    stride_kn,
    stride_kh,
    stride_vb,
    stride_vn,
    stride_vh,
    stride_dkb,
    stride_dkn,
    stride_dkh,
    stride_xb,
    stride_xl,
    stride_yb,
    stride_yl,
    stride_ib,
    stride_il,
    stride_sb,
    stride_sl,
    n_bh,
    hkv_heads,
    n_lists,
    nk,
    qk_scale,
    scale,
    R: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    LOOP: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """dK, dV of one key block of one K/V head, summed over every compact row that sees it.

    Rows come from the compact buffers written by the dQ kernel (QC, DOC, LSEC, DELTAC; row r of list l
    at [b, l, r]). ROW_START/ROW_END (B, Lc, num_key_blocks): the compact slots [start, end) whose key
    range meets the block, found on the device by searchsorted over the sorted per-slot hi / lo;
    FULL_START/FULL_END (LOOP "split" only): the slots whose range covers the whole block; PHASE_START
    ("split" only): the slot where the unmasked sweep starts (see `dkdv_phase_order`). LOOP "branch"
    decides masking per row tile, "masked" masks every tile, "split" runs unmasked and masked tile ranges.
    """
    pid = tl.program_id(0)
    kb = pid // n_bh
    bh = pid % n_bh
    b = (bh // hkv_heads).to(tl.int64)
    hkv = bh % hkv_heads
    offs_d = tl.arange(0, HEAD_DIM)
    kpos = kb * BLOCK_N + tl.arange(0, BLOCK_N)
    kv_mask = kpos[:, None] < nk
    k = tl.load(
        K + b * stride_kb + hkv * stride_kh + kpos[:, None] * stride_kn + offs_d[None, :],
        mask=kv_mask,
        other=0.0,
    )
    v = tl.load(
        V + b * stride_vb + hkv * stride_vh + kpos[:, None] * stride_vn + offs_d[None, :],
        mask=kv_mask,
        other=0.0,
    )
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    j_first = kb * BLOCK_N
    j_last = j_first + BLOCK_N - 1
    for li in range(0, n_lists):
        lid = hkv * n_lists + li
        list_off = b * stride_ib + lid * stride_il
        se_off = b * stride_sb + lid * stride_sl + kb
        qc_base = QC + b * stride_xb + lid * stride_xl
        doc_base = DOC + b * stride_xb + lid * stride_xl
        lsec_base = LSEC + b * stride_yb + lid * stride_yl
        deltac_base = DELTAC + b * stride_yb + lid * stride_yl
        row_begin = tl.load(ROW_START + se_off) * R
        row_end = tl.load(ROW_END + se_off) * R
        if LOOP == "split":
            # tiles stay on the grid row_begin + i * BLOCK_M; those inside [full_begin, full_end) go unmasked
            full_begin = tl.load(FULL_START + se_off) * R
            full_end = tl.load(FULL_END + se_off) * R
            u0 = row_begin + tl.cdiv(tl.maximum(full_begin - row_begin, 0), BLOCK_M) * BLOCK_M
            u0 = tl.minimum(u0, row_end)
            u1 = u0 + (tl.maximum(full_end - u0, 0) // BLOCK_M) * BLOCK_M
            # one sweep from the phase point p to the end, then from the start back to p
            phase = tl.load(PHASE_START + se_off) * R
            p = tl.minimum(u0 + tl.cdiv(tl.maximum(phase - u0, 0), BLOCK_M) * BLOCK_M, u1)
            dk, dv = _bwd_dkdv_rows(
                dk, dv, k, v, LO, HI, list_off, p, u1, row_end, j_first, j_last, kpos,
                qc_base, doc_base, lsec_base, deltac_base, qk_scale, offs_d, 0, R, HEAD_DIM, BLOCK_M,
                DOT_PRECISION,
            )  # fmt: skip
            dk, dv = _bwd_dkdv_rows(
                dk, dv, k, v, LO, HI, list_off, u1, row_end, row_end, j_first, j_last, kpos,
                qc_base, doc_base, lsec_base, deltac_base, qk_scale, offs_d, 1, R, HEAD_DIM, BLOCK_M,
                DOT_PRECISION,
            )  # fmt: skip
            dk, dv = _bwd_dkdv_rows(
                dk, dv, k, v, LO, HI, list_off, row_begin, u0, row_end, j_first, j_last, kpos,
                qc_base, doc_base, lsec_base, deltac_base, qk_scale, offs_d, 1, R, HEAD_DIM, BLOCK_M,
                DOT_PRECISION,
            )  # fmt: skip
            dk, dv = _bwd_dkdv_rows(
                dk, dv, k, v, LO, HI, list_off, u0, p, row_end, j_first, j_last, kpos,
                qc_base, doc_base, lsec_base, deltac_base, qk_scale, offs_d, 0, R, HEAD_DIM, BLOCK_M,
                DOT_PRECISION,
            )  # fmt: skip
        elif LOOP == "masked":
            dk, dv = _bwd_dkdv_rows(
                dk, dv, k, v, LO, HI, list_off, row_begin, row_end, row_end, j_first, j_last, kpos,
                qc_base, doc_base, lsec_base, deltac_base, qk_scale, offs_d, 1, R, HEAD_DIM, BLOCK_M,
                DOT_PRECISION,
            )  # fmt: skip
        else:
            dk, dv = _bwd_dkdv_rows(
                dk, dv, k, v, LO, HI, list_off, row_begin, row_end, row_end, j_first, j_last, kpos,
                qc_base, doc_base, lsec_base, deltac_base, qk_scale, offs_d, 2, R, HEAD_DIM, BLOCK_M,
                DOT_PRECISION,
            )  # fmt: skip
    out_off = b * stride_dkb + hkv * stride_dkh + kpos[:, None] * stride_dkn + offs_d[None, :]
    tl.store(DK + out_off, (dk * scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + out_off, dv.to(DV.dtype.element_ty), mask=kv_mask)


def backward(
    dout: torch.Tensor,
    dlse: torch.Tensor | None,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    rows: Rows,
    active: torch.Tensor | None,
    scale: float,
    max_count: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq (B, N, Hq, D), dk, dv (B, Nk, Hkv, D) given dout (B, N, Hq, D) and optional dlse (B, Hq, N).

    max_count: an upper bound of `rows.count` known on the host; sizes the compact buffers (and the dQ grid)
    by the routed rows instead of all N."""
    q, k, v = _contiguous_last(q), _contiguous_last(k), _contiguous_last(v)
    dout = dout.contiguous() if dout.stride() != out.stride() else dout
    lse = lse.contiguous()
    dq, _ = _row_outputs(q, active)
    if dlse is not None:
        dlse = dlse.contiguous().float()
    compact = backward_dq(dout, dlse, q, k, v, out, lse, rows, scale, dq, max_count)
    dk, dv = backward_dkdv(k, v, compact, rows, scale)
    return dq, dk, dv


@dataclass
class CompactRows:
    """The backward's rows in list order, written by the dQ kernel for the dK/dV kernel.

    q, dout: (B, Hkv * L, N * R, D) (lists and rows as in `Rows`); lse2 (base-2 lse, +inf for rows
    without keys) and delta: float32 (B, Hkv * L, N * R). Only the first count * R rows of a list are
    written.
    """

    q: torch.Tensor
    dout: torch.Tensor
    lse2: torch.Tensor
    delta: torch.Tensor


def _compact_buffers(q: torch.Tensor, rows: Rows, hkv: int, slots: int) -> CompactRows:
    b, n, hq, d = q.shape
    lists = hkv * rows.lists_per_group
    n_rows = slots * rows.rows_per_token
    new = torch.full if _flash.POISON_UNWRITTEN else (lambda size, _fill, **kw: torch.empty(size, **kw))
    return CompactRows(
        new((b, lists, n_rows, d), float("nan"), dtype=q.dtype, device=q.device),
        new((b, lists, n_rows, d), float("nan"), dtype=q.dtype, device=q.device),
        new((b, lists, n_rows), float("nan"), dtype=torch.float32, device=q.device),
        new((b, lists, n_rows), float("nan"), dtype=torch.float32, device=q.device),
    )


def backward_dq(
    dout: torch.Tensor,
    dlse: torch.Tensor | None,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    rows: Rows,
    scale: float,
    dq: torch.Tensor,
    max_count: int | None = None,
) -> CompactRows:
    """Fill dq (B, N, Hq, D) for the listed rows and return their compact copies for `backward_dkdv`
    (inputs already made contiguous)."""
    b, n, hq, d = q.shape
    nk, hkv = k.shape[1], k.shape[2]
    r = rows.rows_per_token
    capacity = rows.idx.shape[-1]  # slots per list: N tokens, or N * G (token, head) pairs
    slots = capacity if max_count is None else max(1, min(max_count, capacity))
    compact = _compact_buffers(q, rows, hkv, slots)
    cfg = _flash.bwd_dq_config(d)
    programs, n_lists_total = rows.programs(hkv, cfg.block_m, None if max_count is None else slots)
    grid = (programs,)
    _bwd_dq_kernel[grid](
        q, k, v, out, dout, dq, lse, dlse if dlse is not None else lse,
        compact.q, compact.dout, compact.lse2, compact.delta,
        rows.idx, rows.lo, rows.hi, rows.count,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3], *lse.stride()[:2],
        *_list_strides(rows), *compact.q.stride()[:2], *compact.lse2.stride()[:2],
        n_lists_total, hkv, rows.lists_per_group, hq // hkv, nk, scale * LOG2E, scale,
        R=r, HEAD_DIM=d, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, HAS_DLSE=dlse is not None,
        DOT_PRECISION=_dot_precision(q.dtype), PAIRS=rows.pairs, PACKED=rows.packed,
        **cfg.launch_options(),
    )  # fmt: skip
    return compact


def backward_dkdv(
    k: torch.Tensor, v: torch.Tensor, compact: CompactRows, rows: Rows, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """dk, dv (B, Nk, Hkv, D) from the compact rows written by `backward_dq`."""
    b, nk, hkv, d = k.shape
    cfg = _flash.bwd_dkdv_config(d)
    n_kb = triton.cdiv(nk, cfg.block_n)
    starts = torch.arange(n_kb, device=k.device, dtype=torch.int32) * cfg.block_n
    lists = rows.idx.shape[1]
    first_key = starts.expand(b, lists, n_kb).contiguous()
    last_key = (starts + cfg.block_n - 1).expand(b, lists, n_kb).contiguous()
    # rows meeting the block: from the first slot with hi >= j0 to the last with lo <= j1
    row_start = torch.searchsorted(rows.hi, first_key, side="left", out_int32=True)
    row_end = torch.searchsorted(rows.lo, last_key, side="right", out_int32=True)
    loop = dkdv_loop()
    phase_start = full_start = row_start
    full_end = row_end
    if loop == "split":
        # rows covering the whole block: hi >= j1 and lo <= j0
        full_start = torch.searchsorted(rows.hi, last_key, side="left", out_int32=True)
        full_end = torch.searchsorted(rows.lo, first_key, side="right", out_int32=True)
        phase_start = full_start
        if rows.span is not None and dkdv_phase_order():
            # shared phase points every `stride` keys: consecutive key blocks start their sweep together
            stride = triton.cdiv(rows.span, cfg.block_n) * cfg.block_n
            phase_key = (first_key + stride - 1) // stride * stride
            phase_start = torch.searchsorted(rows.hi, phase_key, side="left", out_int32=True)
    dk = torch.full_like(k, float("nan")) if _flash.POISON_UNWRITTEN else torch.empty_like(k)
    dv = torch.full_like(v, float("nan")) if _flash.POISON_UNWRITTEN else torch.empty_like(v)
    grid = (n_kb * b * hkv,)
    stride_sb, stride_sl = row_start.stride(0), 0 if rows.shared else row_start.stride(1)
    _bwd_dkdv_kernel[grid](
        k, v, dk, dv, compact.q, compact.dout, compact.lse2, compact.delta, rows.lo, rows.hi,
        row_start, row_end, full_start, full_end, phase_start,
        *k.stride()[:3], *v.stride()[:3], *dk.stride()[:3], *compact.q.stride()[:2],
        *compact.lse2.stride()[:2], *_list_strides(rows)[:2], stride_sb, stride_sl,
        b * hkv, hkv, rows.lists_per_group, nk, scale * LOG2E, scale,
        R=rows.rows_per_token, HEAD_DIM=d, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, LOOP=loop,
        DOT_PRECISION=_dot_precision(k.dtype), **cfg.launch_options(),
    )  # fmt: skip
    return dk, dv
