"""force_route="random": each token routed independently with probability random_route_fraction."""

import pytest
import torch

import l2a
from l2a.layers import Router


@pytest.mark.parametrize("fraction", [0.0, 0.2, 0.5, 1.0], ids=lambda f: f"p{f}")
def test_router_random_fraction_and_constant_gate(fraction):
    router = Router(16).train()
    with torch.no_grad():
        router.weight.normal_()
    h = torch.randn(8, 2000, 16, requires_grad=True)
    torch.manual_seed(0)
    decision = router(h, "random", fraction)
    rate = decision.hard.float().mean().item()
    assert abs(rate - fraction) < 0.01  # 16000 Bernoulli draws: std <= 0.004
    torch.testing.assert_close(decision.gate, decision.hard.float(), rtol=0, atol=0)
    assert not decision.gate.requires_grad  # no straight-through gradient for a forced route
    # independent of the router's own logits
    assert not torch.equal(decision.hard, decision.soft >= 0.5) or fraction in (0.0, 1.0)


def test_router_random_draws_follow_the_seed():
    router = Router(8)
    h = torch.randn(2, 64, 8)
    torch.manual_seed(3)
    first = router(h, "random", 0.3).hard
    torch.manual_seed(3)
    assert torch.equal(first, router(h, "random", 0.3).hard)
    assert not torch.equal(first, router(h, "random", 0.3).hard)


@pytest.mark.parametrize(
    ("force", "fraction"),
    [("random", None), (None, 0.3), ("all", 0.3)],
    ids=["missing", "stray", "stray-all"],
)
def test_router_refuses_inconsistent_random_arguments(force, fraction):
    with pytest.raises(ValueError, match="random_fraction is required with force='random' and only"):
        Router(8)(torch.randn(1, 4, 8), force, fraction)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"force_route": "random"}, "random_route_fraction is set exactly when force_route='random'"),
        ({"random_route_fraction": 0.5}, "random_route_fraction is set exactly when force_route='random'"),
        ({"force_route": "random", "random_route_fraction": 1.5}, "must lie in \\[0, 1\\]"),
    ],
    ids=["missing-fraction", "fraction-without-random", "out-of-range"],
)
def test_config_validates_random_routing(config, message):
    with pytest.raises(ValueError, match=message):
        l2a.L2AConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, **config)
