"""L2AConfig refuses values that would give NaN or meaningless models, at construction."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from l2a import L2AConfig, L2AForCausalLM

TINY = dict(vocab_size=50, hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=1)


@pytest.mark.parametrize("theta", [0.0, -1e4, math.nan, math.inf], ids=["zero", "negative", "nan", "inf"])
def test_rope_theta_must_be_positive(theta):
    with pytest.raises(ValueError, match="rope_theta must be a positive number"):
        L2AConfig(**TINY, rope_theta=theta)
    with pytest.raises(ValueError, match="rope_theta must be a positive number"):
        L2AConfig(**TINY, rope_parameters={"rope_type": "default", "rope_theta": theta})


def test_rope_theta_zero_would_give_nan_logits():
    """Why the check exists: the rotary frequencies theta ** (-2i / D) are inf/NaN for theta = 0."""
    config = L2AConfig(**TINY, rope_theta=1e4, attention_backend="torch")
    config.rope_parameters["rope_theta"] = 0.0  # bypasses the check, as an edited config.json would
    logits = L2AForCausalLM(config)(torch.randint(0, 50, (1, 6))).logits
    assert not torch.isfinite(logits).all()


@pytest.mark.parametrize("limit", [0, -5], ids=["zero", "negative"])
def test_max_positions_must_be_positive(limit):
    with pytest.raises(ValueError, match="max_position_embeddings must be a positive int"):
        L2AConfig(**TINY, rope_theta=1e4, max_position_embeddings=limit, sliding_window=1)


def test_window_beyond_max_positions_warns():
    with pytest.warns(UserWarning, match="sliding_window=600 exceeds max_position_embeddings=512"):
        L2AConfig(**TINY, rope_theta=1e4, sliding_window=600, max_position_embeddings=512)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        L2AConfig(**TINY, rope_theta=1e4, sliding_window=512, max_position_embeddings=512)
