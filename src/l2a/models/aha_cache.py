"""KV cache for AHA generation: one K/V stream per layer.

A layer with a router keeps every token (any of its heads may route to full attention at any step; the
window is read from the end of the same stream). A window-only layer (pruned) keeps the last `window - 1`
tokens: its cache is bounded. Tensors are in the ops layout (B, N, Hkv, D).
"""

from __future__ import annotations

import torch

from l2a.models.cache import L2ACache, L2ALayerCache


class AHALayerCache(L2ALayerCache):
    """Cache of one AHA layer: the full stream (`has_global`, reported as "global" bytes) or a bounded
    window stream (reported as "local" bytes)."""

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Append k, v (B, N, Hkv, D); return the cached + new keys/values and the absolute position of
        their first token."""
        if not self.has_global:
            return self.update_local(k, v)
        k, v = self.update_global(k, v)
        self.seen_tokens = k.shape[1]
        return k, v, 0


class AHACache(L2ACache):
    """Cache of an AHA model for `generate()`: one `AHALayerCache` per layer (bounded for layers outside
    `config.global_layers`)."""

    def __init__(self, config):
        super().__init__(config)  # L2ACache's own bookkeeping, then AHA's layers in place of its
        routes = config.force_route != "none"  # as L2ACache: no full stream when no head can route
        self.layers = [
            AHALayerCache(config.sliding_window, routes and i in config.global_layers)
            for i in range(config.num_hidden_layers)
        ]

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        raise NotImplementedError(
            "AHA layers call cache.layers[i].update(k, v) (ops layout B, N, Hkv, D) instead of Cache.update"
        )


def new_cache(config) -> L2ACache:
    """An empty cache for the model described by `config` (`AHACache` for method "aha")."""
    return AHACache(config) if config.method == "aha" else L2ACache(config)
