"""force_route="none" skips the global branch entirely in a cache-free forward (it is multiplied by 0)."""

import pytest
import torch
import transformers

import l2a
import l2a.layers.attention as attention_module


def _model():
    cfg = transformers.Qwen3Config(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
    )
    return l2a.convert_model(transformers.Qwen3ForCausalLM(cfg), sliding_window=4)


def test_force_none_never_calls_global_attention(monkeypatch):
    model = _model()
    model.config.force_route = "none"
    x = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        expected = model(input_ids=x, use_cache=False).logits

    def fail(*args, **kwargs):
        raise AssertionError("global attention ran under force_route='none'")

    monkeypatch.setattr(attention_module, "conditional_attention", fail)
    with torch.no_grad():
        out = model(input_ids=x, use_cache=False)
    torch.testing.assert_close(out.logits, expected, rtol=0, atol=0)
    assert torch.count_nonzero(out.router_fraction) == 0
    with pytest.raises(AssertionError, match="global attention ran"):
        model.config.force_route = None
        model(input_ids=x, use_cache=False)


def test_model_with_random_routing_routes_the_requested_fraction():
    model = _model().eval()
    model.config.force_route, model.config.random_route_fraction = "random", 0.25
    torch.manual_seed(0)
    with torch.no_grad():
        out = model(input_ids=torch.randint(0, 300, (4, 512)), use_cache=False)
    assert out.router_fraction.shape == (2,)
    assert torch.all((out.router_fraction - 0.25).abs() < 0.03)
    # a different fraction gives a different model output (the global branch really is gated)
    model.config.random_route_fraction = 1.0
    torch.manual_seed(0)
    with torch.no_grad():
        full = model(input_ids=torch.randint(0, 300, (4, 512)), use_cache=False)
    model.config.force_route, model.config.random_route_fraction = "all", None
    torch.manual_seed(0)
    with torch.no_grad():
        forced_all = model(input_ids=torch.randint(0, 300, (4, 512)), use_cache=False)
    torch.testing.assert_close(full.logits, forced_all.logits)
    assert not torch.allclose(full.logits, out.logits)
