"""L2AConfig: defaults, validation with clear errors, RoPE keyword handling, JSON round trip."""

from __future__ import annotations

import pytest

from l2a import L2AConfig

TINY = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=3, rope_theta=1e4)


def test_defaults():
    config = L2AConfig(**TINY)
    assert config.model_type == "l2a"
    assert config.global_layers == [0, 1, 2]
    assert config.head_dim == 8
    assert (config.router_temperature, config.router_threshold, config.force_route) == (0.1, 0.5, None)
    assert config.rope_parameters == {"rope_type": "default", "rope_theta": 1e4}


def test_legacy_rope_scaling_keyword():
    config = L2AConfig(**TINY, rope_scaling={"rope_type": "linear", "factor": 4.0})
    assert config.rope_parameters["rope_type"] == "linear" and config.rope_parameters["rope_theta"] == 1e4


def test_json_round_trip(tmp_path):
    config = L2AConfig(
        **TINY, sliding_window=7, global_layers=[2, 0], force_route="all", attention_backend="torch"
    )
    config.save_pretrained(tmp_path)
    loaded = L2AConfig.from_pretrained(tmp_path)
    assert loaded.global_layers == [0, 2] and loaded.sliding_window == 7
    assert loaded.force_route == "all" and loaded.attention_backend == "torch"


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"sliding_window": 0}, "sliding_window must be a positive int"),
        ({"sliding_window": -2}, "sliding_window must be a positive int"),
        ({"force_route": "some"}, "force_route must be None, 'all' or 'none'"),
        ({"global_layers": [0, 3]}, r"global_layers \[3\] out of range"),
        ({"global_layers": [-1]}, r"global_layers \[-1\] out of range"),
        ({"attention_backend": "cuda"}, "attention_backend must be one of"),
        ({"router_temperature": 0.0}, "router_temperature must be > 0"),
        ({"router_threshold": 1.0}, r"router_threshold must lie in \(0, 1\)"),
        ({"num_key_value_heads": 3}, "must be a multiple of"),
        ({"base_model_type": "gpt2"}, "base_model_type must be one of"),
        ({"router_regularizer_weight": -1.0}, "router_regularizer_weight must be >= 0"),
    ],
    ids=lambda v: "-".join(f"{k}={x}" for k, x in v.items()) if isinstance(v, dict) else None,
)
def test_validation_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        L2AConfig(**{**TINY, **overrides})
