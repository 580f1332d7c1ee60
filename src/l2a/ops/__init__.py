"""Attention ops on tensors: routed (conditional) causal attention and sliding-window attention.

Importing this package does not import Triton; the Triton backend loads on first use.
"""

from l2a.ops.attention import conditional_attention, sliding_window_attention

__all__ = ["conditional_attention", "sliding_window_attention"]
