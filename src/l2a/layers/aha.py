"""AHA (All-or-Here Attention): one attention per layer; per token and query head a router picks full causal
attention or sliding-window attention (docs/aha.md).

Legend: B batch, N new tokens, Nk keys (cached + new), Hq query heads, Hkv key/value heads, D head dim.
Attention runs only through `l2a.ops` (`all_or_here_attention`, `sliding_window_attention`).

The gate (straight-through on the hard per-head choice, as the paper's STE):

    out_h = where(hard_h, full_h, local_h) + (g_h - stopgrad(g_h)) * stopgrad(full_h - local_h)

with g = `RoutingDecision.gate` (`hard + soft - stopgrad(soft)` in training). The second term is exactly 0
in the forward, so the output is bit-for-bit the hard choice; its gradient gives the router
`d loss / d soft_h = <d loss / d out_h, full_h - local_h>`, the derivative of the interpolation
`local + g * (full - local)` at the hard point. q, k and v get the gradient of the branch actually taken.
`full - local` is known only where both were computed: for routed pairs (the op gives `full`; a window
pass without autograd gives `local`) and, on leakage steps, for every pair (dense full attention
computed for all heads), which is how heads that went local can come back.

`layer_cache` arguments are `l2a.models.aha_cache.AHALayerCache` objects (or anything with
`update(k, v) -> (k_all, v_all, first_position)`).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.modeling_layers import GradientCheckpointingLayer

import l2a.ops as ops
from l2a.layers.attention import AttentionProjections
from l2a.layers.common import GatedMLP, RMSNorm
from l2a.layers.router import Router, RoutingDecision


class HeadRouter(Router):
    """`Router` with one output per routed query head, scattered to all `num_heads` heads.

    Heads outside `heads` (pruned) are never routed: hard False, soft and gate 0. Decisions are (B, N, Hq).
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        heads: list[int],
        *,
        temperature: float = 0.1,
        threshold: float = 0.5,
        offset: float = 0.0,
    ):
        super().__init__(hidden_size, len(heads), temperature=temperature, threshold=threshold, offset=offset)
        self.num_heads = num_heads
        self.heads = list(heads)
        self.all_heads = self.heads == list(range(num_heads))
        # not a buffer: HF's loading leaves non-persistent buffers of meta-initialised modules unset
        self._head_index: dict[torch.device, torch.Tensor] = {}

    def forward(self, hidden_states: torch.Tensor, force: str | None = None) -> RoutingDecision:
        decision = super().forward(hidden_states, force)
        if decision.soft.dim() == 2:  # one routed head: Router squeezes its single output
            decision = RoutingDecision(
                *(t.unsqueeze(-1) for t in (decision.soft, decision.hard, decision.gate))
            )
        if self.all_heads:
            return decision

        index = self._head_index.get(hidden_states.device)
        if index is None:
            index = self._head_index[hidden_states.device] = torch.tensor(
                self.heads, dtype=torch.long, device=hidden_states.device
            )

        def scatter(t: torch.Tensor) -> torch.Tensor:
            return t.new_zeros((*t.shape[:-1], self.num_heads)).index_copy(-1, index, t)

        return RoutingDecision(scatter(decision.soft), scatter(decision.hard), scatter(decision.gate))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", heads={self.heads if not self.all_heads else 'all'}"


