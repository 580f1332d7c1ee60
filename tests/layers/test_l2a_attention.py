"""Local and global attention branches and the L2A decoder layer against float64 dense references."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from l2a.layers import GlobalAttention, L2ADecoderLayer, LocalAttention

B, N, HIDDEN, HQ, HKV, D = 2, 12, 32, 4, 2, 8


def _config(**overrides):
    cfg = dict(
        hidden_size=HIDDEN,
        num_attention_heads=HQ,
        num_key_value_heads=HKV,
        head_dim=D,
        attention_bias=True,
        attention_output_bias=True,
        qk_norm=False,
        rms_norm_eps=1e-6,
        attention_backend="torch",
        sliding_window=4,
        intermediate_size=64,
        hidden_act="silu",
        mlp_bias=False,
        force_route=None,
        global_layers=[0],
        router_temperature=0.1,
        router_threshold=0.5,
        router_logit_offset=0.0,
    )
    cfg.update(overrides)
    return SimpleNamespace(**cfg)


def _rope(n: int):
    inv_freq = 1.0 / (10000 ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    freqs = torch.arange(n, dtype=torch.float64)[:, None] * inv_freq
    emb = torch.cat([freqs, freqs], -1).expand(B, n, D)
    return emb.cos(), emb.sin()


def _randomize(module):
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.3)
    return module.double()


def _dense_reference(attn, h, cos, sin, window=None):
    """HF-style attention in (B, H, N, D) layout with SDPA and an explicit mask: independent of l2a.ops."""
    q = attn.q_proj(h).view(B, N, HQ, D)
    k = attn.k_proj(h).view(B, N, HKV, D)
    v = attn.v_proj(h).view(B, N, HKV, D)
    if attn.q_norm is not None:
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    k, v = k.repeat_interleave(HQ // HKV, 1), v.repeat_interleave(HQ // HKV, 1)
    i = torch.arange(N)
    allowed = i[None, :] <= i[:, None]
    if window is not None:
        allowed &= i[:, None] - i[None, :] < window
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed).transpose(1, 2)  # (B, N, HQ, D)


@pytest.mark.parametrize("qk_norm", [False, True], ids=["qwen2-style", "qwen3-style"])
def test_global_branch_all_active_equals_dense_causal(qk_norm):
    attn = _randomize(GlobalAttention(_config(qk_norm=qk_norm)))
    h = torch.randn(B, N, HIDDEN, dtype=torch.float64)
    cos, sin = _rope(N)
    ones = torch.ones(B, N, dtype=torch.bool)
    got = attn(h, (cos, sin), ones, ones.double())
    expected = attn.o_proj(_dense_reference(attn, h, cos, sin).flatten(-2))
    torch.testing.assert_close(got, expected)


def test_global_branch_routed_rows_only():
    attn = _randomize(GlobalAttention(_config()))
    h = torch.randn(B, N, HIDDEN, dtype=torch.float64)
    cos, sin = _rope(N)
    active = torch.rand(B, N) < 0.5
    got = attn(h, (cos, sin), active, active.double())
    dense = attn.o_proj(_dense_reference(attn, h, cos, sin).flatten(-2))
    torch.testing.assert_close(got[active], dense[active])
    assert torch.count_nonzero(got[~active]) == 0


def test_global_branch_head_wise_gate():
    attn = _randomize(GlobalAttention(_config()))
    h = torch.randn(B, N, HIDDEN, dtype=torch.float64)
    cos, sin = _rope(N)
    active = torch.rand(B, N, HQ) < 0.5
    got = attn(h, (cos, sin), active, active.double())
    heads = _dense_reference(attn, h, cos, sin) * active[..., None]
    # a token with every head off adds nothing (no o_proj bias either)
    expected = torch.where(active.any(-1, keepdim=True), attn.o_proj(heads.flatten(-2)), 0.0)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("window", [1, 3, 20])
def test_local_branch_equals_windowed_dense(window):
    attn = _randomize(LocalAttention(_config(sliding_window=window, qk_norm=True)))
    h = torch.randn(B, N, HIDDEN, dtype=torch.float64)
    cos, sin = _rope(N)
    expected = attn.o_proj(_dense_reference(attn, h, cos, sin, window=window).flatten(-2))
    torch.testing.assert_close(attn(h, (cos, sin)), expected)


def _rms_norm(x, weight, eps=1e-6):
    return weight * x / (x.square().mean(-1, keepdim=True) + eps).sqrt()


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train-ste"])
def test_decoder_layer_against_hand_written_block(training):
    """The block of method.md written out from the layer's weights: RMSNorms, SDPA with explicit masks,
    the router's thresholded sigmoid and the gated MLP; nothing of the layer's own forward is reused."""
    layer = _randomize(L2ADecoderLayer(_config(), 0)).train(training)
    x = torch.randn(B, N, HIDDEN, dtype=torch.float64)
    pe = _rope(N)
    out, soft, hard = layer(x, pe)

    eps = 1e-6
    local, glob = layer.local_attn, layer.global_attn
    n1 = _rms_norm(x, layer.input_layernorm.weight, eps)
    s = x + local.o_proj(_dense_reference(local, n1, *pe, window=4).flatten(-2))
    g = _rms_norm(s, layer.global_layernorm.weight, eps)
    logits = g @ layer.router.weight[0]  # (B, N)
    expected_soft = torch.sigmoid(logits / 0.1)
    routed = logits >= 0  # sigmoid(logit / τ) >= 0.5
    s = s + routed[..., None] * glob.o_proj(_dense_reference(glob, g, *pe).flatten(-2))
    m = layer.mlp
    n2 = _rms_norm(s, layer.post_attention_layernorm.weight, eps)
    expected = s + m.down_proj(F.silu(m.gate_proj(n2)) * m.up_proj(n2))
    # the layer's norms and router compute in float32 (as HF's): float32 tolerances
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(soft.double(), expected_soft, rtol=1e-5, atol=1e-6)
    assert torch.equal(hard, routed) and 0 < hard.sum() < hard.numel()


def test_local_only_layer_and_drop_global_branch():
    local_only = L2ADecoderLayer(_config(global_layers=[]), 0)
    assert not local_only.has_global and not hasattr(local_only, "router")
    layer = L2ADecoderLayer(_config(), 0)
    layer.drop_global_branch()
    assert not layer.has_global
    assert not any(name.startswith(("router", "global")) for name, _ in layer.named_parameters())
    _, soft, hard = layer(torch.randn(B, N, HIDDEN), tuple(t.float() for t in _rope(N)))
    assert soft is None and hard is None
