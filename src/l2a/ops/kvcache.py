"""Attention of a few new tokens against a preallocated KV cache whose fill level lives on the device.

Legend: B batch, N new query tokens, S cache slots, Hq query heads, Hkv key/value heads, D head dim.
The convention is flash-attn's `flash_attn_with_kvcache`: the cache holds `cache_seqlen` tokens (the N new
ones included, already written), and query i sits at position cache_seqlen - N + i. Nothing in a call
depends on a host integer that changes from step to step, so a decode step can be captured in a CUDA graph.
"""

from __future__ import annotations

import math

import torch

from l2a.ops import _checks
from l2a.ops.attention import _use_triton, _use_triton_elementwise
from l2a.ops.linear import ROUTED_LINEAR_MAX_ROWS, rotary_tiles_supported, routed_linear_reference
from l2a.ops.norm import rms_norm_and_logits
from l2a.ops.reference import masked_attention
from l2a.ops.rotary import rotary_reference, triton_supported


def slot_positions(cache_seqlen: torch.Tensor, slots: int, ring: bool) -> torch.Tensor:
    """Absolute position held by each slot, int64 (S,); -1 for slots not written yet."""
    j = torch.arange(slots, device=cache_seqlen.device)
    filled = cache_seqlen.long().reshape(1)
    # a ring slot j holds the latest position p < filled with p = j (mod S)
    pos = filled - 1 - torch.remainder(filled - 1 - j, slots) if ring else j
    return torch.where(pos < filled, pos, -1)