class AHAAttention(AttentionProjections):
    """The base attention with per-(token, head) choice between full causal and window attention.

    Parameter names are the base model's (`q_proj`, ..., `q_norm`, `k_norm`): conversion copies them.
    """

    def forward(
        self,
        h: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        decision: RoutingDecision | None,
        *,
        cu_seqlens: torch.Tensor | None = None,
        key_start: torch.Tensor | None = None,
        layer_cache: Any | None = None,
        leakage: bool = False,
    ) -> torch.Tensor:
        """h (B, N, hidden); decision (B, N, Hq) or None (a window-only layer) -> (B, N, hidden).

        key_start: int (B,) absolute position of each row's first valid token (left padding).
        leakage: full attention computed for every head (the forward value is still the hard choice),
            so the straight-through term reaches heads that are local.
        """
        cos, sin = position_embeddings
        q = self.project_q(h, cos, sin)
        k, v = self.project_kv(h, cos, sin)
        window = self.config.sliding_window
        if layer_cache is not None:
            k, v, first_position = layer_cache.update(k, v)
            if key_start is not None:
                key_start = (key_start - first_position).clamp_min(0)
        common = {"cu_seqlens": cu_seqlens, "key_start": key_start, "backend": self.config.attention_backend}
        if decision is None or self.config.force_route == "none" and not leakage:
            out = self._window(q, k, v, window, common, cached=layer_cache is not None)
        elif layer_cache is not None and not bool(decision.hard.any()):
            # inference with a cache: no head of these tokens routes, so the far keys are not read at all
            # (a host sync, paid only with a cache)
            out = self._window(q, k, v, window, common, cached=True)
        else:
            out = self._routed(q, k, v, window, decision, leakage, common)
        return self.o_proj(out.flatten(-2))

    @staticmethod
    def _window(q, k, v, window: int, common: dict[str, Any], *, cached: bool) -> torch.Tensor:
        if cached and k.shape[1] > q.shape[1] + window - 1:
            # the keys a window can reach: queries are aligned to the last key
            drop = k.shape[1] - (q.shape[1] + window - 1)
            k, v = k[:, drop:], v[:, drop:]
            if common["key_start"] is not None:
                common = common | {"key_start": (common["key_start"] - drop).clamp_min(0)}
        return ops.sliding_window_attention(q, k, v, window, **common)

    @staticmethod
    def _routed(q, k, v, window: int, decision: RoutingDecision, leakage: bool, common) -> torch.Tensor:
        hard = decision.hard
        straight_through = decision.gate.requires_grad
        if leakage:
            full = ops.all_or_here_attention(q, k, v, torch.ones_like(hard), window, **common)
            local = ops.sliding_window_attention(q, k, v, window, **common)
            out = torch.where(hard.unsqueeze(-1), full, local)
            difference = (full - local).detach()
        else:
            out = ops.all_or_here_attention(q, k, v, hard, window, **common)
            if not straight_through:
                return out
            with torch.no_grad():
                local = ops.sliding_window_attention(q, k, v, window, **common)
                # known only where full attention ran
                difference = torch.where(hard.unsqueeze(-1), out - local, torch.zeros_like(out))
        if straight_through:
            gate = decision.gate.to(out.dtype)
            out = out + ((gate - gate.detach()).unsqueeze(-1) * difference)
        return out


class AHADecoderLayer(GradientCheckpointingLayer):
    """One AHA block:

        h   = input_layernorm(x);  d = router(h)           (per token and query head; routed layers only)
        s   = x + AHAAttention(h, d)                       (full attention where d, window elsewhere)
        out = s + MLP(post_attention_layernorm(s))

    Layers outside `config.global_layers` have no router: pure window attention (after pruning).
    """

    def __init__(self, config: Any, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.config = config
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = AHAAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = GatedMLP(
            config.hidden_size, config.intermediate_size, config.hidden_act, bias=config.mlp_bias
        )
        self.has_global = layer_idx in config.global_layers
        if self.has_global:
            self.router = HeadRouter(
                config.hidden_size,
                config.num_attention_heads,
                config.routed_heads[layer_idx],
                temperature=config.router_temperature,
                threshold=config.router_threshold,
                offset=config.router_logit_offset,
            )

    def drop_global_branch(self) -> None:
        """Turn this layer into a window-only layer (pruning): removes the router."""
        if self.has_global:
            del self.router
            self.has_global = False

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        cu_seqlens: torch.Tensor | None = None,
        key_start: torch.Tensor | None = None,
        layer_cache: Any | None = None,
        global_leakage: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """hidden_states (B, N, hidden) -> (hidden_states, soft, hard).

        soft (float32) and hard (bool) are the router's decisions, (B, N, Hq) (None for window-only
        layers); a flat tuple, as `L2ADecoderLayer`'s, so gradient checkpointing carries `soft`'s gradient.

        global_leakage: full attention for every head this step (forward value unchanged), so the router
            gets a gradient for heads it sent to window attention.
        """
        residual = hidden_states
        h = self.input_layernorm(hidden_states)
        decision = self.router(h, self.config.force_route) if self.has_global else None
        hidden_states = residual + self.self_attn(
            h,
            position_embeddings,
            decision,
            cu_seqlens=cu_seqlens,
            key_start=key_start,
            layer_cache=layer_cache,
            leakage=global_leakage and decision is not None,
        )
        residual = hidden_states
        hidden_states = residual + self.mlp(self.post_attention_layernorm(hidden_states))
        if decision is None:
            return hidden_states, None, None
        return hidden_states, decision.soft, decision.hard
