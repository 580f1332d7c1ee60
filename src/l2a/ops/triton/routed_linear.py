"""Decode-step projections: a few rows (batch x new tokens) times a weight, bandwidth-bound.

`_routed_linear_kernel`: y = x @ W^T + b where a row is routed, 0 elsewhere (plus a residual, when one is
given: the decoder layer's residual add in the same pass), optionally rotated by RoPE (the queries). Program
p computes BLOCK_N output columns for all M rows (few: `l2a.ops.linear.ROUTED_LINEAR_MAX_ROWS`). It reads
the routing flags first; when no row is routed it writes its zeros and exits without reading the weight, so
a step in which no token of the batch is routed costs one small launch instead of a weight read (the global
branch's q and o projections are ~50 MB per layer at the Qwen2.5-7B shape; ~90 % of the decode steps of a
layer route no token).

`_linear_kv_cache_kernel`: the new tokens' keys and values projected by one weight ([W_k; W_v]), the keys
rotated, both written into their cache slots: the decode step's k/v GEMM, RoPE and cache write in one launch.

`_norm_route_qkv_kernel`: the global branch's whole decode-step entry in one launch, from the residual stream:
its RMSNorm, the router's decision, the k/v projection into the cache (as `_linear_kv_cache_kernel`) and q of
the routed rows (as `_routed_linear_kernel`), each program normalising the few rows itself.

RoPE epilogues: a program's BLOCK_N columns are BLOCK_N / 2 columns of one head's first half interleaved
with their partners of the second half (`_rotary_columns`), so that each program rotates its own pairs.
Forward only; the ops exist so that torch.compile keeps them in graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from l2a.ops.triton._flash import _dot_precision, _mma, interpreting
from l2a.ops.triton.rotary import _tables


@triton.jit
def _rows_times_weight(
    X, W, rows, live, cols, col_ok, k_in, stride_xm, stride_wn, NW, rstd,
    NORMED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """(BLOCK_M, BLOCK_N) float32: X[rows] @ W[cols]^T; rows that are not `live` read as 0. NORMED: X's rows
    RMS-normalised first (`_normed`, rstd (BLOCK_M,), weight NW (K,))."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    w_rows = W + cols[:, None].to(tl.int64) * stride_wn
    for start in range(0, k_in, BLOCK_K):
        ks = start + tl.arange(0, BLOCK_K)
        k_ok = ks < k_in
        x = tl.load(
            X + rows[:, None] * stride_xm + ks[None, :], mask=live[:, None] & k_ok[None, :], other=0.0
        )
        if NORMED:
            x = _normed(x, NW, ks, k_ok, rstd)
        w = tl.load(w_rows + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        acc = _mma(x, tl.trans(w), acc, DOT_PRECISION)
    return acc


@triton.jit
def _rows_rstd_and_route(
    X, NW, RW, m, k_in, stride_xm, eps, offset, temperature, threshold,
    ROUTE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_ROW: tl.constexpr,
):  # fmt: skip
    """Per row of X (m rows of k_in <= BLOCK_ROW): rstd = 1 / sqrt(mean(x^2) + eps), float32 (BLOCK_M,);
    ROUTE: also a token-wise router on the normalised row g, soft = sigmoid((g . RW + offset) /
    temperature) with the dot rounded to g's dtype (what a linear layer returns), and hard = soft >=
    threshold. One row per iteration, read whole: a decode step has few rows, and a loop over K chunks
    would be a chain of dependent loads in every program (the arithmetic is `l2a.ops.norm`'s kernel's)."""
    rows = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_ROW)
    c_ok = cols < k_in
    rstd = tl.zeros([BLOCK_M], dtype=tl.float32)
    logit = tl.zeros([BLOCK_M], dtype=tl.float32)
    for r in range(0, m):
        x = tl.load(X + r * stride_xm + cols, mask=c_ok, other=0.0)
        xf = x.to(tl.float32)
        row_rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, 0) / k_in + eps)
        rstd = tl.where(rows == r, row_rstd, rstd)
        if ROUTE:
            nw = tl.load(NW + cols, mask=c_ok, other=0.0).to(tl.float32)
            g = ((xf * row_rstd).to(x.dtype).to(tl.float32) * nw).to(x.dtype).to(tl.float32)
            rw = tl.load(RW + cols, mask=c_ok, other=0.0).to(tl.float32)
            row_logit = tl.sum(g * rw, 0).to(x.dtype).to(tl.float32)
            logit = tl.where(rows == r, row_logit, logit)
    # the values as (BLOCK_M,) slices of a 2D tile (a max over equal copies: exact), the layout the tiles'
    # rows have; a 1D vector kept its own layout and spilled registers into the projection loops
    copies = tl.zeros([BLOCK_M, 16], dtype=tl.float32)
    rstd = tl.max(copies + rstd[:, None], 1)
    soft = tl.sigmoid((tl.max(copies + logit[:, None], 1) + offset) / temperature)
    return rstd, soft, (soft >= threshold) & (rows < m)


