"""Attention ops on tensors: routed (conditional) causal attention, sliding-window attention and
all-or-here attention (AHA: per token and head, full or window attention); and the fused elementwise ops
of the layers (`rms_norm`, `rotary.apply_rotary`, `swiglu`: Triton kernels on CUDA), and `routed_linear`
(a decode step's projection of routed rows only).

Importing this package does not import Triton; the Triton backend loads on first use.
"""

from l2a.ops.activation import swiglu
from l2a.ops.aha import all_or_here_attention
from l2a.ops.attention import conditional_attention, sliding_window_attention
from l2a.ops.kvcache import attention_with_kvcache
from l2a.ops.linear import routed_linear
from l2a.ops.norm import rms_norm

__all__ = [
    "all_or_here_attention",
    "attention_with_kvcache",
    "conditional_attention",
    "rms_norm",
    "routed_linear",
    "swiglu",
    "sliding_window_attention",
]
