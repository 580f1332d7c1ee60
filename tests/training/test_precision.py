"""frozen_precision='bf16': frozen weights stored in bf16, trained ones kept fp32, residual stream in bf16."""

from __future__ import annotations

import pytest
import torch

from l2a.training import LoggingConfig, TrainConfig, train


def test_frozen_weights_in_bf16_keep_the_residual_stream_bf16(make_l2a, make_batches, tmp_path):
    model = make_l2a()
    config = TrainConfig(output_dir=str(tmp_path), device="cpu", steps=1, precision="bf16",
                         frozen_precision="bf16", logging=LoggingConfig(progress_bar=False),
                         checkpoint={"save_final": False})  # fmt: skip
    history = train(model, None, config, data=make_batches(1, seq_len=32)).history
    assert len(history) == 1 and torch.isfinite(torch.tensor(history[0]["lm_loss"]))
    for name, param in model.named_parameters():
        assert param.dtype == (torch.float32 if param.requires_grad else torch.bfloat16), name
    ids = make_batches(1, seq_len=32, packed=False)[0]["input_ids"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        states = model(ids, output_hidden_states=True).hidden_states
    # every layer's input (what activation checkpointing keeps) is bf16, also after the global branch
    assert all(h.dtype == torch.bfloat16 for h in states[:-1])


def test_frozen_precision_needs_bf16():
    with pytest.raises(ValueError, match="frozen_precision='bf16' needs precision='bf16'"):
        TrainConfig(frozen_precision="bf16", precision="fp32")


def test_activation_offload_trains_identically(make_l2a, make_batches, tmp_path, monkeypatch):
    packed = []

    class CountingSaveOnCpu(torch.autograd.graph.save_on_cpu):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            pack = self.pack_hook
            self.pack_hook = lambda t: packed.append(tuple(t.shape)) or pack(t)

    monkeypatch.setattr(torch.autograd.graph, "save_on_cpu", CountingSaveOnCpu)
    histories = []
    for offload in (False, True):
        config = TrainConfig(
            output_dir=str(tmp_path / str(offload)),
            device="cpu",
            steps=2,
            gradient_checkpointing=True,
            activation_offload=offload,
            logging=LoggingConfig(every=1, progress_bar=False),
            checkpoint={"save_final": False},
        )
        histories.append(train(make_l2a(), None, config, data=make_batches(2, seq_len=32)).history)
        # the layer inputs kept by activation checkpointing go through the offload hooks (2 layers x 2 steps)
        assert packed.count((1, 32, 64)) >= (4 if offload else 0)
    for a, b in zip(*histories, strict=True):
        assert (a["lm_loss"], a["grad_norm"]) == (b["lm_loss"], b["grad_norm"])
