"""The training loop: frozen groups, gradient accumulation, context extension, models without a router."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from l2a.training import (
    CheckpointConfig,
    LoggingConfig,
    OptimConfig,
    RouterConfig,
    TrainConfig,
    parameter_groups,
    set_trainable,
    train,
)
from l2a.training.checkpoint import load_trainer_state


def _config(tmp_path, **kwargs) -> TrainConfig:
    fields = dict(
        output_dir=str(tmp_path),
        device="cpu",  # deterministic comparisons; the same on GPU machines
        steps=3,
        optim=OptimConfig(lr=1e-2, warmup_steps=0),
        router=RouterConfig(regularizer_weight=1e-2, leakage_probability=0.5),
        logging=LoggingConfig(every=1, progress_bar=False),
        checkpoint=CheckpointConfig(save_final=False),
    )
    fields.update(kwargs)
    return TrainConfig(**fields)


def test_frozen_groups_stay_frozen(make_l2a, make_batches, tmp_path):
    model = make_l2a()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    groups = parameter_groups(model)
    config = _config(tmp_path, checkpoint=CheckpointConfig(save_final=True))
    result = train(model, None, config, data=make_batches(3))

    frozen = groups["mlp"] + groups["embeddings"] + groups["lm_head"]
    trained = groups["attention"] + groups["norms"] + groups["router"]
    assert frozen and trained and not groups["other"]
    params = dict(model.named_parameters())
    for name in frozen:
        assert not params[name].requires_grad and torch.equal(params[name], before[name]), name
    changed = [name for name in trained if not torch.equal(params[name], before[name])]
    assert set(changed) == set(trained)
    # the optimizer holds exactly the trainable tensors
    state = load_trainer_state(result.checkpoint)["optimizer"]
    assert sum(len(g["params"]) for g in state["param_groups"]) == len(trained)


def test_set_trainable_patterns_and_errors(make_l2a):
    model = make_l2a()
    names = set_trainable(model, ["model.layers.1.*", "router"])
    assert "model.layers.1.mlp.up_proj.weight" in names and "model.layers.0.router.weight" in names
    assert "model.layers.0.mlp.up_proj.weight" not in names
    with pytest.raises(ValueError, match="selects no parameter"):
        set_trainable(model, ["decoder.*"])


def test_gradient_accumulation_matches_one_big_batch(make_l2a, make_batches, tmp_path):
    rows = make_batches(6, packed=False, seq_len=24)
    for i, row in enumerate(rows):  # unequal token counts: the loss must be weighted by tokens, not rows
        row["labels"] = row["input_ids"].clone()
        row["labels"][:, : 3 * i] = -100
    stacked = [
        {k: torch.cat([rows[i][k], rows[i + 1][k]]) for k in ("input_ids", "labels")} for i in (0, 2, 4)
    ]
    big = train(make_l2a(), None, _config(tmp_path / "a"), data=stacked).history
    accumulated = train(make_l2a(), None, _config(tmp_path / "b", grad_accum_steps=2), data=rows).history
    for a, b in zip(big, accumulated, strict=True):
        assert a["lm_loss"] == pytest.approx(b["lm_loss"], rel=1e-5)
        assert a["router_regularizer"] == pytest.approx(b["router_regularizer"], rel=1e-5)
        assert a["sparsity_per_layer"] == pytest.approx(b["sparsity_per_layer"], abs=1e-6)


def test_log_records_jsonl_and_tensorboard(make_l2a, make_batches, tmp_path):
    seen = []
    result = train(
        make_l2a(),
        None,
        _config(tmp_path, steps=4, logging=LoggingConfig(every=2, progress_bar=False, tensorboard=True)),
        data=make_batches(4),
        on_log=seen.append,
    )
    assert [r["step"] for r in result.history] == [2, 4] and seen == result.history
    lines = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert lines == result.history
    record = lines[-1]
    for key in ("lm_loss", "router_regularizer", "lambda", "sparsity", "lr", "grad_norm", "tokens_per_s"):
        assert isinstance(record[key], float), key
    assert len(record["sparsity_per_layer"]) == len(record["global_layers"]) == 2
    assert 0 <= record["leakage_steps"] <= 2
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_data_exhaustion_stops_early(make_l2a, make_batches, tmp_path):
    config = _config(
        tmp_path,
        steps=5,
        grad_accum_steps=2,
        logging=LoggingConfig(every=10, progress_bar=False),
        checkpoint=CheckpointConfig(save_final=True),
    )
    result = train(make_l2a(), None, config, data=make_batches(5))
    assert result.step == 2 and result.data_exhausted
    assert [r["step"] for r in result.history] == [2]  # the partial log interval is still reported
    assert result.checkpoint.name == "step-000002"


def test_context_extension_rebuilds_rotary(make_l2a, make_batches, tmp_path):
    model = make_l2a()
    train(
        model,
        None,
        _config(tmp_path, steps=1, rope_theta=5e6, max_position_embeddings=4096),
        data=make_batches(1),
    )
    assert model.config.rope_parameters["rope_theta"] == 5e6 and model.config.max_position_embeddings == 4096
    d = model.config.head_dim
    expected = 1.0 / (5e6 ** (torch.arange(0, d, 2, dtype=torch.float) / d))
    torch.testing.assert_close(model.model.rotary_emb.inv_freq, expected)


def test_model_without_router_trains(make_batches, tmp_path):
    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=259,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
    )
    model = Qwen3ForCausalLM(config)
    data = make_batches(4, packed=False, batch=2)
    result = train(model, None, _config(tmp_path, steps=4, trainable=["*"]), data=data)
    assert [r["router_regularizer"] for r in result.history] == [0.0] * 4
    assert all("sparsity" not in r and r["leakage_steps"] == 0 for r in result.history)
    with pytest.raises(ValueError, match="takes no cu_seqlens"):
        train(model, None, _config(tmp_path / "packed", trainable=["*"]), data=make_batches(3))


def test_activation_checkpointing_gives_the_same_steps(make_l2a, make_batches, tmp_path):
    plain = train(make_l2a(), None, _config(tmp_path / "a"), data=make_batches(3)).history
    model = make_l2a()
    checkpointed = train(
        model, None, _config(tmp_path / "b", gradient_checkpointing=True), data=make_batches(3)
    )
    assert model.model.gradient_checkpointing
    for a, b in zip(plain, checkpointed.history, strict=True):
        assert a["lm_loss"] == pytest.approx(b["lm_loss"], rel=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)


def test_mfu_flop_count(make_l2a):
    from l2a.training.metrics import attention_pairs, flops_coefficients

    packed = {"input_ids": torch.zeros(1, 10, dtype=torch.long), "cu_seqlens": torch.tensor([0, 4, 10])}
    assert attention_pairs(packed) == 4**2 + 6**2
    assert attention_pairs({"input_ids": torch.zeros(3, 10, dtype=torch.long)}) == 3 * 10**2
    model = make_l2a()
    per_token, per_pair = flops_coefficients(model)
    non_embedding = sum(p.numel() for n, p in model.named_parameters() if n != "model.embed_tokens.weight")
    assert per_token == 6 * non_embedding and per_pair == 6 * 2 * 4 * 16


def _spy_leakage(model) -> tuple[list, list]:
    """Records each forward's `global_leakage` keyword and whether layer 0's global branch got every query."""
    passed, dense = [], []
    model.register_forward_pre_hook(
        lambda module, args, kwargs: passed.append(kwargs.get("global_leakage")), with_kwargs=True
    )
    branch = model.model.layers[0].global_attn
    branch.register_forward_pre_hook(lambda module, args: dense.append(bool(args[2].all())))
    return passed, dense


def test_leakage_steps_reach_forward(make_l2a, make_batches, tmp_path):
    """`global_leakage=True` reaches the model (and its global branch runs every query) on the scheduled
    steps only, for every micro-batch of such a step."""
    from l2a.training.schedules import leakage_draw

    model = make_l2a()
    passed, dense = _spy_leakage(model)
    steps, accum, seed, p = 12, 2, 3, 0.4
    config = _config(tmp_path, steps=steps, grad_accum_steps=accum, seed=seed)
    config.router.leakage_probability = p
    history = train(model, None, config, data=make_batches(steps * accum, packed=False)).history
    scheduled = [leakage_draw(seed, step, p) for step in range(steps)]
    assert any(scheduled) and not all(scheduled), "the schedule must mix leakage and routed steps"
    expected = [leak for leak in scheduled for _ in range(accum)]
    assert passed == expected
    assert dense == expected, "a leakage step must run global attention for every query, others not"
    assert sum(record["leakage_steps"] for record in history) == sum(scheduled)
