"""Tiny models (hidden 64, 2 layers, byte-tokenizer vocabulary) and helpers for the training tests."""

from __future__ import annotations

import pytest
import torch


def tiny_l2a(seed: int = 0, **overrides):
    from l2a.models import L2AConfig, L2AForCausalLM

    fields = dict(
        vocab_size=259,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        sliding_window=8,
        qk_norm=True,
        base_model_type="qwen3",
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        attention_backend="torch",
    )
    fields.update(overrides)
    torch.manual_seed(seed)
    model = L2AForCausalLM(L2AConfig(**fields))
    # Zero-init routers route every token: give them a random start so routing decisions vary.
    for name, param in model.named_parameters():
        if "router" in name:
            torch.nn.init.normal_(param, std=0.05)
    return model


def random_batches(n: int, *, seq_len: int = 32, batch: int = 1, packed: bool = True, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        item = {"input_ids": torch.randint(0, 256, (batch, seq_len), generator=g)}
        if packed:
            cut = int(torch.randint(4, seq_len - 4, (1,), generator=g))
            item["cu_seqlens"] = torch.tensor([0, cut, seq_len])
            item["position_ids"] = torch.cat([torch.arange(cut), torch.arange(seq_len - cut)])[None]
            labels = item["input_ids"].clone()
            labels[:, cut] = -100
            item["labels"] = labels
        out.append(item)
    return out


@pytest.fixture
def make_l2a():
    return tiny_l2a


@pytest.fixture
def make_batches():
    return random_batches
