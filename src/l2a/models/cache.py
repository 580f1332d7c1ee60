"""KV cache for L2A generation: per layer a bounded local cache and, for global layers, a full global cache.

Tensors are kept in the ops layout (B, N, Hkv, D) (HF's own caches use (B, Hkv, N, D)).
The local cache keeps the last `window - 1` tokens after each forward (all a next query can see);
the global cache keeps every token, because a routed query attends to the whole prefix.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


class L2ALayerCache:
    """Cache of one layer. `seen_tokens` counts every token the layer has processed."""

    is_compileable = False
    is_croppable = False
    is_sliding = False
    supports_early_init = False

    def __init__(self, window: int, has_global: bool):
        self.window = window
        self.has_global = has_global
        self.seen_tokens = 0
        self.local_keys: torch.Tensor | None = None
        self.local_values: torch.Tensor | None = None
        self.global_keys: torch.Tensor | None = None
        self.global_values: torch.Tensor | None = None

    def __repr__(self) -> str:
        return (
            f"L2ALayerCache(window={self.window}, has_global={self.has_global}, "
            f"seen_tokens={self.seen_tokens})"
        )

    def update_local(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Append k, v (B, N, Hkv, D); return the keys/values to attend over (cached + new) and the
        absolute position of their first token. Afterwards only the last `window - 1` tokens are kept."""
        cached = 0 if self.local_keys is None else self.local_keys.shape[1]
        first_position = self.seen_tokens - cached
        if self.local_keys is not None:
            k = torch.cat([self.local_keys, k], dim=1)
            v = torch.cat([self.local_values, v], dim=1)
        self.seen_tokens = first_position + k.shape[1]
        keep = min(self.window - 1, k.shape[1])
        # clone: a slice would keep the whole concatenated buffer alive
        self.local_keys = k[:, k.shape[1] - keep :].clone()
        self.local_values = v[:, v.shape[1] - keep :].clone()
        return k, v, first_position

    def update_global(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append k, v (B, N, Hkv, D) to the global cache; return all cached keys/values (from position 0)."""
        if not self.has_global:
            raise RuntimeError("update_global called on the cache of a local-only layer")
        if self.global_keys is not None:
            k = torch.cat([self.global_keys, k], dim=1)
            v = torch.cat([self.global_values, v], dim=1)
        self.global_keys, self.global_values = k, v
        return k, v

    def get_seq_length(self) -> int:
        return self.seen_tokens

    def get_max_length(self) -> int:
        return -1

    def nbytes(self) -> dict[str, int]:
        """Bytes held: {"local": ..., "global": ...}."""
        return {
            "local": _nbytes(self.local_keys) + _nbytes(self.local_values),
            "global": _nbytes(self.global_keys) + _nbytes(self.global_values),
        }

    def _tensors(self) -> list[str]:
        return ["local_keys", "local_values", "global_keys", "global_values"]

    def _apply(self, fn) -> None:
        for name in self._tensors():
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, fn(t))

    def reset(self) -> None:
        self.seen_tokens = 0
        for name in self._tensors():
            setattr(self, name, None)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._apply(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._apply(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._apply(lambda t: t[indices])

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove != 0:
            raise ValueError(
                "L2ACache cannot be cropped: the local cache has already dropped tokens outside the window"
            )


class L2ACache(Cache):
    """Cache of an L2A model for `generate()`: one `L2ALayerCache` per layer.

    Local caches are bounded by the window; global caches (only for `config.global_layers`) hold every token.
    `nbytes()` reports the memory held, `layer_nbytes()` its split per layer into local and global.
    """

    def __init__(self, config):
        layers = [
            L2ALayerCache(config.sliding_window, i in config.global_layers)
            for i in range(config.num_hidden_layers)
        ]
        super().__init__(layers=layers)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        raise NotImplementedError(
            "L2ACache holds a local and a global KV stream per layer; L2A layers call "
            "cache.layers[i].update_local / update_global instead of Cache.update"
        )

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Number of tokens processed so far (not the number of cached local entries)."""
        if layer_idx >= len(self.layers):
            return 0
        return self.layers[layer_idx].get_seq_length()

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        return self.get_seq_length(layer_idx) + query_length, 0

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    def layer_nbytes(self) -> list[dict[str, int]]:
        """Per layer {"local": bytes, "global": bytes}."""
        return [layer.nbytes() for layer in self.layers]

    def nbytes(self) -> int:
        """Total bytes held by all cached keys and values."""
        return sum(b["local"] + b["global"] for b in self.layer_nbytes())
