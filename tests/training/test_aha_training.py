"""`train` on an AHA model: same loop and groups, L1 regulariser, leakage steps, per-head sparsity logs."""

from __future__ import annotations

import json

import pytest
import torch

from l2a.models.modeling import _head_fractions, _router_statistics
from l2a.training import CheckpointConfig, LoggingConfig, OptimConfig, RouterConfig, TrainConfig, train
from l2a.training.params import parameter_groups


def _repeating_batches(n: int, seq_len: int = 32, distinct: int | None = None):
    """Rows whose second half repeats the first (beyond the window); `distinct` batches cycled."""
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        if distinct is not None and i >= distinct:
            out.append(out[i % distinct])
            continue
        half = torch.randint(0, 256, (4, seq_len // 2), generator=g)
        ids = torch.cat([half, half], dim=1)
        labels = ids.clone()
        labels[:, : seq_len // 2 + 1] = -100
        out.append({"input_ids": ids, "labels": labels})
    return out


def test_l1_penalty_and_head_fractions_hand_case():
    soft = torch.tensor([[[0.9, 0.2], [0.6, 0.1]]])  # (B=1, N=2, H=2)
    valid = torch.tensor([[True, False]])
    fraction, reg = _router_statistics([(soft, soft >= 0.5)], valid, torch.device("cpu"), "l1")
    torch.testing.assert_close(fraction, torch.tensor([0.5]))  # token 0: one of two heads
    torch.testing.assert_close(reg, torch.tensor(0.9 + 0.2))
    _, squared = _router_statistics([(soft, soft >= 0.5)], valid, torch.device("cpu"), "squared")
    torch.testing.assert_close(squared, torch.tensor(0.81 + 0.04))
    torch.testing.assert_close(_head_fractions([(soft, soft >= 0.5)], valid), torch.tensor([[1.0, 0.0]]))
    assert _head_fractions([(soft[..., 0], soft[..., 0] >= 0.5)], valid) is None  # token-wise


def test_training_lowers_loss_routes_fewer_heads_and_logs_per_head(make_l2a, tmp_path):
    model = make_l2a(method="aha", sliding_window=4)
    groups = parameter_groups(model)
    assert groups["router"] and groups["attention"] and not groups["other"]
    config = TrainConfig(
        output_dir=str(tmp_path),
        device="cpu",
        steps=24,
        trainable=["*"],  # a random tiny model: the frozen embeddings would leave little to learn in 24 steps
        optim=OptimConfig(lr=1e-2, warmup_steps=0, lr_schedule="constant"),
        router=RouterConfig(
            regularizer_weight=2e-3, regularizer_schedule="constant", leakage_probability=0.25
        ),
        logging=LoggingConfig(every=4, progress_bar=False, tensorboard=True),
        checkpoint=CheckpointConfig(save_final=False),
    )
    before = model.model.layers[0].router.weight.detach().clone()
    history = train(model, None, config, data=_repeating_batches(24, distinct=2)).history
    assert history[-1]["lm_loss"] < history[0]["lm_loss"] - 0.5
    assert history[-1]["leakage_steps"] + sum(r["leakage_steps"] for r in history[:-1]) > 0
    assert not torch.equal(model.model.layers[0].router.weight, before)
    last = history[-1]
    per_head = last["sparsity_per_head"]
    assert len(per_head) == 2 and len(per_head[0]) == 4
    assert last["sparsity_per_layer"] == pytest.approx([sum(h) / 4 for h in per_head], abs=1e-6)
    assert 0.0 < last["sparsity"] < 1.0, "some (token, head) pairs go to the window, not all"
    record = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[-1])
    assert record["sparsity_per_head"] == per_head
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
