"""Conversion: the L2A model reproduces HF's own base models when global attention is off."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import l2a
from l2a.models import L2ACache, convert_state_dict, l2a_config_from_base

ARCHS = ("qwen2", "qwen3", "llama")


@pytest.mark.parametrize("arch", ARCHS)
def test_full_window_no_routing_equals_base(arch, make_base):
    base = make_base(arch, **({"attention_bias": True} if arch == "llama" else {}))
    model = l2a.convert_model(base, sliding_window=64, force_route="none")
    ids = torch.randint(0, 300, (2, 24))
    with torch.no_grad():
        expected = base(ids).logits
        got = model(ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("window", [1, 5])
def test_small_window_no_routing_equals_hf_sliding_window(arch, window, make_base):
    """Reference: the same weights in HF's model with its own sliding-window attention enabled."""
    base = make_base(arch)
    reference = make_base(arch, window=window)
    reference.load_state_dict(base.state_dict())
    model = l2a.convert_model(base, sliding_window=window, force_route="none")
    ids = torch.randint(0, 300, (2, 24))
    with torch.no_grad():
        full = base(ids).logits
        expected = reference(ids).logits
        got = model(ids).logits
    assert (expected - full).abs().max() > 1e-3, "the window must matter for this test to mean anything"
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_state_dict_mapping(arch, make_base):
    base = make_base(arch)
    model = l2a.convert_model(base, sliding_window=4, global_layers=[1])
    state, ref = model.state_dict(), base.state_dict()
    for i in range(2):
        for name in ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight"):
            torch.testing.assert_close(
                state[f"model.layers.{i}.local_attn.{name}"], ref[f"model.layers.{i}.self_attn.{name}"]
            )
    torch.testing.assert_close(
        state["model.layers.1.global_attn.q_proj.weight"], ref["model.layers.1.self_attn.q_proj.weight"]
    )
    torch.testing.assert_close(
        state["model.layers.1.global_layernorm.weight"], ref["model.layers.1.input_layernorm.weight"]
    )
    assert torch.count_nonzero(state["model.layers.1.router.weight"]) == 0
    assert not any(
        k.startswith("model.layers.0.global") or k.startswith("model.layers.0.router") for k in state
    )
    # separate tensors: training one branch must not move the other or the base
    assert (
        state["model.layers.1.global_attn.q_proj.weight"].data_ptr()
        != state["model.layers.1.local_attn.q_proj.weight"].data_ptr()
    )
    assert (
        model.model.layers[1].local_attn.q_proj.weight.data_ptr()
        != base.model.layers[1].self_attn.q_proj.weight.data_ptr()
    )
    if arch == "qwen2":
        assert (
            model.config.attention_bias
            and not model.config.attention_output_bias
            and not model.config.qk_norm
        )
    if arch == "qwen3":
        assert model.config.qk_norm and "model.layers.1.global_attn.q_norm.weight" in state


def test_tied_embeddings_honoured(make_base):
    base = make_base("qwen2", tie_word_embeddings=True)
    model = l2a.convert_model(base, sliding_window=64, force_route="none")
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    ids = torch.randint(0, 300, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, base(ids).logits, atol=1e-5, rtol=0)


def test_rope_overrides_and_zero_router_routes_everything(make_base):
    base = make_base("qwen3")
    model = l2a.convert_model(base, sliding_window=4, rope_theta=5e6, max_position_embeddings=4096)
    assert model.config.rope_parameters["rope_theta"] == 5e6
    assert model.config.max_position_embeddings == 4096
    expected_inv_freq = 1.0 / 5e6 ** (torch.arange(0, 16, 2).float() / 16)
    torch.testing.assert_close(model.model.rotary_emb.inv_freq, expected_inv_freq)
    out = model(torch.randint(0, 300, (1, 10)))
    torch.testing.assert_close(out.router_fraction, torch.ones(2))


def test_rope_scaling_carried_from_base(make_base):
    base = make_base("llama", rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})
    model = l2a.convert_model(base, sliding_window=64, force_route="none")
    assert model.config.rope_parameters["rope_type"] == "linear"
    ids = torch.randint(0, 300, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, base(ids).logits, atol=1e-5, rtol=0)


def test_unsupported_architecture_is_named():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="unsupported base architecture 'gpt2'"):
        l2a.convert_model(gpt2, sliding_window=4)


@pytest.mark.parametrize("window", [0, -3])
def test_nonpositive_window_rejected(window, make_base):
    with pytest.raises(ValueError, match="sliding_window must be a positive int"):
        l2a.convert_model(make_base("qwen2"), sliding_window=window)


def test_global_layers_out_of_range_rejected(make_base):
    with pytest.raises(ValueError, match=r"global_layers \[2\] out of range"):
        l2a_config_from_base(make_base("qwen2").config, sliding_window=4, global_layers=[0, 2])


def test_convert_state_dict_is_pure(make_base):
    base = make_base("qwen2")
    config = l2a_config_from_base(base.config, sliding_window=4)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    mapped = convert_state_dict(base.state_dict(), config)
    mapped["model.layers.0.local_attn.q_proj.weight"].add_(1.0)
    for k, v in base.state_dict().items():
        torch.testing.assert_close(v, before[k])
    assert isinstance(L2ACache(config), L2ACache)
