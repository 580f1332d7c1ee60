"""GlobalAttention projects and attends only for routed tokens: same output and gradients as the dense
formulation (every token projected, attention masked, output times the gate), and exactly 0 (no o_proj bias,
no gradient to the gate) for tokens with no routed head."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from l2a.layers import GlobalAttention

HIDDEN, HQ, HKV, D = 32, 4, 2, 8


def _config(qk_norm: bool) -> SimpleNamespace:
    return SimpleNamespace(
        hidden_size=HIDDEN,
        num_attention_heads=HQ,
        num_key_value_heads=HKV,
        head_dim=D,
        attention_bias=True,
        attention_output_bias=True,
        qk_norm=qk_norm,
        rms_norm_eps=1e-6,
        attention_backend="torch",
    )


def _rope(b: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (10000 ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    freqs = torch.arange(n, dtype=torch.float64)[:, None] * inv_freq
    emb = torch.cat([freqs, freqs], -1).expand(b, n, D)
    return emb.cos(), emb.sin()


def _rotate(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * cos[:, :, None] + rotated * sin[:, :, None]


def _rms(x, weight, eps=1e-6):
    return weight * x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)


def _dense_then_mask(attn, h, cos, sin, active, gate):
    """Every token projected, dense causal attention (SDPA with an explicit mask), output times the gate;
    tokens with no routed head set to 0 afterwards."""
    b, n, _ = h.shape
    q = attn.q_proj(h).view(b, n, HQ, D)
    k = attn.k_proj(h).view(b, n, HKV, D)
    v = attn.v_proj(h).view(b, n, HKV, D)
    if attn.q_norm is not None:
        q, k = _rms(q, attn.q_norm.weight), _rms(k, attn.k_norm.weight)
    q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
    k, v = k.repeat_interleave(HQ // HKV, 2), v.repeat_interleave(HQ // HKV, 2)
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    heads = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=causal
    ).transpose(1, 2)
    if gate.dim() == 3:
        heads = heads * active[..., None]  # heads that are off attend to nothing
        out = attn.o_proj((heads * gate[..., None]).flatten(-2))
        routed = active.any(-1)
    else:
        out = attn.o_proj(heads.flatten(-2)) * gate[..., None]
        routed = active
    return out * routed[..., None]


def _case(n: int, head_wise: bool, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    b = 2
    h = torch.randn(b, n, HIDDEN, dtype=torch.float64, generator=gen)
    shape = (b, n, HQ) if head_wise else (b, n)
    # few routed tokens; head-wise: some tokens with every head off
    active = torch.rand(shape, generator=gen) < (0.4 if head_wise else 0.2)
    soft = torch.rand(shape, dtype=torch.float64, generator=gen).requires_grad_()
    return h, active, soft


@pytest.mark.parametrize("head_wise", [False, True], ids=["token-wise", "head-wise"])
@pytest.mark.parametrize("qk_norm", [False, True], ids=["qwen2-style", "qwen3-style"])
@pytest.mark.parametrize("n", [7, 40], ids=["N7-masked", "N40-compact"])
def test_routed_rows_only_equals_dense_then_mask(n, qk_norm, head_wise):
    assert (n > GlobalAttention.COMPACT_MIN_TOKENS) == (n == 40)
    torch.manual_seed(0)
    attn = GlobalAttention(_config(qk_norm)).double()
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0, 0.3)
    h, active, soft = _case(n, head_wise)
    cos, sin = _rope(*h.shape[:2])
    gate = active.double() + soft - soft.detach()  # the router's straight-through gate

    got = attn(h, (cos, sin), active, gate)
    routed = active.any(-1) if head_wise else active
    assert 0 < routed.sum() < routed.numel()
    assert torch.equal(got[~routed], torch.zeros_like(got[~routed]))  # not even the o_proj bias
    weights = torch.randn_like(got)
    grads = torch.autograd.grad((got * weights).sum(), [soft, *attn.parameters()])

    expected = _dense_then_mask(attn, h, cos, sin, active, gate)
    expected_grads = torch.autograd.grad((expected * weights).sum(), [soft, *attn.parameters()])
    # RMSNorm computes in float32 (as HF's), hence float32-level tolerances
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    for g, e in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
    # the router's gradient reaches routed tokens only
    unrouted_soft_grad = grads[0][~routed] if not head_wise else grads[0][~routed].flatten()
    assert torch.equal(unrouted_soft_grad, torch.zeros_like(unrouted_soft_grad))
    assert grads[0][routed].abs().sum() > 0


def test_compact_path_projects_routed_tokens_only():
    attn = GlobalAttention(_config(qk_norm=False)).double()
    h, active, soft = _case(40, head_wise=False)
    seen = []
    for proj in (attn.q_proj, attn.o_proj):
        proj.register_forward_hook(lambda _m, inputs, _out: seen.append(inputs[0].shape[:-1].numel()))
    attn(h, _rope(*h.shape[:2]), active, active.double())
    assert seen == [int(active.sum())] * 2
