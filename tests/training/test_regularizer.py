"""The router regulariser λ·Σ_t soft_t² and its gradient through the straight-through router, by hand."""

from __future__ import annotations

import pytest
import torch

from l2a.layers import Router
from l2a.training import LoggingConfig, OptimConfig, RouterConfig, TrainConfig, train


def test_router_ste_gradient_by_hand():
    tau, lam = 0.1, 0.3
    router = Router(3, temperature=tau).double().train()
    with torch.no_grad():
        router.weight.copy_(torch.tensor([[0.2, -0.1, 0.05]], dtype=torch.float64))
    h = torch.tensor([[[1.0, 0.5, -1.0], [-0.3, 2.0, 0.4]]], dtype=torch.float64)  # (B=1, N=2, hidden=3)
    c = torch.tensor([[1.5, -0.7]], dtype=torch.float64)  # dL/dgate of a stand-in downstream loss
    decision = router(h)  # the router evaluates its sigmoid in float32: tolerances are float32's
    loss = (decision.gate * c).sum() + lam * decision.soft.square().sum()
    loss.backward()

    soft = torch.sigmoid(h @ torch.tensor([0.2, -0.1, 0.05], dtype=torch.float64) / tau)  # (1, 2)
    assert torch.equal(decision.gate, (soft >= 0.5).double())  # forward value: the hard decision
    dsoft = soft * (1 - soft) / tau
    expected = ((c + 2 * lam * soft) * dsoft)[..., None].mul(h).sum((0, 1))
    torch.testing.assert_close(router.weight.grad[0], expected, rtol=1e-5, atol=1e-6)


def test_model_regulariser_and_gradient_by_hand(make_l2a):
    lam = 0.25
    model = make_l2a(global_layers=[1]).train()
    router = model.model.layers[1].router
    captured = {}
    router.register_forward_pre_hook(lambda module, args: captured.setdefault("g", args[0].detach()))
    ids = torch.randint(0, 256, (2, 12))
    out = model(input_ids=ids, labels=ids)

    g = captured["g"]  # (B, N, hidden): the router input
    soft = torch.sigmoid((g @ router.weight.detach()[0]) / model.config.router_temperature)  # (B, N)
    expected = soft.square().sum(-1).mean()  # Σ_t soft² per sequence, mean over the batch (one global layer)
    torch.testing.assert_close(out.router_regularizer, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.router_fraction, (soft >= 0.5).float().mean().reshape(1))

    (lam * out.router_regularizer).backward()
    dsoft = soft * (1 - soft) / model.config.router_temperature
    grad = lam * (2 * soft * dsoft)[..., None].mul(g).sum(1).mean(0)
    torch.testing.assert_close(router.weight.grad[0], grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("lam", [0.0, 0.01], ids=["lambda0", "lambda0.01"])
def test_regulariser_in_the_loop_switches_routing_off(make_l2a, tmp_path, lam):
    # One repeated token: every position has the same router input, so λ > 0 can switch all of them off.
    model = make_l2a()
    routers = [model.model.layers[i].router for i in model.config.global_layers]
    seen: list[list[tuple[torch.Tensor, torch.Tensor]]] = []  # per forward, per router: (input, weight)
    logits: list[torch.Tensor] = []

    def capture(module, args):
        if module is routers[0]:
            seen.append([])
        seen[-1].append((args[0].detach().clone(), module.weight.detach().clone()))

    for router in routers:
        router.register_forward_pre_hook(capture)
    # the loop may fuse the LM loss with the head (no logits): rebuild logits from the final hidden states
    head = model.lm_head.weight.detach().double()  # frozen here (trainable=["router"])
    model.model.register_forward_hook(
        lambda module, args, out: logits.append(out.last_hidden_state.detach().double() @ head.T)
    )
    data = [{"input_ids": torch.full((1, 32), 65)} for _ in range(6)]
    config = TrainConfig(
        output_dir=str(tmp_path),
        device="cpu",
        steps=6,
        trainable=["router"],
        optim=OptimConfig(lr=1e-2, grad_clip=None),
        router=RouterConfig(regularizer_weight=lam, regularizer_schedule="constant", leakage_probability=0.0),
        logging=LoggingConfig(every=1, progress_bar=False, jsonl=False),
        checkpoint={"save_final": False},
    )
    history = train(model, None, config, data=data).history
    assert len(history) == len(seen) == len(logits) == 6

    tau = model.config.router_temperature
    for record, inputs, step_logits, batch in zip(history, seen, logits, data):
        # expected values from the captured router inputs / weights and the logits, not from the loop's fields
        penalties = []
        for h, weight in inputs:
            soft = torch.sigmoid(h.double() @ weight.double()[0] / tau)  # (B, N)
            penalties.append(soft.square().sum(-1).mean())
        reg = torch.stack(penalties).mean().item()
        ids = batch["input_ids"]
        lm = torch.nn.functional.cross_entropy(step_logits[0, :-1].double(), ids[0, 1:]).item()
        assert record["router_regularizer"] == pytest.approx(reg, rel=1e-5)
        assert record["lm_loss"] == pytest.approx(lm, rel=1e-5)
        assert record["lambda"] == lam
        assert record["loss"] == pytest.approx(lm + lam * reg, rel=1e-5)
    assert history[0]["sparsity"] < 1.0
    if lam == 0:
        assert history[-1]["sparsity"] < 1.0
    else:
        assert history[-1]["sparsity"] == 1.0 and history[-1]["router_regularizer"] < 1e-3
