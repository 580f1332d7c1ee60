"""AHA attention: the forward is exactly the hard per-head choice; the router's straight-through gradient is
the derivative of `local + g * (full - local)`, computed against an independent float64 reference."""

from __future__ import annotations

import pytest
import torch

from l2a.layers import AHAAttention, HeadRouter, RoutingDecision
from l2a.models import L2AConfig

B, N, HQ, HKV, D, W = 2, 11, 4, 2, 8, 3


def _config(**kwargs) -> L2AConfig:
    fields = dict(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=HQ,
        num_key_value_heads=HKV,
        head_dim=D,
        sliding_window=W,
        rope_parameters={"rope_theta": 1e4},
        method="aha",
        attention_backend="torch",
    )
    return L2AConfig(**{**fields, **kwargs})


def _inputs(dtype=torch.float64):
    torch.manual_seed(0)
    attn = AHAAttention(_config()).to(dtype)
    h = torch.randn(B, N, 32, dtype=dtype)
    angles = torch.arange(N, dtype=dtype)[None, :, None] * torch.linspace(0.1, 1.0, D, dtype=dtype)
    return attn, h, (angles.cos().expand(B, N, D), angles.sin().expand(B, N, D))


def _reference(attn, h, rope, g):
    """o_proj(local + g * (full - local)) with explicit masks in float64; g (B, N, Hq)."""
    q = attn.project_q(h, *rope)
    k, v = attn.project_kv(h, *rope)
    k, v = (t.repeat_interleave(HQ // HKV, dim=2) for t in (k, v))
    scores = torch.einsum("bnhd,bmhd->bhnm", q, k) / D**0.5
    i, j = torch.arange(N)[:, None], torch.arange(N)[None, :]
    full = scores.masked_fill(j > i, float("-inf")).softmax(-1)
    local = scores.masked_fill((j > i) | (j <= i - W), float("-inf")).softmax(-1)
    full, local = (torch.einsum("bhnm,bmhd->bnhd", p, v) for p in (full, local))
    return attn.o_proj((local + g[..., None] * (full - local)).flatten(-2))


def _decision(logits: torch.Tensor) -> RoutingDecision:
    soft = torch.sigmoid(logits / 0.1)
    hard = soft >= 0.5
    return RoutingDecision(soft=soft, hard=hard, gate=hard.to(soft.dtype) + soft - soft.detach())


@pytest.mark.parametrize("leakage", [False, True], ids=["routed-only", "leakage"])
def test_forward_is_the_hard_choice_and_router_gradient_is_the_interpolation_derivative(leakage):
    attn, h, rope = _inputs()
    logits = torch.randn(B, N, HQ, dtype=torch.float64, requires_grad=True)
    decision = _decision(logits)
    assert decision.hard.any() and not decision.hard.all()
    out = attn(h, rope, decision, leakage=leakage)
    g = decision.hard.to(torch.float64).requires_grad_(True)
    expected = _reference(attn, h, rope, g)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)
    upstream = torch.randn_like(out)
    (soft_grad,) = torch.autograd.grad(out, decision.soft, upstream, retain_graph=True)
    (g_grad,) = torch.autograd.grad(expected, g, upstream)
    routed = decision.hard
    torch.testing.assert_close(soft_grad[routed], g_grad[routed], atol=1e-12, rtol=0)
    if leakage:  # full attention known everywhere: local heads get their gradient too
        torch.testing.assert_close(soft_grad[~routed], g_grad[~routed], atol=1e-12, rtol=0)
        assert g_grad[~routed].abs().max() > 1e-6
    else:  # full attention never ran for local heads: no signal
        assert soft_grad[~routed].abs().max() == 0


def test_projection_gradients_follow_the_taken_branch():
    attn, h, rope = _inputs()
    decision = _decision(torch.randn(B, N, HQ, dtype=torch.float64))
    h1 = h.clone().requires_grad_(True)
    h2 = h.clone().requires_grad_(True)
    upstream = torch.randn(B, N, 32, dtype=torch.float64)
    (got,) = torch.autograd.grad(attn(h1, rope, decision, leakage=True), h1, upstream)
    (expected,) = torch.autograd.grad(_reference(attn, h2, rope, decision.hard.double()), h2, upstream)
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)


def test_training_forward_equals_eval_forward_bit_for_bit():
    attn, h, rope = _inputs(torch.float32)
    logits = torch.randn(B, N, HQ, requires_grad=True)
    train_out = attn(h, rope, _decision(logits), leakage=True)
    with torch.no_grad():
        plain = _decision(logits.detach())
        eval_out = attn(h, rope, RoutingDecision(plain.soft, plain.hard, plain.hard.float()))
    torch.testing.assert_close(train_out, eval_out, atol=0, rtol=0)


def test_head_router_scatters_routed_heads_and_starts_on_full_attention():
    router = HeadRouter(16, 4, [1, 3])
    decision = router(torch.randn(2, 5, 16))
    assert decision.hard.shape == (2, 5, 4)
    assert decision.hard[..., [1, 3]].all() and not decision.hard[..., [0, 2]].any()
    assert (decision.soft[..., [0, 2]] == 0).all()
    with torch.no_grad():
        router.weight.normal_()
    forced = router(torch.randn(2, 5, 16), "all")
    assert forced.hard[..., [1, 3]].all() and not forced.hard[..., [0, 2]].any()
