"""GPU smoke test of the trainer: bf16 autocast or fp32, Triton kernels, activation checkpointing."""

from __future__ import annotations

import math

import pytest
import torch

from l2a.training import CheckpointConfig, LoggingConfig, OptimConfig, RouterConfig, TrainConfig, train

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_cuda_training_steps(make_l2a, make_batches, tmp_path, precision):
    model = make_l2a(attention_backend="auto", head_dim=32)  # 32: the smallest head dim of the Triton kernels
    config = TrainConfig(
        output_dir=str(tmp_path),
        device="cuda",
        precision=precision,
        steps=4,
        grad_accum_steps=2,
        gradient_checkpointing=True,
        optim=OptimConfig(lr=1e-2),
        router=RouterConfig(regularizer_weight=1e-2, leakage_probability=0.5),
        logging=LoggingConfig(every=1, progress_bar=False),
        checkpoint=CheckpointConfig(every=2),
    )
    history = train(model, None, config, data=make_batches(8, seq_len=128)).history
    assert len(history) == 4
    for record in history:
        assert math.isfinite(record["lm_loss"]) and math.isfinite(record["grad_norm"])
        assert 0.0 <= record["sparsity"] <= 1.0
    assert next(model.parameters()).device.type == "cuda"


def test_auto_backend_falls_back_to_torch_for_head_dim_16(make_l2a, make_batches):
    """head_dim 16 is outside the Triton kernels: "auto" runs the PyTorch ops with a warning."""
    model = make_l2a(attention_backend="auto").cuda()
    ids = make_batches(1, seq_len=64, packed=False)[0]["input_ids"].cuda()
    with pytest.warns(UserWarning, match="head_dim 16"):
        out = model(ids, labels=ids, loss_impl="plain")
    model.config.attention_backend = "torch"
    ref = model(ids, labels=ids, loss_impl="plain")
    torch.testing.assert_close(out.logits, ref.logits)
