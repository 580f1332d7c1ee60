"""Building blocks shared with the base architectures (Qwen2/Qwen3/Llama): RMSNorm, gated MLP, RoPE."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers.activations import ACT2FN

from l2a.ops.activation import swiglu
from l2a.ops.norm import rms_norm
from l2a.ops.rotary import apply_rotary as rotary

# more tokens than this: projections that read the same input run as one GEMM over concatenated weights
FUSE_MIN_TOKENS = 16


def fuses_projections(x: torch.Tensor) -> bool:
    """Whether projections of x (..., hidden) run as one GEMM (`fused_linear`): prefill and training (x read
    and cast once, one dX GEMM); not decode steps (separate GEMMs read each weight once instead of
    concatenating them every step) and not under torch.compile."""
    return x.shape[:-1].numel() > FUSE_MIN_TOKENS and not torch.compiler.is_compiling()


def fused_linear(x: torch.Tensor, layers: Sequence[nn.Linear]) -> torch.Tensor:
    """x (..., in) -> the outputs of `layers` side by side (..., sum of out_features), one GEMM over their
    concatenated weights (all with a bias or all without)."""
    weight = torch.cat([m.weight for m in layers])
    bias = None if layers[0].bias is None else torch.cat([m.bias for m in layers])
    return nn.functional.linear(x, weight, bias)


class RMSNorm(nn.Module):
    """RMSNorm computed in float32, as in Qwen2/Qwen3/Llama: `weight * x / sqrt(mean(x^2) + eps)`."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, *, feeds_linear: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps
        # the output only enters linear layers: under autocast produce it in the autocast dtype, which is
        # what each of them would cast it to (one float32 pass and one cast per consumer fewer)
        self.feeds_linear = feeds_linear

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # CUDA: one fused kernel each way instead of ~6 float32 passes (`l2a.ops.norm.rms_norm`)
        device_type = hidden_states.device.type
        cast = self.feeds_linear and torch.is_autocast_enabled(device_type)
        out_dtype = torch.get_autocast_dtype(device_type) if cast else None
        return rms_norm(hidden_states, self.weight, self.variance_epsilon, out_dtype=out_dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


class GatedMLP(nn.Module):
    """`down(act(gate(x)) * up(x))`, the MLP of Qwen2/Qwen3/Llama."""

    def __init__(
        self, hidden_size: int, intermediate_size: int, hidden_act: str = "silu", bias: bool = False
    ):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)
        self.act_fn = ACT2FN[hidden_act]
        self.silu = hidden_act in ("silu", "swish")  # SwiGLU: one fused kernel on CUDA (`l2a.ops.swiglu`)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fuses_projections(x):
            gate_up = fused_linear(x, (self.gate_proj, self.up_proj))
            if self.silu:
                return self.down_proj(swiglu(gate_up))
            gate, up = gate_up.chunk(2, dim=-1)
            return self.down_proj(self.act_fn(gate) * up)
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding of queries / keys in the ops layout: x (B, N, H, D), cos/sin (B, N, D); on
    CUDA one fused kernel each way (`l2a.ops.rotary.apply_rotary`). Under autocast the result is in the
    autocast dtype, which the attention ops would cast it to."""
    device_type = x.device.type
    autocast = torch.is_autocast_enabled(device_type)
    return rotary(x, cos, sin, out_dtype=torch.get_autocast_dtype(device_type) if autocast else None)
