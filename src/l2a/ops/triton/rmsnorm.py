"""Fused RMSNorm (forward and backward), one program per row (forward) or per block of rows (backward).

Same arithmetic as `l2a.ops.norm.rms_norm_reference` (Qwen2/Qwen3/Llama's RMSNorm): float32 statistics,
the normalised row rounded to the input dtype, then multiplied by the weight in the promoted dtype. Legend:
M rows (all leading dimensions), H the normalised (last) dimension.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from l2a.ops.triton._flash import interpreting

# rows per backward program: each writes one float32 partial sum of dweight (H,)
_BWD_ROWS = 64


@triton.jit
def _rms_norm_fwd_kernel(
    X, W, Y, RSTD, P, LOGITS, stride_x, stride_y, n_cols, n_proj, eps,
    BLOCK: tl.constexpr, PROJECT: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    """Y = RMSNorm(X) W; PROJECT: also LOGITS[row] = Y[row] @ P^T (P (n_proj, H)), float32 values rounded
    to Y's dtype (what a linear layer on Y returns)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, 0) / n_cols + eps)
    xn = (x * rstd).to(X.dtype.element_ty).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    y = (w * xn).to(Y.dtype.element_ty)
    tl.store(Y + row * stride_y + cols, y, mask=mask)
    tl.store(RSTD + row, rstd)
    if PROJECT:
        p_rows = tl.arange(0, BLOCK_P)
        p_mask = (p_rows < n_proj)[:, None] & mask[None, :]
        proj = tl.load(P + p_rows[:, None] * n_cols + cols[None, :], mask=p_mask, other=0.0).to(tl.float32)
        logits = tl.sum(proj * y.to(tl.float32)[None, :], 1).to(Y.dtype.element_ty).to(tl.float32)
        tl.store(LOGITS + row * n_proj + p_rows, logits, mask=p_rows < n_proj)


