"""All-or-Here attention (AHA): per (token, query head), full causal attention or window attention.

Legend: B batch, N query tokens, Nk key tokens (Nk >= N; query i at absolute position i + Nk - N),
Hq query heads, Hkv key/value heads, D head dim, W window.
"""

from __future__ import annotations

import math

import torch

from l2a.ops import _checks
from l2a.ops.attention import _autocast, _use_triton
from l2a.ops.reference import all_or_here_attention_reference


def all_or_here_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    active: torch.Tensor,
    window: int,
    *,
    softmax_scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    key_start: torch.Tensor | None = None,
    return_lse: bool = False,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Routed attention of AHA: the query at position t of head h attends keys [0, t] where active[b, t, h],
    and keys (t - window, t] otherwise.

    Args:
        q: (B, N, Hq, D). k, v: (B, Nk, Hkv, D), Hq a multiple of Hkv.
        active: bool (B, N, Hq) head-wise routing (or (B, N): one decision shared by all heads).
        window: keys seen by a local query, its own included (>= 1).
        softmax_scale: defaults to 1/sqrt(D).
        cu_seqlens: int32 (num_docs + 1) cumulative document lengths of a packed batch (B = 1, Nk = N);
            queries see only keys of their own document.
        key_start: int (B,) first valid key per batch row (left padding); earlier keys are masked.
        return_lse: also return the log-sum-exp of the scores, float32 (B, Hq, N).
        backend: "auto" (Triton on CUDA for head_dim 32/64/128 and fp16/bf16/fp32, else PyTorch, with a
            warning on CUDA), "triton" or "torch".

    Returns:
        out (B, N, Hq, D) in q's dtype (the autocast dtype under autocast) [, lse float32 (B, Hq, N)];
        rows with no key (before key_start) are 0 with lse -inf.
    """
    q, k, v = _autocast(q, k, v)
    b, n, nk, hq, _, d = _checks.check_qkv(q, k, v)
    _checks.check_active(active, b, n, hq, q.device)
    _checks.check_nonnegative_int("window", window, 1)
    _checks.check_cu_seqlens(cu_seqlens, b, n, nk, q.device)
    _checks.check_key_start(key_start, b, q.device)
    scale = 1.0 / math.sqrt(d) if softmax_scale is None else float(softmax_scale)
    if _use_triton(backend, q):
        from l2a.ops.triton.aha import all_or_here_attention_triton

        out, lse = all_or_here_attention_triton(q, k, v, active, window, scale, cu_seqlens, key_start)
    else:
        out, lse = all_or_here_attention_reference(q, k, v, active, window, scale, cu_seqlens, key_start)
    return (out, lse) if return_lse else out


def merge_by_lse(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over the union of two disjoint key sets from the attention over each:
    out (B, N, H, D), lse (B, H, N); rows with no key in either set stay 0 / -inf (and finite gradients).

    AHA as two ops (window attention for every pair, `conditional_attention(key_offset=W)` for the routed
    ones) merged here is the composed form that the one-pass kernel replaces; a decode step that reads the
    window and the far part from different places can merge them the same way."""
    m = torch.maximum(lse_a, lse_b).detach()
    m = torch.where(torch.isfinite(m), m, 0.0)
    w_a, w_b = torch.exp(lse_a - m), torch.exp(lse_b - m)
    total = w_a + w_b
    has_keys = total > 0
    total = torch.where(has_keys, total, 1.0)
    lse = torch.where(has_keys, m + torch.log(total), float("-inf"))
    w_a, w_b = ((w / total).transpose(1, 2).unsqueeze(-1) for w in (w_a, w_b))
    out = w_a * out_a.float() + w_b * out_b.float()
    return out.to(out_a.dtype), lse
