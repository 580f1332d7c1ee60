"""Linear layer on the routed rows of a decode step: y = x @ W^T + b where a row is routed, 0 elsewhere
(plus a residual, when one is given: the decoder layer's residual add in the same pass).

Program p computes BLOCK_N output columns for all M rows (few: `l2a.ops.linear.ROUTED_LINEAR_MAX_ROWS`).
It reads the routing flags first; when no row is routed it writes its zeros and exits without reading the
weight, so a step in which no token of the batch is routed costs one small launch instead of a weight read
(the global branch's q and o projections are ~50 MB per layer at the Qwen2.5-7B shape; ~90 % of the decode
steps of a layer route no token). Forward only; the op exists so that torch.compile keeps it in graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from l2a.ops.triton._flash import _dot_precision, _mma, interpreting


@triton.jit
def _routed_linear_kernel(
    X, W, BIAS, ACT, RES, Y, m, n_out, k_in, stride_xm, stride_wn, stride_rm, stride_ym,
    HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    rows = tl.arange(0, BLOCK_M)
    row_ok = rows < m
    live = (tl.load(ACT + rows, mask=row_ok, other=0) != 0) & row_ok
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < n_out
    y_ptrs = Y + rows[:, None].to(tl.int64) * stride_ym + cols[None, :]
    y_mask = row_ok[:, None] & col_ok[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if HAS_RESIDUAL:
        r_ptrs = RES + rows[:, None].to(tl.int64) * stride_rm + cols[None, :]
        residual = tl.load(r_ptrs, mask=y_mask, other=0.0).to(tl.float32)
    else:
        residual = acc
    if tl.max(live.to(tl.int32), 0) == 0:
        tl.store(y_ptrs, residual.to(Y.dtype.element_ty), mask=y_mask)
        return  # no routed row: the weight is not read
    w_rows = W + cols[:, None].to(tl.int64) * stride_wn
    for start in range(0, k_in, BLOCK_K):
        ks = start + tl.arange(0, BLOCK_K)
        k_ok = ks < k_in
        x = tl.load(
            X + rows[:, None] * stride_xm + ks[None, :], mask=live[:, None] & k_ok[None, :], other=0.0
        )
        w = tl.load(w_rows + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        acc = _mma(x, tl.trans(w), acc, DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(BIAS + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    acc = tl.where(live[:, None], acc, 0.0) + residual
    tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=y_mask)


def _tiles() -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps, num_stages): narrow column blocks, so that a 3584-wide output gives
    224 programs streaming the weight (the step is bandwidth-bound)."""
    if interpreting():
        return 16, 32, 1, 1
    return 16, 256, 4, 4


def routed_linear_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    active: torch.Tensor,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """x (M, K), weight (N, K), bias (N,) or None, active bool (M,), residual (M, N) or None -> y (M, N) in
    x's dtype, the residual added in float32; arguments already validated (`l2a.ops.routed_linear`)."""
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
    block_n, block_k, num_warps, num_stages = _tiles()
    act = active.view(torch.uint8) if active.dtype == torch.bool else active
    _routed_linear_kernel[(triton.cdiv(n_out, block_n),)](
        x, weight, bias if bias is not None else weight, act.contiguous(),
        residual if residual is not None else y, y, m, n_out, k_in,
        x.stride(0), weight.stride(0), residual.stride(0) if residual is not None else 0, y.stride(0),
        HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None,
        BLOCK_M=max(16, triton.next_power_of_2(m)), BLOCK_N=block_n, BLOCK_K=block_k,
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
) -> torch.Tensor:
    return routed_linear_fwd(x, weight, bias, active, residual)


@routed_linear_op.register_fake
def _(x, weight, bias, active, residual=None):
    return x.new_empty(x.shape[0], weight.shape[0])
