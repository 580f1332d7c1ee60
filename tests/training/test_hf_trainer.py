"""L2ATrainer: a few HF Trainer steps on CPU train the router with the regulariser and leakage steps;
by default it trains what `l2a train` trains."""

from __future__ import annotations

import pytest
import torch
from transformers import TrainingArguments

from l2a.training import RouterConfig, TrainConfig
from l2a.training.hf import L2ATrainer
from l2a.training.params import classify_parameter
from l2a.training.schedules import leakage_draw


def _rows(n: int = 8):
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": ids, "labels": ids.clone()} for ids in torch.randint(0, 256, (n, 32), generator=g)]


def _args(tmp_path, **overrides) -> TrainingArguments:
    fields = dict(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    return TrainingArguments(**(fields | overrides))


def test_hf_trainer_steps_change_the_router(make_l2a, tmp_path):
    model = make_l2a()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    rows = _rows()
    args = _args(tmp_path)
    router = RouterConfig(regularizer_weight=1e-2, regularizer_schedule="constant", leakage_probability=0.5)
    trainer = L2ATrainer(
        model=model, args=args, train_dataset=rows, router=router, trainable=["attention", "norms", "router"]
    )
    trainer.train()

    params = dict(model.named_parameters())
    assert not torch.equal(params["model.layers.0.router.weight"], before["model.layers.0.router.weight"])
    assert torch.equal(
        params["model.layers.0.mlp.up_proj.weight"], before["model.layers.0.mlp.up_proj.weight"]
    )
    logs = [entry for entry in trainer.state.log_history if "router_regularizer" in entry]
    assert len(logs) == 3
    for entry in logs:
        assert entry["router_lambda"] == pytest.approx(1e-2)
        assert 0.0 <= entry["sparsity"] <= 1.0 and "sparsity_layer_1" in entry
        # the Trainer's loss is lm_loss + λ·reg averaged over the accumulation micro-batches
        assert entry["loss"] == pytest.approx(entry["lm_loss"] + 1e-2 * entry["router_regularizer"], rel=1e-3)


def test_hf_trainer_rejects_models_without_router(tmp_path):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16)  # fmt: skip
    model = Qwen3ForCausalLM(config)
    with pytest.raises(TypeError, match="no router"):
        L2ATrainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True))


def test_hf_trainer_defaults_to_the_groups_of_l2a_train(make_l2a, tmp_path):
    """Without `trainable`: attention, norms and router train (TrainConfig's default), the rest not."""
    model = make_l2a()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = L2ATrainer(model=model, args=_args(tmp_path, max_steps=2), train_dataset=_rows())
    assert TrainConfig(output_dir=str(tmp_path)).trainable == ["attention", "norms", "router"]
    groups = {name: classify_parameter(name) for name, _ in model.named_parameters()}
    assert {"attention", "norms", "router", "mlp", "embeddings"} <= set(groups.values())
    for name, param in model.named_parameters():
        assert param.requires_grad == (groups[name] in ("attention", "norms", "router")), name
    trainer.train()
    for name, param in model.named_parameters():
        changed = not torch.equal(param, before[name])
        assert changed == param.requires_grad, name
    assert not torch.equal(model.model.layers[0].router.weight, before["model.layers.0.router.weight"])
    assert torch.equal(model.model.embed_tokens.weight, before["model.embed_tokens.weight"])


def test_hf_trainer_leakage_steps_reach_forward(make_l2a, tmp_path):
    """`global_leakage=True` reaches the model on the steps drawn from (args.seed, global step) only, for
    every micro-batch of such a step; the global branch then runs every query."""
    model = make_l2a()
    passed, dense = [], []
    model.register_forward_pre_hook(
        lambda module, args, kwargs: passed.append(kwargs.get("global_leakage")), with_kwargs=True
    )
    model.model.layers[0].global_attn.register_forward_pre_hook(
        lambda module, args: dense.append(bool(args[2].all()))
    )
    steps, accum, seed, p = 10, 2, 5, 0.4
    args = _args(tmp_path, max_steps=steps, gradient_accumulation_steps=accum, seed=seed, logging_steps=5)
    router = RouterConfig(regularizer_weight=1e-3, leakage_probability=p)
    L2ATrainer(model=model, args=args, train_dataset=_rows(40), router=router).train()
    scheduled = [leakage_draw(seed, step, p) for step in range(steps)]
    assert any(scheduled) and not all(scheduled), "the schedule must mix leakage and routed steps"
    expected = [leak for leak in scheduled for _ in range(accum)]
    assert passed == expected
    assert dense == expected
