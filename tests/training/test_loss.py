"""The fused LM loss in the model and in `l2a train`: same losses and gradients as the plain path."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from l2a.training import LoggingConfig, OptimConfig, TrainConfig, train


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("packed", [False, True], ids=["rows", "packed"])
def test_l2a_chunked_loss_equals_plain(make_l2a, make_batches, packed):
    model = make_l2a()
    batch = make_batches(1, seq_len=40, batch=1 if packed else 2, packed=packed)[0]
    batch.setdefault("labels", batch["input_ids"])
    results = {}
    for impl in ("plain", "chunked"):
        model.zero_grad()
        out = model(**batch, loss_impl=impl, router_regularizer_weight=1e-2, num_items_in_batch=50)
        out.loss.backward()
        results[impl] = (out.loss.detach(), out.logits, _grads(model))
    (plain_loss, plain_logits, plain_grads), (loss, logits, grads) = results["plain"], results["chunked"]
    assert plain_logits is not None and logits is None
    torch.testing.assert_close(loss, plain_loss, rtol=1e-6, atol=1e-6)
    assert plain_grads.keys() == grads.keys() and "lm_head.weight" in grads
    for name, grad in grads.items():
        torch.testing.assert_close(grad, plain_grads[name], rtol=1e-5, atol=1e-6, msg=name)


def test_l2a_rejects_labels_and_shift_labels(make_l2a):
    ids = torch.randint(0, 256, (1, 8))
    with pytest.raises(ValueError, match="labels or shift_labels"):
        make_l2a()(ids, labels=ids, shift_labels=ids)


def _tiny_qwen3(seed=0):
    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=259,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
    )
    return Qwen3ForCausalLM(config)


def test_hf_model_trains_the_same_with_the_fused_loss(make_batches, tmp_path):
    rows = make_batches(4, seq_len=24, packed=False)
    for i, row in enumerate(rows):
        row["labels"] = row["input_ids"].clone()
        row["labels"][:, : 2 * i] = -100
    histories, models = {}, {}
    for impl in ("plain", "chunked"):
        config = TrainConfig(
            output_dir=str(tmp_path / impl),
            device="cpu",
            steps=2,
            grad_accum_steps=2,
            trainable=["*"],
            loss_impl=impl,
            optim=OptimConfig(lr=1e-2),
            logging=LoggingConfig(every=1, progress_bar=False),
            checkpoint={"save_final": False},
        )
        models[impl] = _tiny_qwen3()
        result = train(models[impl], None, config, data=rows)
        assert result.loss_impl == impl
        histories[impl] = result.history
    for a, b in zip(histories["plain"], histories["chunked"], strict=True):
        assert a["lm_loss"] == pytest.approx(b["lm_loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    for name, param in models["plain"].state_dict().items():
        torch.testing.assert_close(models["chunked"].state_dict()[name], param, rtol=1e-4, atol=1e-5)
    assert "forward" not in vars(models["chunked"])  # the class's forward is back
