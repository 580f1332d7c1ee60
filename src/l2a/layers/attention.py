"""L2A attention: a local sliding-window branch plus a routed global branch, and the decoder layer.

Legend: B batch, N new tokens, Nk keys (cached + new), Hq query heads, Hkv key/value heads, D head dim.
Attention runs only through `l2a.ops` (PyTorch reference on CPU, Triton on CUDA).

`layer_cache` arguments are per-layer cache objects (`l2a.models.cache.L2ALayerCache` or anything with
its methods): `update_local(k, v) -> (k_all, v_all, first_position)` and
`update_global(k, v) -> (k_all, v_all)`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

from l2a.layers.attention_ops import conditional_attention, sliding_window_attention
from l2a.layers.common import GatedMLP, RMSNorm, apply_rotary, fused_linear, fuses_projections
from l2a.layers.router import Router
from l2a.ops import attention_with_kvcache, routed_linear
from l2a.ops.kvcache import norm_route_qkv
from l2a.ops.norm import rms_norm_and_logits


class AttentionProjections(nn.Module):
    """q/k/v/o projections of one attention branch (and Qwen3's per-head q/k RMSNorms).

    `config.attention_backend` (and, for the local branch, `config.sliding_window`) are read at every
    forward, so changing them on the model's config takes effect at once.

    Parameter names match the base models' `self_attn` (`q_proj`, `k_proj`, `v_proj`, `o_proj`, `q_norm`,
    `k_norm`), so conversion is a renaming of state-dict keys.
    """

    def __init__(self, config: Any):
        super().__init__()
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.config = config
        hidden, d = config.hidden_size, config.head_dim
        self.q_proj = nn.Linear(hidden, self.num_heads * d, bias=config.attention_bias)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * d, bias=config.attention_bias)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * d, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.num_heads * d, hidden, bias=config.attention_output_bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(d, eps=config.rms_norm_eps)
            self.k_norm = RMSNorm(d, eps=config.rms_norm_eps)
        else:
            self.q_norm = None
            self.k_norm = None

    def project_q(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """h (B, N, hidden) -> rotated queries (B, N, Hq, D)."""
        return self.rotate_q(self.q_proj(h), cos, sin)

    def rotate_q(self, q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Projected queries (B, N, Hq * D) -> (q_norm and) rotated queries (B, N, Hq, D)."""
        q = q.unflatten(-1, (self.num_heads, self.head_dim))
        if self.q_norm is not None:
            q = self.q_norm(q)
        return apply_rotary(q, cos, sin)

    def project_kv(
        self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, with_q: bool = False
    ) -> tuple[torch.Tensor, ...]:
        """h (B, N, hidden) -> rotated keys and values, each (B, N, Hkv, D); with_q: (q, k, v), the
        rotated queries (B, N, Hq, D) first.

        More than FUSE_MIN_TOKENS tokens (prefill, training) go through one GEMM over the concatenated
        weights: h is read (and cast under autocast) once, and its gradient is one GEMM. Fewer (decode) keep
        separate GEMMs, which read each weight once instead of concatenating it every step."""
        outputs = self.project(h, with_q=with_q)
        k, v = self.kv_heads(outputs[-2], outputs[-1])
        k = apply_rotary(k, cos, sin)
        return (self.rotate_q(outputs[0], cos, sin), k, v) if with_q else (k, v)

    def project(self, h: torch.Tensor, *, with_q: bool = False) -> list[torch.Tensor]:
        """h (B, N, hidden) -> the projections [q,] k, v, (B, N, H * D) each, not rotated (`project_kv`)."""
        projections = (self.q_proj, self.k_proj, self.v_proj) if with_q else (self.k_proj, self.v_proj)
        if fuses_projections(h):
            return list(fused_linear(h, projections).split([m.out_features for m in projections], -1))
        return [m(h) for m in projections]

    def kv_heads(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Projected keys and values (B, N, Hkv * D) -> (k_norm-ed) keys and values, each (B, N, Hkv, D),
        not rotated."""
        k = k.unflatten(-1, (self.num_kv_heads, self.head_dim))
        v = v.unflatten(-1, (self.num_kv_heads, self.head_dim))
        return (k if self.k_norm is None else self.k_norm(k)), v


class LocalAttention(AttentionProjections):
    """Causal attention over the last `sliding_window` tokens (the token itself included)."""

    def forward(
        self,
        h: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        *,
        cu_seqlens: torch.Tensor | None = None,
        key_start: torch.Tensor | None = None,
        layer_cache: Any | None = None,
        kv_weights: tuple[torch.Tensor, torch.Tensor | None] | None = None,
    ) -> torch.Tensor:
        """h (B, N, hidden) -> (B, N, hidden).

        key_start: int (B,) absolute position of each row's first valid token (left padding).
        kv_weights: the static decode steps' k/v weight (2 Hkv D, hidden) and bias (or None)
            (`L2ADecoderLayer.decode_weights("local")`): k/v projected, rotated and written into the ring in
            one kernel (`l2a.ops.kvcache.project_kv_cache`); no k_norm.
        """
        cos, sin = position_embeddings
        backend = self.config.attention_backend
        if layer_cache is not None and layer_cache.static_step(h.shape[1]):
            if kv_weights is not None:
                k_ring, v_ring, filled = layer_cache.step_projected(
                    "local", h, *kv_weights, rotary=(cos, sin), backend=backend
                )
                q = self.project_q(h, cos, sin)
            else:
                q, k, v = self.project(h, with_q=True)
                # the keys are rotated inside the cache write (one kernel for rotation and both writes)
                k_ring, v_ring, filled = layer_cache.step_local(
                    *self.kv_heads(k, v), rotary=(cos, sin), backend=backend
                )
                q = self.rotate_q(q, cos, sin)
            out = attention_with_kvcache(
                q,
                k_ring,
                v_ring,
                filled,
                window=self.config.sliding_window,
                ring=True,
                key_start=key_start,
                backend=backend,
            )
            return self.o_proj(out.flatten(-2))
        q, k, v = self.project_kv(h, cos, sin, with_q=True)
        if layer_cache is not None:
            k, v, first_position = layer_cache.update_local(k, v)
            if key_start is not None:
                key_start = (key_start - first_position).clamp_min(0)
        out = sliding_window_attention(
            q,
            k,
            v,
            self.config.sliding_window,
            cu_seqlens=cu_seqlens,
            key_start=key_start,
            backend=self.config.attention_backend,
        )
        return self.o_proj(out.flatten(-2))


class GlobalAttention(AttentionProjections):
    """Full causal attention for routed queries; keys and values are all tokens.

    The output is multiplied by the router's gate: token-wise gates (B, N) scale the projected output,
    head-wise gates (B, N, Hq) scale each head before `o_proj`. A token with no routed head adds exactly 0
    (no `o_proj` bias) and passes no gradient to its gate.

    q_proj, q_norm, RoPE and o_proj run on the routed tokens only when more than `COMPACT_MIN_TOKENS`
    tokens come in (prefill, training). Sizing that gather reads the routed count on the host: one sync per
    layer and forward (on CUDA a wait for that count alone, copied while the k/v projection runs), never in
    a decode step and never under `torch.compile` (the same masked form, so the graph has no data-dependent
    shape). Decode steps (`projected` given) run q_proj and o_proj through `l2a.ops.routed_linear`, whose
    kernel reads those weights only when a row of the step is routed (the attention kernel skips unrouted
    rows too): a step that routes no token pays the k/v projection and a few launches.
    """

    COMPACT_MIN_TOKENS = 16

    def forward(
        self,
        h: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        active: torch.Tensor,
        gate: torch.Tensor,
        *,
        cu_seqlens: torch.Tensor | None = None,
        key_start: torch.Tensor | None = None,
        layer_cache: Any | None = None,
        kv_weights: tuple[torch.Tensor, torch.Tensor | None] | None = None,
        residual: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """h (B, N, hidden); active bool and gate float, (B, N) or (B, N, Hq) -> (B, N, hidden).

        With a cache the keys/values of every token are appended to the global cache first.
        kv_weights: the decode steps' k/v weight (R, hidden) and bias (R,) or None: the k rows, the v rows,
            then zero rows (`L2ADecoderLayer.decode_weights`); at most `COMPACT_MIN_TOKENS` tokens, no
            gradient. A static step without k_norm projects, rotates and writes k/v into the cache in one
            kernel (`l2a.ops.kvcache.project_kv_cache`), other steps run one GEMM.
        residual: (B, N, hidden) or None; given, the result is `residual + branch output` (decode steps
            add it inside the o projection's kernel).
        """
        cos, sin = position_embeddings
        routed = active if active.dim() == 2 else active.any(-1)
        b, n = routed.shape
        if kv_weights is not None and n > self.COMPACT_MIN_TOKENS:
            raise ValueError(f"decode k/v weights are for at most {self.COMPACT_MIN_TOKENS} tokens, got {n}")
        compact = n > self.COMPACT_MIN_TOKENS and not torch.compiler.is_compiling()
        static = layer_cache is not None and layer_cache.static_step(n)
        # the routed count travels to the host while the GPU runs the k/v projection (see `_count_to_host`)
        pending = _count_to_host(routed) if compact and not static else None
        decode = kv_weights is not None and active.dim() == 2  # token-wise: routed-rows q/o projections
        backend = self.config.attention_backend
        if static and kv_weights is not None and _one_kernel_kv(self, h, kv_weights[0]):
            kv = 2 * self.num_kv_heads * self.head_dim
            weight, bias = kv_weights[0][:kv], None if kv_weights[1] is None else kv_weights[1][:kv]
            cache = layer_cache.step_projected("global", h, weight, bias, rotary=(cos, sin), backend=backend)
        else:
            if kv_weights is None:
                k, v = self.kv_heads(*self.project(h))
            else:
                kv_size = self.num_kv_heads * self.head_dim
                projected = nn.functional.linear(h, *kv_weights)
                k, v = self.kv_heads(
                    *projected.split([kv_size, kv_size, projected.shape[-1] - 2 * kv_size], -1)[:2]
                )
            # static steps rotate the keys inside the cache write
            cache = layer_cache.step_global(k, v, rotary=(cos, sin), backend=backend) if static else None

        def all_queries() -> torch.Tensor:
            if decode and self.q_norm is None:  # RoPE inside the projection's kernel
                q = self._routed_rows(h, self.q_proj, routed, rotary=(cos, sin))
                return q.unflatten(-1, (self.num_heads, self.head_dim))
            if decode:
                return self.rotate_q(self._routed_rows(h, self.q_proj, routed), cos, sin)
            return self.project_q(h, cos, sin)

        def output(out: torch.Tensor) -> torch.Tensor:
            if decode:  # in inference the gate is the hard decision: 1 on routed rows
                return self._routed_rows(out.flatten(-2), self.o_proj, routed, residual)
            y = torch.where(routed[..., None], self._gated_output(out, gate), 0.0)
            return y if residual is None else residual + y

        if static:
            k_all, v_all, filled = cache
            out = attention_with_kvcache(
                all_queries(), k_all, v_all, filled, active=active, key_start=key_start, backend=backend
            )
            return output(out)
        k = apply_rotary(k, cos, sin)
        if layer_cache is not None:
            k, v = layer_cache.update_global(k, v)
        if not compact:
            q = all_queries()
            return output(self._attend(q, k, v, active, cu_seqlens, key_start))
        rows = _routed_rows(routed, pending)  # the one host sync (see the class docstring)
        flat = b * n
        q_rows = self.project_q(
            h.flatten(0, 1)[rows][None], cos.flatten(0, 1)[rows][None], sin.flatten(0, 1)[rows][None]
        )[0]
        if torch.is_autocast_enabled(h.device.type):  # the op casts q anyway: scatter the cast rows only
            q_rows = q_rows.to(torch.get_autocast_dtype(h.device.type))
        q = (
            q_rows.new_zeros(flat, *q_rows.shape[1:])
            .index_copy(0, rows, q_rows)
            .view(b, n, *q_rows.shape[1:])
        )
        out = self._attend(q, k, v, active, cu_seqlens, key_start).flatten(0, 1)[rows]
        y_rows = self._gated_output(out, gate.flatten(0, 1)[rows])
        y = y_rows.new_zeros(flat, y_rows.shape[-1]).index_copy(0, rows, y_rows).view(b, n, -1)
        return y if residual is None else residual + y

    def routed_decode_step(
        self,
        x: torch.Tensor,
        norm: nn.Module,
        router: nn.Module,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        layer_cache: Any,
        kv_weights: tuple[torch.Tensor, torch.Tensor | None],
        key_start: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A static decode step of the branch from the residual stream x (B, N, hidden) -> (x + branch
        output, soft float32 (B, N), hard bool (B, N)): `norm`, the token-wise `router`'s decision, the k/v
        projection into the cache and the routed rows' q in one kernel (`l2a.ops.kvcache.norm_route_qkv`),
        then decode attention and the routed rows' o projection with x added (`routed_linear`).
        kv_weights as in `forward`; `L2ADecoderLayer` checks that the step qualifies."""
        cos, sin = position_embeddings
        keys, values, slots, filled = layer_cache.step_buffers("global")
        rows = 2 * self.num_kv_heads * self.head_dim
        weight, bias = kv_weights[0][:rows], None if kv_weights[1] is None else kv_weights[1][:rows]
        backend = self.config.attention_backend
        q, soft, hard = norm_route_qkv(
            x, norm.weight, norm.variance_epsilon, router.weight, self.q_proj.weight, self.q_proj.bias,
            weight, bias, keys, values, slots, cos, sin, temperature=router.temperature,
            threshold=router.threshold, offset=router.offset, backend=backend,
        )  # fmt: skip
        out = attention_with_kvcache(
            q, keys, values, filled, active=hard, key_start=key_start, backend=backend
        )
        return self._routed_rows(out.flatten(-2), self.o_proj, hard, x), soft, hard

    def _attend(self, q, k, v, active, cu_seqlens, key_start) -> torch.Tensor:
        return conditional_attention(
            q, k, v, active, cu_seqlens=cu_seqlens, key_start=key_start, backend=self.config.attention_backend
        )

    def _routed_rows(
        self,
        x: torch.Tensor,
        linear: nn.Linear,
        routed: torch.Tensor,
        residual: torch.Tensor | None = None,
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """linear(x) (its heads rotated by `rotary` = (cos, sin) when given) on the rows where `routed`
        (B, N), 0 elsewhere, plus `residual` (decode steps)."""
        if (
            x.dtype != linear.weight.dtype
            or torch.is_autocast_enabled(x.device.type)
            or (residual is not None and residual.dtype != x.dtype)
        ):
            y = linear(x)
            if rotary is not None:
                y = apply_rotary(y.unflatten(-1, (-1, self.head_dim)), *rotary).flatten(-2)
            y = torch.where(routed[..., None], y, 0.0)
            return y if residual is None else residual + y
        backend = self.config.attention_backend
        return routed_linear(
            x, linear.weight, linear.bias, routed, residual=residual, rotary=rotary, backend=backend
        )

    def _gated_output(self, out: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """out (..., Hq, D), gate (...) or (..., Hq) -> o_proj of the gated heads (..., hidden)."""
        if gate.dim() == out.dim() - 1:
            return self.o_proj((out * gate.unsqueeze(-1)).flatten(-2))
        return self.o_proj(out.flatten(-2)) * gate.unsqueeze(-1)


def _one_kernel_kv(attn: AttentionProjections, h: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether a static step's k/v of `attn` can be projected, rotated and written in one kernel
    (`l2a.ops.kvcache.project_kv_cache`): no k norm between projection and RoPE, h in the weight's dtype,
    no autocast (which would cast h per GEMM)."""
    return attn.k_norm is None and h.dtype == weight.dtype and not torch.is_autocast_enabled(h.device.type)


def _has_hooks(module: nn.Module) -> bool:
    """Whether forward hooks (the module's, global ones, or accelerate's `_hf_hook`, which may move the
    weights in only for the call) would see this module's calls."""
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or nn.modules.module._global_forward_hooks
        or nn.modules.module._global_forward_pre_hooks
        or getattr(module, "_hf_hook", None) is not None
    )


def _count_to_host(routed: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event] | None:
    """CUDA: start copying the number of routed tokens of `routed` (B, N) to pinned host memory and record an
    event after it (None elsewhere). `_routed_rows` then waits for that copy only, while the work queued
    after it (the k/v projection) keeps the GPU busy; reading the count directly would drain the queue."""
    if routed.device.type != "cuda" or torch.cuda.is_current_stream_capturing():
        return None
    host = torch.empty((), dtype=torch.int64, pin_memory=True)
    host.copy_(routed.sum(dtype=torch.int64), non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return host, event


def _routed_rows(routed: torch.Tensor, pending: tuple[torch.Tensor, torch.cuda.Event] | None) -> torch.Tensor:
    """Flat indices (int64) of the routed tokens of `routed` (B, N), in order."""
    if pending is None:
        return routed.flatten().nonzero().squeeze(1)
    host, event = pending
    event.synchronize()
    return torch.nonzero_static(routed.flatten(), size=int(host)).squeeze(1)


class L2ADecoderLayer(GradientCheckpointingLayer):
    """One L2A block (method.md):

        s   = x + LocalAttention(input_layernorm(x))
        g   = global_layernorm(s);  d = router(g)
        s'  = s + d * GlobalAttention(g)              (global layers only)
        out = s' + MLP(post_attention_layernorm(s'))

    Layers outside `config.global_layers` have no router / global branch (local-only, e.g. after pruning).

    Decode steps (a cached inference forward of at most `GlobalAttention.COMPACT_MIN_TOKENS` tokens, no
    gradient; `FUSE_DECODE = False` turns all of this off) compute the global norm and the router's logits
    in one kernel (`Router.forward` decides from them), project each branch's k/v from concatenated weights
    (`decode_weights`; static steps without k norm: projection, RoPE and cache write in one kernel) and the
    global q/o on the routed rows only (`GlobalAttention`). The branches cannot share a GEMM (the global one
    reads the residual stream after local attention).
    """

    FUSE_DECODE = True
    DECODE_ROWS_MULTIPLE = 128

    def __init__(self, config: Any, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.config = config
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, feeds_linear=True)
        self.local_attn = LocalAttention(config)
        self.post_attention_layernorm = RMSNorm(
            config.hidden_size, eps=config.rms_norm_eps, feeds_linear=True
        )
        self.mlp = GatedMLP(
            config.hidden_size, config.intermediate_size, config.hidden_act, bias=config.mlp_bias
        )
        self.has_global = layer_idx in config.global_layers
        if self.has_global:
            self.global_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, feeds_linear=True)
            self.router = Router(
                config.hidden_size,
                1,
                temperature=config.router_temperature,
                threshold=config.router_threshold,
                offset=config.router_logit_offset,
            )
            self.global_attn = GlobalAttention(config)

    def drop_global_branch(self) -> None:
        """Turn this layer into a local-only layer (pruning): removes router, global norm and projections."""
        if self.has_global:
            del self.global_layernorm, self.router, self.global_attn
            self.has_global = False
            self._decode_weights = None

    _decode_weights: tuple[tuple, torch.Tensor, torch.Tensor | None] | None = None
    _local_decode_weights: tuple[tuple, torch.Tensor, torch.Tensor | None] | None = None

    def decode_weights(self, branch: str = "global") -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """Weight (R, hidden) and bias (R,) (or None) of a branch's decode-step k/v projection: its k and v
        projections concatenated. "global": then zero rows up to R, the next multiple of
        `DECODE_ROWS_MULTIPLE` (an H200 profile of 4609 rows, then q/k/v and the router's row at the 7B
        shape: cuBLAS fell back to a GEMV kernel at 1.9 TB/s, twice the time of the separate projections'
        GEMMs); q is projected on the routed rows only (`l2a.ops.routed_linear`). "local": R = 2 Hkv D,
        for static steps (one kernel projects, rotates and writes k/v, `l2a.ops.kvcache.project_kv_cache`).

        Inference-only copies, made on first use and remade when a source parameter changed (in place: its
        version counter; or replaced, moved, cast: its storage); dropped by a forward in training mode.
        Memory: those weights once more (Qwen2.5-7B shape: 3.7 M parameters per layer and branch, 0.21 GB
        in bf16). Under torch.compile no copy is made or checked (the compiled step uses the one the eager
        prompt forward made; None if there is none).
        """
        slot = "_decode_weights" if branch == "global" else "_local_decode_weights"
        attn = self.global_attn if branch == "global" else self.local_attn
        multiple = self.DECODE_ROWS_MULTIPLE if branch == "global" else 1
        cached = getattr(self, slot)
        if torch.compiler.is_compiling():
            return None if cached is None else cached[1:]
        projections = (attn.k_proj, attn.v_proj)
        sources = [p for m in projections for p in (m.weight, m.bias) if p is not None]
        key = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in sources)
        if cached is None or cached[0] != key:
            setattr(self, slot, None)  # free the old copy first
            with torch.no_grad():
                rows = [m.weight for m in projections]
                pad = -sum(w.shape[0] for w in rows) % multiple
                weight = torch.cat(rows + [rows[0].new_zeros(pad, rows[0].shape[1])])
                bias = None
                if attn.k_proj.bias is not None:
                    bias = torch.cat([m.bias for m in projections] + [attn.k_proj.bias.new_zeros(pad)])
            torch._dynamo.mark_static_address(weight)  # compiled steps (CUDA graphs) read it in place
            if bias is not None:
                torch._dynamo.mark_static_address(bias)
            cached = (key, weight, bias)
            setattr(self, slot, cached)
        return cached[1:]

    def _decode_kv_weights(
        self, branch: str, h: torch.Tensor, layer_cache: Any | None
    ) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """A branch's decode-step k/v weights (`decode_weights`) for h (B, N, hidden); None where they do
        not apply (training, gradients, many tokens, no cache; for "local" also a dynamic cache or k_norm,
        where the separate projections run)."""
        if self.training or not self.FUSE_DECODE or layer_cache is None or torch.is_grad_enabled():
            return None
        if branch == "local" and layer_cache.get_max_length() < 0:
            return None
        fused = self.decode_weights(branch)  # made at the prompt too, so that compiled steps find it
        if fused is None or h.shape[1] > GlobalAttention.COMPACT_MIN_TOKENS:
            return None
        if branch == "local" and not _one_kernel_kv(self.local_attn, h, fused[0]):
            return None
        return fused

    def _global_norm(
        self, x: torch.Tensor, layer_cache: Any | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """global_layernorm(x) (B, N, hidden), and in decode steps the router's logits from the same kernel
        (`l2a.ops.norm.rms_norm_and_logits`), else None (the router projects)."""
        norm, router = self.global_layernorm, self.router
        if (
            self.training
            or not self.FUSE_DECODE
            or layer_cache is None
            or torch.is_grad_enabled()
            or x.shape[1] > GlobalAttention.COMPACT_MIN_TOKENS
            or torch.is_autocast_enabled(x.device.type)
            or router.weight.dtype != torch.promote_types(x.dtype, norm.weight.dtype)
        ):
            return norm(x), None
        backend = self.config.attention_backend
        return rms_norm_and_logits(x, norm.weight, norm.variance_epsilon, router.weight, backend=backend)

    def _fused_global_step(
        self,
        x: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        key_start: torch.Tensor | None,
        layer_cache: Any | None,
        global_leakage: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """The global branch of a static decode step from the residual stream x (B, N, hidden) in one
        entry kernel (`GlobalAttention.routed_decode_step`): (x + branch, soft, hard); None where the step
        does not qualify (no global branch or global K/V, forced or leaking routing, not a static step,
        q/k norms, mixed dtypes or autocast, forward hooks on the norm, router or branch, which then run
        as modules)."""
        if (
            not self.has_global
            or global_leakage
            or self.config.force_route is not None
            or layer_cache is None
            or not layer_cache.has_global
            or not layer_cache.static_step(x.shape[1])
        ):
            return None
        norm, router, attn = self.global_layernorm, self.router, self.global_attn
        if attn.q_norm is not None or any(_has_hooks(m) for m in (norm, router, attn)):
            return None
        if any(w.dtype != x.dtype for w in (norm.weight, router.weight, attn.q_proj.weight)):
            return None
        kv_weights = self._decode_kv_weights("global", x, layer_cache)
        if kv_weights is None or not _one_kernel_kv(attn, x, kv_weights[0]):
            return None
        return attn.routed_decode_step(
            x, norm, router, position_embeddings, layer_cache, kv_weights, key_start
        )

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

        soft (float32) and hard (bool) are the router's decision, (B, N) (None for local-only layers); a flat
        tuple of tensors, so that gradient checkpointing (re-entrant or not) carries the gradient of `soft`.

        global_leakage: compute global attention for every query (still multiplied by the gate), so the
            router also gets a gradient for tokens it switched off.
        """
        if self.training and (self._decode_weights is not None or self._local_decode_weights is not None):
            self._decode_weights = self._local_decode_weights = None  # inference-only (`decode_weights`)
        residual = hidden_states
        h = self.input_layernorm(hidden_states)
        hidden_states = residual + self.local_attn(
            h,
            position_embeddings,
            cu_seqlens=cu_seqlens,
            key_start=key_start,
            layer_cache=layer_cache,
            kv_weights=self._decode_kv_weights("local", h, layer_cache),
        )
        soft = hard = None
        fused = self._fused_global_step(
            hidden_states, position_embeddings, key_start, layer_cache, global_leakage
        )
        if fused is not None:
            hidden_states, soft, hard = fused
        elif self.has_global:
            g, logits = self._global_norm(hidden_states, layer_cache)
            random_fraction = getattr(self.config, "random_route_fraction", None)
            decision = self.router(g, self.config.force_route, random_fraction, logits=logits)
            active = torch.ones_like(decision.hard) if global_leakage else decision.hard
            # force_route="none" multiplies the branch by a constant 0: skip it. A cache made under
            # force_route="none" keeps no global K/V (L2ACache), so the layer can never route with it.
            skip = self.config.force_route == "none" and not global_leakage
            if layer_cache is not None and not layer_cache.has_global:
                if not skip:
                    raise ValueError(
                        f"layer {self.layer_idx}: the cache holds no global keys/values (it was made with "
                        "force_route='none'); make a new cache after changing force_route"
                    )
            elif skip and layer_cache is not None:
                skip = False  # the cache keeps global K/V for later routed steps
            if not skip:
                hidden_states = self.global_attn(
                    g,
                    position_embeddings,
                    active,
                    decision.gate,
                    cu_seqlens=cu_seqlens,
                    key_start=key_start,
                    layer_cache=layer_cache,
                    kv_weights=self._decode_kv_weights("global", g, layer_cache),
                    residual=hidden_states,
                )
            soft, hard = decision.soft, decision.hard
        residual = hidden_states
        hidden_states = residual + self.mlp(self.post_attention_layernorm(hidden_states))
        return hidden_states, soft, hard