@triton.jit
def _normed(x, NW, ks, k_ok, rstd):
    """RMSNorm of a tile (BLOCK_M, BLOCK_K) of rows, in x's dtype, rounded as
    `l2a.ops.norm.rms_norm_reference` rounds: x * rstd to x's dtype, times the weight, to x's dtype."""
    xn = (x.to(tl.float32) * rstd[:, None]).to(x.dtype).to(tl.float32)
    w = tl.load(NW + ks, mask=k_ok, other=0.0).to(tl.float32)
    return (xn * w[None, :]).to(x.dtype)


@triton.jit
def _rotary_columns(pid, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr):
    """Program pid's columns (BLOCK_N,) in a RoPE epilogue, and its head: column 2j is head * D + j0 + j,
    column 2j + 1 its partner D / 2 further (BLOCK_N divides D); also j0, the first of its half-columns."""
    per_head = HEAD_DIM // BLOCK_N
    head = pid // per_head
    j0 = (pid % per_head) * (BLOCK_N // 2)
    i = tl.arange(0, BLOCK_N)
    return head * HEAD_DIM + j0 + i // 2 + (i % 2) * (HEAD_DIM // 2), head, j0


@triton.jit
def _rotate_pairs(
    acc, COS, SIN, cs_off, row_ok, j0,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """RoPE of acc (BLOCK_M, BLOCK_N) in `_rotary_columns` order, float32: y1 = x1 c1 - x2 s1,
    y2 = x2 c2 + x1 s2 (x1 first half, x2 second); cs_off (BLOCK_M,) each row's cos/sin offset."""
    x1, x2 = tl.split(tl.reshape(acc, [BLOCK_M, BLOCK_N // 2, 2]))
    lo = cs_off[:, None] + (j0 + tl.arange(0, BLOCK_N // 2))[None, :]
    hi = lo + HEAD_DIM // 2
    mask = row_ok[:, None]
    c1 = tl.load(COS + lo, mask=mask, other=0.0).to(tl.float32)
    c2 = tl.load(COS + hi, mask=mask, other=0.0).to(tl.float32)
    s1 = tl.load(SIN + lo, mask=mask, other=0.0).to(tl.float32)
    s2 = tl.load(SIN + hi, mask=mask, other=0.0).to(tl.float32)
    return tl.reshape(tl.join(x1 * c1 - x2 * s1, x2 * c2 + x1 * s2), [BLOCK_M, BLOCK_N])


@triton.jit
def _routed_tile(
    pid, X, W, BIAS, RES, COS, SIN, Y, rows, row_ok, live, n_out, k_in, n_tokens,
    stride_xm, stride_wn, stride_rm, stride_ym, stride_cb, stride_cn, NW, rstd,
    NORMED: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, ROTARY: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Program pid's BLOCK_N columns of Y = (X W^T + b, rotated) on the `live` rows, 0 elsewhere, + RES."""
    if ROTARY:
        cols, _, j0 = _rotary_columns(pid, HEAD_DIM, BLOCK_N)
    else:
        cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        j0 = 0
    col_ok = cols < n_out
    y_ptrs = Y + rows[:, None].to(tl.int64) * stride_ym + cols[None, :]
    y_mask = row_ok[:, None] & col_ok[None, :]
    if HAS_RESIDUAL:
        r_ptrs = RES + rows[:, None].to(tl.int64) * stride_rm + cols[None, :]
        residual = tl.load(r_ptrs, mask=y_mask, other=0.0).to(tl.float32)
    else:
        residual = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if tl.max(live.to(tl.int32), 0) == 0:
        tl.store(y_ptrs, residual.to(Y.dtype.element_ty), mask=y_mask)  # no routed row: W is not read
    else:
        acc = _rows_times_weight(
            X, W, rows, live, cols, col_ok, k_in, stride_xm, stride_wn, NW, rstd, NORMED, BLOCK_M, BLOCK_N,
            BLOCK_K, DOT_PRECISION,
        )  # fmt: skip
        if HAS_BIAS:
            acc += tl.load(BIAS + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if ROTARY:
            cs_off = (rows // n_tokens).to(tl.int64) * stride_cb + (rows % n_tokens) * stride_cn
            acc = _rotate_pairs(acc, COS, SIN, cs_off, row_ok, j0, HEAD_DIM, BLOCK_M, BLOCK_N)
        acc = tl.where(live[:, None], acc, 0.0) + residual
        tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=y_mask)


@triton.jit
def _kv_tile_into_cache(
    pid, X, W, BIAS, COS, SIN, SLOTS, KC, VC, rows, row_ok, n_tokens, kv_heads, k_in,
    stride_xm, stride_wn, stride_cb, stride_cn,
    stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch, NW, rstd,
    NORMED: tl.constexpr, HAS_BIAS: tl.constexpr, ROTATE: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Program pid's BLOCK_N columns of [k | v] = X [W_k; W_v]^T + b, keys rotated under ROTATE, written
    into their cache slots (see `_linear_kv_cache_kernel`)."""
    cols, head, j0 = _rotary_columns(pid, HEAD_DIM, BLOCK_N)
    acc = _rows_times_weight(
        X, W, rows, row_ok, cols, cols >= 0, k_in, stride_xm, stride_wn, NW, rstd, NORMED, BLOCK_M, BLOCK_N,
        BLOCK_K, DOT_PRECISION,
    )  # fmt: skip
    if HAS_BIAS:
        acc += tl.load(BIAS + cols).to(tl.float32)[None, :]
    b = (rows // n_tokens).to(tl.int64)
    t = rows % n_tokens
    slot = tl.load(SLOTS + t, mask=row_ok, other=0).to(tl.int64)
    d = (cols % HEAD_DIM)[None, :]
    mask = row_ok[:, None]
    if head < kv_heads:
        if ROTATE:
            acc = _rotate_pairs(
                acc, COS, SIN, b * stride_cb + t * stride_cn, row_ok, j0, HEAD_DIM, BLOCK_M, BLOCK_N
            )
        dst = KC + (b * stride_kcb + slot * stride_kcs + head * stride_kch)[:, None] + d
        tl.store(dst, acc.to(KC.dtype.element_ty), mask=mask)
    else:
        dst = VC + (b * stride_vcb + slot * stride_vcs + (head - kv_heads) * stride_vch)[:, None] + d
        tl.store(dst, acc.to(VC.dtype.element_ty), mask=mask)


@triton.jit
def _routed_linear_kernel(
    X, W, BIAS, ACT, RES, COS, SIN, Y, m, n_out, k_in, n_tokens,
    stride_xm, stride_wn, stride_rm, stride_ym, stride_cb, stride_cn,
    HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, ROTARY: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    rows = tl.arange(0, BLOCK_M)
    row_ok = rows < m
    live = (tl.load(ACT + rows, mask=row_ok, other=0) != 0) & row_ok
    _routed_tile(
        tl.program_id(0), X, W, BIAS, RES, COS, SIN, Y, rows, row_ok, live, n_out, k_in, n_tokens,
        stride_xm, stride_wn, stride_rm, stride_ym, stride_cb, stride_cn, W, tl.zeros([BLOCK_M], tl.float32),
        False, HAS_BIAS, HAS_RESIDUAL, ROTARY, HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION,
    )  # fmt: skip


@triton.jit
def _linear_kv_cache_kernel(
    X, W, BIAS, COS, SIN, SLOTS, KC, VC, m, n_tokens, kv_heads, k_in,
    stride_xm, stride_wn, stride_cb, stride_cn,
    stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
    HAS_BIAS: tl.constexpr, ROTATE: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Rows are (batch, token) pairs, b = row // n_tokens; output heads [0, Hkv) are keys, [Hkv, 2 Hkv)
    values. KC[b, SLOTS[t], h] = rotary(x W_k^T + b_k)[h] (not rotated without ROTATE), VC likewise."""
    rows = tl.arange(0, BLOCK_M)
    _kv_tile_into_cache(
        tl.program_id(0), X, W, BIAS, COS, SIN, SLOTS, KC, VC, rows, rows < m, n_tokens, kv_heads, k_in,
        stride_xm, stride_wn, stride_cb, stride_cn, stride_kcb, stride_kcs, stride_kch,
        stride_vcb, stride_vcs, stride_vch, W, tl.zeros([BLOCK_M], tl.float32),
        False, HAS_BIAS, ROTATE, HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION,
    )  # fmt: skip


@triton.jit
def _norm_route_qkv_kernel(
    X, NW, RW, WQ, BQ, WKV, BKV, COS, SIN, SLOTS, KC, VC, Q, SOFT, HARD,
    m, n_tokens, kv_heads, k_in, n_q, kv_programs, eps, offset, temperature, threshold,
    stride_xm, stride_wq, stride_wkv, stride_qm, stride_cb, stride_cn,
    stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
    HAS_BIAS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_ROW: tl.constexpr,
    BLOCK_N_KV: tl.constexpr, BLOCK_K_KV: tl.constexpr, BLOCK_N_Q: tl.constexpr, BLOCK_K_Q: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """The global branch's decode-step entry from the residual stream X (M, K): programs [0, kv_programs)
    project g = RMSNorm(X) into keys and values and write them into the cache (`_kv_tile_into_cache`), the
    others decide the router (`_rows_rstd_and_route`, every program on its own: a few rows that sit in
    L2) and project q of the routed rows, rotated (`_routed_tile`); the first q program stores the
    decision. Each program normalises its own rows: no launch for the norm or the router."""
    pid = tl.program_id(0)
    rows = tl.arange(0, BLOCK_M)
    row_ok = rows < m
    route = (X, NW, RW, m, k_in, stride_xm, eps, offset, temperature, threshold)
    if pid < kv_programs:
        rstd, _, _ = _rows_rstd_and_route(*route, False, BLOCK_M, BLOCK_ROW)
        _kv_tile_into_cache(
            pid, X, WKV, BKV, COS, SIN, SLOTS, KC, VC, rows, row_ok, n_tokens, kv_heads, k_in,
            stride_xm, stride_wkv, stride_cb, stride_cn, stride_kcb, stride_kcs, stride_kch,
            stride_vcb, stride_vcs, stride_vch, NW, rstd,
            True, HAS_BIAS, True, HEAD_DIM, BLOCK_M, BLOCK_N_KV, BLOCK_K_KV, DOT_PRECISION,
        )  # fmt: skip
    else:
        rstd, soft, hard = _rows_rstd_and_route(*route, True, BLOCK_M, BLOCK_ROW)
        if pid == kv_programs:
            tl.store(SOFT + rows, soft, mask=row_ok)
            tl.store(HARD + rows, hard.to(tl.uint8), mask=row_ok)
        _routed_tile(
            pid - kv_programs, X, WQ, BQ, Q, COS, SIN, Q, rows, row_ok, hard, n_q, k_in, n_tokens,
            stride_xm, stride_wq, 0, stride_qm, stride_cb, stride_cn, NW, rstd,
            True, HAS_BIAS, False, True, HEAD_DIM, BLOCK_M, BLOCK_N_Q, BLOCK_K_Q, DOT_PRECISION,
        )  # fmt: skip


def _tiles(kernel: str) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps, num_stages) of "routed" (`_routed_linear_kernel`) or "kv"
    (`_linear_kv_cache_kernel`): the fastest of six configurations on the H200 at the Qwen2.5-7B shape, one
    row (`benchmarks/bench_decode_ops.py`, docs/benchmarks.md "Inference, session 9"): routed q 9.2 us
    (cuBLAS 9.0 + RoPE 1.9), the k/v projection into the cache 6.4 us (cuBLAS 6.9 + cache write 1.9)."""
    if interpreting():
        return 16, 32, 1, 1
    return (32, 256, 4, 4) if kernel == "routed" else (16, 512, 4, 3)


# `_norm_route_qkv_kernel`'s launch: (BLOCK_K of its k/v programs, num_warps, num_stages); its q programs
# take the "routed" tiles. `benchmarks/bench_decode_ops.py --entry-only` sweeps it (docs/benchmarks.md,
# "Inference, session 10": 3 stages were faster in the model than 1, which won with the weights in L2).
ENTRY_LAUNCH: tuple[int, int, int] = (512, 4, 3)


def _rows_block(m: int) -> int:
    return max(16, triton.next_power_of_2(m))


def routed_linear_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    active: torch.Tensor,
    residual: torch.Tensor | None = None,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
    n_tokens: int = 1,
) -> torch.Tensor:
    """x (M, K), weight (N, K), bias (N,) or None, active bool (M,), residual (M, N) or None -> y (M, N) in
    x's dtype, the residual added in float32. cos/sin (B, n_tokens, D) (M = B * n_tokens): y's heads of D
    columns rotated. Arguments already validated (`l2a.ops.routed_linear`)."""
    m, k_in = x.shape
    n_out = weight.shape[0]
    if x.stride(-1) != 1:
        x = x.contiguous()
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    if residual is not None and residual.stride(-1) != 1:
        residual = residual.contiguous()
    y = x.new_empty(m, n_out)
    if y.numel() == 0:
        return y
    block_n, block_k, num_warps, num_stages = _tiles("routed")
    rotary = cos is not None
    head_dim = cos.shape[-1] if rotary else block_n
    block_n = min(block_n, head_dim)  # a RoPE epilogue pairs columns within one head
    if rotary:
        cos, sin = _tables(cos, sin, m // n_tokens, n_tokens, head_dim)
    act = active.view(torch.uint8) if active.dtype == torch.bool else active
    _routed_linear_kernel[(triton.cdiv(n_out, block_n),)](
        x, weight, bias if bias is not None else weight, act.contiguous(),
        residual if residual is not None else y, cos if rotary else y, sin if rotary else y, y,
        m, n_out, k_in, n_tokens, x.stride(0), weight.stride(0),
        residual.stride(0) if residual is not None else 0, y.stride(0),
        *(cos.stride()[:2] if rotary else (0, 0)),
        HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None, ROTARY=rotary, HEAD_DIM=head_dim,
        BLOCK_M=_rows_block(m), BLOCK_N=block_n, BLOCK_K=block_k,
        DOT_PRECISION=_dot_precision(x.dtype), num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return y


@torch.library.custom_op("l2a::routed_linear", mutates_args=())
def routed_linear_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    active: torch.Tensor,
    residual: torch.Tensor | None = None,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
    n_tokens: int = 1,
) -> torch.Tensor:
    return routed_linear_fwd(x, weight, bias, active, residual, cos, sin, n_tokens)


@routed_linear_op.register_fake
def _(x, weight, bias, active, residual=None, cos=None, sin=None, n_tokens=1):
    return x.new_empty(x.shape[0], weight.shape[0])


def linear_kv_cache_fwd(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
) -> None:
    """x (B, N, K), weight (2 Hkv D, K), bias (2 Hkv D,) or None -> keys (rotated when cos/sin (B or 1, N,
    D) are given) and values written into k_cache, v_cache (B, S, Hkv, D) at slots int64 (N,); arguments
    already validated (`l2a.ops.kvcache.project_kv_cache`)."""
    b, n, k_in = x.shape
    kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    m = b * n
    if m == 0:
        return
    x = x.reshape(m, k_in)
    if x.stride(-1) != 1:
        x = x.contiguous()
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    rotate = cos is not None
    if rotate:
        cos, sin = _tables(cos, sin, b, n, head_dim)
    block_n, block_k, num_warps, num_stages = _tiles("kv")
    block_n = min(block_n, head_dim)
    _linear_kv_cache_kernel[(2 * kv_heads * head_dim // block_n,)](
        x, weight, bias if bias is not None else weight, cos if rotate else x, sin if rotate else x, slots,
        k_cache, v_cache, m, n, kv_heads, k_in, x.stride(0), weight.stride(0),
        *(cos.stride()[:2] if rotate else (0, 0)), *k_cache.stride()[:3], *v_cache.stride()[:3],
        HAS_BIAS=bias is not None, ROTATE=rotate, HEAD_DIM=head_dim,
        BLOCK_M=_rows_block(m), BLOCK_N=block_n, BLOCK_K=block_k,
        DOT_PRECISION=_dot_precision(x.dtype), num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip


@torch.library.custom_op("l2a::linear_kv_cache", mutates_args=("k_cache", "v_cache"))
def linear_kv_cache_op(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
) -> None:
    linear_kv_cache_fwd(k_cache, v_cache, slots, x, weight, bias, cos, sin)


@linear_kv_cache_op.register_fake
def _(k_cache, v_cache, slots, x, weight, bias, cos, sin):
    return None


def norm_route_qkv_fwd(
    x: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    router_weight: torch.Tensor,
    offset: float,
    temperature: float,
    threshold: float,
    q_weight: torch.Tensor,
    q_bias: torch.Tensor | None,
    kv_weight: torch.Tensor,
    kv_bias: torch.Tensor | None,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (B, N, K) -> q (B, N, Hq D) (0 on rows not routed), soft float32 (B, N), hard bool (B, N); keys and
    values written into k_cache, v_cache (B, S, Hkv, D) at slots (N,). Arguments already validated
    (`l2a.ops.kvcache.norm_route_qkv`)."""
    b, n, k_in = x.shape
    kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    m = b * n
    n_q = q_weight.shape[0]
    q = x.new_empty(b, n, n_q)
    soft = x.new_empty(b, n, dtype=torch.float32)
    hard = x.new_empty(b, n, dtype=torch.bool)
    if m == 0:
        return q, soft, hard
    x = x.reshape(m, k_in)
    if x.stride(-1) != 1:
        x = x.contiguous()
    q_weight, kv_weight = q_weight.contiguous(), kv_weight.contiguous()
    cos, sin = _tables(cos, sin, b, n, head_dim)
    block_n_kv, block_k_kv, num_warps, num_stages = _tiles("kv")
    block_n_q, block_k_q, _, _ = _tiles("routed")
    if not interpreting():
        block_k_kv, num_warps, num_stages = ENTRY_LAUNCH
    block_n_kv, block_n_q = min(block_n_kv, head_dim), min(block_n_q, head_dim)
    kv_programs = 2 * kv_heads * head_dim // block_n_kv
    has_bias = q_bias is not None
    _norm_route_qkv_kernel[(kv_programs + triton.cdiv(n_q, block_n_q),)](
        x, norm_weight, router_weight, q_weight, q_bias if has_bias else q_weight, kv_weight,
        kv_bias if has_bias else kv_weight, cos, sin, slots, k_cache, v_cache, q, soft,
        hard.view(torch.uint8),
        m, n, kv_heads, k_in, n_q, kv_programs, eps, offset, temperature, threshold,
        x.stride(0), q_weight.stride(0), kv_weight.stride(0), n_q, *cos.stride()[:2],
        *k_cache.stride()[:3], *v_cache.stride()[:3],
        HAS_BIAS=has_bias, HEAD_DIM=head_dim, BLOCK_M=_rows_block(m), BLOCK_ROW=triton.next_power_of_2(k_in),
        BLOCK_N_KV=block_n_kv,
        BLOCK_K_KV=block_k_kv, BLOCK_N_Q=block_n_q, BLOCK_K_Q=block_k_q,
        DOT_PRECISION=_dot_precision(x.dtype), num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return q, soft, hard


@torch.library.custom_op("l2a::norm_route_qkv", mutates_args=("k_cache", "v_cache"))
def norm_route_qkv_op(
    x: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    router_weight: torch.Tensor,
    offset: float,
    temperature: float,
    threshold: float,
    q_weight: torch.Tensor,
    q_bias: torch.Tensor | None,
    kv_weight: torch.Tensor,
    kv_bias: torch.Tensor | None,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return norm_route_qkv_fwd(
        x, norm_weight, eps, router_weight, offset, temperature, threshold, q_weight, q_bias, kv_weight,
        kv_bias, k_cache, v_cache, slots, cos, sin,
    )  # fmt: skip


@norm_route_qkv_op.register_fake
def _(x, norm_weight, eps, router_weight, offset, temperature, threshold, q_weight, *args):
    b, n, _ = x.shape
    return (
        x.new_empty(b, n, q_weight.shape[0]),
        x.new_empty(b, n, dtype=torch.float32),
        x.new_empty(b, n, dtype=torch.bool),
    )
