"""Linear layer on routed rows only, for decode steps: the global branch's q and o projections.

Legend: (...) any leading dimensions (M rows in all), K input features, N output features.
"""

from __future__ import annotations

import torch

from l2a.ops import _checks
from l2a.ops.attention import _use_triton_elementwise
from l2a.ops.rotary import rotary_reference, triton_supported

# the kernel holds every row in one tile (decode steps: batch x new tokens)
ROUTED_LINEAR_MAX_ROWS = 64


def routed_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    active: torch.Tensor,
    residual: torch.Tensor | None = None,
    rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """`residual + where(active, linear(x, weight, bias), 0)`: x (..., K), active bool (...) -> (..., N);
    with rotary = (cos, sin), each (B or 1, T, D), x is (B, T, K) and linear's heads of D columns are
    rotated (`l2a.ops.rotary.rotary_reference`)."""
    y = torch.nn.functional.linear(x, weight, bias)
    if rotary is not None:
        cos, sin = rotary
        y = rotary_reference(y.unflatten(-1, (-1, cos.shape[-1])), cos, sin).flatten(-2)
    y = torch.where(active[..., None], y, 0.0)
    return y if residual is None else residual + y


def routed_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    active: torch.Tensor,
    *,
    residual: torch.Tensor | None = None,
    rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """x (..., K), weight (N, K), bias (N,) or None, active bool (...) -> (..., N) in x's dtype:
    `x @ weight.T + bias` on the rows where `active`, 0 on the others; plus `residual` (..., N) when given
    (the kernel adds it in float32 before rounding). rotary = (cos, sin), each (B or 1, T, D) for x
    (B, T, K): the output's heads of D columns rotated as `l2a.ops.apply_rotary` (the decode steps' queries;
    the kernel rotates in float32 before rounding). N must then be a multiple of D.

    backend: "auto" (the Triton kernel for CUDA tensors of float16 / bfloat16 / float32 with at most
    `ROUTED_LINEAR_MAX_ROWS` rows when no gradient is needed and triton is installed, else PyTorch),
    "triton" or "torch". The kernel reads the weight only when some row is routed.
    """
    _checks.check_backend(backend)
    if weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"routed_linear: x (..., K) and weight (N, K) must agree on K, got {tuple(x.shape)}, "
            f"{tuple(weight.shape)}"
        )
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"routed_linear: bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    if active.dtype != torch.bool or active.shape != x.shape[:-1]:
        raise ValueError(
            f"routed_linear: active must be bool of shape {tuple(x.shape[:-1])}, got {active.dtype} "
            f"{tuple(active.shape)}"
        )
    if x.dtype != weight.dtype or (bias is not None and bias.dtype != weight.dtype):
        raise TypeError(f"routed_linear: x, weight and bias need one dtype, got {x.dtype} and {weight.dtype}")
    if residual is not None and (
        residual.shape != (*x.shape[:-1], weight.shape[0]) or residual.dtype != x.dtype
    ):
        raise ValueError(
            f"routed_linear: residual must be {x.dtype} of shape {(*x.shape[:-1], weight.shape[0])}, got "
            f"{residual.dtype} {tuple(residual.shape)}"
        )
    cos, sin = rotary if rotary is not None else (None, None)
    if rotary is not None:
        d = cos.shape[-1] if cos.dim() == 3 else 0
        if (
            x.dim() != 3
            or cos.dim() != 3
            or sin.shape != cos.shape
            or cos.shape[0] not in (1, x.shape[0])
            or cos.shape[1] != x.shape[1]
            or d % 2
            or weight.shape[0] % max(d, 1)
        ):
            raise ValueError(
                "routed_linear: rotary needs x (B, T, K), cos and sin (B or 1, T, D) with D even and N a "
                f"multiple of D; got x {tuple(x.shape)}, cos {tuple(cos.shape)}, sin {tuple(sin.shape)}, "
                f"N {weight.shape[0]}"
            )
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias, residual, cos, sin)
    )
    rows = x.shape[:-1].numel()
    supported = x.dtype in _checks.TRITON_DTYPES and not needs_grad and rows <= ROUTED_LINEAR_MAX_ROWS
    if rotary is not None:
        supported = supported and rotary_tiles_supported(x, cos, sin)
    if backend == "triton" and not supported:
        raise ValueError(
            "routed_linear: the Triton kernel is forward-only (no gradient), for float16 / bfloat16 / "
            f"float32, at most {ROUTED_LINEAR_MAX_ROWS} rows and a rotary head dim D with D / 2 a power of "
            f"two, D >= 16; got {x.dtype}, {rows} rows, gradient {needs_grad}"
        )
    if not _use_triton_elementwise(backend, x, supported):
        return routed_linear_reference(x, weight, bias, active, residual, rotary)
    from l2a.ops.triton._flash import dispatch
    from l2a.ops.triton.routed_linear import routed_linear_fwd, routed_linear_op

    flat_residual = None if residual is None else residual.reshape(rows, -1)
    args = (x.reshape(rows, -1), weight, bias, active.reshape(rows), flat_residual, cos, sin, x.shape[-2])
    return dispatch(routed_linear_op, routed_linear_fwd, *args).view(*x.shape[:-1], weight.shape[0])


def rotary_tiles_supported(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """Whether the projection kernels' RoPE epilogue takes this head dim (D / 2 a power of two, D >= 16:
    a program's 16 columns pair within one head) and these tables (`l2a.ops.rotary.triton_supported`)."""
    return cos.shape[-1] >= 16 and triton_supported(x, cos, sin)