def attention_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlen: torch.Tensor,
    *,
    active: torch.Tensor | None = None,
    window: int | None = None,
    ring: bool = False,
    key_start: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Causal attention of the last N tokens of a preallocated cache.

    Args:
        q: (B, N, Hq, D). k_cache, v_cache: (B, S, Hkv, D), Hq a multiple of Hkv.
        cache_seqlen: int32/int64 (1,) tokens written so far, the N new ones included.
        active: None (every query), bool (B, N) token-wise or (B, N, Hq) head-wise routing; rows not routed
            give 0 and cost nothing in the Triton kernel.
        window: sliding window (keys t - window < j <= t), or None for full causal attention.
        ring: the cache is a ring buffer: position j lives in slot j % S; needs window + N - 1 <= S.
        key_start: int (B,) first valid position per row (left padding).
        softmax_scale: defaults to 1/sqrt(D). backend: as in `l2a.ops.conditional_attention`.

    Returns:
        out (B, N, Hq, D) in q's dtype.
    """
    b, n, s, hq, _, d = _checks.check_qkv(q, k_cache, v_cache)
    if active is not None:
        _checks.check_active(active, b, n, hq, q.device)
    _checks.check_key_start(key_start, b, q.device)
    if (
        not isinstance(cache_seqlen, torch.Tensor)
        or cache_seqlen.shape != (1,)
        or cache_seqlen.is_floating_point()
    ):
        raise ValueError(
            "cache_seqlen must be an int tensor of shape (1,): the number of tokens in the cache"
        )
    if window is not None:
        _checks.check_nonnegative_int("window", window, 1)
    if ring and (window is None or window + n - 1 > s):
        raise ValueError(f"a ring cache of {s} slots needs a window with window + N - 1 <= {s}, got {window}")
    scale = 1.0 / math.sqrt(d) if softmax_scale is None else float(softmax_scale)
    if _use_triton(backend, q):
        from l2a.ops.triton._flash import dispatch
        from l2a.ops.triton.decode import decode_attention_fwd, decode_attention_op

        args = (q, k_cache, v_cache, active, scale, 0, window or 0, key_start, cache_seqlen, ring)
        out, _ = dispatch(decode_attention_op, decode_attention_fwd, *args)
        return out
    kpos = slot_positions(cache_seqlen, s, ring)
    # unwritten slots hold arbitrary bits (NaN even): zero them, as 0 weight x NaN is NaN
    written = (kpos >= 0)[None, :, None, None]
    k_cache, v_cache = torch.where(written, k_cache, 0), torch.where(written, v_cache, 0)
    qpos = cache_seqlen.long().reshape(1) - n + torch.arange(n, device=q.device)
    allowed = (kpos[None, :] >= 0) & (kpos[None, :] <= qpos[:, None])
    if window is not None:
        allowed = allowed & (kpos[None, :] > qpos[:, None] - window)
    allowed = allowed.expand(b, n, s)
    if key_start is not None:
        allowed = allowed & (kpos[None, None, :] >= key_start.long()[:, None, None])
    if active is not None:
        if active.dim() == 2:
            allowed = allowed & active[:, :, None]
        else:
            allowed = allowed[:, None] & active.permute(0, 2, 1)[:, :, :, None]
    return masked_attention(q, k_cache, v_cache, allowed, scale)[0]


def write_kv_cache(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
    *,
    backend: str = "auto",
) -> None:
    """Write new keys and values into preallocated caches in place: k_cache[:, slots[t]] = k[:, t] (rotated
    by cos/sin first when given, as `l2a.ops.rotary.apply_rotary`), v_cache[:, slots[t]] = v[:, t].

    Args:
        k_cache, v_cache: (B, S, Hkv, D), written in place (cast to their dtype).
        slots: int64 (N,) slot of each new token, on the device (the same for every batch row).
        k, v: (B, N, Hkv, D). cos, sin: (B or 1, N, D), or None (k written as it is).
        backend: "auto" (one Triton kernel for CUDA tensors of float16 / bfloat16 / float32 with D / 2 a
            power of two, no gradient; else PyTorch: `apply_rotary` and two `index_copy_`), "triton", "torch".
    """
    _checks.check_backend(backend)
    b, n, h, d = k.shape if k.dim() == 4 else (None,) * 4
    if (
        k.dim() != 4
        or v.shape != k.shape
        or k_cache.shape != v_cache.shape
        or k_cache.dim() != 4
        or (k_cache.shape[0], *k_cache.shape[2:]) != (b, h, d)
    ):
        raise ValueError(
            "write_kv_cache: k, v must be (B, N, Hkv, D) and the caches (B, S, Hkv, D), got "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}, caches {tuple(k_cache.shape)} / {tuple(v_cache.shape)}"
        )
    if slots.shape != (n,) or slots.dtype != torch.int64:
        raise ValueError(
            f"write_kv_cache: slots must be int64 of shape ({n},), got {slots.dtype} {tuple(slots.shape)}"
        )
    if (cos is None) != (sin is None) or (
        cos is not None and (cos.shape != sin.shape or cos.shape[-2:] != (n, d))
    ):
        raise ValueError("write_kv_cache: cos and sin must both be given, each (B or 1, N, D), or both None")
    tables = (cos, sin) if cos is not None else (k, k)  # without rotation only D and the dtypes matter
    supported = (
        d % 2 == 0
        and triton_supported(k, *tables)
        and all(t.dtype in _checks.TRITON_DTYPES for t in (v, k_cache, v_cache))
        and not (torch.is_grad_enabled() and any(t.requires_grad for t in (k, v, cos, sin) if t is not None))
    )
    if backend == "triton" and not supported:
        raise ValueError(
            "write_kv_cache: the Triton kernel needs D / 2 a power of two, 16/32-bit floats and no gradient"
        )
    if not _use_triton_elementwise(backend, k, supported):
        if cos is not None:
            k = rotary_reference(k, cos, sin)
        k_cache.index_copy_(1, slots, k.to(k_cache.dtype))
        v_cache.index_copy_(1, slots, v.to(v_cache.dtype))
        return
    from l2a.ops.triton._flash import dispatch
    from l2a.ops.triton.rotary import write_kv_cache_fwd, write_kv_cache_op

    dispatch(write_kv_cache_op, write_kv_cache_fwd, k_cache, v_cache, slots, k, v, cos, sin)


def project_kv_cache(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
    *,
    backend: str = "auto",
) -> None:
    """Project the new tokens' keys and values and write them into preallocated caches in place: `k, v =
    split(x @ weight.T + bias)`, then `write_kv_cache(k_cache, v_cache, slots, k, v, cos, sin)`.

    Args:
        k_cache, v_cache: (B, S, Hkv, D), written in place.
        slots: int64 (N,) slot of each new token (the same for every batch row).
        x: (B, N, K) the new tokens' (normalised) hidden states.
        weight: (2 Hkv D, K), the key rows then the value rows; bias: (2 Hkv D,) or None; x's dtype.
        cos, sin: (B or 1, N, D) rotate the keys, or None.
        backend: "auto" (one Triton kernel for the projection, the keys' RoPE and both writes, for CUDA
            tensors of float16 / bfloat16 / float32 with D / 2 a power of two, D >= 16, at most
            `l2a.ops.linear.ROUTED_LINEAR_MAX_ROWS` rows B * N and no gradient; else PyTorch), "triton",
            "torch".
    """
    _checks.check_backend(backend)
    supported = _check_kv_projection("project_kv_cache", k_cache, v_cache, slots, x, weight, bias, cos, sin)
    if backend == "triton" and not supported:
        raise ValueError(
            "project_kv_cache: the Triton kernel needs D / 2 a power of two with D >= 16, 16/32-bit floats, "
            f"at most {ROUTED_LINEAR_MAX_ROWS} rows and no gradient"
        )
    h, d = k_cache.shape[2:]
    if not _use_triton_elementwise(backend, x, supported):
        k, v = torch.nn.functional.linear(x, weight, bias).unflatten(-1, (2 * h, d)).split(h, dim=-2)
        write_kv_cache(k_cache, v_cache, slots, k, v, cos, sin, backend="torch")
        return
    from l2a.ops.triton._flash import dispatch
    from l2a.ops.triton.routed_linear import linear_kv_cache_fwd, linear_kv_cache_op

    dispatch(linear_kv_cache_op, linear_kv_cache_fwd, k_cache, v_cache, slots, x, weight, bias, cos, sin)


def _check_kv_projection(
    op: str,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
) -> bool:
    """Validate the arguments of a k/v projection into caches (`project_kv_cache`, `norm_route_qkv`);
    returns whether the Triton kernel takes them."""
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(
            f"{op}: the caches must be (B, S, Hkv, D), got {tuple(k_cache.shape)} / {tuple(v_cache.shape)}"
        )
    b, _, h, d = k_cache.shape
    if x.dim() != 3 or x.shape[0] != b or weight.shape != (2 * h * d, x.shape[-1]):
        raise ValueError(
            f"{op}: x must be ({b}, N, K) and the k/v weight (2 * Hkv * D, K) = ({2 * h * d}, K) for "
            f"caches {tuple(k_cache.shape)}, got x {tuple(x.shape)}, weight {tuple(weight.shape)}"
        )
    if bias is not None and bias.shape != (2 * h * d,):
        raise ValueError(f"{op}: the k/v bias must have shape ({2 * h * d},), got {tuple(bias.shape)}")
    if x.dtype != weight.dtype or (bias is not None and bias.dtype != weight.dtype):
        raise TypeError(f"{op}: x, weight and bias need one dtype, got {x.dtype}, {weight.dtype}")
    n = x.shape[1]
    if slots.shape != (n,) or slots.dtype != torch.int64:
        raise ValueError(f"{op}: slots must be int64 of shape ({n},), got {slots.dtype} {tuple(slots.shape)}")
    if (cos is None) != (sin is None) or (
        cos is not None and (cos.shape != sin.shape or cos.dim() != 3 or cos.shape[-2:] != (n, d))
    ):
        raise ValueError(f"{op}: cos and sin must both be given, each (B or 1, N, D), or both None")
    if cos is not None and cos.shape[0] not in (1, b):
        raise ValueError(f"{op}: cos and sin must be (B or 1, N, D), got {tuple(cos.shape)} for B = {b}")
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias, cos, sin)
    )
    tables = (cos, sin) if cos is not None else (k_cache, k_cache)  # without rotation: D and dtypes only
    return (
        not needs_grad
        and b * n <= ROUTED_LINEAR_MAX_ROWS
        and x.dtype in _checks.TRITON_DTYPES
        and all(t.dtype in _checks.TRITON_DTYPES for t in (k_cache, v_cache))
        and rotary_tiles_supported(x, *tables)
    )


def norm_route_qkv(
    x: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    router_weight: torch.Tensor,
    q_weight: torch.Tensor,
    q_bias: torch.Tensor | None,
    kv_weight: torch.Tensor,
    kv_bias: torch.Tensor | None,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    temperature: float,
    threshold: float,
    offset: float = 0.0,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The entry of a routed attention branch in a decode step: normalise the new tokens, route them, write
    their keys and values into the caches and project the queries of the routed ones.

        g    = rms_norm_reference(x, norm_weight, eps)
        soft = sigmoid((linear(g, router_weight).float() + offset) / temperature);  hard = soft >= threshold
        project_kv_cache(k_cache, v_cache, slots, g, kv_weight, kv_bias, cos, sin)
        q    = routed_linear(g, q_weight, q_bias, hard, rotary=(cos, sin))

    Args:
        x: (B, N, K) the new tokens' residual stream. norm_weight: (K,). router_weight: (1, K).
        q_weight: (Hq D, K), q_bias: (Hq D,) or None; kv_weight: (2 Hkv D, K), the key rows then the value
            rows, kv_bias: (2 Hkv D,) or None (both biases or neither); all in x's dtype.
        k_cache, v_cache: (B, S, Hkv, D), written in place at slots int64 (N,).
        cos, sin: (B or 1, N, D) rotate the queries and the keys.
        temperature, threshold, offset: the router's (`l2a.layers.Router`).
        backend: "auto" (one Triton kernel for all of it, for CUDA tensors of float16 / bfloat16 / float32
            with D / 2 a power of two, D >= 16, at most `l2a.ops.linear.ROUTED_LINEAR_MAX_ROWS` rows and no
            gradient; else PyTorch), "triton", "torch".

    Returns:
        q (B, N, Hq, D), 0 on the rows not routed; soft float32 (B, N); hard bool (B, N).
    """
    _checks.check_backend(backend)
    if cos is None or sin is None:
        raise ValueError("norm_route_qkv: cos and sin are required (the queries and keys are rotated)")
    supported = _check_kv_projection(
        "norm_route_qkv", k_cache, v_cache, slots, x, kv_weight, kv_bias, cos, sin
    )
    k_in, d = x.shape[-1], k_cache.shape[-1]
    if norm_weight.shape != (k_in,) or router_weight.shape != (1, k_in):
        raise ValueError(
            f"norm_route_qkv: norm_weight must be ({k_in},) and router_weight (1, {k_in}), got "
            f"{tuple(norm_weight.shape)} and {tuple(router_weight.shape)}"
        )
    if q_weight.dim() != 2 or q_weight.shape[1] != k_in or q_weight.shape[0] % d:
        raise ValueError(
            f"norm_route_qkv: q_weight must be (Hq * D, {k_in}) with D = {d}, got {tuple(q_weight.shape)}"
        )
    if (q_bias is None) != (kv_bias is None) or (q_bias is not None and q_bias.shape != q_weight.shape[:1]):
        raise ValueError(
            f"norm_route_qkv: give both biases, q_bias ({q_weight.shape[0]},), or neither; got q_bias "
            f"{None if q_bias is None else tuple(q_bias.shape)}, kv_bias "
            f"{None if kv_bias is None else tuple(kv_bias.shape)}"
        )
    others = (norm_weight, router_weight, q_weight) + ((q_bias,) if q_bias is not None else ())
    if any(t.dtype != x.dtype for t in others):
        raise TypeError(
            f"norm_route_qkv: x, the norm, router and projection weights need one dtype, got x {x.dtype}, "
            f"norm {norm_weight.dtype}, router {router_weight.dtype}, q {q_weight.dtype}"
        )
    if not temperature > 0 or not 0.0 < threshold < 1.0 or not math.isfinite(offset):
        raise ValueError(
            "norm_route_qkv: needs temperature > 0, 0 < threshold < 1 and a finite offset, got "
            f"{temperature}, {threshold}, {offset}"
        )
    supported = supported and not (torch.is_grad_enabled() and any(t.requires_grad for t in others))
    if backend == "triton" and not supported:
        raise ValueError(
            "norm_route_qkv: the Triton kernel needs D / 2 a power of two with D >= 16, 16/32-bit floats, "
            f"at most {ROUTED_LINEAR_MAX_ROWS} rows and no gradient"
        )
    if not _use_triton_elementwise(backend, x, supported):
        g, logits = rms_norm_and_logits(x, norm_weight, eps, router_weight, backend="torch")
        soft = torch.sigmoid((logits.squeeze(-1) + offset) / temperature)
        hard = soft >= threshold
        project_kv_cache(k_cache, v_cache, slots, g, kv_weight, kv_bias, cos, sin, backend="torch")
        q = routed_linear_reference(g, q_weight, q_bias, hard, rotary=(cos, sin))
        return q.unflatten(-1, (-1, d)), soft, hard
    from l2a.ops.triton._flash import dispatch
    from l2a.ops.triton.routed_linear import norm_route_qkv_fwd, norm_route_qkv_op

    args = (x, norm_weight, float(eps), router_weight, float(offset), float(temperature), float(threshold))
    args += (q_weight, q_bias, kv_weight, kv_bias, k_cache, v_cache, slots, cos, sin)
    q, soft, hard = dispatch(norm_route_qkv_op, norm_route_qkv_fwd, *args)
    return q.unflatten(-1, (-1, d)), soft, hard
