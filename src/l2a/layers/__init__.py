"""Modules of the L2A and AHA layers: routers, local and global attention branches, decoder layers."""

from l2a import _register_if_deferred
from l2a.layers.aha import AHAAttention, AHADecoderLayer, HeadRouter
from l2a.layers.attention import AttentionProjections, GlobalAttention, L2ADecoderLayer, LocalAttention
from l2a.layers.common import GatedMLP, RMSNorm, apply_rotary
from l2a.layers.router import Router, RoutingDecision

_register_if_deferred()  # when this package was what first imported transformers (see l2a._register_models)

__all__ = [
    "AHAAttention",
    "AHADecoderLayer",
    "AttentionProjections",
    "GatedMLP",
    "GlobalAttention",
    "HeadRouter",
    "L2ADecoderLayer",
    "LocalAttention",
    "RMSNorm",
    "Router",
    "RoutingDecision",
    "apply_rotary",
]
