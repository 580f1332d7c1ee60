"""Speed report on CPU: sane fields, and KV-cache bytes consistent with the cache layouts
(HF dense cache; L2A local cache bounded by the window, global cache growing with N; pruned layers)."""

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM
from transformers.cache_utils import DynamicCache

from l2a.evaluation.speed import kv_cache_bytes, measure_speed

HKV, D, LAYERS = 2, 8, 3


def _qwen3_config(**kwargs) -> Qwen3Config:
    return Qwen3Config(
        vocab_size=259,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=HKV,
        head_dim=D,
        max_position_embeddings=256,
        **kwargs,
    )


def _per_token(dtype_bytes: int = 4) -> int:
    return 2 * HKV * D * dtype_bytes  # keys + values of one token in one layer


def test_speed_report_fields_for_hf_model():
    model = Qwen3ForCausalLM(_qwen3_config()).eval()
    report = measure_speed(model, [16, 48], decode_tokens=3, repeats=2, warmup=1)
    assert report.device == "cpu" and report.dtype == "float32"
    assert report.memory_measure == "n/a (CPU)"
    assert report.model_bytes == sum(p.numel() * 4 for p in model.parameters()) + sum(
        b.numel() * b.element_size() for b in model.buffers()
    )
    assert [p.length for p in report.points] == [16, 48]
    for point in report.points:
        assert point.prefill_ms > 0 and point.decode_ms_per_step > 0
        assert point.prefill_tokens_per_s == pytest.approx(point.length / (point.prefill_ms / 1e3))
        assert point.decode_tokens_per_s == pytest.approx(1e3 / point.decode_ms_per_step)
        assert point.peak_memory_bytes is None
        # HF dense cache after the prefill: every layer keeps every token
        assert point.kv_cache_bytes == LAYERS * point.length * _per_token()
    assert set(report.to_dict()) >= {"points", "environment", "device"}


def test_kv_cache_bytes_of_hf_cache_and_tuples():
    cache = DynamicCache()
    k = torch.zeros(1, HKV, 5, D)
    cache.update(k, k.clone(), 0)
    assert kv_cache_bytes(cache) == 5 * _per_token()
    assert kv_cache_bytes(((k, k), (k, k))) == 4 * k.nbytes
    with pytest.raises(ValueError, match="no KV cache"):
        kv_cache_bytes(None)


@pytest.mark.parametrize(
    "kwargs", [{"lengths": []}, {"lengths": [8], "repeats": 0}, {"lengths": [8], "decode_tokens": -1}]
)
def test_measure_speed_rejects_bad_arguments(kwargs):
    model = Qwen3ForCausalLM(_qwen3_config()).eval()
    with pytest.raises(ValueError):
        measure_speed(model, **kwargs)


WINDOW = 8


@pytest.fixture(scope="module")
def base_model():
    torch.manual_seed(0)
    return Qwen3ForCausalLM(_qwen3_config(eos_token_id=258, pad_token_id=256)).eval()


def _expected_l2a_bytes(n: int, global_layers: int) -> int:
    # from the method: every layer's local attention needs the last W - 1 keys/values for the next query,
    # a layer that can route needs every token's; bytes = layers x tokens x Hkv x D x 2 (K and V) x 4 (fp32)
    local = LAYERS * min(WINDOW - 1, n) * HKV * D * 2 * 4
    return local + global_layers * n * HKV * D * 2 * 4


@pytest.mark.parametrize(
    "force_route,global_layers",
    [(None, LAYERS), ("all", LAYERS), ("none", 0)],
    ids=["l2a", "all_global", "local_only"],
)
def test_l2a_kv_cache_bytes_from_first_principles(base_model, force_route, global_layers):
    from l2a.models import convert_model

    model = convert_model(base_model, sliding_window=WINDOW, force_route=force_route).eval()
    report = measure_speed(model, [4, 16, 40], decode_tokens=2, repeats=1, warmup=0)
    sizes = [p.kv_cache_bytes for p in report.points]
    assert sizes == [_expected_l2a_bytes(n, global_layers) for n in (4, 16, 40)]
    dense = measure_speed(base_model, [40], decode_tokens=0, repeats=1, warmup=0).points[0].kv_cache_bytes
    if global_layers:
        assert sizes[2] > dense  # L2A keeps a local cache besides the full-length global one
    else:
        assert sizes[2] == LAYERS * (WINDOW - 1) * HKV * D * 2 * 4 < dense


def test_pruned_l2a_model_has_a_smaller_kv_cache(base_model):
    from l2a.models import convert_model, prune_global_layers

    model = convert_model(base_model, sliding_window=WINDOW).eval()
    full = measure_speed(model, [40], decode_tokens=1, repeats=1, warmup=0).points[0].kv_cache_bytes
    prune_global_layers(model, [0, 2])
    pruned = measure_speed(model, [40], decode_tokens=1, repeats=1, warmup=0).points[0]
    assert pruned.kv_cache_bytes == _expected_l2a_bytes(40, 1)
    assert full - pruned.kv_cache_bytes == 2 * 40 * _per_token()
    assert pruned.decode_tokens_per_s > 0
