"""Plain-PyTorch attention: the CPU backend and the float64 oracle for the Triton kernels.

Memory is O(B·Hq·N·Nk): meant for short sequences and tests, not for long context.
Queries are aligned to the last key: query i sits at absolute position i + (Nk - N).
"""

from __future__ import annotations

import torch


def _positions(n: int, nk: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    qpos = torch.arange(n, device=device) + (nk - n)
    kpos = torch.arange(nk, device=device)
    return qpos, kpos


def _document_ids(cu_seqlens: torch.Tensor, n: int) -> torch.Tensor:
    # doc id of token t = number of boundaries (excluding 0) that are <= t
    return torch.bucketize(torch.arange(n, device=cu_seqlens.device), cu_seqlens[1:].long(), right=True)


def attention_mask(
    b: int,
    n: int,
    nk: int,
    device: torch.device,
    *,
    key_offset: int = 0,
    window: int | None = None,
    cu_seqlens: torch.Tensor | None = None,
    key_start: torch.Tensor | None = None,
) -> torch.Tensor:
    """Bool (B, N, Nk): key j allowed for query i.

    Causal with `key_offset` (j <= pos_i - key_offset), optionally limited to a window
    (pos_i - window < j), to the query's document, and to j >= key_start[b].
    """
    qpos, kpos = _positions(n, nk, device)
    diff = qpos[:, None] - kpos[None, :]
    allowed = diff >= key_offset
    if window is not None:
        allowed = allowed & (diff < window)
    allowed = allowed.unsqueeze(0).expand(b, n, nk)
    if cu_seqlens is not None:
        doc = _document_ids(cu_seqlens, nk)
        allowed = allowed & (doc[:, None] == doc[None, :]).unsqueeze(0)
    if key_start is not None:
        allowed = allowed & (kpos[None, None, :] >= key_start.to(device).long()[:, None, None])
    return allowed


def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    allowed: torch.Tensor,
    softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention under an explicit mask.

    q: (B, N, Hq, D); k, v: (B, Nk, Hkv, D); allowed: bool (B, N, Nk) or (B, Hq, N, Nk).
    Returns out (B, N, Hq, D) in q's dtype and lse (B, Hq, N) float32 (float64 for float64 input);
    rows with no allowed key give out 0 and lse -inf.
    """
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    hq, hkv = q.shape[2], k.shape[2]
    qc, kc, vc = q.to(compute), k.to(compute), v.to(compute)
    if hq != hkv:
        kc = kc.repeat_interleave(hq // hkv, dim=2)
        vc = vc.repeat_interleave(hq // hkv, dim=2)
    if allowed.dim() == 3:
        allowed = allowed.unsqueeze(1)
    scores = torch.einsum("bnhd,bmhd->bhnm", qc, kc) * softmax_scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True).detach()
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    weights = torch.exp(scores - row_max)
    denom = weights.sum(dim=-1, keepdim=True)
    probs = weights / denom.clamp_min(torch.finfo(compute).tiny)
    out = torch.einsum("bhnm,bmhd->bnhd", probs, vc)
    lse = torch.where(
        denom > 0, torch.log(denom.clamp_min(torch.finfo(compute).tiny)) + row_max, float("-inf")
    ).squeeze(-1)
    return out.to(q.dtype), lse


def conditional_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    active: torch.Tensor,
    softmax_scale: float,
    key_offset: int = 0,
    cu_seqlens: torch.Tensor | None = None,
    key_start: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention for active queries only; see `l2a.ops.conditional_attention`."""
    b, n, hq, _ = q.shape
    nk = k.shape[1]
    allowed = attention_mask(
        b, n, nk, q.device, key_offset=key_offset, cu_seqlens=cu_seqlens, key_start=key_start
    )
    if active.dim() == 2:
        allowed = allowed & active[:, :, None]
    else:
        allowed = allowed.unsqueeze(1) & active.permute(0, 2, 1)[:, :, :, None]
    return masked_attention(q, k, v, allowed, softmax_scale)


def sliding_window_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    softmax_scale: float,
    cu_seqlens: torch.Tensor | None = None,
    key_start: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention limited to the last `window` keys; see `l2a.ops.sliding_window_attention`."""
    b, n, _, _ = q.shape
    nk = k.shape[1]
    allowed = attention_mask(b, n, nk, q.device, window=window, cu_seqlens=cu_seqlens, key_start=key_start)
    return masked_attention(q, k, v, allowed, softmax_scale)


def all_or_here_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    active: torch.Tensor,
    window: int,
    softmax_scale: float,
    cu_seqlens: torch.Tensor | None = None,
    key_start: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (token, head): full causal attention where `active`, window attention otherwise (an explicit
    (B, Hq, N, Nk) mask); see `l2a.ops.all_or_here_attention`."""
    b, n, hq, _ = q.shape
    nk = k.shape[1]
    full = attention_mask(b, n, nk, q.device, cu_seqlens=cu_seqlens, key_start=key_start)
    local = attention_mask(b, n, nk, q.device, window=window, cu_seqlens=cu_seqlens, key_start=key_start)
    routed = (active[:, :, None] if active.dim() == 2 else active).expand(b, n, hq)
    allowed = torch.where(routed.permute(0, 2, 1)[..., None], full[:, None], local[:, None])
    return masked_attention(q, k, v, allowed, softmax_scale)
