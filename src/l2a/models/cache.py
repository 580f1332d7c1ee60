"""KV cache for L2A generation: per layer a bounded local cache and, for layers that route, a global cache.

Tensors are kept in the ops layout (B, N, Hkv, D) (HF's own caches use (B, Hkv, N, D)), in preallocated
buffers written in place: a decode step copies its new keys/values into free slots and attends over views,
with no `torch.cat` and no host synchronisation (all bookkeeping is Python integers).

- Local: the last `window - 1` tokens (all a next query can see). The buffer has `LOCAL_SLACK` spare slots;
  when they are used up, the last `window - 1` tokens are moved to the front (one copy every `LOCAL_SLACK`
  steps). After a prefill it holds exactly min(window - 1, seen) tokens.
- Global: every token, because a routed query attends to the whole prefix. Sized exactly by the prefill,
  then grown `GLOBAL_CHUNK` tokens at a time, or sized once up front with `max_length` (static).
- Layers that cannot route (pruned layers, every layer under `force_route="none"`) keep no global K/V.

Static (`max_length` given): the global buffer holds `max_length` tokens and the local one is a ring of
`window - 1 + STATIC_STEP_TOKENS` slots (position j in slot j % slots); after the first forward (the prompt)
every forward of at most `STATIC_STEP_TOKENS` tokens is a *static step*: keys are written at the fill level
kept on the device, attention reads it there (`l2a.ops.attention_with_kvcache`), and no Python number
changes, so the step can be captured (`torch.compile(mode="reduce-overhead")`, CUDA graphs).

`nbytes()` counts the bytes allocated (spare slots included), not only the filled ones.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache

from l2a.ops.kvcache import project_kv_cache, write_kv_cache

# Spare local slots and global growth step, in tokens.
LOCAL_SLACK = 256
GLOBAL_CHUNK = 4096
# Most new tokens of a static (capturable) step.
STATIC_STEP_TOKENS = 16


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


class _KVBuffer:
    """Keys and values (B, capacity, Hkv, D) of which slots [start, end) hold tokens in position order."""

    def __init__(self) -> None:
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.start = 0
        self.end = 0

    @property
    def capacity(self) -> int:
        return 0 if self.keys is None else self.keys.shape[1]

    def allocate(self, like: torch.Tensor, capacity: int) -> None:
        """Fresh buffers of `capacity` tokens shaped like `like` (B, *, Hkv, D), keeping the filled slots."""
        b, _, hkv, d = like.shape
        keys = like.new_empty(b, capacity, hkv, d)
        values = like.new_empty(b, capacity, hkv, d)
        filled = self.end - self.start
        if filled:
            keys[:, :filled] = self.keys[:, self.start : self.end]
            values[:, :filled] = self.values[:, self.start : self.end]
        self.keys, self.values, self.start, self.end = keys, values, 0, filled

    def write(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Copy k, v (B, N, Hkv, D) into the slots after `end` (the caller made room)."""
        n = k.shape[1]
        self.keys[:, self.end : self.end + n] = k
        self.values[:, self.end : self.end + n] = v
        self.end += n

    def view(self, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys[:, start : self.end], self.values[:, start : self.end]

    def matches(self, k: torch.Tensor) -> bool:
        """Whether new keys k (B, N, Hkv, D) fit this buffer's batch, heads, dtype and device."""
        t = self.keys
        return (
            t is not None
            and (t.shape[0], *t.shape[2:]) == (k.shape[0], *k.shape[2:])
            and (t.dtype == k.dtype and t.device == k.device)
        )

    def nbytes(self) -> int:
        return _nbytes(self.keys) + _nbytes(self.values)

    def apply(self, fn, in_place: bool = False) -> None:
        """keys, values = fn(keys), fn(values); in place where the shape is kept (static buffers keep their
        address for captured steps)."""
        if self.keys is None:
            return
        keys, values = fn(self.keys), fn(self.values)
        if in_place and keys.shape == self.keys.shape:
            self.keys.copy_(keys)
            self.values.copy_(values)
        else:
            self.keys, self.values = keys, values
            if in_place:  # a static buffer of a new batch size: new addresses, to be kept from now on
                _mark_static(self.keys, self.values)

    def reset(self) -> None:
        self.keys = self.values = None
        self.start = self.end = 0


def _mark_static(*tensors: torch.Tensor) -> None:
    """Tell torch.compile that these buffers keep their address (CUDA graphs then write them in place)."""
    if not torch.compiler.is_compiling():
        for t in tensors:
            torch._dynamo.mark_static_address(t)


class StaticState:
    """Fill level of a static cache, shared by its layers. `position`: int32 (1,) tokens written, on the
    device. `L2ACache.step_positions` computes, once per static step, what every layer's writes and
    attention need: `index` int64 (N,) positions of the new tokens, `ring` their ring slots, `filled` the
    new fill level int32 (1,)."""

    def __init__(self, max_length: int):
        self.max_length = max_length
        self.position: torch.Tensor | None = None
        self.host_filled = 0
        self.index = self.ring = self.filled = None

    def advance(self, n: int, ring_slots: int) -> torch.Tensor:
        """Start a static step of n tokens; returns `index`."""
        # eager steps keep a host copy of the fill level to refuse an overflow with a clear message;
        # captured steps cannot (the check would synchronise): there an overflow is a device index error
        if not torch.compiler.is_compiling():
            self.host_filled += n
            if self.host_filled > self.max_length:
                needed = self.host_filled
                raise ValueError(
                    f"the static L2ACache holds max_length={self.max_length} tokens, {needed} needed"
                )
        self.index = self.position.long() + torch.arange(n, device=self.position.device)
        self.ring = torch.remainder(self.index, ring_slots)
        self.filled = self.position + n
        self.position.add_(n)
        return self.index


class L2ALayerCache:
    """Cache of one layer. `seen_tokens` counts every token the layer has processed.

    has_global: whether the layer keeps global K/V. max_length: static capacity of the global cache in
    tokens (None: sized by the prefill and grown in `GLOBAL_CHUNK` steps). static_state: the fill level
    shared with the other layers of a static `L2ACache` (a layer cache on its own makes its own).
    """

    is_compileable = False
    is_croppable = False
    is_sliding = False
    supports_early_init = False

    def __init__(
        self,
        window: int,
        has_global: bool,
        max_length: int | None = None,
        static_state: StaticState | None = None,
    ):
        self.window = window
        self.has_global = has_global
        self.max_length = max_length
        self.seen_tokens = 0
        self.local = _KVBuffer()
        self.global_ = _KVBuffer()
        if max_length is not None and static_state is None:
            static_state = StaticState(max_length)
        self.static = static_state
        self.prompt_done = False  # static mode: the first forward (the prompt) has run through this layer

    def __repr__(self) -> str:
        return (
            f"L2ALayerCache(window={self.window}, has_global={self.has_global}, "
            f"seen_tokens={self.seen_tokens})"
        )

    def update_local(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Append k, v (B, N, Hkv, D); return the keys/values to attend over (cached + new) and the
        absolute position of their first token. Afterwards only the last `window - 1` tokens are kept."""
        if self.max_length is not None:
            return self._static_prefill_local(k, v)
        keep = self.window - 1
        buf, n = self.local, k.shape[1]
        cached = buf.end - buf.start
        first_position = self.seen_tokens - cached
        self.seen_tokens += n
        if buf.keys is not None and not buf.matches(k):
            raise ValueError("the new keys do not match the cache (batch, heads, dtype or device changed)")
        if n > LOCAL_SLACK or buf.keys is None:
            # prefill: attend over cached + new, then keep exactly the last `keep` tokens
            k_all = k if not cached else torch.cat([buf.keys[:, buf.start : buf.end], k], dim=1)
            v_all = v if not cached else torch.cat([buf.values[:, buf.start : buf.end], v], dim=1)
            tail = min(keep, k_all.shape[1])
            buf.reset()
            buf.allocate(k_all, tail)
            buf.write(k_all[:, k_all.shape[1] - tail :], v_all[:, v_all.shape[1] - tail :])
            return k_all, v_all, first_position
        if buf.end + n > buf.capacity:
            if cached + n > buf.capacity or buf.capacity < keep + LOCAL_SLACK:
                buf.allocate(k, keep + LOCAL_SLACK)
            else:  # slide the kept tokens to the front (a copy: the ranges may overlap)
                kept_k = buf.keys[:, buf.start : buf.end].clone()
                kept_v = buf.values[:, buf.start : buf.end].clone()
                buf.keys[:, :cached], buf.values[:, :cached] = kept_k, kept_v
                buf.start, buf.end = 0, cached
        start = buf.start
        buf.write(k, v)
        buf.start = max(buf.start, buf.end - keep)
        k_all, v_all = buf.view(start)
        return k_all, v_all, first_position

    def update_global(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append k, v (B, N, Hkv, D) to the global cache; return all cached keys/values (from position 0)."""
        if not self.has_global:
            raise RuntimeError("update_global called on the cache of a layer that keeps no global K/V")
        buf, n = self.global_, k.shape[1]
        if buf.keys is not None and not buf.matches(k):
            raise ValueError("the new keys do not match the cache (batch, heads, dtype or device changed)")
        needed = buf.end + n
        if needed > buf.capacity:
            if self.max_length is not None:
                if needed > self.max_length:
                    raise ValueError(
                        f"the static L2ACache holds max_length={self.max_length} tokens, {needed} needed"
                    )
                buf.allocate(k, self.max_length)
                _mark_static(buf.keys, buf.values)
                self.prompt_done = True
            else:
                # the first forward (prefill) allocates exactly; decode grows in large steps
                buf.allocate(k, needed if buf.keys is None else needed + GLOBAL_CHUNK)
        buf.write(k, v)
        return buf.view(0)

    # static mode ---------------------------------------------------------------------------------------

    @property
    def ring_slots(self) -> int:
        return self.window - 1 + STATIC_STEP_TOKENS

    def static_step(self, n: int) -> bool:
        """Whether a forward of n tokens is a static step (see the module docstring)."""
        return self.prompt_done and n <= STATIC_STEP_TOKENS

    def _static_prefill_local(
        self, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        if self.prompt_done or self.local.keys is not None:
            raise ValueError(
                f"a static L2ACache takes the prompt in its first forward, then at most {STATIC_STEP_TOKENS} "
                f"tokens per forward; got {k.shape[1]}"
            )
        n, slots = k.shape[1], self.ring_slots
        if n > self.max_length:
            raise ValueError(f"the static L2ACache holds max_length={self.max_length} tokens, {n} needed")
        self.local.allocate(k, slots)
        tail = torch.arange(max(0, n - slots), n, device=k.device)
        self.local.keys.index_copy_(1, tail % slots, k[:, tail])
        self.local.values.index_copy_(1, tail % slots, v[:, tail])
        _mark_static(self.local.keys, self.local.values)
        if self.static.position is None:
            self.static.position = torch.full((1,), n, dtype=torch.int32, device=k.device)
            self.static.host_filled = n
            _mark_static(self.static.position)
        # the prompt is done once the layer's last update ran (the global one, where there is one)
        self.prompt_done = not self.has_global
        self.seen_tokens = n
        return k, v, 0

    def step_local(
        self, k: torch.Tensor, v: torch.Tensor, rotary: tuple | None = None, backend: str = "auto"
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Static step: write k, v (B, N, Hkv, D) into the ring, k rotated first by `rotary` = (cos, sin)
        when given (one kernel on CUDA: `l2a.ops.kvcache.write_kv_cache`); return the ring (B, S, Hkv, D)
        and the new fill level int32 (1,)."""
        cos, sin = rotary or (None, None)
        write_kv_cache(self.local.keys, self.local.values, self.static.ring, k, v, cos, sin, backend=backend)
        return self.local.keys, self.local.values, self.static.filled

    def step_global(
        self, k: torch.Tensor, v: torch.Tensor, rotary: tuple | None = None, backend: str = "auto"
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Static step: write k, v into the global buffer (B, max_length, Hkv, D) as `step_local`; return
        it and the new fill level."""
        cos, sin = rotary or (None, None)
        buf = self.global_
        write_kv_cache(buf.keys, buf.values, self.static.index, k, v, cos, sin, backend=backend)
        return buf.keys, buf.values, self.static.filled

    def step_projected(
        self,
        branch: str,
        h: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        rotary: tuple | None = None,
        backend: str = "auto",
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Static step of `branch` ("local": the ring, "global": the global buffer): project h (B, N, hidden)
        by weight (2 Hkv D, hidden) and bias into keys and values, rotate the keys by `rotary` and write both
        (one kernel on CUDA: `l2a.ops.kvcache.project_kv_cache`); return what `step_local` / `step_global`
        return."""
        keys, values, slots, filled = self.step_buffers(branch)
        cos, sin = rotary or (None, None)
        project_kv_cache(keys, values, slots, h, weight, bias, cos, sin, backend=backend)
        return keys, values, filled

    def step_buffers(self, branch: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Static step of `branch` ("local" or "global") for a caller that writes the new keys and values
        itself: the keys and values (B, S, Hkv, D), the new tokens' slots int64 (N,) and the new fill
        level int32 (1,)."""
        buf, slots = (
            (self.local, self.static.ring) if branch == "local" else (self.global_, self.static.index)
        )
        return buf.keys, buf.values, slots, self.static.filled

    def get_seq_length(self) -> int:
        # static mode: the fill level lives on the device (reading it synchronises; no step calls this)
        return int(self.static.position.item()) if self.prompt_done else self.seen_tokens

    def get_max_length(self) -> int:
        return -1 if self.max_length is None else self.max_length

    def nbytes(self) -> dict[str, int]:
        """Bytes allocated: {"local": ..., "global": ...}."""
        return {"local": self.local.nbytes(), "global": self.global_.nbytes()}

    def _apply(self, fn) -> None:
        static = self.max_length is not None
        self.local.apply(fn, in_place=static)
        self.global_.apply(fn, in_place=static)

    def reset(self) -> None:
        self.seen_tokens = 0
        self.prompt_done = False
        if self.static is not None:
            self.static.__init__(self.static.max_length)
        self.local.reset()
        self.global_.reset()

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

    Local caches are bounded by the window; global caches (only for `config.global_layers`, and none at all
    when `config.force_route == "none"`) hold every token. `max_length` sizes the global caches once, up
    front (the static equivalent of HF's `StaticCache`); the buffers are allocated at the first forward.
    `nbytes()` reports the memory allocated, `layer_nbytes()` its split per layer into local and global.
    """

    def __init__(self, config, max_length: int | None = None):
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length must be a positive number of tokens, got {max_length}")
        routes = config.force_route != "none"
        self.static = None if max_length is None else StaticState(max_length)
        layers = [
            L2ALayerCache(
                config.sliding_window, routes and i in config.global_layers, max_length, self.static
            )
            for i in range(config.num_hidden_layers)
        ]
        super().__init__(layers=layers)
        self.max_length = max_length
        self.key_start: torch.Tensor | None = None

    def static_step(self, n: int) -> bool:
        """Whether a forward of n new tokens is a capturable static step (static cache, prompt done)."""
        return self.layers[0].static_step(n)

    def record_padding(self, key_start: torch.Tensor | None, batch: int, device: torch.device) -> None:
        """At a static cache's first forward: keep the left padding (first valid position per row) for the
        static steps, which take no attention mask."""
        if self.static is not None and self.static.position is None:
            zeros = torch.zeros(batch, dtype=torch.long, device=device)
            self.key_start = zeros if key_start is None else key_start.to(device=device, dtype=torch.long)
            _mark_static(self.key_start)

    def step_positions(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Start a static step of n tokens (once per forward, before the layers): key_start int64 (B,) and
        position ids int64 (B, N), from the device fill level."""
        index = self.static.advance(n, self.layers[0].ring_slots)
        return self.key_start, index[None, :] - self.key_start[:, None]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.key_start is not None:
            self.key_start.copy_(self.key_start.index_select(0, beam_idx.to(self.key_start.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.key_start is not None:
            self.key_start = self.key_start.repeat_interleave(repeats, dim=0)
            _mark_static(self.key_start)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.key_start is not None:
            self.key_start = self.key_start[indices]
            _mark_static(self.key_start)

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
        return -1 if self.max_length is None else self.max_length

    def layer_nbytes(self) -> list[dict[str, int]]:
        """Per layer {"local": bytes, "global": bytes} allocated."""
        return [layer.nbytes() for layer in self.layers]

    def nbytes(self) -> int:
        """Total bytes allocated for cached keys and values."""
        return sum(b["local"] + b["global"] for b in self.layer_nbytes())
