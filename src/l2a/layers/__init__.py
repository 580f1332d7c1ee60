"""Modules of the L2A layer: router, local and global attention branches, decoder layer."""

from l2a.layers.attention import AttentionProjections, GlobalAttention, L2ADecoderLayer, LocalAttention
from l2a.layers.common import GatedMLP, RMSNorm, apply_rotary
from l2a.layers.router import Router, RoutingDecision

__all__ = [
    "AttentionProjections",
    "GatedMLP",
    "GlobalAttention",
    "L2ADecoderLayer",
    "LocalAttention",
    "RMSNorm",
    "Router",
    "RoutingDecision",
    "apply_rotary",
]
