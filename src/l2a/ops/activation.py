"""SwiGLU as an op: a fused Triton kernel on CUDA, the plain PyTorch formula elsewhere.

Legend: (..., 2F) any leading dimensions; the last holds the gate (first F) and up (last F) projections.
"""

from __future__ import annotations

import torch

from l2a.ops import _checks
from l2a.ops.attention import _use_triton_elementwise


def swiglu_reference(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def swiglu(gate_up: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """gate_up (..., 2F) -> silu(gate) * up (..., F), in gate_up's dtype, computed in float32 on Triton.

    backend: "auto" (the fused Triton kernel for CUDA tensors of float16 / bfloat16 / float32 when triton is
    installed, else PyTorch), "triton" or "torch".
    """
    _checks.check_backend(backend)
    if gate_up.shape[-1] % 2:
        raise ValueError(
            f"swiglu: the last dimension holds gate and up, so it must be even, got {gate_up.shape[-1]}"
        )
    if not _use_triton_elementwise(backend, gate_up, gate_up.dtype in _checks.TRITON_DTYPES):
        return swiglu_reference(gate_up)
    from l2a.ops.triton._flash import dispatch
    from l2a.ops.triton.swiglu import swiglu_fwd, swiglu_op

    return dispatch(swiglu_op, swiglu_fwd, gate_up)
