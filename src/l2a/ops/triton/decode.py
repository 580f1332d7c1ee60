"""Decode kernels: a few query tokens against many keys (flash-decoding).

The keys are cut into splits of `chunk` keys; program (b, Hkv head, split) computes the partial attention of
all query rows of that K/V head over its split, and a second kernel merges the partials of each row by
log-sum-exp. One program holds the N tokens x G query heads of a K/V head (G = Hq / Hkv), so every K/V tile
is read once for the whole group (GQA-native). Row r of a program: token r // G, query head hkv * G + r % G.

Key range of a row at absolute position t: [max(key_start, t - window + 1), t - key_offset], empty for rows
that are not routed (`active`); a program whose split meets no row's range (every row unrouted, or keys
outside every window) exits before loading anything. The merge has one program per row (grid B * Hkv x N * G)
that reads only the splits meeting its range, BLOCK_S at once (a [BLOCK_S] lse vector and a [BLOCK_S, D]
partial tile, rescaled online across blocks): partial buffers need no initialisation, and a merge over ~130
splits takes a few dependent loads rather than one per split.

Used by `l2a.ops.conditional_attention` / `sliding_window_attention` when few query tokens meet many keys
(`use_decode`), forward only (no autograd).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from l2a.ops.triton._flash import LOG2E, _dot_precision, _mma, check_supported, interpreting

# Dispatch: at most this many query tokens, at least this many keys, at most this many rows per program.
DECODE_MAX_TOKENS = 16
DECODE_MIN_KEYS = 1024
DECODE_MAX_ROWS = 128
# the fewest key blocks a split holds. 1 (session 11, H200): the local branch's 4096-key window at batch 1
# in 11.9 us per call against 15.2 us with 4 (splits of 256 keys: four dependent block loads per program)
DECODE_MIN_SPLIT_BLOCKS = 1


def use_decode(n: int, nk: int, hq: int, hkv: int, needs_grad: bool) -> bool:
    """Whether the decode kernels serve a call with N query tokens and Nk keys (no gradient needed)."""
    rows = n * (hq // hkv)
    return not needs_grad and n <= DECODE_MAX_TOKENS and nk >= DECODE_MIN_KEYS and rows <= DECODE_MAX_ROWS


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _tiles(d: int) -> tuple[int, int, int]:
    """(BLOCK_N, num_warps, num_stages)."""
    if interpreting():
        return 16, 1, 1
    return 64, 4, 2


def split_size(nk: int, programs_per_split: int, device: torch.device, block_n: int) -> int:
    """Keys per split for a key span of nk: enough splits to give every SM ~4 programs, at least
    `DECODE_MIN_SPLIT_BLOCKS` key blocks each."""
    if interpreting():
        return 2 * block_n
    target = max(1, 4 * _sm_count(device.index or 0) // max(programs_per_split, 1))
    chunk = triton.cdiv(triton.cdiv(nk, target), block_n) * block_n
    return max(chunk, DECODE_MIN_SPLIT_BLOCKS * block_n)


def merge_block(n_splits: int, chunk: int, window: int) -> int:
    """Splits the merge reads at once: all that a row can meet, in one block, up to 64 (a [64, D] fp32 tile
    fits the registers of 4 warps at D = 128); 2 in the interpreter, so that tests run several blocks."""
    if interpreting():
        return 2
    if window > 0:
        n_splits = min(n_splits, triton.cdiv(window, chunk) + 1)
    return min(64, triton.next_power_of_2(n_splits))


@triton.jit
def _key_space(NKP, nk, ring, HAS_NK_PTR: tl.constexpr):
    """Number of keys written (from the device with a static cache) and the first position the splits
    cover: 0, or for a ring of `ring` slots the oldest position still held."""
    if HAS_NK_PTR:
        nk = tl.load(NKP).to(tl.int32)
    base = nk * 0
    if ring > 0:
        base = tl.maximum(nk - ring, 0)
    return nk, base


@triton.jit
def _row_bounds(
    b, hkv, ACT, KS, stride_ab, stride_an, stride_ah, n, nk, group, key_offset, window,
    HAS_ACTIVE: tl.constexpr, HEAD_WISE: tl.constexpr, HAS_KEY_START: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """Rows of program (b, hkv): validity, token, query head and inclusive key range [lo, hi]."""
    rows = tl.arange(0, BLOCK_M)
    row_valid = rows < n * group
    tok = rows // group
    head = hkv * group + rows % group
    pos = tok + (nk - n)
    hi = pos - key_offset
    lo = tl.zeros([BLOCK_M], dtype=tl.int32)
    if HAS_KEY_START:
        lo = tl.maximum(lo, tl.load(KS + b).to(tl.int32))
    if window > 0:
        lo = tl.maximum(lo, pos - window + 1)
    live = row_valid
    if HAS_ACTIVE:
        a_off = b * stride_ab + tok * stride_an
        if HEAD_WISE:
            a_off += head * stride_ah
        live = live & (tl.load(ACT + a_off, mask=row_valid, other=0) != 0)
    hi = tl.where(live, hi, -1)
    lo = tl.where(live, lo, nk)
    return row_valid, tok, head, lo, hi


@triton.jit
def _decode_split_kernel(
    Q, K, V, ACT, KS, NKP, PO, PL,
    stride_qb, stride_qn, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_ab, stride_an, stride_ah,
    stride_pb, stride_ps, stride_pm,
    hkv_heads, n, nk, ring, group, key_offset, window, chunk, qk_scale,
    HAS_ACTIVE: tl.constexpr, HEAD_WISE: tl.constexpr, HAS_KEY_START: tl.constexpr, HAS_NK_PTR: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = pid // hkv_heads
    hkv = pid % hkv_heads
    nk, base = _key_space(NKP, nk, ring, HAS_NK_PTR)
    row_valid, tok, head, lo, hi = _row_bounds(
        b, hkv, ACT, KS, stride_ab, stride_an, stride_ah, n, nk, group, key_offset, window,
        HAS_ACTIVE, HEAD_WISE, HAS_KEY_START, BLOCK_M,
    )  # fmt: skip
    # keys of this split that some routed row sees (unrouted rows: lo = nk, hi = -1)
    k_first = tl.maximum(base + split * chunk, tl.min(lo, 0))
    k_last = tl.minimum(tl.minimum(base + split * chunk + chunk, nk) - 1, tl.max(hi, 0))
    if k_last < k_first:
        return  # no routed row meets this split: nothing is read
    b64 = b.to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)
    q_ptrs = Q + b64 * stride_qb + tok[:, None] * stride_qn + head[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_valid[:, None], other=0.0)
    k_base = K + b64 * stride_kb + hkv * stride_kh
    v_base = V + b64 * stride_vb + hkv * stride_vh
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for start in range(k_first - k_first % BLOCK_N, k_last + 1, BLOCK_N):
        kpos = start + offs_n
        in_range = (kpos >= k_first) & (kpos <= k_last)
        slot = tl.where(ring > 0, kpos % tl.maximum(ring, 1), kpos)
        k = tl.load(k_base + slot[:, None] * stride_kn + offs_d[None, :], mask=in_range[:, None], other=0.0)
        qk = _mma(q, tl.trans(k), None, DOT_PRECISION) * qk_scale
        valid = (kpos[None, :] >= lo[:, None]) & (kpos[None, :] <= hi[:, None]) & in_range[None, :]
        qk = tl.where(valid, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_shift)
        p = tl.exp2(qk - m_shift[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + slot[:, None] * stride_vn + offs_d[None, :], mask=in_range[:, None], other=0.0)
        acc = _mma(p.to(v.dtype), v, acc * alpha[:, None], DOT_PRECISION)
        m_i = m_new
    # partial (normalised output, base-2 lse); rows without a key in this split are never read
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    rows = tl.arange(0, BLOCK_M)
    p_off = pid.to(tl.int64) * stride_pb + split * stride_ps + rows * stride_pm
    tl.store(PO + p_off[:, None] + offs_d[None, :], acc / l_safe[:, None])
    # the lse buffer has the output buffer's layout without the head-dim axis
    tl.store(PL + p_off // HEAD_DIM, m_i + tl.log2(l_safe))


@triton.jit
def _decode_merge_kernel(
    PO, PL, ACT, KS, NKP, Out, LSE,
    stride_pb, stride_ps, stride_pm,
    stride_ab, stride_an, stride_ah,
    stride_ob, stride_on, stride_oh,
    stride_lb, stride_lh,
    hkv_heads, n, nk, ring, group, key_offset, window, chunk,
    HAS_ACTIVE: tl.constexpr, HEAD_WISE: tl.constexpr, HAS_KEY_START: tl.constexpr, HAS_NK_PTR: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    row = tl.program_id(1)
    b = pid // hkv_heads
    hkv = pid % hkv_heads
    nk, base = _key_space(NKP, nk, ring, HAS_NK_PTR)
    _, toks, heads, los, his = _row_bounds(
        b, hkv, ACT, KS, stride_ab, stride_an, stride_ah, n, nk, group, key_offset, window,
        HAS_ACTIVE, HEAD_WISE, HAS_KEY_START, BLOCK_M,
    )  # fmt: skip
    # this program's row out of the program-wide vectors
    this = tl.arange(0, BLOCK_M) == row
    tok = tl.sum(tl.where(this, toks, 0))
    head = tl.sum(tl.where(this, heads, 0))
    lo = tl.sum(tl.where(this, los, 0))
    hi = tl.sum(tl.where(this, his, 0))
    # splits that meet [lo, hi]; none (empty loop) for a row without keys
    has_keys = hi >= lo
    s_first = tl.where(has_keys, lo - base, 0) // chunk
    s_last = tl.where(has_keys, (hi - base) // chunk, -1)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_s = tl.arange(0, BLOCK_S)
    p_row = pid.to(tl.int64) * stride_pb + row * stride_pm
    m_i = tl.full([], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([], dtype=tl.float32)
    acc = tl.zeros([HEAD_DIM], dtype=tl.float32)
    # a counter from 0 keeps the partial rows provably 16-byte aligned: counting from s_first compiled to
    # one-float loads (Triton 3.9, sm_90). Every block holds a split with a key of this row (finite lse), so
    # m_new is finite.
    for s0 in range(0, s_last + 1 - s_first, BLOCK_S):
        split = s_first + s0 + offs_s
        take = split <= s_last
        p_off = p_row + split * stride_ps
        lse2 = tl.load(PL + p_off // HEAD_DIM, mask=take, other=float("-inf"))
        part = tl.load(PO + p_off[:, None] + offs_d[None, :], mask=take[:, None], other=0.0)
        m_new = tl.maximum(m_i, tl.max(lse2, 0))
        alpha = tl.exp2(m_i - m_new)
        w = tl.exp2(lse2 - m_new)
        acc = acc * alpha + tl.sum(part * w[:, None], 0)
        l_i = l_i * alpha + tl.sum(w, 0)
        m_i = m_new
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) / 1.4426950408889634)
    b64 = b.to(tl.int64)
    tl.store(
        Out + b64 * stride_ob + tok * stride_on + head * stride_oh + offs_d,
        (acc / l_safe).to(Out.dtype.element_ty),
    )
    tl.store(LSE + b64 * stride_lb + head * stride_lh + tok, lse)


def decode_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    active: torch.Tensor | None,
    scale: float,
    key_offset: int,
    window: int,
    key_start: torch.Tensor | None,
    cache_seqlen: torch.Tensor | None = None,
    ring: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """out (B, N, Hq, D), lse float32 (B, Hq, N) for few query tokens; arguments as the public ops
    (already validated), window 0 for none. Rows that are not routed give out 0, lse -inf.

    cache_seqlen: int (1,) on the device, tokens written to a preallocated k/v (B, S, Hkv, D); None: all S.
    ring: k/v hold position j in slot j % S (`l2a.ops.attention_with_kvcache`)."""
    check_supported(q)
    b, n, hq, d = q.shape
    nk, hkv = k.shape[1], k.shape[2]
    group = hq // hkv
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1 or v.stride(-1) != 1:
        k, v = k.contiguous(), v.contiguous()
    block_m = max(16, triton.next_power_of_2(n * group))
    block_n, num_warps, num_stages = _tiles(d)
    # routed calls: splits sized as if one row were routed, so that a lone routed row of a batch is spread
    # over the GPU as at batch 1 (sized for b * hkv programs, it streamed b times longer splits on few SMs)
    # a ring's rows see at most window + n - 1 of its slots: splits sized for that span. (A linear cache keeps
    # splits sized for all its keys: span-sized splits over a long one would be thousands, most of them idle.)
    span = min(nk, window + n - 1) if ring and window > 0 else nk
    chunk = split_size(span, hkv if active is not None else b * hkv, q.device, block_n)
    n_splits = triton.cdiv(nk, chunk)
    partial_out = q.new_empty((b * hkv, n_splits, block_m, d), dtype=torch.float32)
    partial_lse = q.new_empty((b * hkv, n_splits, block_m), dtype=torch.float32)
    out = torch.empty_like(q)
    lse = q.new_empty((b, hq, n), dtype=torch.float32)
    if active is None:
        act, act_strides = q, (0, 0, 0)
    else:
        act = active.view(torch.uint8) if active.dtype == torch.bool else active
        act_strides = (act.stride(0), act.stride(1), act.stride(2) if act.dim() == 3 else 0)
    ks = key_start if key_start is not None else q
    nkp = cache_seqlen if cache_seqlen is not None else q
    flags = dict(
        HAS_ACTIVE=active is not None,
        HEAD_WISE=active is not None and active.dim() == 3,
        HAS_KEY_START=key_start is not None,
        HAS_NK_PTR=cache_seqlen is not None,
        HEAD_DIM=d,
        BLOCK_M=block_m,
    )
    p_strides = partial_out.stride()[:3]
    _decode_split_kernel[(b * hkv, n_splits)](
        q, k, v, act, ks, nkp, partial_out, partial_lse,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *act_strides, *p_strides,
        hkv, n, nk, nk if ring else 0, group, key_offset, window, chunk, scale * LOG2E,
        BLOCK_N=block_n, DOT_PRECISION=_dot_precision(q.dtype), num_warps=num_warps, num_stages=num_stages,
        **flags,
    )  # fmt: skip
    _decode_merge_kernel[(b * hkv, n * group)](
        partial_out, partial_lse, act, ks, nkp, out, lse, *p_strides, *act_strides,
        *out.stride()[:3], *lse.stride()[:2], hkv, n, nk, nk if ring else 0, group, key_offset, window, chunk,
        BLOCK_S=merge_block(n_splits, chunk, window), num_warps=num_warps, **flags,
    )  # fmt: skip
    return out, lse


@torch.library.custom_op("l2a::decode_attention", mutates_args=())
def decode_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    active: torch.Tensor | None,
    scale: float,
    key_offset: int,
    window: int,
    key_start: torch.Tensor | None,
    cache_seqlen: torch.Tensor | None = None,
    ring: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    return decode_attention_fwd(q, k, v, active, scale, key_offset, window, key_start, cache_seqlen, ring)


@decode_attention_op.register_fake
def _(q, k, v, active, scale, key_offset, window, key_start, cache_seqlen=None, ring=False):
    b, n, hq, _ = q.shape
    return torch.empty_like(q), q.new_empty((b, hq, n), dtype=torch.float32)
