"""Prefill/training q/k/v projections run as one GEMM over concatenated weights: same values and gradients
(inputs and every weight and bias) as the three separate modules, in float64."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from l2a.layers import LocalAttention
from l2a.layers.common import FUSE_MIN_TOKENS, GatedMLP, RMSNorm

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


def test_fused_gate_up_equals_separate_projections():
    torch.manual_seed(0)
    mlp = GatedMLP(HIDDEN, 24, "silu", bias=True).double()
    x = torch.randn(2, FUSE_MIN_TOKENS, HIDDEN, dtype=torch.float64, requires_grad=True)
    calls = []
    mlp.gate_proj.register_forward_hook(lambda *_: calls.append(1))
    got = mlp(x)
    assert not calls  # one GEMM over the concatenated gate/up weights
    want = mlp.down_proj(torch.nn.functional.silu(mlp.gate_proj(x)) * mlp.up_proj(x))
    leaves = [x, *mlp.parameters()]
    for g, e in zip(
        torch.autograd.grad(got.sum(), leaves), torch.autograd.grad(want.sum(), leaves), strict=True
    ):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("feeds_linear", [True, False], ids=["feeds-linear", "plain"])
def test_norm_feeding_linears_gives_the_autocast_dtype(feeds_linear):
    norm = RMSNorm(HIDDEN, feeds_linear=feeds_linear)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(3, 5, HIDDEN, requires_grad=True)
    linear = torch.nn.Linear(HIDDEN, 7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = norm(x)
        out = linear(y)
    assert y.dtype == (torch.bfloat16 if feeds_linear else torch.float32)
    # the linear layer sees the same bf16 input either way
    expected = norm.weight * x * torch.rsqrt(x.square().mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(y.float(), expected.bfloat16().float() if feeds_linear else expected)
    assert out.dtype == torch.bfloat16
