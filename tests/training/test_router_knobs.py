"""Recipe knobs of `l2a train`: router-only warm-up steps, the routers' learning-rate scale and
routing-collapse detection."""

import pytest
import torch

from l2a.training import TrainConfig, train
from l2a.training.metrics import routing_collapse


def _config(tmp_path, **router):
    return TrainConfig(
        output_dir=str(tmp_path),
        steps=4,
        optim={"lr": 1e-2, "warmup_steps": 0},
        router={"regularizer_weight": 1e-2, "leakage_probability": 0.0, **router},
        logging={"every": 1, "progress_bar": False, "jsonl": False},
        checkpoint={"save_final": False},
        precision="fp32",
        device="cpu",
    )


def _snapshot(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_router_only_steps_update_only_the_router(make_l2a, make_batches, tmp_path):
    model = make_l2a()
    start = _snapshot(model)
    train(model, None, _config(tmp_path, router_only_steps=2), data=make_batches(2))
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, start[n])}
    assert moved and all("router" in n for n in moved)
    # after the warm-up every trainable group moves
    after = _snapshot(model)
    train(model, None, _config(tmp_path / "b", router_only_steps=2), data=make_batches(4))
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, after[n])}
    assert any("local_attn" in n for n in moved) and any("router" in n for n in moved)


def test_router_only_steps_need_a_router(make_batches, tmp_path):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(
        vocab_size=259,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
    )
    config = _config(tmp_path, router_only_steps=1)
    config.trainable = ["*"]
    with pytest.raises(ValueError, match="router_only_steps > 0 needs trainable router parameters"):
        train(Qwen3ForCausalLM(cfg), None, config, data=make_batches(4, packed=False))


@pytest.mark.parametrize("scale", [1.0, 0.1])
def test_router_lr_scale_sets_the_routers_step(make_l2a, make_batches, tmp_path, scale):
    """Adam's first step moves every weight with a non-zero gradient by lr (m / sqrt(v) = sign(g)): the
    routers' weights by lr * scale, every other trainable weight by lr."""
    model = make_l2a()
    start = _snapshot(model)
    config = _config(tmp_path, regularizer_weight=0.0)
    config.steps = 1
    config.optim.lr_schedule = "constant"
    config.optim.router_lr_scale = scale
    train(model, None, config, data=make_batches(1))
    steps = {n: (p.detach() - start[n]).abs().max().item() for n, p in model.named_parameters()}
    routers = [v for n, v in steps.items() if "router" in n]
    others = [v for n, v in steps.items() if "router" not in n and v > 0]
    assert routers and others
    assert all(v == pytest.approx(1e-2 * scale, rel=1e-3) for v in routers), routers
    assert all(v == pytest.approx(1e-2, rel=1e-3) for v in others)


def test_router_lr_scale_validated():
    with pytest.raises(ValueError, match="optim.router_lr_scale must be > 0, got 0"):
        TrainConfig(optim={"router_lr_scale": 0})


def test_router_only_steps_validated():
    with pytest.raises(ValueError, match="router.router_only_steps=5 exceeds steps=4"):
        TrainConfig(steps=4, router={"router_only_steps": 5})


@pytest.mark.parametrize(
    ("sparsity", "at_full", "expected"),
    [
        ([1.0, 1.0], False, "no_token_routed"),
        ([1.0, 0.9], True, None),
        ([0.0, 0.0], False, None),  # the start: zero-initialised routers route everything
        ([0.0, 0.0], True, "every_token_routed"),
        ([0.0, 0.5], True, None),
        ([], True, None),
        ([0.9995, 0.5], False, "layers_off"),  # switched off while λ ramps: the LM loss did it
        ([0.998, 0.5], False, None),
        ([1.0, 0.9], False, "layers_off"),
    ],
    ids=[
        "none-routed",
        "one-layer-alive",
        "start",
        "all-routed-at-full-lambda",
        "mixed",
        "no-layers",
        "layer-off-during-ramp",
        "layer-nearly-off",
        "layer-off-before-full-lambda",
    ],
)
def test_routing_collapse_kinds(sparsity, at_full, expected):
    assert routing_collapse(sparsity, at_full) == expected


def test_collapse_warns_or_stops(make_l2a, make_batches, tmp_path):
    model = make_l2a()
    with torch.no_grad():  # routers that route nothing: every token below the threshold
        for name, p in model.named_parameters():
            if "router" in name:
                p.zero_()
        for layer in model.model.layers:
            layer.router.threshold = 0.99
    with pytest.warns(RuntimeWarning, match="routing collapsed at step 1: no_token_routed"):
        result = train(model, None, _config(tmp_path, collapse="warn"), data=make_batches(4))
    assert result.history[0]["routing_collapse"] == "no_token_routed"
    with pytest.raises(RuntimeError, match="no_token_routed"):
        train(model, None, _config(tmp_path / "stop", collapse="stop"), data=make_batches(4))
    quiet = train(model, None, _config(tmp_path / "quiet", collapse="ignore"), data=make_batches(4))
    assert "routing_collapse" not in quiet.history[0]


def test_a_layer_switched_off_during_the_ramp_is_named(make_l2a, make_batches, tmp_path):
    model = make_l2a()
    layers = model.model.layers
    assert len(layers) >= 2
    layers[1].router.offset = -1.0  # zero weights: soft = sigmoid(-10) < 0.5, layer 1 routes no token
    config = _config(tmp_path, collapse="warn")
    config.router.regularizer_weight = 1e-3
    config.router.regularizer_ramp_steps = 100  # λ far below its final value at the first log
    with pytest.warns(RuntimeWarning, match=r"layers_off \(layers \[1\] route no token"):
        result = train(model, None, config, data=make_batches(4))
    assert result.history[0]["routing_collapse"] == "layers_off"
