"""prune_global_layers: local-only layers, updated config, reload, smaller cache."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from l2a.models import prune_global_layers


def test_prune_by_index_saves_and_reloads(tiny_l2a, tmp_path):
    model = tiny_l2a("qwen3", window=4)
    ids = torch.randint(0, 300, (1, 10))
    assert prune_global_layers(model, [0]) == [0]
    assert model.config.global_layers == [1]
    assert not any(
        k.startswith("model.layers.0.global") or "layers.0.router" in k for k in model.state_dict()
    )
    out = model(ids)
    assert out.router_fraction.shape == (1,)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.global_layers == [1] and not loaded.model.layers[0].has_global
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=0, rtol=0)


def test_pruned_layer_equals_never_routed_layer(tiny_l2a):
    model = tiny_l2a("qwen2", window=3)
    ids = torch.randint(0, 300, (2, 9))
    with torch.no_grad():
        model.model.layers[1].router.threshold = 1.5  # soft <= 1: never fires
        before = model(ids).logits
        prune_global_layers(model, [1])
        torch.testing.assert_close(model(ids).logits, before, atol=1e-6, rtol=0)


def test_prune_by_threshold_and_cache_shrinks(tiny_l2a):
    model = tiny_l2a("qwen2", window=3)
    ids = torch.randint(1, 300, (1, 12))
    full = model.generate(
        ids, max_new_tokens=3, do_sample=False, return_dict_in_generate=True, pad_token_id=0
    )
    assert prune_global_layers(model, threshold=0.2, fractions=torch.tensor([0.1, 0.7])) == [0]
    pruned = model.generate(
        ids, max_new_tokens=3, do_sample=False, return_dict_in_generate=True, pad_token_id=0
    )
    before, after = full.past_key_values.layer_nbytes(), pruned.past_key_values.layer_nbytes()
    assert after[0]["global"] == 0 < before[0]["global"]
    assert after[1] == before[1]


def test_bad_arguments(tiny_l2a):
    model = tiny_l2a("qwen2", window=3, global_layers=[1])
    with pytest.raises(ValueError, match="no global branch"):
        prune_global_layers(model, [0])
    with pytest.raises(ValueError, match="either layers"):
        prune_global_layers(model)
    with pytest.raises(ValueError, match="1 global layers"):
        prune_global_layers(model, threshold=0.1, fractions=[0.1, 0.2])
    with pytest.raises(TypeError):
        prune_global_layers(torch.nn.Linear(2, 2), [0])
