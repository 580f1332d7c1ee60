"""Rotary position embedding as an op: a fused Triton kernel on CUDA, the plain PyTorch formula elsewhere.

Legend: B batch, N tokens, H heads, D head dim.
"""

from __future__ import annotations

import torch

from l2a.ops import _checks
from l2a.ops.attention import _use_triton_elementwise


def rotary_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, N, H, D), cos/sin (B, N, D) -> `x * cos + rotate_half(x) * sin`, rotate_half(x) = (-x2, x1)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos.unsqueeze(2) + torch.cat((-x2, x1), dim=-1) * sin.unsqueeze(2)


def triton_supported(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """Whether the RoPE kernels take these tensors: D / 2 a power of two (D: cos's last dim), 16/32-bit
    floats, cos/sin without gradient (also the cache-write kernel's condition,
    `l2a.ops.kvcache.write_kv_cache`, and with D >= 16 the projection kernels' RoPE epilogue)."""
    half = cos.shape[-1] // 2
    return (
        half & (half - 1) == 0
        and x.dtype in _checks.TRITON_DTYPES
        and cos.dtype in _checks.TRITON_DTYPES
        and sin.dtype == cos.dtype
        and not (cos.requires_grad or sin.requires_grad)
    )


def apply_rotary(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    out_dtype: torch.dtype | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Rotary embedding in the ops layout: x (B, N, H, D), cos/sin (B, N, D) -> (B, N, H, D) in the promoted
    dtype of x and cos (as `rotary_reference`), or cast to `out_dtype` (the kernel writes it directly).

    backend: "auto" (the fused Triton kernel for CUDA tensors of float16 / bfloat16 / float32 when triton is
    installed, D / 2 is a power of two and cos/sin need no gradient, else PyTorch), "triton" or "torch".
    """
    _checks.check_backend(backend)
    if x.dim() != 4 or cos.shape != sin.shape or cos.shape[-1] != x.shape[-1] or x.shape[-1] % 2:
        raise ValueError(
            f"rotary: x must be (B, N, H, D) with D even and cos/sin (B, N, D), got {tuple(x.shape)}, "
            f"{tuple(cos.shape)}, {tuple(sin.shape)}"
        )
    half = x.shape[-1] // 2
    if not _use_triton_elementwise(backend, x, triton_supported(x, cos, sin)):
        y = rotary_reference(x, cos, sin)
        return y if out_dtype is None else y.to(out_dtype)
    if cos.requires_grad or sin.requires_grad or half & (half - 1):
        raise ValueError(
            "rotary: the Triton kernel needs D / 2 a power of two and takes no gradient for cos/sin, got "
            f"D = {x.shape[-1]}, cos/sin requires_grad {cos.requires_grad}/{sin.requires_grad}"
        )
    from l2a.ops.triton._flash import dispatch
    from l2a.ops.triton.rotary import rotary_fwd, rotary_op

    return dispatch(rotary_op, rotary_fwd, x, cos, sin, out_dtype)
