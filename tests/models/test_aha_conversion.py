"""AHA conversion: force_route="all" is the base model, "none" is HF's own sliding-window attention."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import l2a
from l2a.models.aha_cache import AHACache

ARCHS = ("qwen2", "qwen3", "llama")


def _ids(n: int = 24) -> torch.Tensor:
    return torch.randint(0, 300, (2, n))


@pytest.mark.parametrize("arch", ARCHS)
def test_all_heads_full_equals_base(arch, make_base):
    base = make_base(arch, **({"attention_bias": True} if arch == "llama" else {}))
    model = l2a.convert_model(base, sliding_window=4, method="aha", force_route="all")
    ids = _ids()
    with torch.no_grad():
        expected = base(ids).logits
        got = model(ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_zero_router_routes_every_head_and_equals_base(arch, make_base):
    base = make_base(arch)
    model = l2a.convert_model(base, sliding_window=3, method="aha")
    ids = _ids()
    with torch.no_grad():
        out = model(ids)
        expected = base(ids).logits
    torch.testing.assert_close(out.logits, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.router_fraction, torch.ones(2))
    assert out.router_head_fraction.shape == (2, base.config.num_attention_heads)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("window", [1, 5])
def test_no_head_routed_equals_hf_sliding_window(arch, window, make_base):
    """Reference: the same weights in HF's model with its own sliding-window attention in every layer."""
    base = make_base(arch)
    reference = make_base(arch, window=window)
    reference.load_state_dict(base.state_dict())
    model = l2a.convert_model(base, sliding_window=window, method="aha", force_route="none")
    ids = _ids()
    with torch.no_grad():
        full = base(ids).logits
        expected = reference(ids).logits
        got = model(ids).logits
    assert (expected - full).abs().max() > 1e-3, "the window must matter for this test to mean anything"
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_mixed_routing_equals_masked_reference(make_base):
    """One layer, random per-(token, head) routing: the model's attention equals an independent float64
    masked softmax over full-causal or window keys per (token, head)."""
    base = make_base("qwen3", num_hidden_layers=1).double()
    model = l2a.convert_model(base, sliding_window=3, method="aha").eval()
    ids = _ids(20)
    decision = torch.rand(2, 20, base.config.num_attention_heads) < 0.5
    layer = model.model.layers[0]
    attn = base.model.layers[0].self_attn
    captured = {}

    def force(module, args, output):
        output.hard.copy_(decision)
        output.gate.copy_(decision.to(output.gate.dtype))

    def grab(module, args, output):
        captured["out"] = output

    layer.router.register_forward_hook(force)
    layer.self_attn.register_forward_hook(grab)
    with torch.no_grad():
        model(ids)
        # reference: HF's own q/k/v (with its q/k norms and rotary), an explicit mask, float64
        h = base.model.layers[0].input_layernorm(base.model.embed_tokens(ids))
        cos, sin = base.model.rotary_emb(h, torch.arange(20).unsqueeze(0))
        shape = (2, 20, -1, attn.head_dim)
        q = attn.q_norm(attn.q_proj(h).view(shape)).transpose(1, 2)
        k = attn.k_norm(attn.k_proj(h).view(shape)).transpose(1, 2)
        v = attn.v_proj(h).view(shape).transpose(1, 2)
        from transformers.models.qwen3.modeling_qwen3 import apply_rotary_pos_emb

        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
        i, j = torch.arange(20)[:, None], torch.arange(20)[None, :]
        causal, window = j <= i, (j <= i) & (j > i - 3)
        mask = torch.where(decision.permute(0, 2, 1)[..., None], causal, window)  # (B, Hq, N, N)
        scores = (q @ k.transpose(-1, -2)) / attn.head_dim**0.5
        probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
        expected = attn.o_proj((probs @ v).transpose(1, 2).flatten(-2))
    assert decision.any() and not decision.all()
    torch.testing.assert_close(captured["out"], expected, atol=1e-10, rtol=0)


def test_state_dict_keeps_base_names_and_adds_head_routers(make_base):
    base = make_base("qwen2")
    model = l2a.convert_model(base, sliding_window=4, method="aha", global_layers=[1])
    state, ref = model.state_dict(), base.state_dict()
    for key, tensor in ref.items():
        torch.testing.assert_close(state[key], tensor)
    assert state["model.layers.1.router.weight"].shape == (4, 64)
    assert torch.count_nonzero(state["model.layers.1.router.weight"]) == 0
    assert "model.layers.0.router.weight" not in state
    assert set(state) - set(ref) == {"model.layers.1.router.weight"}
    assert model.config.routed_heads == [[], [0, 1, 2, 3]]
    assert model.config.router_penalty == "l1"


def test_save_and_load_through_auto_classes(make_base, tmp_path):
    model = l2a.convert_model(make_base("llama"), sliding_window=4, method="aha")
    with torch.no_grad():
        model.model.layers[0].router.weight.normal_(0, 0.05)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.config.method == "aha" and type(loaded.model.layers[0]).__name__ == "AHADecoderLayer"
    ids = _ids()
    with torch.no_grad():
        a, b = model(ids), loaded(ids)
    torch.testing.assert_close(a.logits, b.logits, atol=0, rtol=0)
    assert isinstance(b.past_key_values if hasattr(b, "past_key_values") else b.cache, AHACache)


def test_routed_heads_checked():
    with pytest.raises(ValueError, match="routed_heads is an AHA field"):
        l2a.L2AConfig(
            num_hidden_layers=1,
            hidden_size=8,
            num_attention_heads=2,
            routed_heads=[[0]],
            rope_parameters={"rope_theta": 1e4},
        )
    with pytest.raises(ValueError, match=r"routed_heads\[0\] has heads \[5\]"):
        l2a.L2AConfig(
            num_hidden_layers=1,
            hidden_size=8,
            num_attention_heads=2,
            routed_heads=[[5]],
            method="aha",
            rope_parameters={"rope_theta": 1e4},
        )
