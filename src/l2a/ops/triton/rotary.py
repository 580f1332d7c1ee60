"""Fused rotary position embedding (forward and backward): one program per token, all heads; and the decode
steps' cache write (keys rotated and written with the values into their cache slots, one kernel).

`out = x * cos + rotate_half(x) * sin` with rotate_half(x) = (-x2, x1) over the two halves of the head dim,
in float32, stored in the promoted dtype of x and cos (as the PyTorch formula). Legend: B batch, N tokens,
H heads, D head dim (even), S cache slots.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate(X, x_off, hmask, c_base, s_base, HALF: tl.constexpr, BACKWARD: tl.constexpr):
    """The two rotated halves (float32) of the heads at X + x_off, x_off (BLOCK_H, HALF). Forward:
    y1 = x1 c1 - x2 s1, y2 = x2 c2 + x1 s2. BACKWARD (X = dy): the transpose, dx1 = dy1 c1 + dy2 s2,
    dx2 = dy2 c2 - dy1 s1."""
    cols = tl.arange(0, HALF)
    c1 = tl.load(c_base + cols).to(tl.float32)[None, :]
    c2 = tl.load(c_base + HALF + cols).to(tl.float32)[None, :]
    s1 = tl.load(s_base + cols).to(tl.float32)[None, :]
    s2 = tl.load(s_base + HALF + cols).to(tl.float32)[None, :]
    x1 = tl.load(X + x_off, mask=hmask, other=0.0).to(tl.float32)
    x2 = tl.load(X + x_off + HALF, mask=hmask, other=0.0).to(tl.float32)
    if BACKWARD:
        return x1 * c1 + x2 * s2, x2 * c2 - x1 * s1
    else:
        return x1 * c1 - x2 * s1, x2 * c2 + x1 * s2


@triton.jit
def _rotary_kernel(
    X, COS, SIN, Y, stride_xb, stride_xn, stride_xh, stride_cb, stride_cn, stride_yb, stride_yn, stride_yh,
    n_tokens, n_heads, HALF: tl.constexpr, BLOCK_H: tl.constexpr, BACKWARD: tl.constexpr,
):  # fmt: skip
    """Y = rotary(X) (forward) or its transpose (BACKWARD: X = dy, Y = dx)."""
    pid = tl.program_id(0).to(tl.int64)
    b = pid // n_tokens
    t = pid % n_tokens
    heads = tl.arange(0, BLOCK_H)
    cols = tl.arange(0, HALF)
    hmask = heads[:, None] < n_heads
    c_base = COS + b * stride_cb + t * stride_cn
    s_base = SIN + b * stride_cb + t * stride_cn
    x_off = b * stride_xb + t * stride_xn + heads[:, None] * stride_xh + cols[None, :]
    y1, y2 = _rotate(X, x_off, hmask, c_base, s_base, HALF, BACKWARD)
    y_off = b * stride_yb + t * stride_yn + heads[:, None] * stride_yh + cols[None, :]
    tl.store(Y + y_off, y1.to(Y.dtype.element_ty), mask=hmask)
    tl.store(Y + y_off + HALF, y2.to(Y.dtype.element_ty), mask=hmask)


@triton.jit
def _rotary_cache_write_kernel(
    K, V, COS, SIN, SLOTS, KC, VC,
    stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh, stride_cb, stride_cn,
    stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
    n_tokens, n_heads, HALF: tl.constexpr, BLOCK_H: tl.constexpr, ROTATE: tl.constexpr,
):  # fmt: skip
    """KC[b, SLOTS[t]] = rotary(K[b, t]) (or K itself without ROTATE), VC[b, SLOTS[t]] = V[b, t]."""
    pid = tl.program_id(0).to(tl.int64)
    b = pid // n_tokens
    t = pid % n_tokens
    slot = tl.load(SLOTS + t).to(tl.int64)
    heads = tl.arange(0, BLOCK_H)
    cols = tl.arange(0, HALF)
    hmask = heads[:, None] < n_heads
    k_off = b * stride_kb + t * stride_kn + heads[:, None] * stride_kh + cols[None, :]
    if ROTATE:
        c_base = COS + b * stride_cb + t * stride_cn
        k1, k2 = _rotate(K, k_off, hmask, c_base, SIN + b * stride_cb + t * stride_cn, HALF, False)
    else:
        k1 = tl.load(K + k_off, mask=hmask, other=0.0)
        k2 = tl.load(K + k_off + HALF, mask=hmask, other=0.0)
    kc_off = b * stride_kcb + slot * stride_kcs + heads[:, None] * stride_kch + cols[None, :]
    tl.store(KC + kc_off, k1.to(KC.dtype.element_ty), mask=hmask)
    tl.store(KC + kc_off + HALF, k2.to(KC.dtype.element_ty), mask=hmask)
    v_off = b * stride_vb + t * stride_vn + heads[:, None] * stride_vh + cols[None, :]
    vc_off = b * stride_vcb + slot * stride_vcs + heads[:, None] * stride_vch + cols[None, :]
    v1 = tl.load(V + v_off, mask=hmask, other=0.0)
    v2 = tl.load(V + v_off + HALF, mask=hmask, other=0.0)
    tl.store(VC + vc_off, v1.to(VC.dtype.element_ty), mask=hmask)
    tl.store(VC + vc_off + HALF, v2.to(VC.dtype.element_ty), mask=hmask)


def _launch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out_dtype: torch.dtype, backward: bool):
    b, n, h, d = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    cos, sin = _tables(cos, sin, b, n, d)
    y = torch.empty(b, n, h, d, dtype=out_dtype, device=x.device)
    if y.numel():
        _rotary_kernel[(b * n,)](
            x, cos, sin, y, *x.stride()[:3], *cos.stride()[:2], *y.stride()[:3], n, h,
            HALF=d // 2, BLOCK_H=triton.next_power_of_2(h), BACKWARD=backward,
            num_warps=4 if h * d >= 1024 else 1,
        )  # fmt: skip
    return y


def _tables(cos: torch.Tensor, sin: torch.Tensor, b: int, n: int, d: int) -> tuple[torch.Tensor, ...]:
    """cos/sin (B or 1, N, D) -> (B, N, D) views with unit last stride and one stride pattern for both."""
    cos, sin = cos.expand(b, n, d), sin.expand(b, n, d)
    if cos.stride(-1) != 1 or sin.stride() != cos.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    return cos, sin


def _out_dtype(x: torch.Tensor, cos: torch.Tensor, out_dtype: torch.dtype | None) -> torch.dtype:
    return torch.promote_types(x.dtype, cos.dtype) if out_dtype is None else out_dtype


def rotary_fwd(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out_dtype: torch.dtype | None
) -> torch.Tensor:
    """x (B, N, H, D), cos/sin (B or 1, N, D) -> (B, N, H, D) in out_dtype (default: the promoted dtype)."""
    return _launch(x, cos, sin, _out_dtype(x, cos, out_dtype), backward=False)


@torch.library.custom_op("l2a::rotary", mutates_args=())
def rotary_op(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out_dtype: torch.dtype | None
) -> torch.Tensor:
    return rotary_fwd(x, cos, sin, out_dtype)


@rotary_op.register_fake
def _(x, cos, sin, out_dtype):
    return x.new_empty(x.shape, dtype=_out_dtype(x, cos, out_dtype))


@torch.library.custom_op("l2a::rotary_backward", mutates_args=())
def rotary_backward_op(
    dy: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, x_dtype: torch.dtype
) -> torch.Tensor:
    return _launch(dy, cos, sin, x_dtype, backward=True)


@rotary_backward_op.register_fake
def _(dy, cos, sin, x_dtype):
    return dy.new_empty(dy.shape, dtype=x_dtype)


def _setup(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
    x, cos, sin, _ = inputs
    ctx.save_for_backward(cos, sin)
    ctx.x_dtype = x.dtype


def _backward(ctx: Any, dy: torch.Tensor) -> tuple:
    cos, sin = ctx.saved_tensors
    return rotary_backward_op(dy, cos, sin, ctx.x_dtype), None, None, None


rotary_op.register_autograd(_backward, setup_context=_setup)


def write_kv_cache_fwd(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
) -> None:
    """k_cache, v_cache (B, S, H, D) <- k (rotated when cos/sin (B or 1, N, D) are given), v (B, N, H, D) at
    slots int64 (N,); arguments already validated (`l2a.ops.kvcache.write_kv_cache`)."""
    b, n, h, d = k.shape
    if k.stride(-1) != 1 or v.stride(-1) != 1:
        k, v = k.contiguous(), v.contiguous()
    rotate = cos is not None
    cos, sin = _tables(cos, sin, b, n, d) if rotate else (k, k)
    if b * n:
        _rotary_cache_write_kernel[(b * n,)](
            k, v, cos, sin, slots, k_cache, v_cache, *k.stride()[:3], *v.stride()[:3], *cos.stride()[:2],
            *k_cache.stride()[:3], *v_cache.stride()[:3], n, h,
            HALF=d // 2, BLOCK_H=triton.next_power_of_2(h), ROTATE=rotate,
            num_warps=4 if h * d >= 1024 else 1,
        )  # fmt: skip


@torch.library.custom_op("l2a::write_kv_cache", mutates_args=("k_cache", "v_cache"))
def write_kv_cache_op(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
) -> None:
    write_kv_cache_fwd(k_cache, v_cache, slots, k, v, cos, sin)


@write_kv_cache_op.register_fake
def _(k_cache, v_cache, slots, k, v, cos, sin):
    return None
