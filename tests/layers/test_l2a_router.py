"""Router: zero init, tempered sigmoid and threshold, straight-through gate, forced modes, head-wise shape."""

from __future__ import annotations

import pytest
import torch

from l2a.layers import Router


def test_zero_init_routes_every_token():
    router = Router(16)
    decision = router(torch.randn(2, 5, 16))
    assert decision.hard.shape == (2, 5) and decision.hard.all()
    torch.testing.assert_close(decision.soft, torch.full((2, 5), 0.5))


@pytest.mark.parametrize("temperature,threshold", [(0.1, 0.5), (1.0, 0.3), (0.5, 0.8)])
def test_soft_and_hard_decision(temperature, threshold):
    router = Router(16, temperature=temperature, threshold=threshold)
    with torch.no_grad():
        router.weight.normal_()
    h = torch.randn(3, 7, 16, dtype=torch.float64)
    decision = router.double()(h)
    soft = torch.sigmoid((h @ router.weight.T).squeeze(-1) / temperature)
    torch.testing.assert_close(decision.soft, soft.float())
    assert torch.equal(decision.hard, decision.soft >= threshold)
    assert 0 < decision.hard.sum() < decision.hard.numel()


def test_straight_through_gate_in_training():
    router = Router(16).train()
    with torch.no_grad():
        router.weight.normal_(std=0.05)
    h = torch.randn(2, 9, 16)
    decision = router(h)
    assert torch.equal(decision.gate, decision.hard.float())
    coeff = torch.randn(2, 9)
    (grad_gate,) = torch.autograd.grad((decision.gate * coeff).sum(), router.weight)
    (grad_soft,) = torch.autograd.grad((router(h).soft * coeff).sum(), router.weight)
    torch.testing.assert_close(grad_gate, grad_soft)


def test_inference_gate_is_the_hard_decision():
    router = Router(16).eval()
    decision = router(torch.randn(2, 4, 16))
    assert not decision.gate.requires_grad
    assert torch.equal(decision.gate, decision.hard.float())


@pytest.mark.parametrize("force,expected", [("all", True), ("none", False)])
def test_forced_routing(force, expected):
    router = Router(16).train()
    with torch.no_grad():
        router.weight.normal_()
    decision = router(torch.randn(2, 6, 16), force)
    assert bool(decision.hard.all()) is expected and bool(decision.hard.any()) is expected
    assert not decision.gate.requires_grad


def test_head_wise_router_shape():
    decision = Router(16, out_features=4)(torch.randn(2, 5, 16))
    assert decision.soft.shape == decision.hard.shape == decision.gate.shape == (2, 5, 4)


def test_bad_arguments():
    with pytest.raises(ValueError, match="temperature"):
        Router(8, temperature=0.0)
    with pytest.raises(ValueError, match="threshold"):
        Router(8, threshold=1.0)
    with pytest.raises(ValueError, match="force"):
        Router(8)(torch.randn(1, 2, 8), "some")


@pytest.mark.parametrize("offset", [0.3, -0.2])
def test_logit_offset_shifts_every_logit(offset):
    """soft = sigmoid((w·h + offset) / T): at zero weights sigmoid(offset / T) (0.95 for 0.3 at T = 0.1);
    a negative offset starts every token local."""
    router = Router(16, temperature=0.1, offset=offset).train()
    h = torch.randn(2, 5, 16)
    decision = router(h)
    expected = 1.0 / (1.0 + torch.exp(torch.tensor(-offset / 0.1)))
    torch.testing.assert_close(decision.soft, torch.full((2, 5), float(expected)))
    assert bool(decision.hard.all()) is (offset > 0) and bool(decision.hard.any()) is (offset > 0)
    with torch.no_grad():
        router.weight.normal_()
    h64 = torch.randn(3, 7, 16, dtype=torch.float64)
    soft = torch.sigmoid(((h64 @ router.weight.double().T).squeeze(-1) + offset) / 0.1)
    torch.testing.assert_close(router.double()(h64).soft, soft.float())


def test_logit_offset_must_be_finite():
    with pytest.raises(ValueError, match="offset must be a finite number, got nan"):
        Router(16, offset=float("nan"))