@triton.jit
def _rms_norm_bwd_kernel(
    DY, X, W, RSTD, DX, DW_PART, stride_dy, stride_x, stride_dx, n_rows, n_cols, ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    """dx = rstd (g - xn mean(g xn)), g = dy w; DW_PART[pid] = sum over the program's rows of dy xn."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(ROWS):
        row = pid.to(tl.int64) * ROWS + i
        m = mask & (cols * 0 + row < n_rows)
        x = tl.load(X + row * stride_x + cols, mask=m, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * stride_dy + cols, mask=m, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + tl.minimum(row, n_rows - 1))  # rows past the end load and store nothing else
        xn = x * rstd
        dw += dy * xn.to(X.dtype.element_ty).to(tl.float32)
        g = dy * w
        dx = rstd * (g - xn * (tl.sum(g * xn, 0) / n_cols))
        tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=m)
    tl.store(DW_PART + pid.to(tl.int64) * n_cols + cols, dw, mask=mask)


def _block(n_cols: int) -> tuple[int, int]:
    block = triton.next_power_of_2(n_cols)
    return block, 1 if interpreting() else min(16, max(1, block // 256))


def _rows2d(t: torch.Tensor) -> torch.Tensor:
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def _out_dtype(x: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype | None) -> torch.dtype:
    return torch.promote_types(x.dtype, weight.dtype) if out_dtype is None else out_dtype


def rms_norm_fwd(
    x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """y (..., H) in out_dtype (default: the promoted dtype of x and weight); rstd float32 (M,)."""
    x2 = _rows2d(x)
    m, h = x2.shape
    y = torch.empty(m, h, dtype=_out_dtype(x, weight, out_dtype), device=x.device)
    rstd = torch.empty(m, dtype=torch.float32, device=x.device)
    block, warps = _block(h)
    if m:
        _rms_norm_fwd_kernel[(m,)](
            x2, weight, y, rstd, y, rstd, x2.stride(0), y.stride(0), h, 0, eps,
            BLOCK=block, PROJECT=False, BLOCK_P=1, num_warps=warps,
        )  # fmt: skip
    return y.view(x.shape), rstd


def rms_norm_logits_fwd(
    x: torch.Tensor, weight: torch.Tensor, eps: float, proj: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """y (..., H) in the promoted dtype of x and weight (proj's dtype); logits float32 (..., R) = y @ proj.T
    rounded to y's dtype, proj (R, H) (`l2a.ops.norm.rms_norm_and_logits`, validated there)."""
    x2 = _rows2d(x)
    m, h = x2.shape
    y = torch.empty(m, h, dtype=_out_dtype(x, weight, None), device=x.device)
    n_proj = proj.shape[0]
    logits = torch.empty(m, n_proj, dtype=torch.float32, device=x.device)
    rstd = torch.empty(m, dtype=torch.float32, device=x.device)
    block, warps = _block(h)
    if m:
        _rms_norm_fwd_kernel[(m,)](
            x2, weight, y, rstd, proj.contiguous(), logits, x2.stride(0), y.stride(0), h, n_proj, eps,
            BLOCK=block, PROJECT=True, BLOCK_P=triton.next_power_of_2(n_proj), num_warps=warps,
        )  # fmt: skip
    return y.view(x.shape), logits.view(*x.shape[:-1], n_proj)


@torch.library.custom_op("l2a::rms_norm_logits", mutates_args=())
def rms_norm_logits_op(
    x: torch.Tensor, weight: torch.Tensor, eps: float, proj: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return rms_norm_logits_fwd(x, weight, eps, proj)


@rms_norm_logits_op.register_fake
def _(x, weight, eps, proj):
    y = x.new_empty(x.shape, dtype=_out_dtype(x, weight, None))
    return y, x.new_empty(*x.shape[:-1], proj.shape[0], dtype=torch.float32)


def rms_norm_bwd(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """dx (..., H) in x's dtype, dweight (H,) in weight's dtype."""
    x2, dy2 = _rows2d(x), _rows2d(dy)
    m, h = x2.shape
    dx = torch.empty_like(x2)
    programs = triton.cdiv(m, _BWD_ROWS)
    partial = torch.empty(max(programs, 1), h, dtype=torch.float32, device=x.device)
    block, warps = _block(h)
    if m:
        _rms_norm_bwd_kernel[(programs,)](
            dy2, x2, weight, rstd, dx, partial, dy2.stride(0), x2.stride(0), dx.stride(0), m, h,
            ROWS=_BWD_ROWS, BLOCK=block, num_warps=warps,
        )  # fmt: skip
    else:
        partial.zero_()
    return dx.view(x.shape), partial.sum(0).to(weight.dtype)


@torch.library.custom_op("l2a::rms_norm", mutates_args=())
def rms_norm_op(
    x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype | None
) -> tuple[torch.Tensor, torch.Tensor]:
    return rms_norm_fwd(x, weight, eps, out_dtype)


@rms_norm_op.register_fake
def _(x, weight, eps, out_dtype):
    y = x.new_empty(x.shape, dtype=_out_dtype(x, weight, out_dtype))
    return y, x.new_empty(x.shape[:-1].numel(), dtype=torch.float32)


@torch.library.custom_op("l2a::rms_norm_backward", mutates_args=())
def rms_norm_backward_op(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return rms_norm_bwd(dy, x, weight, rstd)


@rms_norm_backward_op.register_fake
def _(dy, x, weight, rstd):
    return torch.empty_like(x), torch.empty_like(weight)


def _setup(ctx: Any, inputs: tuple, output: tuple) -> None:
    x, weight, *_ = inputs
    ctx.save_for_backward(x, weight, output[1])


def _backward(ctx: Any, dy: torch.Tensor, _drstd: Any) -> tuple:
    x, weight, rstd = ctx.saved_tensors
    dx, dweight = rms_norm_backward_op(dy, x, weight, rstd)
    return dx, dweight, None, None


rms_norm_op.register_autograd(_backward, setup_context=_setup)
