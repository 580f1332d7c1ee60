"""Prefill/training q/k/v projections run as one GEMM over concatenated weights: same values and gradients
(inputs and every weight and bias) as the three separate modules, in float64."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from l2a.layers import LocalAttention
from l2a.layers.attention import FUSE_MIN_TOKENS

HIDDEN, HQ, HKV, D = 32, 4, 2, 8


def _attention(qk_norm: bool, bias: bool) -> LocalAttention:
    config = SimpleNamespace(
        hidden_size=HIDDEN,
        num_attention_heads=HQ,
        num_key_value_heads=HKV,
        head_dim=D,
        attention_bias=bias,
        attention_output_bias=bias,
        qk_norm=qk_norm,
        rms_norm_eps=1e-6,
        attention_backend="torch",
        sliding_window=4,
    )
    torch.manual_seed(0)
    attn = LocalAttention(config).double()
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0, 0.3)
    return attn


def _separate(attn: LocalAttention, h, cos, sin):
    """Each projection on its own, then q/k norms and RoPE written out (independent of project_kv)."""
    b, n, _ = h.shape
    q = attn.q_proj(h).view(b, n, HQ, D)
    k = attn.k_proj(h).view(b, n, HKV, D)
    v = attn.v_proj(h).view(b, n, HKV, D)
    if attn.q_norm is not None:
        q, k = attn.q_norm(q), attn.k_norm(k)

    def rotate(x):
        half = D // 2
        turned = torch.cat([-x[..., half:], x[..., :half]], -1)
        return x * cos[:, :, None] + turned * sin[:, :, None]

    return rotate(q), rotate(k), v


@pytest.mark.parametrize("with_q", [True, False], ids=["qkv", "kv"])
@pytest.mark.parametrize("qk_norm", [False, True], ids=["qwen2-style", "qwen3-style"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_fused_projections_equal_separate_ones(with_q, qk_norm, bias):
    attn = _attention(qk_norm, bias)
    b, n = 2, FUSE_MIN_TOKENS + 5
    gen = torch.Generator().manual_seed(1)
    h = torch.randn(b, n, HIDDEN, dtype=torch.float64, generator=gen).requires_grad_()
    angles = torch.rand(b, n, D, dtype=torch.float64, generator=gen) * 6
    cos, sin = angles.cos(), angles.sin()
    calls = []
    for m in (attn.q_proj, attn.k_proj, attn.v_proj):
        m.register_forward_hook(lambda *_: calls.append(1))
    got = attn.project_kv(h, cos, sin, with_q=with_q)
    assert not calls  # one GEMM over the concatenated weights, not the modules
    want = _separate(attn, h, cos, sin)[0 if with_q else 1 :]
    weights = [torch.randn(t.shape, dtype=torch.float64, generator=gen) for t in want]
    leaves = [h, *attn.parameters()]
    grads = torch.autograd.grad(
        sum((t * w).sum() for t, w in zip(got, weights, strict=True)), leaves, allow_unused=True
    )
    expected = torch.autograd.grad(
        sum((t * w).sum() for t, w in zip(want, weights, strict=True)), leaves, allow_unused=True
    )
    for g, e in zip(got, want, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)
    for g, e in zip(grads, expected, strict=True):
        if e is None:
            assert g is None or torch.equal(g, torch.zeros_like(g))
        else:
            torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)


def test_few_tokens_use_the_separate_modules():
    attn = _attention(qk_norm=False, bias=True)
    h = torch.randn(1, FUSE_MIN_TOKENS, HIDDEN, dtype=torch.float64)
    angles = torch.zeros(1, FUSE_MIN_TOKENS, D, dtype=torch.float64)
    calls = []
    for m in (attn.q_proj, attn.k_proj, attn.v_proj):
        m.register_forward_hook(lambda *_: calls.append(1))
    attn.project_kv(h, angles.cos(), angles.sin(), with_q=True)
    assert len(calls) == 3
