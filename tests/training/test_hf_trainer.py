"""L2ATrainer: a few HF Trainer steps on CPU train the router with the regulariser and leakage steps."""

from __future__ import annotations

import pytest
import torch
from transformers import TrainingArguments

from l2a.training import RouterConfig
from l2a.training.hf import L2ATrainer


def test_hf_trainer_steps_change_the_router(make_l2a, tmp_path):
    model = make_l2a()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": ids, "labels": ids.clone()} for ids in torch.randint(0, 256, (8, 32), generator=g)]
    args = TrainingArguments(
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
