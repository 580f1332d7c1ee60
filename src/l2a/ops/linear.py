"""Linear layer on routed rows only, for decode steps: the global branch's q and o projections.

Legend: (...) any leading dimensions (M rows in all), K input features, N output features.
"""

from __future__ import annotations

import torch

from l2a.ops import _checks
from l2a.ops.attention import _use_triton_elementwise

# the kernel holds every row in one tile (decode steps: batch x new tokens)
ROUTED_LINEAR_MAX_ROWS = 64


def routed_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    active: torch.Tensor,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """`residual + where(active, linear(x, weight, bias), 0)`: x (..., K), active bool (...) -> (..., N)."""
    y = torch.where(active[..., None], torch.nn.functional.linear(x, weight, bias), 0.0)
    return y if residual is None else residual + y


def routed_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    active: torch.Tensor,
    *,
    residual: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """x (..., K), weight (N, K), bias (N,) or None, active bool (...) -> (..., N) in x's dtype:
    `x @ weight.T + bias` on the rows where `active`, 0 on the others; plus `residual` (..., N) when given
    (the kernel adds it in float32 before rounding).

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
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias, residual)
    )
    rows = x.shape[:-1].numel()
    supported = x.dtype in _checks.TRITON_DTYPES and not needs_grad and rows <= ROUTED_LINEAR_MAX_ROWS
    if backend == "triton" and not supported:
        raise ValueError(
            "routed_linear: the Triton kernel is forward-only (no gradient), for float16 / bfloat16 / "
            f"float32 and at most {ROUTED_LINEAR_MAX_ROWS} rows; got {x.dtype}, {rows} rows, "
            f"gradient {needs_grad}"
        )
    if not _use_triton_elementwise(backend, x, supported):
        return routed_linear_reference(x, weight, bias, active, residual)
    from l2a.ops.triton._flash import dispatch
    from l2a.ops.triton.routed_linear import routed_linear_fwd, routed_linear_op

    flat_residual = None if residual is None else residual.reshape(rows, -1)
    args = (x.reshape(rows, -1), weight, bias, active.reshape(rows), flat_residual)
    return dispatch(routed_linear_op, routed_linear_fwd, *args).view(*x.shape[:-1], weight.shape[0])
