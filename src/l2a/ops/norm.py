"""RMSNorm as an op: a fused Triton kernel on CUDA, the plain PyTorch formula elsewhere.

Legend: (..., H) any leading dimensions, H the normalised (last) dimension.
"""

from __future__ import annotations

import torch

from l2a.ops import _checks
from l2a.ops.attention import _use_triton_elementwise


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen2/Qwen3/Llama's RMSNorm: `weight * (x / sqrt(mean(x^2) + eps)).to(x.dtype)`, in float32."""
    input_dtype = x.dtype
    xf = x.to(torch.float32)
    variance = xf.pow(2).mean(-1, keepdim=True)
    return weight * (xf * torch.rsqrt(variance + eps)).to(input_dtype)


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    *,
    out_dtype: torch.dtype | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """x (..., H), weight (H,) -> (..., H) in the promoted dtype of x and weight (as `rms_norm_reference`),
    or cast to `out_dtype` (the kernel writes it directly: one pass instead of two).

    backend: "auto" (the fused Triton kernel for CUDA tensors of float16 / bfloat16 / float32 when triton is
    installed, else PyTorch), "triton" or "torch". The kernel keeps a float32 rstd (M,) for its backward
    instead of the PyTorch formula's intermediates.
    """
    _checks.check_backend(backend)
    if weight.shape != x.shape[-1:]:
        raise ValueError(f"weight must have shape ({x.shape[-1]},), got {tuple(weight.shape)}")
    supported = x.dtype in _checks.TRITON_DTYPES and weight.dtype in _checks.TRITON_DTYPES
    if not _use_triton_elementwise(backend, x, supported):
        y = rms_norm_reference(x, weight, eps)
        return y if out_dtype is None else y.to(out_dtype)
    from l2a.ops.triton._flash import dispatch
    from l2a.ops.triton.rmsnorm import rms_norm_fwd, rms_norm_op

    return dispatch(rms_norm_op, rms_norm_fwd, x, weight, float(eps), out_dtype)[0]


# the fused logits' kernel holds all R rows of the projection in one tile (a router: 1 or Hq rows)
RMS_NORM_LOGITS_MAX_ROWS = 64


def rms_norm_and_logits(
    x: torch.Tensor, weight: torch.Tensor, eps: float, proj: torch.Tensor, *, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., H), weight (H,), proj (R, H) -> (y, logits): y = `rms_norm(x, weight, eps)` and logits float32
    (..., R) = `linear(y, proj).float()` (a router's logits on the normalised rows), both from one pass
    over x (decode steps: one launch instead of the norm's and the linear layer's).

    backend: "auto" (one Triton kernel for CUDA tensors of float16 / bfloat16 / float32, proj in y's dtype
    with at most `RMS_NORM_LOGITS_MAX_ROWS` rows, no gradient; else PyTorch), "triton" or "torch".
    """
    _checks.check_backend(backend)
    if weight.shape != x.shape[-1:] or proj.dim() != 2 or proj.shape[1] != x.shape[-1]:
        raise ValueError(
            f"rms_norm_and_logits: weight must be ({x.shape[-1]},) and proj (R, {x.shape[-1]}), got "
            f"{tuple(weight.shape)} and {tuple(proj.shape)}"
        )
    out_dtype = torch.promote_types(x.dtype, weight.dtype)
    if proj.dtype != out_dtype:
        raise TypeError(
            f"rms_norm_and_logits: proj must be {out_dtype} (the norm's output), got {proj.dtype}"
        )
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x, weight, proj))
    supported = (
        x.dtype in _checks.TRITON_DTYPES
        and weight.dtype in _checks.TRITON_DTYPES
        and proj.shape[0] <= RMS_NORM_LOGITS_MAX_ROWS
        and not needs_grad
    )
    if backend == "triton" and not supported:
        raise ValueError(
            "rms_norm_and_logits: the Triton kernel is forward-only (no gradient), for 16/32-bit floats and "
            f"at most {RMS_NORM_LOGITS_MAX_ROWS} rows of proj"
        )
    if not _use_triton_elementwise(backend, x, supported):
        y = rms_norm_reference(x, weight, eps)
        return y, torch.nn.functional.linear(y, proj).float()
    from l2a.ops.triton._flash import dispatch
    from l2a.ops.triton.rmsnorm import rms_norm_logits_fwd, rms_norm_logits_op

    return dispatch(rms_norm_logits_op, rms_norm_logits_fwd, x, weight, float(eps), proj)
