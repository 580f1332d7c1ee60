"""Fused SwiGLU (forward and backward): `silu(gate) * up` over the two halves of one projection output.

Legend: M rows (all leading dimensions), F the MLP width; gate_up (M, 2F) holds gate then up. The backward
writes the gradient of gate_up directly (no concatenation of two halves).
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from l2a.ops.triton._flash import interpreting

_BLOCK = 1024


@triton.jit
def _swiglu_kernel(GU, DY, Y, DGU, stride_gu, stride_y, width, BLOCK: tl.constexpr, BACKWARD: tl.constexpr):
    """Forward: Y = silu(g) * u. BACKWARD: DGU = (dy u s (1 + g (1 - s)), dy silu(g)), s = sigmoid(g)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < width
    g = tl.load(GU + row * stride_gu + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(GU + row * stride_gu + width + cols, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    if BACKWARD:
        dy = tl.load(DY + row * stride_y + cols, mask=mask, other=0.0).to(tl.float32)
        dg = dy * u * s * (1.0 + g * (1.0 - s))
        tl.store(DGU + row * stride_gu + cols, dg.to(DGU.dtype.element_ty), mask=mask)
        tl.store(DGU + row * stride_gu + width + cols, (dy * g * s).to(DGU.dtype.element_ty), mask=mask)
    else:
        tl.store(Y + row * stride_y + cols, (g * s * u).to(Y.dtype.element_ty), mask=mask)


def _rows2d(t: torch.Tensor) -> torch.Tensor:
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def _grid(m: int, width: int) -> tuple[int, int]:
    return m, triton.cdiv(width, _BLOCK)


def swiglu_fwd(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up (..., 2F) -> silu(gate) * up (..., F) in gate_up's dtype."""
    gu = _rows2d(gate_up)
    m, width = gu.shape[0], gu.shape[1] // 2
    y = torch.empty(m, width, dtype=gate_up.dtype, device=gate_up.device)
    if y.numel():
        _swiglu_kernel[_grid(m, width)](
            gu, gu, y, gu, gu.stride(0), y.stride(0), width, BLOCK=_BLOCK, BACKWARD=False,
            num_warps=1 if interpreting() else 4,
        )  # fmt: skip
    return y.view(*gate_up.shape[:-1], width)


@torch.library.custom_op("l2a::swiglu", mutates_args=())
def swiglu_op(gate_up: torch.Tensor) -> torch.Tensor:
    return swiglu_fwd(gate_up)


@swiglu_op.register_fake
def _(gate_up):
    return gate_up.new_empty(*gate_up.shape[:-1], gate_up.shape[-1] // 2)


@torch.library.custom_op("l2a::swiglu_backward", mutates_args=())
def swiglu_backward_op(dy: torch.Tensor, gate_up: torch.Tensor) -> torch.Tensor:
    gu, dy2 = _rows2d(gate_up), _rows2d(dy)
    m, width = gu.shape[0], gu.shape[1] // 2
    dgu = torch.empty_like(gu)
    if dy2.stride(0) != width:
        dy2 = dy2.contiguous()
    if dgu.numel():
        _swiglu_kernel[_grid(m, width)](
            gu, dy2, dy2, dgu, gu.stride(0), dy2.stride(0), width, BLOCK=_BLOCK, BACKWARD=True,
            num_warps=1 if interpreting() else 4,
        )  # fmt: skip
    return dgu.view(gate_up.shape)


@swiglu_backward_op.register_fake
def _(dy, gate_up):
    return torch.empty_like(gate_up)


def _setup(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
    ctx.save_for_backward(inputs[0])


def _backward(ctx: Any, dy: torch.Tensor) -> torch.Tensor:
    (gate_up,) = ctx.saved_tensors
    return swiglu_backward_op(dy, gate_up)


swiglu_op.register_autograd(_backward, setup_context=_setup)
